"""Tests for official_maskrcnn.ops.roi_targets: hand case, counts, padding, numpy check, XLA."""

import numpy as np
import tensorflow as tf

from official_maskrcnn.ops import box_ops, roi_targets


def numpy_iou(a, b):
    """[N, 4] x [M, 4] -> [N, M] IoU with the +1 convention, independently of box_ops."""
    a = a[:, None, :]
    b = b[None, :, :]
    inter_h = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1,
                         0)
    inter_w = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1,
                         0)
    inter = inter_h * inter_w
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    return inter / (area_a + area_b - inter)


def random_inputs(rng, batch=2, num_proposals=600, num_gt=6, num_valid_gt=(4, 0)):
    """Proposals jittered around gt (a mix of fg and bg) plus random ones; -1 padded gt."""
    gt_boxes = -np.ones([batch, num_gt, 4], np.float32)
    gt_classes = -np.ones([batch, num_gt], np.int32)
    proposals = np.zeros([batch, num_proposals, 4], np.float32)
    for b in range(batch):
        n = num_valid_gt[b]
        yx = rng.uniform(0, 300, [n, 2])
        hw = rng.uniform(20, 150, [n, 2])
        gt_boxes[b, :n] = np.concatenate([yx, yx + hw], -1)
        gt_classes[b, :n] = rng.integers(1, 81, n)
        yx = rng.uniform(0, 400, [num_proposals, 2])
        hw = rng.uniform(10, 200, [num_proposals, 2])
        proposals[b] = np.concatenate([yx, yx + hw], -1)
        if n:
            jittered = num_proposals // 2
            src = gt_boxes[b, rng.integers(0, n, jittered)]
            scale = (src[:, 2:] - src[:, :2])[:, [0, 1, 0, 1]]
            proposals[b, :jittered] = src + rng.normal(0, 0.15, [jittered, 4]) * scale
    proposal_valid = rng.random([batch, num_proposals]) < 0.9
    return proposals, proposal_valid, gt_boxes, gt_classes


def run(inputs, seed=(3, 4), **kwargs):
    proposals, proposal_valid, gt_boxes, gt_classes = inputs
    out = roi_targets.sample_rois(
        tf.constant(proposals), tf.constant(proposal_valid), tf.constant(gt_boxes),
        tf.constant(gt_classes), tf.constant(seed, tf.int32), **kwargs)
    return {name: value.numpy() for name, value in out.items()}


