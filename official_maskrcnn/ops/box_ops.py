"""Box arithmetic with the MLPerf reference's (maskrcnn-benchmark, Detectron) semantics.

Shape legend: N, M boxes; `...` any leading batch dimensions (e.g. B images); K classes
(class-specific deltas are reshaped to [..., K, 4] by the caller).

Boxes are [ymin, xmin, ymax, xmax] in absolute pixels, in the reference's inclusive ("+1",
TO_REMOVE = 1) convention: width = xmax - xmin + 1, height = ymax - ymin + 1.
Box deltas keep the reference's order (dx, dy, dw, dh) even though boxes are y-first, so that
converted head weights and the reference's numbers line up column for column.
Everything is computed in float32 whatever the inputs' dtype (mixed precision).
"""

import math

import tensorflow as tf

from official_maskrcnn.ops.conventions import TO_REMOVE

# maskrcnn-benchmark's default bbox_xform_clip: no predicted side grows beyond 1000 / 16 times.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)
RPN_BOX_CODER_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
HEAD_BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Floor on widths/heights before a log or a division, reached only by degenerate (inverted)
# boxes, so that padding never turns into NaN or inf.
MIN_SIDE = 1e-6


def _sides(boxes):
    """[..., 4] boxes -> (height, width), each [...], with the +1 convention, unclamped."""
    ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
    return ymax - ymin + TO_REMOVE, xmax - xmin + TO_REMOVE


def box_area(boxes):
    """Areas with the +1 convention.

    Args:
      boxes: [..., N, 4] [ymin, xmin, ymax, xmax].
    Returns:
      [..., N] float32 (xmax - xmin + 1) * (ymax - ymin + 1), with each side clamped at 0 so an
      inverted box has area 0 (the reference would multiply two negative sides; it removes such
      boxes before using their area). A padding row of -1 is a 1x1 box and has area 1.
    """
    height, width = _sides(tf.cast(boxes, tf.float32))
    return tf.maximum(height, 0.0) * tf.maximum(width, 0.0)


def pairwise_iou(boxes_a, boxes_b):
    """IoU of every box of `boxes_a` with every box of `boxes_b`, as the reference's `boxlist_iou`.

    intersection side = max(0, min(max corners) - max(min corners) + 1).
    Any pair involving an empty box (a side xmax - xmin + 1 <= 0) has IoU 0, never NaN.
    Padding is NOT detected: a row of -1 is a valid 1x1 box at (-1, -1) under the +1
    convention and overlaps anchors that cross the top-left border; callers mask padding rows.

    Args:
      boxes_a: [..., N, 4] [ymin, xmin, ymax, xmax].
      boxes_b: [..., M, 4] same frame; leading dimensions broadcast with boxes_a's.
    Returns:
      [..., N, M] float32 IoU in [0, 1].
    """
    boxes_a = tf.cast(boxes_a, tf.float32)
    boxes_b = tf.cast(boxes_b, tf.float32)
    a = boxes_a[..., :, None, :]  # [..., N, 1, 4]
    b = boxes_b[..., None, :, :]  # [..., 1, M, 4]
    top_left = tf.maximum(a[..., :2], b[..., :2])
    bottom_right = tf.minimum(a[..., 2:], b[..., 2:])
    inter_sides = tf.maximum(bottom_right - top_left + TO_REMOVE, 0.0)
    intersection = inter_sides[..., 0] * inter_sides[..., 1]
    union = box_area(boxes_a)[..., :, None] + box_area(boxes_b)[..., None, :] - intersection
    return tf.math.divide_no_nan(intersection, tf.maximum(union, 0.0))


def clip_boxes(boxes, image_size):
    """Clips boxes to [0, W - 1] x [0, H - 1], as the reference's `clip_to_image`.

    Args:
      boxes: [..., N, 4] [ymin, xmin, ymax, xmax].
      image_size: [2] or [..., 2] (height, width) of the resized image before padding; leading
        dimensions match boxes' leading dimensions.
    Returns:
      [..., N, 4] float32 clipped boxes (no box is removed).
    """
    boxes = tf.cast(boxes, tf.float32)
    image_size = tf.cast(image_size, tf.float32)
    max_y = image_size[..., 0:1] - TO_REMOVE  # [1] or [..., 1], broadcasts against [..., N].
    max_x = image_size[..., 1:2] - TO_REMOVE
    ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
    return tf.stack([
        tf.clip_by_value(ymin, 0.0, max_y),
        tf.clip_by_value(xmin, 0.0, max_x),
        tf.clip_by_value(ymax, 0.0, max_y),
        tf.clip_by_value(xmax, 0.0, max_x),
    ], axis=-1)


