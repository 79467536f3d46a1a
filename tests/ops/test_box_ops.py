"""Tests for official_maskrcnn.ops.box_ops against hand values and a numpy reference coder."""

import math

import numpy as np
import tensorflow as tf

from official_maskrcnn.ops import box_ops
from tests import numerics


def _round_trip_atol(boxes):
    """Tolerance of encode -> decode in float32: 8 ulps of the largest coordinate.

    The round trip is about ten float32 roundings, each within half an ulp of an intermediate
    no larger than the largest coordinate (centres, widths), and exp(log(w / w_a)) turns the
    absolute error of the log (~1 ulp of 1) into ~1 ulp of relative error of the width: ~6
    ulps at most; 8 leave room. Seen: 1.5 ulps (AMD EPYC).
    """
    return numerics.ulps(boxes, 8)


def _numpy_encode(gt_xyxy, ex_xyxy, weights):
    """maskrcnn-benchmark's BoxCoder.encode in numpy, x1y1x2y2, from its definition."""
    ex_w = ex_xyxy[:, 2] - ex_xyxy[:, 0] + 1
    ex_h = ex_xyxy[:, 3] - ex_xyxy[:, 1] + 1
    ex_cx = ex_xyxy[:, 0] + 0.5 * ex_w
    ex_cy = ex_xyxy[:, 1] + 0.5 * ex_h
    gt_w = gt_xyxy[:, 2] - gt_xyxy[:, 0] + 1
    gt_h = gt_xyxy[:, 3] - gt_xyxy[:, 1] + 1
    gt_cx = gt_xyxy[:, 0] + 0.5 * gt_w
    gt_cy = gt_xyxy[:, 1] + 0.5 * gt_h
    wx, wy, ww, wh = weights
    return np.stack([wx * (gt_cx - ex_cx) / ex_w, wy * (gt_cy - ex_cy) / ex_h,
                     ww * np.log(gt_w / ex_w), wh * np.log(gt_h / ex_h)], axis=1)


def _numpy_decode(codes, boxes_xyxy, weights, clip=math.log(1000.0 / 16)):
    """maskrcnn-benchmark's BoxCoder.decode in numpy, x1y1x2y2, from its definition."""
    widths = boxes_xyxy[:, 2] - boxes_xyxy[:, 0] + 1
    heights = boxes_xyxy[:, 3] - boxes_xyxy[:, 1] + 1
    ctr_x = boxes_xyxy[:, 0] + 0.5 * widths
    ctr_y = boxes_xyxy[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = codes[:, 0] / wx, codes[:, 1] / wy
    dw = np.minimum(codes[:, 2] / ww, clip)
    dh = np.minimum(codes[:, 3] / wh, clip)
    cx, cy = dx * widths + ctr_x, dy * heights + ctr_y
    w, h = np.exp(dw) * widths, np.exp(dh) * heights
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w - 1, cy + 0.5 * h - 1], axis=1)


def _random_boxes_yxyx(rng, n, min_side=8.0, max_side=200.0):
    """[n, 4] float32 boxes with sides in [min_side, max_side] pixels (+1 convention).

    The default side ratio stays below 200 / 8 = 25 < 1000 / 16, so decoding never clips.
    """
    ymin = rng.uniform(0, 500, n)
    xmin = rng.uniform(0, 500, n)
    h = rng.uniform(min_side, max_side, n)
    w = rng.uniform(min_side, max_side, n)
    return np.stack([ymin, xmin, ymin + h - 1, xmin + w - 1], axis=1).astype(np.float32)


def _yxyx_to_xyxy(boxes):
    return np.asarray(boxes, np.float64)[..., [1, 0, 3, 2]]


