#!/usr/bin/env bash
# Downloads what the MLPerf Mask R-CNN benchmark needs into one folder, checks it, unpacks it and
# prints the commands that turn it into the inputs of run_and_time.sh:
#   COCO 2017 train and val images, the 2017 train/val annotations, Detectron's ImageNet R-50.pkl.
#
#   ./download_dataset.sh [TARGET_DIR]        (default: ./data/coco2017; about 20 GB + 40 GB free)
#
# Resumable: a file whose MD5 is already right is not fetched again, a partial file is continued
# (wget -c / curl -C -), and an archive already unpacked is not unpacked again. A file whose MD5
# is wrong after the download is reported and left in place; delete it and run again.
#
# R50_MD5: Detectron publishes no checksum for R-50.pkl, and we found none we could cite, so its
# check is skipped unless you set R50_MD5=<md5> (e.g. from a copy you trust). The computed MD5 is
# printed either way; the converter (official_maskrcnn.tools.convert_r50_pkl) also checks every
# blob's name and shape, so a truncated or wrong file still fails loudly there.

set -euo pipefail

TARGET="${1:-data/coco2017}"
R50_MD5="${R50_MD5:-}"

COCO_URL="http://images.cocodataset.org"
R50_URL="https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/MSRA/R-50.pkl"

die() {
    echo "download_dataset.sh: error: $*" >&2
    exit 1
}

command -v md5sum >/dev/null 2>&1 || die "md5sum not found (coreutils)"
command -v unzip >/dev/null 2>&1 || die "unzip not found"
if command -v wget >/dev/null 2>&1; then
    fetch_cmd=(wget --continue --progress=dot:giga)
elif command -v curl >/dev/null 2>&1; then
    fetch_cmd=(curl --fail --location --continue-at - --remote-name)
else
    die "neither wget nor curl found"
fi

mkdir -p "${TARGET}"
TARGET="$(cd "${TARGET}" && pwd)"
cd "${TARGET}"

md5_of() {
    md5sum "$1" | cut -d' ' -f1
}

# download URL MD5: fetches basename(URL) into the current folder unless it is already complete
# (an empty MD5 skips the check), then verifies it.
download() {
    local url="$1" expected="$2" file
    file="$(basename "${url}")"
    if [[ -n "${expected}" && -f "${file}" && "$(md5_of "${file}")" == "${expected}" ]]; then
        echo "${file}: present, MD5 ok"
        return
    fi
    echo "${file}: downloading ${url}"
    "${fetch_cmd[@]}" "${url}"
    local actual
    actual="$(md5_of "${file}")"
    if [[ -z "${expected}" ]]; then
        echo "${file}: MD5 ${actual} (not checked: no expected MD5 given)"
    elif [[ "${actual}" != "${expected}" ]]; then
        die "${file}: MD5 ${actual}, expected ${expected}; delete ${TARGET}/${file} and run again"
    else
        echo "${file}: MD5 ok"
    fi
}

# unpack ZIP: unzips once; a marker file records that the archive was fully extracted.
unpack() {
    local zip="$1" marker=".${1%.zip}.unpacked"
    if [[ -f "${marker}" ]]; then
        echo "${zip}: already unpacked"
        return
    fi
    echo "${zip}: unpacking"
    unzip -q -o "${zip}"
    touch "${marker}"
}

download "${COCO_URL}/zips/train2017.zip" cced6f7f71b7629ddf16f17bbcfab6b2
download "${COCO_URL}/zips/val2017.zip" 442b8da7639aecaf257c1dceb8ba8c80
download "${COCO_URL}/annotations/annotations_trainval2017.zip" f4bbac642086de4f52a3fdda2de5fa2c
if [[ -z "${R50_MD5}" ]]; then
    echo "R-50.pkl: no MD5 given (set R50_MD5 to check it); the converter checks its contents"
fi
download "${R50_URL}" "${R50_MD5}"

unpack train2017.zip
unpack val2017.zip
unpack annotations_trainval2017.zip

workers="$(nproc 2>/dev/null || echo 8)"
cat <<EOF

Done: ${TARGET}/{train2017,val2017,annotations,R-50.pkl}. Next, from the repository root:

  python -m tfrecord_tools.create_coco_tfrecord --image_dir ${TARGET}/train2017 \\
      --annotations_file ${TARGET}/annotations/instances_train2017.json \\
      --output_prefix ${TARGET}/train --num_shards 256 --num_workers ${workers}
  python -m tfrecord_tools.create_coco_tfrecord --image_dir ${TARGET}/val2017 \\
      --annotations_file ${TARGET}/annotations/instances_val2017.json \\
      --output_prefix ${TARGET}/val --num_shards 256 --num_workers ${workers}
  python -m official_maskrcnn.tools.convert_r50_pkl --input ${TARGET}/R-50.pkl \\
      --output ${TARGET}/r50_detectron/ckpt

Then: DATA_DIR=${TARGET} MODEL_DIR=<run folder> ./run_and_time.sh
EOF
