"""The input files and their records: file checks, the start-up scan, records in a fixed order.

Bad input fails here, at startup: a pattern that matches no file, a file that is not a TFRecord,
records without masks when masks are needed -> `InputError` naming the file.

The global record index is a record's position in `records_dataset(files)` (files in order,
records in order within a file); the arrays of `scan_records`, the epoch plan and the training
stream all use it.
"""

import numpy as np
import tensorflow as tf

from official_maskrcnn.data import decoder, parsers
from tfrecord_tools import features

# Features every record must have; masks are required only when training uses them.
REQUIRED_FEATURES = (features.ENCODED, features.HEIGHT, features.WIDTH, features.YMIN,
                     features.LABEL, features.IS_CROWD)


class InputError(ValueError):
    """The input files cannot feed the pipeline; the message names the file and the problem."""


def resolve_files(file_pattern):
    """Sorted files matching a glob (or comma-separated globs); InputError if none."""
    files = sorted({path for pattern in file_pattern.split(",")
                    for path in tf.io.gfile.glob(pattern.strip())})
    if not files:
        raise InputError(f"file pattern {file_pattern!r} matches no file")
    return files


def check_files(files, include_masks):
    """Reads the first record of every file: each must be a TFRecord of our layout."""
    required = list(REQUIRED_FEATURES)
    if include_masks:
        required.append(decoder.MASK_KEY)
    for path in files:
        try:
            first = list(tf.data.TFRecordDataset(path).take(1).as_numpy_iterator())
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            raise InputError(f"{path}: not a TFRecord file ({e.message.splitlines()[0]})") from e
        if not first:
            continue  # an empty shard is valid (e.g. more shards than images)
        try:
            example = tf.train.Example.FromString(first[0])
        except Exception as e:  # protobuf's DecodeError
            raise InputError(f"{path}: its first record is not a tf.train.Example: {e}") from e
        missing = [key for key in required if key not in example.features.feature]
        if missing:
            hint = (" (convert with masks: python -m tfrecord_tools.create_coco_tfrecord)"
                    if decoder.MASK_KEY in missing else "")
            raise InputError(f"{path}: records lack the feature(s) {missing}{hint}")


def scan_records(files, legacy_plus_one=True):
    """One pass over the small features of every record, in `records_dataset` order.

    No image or mask is decoded. The orientation is `parsers.is_portrait` (height / width >= 1,
    squares included), the one rule of the training grouping and of every batch count.

    Returns:
      dict of [num_records] numpy arrays, indexed by the global record index (the position in
      `records_dataset(files)`): portrait (bool), trainable (bool: keeps >= 1 instance for
      training), num_trainable (int: instances training keeps), file_index (int: the record's
      file in `files`).
    """
    def small(file_index, serialized):
        parsed = decoder.parse_example(serialized, include_masks=False)
        keep = parsers.trainable_instances(parsed, legacy_plus_one)
        return (file_index, parsers.is_portrait(parsed),
                tf.reduce_sum(tf.cast(keep, tf.int32)))

    indexed = tf.data.Dataset.from_tensor_slices(files).enumerate().flat_map(
        lambda i, path: tf.data.TFRecordDataset(path).map(lambda s: (i, s)))
    columns = [[], [], []]
    for values in indexed.map(small, num_parallel_calls=tf.data.AUTOTUNE).batch(1024):
        for column, value in zip(columns, values):
            column.append(value.numpy())
    file_index, portrait, num_trainable = (
        np.concatenate(column) if column else np.zeros([0], dtype)
        for column, dtype in zip(columns, [np.int64, bool, np.int32]))
    return {"portrait": portrait, "trainable": num_trainable > 0,
            "num_trainable": num_trainable, "file_index": file_index}


def records_dataset(files):
    """All records of `files` in a fixed order (files in order, records in order)."""
    return tf.data.TFRecordDataset(files)


def indexed_records(path, start):
    """The records of one file with their global index: (start + position in file, record)."""
    return tf.data.TFRecordDataset(path).enumerate().map(
        lambda position, record: (start + position, record))


def file_starts(file_index, num_files):
    """[num_files] int64: the global index of each file's first record.

    Args:
      file_index: [num_records] int, the scan's file of each record (non-decreasing).
    """
    counts = np.bincount(file_index, minlength=num_files)
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
