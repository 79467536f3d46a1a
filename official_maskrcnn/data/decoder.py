"""Decoding our TFRecords (TF Object Detection / Model Garden keys, `tfrecord_tools.features`)
into tensors.

Shape legend: H, W image size; N instances in the record.
Two steps, so that the training filter can run before the expensive image and mask decoding:
`parse_example` reads the features (bytes undecoded), `decode_image`/`decode_masks` decode.
"""

import tensorflow as tf

from tfrecord_tools import features

MASK_KEY = features.MASK

_SCALARS = {
    features.ENCODED: tf.io.FixedLenFeature((), tf.string),
    features.SOURCE_ID: tf.io.FixedLenFeature((), tf.string),
    features.HEIGHT: tf.io.FixedLenFeature((), tf.int64),
    features.WIDTH: tf.io.FixedLenFeature((), tf.int64),
}
_OBJECT_LISTS = {
    features.YMIN: tf.float32,
    features.XMIN: tf.float32,
    features.YMAX: tf.float32,
    features.XMAX: tf.float32,
    features.LABEL: tf.int64,
    features.IS_CROWD: tf.int64,
}


def features_spec(include_masks):
    spec = dict(_SCALARS)
    spec.update({key: tf.io.VarLenFeature(dtype) for key, dtype in _OBJECT_LISTS.items()})
    if include_masks:
        spec[MASK_KEY] = tf.io.VarLenFeature(tf.string)
    return spec


def parse_example(serialized, include_masks=True):
    """Serialized tf.Example -> dict of tensors, image and masks still encoded.

    Returns:
      encoded_image: [] string; source_id: [] int64; height, width: [] int32;
      boxes_normalized: [N, 4] float32 [ymin, xmin, ymax, xmax] in [0, 1];
      classes: [N] int32 (contiguous labels 1..K); is_crowd: [N] bool;
      masks_png: [N] string (only with include_masks).
    """
    parsed = tf.io.parse_single_example(serialized, features_spec(include_masks))
    dense = {key: tf.sparse.to_dense(parsed[key]) for key in parsed
             if isinstance(parsed[key], tf.SparseTensor)}
    decoded = {
        "encoded_image": parsed[features.ENCODED],
        "source_id": tf.strings.to_number(parsed[features.SOURCE_ID], tf.int64),
        "height": tf.cast(parsed[features.HEIGHT], tf.int32),
        "width": tf.cast(parsed[features.WIDTH], tf.int32),
        "boxes_normalized": tf.stack([dense[features.YMIN],
                                      dense[features.XMIN],
                                      dense[features.YMAX],
                                      dense[features.XMAX]], axis=-1),
        "classes": tf.cast(dense[features.LABEL], tf.int32),
        "is_crowd": tf.cast(dense[features.IS_CROWD], tf.bool),
    }
    if include_masks:
        decoded["masks_png"] = dense[MASK_KEY]
    return decoded


def decode_image(encoded_image):
    """JPEG bytes -> [H, W, 3] uint8, with the accurate IDCT that PIL (the reference) uses."""
    image = tf.io.decode_jpeg(encoded_image, channels=3, dct_method="INTEGER_ACCURATE")
    return tf.ensure_shape(image, [None, None, 3])


def jpeg_header_size(encoded_image):
    """[2] int32 (height, width) from the JPEG header alone: no pixel is decoded.

    Raises InvalidArgumentError when the bytes are not a JPEG (the 3-byte magic `decode_jpeg`
    checks first) or the header does not parse. A damaged body after a good header passes: only
    decoding finds it (`decode_failures`).
    """
    is_jpeg = tf.debugging.assert_equal(tf.io.is_jpeg(encoded_image), True,
                                        message="image/encoded is not a JPEG")
    with tf.control_dependencies([is_jpeg]):
        return tf.image.extract_jpeg_shape(encoded_image)[:2]


def decode_masks(masks_png, height, width):
    """[N] PNG strings -> [N, H, W] uint8 masks of 0/1 (any value > 0 is the object)."""
    def decode_one(png):
        return tf.cast(tf.io.decode_png(png, channels=1)[..., 0] > 0, tf.uint8)

    return tf.cond(
        tf.size(masks_png) > 0,
        lambda: tf.map_fn(decode_one, masks_png, fn_output_signature=tf.TensorSpec(
            [None, None], tf.uint8)),
        lambda: tf.zeros([0, height, width], tf.uint8))
