"""FPN RPN proposals with the MLPerf reference's semantics (maskrcnn-benchmark
`RPNPostProcessor` with FPN), static shapes (XLA).

Shape legend: B images; L FPN levels ("2".."6"); N_l = Hf * Wf * A anchors of level l, ordered
(y, x, a) as `anchors.multilevel_anchors`; n_l = min(pre_nms_top_n, N_l) candidates of level l;
P `post_nms_top_n`.

Boxes are [ymin, xmin, ymax, xmax] in absolute pixels of the padded network input, with the
reference's inclusive ("+1") corners; deltas are (dx, dy, dw, dh) (box_ops.BoxCoder).

Pipeline, per image and per level (as the reference's `forward_for_single_feature_map`):
  1. the n_l anchors with the highest objectness;
  2. decode their deltas with BoxCoder weights (1, 1, 1, 1) (dw, dh clamped at log(1000 / 16));
  3. clip to the unpadded image [0, w - 1] x [0, h - 1] (`clip_to_image(remove_empty=False)`);
  4. drop boxes with a side (x2 - x1 + 1, "+1" convention) < min_size. The reference's
     min_size is 0, and a decoded box always has x2 - x1 + 1 = exp(dw) * w > 0, which clipping
     (monotone) keeps >= 0, so with min_size = 0 this step removes nothing; it is kept for other
     values and enforced through the valid mask;
  5. greedy NMS at nms_threshold (IoU > threshold suppresses), keeping up to min(P, n_l)
     (all levels of all images in one `nms.non_max_suppression` call).
Then the levels are merged and the P best by objectness kept:
  - per_image=True (the reference at eval, and the usual reading of the rules'
    "1000 per image" for training): the top P of each image;
  - per_image=False (the reference's training behaviour, FPN_POST_NMS_PER_BATCH=True): the top
    P over all B images together (FPN_POST_NMS_TOP_N_TRAIN = 2000 per batch of 2), so an image
    gets anywhere between 0 and P proposals.
Outputs are compacted per image in decreasing score order (the reference keeps its per-batch
selection in level order; order does not matter downstream), with a valid mask.
Ranking uses the logits (same order as the reference's sigmoid, but without float32 ties of
saturated probabilities); the returned scores are sigmoid probabilities, as the reference's
"objectness" field. No gradient flows into proposals (the reference runs this under no_grad).
"""

import tensorflow as tf

from official_maskrcnn.ops import box_ops, nms

# maskrcnn-benchmark RPN defaults (FPN): PRE_NMS_TOP_N_TRAIN 2000 / _TEST 1000 per level per
# image; FPN_POST_NMS_TOP_N_TRAIN 2000 per batch of 2 images, which the rules read as 1000 per
# image (the model's default, per_image=True); FPN_POST_NMS_TOP_N_TEST 1000 per image;
# NMS_THRESH, MIN_SIZE.
PRE_NMS_TOP_N_TRAIN = 2000
PRE_NMS_TOP_N_EVAL = 1000
POST_NMS_TOP_N_TRAIN_PER_IMAGE = 1000
POST_NMS_TOP_N_EVAL = 1000
RPN_NMS_THRESHOLD = 0.7
RPN_MIN_SIZE = 0.0


def _sorted_levels(tensors, name):
    levels = sorted(tensors.keys(), key=int)
    if not levels:
        raise ValueError(f"generate_proposals: expected at least one level in {name}, found none.")
    return levels


def _level_candidates(objectness, deltas, anchors, image_size, pre_nms_top_n, min_size):
    """One level before NMS: top-k, decode, clip, size filter.

    Args:
      objectness: [B, N_l] logits; deltas: [B, N_l, 4]; anchors: [N_l, 4]; image_size: [B, 2].
    Returns:
      boxes [B, n_l, 4], logits [B, n_l] (in decreasing order), big_enough [B, n_l] bool.
    """
    num_anchors = objectness.shape[1]
    if num_anchors is None:
        raise ValueError("generate_proposals: expected a static anchor dimension N_l in "
                         f"objectness [B, N_l], found {objectness.shape}.")
    top_n = min(pre_nms_top_n, num_anchors)
    logits, top = tf.math.top_k(objectness, k=top_n, sorted=True)  # [B, n_l]
    top_deltas = tf.gather(deltas, top, batch_dims=1)  # [B, n_l, 4]
    top_anchors = tf.gather(anchors, top)  # [B, n_l, 4]
    coder = box_ops.BoxCoder(weights=box_ops.RPN_BOX_CODER_WEIGHTS)
    boxes = box_ops.clip_boxes(coder.decode(top_deltas, top_anchors), image_size)
    heights = boxes[..., 2] - boxes[..., 0] + box_ops.TO_REMOVE
    widths = boxes[..., 3] - boxes[..., 1] + box_ops.TO_REMOVE
    big_enough = tf.logical_and(widths >= min_size, heights >= min_size)
    return boxes, logits, big_enough


