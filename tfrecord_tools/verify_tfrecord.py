r"""Reads every record back and checks it against the COCO JSON it was made from.

    python -m tfrecord_tools.verify_tfrecord --file_pattern 'tfrecords/train-*' \
        --annotations_file coco/annotations/instances_train2017.json

Checks, for every record: its image id is in the JSON and appears exactly once; height and width
equal the JSON's; the image is an RGB JPEG of that size; the per-object lists have one length;
every object is an annotation of that image whose box equals the JSON box (after the converter's
documented clipping) within 1e-4 in normalised units, whose label maps back to its COCO category
id, whose crowd flag matches, and whose decoded mask is identical to pycocotools'
`COCO.annToMask` for it. Nothing is lost: every annotation of a written image that passes the
converter's rules is present, and every JSON image is present unless the manifest (found beside
the shards, or given with --manifest) counts it as skipped. The manifest's shard record counts
and sha256 must match the files. Exit 0 when everything matches, 1 with a report of the first
mismatches otherwise, 2 when the input cannot be read at all.
"""

# First, before TensorFlow loads: run as a command, this entry keeps TensorFlow's chatter off
# the console (tfrecord_tools/quiet_tensorflow.py).
from tfrecord_tools import quiet_tensorflow  # noqa: F401  # isort: split

import argparse
import glob
import io
import json
import os
import sys

import tensorflow as tf
from PIL import Image
from pycocotools.coco import COCO

from tfrecord_tools import annotation_rules
from tfrecord_tools import features as F
from tfrecord_tools import masks, shard_writer
from tfrecord_tools import tally as tally_lib
from tfrecord_tools import tf_example
from tfrecord_tools.coco_index import ConversionError, file_sha256, load_coco_index

BOX_TOLERANCE = 1e-4


class Report:
    """Collects mismatches; keeps the first `max_shown` messages and counts all of them."""

    def __init__(self, max_shown):
        self.max_shown = max_shown
        self.messages = []
        self.count = 0

    def fail(self, message):
        self.count += 1
        if len(self.messages) < self.max_shown:
            self.messages.append(message)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m tfrecord_tools.verify_tfrecord",
        description="Check converted TFRecords against their COCO JSON.")
    parser.add_argument("--file_pattern", required=True, help="glob of the shards, e.g. 'P-*'")
    parser.add_argument("--annotations_file", required=True, help="the COCO JSON converted")
    parser.add_argument("--manifest", default=None,
                        help="the converter's manifest (default: PREFIX.manifest.json beside the "
                        "shards, if present)")
    parser.add_argument("--max_reports", type=int, default=20,
                        help="how many mismatches to print (all are counted)")
    return parser.parse_args(argv)


def find_shards(file_pattern):
    files = sorted(path for path in glob.glob(file_pattern) if os.path.isfile(path)
                   and not path.endswith(".manifest.json"))
    if not files:
        raise ConversionError(f"--file_pattern {file_pattern!r} matches no file")
    return files


def load_manifest(path, files):
    """The manifest at `path`, or beside the shards; None when there is none."""
    if path is None:
        prefix = shard_writer.prefix_of_shard(files[0])
        path = shard_writer.manifest_path(prefix) if prefix else None
        if path is None or not os.path.isfile(path):
            return None
    with open(path) as f:
        return json.load(f)


def check_manifest(manifest, files, record_counts, index, report):
    """Shard counts, hashes and the label map agree with the files and the JSON."""
    by_name = {shard["file"]: shard for shard in manifest["shards"]}
    for path in files:
        shard = by_name.get(os.path.basename(path))
        if shard is None:
            report.fail(f"{path}: not listed in the manifest")
            continue
        if shard["records"] != record_counts[path]:
            report.fail(f"{path}: manifest says {shard['records']} records, "
                        f"the file holds {record_counts[path]}")
        if shard["sha256"] != file_sha256(path):
            report.fail(f"{path}: sha256 differs from the manifest's")
    if len(files) != manifest["num_shards"]:
        report.fail(f"the pattern matches {len(files)} shard(s), the manifest lists "
                    f"{manifest['num_shards']}")
    json_map = [[e.label, e.coco_id, e.name] for e in index.label_map]
    manifest_map = [[e["label"], e["coco_id"], e["name"]] for e in manifest["label_map"]]
    if json_map != manifest_map:
        report.fail("the manifest's label_map differs from the one the JSON gives")


