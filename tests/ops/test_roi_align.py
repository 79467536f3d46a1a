"""Tests of official_maskrcnn.ops.roi_align against an independent numpy reference kernel.

Shape legend: B images, R ROIs, H, W feature-map size, C channels, P output size.
"""

import numpy as np
import tensorflow as tf

from official_maskrcnn.ops import roi_align as roi_align_lib
from tests import numerics


def _bilinear_legacy(feature, y, x):
    """One sample of maskrcnn-benchmark's legacy kernel, written from its definition.

    Args:
      feature: [H, W, C] numpy array.
      y, x: Python floats, the sample position in feature cells.
    Returns:
      [C] float64.
    """
    height, width = feature.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feature.shape[-1])
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * feature[y_low, x_low] + hy * lx * feature[y_low, x_high]
            + ly * hx * feature[y_high, x_low] + ly * lx * feature[y_high, x_high])


def _roi_align_numpy(features, boxes, output_size, spatial_scale, sampling_ratio=2):
    """Python loops over images, boxes, bins and samples. features [B, H, W, C], boxes [B, R, 4]
    [ymin, xmin, ymax, xmax] pixels -> [B, R, P, P, C] float64."""
    features = np.asarray(features, np.float64)
    num_images, num_boxes = boxes.shape[:2]
    out = np.zeros((num_images, num_boxes, output_size, output_size, features.shape[-1]))
    for b in range(num_images):
        for r in range(num_boxes):
            ymin, xmin, ymax, xmax = [float(v) * spatial_scale for v in boxes[b, r]]
            bin_h = max(ymax - ymin, 1.0) / output_size
            bin_w = max(xmax - xmin, 1.0) / output_size
            for ph in range(output_size):
                for pw in range(output_size):
                    total = 0.0
                    for iy in range(sampling_ratio):
                        y = ymin + (ph + (iy + 0.5) / sampling_ratio) * bin_h
                        for ix in range(sampling_ratio):
                            x = xmin + (pw + (ix + 0.5) / sampling_ratio) * bin_w
                            total = total + _bilinear_legacy(features[b], y, x)
                    out[b, r, ph, pw] = total / sampling_ratio**2
    return out


def _float32_atol(features, boxes, spatial_scale):
    """How far float32 ROIAlign may lie from the float64 reference.

    The op computes each sample position in float32, within ~2 ulps of the largest coordinate
    (in feature pixels) per axis; a bilinear sample moved by d changes by up to d times the
    largest step between neighbouring features. The weighted sum of 4 x 4 samples adds ~16
    roundings of the largest feature. Random N(0, 1) features have steps of ~5, so position
    rounding dominates (a fixed 1e-5 was 2x from failing on an AMD EPYC).
    """
    features = np.asarray(features, np.float64)
    steps = max(np.abs(np.diff(features, axis=1)).max(), np.abs(np.diff(features, axis=2)).max())
    coordinates = np.abs(np.asarray(boxes, np.float64)) * spatial_scale
    return 4 * numerics.ulps(coordinates, 1) * steps + numerics.ulps(features, 16)


def _random_boxes(rng, num_images, image_height, image_width):
    """[B, R, 4] pixel boxes of every awkward kind, plus random ones."""
    fixed = [
        [4.0, 6.0, 30.0, 40.0],  # inside
        [-12.0, -9.0, 10.0, 14.0],  # partly outside, top left
        [image_height - 8.0, image_width - 10.0, image_height + 15.0, image_width + 20.0],
        [0.0, 0.0, image_height - 1.0, image_width - 1.0],  # the whole image, inclusive corners
        [0.0, 0.0, float(image_height), float(image_width)],  # the whole image, continuous
        [10.0, 10.0, 10.5, 11.0],  # tiny: clamped to one feature cell
        [20.0, 20.0, 20.0, 20.0],  # degenerate
        [image_height - 1.0, 3.0, image_height - 1.0, 9.0],  # on the bottom border
        [-30.0, -30.0, -10.0, -5.0],  # entirely outside: mostly zeros
    ]
    out = []
    for _ in range(num_images):
        corners = rng.uniform(-15.0, [image_height + 15.0, image_width + 15.0], size=(7, 2, 2))
        corners = np.sort(corners, axis=1).reshape(7, 4)
        out.append(np.concatenate([np.array(fixed), corners], axis=0))
    return np.stack(out).astype(np.float32)