def _multilevel_nms(boxes, logits, valid, nms_threshold, post_nms_top_n):
    """Greedy NMS of every (image, level) problem in one call, so that the sequential loop of
    `nms.non_max_suppression` runs once per step instead of once per level.

    Args:
      boxes: list over levels of [B, n_l, 4]; logits: list of [B, n_l]; valid: list of [B, n_l].
    Returns:
      boxes [B, L * D, 4], logits [B, L * D], valid [B, L * D], level after level, each level's kept
      boxes in decreasing score order, with D = min(post_nms_top_n, max n_l). A level keeps at
      most min(post_nms_top_n, n_l) boxes, as if it were suppressed alone: its padding rows
      (up to max n_l) are invalid and sort last.
    """
    num_levels = len(boxes)
    width = max(level.shape[1] for level in logits)

    def stacked(tensors, value):
        # [B, n_l, ...] per level -> [B * L, n_max, ...], image-major (row b * L + l), so that
        # the results reshape back to [B, L * D, ...] without a transpose: oneDNN's transpose
        # of a bool or int tensor logs a C++ error line on some CPUs, noise in the console.
        padded = [tf.pad(x, [[0, 0], [0, width - x.shape[1]]] + [[0, 0]] * (x.shape.rank - 2),
                         constant_values=value) for x in tensors]
        return tf.reshape(tf.stack(padded, axis=1), [-1] + padded[0].shape[1:].as_list())

    stacked_boxes = stacked(boxes, 0.0)
    stacked_logits = stacked(logits, -float("inf"))
    num_keep = min(post_nms_top_n, width)
    keep, keep_valid = nms.non_max_suppression(stacked_boxes, stacked_logits, num_keep,
                                               nms_threshold, valid=stacked(valid, False))

    def per_image(x):
        # [B * L, D, ...] -> [B, L * D, ...]
        return tf.reshape(x, [-1, num_levels * num_keep] + x.shape[2:].as_list())

    return (per_image(tf.gather(stacked_boxes, keep, batch_dims=1)),
            per_image(tf.gather(stacked_logits, keep, batch_dims=1)), per_image(keep_valid))


def generate_proposals(objectness, deltas, anchors, image_size, pre_nms_top_n, post_nms_top_n,
                       nms_threshold=RPN_NMS_THRESHOLD, per_image=True, min_size=RPN_MIN_SIZE):
    """RPN outputs of all FPN levels -> a fixed number of proposals per image.

    Args:
      objectness: dict level -> [B, N_l] objectness logits (float, any dtype); N_l static.
      deltas: dict level -> [B, N_l, 4] (dx, dy, dw, dh) box deltas.
      anchors: dict level -> [N_l, 4] anchors [ymin, xmin, ymax, xmax] (same keys).
      image_size: [B, 2] int or float (h, w) of each resized image before padding.
      pre_nms_top_n: python int, candidates per level per image before NMS (2000 train,
        1000 eval).
      post_nms_top_n: P, python int, proposals kept per level after NMS and in the end per image
        (per_image=True) or per batch (per_image=False) (2000 train, 1000 eval).
      nms_threshold: python float, NMS IoU threshold (0.7).
      per_image: bool, see the module docstring.
      min_size: python float, minimum side ("+1" convention) of a kept box (0 in the reference).
    Returns:
      dict with
        "proposal_boxes": [B, P, 4] float32 [ymin, xmin, ymax, xmax], zeros in invalid slots;
        "proposal_scores": [B, P] float32 sigmoid objectness, zeros in invalid slots;
        "proposal_valid": [B, P] bool; valid slots come first, in decreasing score order.
    """
    levels = _sorted_levels(objectness, "objectness")
    if sorted(deltas.keys(), key=int) != levels or sorted(anchors.keys(), key=int) != levels:
        raise ValueError(f"generate_proposals: expected the same levels in objectness, deltas and "
                         f"anchors, found {levels}, {sorted(deltas)}, {sorted(anchors)}.")
    image_size = tf.cast(image_size, tf.float32)
    candidates = [
        _level_candidates(
            tf.cast(tf.stop_gradient(objectness[level]), tf.float32),
            tf.cast(tf.stop_gradient(deltas[level]), tf.float32),
            tf.cast(anchors[level], tf.float32), image_size, pre_nms_top_n, min_size)
        for level in levels]
    boxes, logits, valid = _multilevel_nms(*zip(*candidates), nms_threshold=nms_threshold,
                                           post_nms_top_n=post_nms_top_n)  # [B, C, ...]
    num_candidates = logits.shape[1]

    lowest = tf.constant(-float("inf"), tf.float32)
    ranking = tf.where(valid, logits, lowest)
    if not per_image:
        # Batch-wide top P: select in the flattened [B * C] ranking, then keep per image only the
        # selected candidates (at most P per image).
        batch = tf.shape(ranking)[0]
        flat = tf.reshape(ranking, [-1])
        k = min(post_nms_top_n, flat.shape[0]) if flat.shape[0] is not None else post_nms_top_n
        _, flat_top = tf.math.top_k(flat, k=k, sorted=False)
        selected = tf.scatter_nd(flat_top[:, None], tf.ones_like(flat_top, tf.bool),
                                 tf.shape(flat))
        valid = tf.logical_and(valid, tf.reshape(selected, [batch, num_candidates]))
        ranking = tf.where(valid, logits, lowest)
    # Per image: top P (pad the candidate axis when there are fewer than P candidates).
    if num_candidates < post_nms_top_n:
        pad = post_nms_top_n - num_candidates
        ranking = tf.pad(ranking, [[0, 0], [0, pad]], constant_values=-float("inf"))
        logits = tf.pad(logits, [[0, 0], [0, pad]])
        boxes = tf.pad(boxes, [[0, 0], [0, pad], [0, 0]])
        valid = tf.pad(valid, [[0, 0], [0, pad]])
    _, top = tf.math.top_k(ranking, k=post_nms_top_n, sorted=True)  # [B, P]
    out_valid = tf.gather(valid, top, batch_dims=1)
    out_scores = tf.where(out_valid, tf.sigmoid(tf.gather(logits, top, batch_dims=1)), 0.0)
    out_boxes = tf.where(out_valid[..., None], tf.gather(boxes, top, batch_dims=1), 0.0)
    return {
        "proposal_boxes": tf.stop_gradient(out_boxes),
        "proposal_scores": tf.stop_gradient(out_scores),
        "proposal_valid": out_valid,
    }
