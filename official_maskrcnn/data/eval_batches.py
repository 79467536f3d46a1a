"""Eval batches: every image once, grouped by orientation, partial batches padded to B.

Legend: B images per replica; Hl, Wl the padded landscape image size.
An eval batch holds the `parsers.EvalParser` fields with a leading [B] dimension plus is_valid
[B] bool: images [B, H, W, 3] float32 of one padded shape, image_size, original_size [B, 2]
int32, scale [B, 2] float32, source_id [B] int64. Entries past the real images (padding of a
partial batch, or a whole filler batch) are zeros with is_valid False.
"""

import tensorflow as tf

from official_maskrcnn.data import parsers


def pad_batch(batch, batch_size):
    """Pads every tensor of a partial eval batch to `batch_size` with zeros (is_valid False)."""
    def pad(tensor):
        missing = batch_size - tf.shape(tensor)[0]
        filler = tf.zeros(tf.concat([[missing], tf.shape(tensor)[1:]], 0), tensor.dtype)
        return tf.concat([tensor, filler], 0)

    return {key: pad(value) for key, value in batch.items()}


def group_by_orientation(examples, batch_size):
    """Parsed eval examples -> batches of B, each of one orientation, the last ones padded.

    Keyed by `parsers.is_portrait` of the original size, the rule the scan and
    `epoch_plan.eval_batches_per_pipeline` use, so a pipeline yields exactly the batches the plan
    counts, also when both orientations pad to one square shape (min_size and max_size rounding
    up to the same multiple of size_divisibility; keying by the padded shape would then merge
    the two groups and leave the pipelines with unequal counts).
    """
    def portrait(example):
        size = example["original_size"]
        return tf.cast(parsers.is_portrait({"height": size[0], "width": size[1]}), tf.int64)

    batches = examples.group_by_window(
        key_func=portrait, reduce_func=lambda _, window: window.batch(batch_size),
        window_size=batch_size)
    return batches.map(lambda b: pad_batch(b, batch_size))


def invalid_batches(batch_size, image_shape, count):
    """`count` all-invalid batches of B entries, images [B, Hl, Wl, 3] for `image_shape` (Hl, Wl).

    Appended by a pipeline with fewer batches than the others, so that all stay in step.
    """
    height, width = image_shape
    batch = {
        "images": tf.zeros([batch_size, height, width, 3], tf.float32),
        "image_size": tf.zeros([batch_size, 2], tf.int32),
        "original_size": tf.zeros([batch_size, 2], tf.int32),
        "scale": tf.zeros([batch_size, 2], tf.float32),
        "source_id": tf.zeros([batch_size], tf.int64),
        "is_valid": tf.zeros([batch_size], tf.bool),
    }
    return tf.data.Dataset.from_tensors(batch).repeat(count)
