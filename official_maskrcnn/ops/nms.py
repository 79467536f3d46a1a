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
# Candidates settled per NMS loop iteration: 2000 RPN candidates take 8 tiles. The per-class
# inference NMS solves B * (K - 1) problems at once (1280 for 16 images of COCO), so it uses
# smaller tiles to bound its [problems, T, T] IoU block (1000 ROIs: 8 tiles).
NMS_TILE_SIZE = 256
PER_CLASS_NMS_TILE_SIZE = 128
# The reference's inference (maskrcnn-benchmark ROI_HEADS.SCORE_THRESH / NMS / DETECTIONS_PER_IMG).
INFERENCE_SCORE_THRESHOLD = 0.05
INFERENCE_IOU_THRESHOLD = 0.5
INFERENCE_MAX_DETECTIONS = 100


def non_max_suppression(boxes, scores, max_output, iou_threshold, valid=None,
                        tile_size=NMS_TILE_SIZE):
    """Greedy NMS of B independent problems at once, XLA-compilable, in tiles of candidates.

    The result is exactly the greedy visit of the module docstring, computed with few sequential
    steps instead of one loop iteration per kept box. The candidates are sorted once (stable:
    ties by index) and cut into tiles of `tile_size` consecutive candidates. A tf.while_loop
    visits the tiles in order; for each tile:
      1. every candidate overlapping (IoU > threshold) a box already kept from earlier tiles is
         dropped: one [B, D, T] IoU against the kept boxes;
      2. the tile suppresses itself: with the [B, T, T] IoU of its candidates and the rule "j is
         kept iff it is a candidate and no earlier kept i of the tile overlaps it", the kept set
         is the unique fixed point of that rule, reached by applying it repeatedly starting from
         all candidates (after k applications the first k candidates are settled, so at most T
         applications; a typical tile needs a handful: the length of its longest suppression
         chain);
      3. the tile's kept boxes are appended, in order, to the first D output slots.
    The loop stops once every problem has D kept boxes or no valid candidate is left. Boxes kept
    beyond the first D can never be output, so only D kept boxes need to be remembered: memory
    is O(B * T * (T + D)) per step and time O(B * N * (D + T)), never an N x N IoU matrix.

    Args:
      boxes: [B, N, 4] float [ymin, xmin, ymax, xmax].
      scores: [B, N] float; any finite or infinite values (only their order is used).
      max_output: D, a python int >= 0 (may exceed N; extra slots are invalid).
      iou_threshold: python float or scalar; a candidate is suppressed by a kept box when their
        IoU > iou_threshold.
      valid: optional [B, N] bool; False rows (padding, below a score threshold) are never kept
        and suppress nothing. Default: all valid.
      tile_size: T, python int >= 1, candidates settled per loop iteration (the result does not
        depend on it; it trades loop iterations for the size of the IoU blocks).
    Returns:
      indices: [B, D] int32 indices into N of the kept boxes, in decreasing score order;
        PAD_INDEX in invalid slots.
      valid: [B, D] bool, True for the first num_kept slots of each problem.
    """
    boxes = tf.cast(boxes, tf.float32)
    scores = tf.cast(scores, tf.float32)
    batch = tf.shape(boxes)[0]
    num_boxes = boxes.shape[1]
    if num_boxes is None:
        raise ValueError(f"non_max_suppression: expected a static candidate dimension N in "
                         f"boxes [B, N, 4], found {boxes.shape}.")
    if valid is None:
        valid = tf.ones([batch, num_boxes], tf.bool)
    valid = tf.cast(valid, tf.bool)
    if max_output == 0 or num_boxes == 0:
        return (tf.fill([batch, max_output], tf.constant(PAD_INDEX, tf.int32)),
                tf.zeros([batch, max_output], tf.bool))
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"non_max_suppression: tile_size must be a positive int, got "
                         f"{tile_size!r}")

    tile = min(tile_size, num_boxes)
    num_tiles = -(-num_boxes // tile)
    padded = num_tiles * tile
    order = tf.argsort(scores, axis=1, direction="DESCENDING", stable=True)  # [B, N]
    # Sorted candidates, padded to whole tiles with invalid rows: [B, num_tiles, T, ...].
    sorted_boxes = tf.pad(tf.gather(boxes, order, batch_dims=1),
                          [[0, 0], [0, padded - num_boxes], [0, 0]])
    sorted_valid = tf.pad(tf.gather(valid, order, batch_dims=1), [[0, 0], [0, padded - num_boxes]])
    tiled_boxes = tf.reshape(sorted_boxes, [batch, num_tiles, tile, 4])
    tiled_valid = tf.reshape(sorted_valid, [batch, num_tiles, tile])
    # Tiles after the last one holding a valid candidate (of any problem) change nothing.
    any_valid = tf.reduce_any(tiled_valid, axis=[0, 2])  # [num_tiles]
    tiles_needed = tf.reduce_max(tf.where(any_valid, tf.range(1, num_tiles + 1), 0))
    # Strictly earlier candidate of the same tile: earlier[i, j] = i < j.
    position = tf.range(tile)
    earlier = position[:, None] < position[None, :]  # [T, T]
    # One spare slot at index D receives every kept box beyond the first D (never read).
    slots = max_output + 1
    problem = tf.range(batch)[:, None]  # [B, 1]

    def cond(t, count, unused_kept):
        return tf.logical_and(t < tiles_needed, tf.reduce_any(count < max_output))

    def body(t, count, kept):
        candidates = tiled_boxes[:, t]  # [B, T, 4]
        alive = tiled_valid[:, t]  # [B, T]
        # 1. Against the boxes kept so far (slots < count).
        kept_boxes = tf.gather(sorted_boxes, kept[:, :max_output], batch_dims=1)  # [B, D, 4]
        kept_valid = tf.range(max_output)[None, :] < count[:, None]  # [B, D]
        overlap = box_ops.pairwise_iou(kept_boxes, candidates) > iou_threshold  # [B, D, T]
        alive = tf.logical_and(alive, tf.logical_not(tf.reduce_any(
            tf.logical_and(overlap, kept_valid[:, :, None]), axis=1)))
        # 2. Within the tile: iterate the greedy rule to its fixed point.
        suppresses = tf.logical_and(
            box_ops.pairwise_iou(candidates, candidates) > iou_threshold, earlier)  # [B, T, T]

        def apply_rule(keep):
            hit = tf.reduce_any(tf.logical_and(suppresses, keep[:, :, None]), axis=1)
            return tf.logical_and(alive, tf.logical_not(hit))

        def not_settled(keep, previous):
            return tf.reduce_any(tf.not_equal(keep, previous))

        keep, _ = tf.while_loop(not_settled, lambda keep, _: (apply_rule(keep), keep),
                                (apply_rule(alive), alive), maximum_iterations=tile)
        # 3. Append the tile's kept candidates (their positions in the sorted order) in order.
        keep_int = tf.cast(keep, tf.int32)
        slot = count[:, None] + tf.cumsum(keep_int, axis=1, exclusive=True)  # [B, T]
        slot = tf.where(tf.logical_and(keep, slot < max_output), slot, max_output)
        sorted_position = t * tile + position  # [T]
        kept = tf.tensor_scatter_nd_update(
            kept, tf.stack([tf.broadcast_to(problem, tf.shape(slot)), slot], axis=-1),
            tf.broadcast_to(sorted_position[None, :], tf.shape(slot)))
        return t + 1, count + tf.reduce_sum(keep_int, axis=1), kept

    _, count, kept = tf.while_loop(
        cond, body,
        (tf.constant(0), tf.zeros([batch], tf.int32), tf.zeros([batch, slots], tf.int32)),
        maximum_iterations=num_tiles)
    out_valid = tf.range(max_output)[None, :] < tf.minimum(count, max_output)[:, None]
    # Sorted positions past N are padding rows, never kept, so the gather stays inside `order`.
    indices = tf.gather(order, tf.minimum(kept[:, :max_output], num_boxes - 1), batch_dims=1)
    return tf.where(out_valid, indices, PAD_INDEX), out_valid


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
    num_rois = scores.shape[1]
    if num_rois is None:
        raise ValueError(f"batched_per_class_nms: expected a static ROI dimension R in scores "
                         f"[B, R, K], found {scores.shape}.")
    num_fg = num_classes - 1
    # [B, K-1, R] problems, flattened to B * (K-1) independent NMS runs.
    fg_scores = tf.transpose(scores[:, :, 1:], [0, 2, 1])
    fg_boxes = tf.transpose(boxes[:, :, 1:, :], [0, 2, 1, 3])
    candidate = fg_scores > score_threshold
    if valid is not None:
        candidate = tf.logical_and(candidate, tf.cast(valid, tf.bool)[:, None, :])
    flat_scores = tf.reshape(fg_scores, [-1, num_rois])
    flat_boxes = tf.reshape(fg_boxes, [-1, num_rois, 4])
    keep, keep_valid = non_max_suppression(  # [B * (K-1), T]
        flat_boxes, flat_scores, max_detections, iou_threshold,
        valid=tf.reshape(candidate, [-1, num_rois]), tile_size=PER_CLASS_NMS_TILE_SIZE)
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