class SampleRoisTest(tf.test.TestCase):

    def test_hand_case(self):
        gt = np.array([[[0, 0, 9, 9], [-1, -1, -1, -1]]], np.float32)
        classes = np.array([[3, -1]], np.int32)
        # IoU 60 / 100 = 0.6 and 30 / 100 = 0.3 under the +1 convention.
        proposals = np.array([[[0, 0, 9, 5], [0, 0, 9, 2]]], np.float32)
        valid = np.array([[True, True]])
        out = run((proposals, valid, gt, classes))
        for name, value in out.items():
            self.assertEqual(value.shape[:2], (1, 512), name)
        self.assertEqual(out["roi_valid"].sum(), 3)
        self.assertTrue(np.all(out["roi_valid"][0, :3]))
        # Compaction keeps candidate order: proposal 0, proposal 1, gt 0.
        self.assertAllEqual(out["rois"][0, :3], [[0, 0, 9, 5], [0, 0, 9, 2], [0, 0, 9, 9]])
        self.assertAllEqual(out["foreground"][0, :3], [True, False, True])
        self.assertAllEqual(out["class_targets"][0, :3], [3, 0, 3])
        self.assertAllEqual(out["matched_gt"][0, :3], [0, 0, 0])
        expected = box_ops.BoxCoder(box_ops.HEAD_BOX_CODER_WEIGHTS).encode(
            tf.constant(gt[0, [0, 0]]), tf.constant(out["rois"][0, [0, 2]])).numpy()
        self.assertAllClose(out["box_targets"][0, [0, 2]], expected)
        self.assertAllClose(out["box_targets"][0, 2], np.zeros(4))  # The gt against itself.
        self.assertAllEqual(out["box_targets"][0, 1], np.zeros(4))
        # Padding slots.
        self.assertAllEqual(out["rois"][0, 3:], np.zeros([509, 4]))
        self.assertFalse(np.any(out["foreground"][0, 3:]))
        self.assertAllEqual(out["class_targets"][0, 3:], np.zeros(509))
        self.assertAllEqual(out["box_targets"][0, 3:], np.zeros([509, 4]))

    def test_against_numpy(self):
        rng = np.random.default_rng(0)
        inputs = random_inputs(rng)
        proposals, proposal_valid, gt_boxes, gt_classes = inputs
        out = run(inputs)
        for b in range(proposals.shape[0]):
            gt_valid = gt_classes[b] > 0
            candidates = np.concatenate([proposals[b], gt_boxes[b]])
            cand_valid = np.concatenate([proposal_valid[b], gt_valid])
            if gt_valid.any():
                iou = numpy_iou(gt_boxes[b][gt_valid], candidates)
                best = iou.max(0)
            else:
                best = np.zeros(len(candidates))
            fg_avail = int(np.sum(cand_valid & (best >= 0.5)))
            bg_avail = int(np.sum(cand_valid & (best < 0.5)))
            num_fg = min(fg_avail, 128)
            num_total = min(512, num_fg + bg_avail)

            roi_valid, fg = out["roi_valid"][b], out["foreground"][b]
            self.assertEqual(fg.sum(), num_fg)
            self.assertEqual(roi_valid.sum(), num_total)
            self.assertTrue(np.all(roi_valid[:num_total]), "sampled slots come first")
            self.assertFalse(np.any(fg & ~roi_valid))
            rois = out["rois"][b][roi_valid]
            # Every sampled roi is a distinct valid candidate.
            eq = np.all(rois[:, None, :] == candidates[None, :, :], -1)  # [n, C]
            self.assertTrue(np.all((eq & cand_valid[None]).any(-1)))
            self.assertEqual(len(np.unique(np.argmax(eq & cand_valid[None], -1))), num_total)
            if gt_valid.any():
                iou = numpy_iou(gt_boxes[b][gt_valid], rois)  # [valid gt, n]
                roi_best = iou.max(0)
                roi_fg = fg[roi_valid]
                self.assertTrue(np.all(roi_best[roi_fg] >= 0.5))
                self.assertTrue(np.all(roi_best[~roi_fg] < 0.5))
                valid_index = np.nonzero(gt_valid)[0]
                expected_gt = valid_index[np.argmax(iou, 0)][roi_fg]
                self.assertAllEqual(out["matched_gt"][b][roi_valid][roi_fg], expected_gt)
                self.assertAllEqual(out["class_targets"][b][roi_valid][roi_fg],
                                    gt_classes[b][expected_gt])
                self.assertTrue(np.all(gt_valid[out["matched_gt"][b][fg]]),
                                "padded gt matched")
            self.assertAllEqual(out["class_targets"][b][~fg], np.zeros(np.sum(~fg)))
            self.assertAllEqual(out["matched_gt"][b][~fg], np.zeros(np.sum(~fg)))
            self.assertAllEqual(out["box_targets"][b][~fg], np.zeros([np.sum(~fg), 4]))
            self.assertAllEqual(out["rois"][b][~roi_valid], np.zeros([np.sum(~roi_valid), 4]))

    def test_box_targets_match_encode(self):
        rng = np.random.default_rng(1)
        inputs = random_inputs(rng)
        out = run(inputs)
        fg = out["foreground"]
        matched = np.take_along_axis(inputs[2], out["matched_gt"][..., None], 1)
        expected = box_ops.BoxCoder(box_ops.HEAD_BOX_CODER_WEIGHTS).encode(
            tf.constant(matched[fg]), tf.constant(out["rois"][fg])).numpy()
        self.assertGreater(fg.sum(), 0)
        self.assertAllClose(out["box_targets"][fg], expected, rtol=1e-5, atol=1e-5)

    def test_no_gt_image(self):
        rng = np.random.default_rng(2)
        inputs = random_inputs(rng, num_valid_gt=(0, 0))
        out = run(inputs)
        self.assertFalse(np.any(out["foreground"]))
        self.assertAllEqual(out["roi_valid"].sum(-1),
                            np.minimum(512, inputs[1].sum(-1)))
        for name, value in out.items():
            if value.dtype.kind == "f":
                self.assertTrue(np.all(np.isfinite(value)), name)
        self.assertAllEqual(out["class_targets"], np.zeros_like(out["class_targets"]))

    def test_padded_gt_never_matched(self):
        # A padding row whose -1 box would overlap a tiny proposal at the corner.
        gt = np.array([[[10, 10, 50, 50], [-1, -1, -1, -1]]], np.float32)
        classes = np.array([[1, -1]], np.int32)
        proposals = np.array([[[-1, -1, -1, -1], [-1, -1, 0, 0], [10, 10, 50, 50]]], np.float32)
        out = run((proposals, np.ones([1, 3], bool), gt, classes))
        self.assertAllEqual(out["foreground"][0, :4], [False, False, True, True])
        self.assertAllEqual(out["roi_valid"][0, :4], [True, True, True, True])
        self.assertEqual(out["roi_valid"].sum(), 4)  # Padded gt row is not a candidate.
        self.assertAllEqual(out["matched_gt"][0, :4], [0, 0, 0, 0])

    def test_determinism_and_seed(self):
        inputs = random_inputs(np.random.default_rng(3))
        first, second = run(inputs, seed=(7, 8)), run(inputs, seed=(7, 8))
        for name in first:
            self.assertAllEqual(first[name], second[name], name)
        other = run(inputs, seed=(9, 10))
        self.assertNotAllEqual(first["rois"], other["rois"])

    def test_eager_equals_xla(self):
        inputs = random_inputs(np.random.default_rng(4), num_valid_gt=(4, 2))
        args = [tf.constant(x) for x in inputs] + [tf.constant([5, 6], tf.int32)]
        eager = roi_targets.sample_rois(*args)
        compiled = tf.function(roi_targets.sample_rois, jit_compile=True)(*args)
        for name in eager:
            if eager[name].dtype.is_floating:
                self.assertAllClose(eager[name], compiled[name], rtol=1e-5, atol=1e-5,
                                    msg=name)
            else:
                self.assertAllEqual(eager[name], compiled[name], msg=name)
        # Padding path (fewer candidates than slots) under XLA too.
        small = [tf.constant(x[:, :5]) if i < 2 else tf.constant(x)
                 for i, x in enumerate(inputs)] + [args[-1]]
        eager = roi_targets.sample_rois(*small)
        compiled = tf.function(roi_targets.sample_rois, jit_compile=True)(*small)
        for name in eager:
            self.assertAllClose(eager[name], compiled[name], msg=name)


if __name__ == "__main__":
    tf.test.main()
