"""Tests for official_maskrcnn.ops.nms against hand cases and plain-Python greedy NMS."""

import numpy as np
import tensorflow as tf

from official_maskrcnn.ops import nms


def _iou(a, b):
    """IoU of two [ymin, xmin, ymax, xmax] boxes, inclusive (+1) corners, from the definition."""
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ih * iw
    area_a = max(0.0, a[2] - a[0] + 1) * max(0.0, a[3] - a[1] + 1)
    area_b = max(0.0, b[2] - b[0] + 1) * max(0.0, b[3] - b[1] + 1)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _greedy_nms(boxes, scores, max_output, threshold, valid):
    """Greedy NMS of one problem with Python loops; ties visited by increasing index."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if not valid[i]:
            continue
        if all(_iou(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
        if len(kept) == max_output:
            break
    return kept


def _random_boxes(rng, batch, num, extent=60.0, max_side=30.0):
    """Integer boxes in a small area, so that many pairs overlap."""
    ymin = rng.integers(0, extent, size=(batch, num))
    xmin = rng.integers(0, extent, size=(batch, num))
    h = rng.integers(0, max_side, size=(batch, num))
    w = rng.integers(0, max_side, size=(batch, num))
    return np.stack([ymin, xmin, ymin + h, xmin + w], axis=-1).astype(np.float32)


def _reference_per_class(boxes, scores, score_threshold, iou_threshold, max_detections):
    """One image: per class (k >= 1) threshold + greedy NMS, then the top max_detections."""
    dets = []
    for k in range(1, scores.shape[1]):
        valid = scores[:, k] > score_threshold
        kept = _greedy_nms(boxes[:, k], scores[:, k], len(scores), iou_threshold, valid)
        dets += [(scores[i, k], k, boxes[i, k]) for i in kept]
    dets.sort(key=lambda d: -d[0])
    return dets[:max_detections]


class NonMaxSuppressionTest(tf.test.TestCase):

    def test_hand_case(self):
        boxes = np.array([[[0, 0, 9, 9],     # area 100
                           [0, 0, 9, 4],     # IoU 0.5 with box 0: kept at threshold 0.5
                           [0, 1, 9, 9],     # IoU 0.9 with box 0: suppressed
                           [50, 50, 59, 59],
                           [0, 0, 9, 9]]], np.float32)  # identical to box 0, padding below
        scores = np.array([[0.9, 0.8, 0.85, 0.1, 0.95]], np.float32)
        valid = np.array([[True, True, True, True, False]])
        indices, out_valid = nms.non_max_suppression(boxes, scores, 5, 0.5, valid)
        self.assertAllEqual(out_valid, [[True, True, True, False, False]])
        self.assertAllEqual(indices, [[0, 1, 3, nms.PAD_INDEX, nms.PAD_INDEX]])
        # A lower threshold suppresses the IoU 0.5 box too.
        indices, out_valid = nms.non_max_suppression(boxes, scores, 5, 0.49, valid)
        self.assertAllEqual(indices[0, :2], [0, 3])
        self.assertAllEqual(out_valid[0], [True, True, False, False, False])

    def test_max_output_truncates_and_pads(self):
        boxes = np.array([[[0, 0, 9, 9], [20, 20, 29, 29], [40, 40, 49, 49]]], np.float32)
        scores = np.array([[0.1, 0.3, 0.2]], np.float32)
        indices, valid = nms.non_max_suppression(boxes, scores, 2, 0.5)
        self.assertAllEqual(indices, [[1, 2]])
        self.assertAllEqual(valid, [[True, True]])
        indices, valid = nms.non_max_suppression(boxes, scores, 5, 0.5)
        self.assertAllEqual(indices, [[1, 2, 0, 0, 0]])
        self.assertAllEqual(valid, [[True, True, True, False, False]])

    def test_degenerate_and_all_invalid(self):
        # Empty boxes (side <= 0) have IoU 0 with everything: each is kept once, no NaN.
        boxes = np.array([[[5, 5, 3, 3], [5, 5, 3, 3], [0, 0, 9, 9]],
                          [[0, 0, 9, 9], [0, 0, 9, 9], [0, 0, 9, 9]]], np.float32)
        scores = np.array([[0.5, 0.4, 0.3], [0.5, 0.4, 0.3]], np.float32)
        valid = np.array([[True, True, True], [False, False, False]])
        indices, out_valid = nms.non_max_suppression(boxes, scores, 3, 0.5, valid)
        self.assertAllEqual(indices, [[0, 1, 2], [0, 0, 0]])
        self.assertAllEqual(out_valid, [[True, True, True], [False, False, False]])

    def test_ties_visit_lower_index_first(self):
        boxes = np.array([[[0, 0, 9, 9], [0, 0, 9, 9], [0, 0, 9, 9]]], np.float32)
        scores = np.array([[0.5, 0.7, 0.7]], np.float32)
        indices, valid = nms.non_max_suppression(boxes, scores, 3, 0.5)
        self.assertAllEqual(indices[0, :1], [1])
        self.assertAllEqual(valid, [[True, False, False]])

    def test_random_against_python_eager_and_xla(self):
        rng = np.random.default_rng(0)
        batch, num, max_output = 3, 60, 25
        boxes = _random_boxes(rng, batch, num)
        scores = rng.permutation(batch * num).reshape(batch, num).astype(np.float32)
        valid = rng.random((batch, num)) > 0.2
        xla = tf.function(nms.non_max_suppression, jit_compile=True)
        for threshold in (0.3, 0.7):
            indices, out_valid = nms.non_max_suppression(boxes, scores, max_output, threshold,
                                                         valid)
            xla_indices, xla_valid = xla(boxes, scores, max_output, threshold, valid)
            self.assertAllEqual(indices, xla_indices)
            self.assertAllEqual(out_valid, xla_valid)
            for b in range(batch):
                expected = _greedy_nms(boxes[b].tolist(), scores[b].tolist(), max_output,
                                       threshold, valid[b])
                count = len(expected)
                self.assertAllEqual(indices[b, :count], expected)
                self.assertAllEqual(out_valid[b], np.arange(max_output) < count)
                self.assertAllEqual(indices[b, count:], np.zeros(max_output - count))

    def test_tiles_give_the_greedy_result_on_hard_cases(self):
        """Any tile size gives the one-box-at-a-time result: suppression chains that cross tile
        boundaries, exact score ties, degenerate boxes, invalid rows, N not a multiple of T."""
        rng = np.random.default_rng(7)
        batch, num = 4, 45
        # Problem 0: a chain of boxes shifted by 2 px, each suppressing only its neighbours,
        # in score order, so every kept box depends on the previous decision (longest chain).
        chain = np.array([[0, 2 * i, 19, 2 * i + 19] for i in range(num)], np.float32)
        # Problem 1: random overlapping boxes with many exact score ties.
        ties = _random_boxes(rng, 1, num)[0]
        # Problem 2: degenerate (inverted and zero-side) boxes mixed with duplicates.
        degenerate = _random_boxes(rng, 1, num, max_side=3.0)[0]
        degenerate[::3, 2] = degenerate[::3, 0] - 2.0
        # Problem 3: duplicates of a few boxes (IoU 1 among copies).
        copies = _random_boxes(rng, 1, 5)[0][rng.integers(0, 5, num)]
        boxes = np.stack([chain, ties, degenerate, copies])
        scores = np.stack([np.linspace(1.0, 0.0, num), rng.integers(0, 4, num),
                           rng.random(num), rng.integers(0, 2, num)]).astype(np.float32)
        valid = rng.random((batch, num)) > 0.15
        valid[0] = True
        xla = tf.function(nms.non_max_suppression, jit_compile=True)
        for threshold in (0.0, 0.5, 0.75):
            expected = [_greedy_nms(boxes[b].tolist(), scores[b].tolist(), num, threshold,
                                    valid[b]) for b in range(batch)]
            for max_output in (num + 5, 7):
                for tile_size in (1, 7, 256):
                    indices, out_valid = nms.non_max_suppression(
                        boxes, scores, max_output, threshold, valid, tile_size=tile_size)
                    for b in range(batch):
                        want = expected[b][:max_output]
                        count = len(want)
                        with self.subTest(threshold=threshold, max_output=max_output,
                                          tile_size=tile_size, problem=b):
                            self.assertAllEqual(indices[b, :count], want)
                            self.assertAllEqual(out_valid[b], np.arange(max_output) < count)
                            self.assertAllEqual(indices[b, count:],
                                                np.full(max_output - count, nms.PAD_INDEX))
            xla_indices, xla_valid = xla(boxes, scores, num + 5, threshold, valid, tile_size=16)
            self.assertAllEqual(xla_indices, nms.non_max_suppression(
                boxes, scores, num + 5, threshold, valid)[0])
            self.assertAllEqual(xla_valid[0], np.arange(num + 5) < len(expected[0]))
        # The chain keeps every other box at 0.75 (shift 2 of 20: IoU 0.82 with the next).
        self.assertEqual(len(expected[0]), (num + 1) // 2)

    def test_bad_arguments(self):
        boxes = np.zeros([1, 3, 4], np.float32)
        with self.assertRaisesRegex(ValueError, "tile_size must be a positive int"):
            nms.non_max_suppression(boxes, np.zeros([1, 3], np.float32), 2, 0.5, tile_size=0)
        dynamic = tf.function(lambda b, s: nms.non_max_suppression(b, s, 2, 0.5))
        with self.assertRaisesRegex(ValueError, "static candidate dimension N"):
            dynamic.get_concrete_function(tf.TensorSpec([1, None, 4]), tf.TensorSpec([1, None]))
        # No candidates at all: every slot invalid.
        indices, valid = nms.non_max_suppression(np.zeros([2, 0, 4], np.float32),
                                                 np.zeros([2, 0], np.float32), 3, 0.5)
        self.assertAllEqual(indices, np.zeros([2, 3]))
        self.assertAllEqual(valid, np.zeros([2, 3], bool))


class BatchedPerClassNmsTest(tf.test.TestCase):

    def test_hand_case(self):
        # 3 ROIs, K = 3 (background + 2 classes).
        box = np.array([0, 0, 9, 9], np.float32)
        shifted = np.array([0, 1, 9, 9], np.float32)  # IoU 0.9 with box
        far = np.array([30, 30, 39, 39], np.float32)
        boxes = np.zeros([1, 3, 3, 4], np.float32)
        boxes[0, 0, 1], boxes[0, 1, 1], boxes[0, 2, 1] = box, shifted, far
        boxes[0, 0, 2], boxes[0, 1, 2], boxes[0, 2, 2] = box, shifted, far
        scores = np.array([[[0.9, 0.6, 0.3],     # background score is ignored
                            [0.0, 0.5, 0.04],    # class 2 below the threshold
                            [0.0, 0.05, 0.2]]],  # class 1 at the threshold: dropped (strict >)
                          np.float32)
        out = nms.batched_per_class_nms(boxes, scores, max_detections=4)
        self.assertAllEqual(out["num_detections"], [3])
        self.assertAllClose(out["detection_scores"], [[0.6, 0.3, 0.2, 0.0]])
        self.assertAllEqual(out["detection_classes"], [[1, 2, 2, 0]])
        self.assertAllEqual(out["detection_valid"], [[True, True, True, False]])
        self.assertAllClose(out["detection_boxes"][0], [box, box, far, np.zeros(4)])
        # max_detections cuts the lowest-scoring detection.
        out = nms.batched_per_class_nms(boxes, scores, max_detections=2)
        self.assertAllEqual(out["detection_classes"], [[1, 2]])

    def test_random_against_python_eager_and_xla(self):
        rng = np.random.default_rng(1)
        batch, rois, classes, max_det = 2, 40, 5, 30
        boxes = _random_boxes(rng, batch, rois * classes).reshape(batch, rois, classes, 4)
        logits = rng.normal(size=(batch, rois, classes)) * 2.0
        scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        scores = scores.astype(np.float32)
        out = nms.batched_per_class_nms(boxes, scores, max_detections=max_det)
        xla = tf.function(nms.batched_per_class_nms, jit_compile=True)(
            boxes, scores, max_detections=max_det)
        for key in out:
            self.assertAllEqual(out[key], xla[key])
        for b in range(batch):
            expected = _reference_per_class(boxes[b], scores[b], 0.05, 0.5, max_det)
            count = len(expected)
            self.assertEqual(int(out["num_detections"][b]), count)
            self.assertGreater(count, 5)
            self.assertAllClose(out["detection_scores"][b, :count], [d[0] for d in expected])
            self.assertAllEqual(out["detection_classes"][b, :count], [d[1] for d in expected])
            self.assertAllClose(out["detection_boxes"][b, :count], [d[2] for d in expected])
            self.assertAllEqual(out["detection_scores"][b, count:], np.zeros(max_det - count))

    def test_padding_rois_and_no_detection(self):
        boxes = np.tile(np.array([0, 0, 9, 9], np.float32), [2, 4, 3, 1])
        scores = np.full([2, 4, 3], 0.5, np.float32)
        valid = np.array([[True, False, False, False], [False] * 4])
        out = nms.batched_per_class_nms(boxes, scores, max_detections=5, valid=valid)
        self.assertAllEqual(out["num_detections"], [2, 0])
        self.assertAllEqual(out["detection_classes"], [[1, 2, 0, 0, 0], [0] * 5])
        self.assertFalse(np.any(np.isnan(out["detection_boxes"])))
