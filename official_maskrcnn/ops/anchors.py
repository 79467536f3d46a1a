"""FPN anchors with Detectron's geometry (the MLPerf reference's `generate_anchors`).

Shape legend: A anchors per location (one size x len(aspect_ratios) ratios, ratio-major);
Hf, Wf a level's feature map size; N = Hf * Wf * A anchors of a level; B images.

Boxes are [ymin, xmin, ymax, xmax] in absolute pixels of the padded network input, in the
reference's inclusive ("+1") convention: width = xmax - xmin + 1. Aspect ratio is height / width.
Anchors are ordered (y, x, a) row-major: location-major, anchor-minor, as the reference's
`grid_anchors` orders them, so a head's [Hf, Wf, A] outputs reshape to [N] in the same order.
"""

import math

import numpy as np
import tensorflow as tf

FPN_STRIDES = (4, 8, 16, 32, 64)
FPN_ANCHOR_SIZES = (32, 64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def generate_cell_anchors(stride, size, aspect_ratios=ASPECT_RATIOS):
    """The A anchors of one feature-map cell at the origin, as Detectron's `generate_anchors`.

    Detectron starts from the base box (0, 0, stride - 1, stride - 1) centred at
    ((stride - 1) / 2, (stride - 1) / 2); for each ratio r it keeps the base area with rounded
    sides ws = round(sqrt(stride**2 / r)), hs = round(ws * r) (numpy's half-to-even rounding, as
    the reference), then scales both sides by size / stride around the same centre.

    Args:
      stride: int, the level's stride in pixels.
      size: the anchor size in pixels (sqrt of the area before rounding).
      aspect_ratios: sequence of height / width ratios.
    Returns:
      [A, 4] float32 numpy array, [ymin, xmin, ymax, xmax], inclusive corners.
    """
    ratios = np.asarray(aspect_ratios, dtype=np.float64)
    base = float(stride)
    centre = 0.5 * (base - 1.0)
    ws = np.round(np.sqrt(base * base / ratios))
    hs = np.round(ws * ratios)
    scale = float(size) / base
    ws, hs = ws * scale, hs * scale
    anchors = np.stack([
        centre - 0.5 * (hs - 1.0),
        centre - 0.5 * (ws - 1.0),
        centre + 0.5 * (hs - 1.0),
        centre + 0.5 * (ws - 1.0),
    ], axis=-1)
    return anchors.astype(np.float32)


def grid_anchors(cell_anchors, stride, feature_height, feature_width):
    """Shifts the cell anchors over a feature map, as the reference's `grid_anchors`.

    Args:
      cell_anchors: [A, 4] [ymin, xmin, ymax, xmax] anchors of the cell at the origin.
      stride: int, pixels between neighbouring cells.
      feature_height, feature_width: python ints Hf, Wf.
    Returns:
      [Hf * Wf * A, 4] float32 tensor, ordered (y, x, a) row-major.
    """
    cell_anchors = tf.convert_to_tensor(cell_anchors, tf.float32)
    shift_y = tf.range(feature_height, dtype=tf.float32) * float(stride)
    shift_x = tf.range(feature_width, dtype=tf.float32) * float(stride)
    grid_y, grid_x = tf.meshgrid(shift_y, shift_x, indexing="ij")  # [Hf, Wf] each.
    shifts = tf.stack([grid_y, grid_x, grid_y, grid_x], axis=-1)  # [Hf, Wf, 4]
    anchors = shifts[:, :, None, :] + cell_anchors[None, None, :, :]  # [Hf, Wf, A, 4]
    return tf.reshape(anchors, [-1, 4])


def feature_size(image_size, stride):
    """Feature map side for a padded image side: ceil(side / stride) (P6 is a stride-2 k=1 pool)."""
    return int(math.ceil(image_size / stride))


def multilevel_anchors(image_height, image_width, strides=FPN_STRIDES, sizes=FPN_ANCHOR_SIZES,
                       aspect_ratios=ASPECT_RATIOS):
    """Anchors of every FPN level for one padded input size.

    Args:
      image_height, image_width: python ints, the padded image size (multiples of the largest
        backbone stride, 32).
      strides: one stride per level; the level is log2(stride) (4 -> level 2).
      sizes: one anchor size per level.
      aspect_ratios: height / width ratios, shared by all levels.
    Returns:
      dict str(level) -> [Hf * Wf * A, 4] float32 tensor, Hf = ceil(H / stride), Wf likewise.
      Keys are strings as in Model Garden's multilevel feature dicts ("2", ..., "6").
    """
    if len(strides) != len(sizes):
        raise ValueError(f"multilevel_anchors: expected one anchor size per stride, found "
                         f"strides={tuple(strides)} and sizes={tuple(sizes)}.")
    anchors = {}
    for stride, size in zip(strides, sizes):
        level = int(round(math.log2(stride)))
        if 2**level != stride:
            raise ValueError(f"multilevel_anchors: expected power-of-two strides, found {stride}.")
        cell = generate_cell_anchors(stride, size, aspect_ratios)
        anchors[str(level)] = grid_anchors(cell, stride, feature_size(image_height, stride),
                                           feature_size(image_width, stride))
    return anchors


def anchor_visibility(anchors, image_size, straddle_thresh=0):
    """Which anchors lie inside the image, as the reference's RPN `visibility` field.

    The reference ignores (neither positive nor negative) anchors that cross the border of the
    resized image by more than `straddle_thresh` pixels: visible iff xmin >= -t, ymin >= -t,
    xmax < W + t and ymax < H + t. A negative threshold keeps every anchor, as the reference does.

    Args:
      anchors: [N, 4] [ymin, xmin, ymax, xmax] anchors.
      image_size: [2] or [B, 2] int or float tensor (height, width) of the resized image before
        padding.
      straddle_thresh: python number t.
    Returns:
      [N] bool for image_size [2], [B, N] bool for image_size [B, 2].
    """
    anchors = tf.cast(anchors, tf.float32)
    image_size = tf.cast(image_size, tf.float32)
    height = image_size[..., 0:1]  # [1] or [B, 1], broadcasts against [N].
    width = image_size[..., 1:2]
    ymin, xmin, ymax, xmax = tf.unstack(anchors, axis=-1)
    t = float(straddle_thresh)
    visible = tf.logical_and(
        tf.logical_and(xmin >= -t, ymin >= -t),
        tf.logical_and(xmax < width + t, ymax < height + t))
    if straddle_thresh < 0:
        return tf.ones_like(visible)
    return visible
