"""Tests for official_maskrcnn.ops.matching against hand cases and a numpy reference matcher."""

import numpy as np
import tensorflow as tf

from official_maskrcnn.ops import matching

BELOW = matching.BELOW_LOW_THRESHOLD
BETWEEN = matching.BETWEEN_THRESHOLDS


def numpy_match(iou, gt_valid, high, low, allow_low_quality_matches):
    """maskrcnn-benchmark's Matcher for one image, in numpy, from its definition.

    Padded rows are dropped first (the reference has no padding); an image without valid gt gets
    BELOW_LOW_THRESHOLD everywhere.

    Args:
      iou: [N, M] gt-major IoU. gt_valid: [N] bool.
    Returns:
      [M] int64 matches.
    """
    iou = np.asarray(iou, np.float32)
    rows = np.flatnonzero(gt_valid)
    num_predictions = iou.shape[1]
    if rows.size == 0:
        return np.full([num_predictions], BELOW, np.int64)
    quality = iou[rows]
    matched_vals = quality.max(axis=0)
    all_matches = rows[quality.argmax(axis=0)]  # numpy argmax: first of ties.
    matches = all_matches.copy()
    matches[matched_vals < low] = BELOW
    matches[(matched_vals >= low) & (matched_vals < high)] = BETWEEN
    if allow_low_quality_matches:
        for g in range(quality.shape[0]):
            best = quality[g].max()
            for p in range(num_predictions):
                if quality[g, p] == best:
                    matches[p] = all_matches[p]
    return matches


class MatcherTest(tf.test.TestCase):

    def test_thresholds_without_low_quality(self):
        iou = np.array([[0.9, 0.5, 0.2, 0.69, 0.7],
                        [0.1, 0.6, 0.3, 0.0, 0.71]], np.float32)
        matches = matching.Matcher(0.7, 0.3, False)(iou, [True, True])
        self.assertAllEqual(matches, [0, BETWEEN, BETWEEN, BETWEEN, 1])
        # ROI heads: 0.5 / 0.5, nothing is "between".
        matches = matching.Matcher(0.5, 0.5, False)(iou, [True, True])
        self.assertAllEqual(matches, [0, 1, BELOW, 0, 1])

    def test_low_quality_restores_original_best_match_with_ties(self):
        # gt 0's best IoU (0.4) is reached by predictions 0 and 2 (a tie): both are restored.
        # Prediction 2's original best match is gt 1 (0.45 > 0.4), so it gets gt 1, not gt 0.
        # gt 1's best IoU 0.45 is at prediction 2 only; prediction 1 (0.3) stays BETWEEN.
        iou = np.array([[0.4, 0.1, 0.4, 0.0],
                        [0.0, 0.3, 0.45, 0.1]], np.float32)
        matches = matching.Matcher(0.7, 0.3, True)(iou, [True, True])
        self.assertAllEqual(matches, [0, BETWEEN, 1, BELOW])
        matches = matching.Matcher(0.7, 0.3, False)(iou, [True, True])
        self.assertAllEqual(matches, [BETWEEN, BETWEEN, BETWEEN, BELOW])

    def test_padding_is_never_matched_nor_low_quality(self):
        # Row 1 is padding with high IoU everywhere: it must not be matched, and its best
        # prediction (3) must not be restored; gt 0's best is prediction 0 only.
        iou = np.array([[0.2, 0.1, 0.0, 0.05],
                        [0.9, 0.95, 0.8, 0.99]], np.float32)
        matches = matching.Matcher(0.7, 0.3, True)(iou, [True, False])
        self.assertAllEqual(matches, [0, BELOW, BELOW, BELOW])

    def test_no_valid_gt(self):
        iou = np.array([[0.9, 0.0], [0.5, 0.2]], np.float32)
        for allow in (True, False):
            matches = matching.Matcher(0.7, 0.3, allow)(iou, [False, False])
            self.assertAllEqual(matches, [BELOW, BELOW])

    def test_zero_iou_gt_follows_the_reference(self):
        # A valid gt that overlaps nothing: as in the reference, every prediction with IoU 0 with
        # it ties for its best and gets its original best match back (gt 0 here, first argmax).
        iou = np.array([[0.0, 0.0, 0.8], [0.0, 0.0, 0.0]], np.float32)
        matches = matching.Matcher(0.7, 0.3, True)(iou, [True, True])
        self.assertAllEqual(matches, [0, 0, 0])

    def test_random_batched_against_numpy(self):
        rng = np.random.default_rng(0)
        batch, num_gt, num_pred = 6, 5, 40
        for high, low, allow in ((0.7, 0.3, True), (0.5, 0.5, False), (0.7, 0.3, False)):
            # Quantised IoUs make ties (per gt and per prediction) frequent.
            iou = rng.integers(0, 11, size=[batch, num_gt, num_pred]).astype(np.float32) / 10
            gt_valid = rng.random([batch, num_gt]) < 0.6
            gt_valid[0] = False  # An image without gt.
            gt_valid[1] = True
            matches = matching.Matcher(high, low, allow)(iou, gt_valid)
            self.assertEqual(matches.dtype, tf.int32)
            self.assertEqual(matches.shape, [batch, num_pred])
            expected = np.stack([numpy_match(iou[b], gt_valid[b], high, low, allow)
                                 for b in range(batch)])
            self.assertAllEqual(matches, expected)

    def test_under_xla_matches_eager(self):
        rng = np.random.default_rng(1)
        iou = tf.constant(rng.integers(0, 8, size=[3, 4, 50]).astype(np.float32) / 7)
        gt_valid = tf.constant(rng.random([3, 4]) < 0.7)
        matcher = matching.Matcher(0.7, 0.3, True)
        compiled = tf.function(matcher.__call__, jit_compile=True)
        self.assertAllEqual(compiled(iou, gt_valid), matcher(iou, gt_valid))

    def test_rejects_bad_thresholds(self):
        with self.assertRaisesRegex(ValueError, "low_threshold <= high_threshold"):
            matching.Matcher(0.3, 0.7)


if __name__ == "__main__":
    tf.test.main()