class BoxCoder:
    """Encodes boxes as deltas from reference boxes and back, as maskrcnn-benchmark's BoxCoder.

    With w = x2 - x1 + 1 and centre cx = x1 + 0.5 * w for a box (g) and its reference box (e):
      dx = wx * (gcx - ecx) / ew,  dy = wy * (gcy - ecy) / eh,
      dw = ww * log(gw / ew),      dh = wh * log(gh / eh).
    Decoding divides by the weights, clamps dw and dh at `bbox_xform_clip` (above only), and
    returns x1 = cx - 0.5 * w, x2 = cx + 0.5 * w - 1 (same for y).

    Deltas are (dx, dy, dw, dh), the reference's order; boxes are [ymin, xmin, ymax, xmax].
    The RPN uses weights (1, 1, 1, 1), the box head (10, 10, 5, 5).
    """

    def __init__(self, weights=HEAD_BOX_CODER_WEIGHTS, bbox_xform_clip=BBOX_XFORM_CLIP):
        """Args:
          weights: (wx, wy, ww, wh) python floats.
          bbox_xform_clip: python float, the upper clamp of dw / ww and dh / wh when decoding.
        """
        if len(weights) != 4:
            raise ValueError(f"BoxCoder: expected 4 weights (wx, wy, ww, wh), found {weights}.")
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = float(bbox_xform_clip)

    @staticmethod
    def _centres(boxes):
        """[..., 4] boxes -> (cy, cx, h, w), each [...], sides floored at MIN_SIDE."""
        height, width = _sides(boxes)
        height = tf.maximum(height, MIN_SIDE)
        width = tf.maximum(width, MIN_SIDE)
        return boxes[..., 0] + 0.5 * height, boxes[..., 1] + 0.5 * width, height, width

    def encode(self, boxes, reference_boxes):
        """Deltas that turn `reference_boxes` into `boxes`.

        Args:
          boxes: [..., 4] [ymin, xmin, ymax, xmax] target boxes (e.g. matched ground truth).
          reference_boxes: [..., 4] anchors or proposals; broadcasts with boxes.
        Returns:
          [..., 4] float32 deltas (dx, dy, dw, dh). Finite for any input, inverted boxes
          included (their sides are floored at MIN_SIDE).
        """
        wx, wy, ww, wh = self.weights
        gcy, gcx, gh, gw = self._centres(tf.cast(boxes, tf.float32))
        ecy, ecx, eh, ew = self._centres(tf.cast(reference_boxes, tf.float32))
        return tf.stack([
            wx * (gcx - ecx) / ew,
            wy * (gcy - ecy) / eh,
            ww * tf.math.log(gw / ew),
            wh * tf.math.log(gh / eh),
        ], axis=-1)

    def decode(self, deltas, reference_boxes):
        """Applies deltas to reference boxes.

        Args:
          deltas: [..., 4] (dx, dy, dw, dh); for class-specific deltas reshape [R, K * 4] to
            [R, K, 4] and pass reference_boxes as [R, 1, 4].
          reference_boxes: [..., 4] [ymin, xmin, ymax, xmax] anchors or proposals; broadcasts
            with deltas.
        Returns:
          [..., 4] float32 boxes [ymin, xmin, ymax, xmax] (not clipped to the image).
        """
        wx, wy, ww, wh = self.weights
        deltas = tf.cast(deltas, tf.float32)
        cy, cx, height, width = self._centres(tf.cast(reference_boxes, tf.float32))
        dx, dy, dw, dh = tf.unstack(deltas, axis=-1)
        dx, dy = dx / wx, dy / wy
        dw = tf.minimum(dw / ww, self.bbox_xform_clip)
        dh = tf.minimum(dh / wh, self.bbox_xform_clip)
        pred_cx = dx * width + cx
        pred_cy = dy * height + cy
        pred_w = tf.exp(dw) * width
        pred_h = tf.exp(dh) * height
        return tf.stack([
            pred_cy - 0.5 * pred_h,
            pred_cx - 0.5 * pred_w,
            pred_cy + 0.5 * pred_h - TO_REMOVE,
            pred_cx + 0.5 * pred_w - TO_REMOVE,
        ], axis=-1)
