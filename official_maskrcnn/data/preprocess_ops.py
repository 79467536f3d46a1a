"""Pure TensorFlow preprocessing ops with the MLPerf reference's semantics.

Shape legend: H, W original image size; h, w resized size; Hp, Wp padded size; N instances;
M the side of the box-aligned mask crops.

Box convention: the reference (maskrcnn-benchmark, Detectron) converts a COCO box [x, y, bw, bh]
to *inclusive* corners (x, y, x + bw - 1, y + bh - 1) ("TO_REMOVE = 1"), clips them to
[0, W - 1] x [0, H - 1], drops boxes left with x2 <= x1 or y2 <= y1, scales each coordinate by
the resize ratio and flips as x' = w - x - 1. Every op here does exactly that on
[ymin, xmin, ymax, xmax] tensors in absolute pixels; `legacy_plus_one=False` switches to
continuous corners (x + bw, flip x' = w - x) for users who want them.
"""

import tensorflow as tf

# Detectron's R-50.pkl expects BGR pixels in 0..255 minus this mean (BGR order), std 1.
CAFFE_BGR_MEAN = (102.9801, 115.9465, 122.7717)
IMAGENET_RGB_MEAN = (0.485, 0.456, 0.406)
IMAGENET_RGB_STD = (0.229, 0.224, 0.225)
PIXEL_MODES = ("bgr_caffe", "rgb_imagenet")
# Records store normalised float32 corners; x * W can land a few 1e-5 px off the integer it came
# from, which would let the reference's "x2 > x1" keep a 1-pixel box. Compare with this margin.
BOX_VALIDITY_EPS = 1e-3


def reference_output_size(height, width, min_size, max_size):
    """The reference's resize rule (maskrcnn-benchmark `Resize.get_size`), in TensorFlow.

    The shorter side becomes `min_size` unless that makes the longer side exceed `max_size`, in
    which case the shorter side becomes round(max_size * short / long); the longer side is then
    int(size * long / short) (truncated, as the reference does).

    Args:
      height, width: scalar int tensors, the original image size.
    Returns:
      (new_height, new_width): scalar int32 tensors.
    """
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    size = tf.constant(float(min_size), tf.float64)
    if max_size is not None:
        size = tf.where(long / short * size > max_size,
                        tf.round(max_size * short / long), size)
    # Python's round() is banker's rounding; tf.round is too, so round(x.5) matches.
    scaled_long = tf.floor(size * long / short)
    new_h = tf.where(h <= w, size, scaled_long)
    new_w = tf.where(h <= w, scaled_long, size)
    # Unchanged when the short side already has the size (the reference returns (h, w) as is).
    same = tf.equal(short, size)
    new_h = tf.where(same, h, new_h)
    new_w = tf.where(same, w, new_w)
    return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


def normalized_to_reference_boxes(boxes_normalized, height, width, legacy_plus_one=True):
    """Record boxes -> the reference's pixel boxes and which of them survive its clipping.

    Args:
      boxes_normalized: [N, 4] float32 [ymin, xmin, ymax, xmax] in [0, 1] (continuous corners,
        i.e. ymax * H = y + bh).
      height, width: scalar int tensors, the original image size.
    Returns:
      boxes: [N, 4] float32 in original-image pixels, clipped to the image.
      valid: [N] bool, False for boxes the reference removes (x2 <= x1 or y2 <= y1 after clip).
    """
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    one = 1.0 if legacy_plus_one else 0.0
    ymin, xmin, ymax, xmax = tf.unstack(boxes_normalized, axis=-1)
    boxes = tf.stack([
        tf.clip_by_value(ymin * h, 0.0, h - one),
        tf.clip_by_value(xmin * w, 0.0, w - one),
        tf.clip_by_value(ymax * h - one, 0.0, h - one),
        tf.clip_by_value(xmax * w - one, 0.0, w - one),
    ], axis=-1)
    valid = tf.logical_and(boxes[:, 2] - boxes[:, 0] > BOX_VALIDITY_EPS,
                           boxes[:, 3] - boxes[:, 1] > BOX_VALIDITY_EPS)
    return boxes, valid


def resize_boxes(boxes, scale_y, scale_x):
    """Scales [N, 4] [ymin, xmin, ymax, xmax] pixel boxes by the resize ratios (reference)."""
    return boxes * tf.stack([scale_y, scale_x, scale_y, scale_x])


def flip_boxes_left_right(boxes, image_width, legacy_plus_one=True):
    """Mirrors [N, 4] pixel boxes in an image `image_width` wide: x' = w - x (- 1)."""
    w = tf.cast(image_width, boxes.dtype) - (1.0 if legacy_plus_one else 0.0)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
    return tf.stack([ymin, w - xmax, ymax, w - xmin], axis=-1)


def normalize_image(image, pixel_mode="bgr_caffe"):
    """[h, w, 3] RGB float32 in 0..255 -> the pixels the backbone weights expect.

    bgr_caffe: BGR, 0..255, minus CAFFE_BGR_MEAN (Detectron's R-50.pkl, the reference).
    rgb_imagenet: RGB / 255, minus IMAGENET_RGB_MEAN, divided by IMAGENET_RGB_STD (Keras/torch
    ImageNet weights).
    """
    return normalize_values(order_channels(image, pixel_mode), pixel_mode)