class IouTest(tf.test.TestCase):

    def _check_eager_and_xla(self, a, b, expected):
        xla_iou = tf.function(box_ops.pairwise_iou, jit_compile=True)
        for fn in (box_ops.pairwise_iou, xla_iou):
            self.assertAllClose(fn(tf.constant(a, tf.float32), tf.constant(b, tf.float32)),
                                expected, atol=1e-6)

    def test_hand_cases(self):
        box = [0, 0, 9, 9]               # 10 x 10 pixels (+1).
        half = [0, 0, 9, 4]              # 10 rows x 5 columns: half of it.
        disjoint = [10, 10, 19, 19]      # starts the pixel after `box` ends.
        touching = [9, 9, 18, 18]        # shares exactly one pixel with `box` (+1 convention).
        self._check_eager_and_xla(
            [box], [box, half, disjoint, touching],
            [[1.0, 0.5, 0.0, 1.0 / (100 + 100 - 1)]])

    def test_area(self):
        self.assertAllEqual(
            box_ops.box_area(tf.constant([[0, 0, 9, 4], [-1, -1, -1, -1], [5, 5, 3, 9]])),
            [50.0, 1.0, 0.0])

    def test_batched_shapes(self):
        rng = np.random.default_rng(0)
        a = _random_boxes_yxyx(rng, 2 * 5).reshape(2, 5, 4)
        b = _random_boxes_yxyx(rng, 2 * 7).reshape(2, 7, 4)
        got = box_ops.pairwise_iou(a, b)
        self.assertEqual(got.shape, (2, 5, 7))
        self.assertAllClose(got[1], box_ops.pairwise_iou(a[1], b[1]))
        # Independent numpy IoU for one pair.
        ax, bx = _yxyx_to_xyxy(a[1, 3]), _yxyx_to_xyxy(b[1, 6])
        iw = max(0.0, min(ax[2], bx[2]) - max(ax[0], bx[0]) + 1)
        ih = max(0.0, min(ax[3], bx[3]) - max(ax[1], bx[1]) + 1)
        area = lambda x: (x[2] - x[0] + 1) * (x[3] - x[1] + 1)  # noqa: E731
        expected = iw * ih / (area(ax) + area(bx) - iw * ih)
        self.assertAllClose(got[1, 3, 6], expected, atol=1e-6)

    def test_padding_and_empty_boxes_give_no_nan(self):
        padding = [-1, -1, -1, -1]       # A 1x1 box at (-1, -1) under the +1 convention.
        inverted = [5, 5, 2, 2]          # Empty: IoU 0 with anything, itself included.
        anchor = [-10, -10, 9, 9]        # 20 x 20, covers the padding pixel.
        self._check_eager_and_xla(
            [padding, inverted],
            [anchor, inverted, padding],
            [[1.0 / 400, 0.0, 1.0], [0.0, 0.0, 0.0]])

    def test_half_precision_inputs_compute_in_float32(self):
        got = box_ops.pairwise_iou(tf.constant([[0, 0, 9, 9]], tf.float16),
                                   tf.constant([[0, 0, 9, 4]], tf.bfloat16))
        self.assertEqual(got.dtype, tf.float32)
        self.assertAllClose(got, [[0.5]])


class ClipTest(tf.test.TestCase):

    def test_clip_to_image(self):
        boxes = tf.constant([[-5, -3, 25, 40], [2, 3, 4, 5]], tf.float32)
        got = box_ops.clip_boxes(boxes, tf.constant([20, 30]))
        self.assertAllEqual(got, [[0, 0, 19, 29], [2, 3, 4, 5]])

    def test_batched_image_sizes(self):
        boxes = tf.constant([[[-5, -3, 25, 40]], [[-5, -3, 25, 40]]], tf.float32)
        got = box_ops.clip_boxes(boxes, tf.constant([[20, 30], [10, 50]]))
        self.assertAllEqual(got, [[[0, 0, 19, 29]], [[0, 0, 9, 40]]])


