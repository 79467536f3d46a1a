"""Matching of predictions (anchors, proposals) to padded ground truth, as maskrcnn-benchmark.

Shape legend: `...` any leading batch dimensions (e.g. B images); N ground-truth rows per image
(padded, I in the callers' vocabulary); M predictions (anchors or proposals) per image.

The IoU matrix is gt-major, [..., N, M], as the reference's `boxlist_iou(target, anchors)`.
Ground truth is padded to a static N; a validity mask [..., N] says which rows are real.
Outputs have static shapes and no data-dependent Python branching, so the matcher runs under XLA.
"""

import tensorflow as tf

# Special values of `matches`; every valid match is a gt index >= 0.
BELOW_LOW_THRESHOLD = -1  # best IoU < low_threshold: a negative (background) candidate.
BETWEEN_THRESHOLDS = -2  # low_threshold <= best IoU < high_threshold: ignored.

# Padded (invalid) gt rows get this IoU so that they can never be the best match of a prediction;
# real IoUs are in [0, 1].
_INVALID_IOU = -1.0


class Matcher:
    """Assigns each prediction the gt it overlaps most, as maskrcnn-benchmark's `Matcher`.

    For each prediction p: matches[p] = argmax_gt iou[gt, p] if that IoU >= high_threshold,
    BETWEEN_THRESHOLDS if low_threshold <= IoU < high_threshold, BELOW_LOW_THRESHOLD below.

    With `allow_low_quality_matches`, the reference's `set_low_quality_matches_`: for each valid gt
    g, every prediction whose IoU with g equals g's highest IoU over all predictions (ties
    included) gets its ORIGINAL best match back, argmax_gt iou[gt, p] (which may be a gt other
    than g), whatever the thresholds say. As in the reference this includes a gt whose highest
    IoU is 0 (it overlaps no prediction): then every prediction with IoU 0 with it is restored.
    Real gt boxes always overlap some anchor, so this only matters for degenerate boxes.

    Padded gt rows are never matched and take no part in the low-quality rule; an image without
    valid gt gets BELOW_LOW_THRESHOLD everywhere (the reference raises instead).
    Argmax ties between gt rows go to the lowest gt index.

    The RPN uses (0.7, 0.3, True), the ROI heads (0.5, 0.5, False).
    """

    def __init__(self, high_threshold, low_threshold, allow_low_quality_matches=False):
        """Args:
          high_threshold: python float, IoU at or above which a prediction is matched.
          low_threshold: python float <= high_threshold, IoU below which it is a negative.
          allow_low_quality_matches: python bool, the reference's low-quality rule (see above).
        """
        if not 0.0 <= low_threshold <= high_threshold:
            raise ValueError(f"Matcher: expected 0 <= low_threshold <= high_threshold, found "
                             f"low_threshold={low_threshold}, high_threshold={high_threshold}.")
        self.high_threshold = float(high_threshold)
        self.low_threshold = float(low_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, iou, gt_valid):
        """Matches predictions to gt.

        Args:
          iou: [..., N, M] float IoU of every gt row with every prediction (values in [0, 1]).
          gt_valid: [..., N] bool, True for real gt rows, False for padding.
        Returns:
          matches: [..., M] int32, a gt index in [0, N) of a valid row, BELOW_LOW_THRESHOLD or
            BETWEEN_THRESHOLDS.
        """
        iou = tf.cast(iou, tf.float32)
        gt_valid = tf.cast(gt_valid, tf.bool)
        valid_rows = gt_valid[..., :, None]  # [..., N, 1]
        masked_iou = tf.where(valid_rows, iou, _INVALID_IOU)  # [..., N, M]

        best_iou = tf.reduce_max(masked_iou, axis=-2)  # [..., M]
        best_gt = tf.argmax(masked_iou, axis=-2, output_type=tf.int32)  # [..., M]
        any_valid = tf.reduce_any(gt_valid, axis=-1, keepdims=True)  # [..., 1]

        matches = best_gt
        matches = tf.where(best_iou < self.high_threshold, BETWEEN_THRESHOLDS, matches)
        matches = tf.where(best_iou < self.low_threshold, BELOW_LOW_THRESHOLD, matches)

        if self.allow_low_quality_matches:
            # Highest IoU of each valid gt over all predictions; exact equality below is safe as
            # both sides come from the same tensor (the reference compares the same way).
            best_per_gt = tf.reduce_max(masked_iou, axis=-1, keepdims=True)  # [..., N, 1]
            is_best_for_a_gt = tf.logical_and(masked_iou == best_per_gt, valid_rows)
            restore = tf.reduce_any(is_best_for_a_gt, axis=-2)  # [..., M]
            matches = tf.where(restore, best_gt, matches)

        # Without valid gt, argmax would point at a padded row: nothing can match.
        return tf.where(any_valid, matches, BELOW_LOW_THRESHOLD)
