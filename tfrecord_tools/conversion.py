"""COCO instances JSON + image folder -> sharded TFRecords + manifest (the converter's engine).

Flow: load the JSON and apply its rules (`coco_index`) -> per image, in worker processes, read the
image and apply the image and annotation rules (`image_worker`) -> in this process, serialize and
write the records round-robin into shards (`shard_writer`) -> write `PREFIX.manifest.json` beside
them, still hidden -> move the shards, then the manifest, into place. Memory holds the JSON index
plus a bounded window of images in flight, whatever the number of images.
"""

import dataclasses
import os
import sys

from tfrecord_tools import __version__, image_worker, parallel
from tfrecord_tools import shard_writer as shard_writer_lib
from tfrecord_tools import tally as tally_lib
from tfrecord_tools import tf_example
from tfrecord_tools.coco_index import ConversionError, file_sha256, load_coco_index
from tfrecord_tools.progress import Progress

MANIFEST_VERSION = 1
# Image skips are also reported one by one on stderr, up to this many.
MAX_SKIP_WARNINGS = 20


def check_image_dir(image_dir):
    """A missing, non-directory or empty image folder is an error for the whole run."""
    if not os.path.exists(image_dir):
        raise ConversionError(f"--image_dir not found: {image_dir}")
    if not os.path.isdir(image_dir):
        raise ConversionError(f"--image_dir is not a directory: {image_dir}")
    with os.scandir(image_dir) as entries:
        if not any(entry.is_file() for entry in entries):
            raise ConversionError(f"--image_dir holds no files: {image_dir}")


def convert(image_dir, annotations_file, output_prefix, num_shards, num_workers,
            command_line=None, progress_stream=None, max_images=None):
    """Converts a COCO dataset; returns the manifest dict (also written beside the shards).

    `max_images` converts only the first N images of the JSON (in its order), e.g. for a quick
    experiment on a few real images; the manifest records the limit.

    Raises:
      ConversionError: the input as a whole, a flag or the output prefix is unusable (message
        says what and where); nothing was written.
      shard_writer.OutputWriteError: writing the output failed (e.g. disk full); the partial
        output was removed.
    """
    if num_shards < 1:
        raise ConversionError(f"--num_shards must be >= 1, found {num_shards}")
    if num_workers < 1:
        raise ConversionError(f"--num_workers must be >= 1, found {num_workers}")
    if max_images is not None and max_images < 1:
        raise ConversionError(f"--max_images must be >= 1, found {max_images}")
    check_image_dir(image_dir)
    index = load_coco_index(annotations_file)
    images = index.images[:max_images] if max_images else index.images
    tally = tally_lib.Tally()
    tally.merge(index.tally)
    names = {entry.coco_id: entry.name for entry in index.label_map}
    tasks = (image_worker.ImageTask(image=image,
                                    annotations=index.annotations_by_image[image["id"]],
                                    image_dir=image_dir,
                                    label_of_coco_id=index.label_of_coco_id,
                                    name_of_coco_id=names) for image in images)

    for stale in shard_writer_lib.stale_incomplete_dirs(output_prefix):
        print(f"warning: {stale} is left from an interrupted run; delete it to free its space",
              file=sys.stderr)
    written = {"images": 0, "annotations": 0, "crowd": 0, "images_without_annotations": 0}
    progress = Progress(len(images), label="create_coco_tfrecord", stream=progress_stream)
    with shard_writer_lib.ShardSetWriter(output_prefix, num_shards) as writer:
        for done, result in enumerate(
                parallel.ordered_map(image_worker.process_image, tasks, num_workers), start=1):
            tally.merge(result.tally)
            num_image_skips = tally.total(tally_lib.IMAGE_SKIP_REASONS)
            if result.skip_message and num_image_skips <= MAX_SKIP_WARNINGS:
                print(f"warning: skipped image {result.image_id}: {result.skip_message}",
                      file=progress.stream)
            if result.features is not None:
                writer.write(tf_example.serialize(result.features))
                written["images"] += 1
                written["annotations"] += result.num_objects
                written["crowd"] += result.num_crowd
                written["images_without_annotations"] += result.num_objects == 0
            progress.update(done)
        shards = writer.close()
        manifest = build_manifest(index, tally, written, shards, annotations_file, image_dir,
                                  command_line)
        manifest["max_images"] = max_images
        writer.commit(manifest)
    progress.finish()
    return manifest


def build_manifest(index, tally, written, shards, annotations_file, image_dir, command_line):
    """The manifest dict: what was written, what was skipped or changed and why, and where."""
    return {
        "manifest_version": MANIFEST_VERSION,
        "tool": "tfrecord_tools.create_coco_tfrecord",
        "tool_version": __version__,
        "command_line": list(command_line or []),
        "annotations_file": os.path.abspath(annotations_file),
        "annotations_sha256": file_sha256(annotations_file),
        "image_dir": os.path.abspath(image_dir),
        "images_in_json": index.num_images_in_json,
        "annotations_in_json": index.num_annotations_in_json,
        "images_written": written["images"],
        "images_without_annotations_written": written["images_without_annotations"],
        "annotations_written": written["annotations"],
        "crowd_annotations_written": written["crowd"],
        "images_skipped": tally.total(tally_lib.IMAGE_SKIP_REASONS),
        "annotations_skipped": tally.total(tally_lib.ANNOTATION_SKIP_REASONS),
        "skipped_images": tally.to_json(tally_lib.IMAGE_SKIP_REASONS),
        "skipped_annotations": tally.to_json(tally_lib.ANNOTATION_SKIP_REASONS),
        "conversions": tally.to_json(tally_lib.CONVERSION_REASONS),
        "label_map": [dataclasses.asdict(entry) for entry in index.label_map],
        "num_shards": len(shards),
        "shards": [dataclasses.asdict(shard) for shard in shards],
    }


def summary_lines(manifest):
    """A short human-readable summary of a manifest."""
    lines = [
        f"images written:      {manifest['images_written']} of {manifest['images_in_json']} "
        f"({manifest['images_without_annotations_written']} without annotations)",
        f"annotations written: {manifest['annotations_written']} of "
        f"{manifest['annotations_in_json']} ({manifest['crowd_annotations_written']} crowd)",
        f"classes:             {len(manifest['label_map'])} (labels 1..K)",
        f"shards:              {manifest['num_shards']} "
        f"({sum(s['records'] for s in manifest['shards'])} records)",
    ]
    for title, key in (("skipped images", "skipped_images"),
                       ("skipped annotations", "skipped_annotations"),
                       ("conversions", "conversions")):
        for reason, entry in manifest[key].items():
            lines.append(f"{title}: {reason} = {entry['count']} (first ids {entry['first_ids']}): "
                         f"{entry['rule']}")
    return lines