def check_record(record, path, index, coco, seen_ids, report):
    """Checks one parsed record; returns the number of objects it holds."""
    source_id = record[F.SOURCE_ID][0].decode()
    where = f"{path}: record of image {source_id}"
    image_id = int(source_id) if source_id.lstrip("-").isdigit() else None
    if image_id not in index.annotations_by_image:
        report.fail(f"{where}: no image with this id in the JSON")
        return 0
    if image_id in seen_ids:
        report.fail(f"{where}: image written more than once")
        return 0
    seen_ids.add(image_id)
    image = coco.imgs[image_id]
    height, width = image["height"], image["width"]
    if (record[F.HEIGHT][0], record[F.WIDTH][0]) != (height, width):
        report.fail(f"{where}: size {record[F.WIDTH][0]}x{record[F.HEIGHT][0]} (w x h), "
                    f"JSON {width}x{height}")
        return 0
    with Image.open(io.BytesIO(record[F.ENCODED][0])) as decoded:
        if (decoded.format, decoded.mode, decoded.size) != ("JPEG", "RGB", (width, height)):
            report.fail(f"{where}: image is {decoded.format} {decoded.mode} {decoded.size}, "
                        f"expected JPEG RGB {(width, height)}")
    lengths = {key: len(record.get(key, [])) for key in F.OBJECT_KEYS}
    if len(set(lengths.values())) != 1:
        report.fail(f"{where}: per-object lists differ in length: {lengths}")
        return 0

    expected = expected_objects(index.annotations_by_image[image_id], coco, height, width)
    for i, annotation_id in enumerate(record[F.ANNOTATION_ID]):
        what = f"{where}, annotation {annotation_id}"
        if annotation_id not in expected:
            report.fail(f"{what}: not a kept annotation of this image in the JSON")
            continue
        clean, mask = expected.pop(annotation_id)
        check_object(record, i, clean, mask, index.label_of_coco_id, what, report)
    for annotation_id in expected:
        report.fail(f"{where}: annotation {annotation_id} passes the rules but is missing")
    return len(record[F.ANNOTATION_ID])


def expected_objects(annotations, coco, height, width):
    """{annotation id: (CleanAnnotation, annToMask mask)} of the annotations that must be kept."""
    expected = {}
    for annotation in annotations:
        clean = annotation_rules.clean_annotation(annotation, height, width, tally_lib.Tally())
        if clean is None:
            continue
        mask = coco.annToMask({**annotation, "segmentation": clean.segmentation})
        if mask.any():
            expected[clean.annotation_id] = (clean, mask)
    return expected


def check_object(record, i, clean, mask, label_of_coco_id, what, report):
    """Object `i` of the record against its cleaned JSON annotation and pycocotools mask."""
    height, width = mask.shape
    xmin, ymin, xmax, ymax = clean.box_xyxy
    want = (ymin / height, xmin / width, ymax / height, xmax / width)
    got = tuple(record[key][i] for key in (F.YMIN, F.XMIN, F.YMAX, F.XMAX))
    if max(abs(a - b) for a, b in zip(want, got)) > BOX_TOLERANCE:
        report.fail(f"{what}: box (ymin, xmin, ymax, xmax) {got}, JSON gives {want}")
    want_label = label_of_coco_id[clean.category_id]
    if record[F.LABEL][i] != want_label:
        report.fail(f"{what}: label {record[F.LABEL][i]}, expected {want_label} for COCO "
                    f"category {clean.category_id}")
    if record[F.IS_CROWD][i] != clean.is_crowd:
        report.fail(f"{what}: is_crowd {record[F.IS_CROWD][i]}, JSON {clean.is_crowd}")
    decoded_mask = masks.decode_png(record[F.MASK][i])
    if decoded_mask.shape != mask.shape:
        report.fail(f"{what}: mask shape {decoded_mask.shape}, expected {mask.shape}")
    elif (decoded_mask != mask).any():
        report.fail(f"{what}: mask differs from pycocotools annToMask in "
                    f"{int((decoded_mask != mask).sum())} pixel(s)")


def verify(file_pattern, annotations_file, manifest_file=None, max_reports=20, out=sys.stdout):
    """Runs every check; returns the Report."""
    files = find_shards(file_pattern)
    index = load_coco_index(annotations_file)
    coco = COCO()
    coco.imgs = {image["id"]: image for image in index.images}
    manifest = load_manifest(manifest_file, files)
    report = Report(max_reports)
    seen_ids, record_counts, num_objects = set(), {}, 0
    for path in files:
        record_counts[path] = 0
        try:
            for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
                record_counts[path] += 1
                num_objects += check_record(tf_example.parse(serialized), path, index, coco,
                                            seen_ids, report)
        except tf.errors.DataLossError as e:
            raise ConversionError(f"{path}: not a valid TFRecord file "
                                  f"(after {record_counts[path]} records): {e.message}") from e

    image_skips_declared = 0
    if manifest is not None:
        check_manifest(manifest, files, record_counts, index, report)
        image_skips_declared = sum(
            entry["count"] for reason, entry in manifest["skipped_images"].items()
            if reason not in (tally_lib.IMAGE_DUPLICATE_ID, tally_lib.IMAGE_MALFORMED))
    absent = [image["id"] for image in index.images if image["id"] not in seen_ids]
    if len(absent) != image_skips_declared:
        source = "the manifest" if manifest is not None else "no manifest found, so"
        report.fail(f"{len(absent)} JSON image(s) have no record (first ids {absent[:5]}); "
                    f"{source} accounts for {image_skips_declared}")

    print(f"verified {sum(record_counts.values())} records in {len(files)} file(s): "
          f"{len(seen_ids)} images, {num_objects} objects; "
          f"manifest {'checked' if manifest is not None else 'not found'}", file=out)
    return report


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = verify(args.file_pattern, args.annotations_file, args.manifest, args.max_reports)
    except ConversionError as e:
        print(f"verify_tfrecord: error: {e}", file=sys.stderr)
        return 2
    if report.count:
        print(f"FAILED: {report.count} mismatch(es); the first {len(report.messages)}:",
              file=sys.stderr)
        for message in report.messages:
            print(f"  {message}", file=sys.stderr)
        return 1
    print("OK: every record matches the JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())
