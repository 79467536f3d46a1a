"""Tests for official_maskrcnn.ops.anchors against hand values and Detectron's numpy geometry."""

import numpy as np
import tensorflow as tf

from official_maskrcnn.ops import anchors as anchors_lib


def _detectron_generate_anchors(stride, sizes, aspect_ratios):
    """Detectron's `generate_anchors`, re-written in numpy from its definition: [A, 4] x1y1x2y2.

    Order: ratio-major, then size (as Detectron's vstack over the ratio anchors).
    """
    def whctrs(box):
        w = box[2] - box[0] + 1
        h = box[3] - box[1] + 1
        return w, h, box[0] + 0.5 * (w - 1), box[1] + 0.5 * (h - 1)

    def mkanchors(ws, hs, x_ctr, y_ctr):
        return np.stack([x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1),
                         x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)], axis=1)

    base = np.array([1, 1, stride, stride], dtype=np.float64) - 1
    w, h, x_ctr, y_ctr = whctrs(base)
    ratios = np.asarray(aspect_ratios, dtype=np.float64)
    ws = np.round(np.sqrt(w * h / ratios))
    hs = np.round(ws * ratios)
    ratio_anchors = mkanchors(ws, hs, x_ctr, y_ctr)
    scales = np.asarray(sizes, dtype=np.float64) / stride
    out = []
    for box in ratio_anchors:
        w, h, x_ctr, y_ctr = whctrs(box)
        out.append(mkanchors(w * scales, h * scales, x_ctr, y_ctr))
    return np.concatenate(out, axis=0)


def _xyxy_to_yxyx(boxes):
    return np.asarray(boxes)[:, [1, 0, 3, 2]]


class CellAnchorsTest(tf.test.TestCase):

    def test_fpn_level2_hand_values(self):
        # Stride 4, size 32: base box (0, 0, 3, 3), w = h = 4, centre 1.5, area 16; scale 32/4 = 8.
        # ratio 0.5: ws = round(sqrt(16 / 0.5)) = round(5.66) = 6, hs = round(6 * 0.5) = 3
        #   -> 48 x 24: x = 1.5 -+ 23.5 -> [-22, 25], y = 1.5 -+ 11.5 -> [-10, 13].
        # ratio 1:   ws = 4, hs = 4 -> 32 x 32: [-14, 17] on both axes.
        # ratio 2:   ws = round(sqrt(8)) = round(2.83) = 3, hs = 6 -> 24 x 48:
        #   x = 1.5 -+ 11.5 -> [-10, 13], y = 1.5 -+ 23.5 -> [-22, 25].
        # The ratio-0.5 anchor is Detectron's well-known [-22, -10, 25, 13] (x1, y1, x2, y2).
        expected_yxyx = [[-10, -22, 13, 25], [-14, -14, 17, 17], [-22, -10, 25, 13]]
        self.assertAllEqual(anchors_lib.generate_cell_anchors(4, 32), expected_yxyx)

    def test_stride16_size32_hand_values(self):
        # Stride 16, size 32: base (0, 0, 15, 15), centre 7.5, area 256; scale 2.
        # ratio 0.5: ws = round(sqrt(512)) = round(22.63) = 23, hs = round(11.5) = 12 (half to
        #   even) -> 46 x 24: x = 7.5 -+ 22.5 -> [-15, 30], y = 7.5 -+ 11.5 -> [-4, 19].
        # ratio 1: 16 x 16 -> 32 x 32: [-8, 23].
        # ratio 2: ws = round(sqrt(128)) = round(11.31) = 11, hs = 22 -> 22 x 44:
        #   x = 7.5 -+ 10.5 -> [-3, 18], y = 7.5 -+ 21.5 -> [-14, 29].
        expected_yxyx = [[-4, -15, 19, 30], [-8, -8, 23, 23], [-14, -3, 29, 18]]
        self.assertAllEqual(anchors_lib.generate_cell_anchors(16, 32), expected_yxyx)

    def test_classic_faster_rcnn_anchor(self):
        # Detectron's docstring check (0-based): stride 16, size 128, ratio 0.5 -> 23 x 12 scaled
        # by 8 = 184 x 96 around 7.5: x1 = 7.5 - 91.5 = -84, y1 = 7.5 - 47.5 = -40.
        anchors = anchors_lib.generate_cell_anchors(16, 128, (0.5,))
        self.assertAllEqual(anchors, [[-40, -84, 55, 99]])

    def test_matches_numpy_detectron_on_all_levels(self):
        for stride, size in zip(anchors_lib.FPN_STRIDES, anchors_lib.FPN_ANCHOR_SIZES):
            expected = _xyxy_to_yxyx(_detectron_generate_anchors(stride, (size,), (0.5, 1, 2)))
            got = anchors_lib.generate_cell_anchors(stride, size)
            self.assertEqual(got.dtype, np.float32)
            self.assertAllEqual(got, expected, msg=f"stride {stride}")


