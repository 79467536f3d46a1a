"""Copies of converted records with one kind of damage each: the bad-data tests' inputs."""

import os

import tensorflow as tf

from tfrecord_tools import features


def rewrite(pattern, out_dir, edit):
    """Copies the shards of `pattern` into `out_dir`, each record through `edit`.

    Args:
      edit: (global record index, tf.train.Example) -> tf.train.Example (may edit in place).
    Returns:
      the file pattern of the copies (same names, same order).
    """
    tf.io.gfile.makedirs(out_dir)
    index = 0
    for path in sorted(tf.io.gfile.glob(pattern)):
        with tf.io.TFRecordWriter(os.path.join(out_dir, os.path.basename(path))) as writer:
            for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
                writer.write(edit(index, tf.train.Example.FromString(serialized))
                             .SerializeToString())
                index += 1
    return os.path.join(out_dir, os.path.basename(pattern))


def edit_image(target, change):
    """An `edit` that replaces the JPEG bytes of record `target` by change(bytes)."""
    def edit(index, example):
        if index == target:
            encoded = example.features.feature[features.ENCODED].bytes_list
            encoded.value[0] = change(encoded.value[0])
        return example
    return edit


def set_labels(target, labels):
    """An `edit` that sets the class labels of record `target` (as many as it has instances)."""
    def edit(index, example):
        if index == target:
            label = example.features.feature[features.LABEL].int64_list
            label.value[:] = [labels[i % len(labels)] for i in range(len(label.value))]
        return example
    return edit


def header_damaged(jpeg):
    """The JPEG with the bytes after its start marker zeroed: the header no longer parses."""
    return jpeg[:2] + bytes(40) + jpeg[42:]


def body_truncated(jpeg):
    """The JPEG cut in the middle of its entropy-coded data: the header is intact."""
    return jpeg[:len(jpeg) // 2]


def source_id(example):
    return int(example.features.feature[features.SOURCE_ID].bytes_list.value[0])
