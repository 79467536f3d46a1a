"""RPN training targets (labels and box deltas per anchor), as maskrcnn-benchmark's RPN loss.

Shape legend: B images; N anchors (all FPN levels concatenated, shared by the batch);
I padded ground-truth instances per image (I >= 1; rows with class <= 0 are padding).

Boxes are [ymin, xmin, ymax, xmax] absolute pixels of the padded input, inclusive (+1) corners.
Deltas are (dx, dy, dw, dh), BoxCoder weights (1, 1, 1, 1). Static shapes throughout (XLA).
"""

import tensorflow as tf

from official_maskrcnn.ops import anchors as anchors_lib
from official_maskrcnn.ops import box_ops, matching, sampling

# Values of `labels`.
POSITIVE = 1
NEGATIVE = 0
IGNORE = -1  # Not sampled, between thresholds, or crossing the image border.


def rpn_targets(anchors, gt_boxes, gt_classes, image_size, seed, batch_size_per_image=256,
                positive_fraction=0.5, high=0.7, low=0.3, straddle_thresh=0):
    """Labels and regression targets of every anchor, with the reference's rules.

    1. Match anchors to valid gt with Matcher(high, low, allow_low_quality_matches=True) over
       ALL anchors (as the reference, the low-quality rule also sees anchors that step 3 drops).
    2. Matched -> positive candidate, BELOW_LOW_THRESHOLD -> negative candidate,
       BETWEEN_THRESHOLDS -> ignored.
    3. Anchors crossing the unpadded image's border by more than `straddle_thresh` are ignored.
    4. Sample `batch_size_per_image` anchors per image, at most `positive_fraction` positives.
    An image without valid gt gets only negatives (the reference does not allow such images).

    Args:
      anchors: [N, 4] anchors, e.g. the levels of `multilevel_anchors` concatenated.
      gt_boxes: [B, I, 4] ground-truth boxes, padding rows arbitrary (e.g. -1).
      gt_classes: [B, I] int classes, > 0 for real instances, -1 for padding.
      image_size: [B, 2] (height, width) of each resized image before padding.
      seed: [2] int32 or int64 tensor, the stateless seed of the sampling.
      batch_size_per_image: python int, anchors sampled per image.
      positive_fraction: python float, the largest fraction of positives among them.
      high, low: python float IoU thresholds of the matcher.
      straddle_thresh: python number, see `anchors.anchor_visibility`; negative keeps all.
    Returns:
      dict with
        labels: [B, N] int32, POSITIVE (1), NEGATIVE (0) or IGNORE (-1) (including not sampled).
        box_targets: [B, N, 4] float32 deltas of the matched gt w.r.t. the anchor where labels is
          POSITIVE, zeros elsewhere.
        matched_gt_indices: [B, N] int32, the Matcher's output (gt index or a negative constant),
          before visibility and sampling.
        num_positives: [B] int32, anchors labelled POSITIVE.
        num_negatives: [B] int32, anchors labelled NEGATIVE.
    """
    anchors = tf.cast(anchors, tf.float32)
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_valid = gt_classes > 0  # [B, I]

    iou = box_ops.pairwise_iou(gt_boxes, anchors)  # [B, I, N]
    matcher = matching.Matcher(high, low, allow_low_quality_matches=True)
    matches = matcher(iou, gt_valid)  # [B, N]

    visible = anchors_lib.anchor_visibility(anchors, image_size, straddle_thresh)  # [B, N]
    visible = tf.broadcast_to(visible, tf.shape(matches))
    candidate_positive = tf.logical_and(matches >= 0, visible)
    candidate_negative = tf.logical_and(
        tf.equal(matches, matching.BELOW_LOW_THRESHOLD), visible)
    sampled_positive, sampled_negative = sampling.sample_balanced(
        candidate_positive, candidate_negative, batch_size_per_image, positive_fraction, seed)

    labels = tf.fill(tf.shape(matches), IGNORE)
    labels = tf.where(sampled_negative, NEGATIVE, labels)
    labels = tf.where(sampled_positive, POSITIVE, labels)

    matched_gt_boxes = tf.gather(gt_boxes, tf.maximum(matches, 0), batch_dims=1)  # [B, N, 4]
    coder = box_ops.BoxCoder(weights=box_ops.RPN_BOX_CODER_WEIGHTS)
    deltas = coder.encode(matched_gt_boxes, anchors[None, :, :])
    box_targets = tf.where(sampled_positive[..., None], deltas, 0.0)

    return {
        "labels": labels,
        "box_targets": box_targets,
        "matched_gt_indices": matches,
        "num_positives": tf.reduce_sum(tf.cast(sampled_positive, tf.int32), axis=-1),
        "num_negatives": tf.reduce_sum(tf.cast(sampled_negative, tf.int32), axis=-1),
    }
