"""Tests for official_maskrcnn.ops.rpn_targets: a hand-derived case and XLA on a real anchor set."""

import numpy as np
import tensorflow as tf

from official_maskrcnn.ops import anchors as anchors_lib
from official_maskrcnn.ops import box_ops, rpn_targets
from tests.ops.test_matching import numpy_match

POS, NEG, IGN = rpn_targets.POSITIVE, rpn_targets.NEGATIVE, rpn_targets.IGNORE

# A 64x64 image; [ymin, xmin, ymax, xmax] inclusive corners, 32x32 anchors unless noted.
HAND_ANCHORS = np.array([
    [0, 0, 31, 31],    # 0: identical to gt 0, IoU 1 -> positive.
    [32, 32, 63, 63],  # 1: gt 1's best anchor, IoU 576 / 1024 = 0.5625 -> positive (low quality).
    [-8, 40, 23, 71],  # 2: crosses the top and right borders -> ignored (IoU 0 with all gt).
    [0, 32, 31, 63],   # 3: IoU 0 with gt 0 and 1 -> negative; equals the padding row's box.
    [16, 16, 47, 47],  # 4: IoU 256 / 1792 = 0.14 with gt 0, 256 / 1344 = 0.19 with gt 1 -> neg.
    [0, 8, 31, 39],    # 5: IoU 768 / 1280 = 0.6 with gt 0 (not its best) -> between, ignored.
], np.float32)
HAND_GT_BOXES = np.array([
    [[0, 0, 31, 31], [32, 32, 55, 55], [0, 32, 31, 63]],  # Row 2 is padding (class -1).
    [[-1, -1, -1, -1], [-1, -1, -1, -1], [-1, -1, -1, -1]],  # No gt at all.
], np.float32)
HAND_GT_CLASSES = np.array([[3, 1, -1], [-1, -1, -1]], np.int32)
HAND_IMAGE_SIZE = np.array([[64, 64], [64, 64]], np.int32)


def _numpy_encode_yxyx(gt, anchor):
    """maskrcnn-benchmark's BoxCoder.encode with weights 1, numpy, one box, -> (dx, dy, dw, dh)."""
    gh, gw = gt[2] - gt[0] + 1, gt[3] - gt[1] + 1
    ah, aw = anchor[2] - anchor[0] + 1, anchor[3] - anchor[1] + 1
    return np.array([(gt[1] + 0.5 * gw - anchor[1] - 0.5 * aw) / aw,
                     (gt[0] + 0.5 * gh - anchor[0] - 0.5 * ah) / ah,
                     np.log(gw / aw), np.log(gh / ah)], np.float32)


def _numpy_iou(gt, anchors):
    """[I, 4] x [N, 4] -> [I, N] IoU with the +1 convention, numpy."""
    g, a = gt[:, None, :], anchors[None, :, :]
    inter_h = np.maximum(np.minimum(g[..., 2], a[..., 2]) - np.maximum(g[..., 0], a[..., 0]) + 1, 0)
    inter_w = np.maximum(np.minimum(g[..., 3], a[..., 3]) - np.maximum(g[..., 1], a[..., 1]) + 1, 0)
    inter = inter_h * inter_w
    area_g = (g[..., 2] - g[..., 0] + 1) * (g[..., 3] - g[..., 1] + 1)
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    return inter / (area_g + area_a - inter)


