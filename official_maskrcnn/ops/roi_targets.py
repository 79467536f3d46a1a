"""ROI sampling and box-head targets, as maskrcnn-benchmark's FastRCNNLossComputation.subsample.

Shape legend: B images; P proposals per image (padded, with a validity mask); I padded
ground-truth instances per image (rows with class <= 0 are padding); C = P + I candidates
(the proposals followed by the gt rows, as the reference's `add_gt_proposals`); S sampled ROIs
per image (`num_samples`, a static slot count; unused slots are padding).

Boxes are [ymin, xmin, ymax, xmax] absolute pixels, inclusive (+1) corners. Box targets are
(dx, dy, dw, dh) with BoxCoder weights (10, 10, 5, 5). Static shapes throughout (XLA).
"""

import tensorflow as tf

from official_maskrcnn.ops import box_ops, matching, sampling


def sample_rois(proposals, proposal_valid, gt_boxes, gt_classes, seed, num_samples=512,
                fg_fraction=0.25, fg_iou_threshold=0.5, bg_iou_threshold=0.5):
    """Samples the ROIs of the box head and their classification / regression targets.

    Per image, with the reference's rules:
    1. Candidates = the valid proposals and the valid gt boxes (a valid gt is always a foreground
       candidate of itself, IoU 1).
    2. Matcher(fg_iou_threshold, bg_iou_threshold, allow_low_quality_matches=False) on
       IoU(valid gt, candidates): matched -> foreground candidate, BELOW_LOW_THRESHOLD ->
       background candidate, BETWEEN_THRESHOLDS (only if bg < fg threshold) -> ignored.
    3. sample_balanced: at most int(num_samples * fg_fraction) foreground, the rest background.
    4. The sampled candidates are compacted into the first slots in increasing candidate order
       (proposals first, then gt rows); the remaining slots are padding (zero boxes, all
       targets 0, roi_valid False).
    An image without valid gt gets only background ROIs.

    Args:
      proposals: [B, P, 4] float proposals (any float dtype; no gradient flows into them).
      proposal_valid: [B, P] bool, True for real proposals.
      gt_boxes: [B, I, 4] ground-truth boxes, padding rows arbitrary (e.g. -1).
      gt_classes: [B, I] int classes, > 0 for real instances, -1 for padding.
      seed: [2] int32 or int64 tensor, the stateless seed of the sampling.
      num_samples: python int S, ROIs sampled per image.
      fg_fraction: python float, the largest fraction of foreground among them.
      fg_iou_threshold: python float, IoU at or above which a candidate is foreground.
      bg_iou_threshold: python float <= fg_iou_threshold, IoU below which it is background.
    Returns:
      dict of
        rois: [B, S, 4] float32 sampled boxes (zeros in padding slots), gradient-stopped.
        roi_valid: [B, S] bool, True for sampled slots.
        foreground: [B, S] bool, True for sampled foreground ROIs.
        class_targets: [B, S] int32 matched gt class for foreground, 0 elsewhere.
        box_targets: [B, S, 4] float32 BoxCoder(HEAD_BOX_CODER_WEIGHTS).encode(matched gt, roi)
          for foreground, zeros elsewhere.
        matched_gt: [B, S] int32 index in [0, I) of the matched gt for foreground, 0 elsewhere.
    """
    proposals = tf.stop_gradient(tf.cast(proposals, tf.float32))
    gt_boxes = tf.stop_gradient(tf.cast(gt_boxes, tf.float32))
    proposal_valid = tf.cast(proposal_valid, tf.bool)
    gt_classes = tf.cast(gt_classes, tf.int32)
    gt_valid = gt_classes > 0  # [B, I]

    num_proposals = proposals.shape[1]
    num_gt = gt_boxes.shape[1]
    if num_proposals is None or num_gt is None:
        raise ValueError(f"sample_rois: expected static P and I, found proposals "
                         f"{proposals.shape} and gt_boxes {gt_boxes.shape}.")
    num_candidates = num_proposals + num_gt

    candidates = tf.concat([proposals, gt_boxes], axis=1)  # [B, C, 4]
    candidate_valid = tf.concat([proposal_valid, gt_valid], axis=1)  # [B, C]

    iou = box_ops.pairwise_iou(gt_boxes, candidates)  # [B, I, C]
    matcher = matching.Matcher(fg_iou_threshold, bg_iou_threshold,
                               allow_low_quality_matches=False)
    matches = matcher(iou, gt_valid)  # [B, C]
    fg_candidate = tf.logical_and(matches >= 0, candidate_valid)
    bg_candidate = tf.logical_and(tf.equal(matches, matching.BELOW_LOW_THRESHOLD),
                                  candidate_valid)
    sampled_fg, sampled_bg = sampling.sample_balanced(
        fg_candidate, bg_candidate, num_samples, fg_fraction, seed)
    sampled = tf.logical_or(sampled_fg, sampled_bg)  # [B, C]

    # Compaction: distinct scores, sampled candidates first, each group in index order; the
    # scores are distinct so the order does not depend on top_k's tie breaking.
    index = tf.range(num_candidates, dtype=tf.int32)[None, :]  # [1, C]
    order_score = tf.where(sampled, num_candidates - index, -1 - index)  # [B, C]
    k = min(num_samples, num_candidates)
    _, slot_index = tf.math.top_k(order_score, k=k, sorted=True)  # [B, k]

    slot_sampled = tf.gather(sampled, slot_index, batch_dims=1)  # [B, k]
    slot_fg = tf.logical_and(tf.gather(sampled_fg, slot_index, batch_dims=1), slot_sampled)
    slot_boxes = tf.gather(candidates, slot_index, batch_dims=1)  # [B, k, 4]
    slot_boxes = tf.where(slot_sampled[..., None], slot_boxes, 0.0)
    slot_match = tf.gather(matches, slot_index, batch_dims=1)  # [B, k]
    matched_gt = tf.where(slot_fg, tf.maximum(slot_match, 0), 0)  # [B, k]

    matched_classes = tf.gather(gt_classes, matched_gt, batch_dims=1)  # [B, k]
    class_targets = tf.where(slot_fg, matched_classes, 0)
    matched_boxes = tf.gather(gt_boxes, matched_gt, batch_dims=1)  # [B, k, 4]
    coder = box_ops.BoxCoder(box_ops.HEAD_BOX_CODER_WEIGHTS)
    # Non-foreground slots encode a dummy pair (a real box against itself) and are zeroed, so no
    # NaN can leak through tf.where.
    safe_gt = tf.where(slot_fg[..., None], matched_boxes, slot_boxes)
    box_targets = tf.where(slot_fg[..., None], coder.encode(safe_gt, slot_boxes), 0.0)

    outputs = {
        "rois": tf.stop_gradient(slot_boxes),
        "roi_valid": slot_sampled,
        "foreground": slot_fg,
        "class_targets": tf.cast(class_targets, tf.int32),
        "box_targets": tf.stop_gradient(box_targets),
        "matched_gt": tf.cast(matched_gt, tf.int32),
    }
    pad = num_samples - k
    if pad > 0:  # Fewer candidates than slots: static padding.
        outputs = {name: tf.pad(value, [[0, 0], [0, pad]] + [[0, 0]] * (value.shape.rank - 2))
                   for name, value in outputs.items()}
    return outputs
