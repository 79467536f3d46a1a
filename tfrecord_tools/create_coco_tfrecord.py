r"""Converts a COCO instances dataset into sharded TFRecords for Mask R-CNN.

    python -m tfrecord_tools.create_coco_tfrecord \
        --image_dir coco/train2017 \
        --annotations_file coco/annotations/instances_train2017.json \
        --output_prefix tfrecords/train --num_shards 256 --num_workers 8

Writes PREFIX-00000-of-00256.tfrecord ... (one tf.train.Example per image, layout in
`tfrecord_tools.features`) and PREFIX.manifest.json (counts, skips and conversions by reason, the
label map, each shard's record count and sha256). The rules for bad input are in `coco_index`,
`image_codec` and `annotation_rules`; the README lists them. Exit codes: 0 success, 1 writing the
output failed, e.g. disk full (one message naming the file; the partial output is removed), 2 the
input, the flags or the output prefix are unusable (one message on stderr, nothing written), 130
interrupted by Ctrl-C or SIGTERM (the partial output is removed).
"""

import argparse
import os
import signal
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m tfrecord_tools.create_coco_tfrecord",
        description="COCO instances JSON + image folder -> sharded TFRecords + manifest.")
    parser.add_argument("--image_dir", required=True, help="folder holding the JSON's file_names")
    parser.add_argument("--annotations_file", required=True, help="COCO instances JSON")
    parser.add_argument("--output_prefix", required=True,
                        help="shards are written as PREFIX-SSSSS-of-NNNNN.tfrecord")
    parser.add_argument("--num_shards", type=int, default=32,
                        help="number of output shards (default 32; use 256 for train2017)")
    parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes; 1 converts in this process (default: CPU count)")
    parser.add_argument("--max_images", type=int, default=None,
                        help="convert only the first N images of the JSON (quick experiments)")
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # Imported here, not at the top: worker processes are spawned and re-import this module, and
    # they must not pay for (or hold memory of) TensorFlow, which only the writer needs.
    # quiet_tensorflow first: it sets TensorFlow's logging up (and the workers inherit it).
    from tfrecord_tools import quiet_tensorflow  # noqa: F401  # isort: split
    from tfrecord_tools import conversion
    from tfrecord_tools.coco_index import ConversionError
    from tfrecord_tools.shard_writer import OutputWriteError

    # A SIGTERM (a scheduler's preemption, `kill`) cleans up like Ctrl-C instead of leaving the
    # temporary folder behind.
    previous_sigterm_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        manifest = conversion.convert(
            image_dir=args.image_dir, annotations_file=args.annotations_file,
            output_prefix=args.output_prefix, num_shards=args.num_shards,
            num_workers=args.num_workers, max_images=args.max_images,
            command_line=["python", "-m", "tfrecord_tools.create_coco_tfrecord", *argv])
    except ConversionError as e:
        print(f"create_coco_tfrecord: error: {e}", file=sys.stderr)
        return 2
    except OutputWriteError as e:
        print(f"create_coco_tfrecord: error: {e}; the partial output was removed, no shard was "
              "written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncreate_coco_tfrecord: interrupted; the partial output was removed, no shard was "
              "written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm_handler)
    for line in conversion.summary_lines(manifest):
        print(line)
    print(f"manifest: {os.path.abspath(args.output_prefix)}.manifest.json")
    return 0


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