def order_channels(image, pixel_mode):
    """[..., 3] RGB (any dtype) -> the channel order of `pixel_mode`.

    Split from `normalize_values` so the parsers can reorder the small decoded uint8 image
    instead of the large resized float one.
    """
    if pixel_mode not in PIXEL_MODES:
        raise ValueError(f"pixel_mode must be one of {PIXEL_MODES}, got {pixel_mode!r}")
    return tf.reverse(image, axis=[-1]) if pixel_mode == "bgr_caffe" else image


def normalize_values(image, pixel_mode):
    """Mean (and std) normalisation of a float32 image already in `pixel_mode`'s channel order."""
    if pixel_mode == "bgr_caffe":
        return image - tf.constant(CAFFE_BGR_MEAN, tf.float32)
    if pixel_mode == "rgb_imagenet":
        return (image / 255.0 - tf.constant(IMAGENET_RGB_MEAN)) / tf.constant(IMAGENET_RGB_STD)
    raise ValueError(f"pixel_mode must be one of {PIXEL_MODES}, got {pixel_mode!r}")


def resize_image(image, new_height, new_width):
    """[H, W, 3] -> [new_height, new_width, 3] float32, bilinear.

    Antialiased when shrinking (the closest TF equivalent of PIL's bilinear downscaling, which
    the reference uses); plain bilinear with half-pixel centres when enlarging, which is the same
    filter there and about 5x faster in TensorFlow.
    """
    image = tf.cast(image, tf.float32)
    size = tf.stack([new_height, new_width])
    shape = tf.shape(image)
    shrinks = tf.logical_or(new_height < shape[0], new_width < shape[1])
    return tf.cond(shrinks,
                   lambda: tf.image.resize(image, size, method="bilinear", antialias=True),
                   lambda: tf.image.resize(image, size, method="bilinear"))


def crop_and_resize_masks(masks, boxes, crop_size):
    """Resamples each instance mask over its box onto a crop_size x crop_size grid.

    The grid's samples sit at the centres of crop_size x crop_size equal bins of the box,
    treating box corners as continuous positions (pixel i covers [i, i + 1)), with bilinear
    interpolation between pixel centres; the outer half pixel of the image takes the value of
    its edge pixel. Boxes are inside the image, so no sample falls outside it. The parser
    passes each object's continuous extent (x, y, x + bw, y + bh), not its inclusive box. This
    is the representation from which the model builds the 28 x 28 target of any proposal
    (README, "Masks").

    Args:
      masks: [N, H, W] uint8 or float, values 0/1.
      boxes: [N, 4] float32 [ymin, xmin, ymax, xmax] pixel boxes in the same image.
      crop_size: int M.
    Returns:
      [N, M, M] float32 in [0, 1].
    """
    # One replicated pixel around the mask: crop_and_resize reads 0 beyond the outer pixel
    # centres, but the half pixel between a centre and the image edge belongs to the image.
    # Kept in its own dtype (uint8 from the decoder): crop_and_resize reads it as is and returns
    # float32, so the full-size masks are never copied as floats.
    masks = tf.pad(masks, [[0, 0], [1, 1], [1, 1]], mode="SYMMETRIC")
    shape = tf.shape(masks)
    last_y = tf.cast(shape[1], tf.float32) - 1.0
    last_x = tf.cast(shape[2], tf.float32) - 1.0
    ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
    # crop_and_resize samples from pixel-index positions first..last inclusive; pixel i's centre
    # (continuous position i + 0.5) has index i + 1 in the padded mask: shift the first and last
    # bin centres accordingly.
    half_bin_y = (ymax - ymin) / (2.0 * crop_size)
    half_bin_x = (xmax - xmin) / (2.0 * crop_size)
    index_boxes = tf.stack([
        (ymin + half_bin_y + 0.5) / last_y,
        (xmin + half_bin_x + 0.5) / last_x,
        (ymax - half_bin_y + 0.5) / last_y,
        (xmax - half_bin_x + 0.5) / last_x,
    ], axis=-1)
    crops = tf.image.crop_and_resize(
        masks[..., tf.newaxis], index_boxes, tf.range(tf.shape(masks)[0]),
        [crop_size, crop_size], method="bilinear", extrapolation_value=0.0)
    return crops[..., 0]


def pad_to_fixed_size(tensor, size, pad_value):
    """Pads (or truncates) the first dimension of `tensor` to `size` with `pad_value`."""
    tensor = tf.convert_to_tensor(tensor)[:size]
    padding = [[0, size - tf.shape(tensor)[0]]] + [[0, 0]] * (len(tensor.shape) - 1)
    padded = tf.pad(tensor, padding, constant_values=tf.cast(pad_value, tensor.dtype))
    return tf.ensure_shape(padded, [size] + tensor.shape.as_list()[1:])


def padded_image_size(min_size, max_size, size_divisibility, portrait):
    """The static (Hp, Wp) of an orientation group: both sides rounded up to the divisibility.

    Landscape (W > H): (ceil(min_size), ceil(max_size)); portrait (H >= W, squares included, as
    in the reference's aspect grouping): the transpose. Python ints.
    """
    def ceil_to(value):
        return -(-value // size_divisibility) * size_divisibility

    short, long = ceil_to(min_size), ceil_to(max_size)
    return (long, short) if portrait else (short, long)
