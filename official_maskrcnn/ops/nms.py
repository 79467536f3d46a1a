"""Greedy non-maximum suppression with the MLPerf reference's semantics, static shapes (XLA).

Shape legend: B independent NMS problems (images, or images x classes); N candidate boxes per
problem; D `max_output` kept boxes; R ROIs per image and K classes *including* background
(class 0) for the inference head's per-class NMS; T `max_detections`.

Boxes are [ymin, xmin, ymax, xmax] in absolute pixels with the reference's inclusive ("+1")
corners; IoU is `box_ops.pairwise_iou` (maskrcnn-benchmark's `boxlist_iou`).

Semantics (torchvision / maskrcnn-benchmark `nms`): visit the boxes in decreasing score order,
keep a box unless it overlaps an already kept box with IoU > iou_threshold (strictly greater).
Equal scores are visited in increasing index order (a stable sort; the reference leaves ties to
the CUDA sort, so they are unspecified there).

Static shapes: every output has D (or T) slots and a bool `valid` mask; invalid slots hold
index PAD_INDEX (safe to gather, the caller masks them) and zero boxes / scores.
"""

import tensorflow as tf

from official_maskrcnn.ops import box_ops

# Index written into unused output slots: a real index (gathers stay in range), masked by `valid`.
PAD_INDEX = 0
# The reference's inference (maskrcnn-benchmark ROI_HEADS.SCORE_THRESH / NMS / DETECTIONS_PER_IMG).
INFERENCE_SCORE_THRESHOLD = 0.05
INFERENCE_IOU_THRESHOLD = 0.5
INFERENCE_MAX_DETECTIONS = 100


def non_max_suppression(boxes, scores, max_output, iou_threshold, valid=None):
    """Greedy NMS of B independent problems at once, XLA-compilable.

    Cost: one sort of N per problem, then a tf.while_loop with one iteration per kept box (at
    most D; it stops early once every problem has run out of candidates). Each iteration finds the
    best remaining candidate (an O(N) reduction) and computes its IoU with all N boxes, so the
    total is O(B * D * N) time and O(B * N) memory, never an N x N IoU matrix. For the RPN
    (N = D = 2000, B = 2) that is ~8M IoUs per level; the per-iteration overhead dominates on
    CPU.

    Args:
      boxes: [B, N, 4] float [ymin, xmin, ymax, xmax].
      scores: [B, N] float; any finite or infinite values (only their order is used).
      max_output: D, a python int >= 0 (may exceed N; extra slots are invalid).
      iou_threshold: python float or scalar; a candidate is suppressed by a kept box when their
        IoU > iou_threshold.
      valid: optional [B, N] bool; False rows (padding, below a score threshold) are never kept
        and suppress nothing. Default: all valid.
    Returns:
      indices: [B, D] int32 indices into N of the kept boxes, in decreasing score order;
        PAD_INDEX in invalid slots.
      valid: [B, D] bool, True for the first num_kept slots of each problem.
    """
    boxes = tf.cast(boxes, tf.float32)
    scores = tf.cast(scores, tf.float32)
    batch = tf.shape(boxes)[0]
    num_boxes = tf.shape(boxes)[1]
    if valid is None:
        valid = tf.ones([batch, num_boxes], tf.bool)
    valid = tf.cast(valid, tf.bool)
    if max_output == 0:
        return tf.zeros([batch, 0], tf.int32), tf.zeros([batch, 0], tf.bool)

    # Sort once (stable: ties by index); afterwards "best remaining" is simply the first
    # remaining position, found with argmax over a bool->int cast (argmax returns the first max).
    order = tf.argsort(scores, axis=1, direction="DESCENDING", stable=True)  # [B, N]
    sorted_boxes = tf.gather(boxes, order, batch_dims=1)  # [B, N, 4]
    remaining0 = tf.gather(valid, order, batch_dims=1)  # [B, N]
    slots = tf.range(max_output)  # [D]

    def cond(i, remaining, unused_kept, unused_kept_valid):
        return tf.logical_and(i < max_output, tf.reduce_any(remaining))

    def body(i, remaining, kept, kept_valid):
        has_any = tf.reduce_any(remaining, axis=1)  # [B]
        best = tf.argmax(tf.cast(remaining, tf.int32), axis=1, output_type=tf.int32)  # [B]
        best_box = tf.gather(sorted_boxes, best[:, None], batch_dims=1)  # [B, 1, 4]
        iou = box_ops.pairwise_iou(best_box, sorted_boxes)[:, 0, :]  # [B, N]
        # The kept box itself is removed explicitly: a degenerate box has IoU 0 with itself.
        is_best = tf.equal(tf.range(num_boxes)[None, :], best[:, None])
        remaining = tf.logical_and(
            remaining, tf.logical_not(tf.logical_or(iou > iou_threshold, is_best)))
        index = tf.where(has_any, tf.gather(order, best[:, None], batch_dims=1)[:, 0], PAD_INDEX)
        at_slot = tf.equal(slots, i)[None, :]  # [1, D]
        kept = tf.where(at_slot, index[:, None], kept)
        kept_valid = tf.where(at_slot, has_any[:, None], kept_valid)
        return i + 1, remaining, kept, kept_valid

    _, _, kept, kept_valid = tf.while_loop(
        cond, body,
        (tf.constant(0), remaining0,
         tf.fill([batch, max_output], tf.constant(PAD_INDEX, tf.int32)),
         tf.zeros([batch, max_output], tf.bool)),
        maximum_iterations=max_output)
    return kept, kept_valid