class RpnTargetsHandTest(tf.test.TestCase):

    def _run(self, **kwargs):
        return rpn_targets.rpn_targets(HAND_ANCHORS, HAND_GT_BOXES, HAND_GT_CLASSES,
                                       HAND_IMAGE_SIZE, tf.constant([1, 2]), **kwargs)

    def test_hand_labels(self):
        out = self._run()
        self.assertAllEqual(out["labels"], [[POS, POS, IGN, NEG, NEG, IGN],
                                            [NEG, NEG, IGN, NEG, NEG, NEG]])
        self.assertAllEqual(out["matched_gt_indices"][0], [0, 1, -1, -1, -1, -2])
        self.assertAllEqual(out["num_positives"], [2, 0])
        self.assertAllEqual(out["num_negatives"], [2, 5])

    def test_hand_box_targets(self):
        box_targets = self._run()["box_targets"].numpy()
        expected = np.zeros([2, 6, 4], np.float32)
        expected[0, 0] = _numpy_encode_yxyx(HAND_GT_BOXES[0, 0], HAND_ANCHORS[0])  # zeros.
        expected[0, 1] = _numpy_encode_yxyx(HAND_GT_BOXES[0, 1], HAND_ANCHORS[1])
        self.assertAllClose(expected[0, 1], [-0.125, -0.125, np.log(0.75), np.log(0.75)])
        self.assertAllClose(box_targets, expected, atol=1e-6)
        coder = box_ops.BoxCoder(weights=box_ops.RPN_BOX_CODER_WEIGHTS)
        self.assertAllClose(box_targets[0, :2],
                            coder.encode(HAND_GT_BOXES[0, :2], HAND_ANCHORS[:2]))
        self.assertTrue(np.all(np.isfinite(box_targets)))

    def test_border_anchor_kept_with_negative_straddle(self):
        out = self._run(straddle_thresh=-1)
        self.assertAllEqual(out["labels"][:, 2], [NEG, NEG])
        # A smaller image hides anchor 1 (ymax 63 >= 60), so gt 1 has no positive left; gt 1's
        # best anchor stays anchor 1 (the matcher sees every anchor, as the reference).
        out = rpn_targets.rpn_targets(HAND_ANCHORS, HAND_GT_BOXES, HAND_GT_CLASSES,
                                      [[60, 64], [64, 64]], tf.constant([1, 2]))
        self.assertAllEqual(out["labels"][0], [POS, IGN, IGN, NEG, NEG, IGN])

    def test_subsampling(self):
        # 2 samples at 50%: one of the two positives and one of the two negatives of image 0;
        # image 1 has no positive, so 2 of its 5 negatives.
        seen = set()
        for s in range(20):
            out = rpn_targets.rpn_targets(HAND_ANCHORS, HAND_GT_BOXES, HAND_GT_CLASSES,
                                          HAND_IMAGE_SIZE, tf.constant([s, 0]),
                                          batch_size_per_image=2)
            labels = out["labels"].numpy()
            self.assertAllEqual(out["num_positives"], [1, 0])
            self.assertAllEqual(out["num_negatives"], [1, 2])
            self.assertEqual(np.sum(labels[0, :2] == POS), 1)
            self.assertEqual(np.sum(labels[0, 3:5] == NEG), 1)
            self.assertAllEqual(labels[0, [2, 5]], [IGN, IGN])
            self.assertEqual(labels[1, 2], IGN)
            box_targets = out["box_targets"].numpy()
            self.assertAllEqual(box_targets[labels != POS], np.zeros([11, 4]))
            seen.add(tuple(labels[0]))
        self.assertGreater(len(seen), 1, "the sampled anchors never change with the seed")


class RpnTargetsRealisticTest(tf.test.TestCase):

    def test_xla_matches_eager_and_numpy_rules(self):
        anchors = tf.concat(list(anchors_lib.multilevel_anchors(256, 256).values()), axis=0)
        num_anchors = anchors.shape[0]
        rng = np.random.default_rng(0)
        batch, num_gt = 3, 6
        ymin = rng.uniform(0, 180, [batch, num_gt])
        xmin = rng.uniform(0, 180, [batch, num_gt])
        gt_boxes = np.stack([ymin, xmin, ymin + rng.uniform(4, 120, [batch, num_gt]),
                             xmin + rng.uniform(4, 120, [batch, num_gt])], -1).astype(np.float32)
        gt_classes = rng.integers(1, 81, [batch, num_gt]).astype(np.int32)
        gt_classes[0, 4:] = -1
        gt_classes[2] = -1  # An image without gt.
        gt_boxes[gt_classes <= 0] = -1.0
        image_size = np.array([[256, 200], [180, 256], [256, 256]], np.int32)
        seed = tf.constant([5, 6])

        eager = rpn_targets.rpn_targets(anchors, gt_boxes, gt_classes, image_size, seed)
        compiled = tf.function(rpn_targets.rpn_targets, jit_compile=True)(
            anchors, gt_boxes, gt_classes, image_size, seed)
        for key in ("labels", "matched_gt_indices", "num_positives", "num_negatives"):
            self.assertAllEqual(compiled[key], eager[key], msg=key)
        self.assertAllClose(compiled["box_targets"], eager["box_targets"], atol=1e-5)

        labels = eager["labels"].numpy()
        self.assertEqual(labels.shape, (batch, num_anchors))
        self.assertTrue(np.all(np.isfinite(eager["box_targets"].numpy())))
        anchors_np = anchors.numpy()
        for b in range(batch):
            valid = gt_classes[b] > 0
            matches = numpy_match(_numpy_iou(gt_boxes[b], anchors_np), valid, 0.7, 0.3, True)
            height, width = image_size[b]
            visible = ((anchors_np[:, 0] >= 0) & (anchors_np[:, 1] >= 0)
                       & (anchors_np[:, 2] < height) & (anchors_np[:, 3] < width))
            positive = (matches >= 0) & visible
            negative = (matches == -1) & visible
            num_pos = min(positive.sum(), 128)
            num_neg = min(negative.sum(), 256 - num_pos)
            self.assertEqual(np.sum(labels[b] == POS), num_pos)
            self.assertEqual(np.sum(labels[b] == NEG), num_neg)
            self.assertTrue(np.all(positive[labels[b] == POS]))
            self.assertTrue(np.all(negative[labels[b] == NEG]))
            pos = np.flatnonzero(labels[b] == POS)
            expected = np.stack([_numpy_encode_yxyx(gt_boxes[b, matches[p]], anchors_np[p])
                                 for p in pos]) if pos.size else np.zeros([0, 4])
            self.assertAllClose(eager["box_targets"].numpy()[b, pos], expected, atol=1e-4)
        self.assertAllEqual(eager["num_positives"][2], 0)
        self.assertGreater(int(eager["num_positives"][0]), 0)


if __name__ == "__main__":
    tf.test.main()
