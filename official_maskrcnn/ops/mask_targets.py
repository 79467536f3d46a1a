"""Mask-head training targets: each ROI's view of its matched instance mask (XLA-compilable).

Shape legend: B images; I max instances per image (padded); M the side of the box-aligned
ground-truth mask crops (112 from the parsers); S ROIs per image; P `output_size` (28).

Frames. Boxes are [ymin, xmin, ymax, xmax] in pixels of the network input. Both the ground-truth
crop and the target treat box corners as *continuous* positions (as the parser's
`crop_and_resize_masks` and the reference's polygon `crop(box).resize((28, 28))`, whose box width
is x2 - x1, not x2 - x1 + 1). A crop's box is its object's *extent* (the parser's
`gt_mask_boxes`): the continuous span [x, x + w] of the COCO polygons, one pixel past the
inclusive "+1" box's x2 = x + w - 1 that box coding and matching use (before the resize).
  - crop pixel j (0..M-1) has its centre at x1 + (j + 0.5) * (x2 - x1) / M in image pixels;
  - target bin k (0..P-1) of an ROI has its centre c = rx1 + (k + 0.5) * (rx2 - rx1) / P,
    i.e. crop index u = (c - x1) * M / (x2 - x1) - 0.5 (same along y).
The crop is sampled at u bilinearly; in the outer half pixel of the extent (u in [-0.5, 0) or
(M - 1, M - 0.5]) it takes the edge pixel's value, and outside the extent the target is 0 (the
reference's polygons lie inside [x, x + w]; with the "+1" box as the extent the last pixel row
and column of every object would be cut off). The result is thresholded at >= 0.5, because the
reference's targets are binary rasterised polygons.

Bilinear sampling along an axis-aligned grid is separable, so each target is Wy @ crop @ Wx^T
with [P, M] interpolation matrices; tf.image.crop_and_resize would compute the same values but
has no XLA kernel.
"""

import tensorflow as tf

MASK_THRESHOLD = 0.5
# Floor on a gt box side (pixels) before dividing by it: padding rows (-1) have side 0.
MIN_GT_SIDE = 1e-6


def _interpolation_matrix(gt_lo, gt_hi, roi_lo, roi_hi, crop_size, output_size):
    """[..., P, M] bilinear weights mapping the crop's M pixels to the ROI's P bin centres.

    Args:
      gt_lo, gt_hi, roi_lo, roi_hi: [...] float32 continuous coordinates along one axis.
    """
    bins = (tf.range(output_size, dtype=tf.float32) + 0.5) / output_size  # [P]
    centres = roi_lo[..., None] + bins * (roi_hi - roi_lo)[..., None]  # [..., P]
    extent = tf.maximum(gt_hi - gt_lo, MIN_GT_SIDE)[..., None]
    index = (centres - gt_lo[..., None]) * crop_size / extent - 0.5  # crop index, [..., P]
    inside = tf.logical_and(centres >= gt_lo[..., None], centres <= gt_hi[..., None])
    index = tf.clip_by_value(index, 0.0, crop_size - 1.0)
    pixels = tf.range(crop_size, dtype=tf.float32)  # [M]
    weights = tf.nn.relu(1.0 - tf.abs(index[..., None] - pixels))  # [..., P, M]
    return weights * tf.cast(inside, tf.float32)[..., None]


def mask_targets(gt_masks, gt_mask_boxes, rois, matched_gt, output_size=28):
    """Binary P x P mask targets of ROIs from their matched ground-truth crops.

    Args:
      gt_masks: [B, I, M, M] float box-aligned crops in [0, 1] (padding rows -1), as the parser's
        "gt_masks"; M static.
      gt_mask_boxes: [B, I, 4] float [ymin, xmin, ymax, xmax] continuous extents the crops were
        taken over (the parser's "gt_mask_boxes"), in the same frame as rois (padding rows -1).
      rois: [B, S, 4] float [ymin, xmin, ymax, xmax] ROIs (e.g. sampled foreground proposals).
      matched_gt: [B, S] int index into I of each ROI's ground truth. Out-of-range values
        (e.g. -1 for background ROIs) are clamped into [0, I - 1]; their targets are meaningless
        but finite, and the caller masks them.
      output_size: P, python int.
    Returns:
      [B, S, P, P] float32 in {0, 1}; no gradient flows through it. A padding gt row (value -1)
      yields all zeros. Memory: the matched crops are gathered, B * S * M * M floats.
    """
    gt_masks = tf.cast(gt_masks, tf.float32)
    crop_size = gt_masks.shape[-1]
    if crop_size is None or gt_masks.shape[-2] != crop_size:
        raise ValueError("mask_targets: expected square crops with a static side in gt_masks "
                         f"[B, I, M, M], found {gt_masks.shape}.")
    num_instances = tf.shape(gt_masks)[1]
    matched = tf.clip_by_value(tf.cast(matched_gt, tf.int32), 0, num_instances - 1)
    crops = tf.gather(gt_masks, matched, batch_dims=1)  # [B, S, M, M]
    boxes = tf.gather(tf.cast(gt_mask_boxes, tf.float32), matched, batch_dims=1)  # [B, S, 4]
    rois = tf.cast(rois, tf.float32)
    weights_y = _interpolation_matrix(boxes[..., 0], boxes[..., 2], rois[..., 0], rois[..., 2],
                                      crop_size, output_size)  # [B, S, P, M]
    weights_x = _interpolation_matrix(boxes[..., 1], boxes[..., 3], rois[..., 1], rois[..., 3],
                                      crop_size, output_size)  # [B, S, P, M]
    rows = tf.einsum("bskm,bsmn->bskn", weights_y, crops)  # [B, S, P, M]
    values = tf.einsum("bskn,bsln->bskl", rows, weights_x)  # [B, S, P, P]
    return tf.stop_gradient(tf.cast(values >= MASK_THRESHOLD, tf.float32))
