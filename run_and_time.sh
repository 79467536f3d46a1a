#!/usr/bin/env bash
# One timed MLPerf training run of Mask R-CNN, in the style of the MLPerf reference harnesses.
#
#   DATA_DIR=/data/coco2017 MODEL_DIR=/runs/r1 [NUM_GPUS=8] [SEED=1] [CONFIG=...] \
#       ./run_and_time.sh [extra flags for official_maskrcnn.train, e.g. --gin_param ...]
#
# Environment:
#   DATA_DIR   (required) holds train-*.tfrecord, val-*.tfrecord (tfrecord_tools output) and
#              annotations/instances_val2017.json (see download_dataset.sh).
#   MODEL_DIR  (required) checkpoints, operative_config.gin, mlperf.log, metrics.jsonl.
#   NUM_GPUS   GPUs to train on; default: all visible (CUDA_VISIBLE_DEVICES, else nvidia-smi,
#              else 0 = CPU).
#   SEED       passed as the gin macro `seed` and reported in the RESULT line; default: unset
#              (the config's seed is used and the RESULT field is empty).
#   CONFIG     gin file; default: configs/mlperf_r50_fpn.gin of this repository.
#   PYTHON     interpreter; default: python3 (or python) on PATH.
#   CLEAR_CACHES=1  drop the page cache before the run (needs root), as MLPerf closed runs do.
#
# Prints STARTING/ENDING TIMING RUN lines and
#   RESULT,OBJECT_DETECTION,<seed>,<seconds>,<user>,<start date>
# and exits with the training's exit code.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

die() {
    echo "run_and_time.sh: error: $*" >&2
    exit 2
}

[[ -n "${DATA_DIR:-}" ]] || die "DATA_DIR is not set; it must name the folder with train-*, \
val-* TFRecords and annotations/instances_val2017.json (see download_dataset.sh)"
[[ -n "${MODEL_DIR:-}" ]] || die "MODEL_DIR is not set; it must name the folder for \
checkpoints and mlperf.log"

CONFIG="${CONFIG:-${SCRIPT_DIR}/configs/mlperf_r50_fpn.gin}"
[[ -f "${CONFIG}" ]] || die "gin config not found: ${CONFIG} (set CONFIG to a .gin file)"

# Object-store paths (gs://, s3://) cannot be tested with -d; local ones are checked here so a
# typo fails in a second instead of after the model has been built.
if [[ "${DATA_DIR}" != *://* && ! -d "${DATA_DIR}" ]]; then
    die "DATA_DIR=${DATA_DIR} is not a directory"
fi

count_visible_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        # Set but empty hides every GPU; otherwise one entry per comma-separated id.
        if [[ -z "${CUDA_VISIBLE_DEVICES}" ]]; then
            echo 0
        else
            awk -F, '{print NF}' <<<"${CUDA_VISIBLE_DEVICES}"
        fi
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}
NUM_GPUS="${NUM_GPUS:-$(count_visible_gpus)}"
[[ "${NUM_GPUS}" =~ ^[0-9]+$ ]] || die "NUM_GPUS must be a non-negative integer, found '${NUM_GPUS}'"

PYTHON="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
SEED="${SEED:-}"

args=(
    --gin_file "${CONFIG}"
    --model_dir "${MODEL_DIR}"
    --gin_param "train/DatasetBuilder.file_pattern='${DATA_DIR}/train-*'"
    --gin_param "eval/DatasetBuilder.file_pattern='${DATA_DIR}/val-*'"
    --gin_param "coco_annotations_file='${DATA_DIR}/annotations/instances_val2017.json'"
    --gin_param "num_gpus=${NUM_GPUS}"
)
if [[ -n "${SEED}" ]]; then
    args+=(--gin_param "seed=${SEED}")
fi

if [[ "${CLEAR_CACHES:-0}" == "1" ]]; then
    sync && echo 3 >/proc/sys/vm/drop_caches || die "CLEAR_CACHES=1 needs root to drop caches"
fi

# Lets `python -m official_maskrcnn.train` work from a checkout that is not pip-installed.
export PYTHONPATH="${SCRIPT_DIR}${PYTHONPATH:+:${PYTHONPATH}}"

start=$(date +%s)
start_fmt=$(date +%Y-%m-%d\ %r)
echo "STARTING TIMING RUN AT ${start_fmt}"

status=0
"${PYTHON}" -m official_maskrcnn.train "${args[@]}" "$@" || status=$?

end=$(date +%s)
end_fmt=$(date +%Y-%m-%d\ %r)
echo "ENDING TIMING RUN AT ${end_fmt}"

result=$((end - start))
echo "RESULT,OBJECT_DETECTION,${SEED},${result},${USER:-$(id -un)},${start_fmt}"

exit "${status}"