class RoiAlignTest(tf.test.TestCase):

    def _compare_random(self, output_size, spatial_scale, jit_compile=False):
        rng = np.random.default_rng(output_size)
        features = rng.normal(size=(2, 13, 17, 3)).astype(np.float32)
        stride = 1.0 / spatial_scale
        boxes = _random_boxes(rng, 2, 13 * stride, 17 * stride)

        @tf.function(jit_compile=jit_compile)
        def fn(f, b):
            return roi_align_lib.roi_align(f, b, output_size, spatial_scale)

        got = fn(tf.constant(features), tf.constant(boxes))
        self.assertEqual(got.shape, (2, boxes.shape[1], output_size, output_size, 3))
        self.assertEqual(got.dtype, tf.float32)
        want = _roi_align_numpy(features, boxes, output_size, spatial_scale)
        self.assertAllClose(got, want, atol=_float32_atol(features, boxes, spatial_scale),
                            rtol=0)

    def test_matches_numpy_kernel_box_head(self):
        self._compare_random(output_size=7, spatial_scale=0.25)

    def test_matches_numpy_kernel_mask_head(self):
        self._compare_random(output_size=14, spatial_scale=0.125)

    def test_matches_numpy_kernel_under_xla(self):
        self._compare_random(output_size=7, spatial_scale=0.5, jit_compile=True)

    def test_partly_outside_box_has_zero_samples_but_keeps_denominator(self):
        # Box y from -2 to 6 on an 8x8 map at stride 1, P = 2: bin 0 samples y = -1 and 1. The
        # kernel drops a sample only when y < -1: at -1.0 exactly it is clamped to row 0.
        features = np.ones((1, 8, 8, 1), np.float32)
        boxes = np.array([[[-2.0, 0.0, 6.0, 2.0]]], np.float32)
        got = roi_align_lib.roi_align(features, boxes, 2, 1.0)
        self.assertAllClose(got[0, 0, :, 0, 0], [1.0, 1.0])
        self.assertAllClose(got, _roi_align_numpy(features, boxes, 2, 1.0))
        # From -5 to 3: bin 0 samples y = -4 and -2, both dropped, yet the bin still divides by
        # 4 samples, so it is 0 rather than undefined.
        boxes = np.array([[[-5.0, 0.0, 3.0, 2.0]]], np.float32)
        got = roi_align_lib.roi_align(features, boxes, 2, 1.0)
        self.assertAllClose(got[0, 0, :, 0, 0], [0.0, 1.0])

    def test_constant_map_gives_constant(self):
        features = np.full((2, 10, 12, 4), 3.25, np.float32)
        boxes = np.array([[[0.0, 0.0, 39.0, 47.0], [5.0, 7.0, 6.0, 8.0]],
                          [[10.0, 3.0, 30.0, 44.0], [12.0, 12.0, 12.0, 12.0]]], np.float32)
        got = roi_align_lib.roi_align(features, boxes, 7, 0.25)
        self.assertAllClose(got, np.full((2, 2, 7, 7, 4), 3.25))

    def test_linear_ramp_gives_bin_centres(self):
        # f(y, x) = x in channel 0 and y in channel 1: bilinear interpolation is exact on linear
        # functions and the mean of the two samples of a bin is its centre.
        height, width = 16, 20
        yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        features = np.stack([xx, yy], axis=-1)[None].astype(np.float32)
        box = np.array([2.0, 3.0, 12.0, 17.0])  # inside [0, H - 1] x [0, W - 1], stride 1
        got = roi_align_lib.roi_align(features, box[None, None], 7, 1.0).numpy()[0, 0]
        centres = (np.arange(7) + 0.5) / 7
        want_x = box[1] + centres * (box[3] - box[1])
        want_y = box[0] + centres * (box[2] - box[0])
        self.assertAllClose(got[..., 0], np.broadcast_to(want_x[None, :], (7, 7)), atol=1e-5)
        self.assertAllClose(got[..., 1], np.broadcast_to(want_y[:, None], (7, 7)), atol=1e-5)

    def test_no_half_pixel_shift(self):
        # A box [0, 0, 2, 2] at stride 1 with P = 1 on f = x: legacy samples at 0.5 and 1.5
        # average to 1.0; the aligned variant (shift by -0.5) would give 0.5.
        features = np.tile(np.arange(4, dtype=np.float32)[None, :, None], (4, 1, 1))[None]
        got = roi_align_lib.roi_align(features, np.array([[[0.0, 0.0, 2.0, 2.0]]]), 1, 1.0)
        self.assertAllClose(got[0, 0, 0, 0], [1.0])

    def test_bfloat16_round_trip(self):
        features = tf.fill([1, 6, 6, 2], tf.constant(2.0, tf.bfloat16))
        got = roi_align_lib.roi_align(features, tf.constant([[[0.0, 0.0, 20.0, 20.0]]]), 7, 0.25)
        self.assertEqual(got.dtype, tf.bfloat16)
        self.assertAllClose(tf.cast(got, tf.float32), np.full((1, 1, 7, 7, 2), 2.0))

    def test_gradient_reaches_features_not_boxes(self):
        features = tf.constant(np.random.default_rng(0).normal(size=(1, 8, 8, 2)), tf.float32)
        # Boxes well inside: every sample's four weights sum to 1, so d(sum)/d(features) sums to
        # the number of outputs (R * P * P * C).
        boxes = tf.constant([[[4.0, 4.0, 20.0, 24.0], [8.0, 2.0, 12.0, 6.0]]])
        with tf.GradientTape() as tape:
            tape.watch([features, boxes])
            total = tf.reduce_sum(roi_align_lib.roi_align(features, boxes, 7, 0.25))
        grad_features, grad_boxes = tape.gradient(total, [features, boxes])
        self.assertAllClose(tf.reduce_sum(grad_features), 2 * 7 * 7 * 2, rtol=1e-5)
        # The reference's ROIAlign backward returns no gradient for the ROIs.
        self.assertIsNone(grad_boxes)

    def test_rejects_adaptive_sampling_ratio(self):
        with self.assertRaisesRegex(ValueError, "sampling_ratio must be a positive int, got 0"):
            roi_align_lib.roi_align(tf.zeros([1, 4, 4, 1]), tf.zeros([1, 1, 4]), 7, 1.0, 0)