class BoxCoderTest(tf.test.TestCase):

    def test_round_trip_and_numpy_reference(self):
        rng = np.random.default_rng(1)
        boxes = _random_boxes_yxyx(rng, 300)
        anchors = _random_boxes_yxyx(rng, 300)
        for weights in (box_ops.RPN_BOX_CODER_WEIGHTS, box_ops.HEAD_BOX_CODER_WEIGHTS):
            coder = box_ops.BoxCoder(weights)
            deltas = coder.encode(boxes, anchors)
            expected = _numpy_encode(_yxyx_to_xyxy(boxes), _yxyx_to_xyxy(anchors), weights)
            self.assertAllClose(deltas, expected, atol=1e-4, rtol=1e-4)
            decoded = coder.decode(deltas, anchors)
            # Coordinates reach 700 px, where one float32 ulp is 6e-5.
            self.assertAllClose(decoded, boxes, atol=_round_trip_atol(boxes), rtol=0)

    def test_round_trip_small_boxes(self):
        rng = np.random.default_rng(2)
        boxes = _random_boxes_yxyx(rng, 100, min_side=1.0, max_side=30.0)
        anchors = _random_boxes_yxyx(rng, 100, min_side=1.0, max_side=30.0)
        coder = box_ops.BoxCoder()
        self.assertAllClose(coder.decode(coder.encode(boxes, anchors), anchors), boxes,
                            atol=_round_trip_atol(boxes), rtol=0)

    def test_decode_matches_numpy_eager_and_xla(self):
        rng = np.random.default_rng(3)
        anchors = _random_boxes_yxyx(rng, 50)
        deltas = rng.normal(0.0, 2.0, (50, 4)).astype(np.float32)
        deltas[0, 2] = 50.0              # Clipped: dw / 5 = 10 > log(1000 / 16).
        coder = box_ops.BoxCoder((10.0, 10.0, 5.0, 5.0))
        expected_xyxy = _numpy_decode(deltas.astype(np.float64), _yxyx_to_xyxy(anchors),
                                      coder.weights)
        expected = expected_xyxy[:, [1, 0, 3, 2]]
        xla_decode = tf.function(coder.decode, jit_compile=True)
        for fn in (coder.decode, xla_decode):
            self.assertAllClose(fn(deltas, anchors), expected, atol=1e-3, rtol=1e-5)

    def test_huge_dw_is_clipped(self):
        coder = box_ops.BoxCoder((1.0, 1.0, 1.0, 1.0))
        anchor = tf.constant([[0.0, 0.0, 15.0, 15.0]])  # 16 x 16, centre (8, 8).
        got = coder.decode(tf.constant([[0.0, 0.0, 100.0, 0.0]]), anchor).numpy()[0]
        # Width = 16 * exp(log(1000 / 16)) = 1000: x1 = 8 - 500 = -492, x2 = 8 + 500 - 1 = 507.
        self.assertAllClose(got, [0.0, -492.0, 15.0, 507.0], atol=1e-3)

    def test_hand_encode(self):
        coder = box_ops.BoxCoder((10.0, 10.0, 5.0, 5.0))
        anchor = tf.constant([[0.0, 0.0, 9.0, 19.0]])     # h 10, w 20, centre (y 5, x 10).
        gt = tf.constant([[5.0, 2.0, 14.0, 41.0]])        # h 10, w 40, centre (y 10, x 22).
        # dx = 10 * 12 / 20 = 6, dy = 10 * 5 / 10 = 5, dw = 5 * log 2, dh = 0.
        self.assertAllClose(coder.encode(gt, anchor), [[6.0, 5.0, 5.0 * math.log(2.0), 0.0]])

    def test_class_specific_broadcast(self):
        coder = box_ops.BoxCoder()
        proposals = tf.constant(_random_boxes_yxyx(np.random.default_rng(4), 6))
        deltas = tf.random.stateless_normal([6, 81, 4], seed=[1, 2])
        got = coder.decode(deltas, proposals[:, None, :])
        self.assertEqual(got.shape, (6, 81, 4))
        self.assertAllClose(got[:, 7], coder.decode(deltas[:, 7], proposals))

    def test_padding_gives_no_nan(self):
        coder = box_ops.BoxCoder()
        anchors = tf.constant([[0.0, 0.0, 15.0, 15.0]] * 3)
        gt = tf.constant([[-1.0, -1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0], [9.0, 9.0, 2.0, 2.0]])
        deltas = coder.encode(gt, anchors)
        self.assertAllEqual(tf.math.is_finite(deltas), tf.ones([3, 4], tf.bool))
        self.assertAllEqual(tf.math.is_finite(coder.decode(deltas, anchors)),
                            tf.ones([3, 4], tf.bool))

    def test_rejects_bad_weights(self):
        with self.assertRaisesRegex(ValueError, "expected 4 weights"):
            box_ops.BoxCoder((1.0, 1.0))