def batched_per_class_nms(boxes, scores, score_threshold=INFERENCE_SCORE_THRESHOLD,
                          iou_threshold=INFERENCE_IOU_THRESHOLD,
                          max_detections=INFERENCE_MAX_DETECTIONS, valid=None):
    """The reference's inference post-processing (maskrcnn-benchmark `filter_results`).

    For every foreground class k >= 1 independently: keep the ROIs with score > score_threshold
    (strictly), greedy NMS at iou_threshold; then keep the max_detections best by score over all
    classes. Per-class NMS only needs to return T boxes per class: the final top T can hold at
    most T of one class, and greedy NMS yields a class's boxes in decreasing score order.
    Deviations, both on exact score ties only: the reference keeps every detection whose score
    equals the T-th (kthvalue threshold), so it may return more than T; we return exactly the
    first T. Outputs are sorted by decreasing score (the reference orders them by class).
    Clipping the boxes to the image (the reference's `clip_to_image(remove_empty=False)`) is the
    caller's job, before this call.

    Args:
      boxes: [B, R, K, 4] float class-specific boxes [ymin, xmin, ymax, xmax]; class 0 ignored.
      scores: [B, R, K] float softmax probabilities; column 0 is background and ignored.
      score_threshold, iou_threshold: python floats.
      max_detections: T, python int.
      valid: optional [B, R] bool, False for padding ROIs (never detected).
    Returns:
      dict with
        "detection_boxes": [B, T, 4] float32, zeros in invalid slots;
        "detection_scores": [B, T] float32, zeros in invalid slots;
        "detection_classes": [B, T] int32 class ids in 1..K-1, zeros in invalid slots;
        "detection_valid": [B, T] bool, True for the first num_detections slots;
        "num_detections": [B] int32.
    """
    boxes = tf.cast(boxes, tf.float32)
    scores = tf.cast(scores, tf.float32)
    num_classes = scores.shape[2]
    if num_classes is None or num_classes < 2:
        raise ValueError(f"batched_per_class_nms: expected a static class dimension K >= 2 "
                         f"(background included) in scores [B, R, K], found {scores.shape}.")
    batch = tf.shape(scores)[0]
    num_rois = tf.shape(scores)[1]
    num_fg = num_classes - 1
    # [B, K-1, R] problems, flattened to B * (K-1) independent NMS runs.
    fg_scores = tf.transpose(scores[:, :, 1:], [0, 2, 1])
    fg_boxes = tf.transpose(boxes[:, :, 1:, :], [0, 2, 1, 3])
    candidate = fg_scores > score_threshold
    if valid is not None:
        candidate = tf.logical_and(candidate, tf.cast(valid, tf.bool)[:, None, :])
    flat_scores = tf.reshape(fg_scores, [-1, num_rois])
    flat_boxes = tf.reshape(fg_boxes, [-1, num_rois, 4])
    keep, keep_valid = non_max_suppression(
        flat_boxes, flat_scores, max_detections, iou_threshold,
        valid=tf.reshape(candidate, [-1, num_rois]))  # [B * (K-1), T]
    kept_scores = tf.gather(flat_scores, keep, batch_dims=1)
    kept_boxes = tf.gather(flat_boxes, keep, batch_dims=1)

    # Merge the classes: [B, (K-1) * T] candidates, top T by score.
    kept_scores = tf.reshape(kept_scores, [batch, num_fg * max_detections])
    kept_boxes = tf.reshape(kept_boxes, [batch, num_fg * max_detections, 4])
    keep_valid = tf.reshape(keep_valid, [batch, num_fg * max_detections])
    kept_classes = tf.reshape(
        tf.tile(tf.range(1, num_classes, dtype=tf.int32)[:, None], [1, max_detections]), [-1])
    # Invalid candidates rank below every valid one (-inf, whatever the score threshold).
    ranking = tf.where(keep_valid, kept_scores, -float("inf"))
    _, top = tf.math.top_k(ranking, k=max_detections, sorted=True)  # [B, T]
    det_valid = tf.gather(keep_valid, top, batch_dims=1)
    det_scores = tf.where(det_valid, tf.gather(kept_scores, top, batch_dims=1), 0.0)
    det_boxes = tf.where(det_valid[..., None], tf.gather(kept_boxes, top, batch_dims=1), 0.0)
    det_classes = tf.where(det_valid, tf.gather(kept_classes, top), 0)
    return {
        "detection_boxes": det_boxes,
        "detection_scores": det_scores,
        "detection_classes": det_classes,
        "detection_valid": det_valid,
        "num_detections": tf.reduce_sum(tf.cast(det_valid, tf.int32), axis=1),
    }