class GridAnchorsTest(tf.test.TestCase):

    def test_order_is_y_x_anchor(self):
        cell = anchors_lib.generate_cell_anchors(8, 64)
        got = anchors_lib.grid_anchors(cell, 8, 3, 5).numpy()
        self.assertEqual(got.shape, (3 * 5 * 3, 4))
        expected = []
        for y in range(3):
            for x in range(5):
                for a in range(3):
                    expected.append(cell[a] + np.array([8 * y, 8 * x, 8 * y, 8 * x]))
        self.assertAllEqual(got, np.array(expected))

    def test_shift_of_one_cell(self):
        cell = anchors_lib.generate_cell_anchors(4, 32)
        got = anchors_lib.grid_anchors(cell, 4, 2, 2).numpy()
        # Index (y=1, x=0, a=1): the square anchor moved down one cell (4 px).
        self.assertAllEqual(got[(1 * 2 + 0) * 3 + 1], [-10, -14, 21, 17])

    def test_mlperf_geometry_count(self):
        # 800 x 1344 padded: 200*336 + 100*168 + 50*84 + 25*42 + 13*21 = 89,523 locations,
        # x 3 ratios = 268,569 anchors.
        levels = anchors_lib.multilevel_anchors(800, 1344)
        self.assertEqual(sorted(levels), ["2", "3", "4", "5", "6"])
        self.assertEqual(levels["6"].shape, (13 * 21 * 3, 4))
        self.assertEqual(sum(int(v.shape[0]) for v in levels.values()), 268569)
        self.assertEqual(levels["2"].dtype, tf.float32)
        # The last anchor of level 6: cell (12, 20), the ratio-2 anchor of stride 64 size 512.
        last = anchors_lib.generate_cell_anchors(64, 512)[2] + np.array([768, 1280, 768, 1280])
        self.assertAllEqual(levels["6"][-1], last)

    def test_rejects_mismatched_sizes(self):
        with self.assertRaisesRegex(ValueError, "one anchor size per stride"):
            anchors_lib.multilevel_anchors(64, 64, strides=(4, 8), sizes=(32,))


class VisibilityTest(tf.test.TestCase):

    def test_hand_cases(self):
        anchors = tf.constant([
            [0, 0, 9, 9],       # inside, touching the top-left corner: visible.
            [0, -1, 9, 9],      # xmin = -1 < 0: not visible.
            [-1, 0, 9, 9],      # ymin = -1: not visible.
            [0, 0, 19, 29],     # ymax = H - 1, xmax = W - 1: visible.
            [0, 0, 20, 29],     # ymax = H = 20, not < 20: not visible.
            [0, 0, 19, 30],     # xmax = W = 30: not visible.
        ], tf.float32)
        got = anchors_lib.anchor_visibility(anchors, tf.constant([20, 30]))
        self.assertAllEqual(got, [True, False, False, True, False, False])

    def test_straddle_threshold_and_batch(self):
        anchors = tf.constant([[-2, -2, 21, 31], [-3, 0, 10, 10]], tf.float32)
        image_size = tf.constant([[20, 30], [40, 40]])
        got = anchors_lib.anchor_visibility(anchors, image_size, straddle_thresh=2)
        # Image 0: anchor 0 has ymax 21 < 22, xmax 31 < 32 and mins -2 >= -2: visible.
        # Image 1: anchor 1 has ymin -3 < -2: not visible in either image.
        self.assertAllEqual(got, [[True, False], [True, False]])
        everything = anchors_lib.anchor_visibility(anchors, image_size, straddle_thresh=-1)
        self.assertAllEqual(everything, [[True, True], [True, True]])

    def test_under_xla(self):
        anchors = anchors_lib.multilevel_anchors(64, 96)["2"]
        fn = tf.function(anchors_lib.anchor_visibility, jit_compile=True)
        image_size = tf.constant([[50, 90], [64, 96]])
        self.assertAllEqual(fn(anchors, image_size),
                            anchors_lib.anchor_visibility(anchors, image_size))