class FpnLevelTest(tf.test.TestCase):

    def test_hand_areas(self):
        # Sides counted the reference's way: xmax - xmin + 1 (inclusive corners).
        sides_and_levels = [(224, 4), (112, 3), (448, 5), (10, 2), (2000, 5), (223, 3),
                            (1, 2), (896, 5), (56, 2), (111, 2)]
        boxes = np.array([[5.0, 7.0, 5.0 + side - 1, 7.0 + side - 1]
                          for side, _ in sides_and_levels], np.float32)
        got = roi_align_lib.assign_fpn_levels(boxes)
        self.assertAllEqual(got, [level for _, level in sides_and_levels])
        self.assertEqual(got.dtype, tf.int32)

    def test_rectangles_use_the_geometric_mean(self):
        # 112 x 448 (inclusive) has sqrt(area) = 224 -> level 4; 56 x 224 -> 112 -> level 3.
        boxes = np.array([[0.0, 0.0, 111.0, 447.0], [0.0, 0.0, 223.0, 55.0]], np.float32)
        self.assertAllEqual(roi_align_lib.assign_fpn_levels(boxes), [4, 3])

    def test_matches_formula_on_random_boxes(self):
        rng = np.random.default_rng(3)
        corners = np.sort(rng.uniform(0.0, 1333.0, size=(200, 2, 2)), axis=1).reshape(200, 4)
        boxes = corners.astype(np.float32)
        area = (boxes[:, 3] - boxes[:, 1] + 1) * (boxes[:, 2] - boxes[:, 0] + 1)
        want = np.clip(np.floor(4 + np.log2(np.sqrt(area) / 224 + 1e-6)), 2, 5)
        self.assertAllEqual(roi_align_lib.assign_fpn_levels(boxes[None]), want[None])

    def test_padding_box_is_finite(self):
        boxes = np.array([[-1.0, -1.0, -1.0, -1.0], [0.0, 0.0, -5.0, -5.0]], np.float32)
        self.assertAllEqual(roi_align_lib.assign_fpn_levels(boxes), [2, 2])


