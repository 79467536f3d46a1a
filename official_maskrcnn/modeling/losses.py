"""The Mask R-CNN losses with the MLPerf reference's definitions and normalisations.

Shape legend: B images; N anchors per image (all levels); S sampled ROIs per image (padded,
`valid` marks the sampled ones); K classes including background (index 0); P mask side (28).

| loss             | definition (REFERENCE.md, "Losses")                                          |
|------------------|------------------------------------------------------------------------------|
| rpn_score_loss   | binary cross-entropy with logits, mean over the sampled anchors of the batch |
| rpn_box_loss     | smooth-L1 (beta 1/9) over the positive anchors' deltas, summed, divided by   |
|                  | the number of sampled anchors of the batch                                   |
| frcnn_class_loss | softmax cross-entropy, mean over the sampled ROIs of the batch               |
| frcnn_box_loss   | smooth-L1 (beta 1) over the foreground ROIs' deltas of their ground-truth    |
|                  | class, summed, divided by the number of sampled ROIs of the batch            |
| mask_loss        | per-pixel sigmoid cross-entropy on the ground-truth class's channel of the   |
|                  | foreground ROIs, mean over those pixels (0 when there is no foreground ROI)  |
Counts are over the whole (per-replica) batch, as the reference concatenates its images before
averaging. Everything is computed in float32 whatever the policy of the logits.
Note: Keras `Huber(delta=d)` is d * smooth_l1(beta=d), not the reference's smooth-L1.
"""

import tensorflow as tf

from official_maskrcnn.ops.rpn_targets import NEGATIVE as RPN_NEGATIVE
from official_maskrcnn.ops.rpn_targets import POSITIVE as RPN_POSITIVE

RPN_BOX_BETA = 1.0 / 9.0
FRCNN_BOX_BETA = 1.0


def smooth_l1(predictions, targets, beta):
    """Elementwise smooth-L1 of the reference: 0.5 d^2 / beta if |d| < beta, else |d| - beta/2."""
    diff = tf.abs(tf.cast(predictions, tf.float32) - tf.cast(targets, tf.float32))
    return tf.where(diff < beta, 0.5 * tf.square(diff) / beta, diff - 0.5 * beta)


def _safe_divide(numerator, count):
    return numerator / tf.maximum(tf.cast(count, tf.float32), 1.0)


def rpn_losses(objectness_logits, box_deltas, labels, box_targets):
    """RPN objectness and box losses.

    Args:
      objectness_logits: [B, N] logits.
      box_deltas: [B, N, 4] predicted (dx, dy, dw, dh).
      labels: [B, N] int: 1 sampled positive, 0 sampled negative, -1 not sampled.
      box_targets: [B, N, 4] encoded targets (meaningful where labels == 1).
    Returns:
      {"rpn_score_loss": [], "rpn_box_loss": []} float32.
    """
    labels = tf.cast(labels, tf.int32)
    positive = tf.equal(labels, RPN_POSITIVE)
    sampled = tf.logical_or(positive, tf.equal(labels, RPN_NEGATIVE))
    num_sampled = tf.reduce_sum(tf.cast(sampled, tf.float32))
    cross_entropy = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.cast(positive, tf.float32), logits=tf.cast(objectness_logits, tf.float32))
    score_loss = _safe_divide(tf.reduce_sum(tf.where(sampled, cross_entropy, 0.0)), num_sampled)
    box = tf.reduce_sum(smooth_l1(box_deltas, box_targets, RPN_BOX_BETA), axis=-1)
    box_loss = _safe_divide(tf.reduce_sum(tf.where(positive, box, 0.0)), num_sampled)
    return {"rpn_score_loss": score_loss, "rpn_box_loss": box_loss}


def box_head_losses(class_logits, box_deltas, class_targets, box_targets, valid):
    """Fast R-CNN classification and class-specific box regression losses.

    Args:
      class_logits: [B, S, K].
      box_deltas: [B, S, K, 4] class-specific predicted deltas.
      class_targets: [B, S] int, 0 for background ROIs.
      box_targets: [B, S, 4] encoded targets of each ROI's matched ground truth.
      valid: [B, S] bool, the sampled ROIs.
    Returns:
      {"frcnn_class_loss": [], "frcnn_box_loss": []} float32.
    """
    class_targets = tf.cast(class_targets, tf.int32)
    num_sampled = tf.reduce_sum(tf.cast(valid, tf.float32))
    cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.maximum(class_targets, 0), logits=tf.cast(class_logits, tf.float32))
    class_loss = _safe_divide(tf.reduce_sum(tf.where(valid, cross_entropy, 0.0)), num_sampled)
    foreground = tf.logical_and(valid, class_targets > 0)
    # The deltas of each ROI's ground-truth class: [B, S, 4].
    own_deltas = tf.gather(box_deltas, tf.maximum(class_targets, 0), axis=2, batch_dims=2)
    box = tf.reduce_sum(smooth_l1(own_deltas, box_targets, FRCNN_BOX_BETA), axis=-1)
    box_loss = _safe_divide(tf.reduce_sum(tf.where(foreground, box, 0.0)), num_sampled)
    return {"frcnn_class_loss": class_loss, "frcnn_box_loss": box_loss}


def mask_loss(mask_logits, mask_targets, class_targets, foreground):
    """Mask loss: sigmoid cross-entropy on the ground-truth class channel of foreground ROIs.

    Args:
      mask_logits: [B, S, P, P, K].
      mask_targets: [B, S, P, P] binary targets (meaningful where foreground).
      class_targets: [B, S] int ground-truth classes.
      foreground: [B, S] bool.
    Returns:
      {"mask_loss": []} float32; 0 when the batch has no foreground ROI (as the reference's
      `mask_logits.sum() * 0`).
    """
    class_targets = tf.maximum(tf.cast(class_targets, tf.int32), 0)
    logits = tf.transpose(tf.cast(mask_logits, tf.float32), [0, 1, 4, 2, 3])  # [B, S, K, P, P]
    own_logits = tf.gather(logits, class_targets, axis=2, batch_dims=2)  # [B, S, P, P]
    cross_entropy = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.cast(mask_targets, tf.float32), logits=own_logits)
    per_roi = tf.reduce_sum(cross_entropy, axis=[2, 3])
    pixels = tf.reduce_sum(tf.cast(foreground, tf.float32)) * float(
        mask_logits.shape[2] * mask_logits.shape[3])
    return {"mask_loss": _safe_divide(tf.reduce_sum(tf.where(foreground, per_roi, 0.0)), pixels)}
