"""The input files and their records: file checks, the start-up scan, records in a fixed order.

Bad input fails here, at startup: a pattern that matches no file, a file that is not a TFRecord,
records without masks when masks are needed -> `InputError` naming the file; a truncated or
damaged file, an image whose JPEG header does not parse or disagrees with the record's size ->
`RecordError` naming the file, the record's position in it and its source id (the scan reads
every record, so these are found before training, not mid-epoch).

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


class RecordError(InputError):
    """One record cannot be read or used; the message names its file, position and source id."""


# Bytes a TFRecord frame adds around a record: length (8), its CRC (4), the data's CRC (4).
_FRAME_BYTES = 16


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

    No image or mask is decoded; each image's JPEG header is parsed
    (`tf.image.extract_jpeg_shape`; with the label and size columns the scan of coco128 takes
    0.19 s instead of 0.14 s on 2 cores, a full decode would add 0.25 s), so a header that does
    not parse or disagrees with the record's height / width fails here, at startup. The
    orientation is `parsers.is_portrait` (height / width >= 1, squares included), the one rule
    of the training grouping and of every batch count.

    Returns:
      dict of [num_records] numpy arrays, indexed by the global record index (the position in
      `records_dataset(files)`): portrait (bool), trainable (bool: keeps >= 1 instance for
      training), num_trainable (int: instances training keeps), file_index (int: the record's
      file in `files`), source_id (int64), height, width (int32: the record's, checked
      against the JPEG header), min_label, max_label (int32: over all its instances, crowds
      included; 1 and 0 for a record without instances).
    Raises:
      RecordError: a file is truncated or damaged (CRC), or a record's image header is not a
        JPEG header or gives another size than the record: the first such record is named.
    """
    try:
        columns = _scan_columns(files, legacy_plus_one)
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        # The batched pass cannot say which record failed; find it one record at a time.
        raise locate_bad_record(files, legacy_plus_one, e) from e
    scan = {"portrait": columns["portrait"], "trainable": columns["num_trainable"] > 0,
            **columns}
    _check_jpeg_sizes(files, scan)
    del scan["jpeg_size"]
    return scan


# The scan's columns and their dtypes when there is no record at all.
_COLUMNS = {"file_index": np.int64, "portrait": bool, "num_trainable": np.int32,
            "source_id": np.int64, "height": np.int32, "width": np.int32,
            "min_label": np.int32, "max_label": np.int32, "jpeg_size": np.int32}


def _small_features(serialized, legacy_plus_one):
    """A record's scan columns (all but file_index), no image or mask decoded."""
    parsed = decoder.parse_example(serialized, include_masks=False)
    keep = parsers.trainable_instances(parsed, legacy_plus_one)
    classes = parsed["classes"]
    return {"portrait": parsers.is_portrait(parsed),
            "num_trainable": tf.reduce_sum(tf.cast(keep, tf.int32)),
            "source_id": parsed["source_id"], "height": parsed["height"],
            "width": parsed["width"],
            "min_label": tf.where(tf.size(classes) > 0, tf.reduce_min(classes), 1),
            "max_label": tf.where(tf.size(classes) > 0, tf.reduce_max(classes), 0),
            "jpeg_size": decoder.jpeg_header_size(parsed["encoded_image"])}


def _scan_columns(files, legacy_plus_one):
    def small(file_index, serialized):
        return dict(_small_features(serialized, legacy_plus_one), file_index=file_index)

    indexed = tf.data.Dataset.from_tensor_slices(files).enumerate().flat_map(
        lambda i, path: tf.data.TFRecordDataset(path).map(lambda s: (i, s)))
    chunks = list(indexed.map(small, num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
                  .as_numpy_iterator())
    if not chunks:
        return {key: np.zeros([0, 2] if key == "jpeg_size" else [0], dtype)
                for key, dtype in _COLUMNS.items()}
    return {key: np.concatenate([chunk[key] for chunk in chunks]).astype(dtype)
            for key, dtype in _COLUMNS.items()}


def record_name(files, scan, index):
    """'FILE: record P (source id S)': the record at global index `index`, P its position in
    FILE (0-based), for error messages."""
    file_index = scan["file_index"][index]
    position = index - file_starts(scan["file_index"], len(files))[file_index]
    return (f"{files[file_index]}: record {position} (source id "
            f"{scan['source_id'][index]})")


def _check_jpeg_sizes(files, scan):
    """The JPEG header's size must be the record's: boxes and masks are in the record's frame."""
    expected = np.stack([scan["height"], scan["width"]], axis=1)
    wrong = np.flatnonzero((scan["jpeg_size"] != expected).any(axis=1))
    if wrong.size:
        first = wrong[0]
        raise RecordError(
            f"{record_name(files, scan, first)}: the JPEG is "
            f"{tuple(scan['jpeg_size'][first].tolist())} (height, width) but the record says "
            f"{tuple(expected[first].tolist())}; {wrong.size} "
            f"record(s) in all disagree, e.g. source ids {scan['source_id'][wrong[:5]].tolist()}")


def _source_id_of(serialized):
    """The source id of a serialized record, or '?' when it cannot be parsed."""
    try:
        example = tf.train.Example.FromString(serialized)
        return example.features.feature[features.SOURCE_ID].bytes_list.value[0].decode()
    except Exception:  # protobuf's DecodeError, a missing feature: the message says '?'
        return "?"


def locate_bad_record(files, legacy_plus_one, error):
    """The `RecordError` of the first record of `files` that the scan cannot read or parse.

    Reads the files one record at a time (slow: only after the batched scan failed). A file
    that is truncated or damaged is named with the position and byte offset of the first record
    that cannot be read; a record whose small features fail, with its source id. Returns an
    `InputError` with `error`'s first line when no record fails alone.
    """
    for path in files:
        position, offset = 0, 0
        iterator = iter(tf.data.TFRecordDataset(path))
        while True:
            try:
                serialized = next(iterator)
            except StopIteration:
                break
            except tf.errors.DataLossError as e:
                return RecordError(
                    f"{path}: record {position} (byte offset {offset}) cannot be read, the file "
                    f"is truncated or damaged: {first_line(e)}; {position} record(s) before it "
                    f"are intact (convert this shard again)")
            try:
                _small_features(serialized, legacy_plus_one)
            except tf.errors.InvalidArgumentError as e:
                return RecordError(
                    f"{path}: record {position} (byte offset {offset}, source id "
                    f"{_source_id_of(serialized.numpy())}) cannot be used: {first_line(e)}")
            position += 1
            offset += len(serialized.numpy()) + _FRAME_BYTES
    return InputError(f"the records of {files[0]} ... ({len(files)} file(s)) cannot be scanned: "
                      f"{first_line(error)}")


def first_line(error):
    """The first line of a TensorFlow error's message, without the '{{function_node ...}}'
    prefix that names TF's internals, not the input."""
    line = (error.message if isinstance(error, tf.errors.OpError) else str(error)).splitlines()[0]
    return line.split("}} ", 1)[-1].split(" [Op:")[0].strip()


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