class MultilevelRoiAlignTest(tf.test.TestCase):

    def _pyramid(self, rng, image_size=256, channels=3):
        return {level: rng.normal(size=(2, image_size // 2**level, image_size // 2**level,
                                        channels)).astype(np.float32)
                for level in range(2, 6)}

    def _check(self, jit_compile):
        rng = np.random.default_rng(7)
        features = self._pyramid(rng)
        # Inclusive sides 20 (level 2), 120 (3), 230 (4), 460 (5, partly outside), 150 (3); in
        # image 1 a 3x3 box (2).
        boxes = np.array([
            [[10.0, 12.0, 29.0, 31.0], [30.0, 40.0, 149.0, 159.0], [0.0, 5.0, 229.0, 234.0],
             [-100.0, -120.0, 359.0, 339.0], [100.0, 90.0, 249.0, 239.0]],
            [[100.0, 60.0, 119.0, 79.0], [0.0, 0.0, 119.0, 119.0], [20.0, 10.0, 249.0, 239.0],
             [-50.0, -60.0, 409.0, 399.0], [1.0, 2.0, 3.0, 4.0]],
        ], np.float32)
        want_levels = np.array([[2, 3, 4, 5, 3], [2, 3, 4, 5, 2]])
        self.assertAllEqual(roi_align_lib.assign_fpn_levels(boxes), want_levels)

        @tf.function(jit_compile=jit_compile)
        def fn(f, b):
            return roi_align_lib.multilevel_roi_align(f, b, 7)

        got = fn({str(k): tf.constant(v) for k, v in features.items()}, tf.constant(boxes))
        self.assertEqual(got.shape, (2, 5, 7, 7, 3))
        for b in range(2):
            for r in range(5):
                level = want_levels[b, r]
                want = _roi_align_numpy(features[level][b:b + 1], boxes[b:b + 1, r:r + 1], 7,
                                        1.0 / 2**level)
                atol = _float32_atol(features[level][b], boxes[b, r], 1.0 / 2**level)
                self.assertAllClose(got[b, r], want[0, 0], atol=atol, rtol=0,
                                    msg=f"image {b} box {r} level {level}")

    def test_picks_the_assigned_level(self):
        self._check(jit_compile=False)

    def test_picks_the_assigned_level_under_xla(self):
        self._check(jit_compile=True)

    def test_levels_distinguishable_by_constant(self):
        # Level l filled with l: the pooled value names the level each box was pooled from.
        # A 1024-pixel image, so that every sample of every box lies inside its map.
        features = {level: tf.fill([1, 1024 // 2**level, 1024 // 2**level, 1], float(level))
                    for level in range(2, 6)}
        sides = [8, 150, 300, 600]
        boxes = tf.constant([[[0.0, 0.0, side - 1.0, side - 1.0] for side in sides]])
        got = roi_align_lib.multilevel_roi_align(features, boxes, 2)
        self.assertAllClose(got[0, :, 0, 0, 0], [2.0, 3.0, 4.0, 5.0])

    def test_rejects_gaps_in_levels(self):
        features = {2: tf.zeros([1, 8, 8, 1]), 4: tf.zeros([1, 2, 2, 1])}
        with self.assertRaisesRegex(ValueError, r"contiguous FPN levels, got \[2, 4\]"):
            roi_align_lib.multilevel_roi_align(features, tf.zeros([1, 1, 4]), 7)


if __name__ == "__main__":
    tf.test.main()
