"""Tests for official_maskrcnn.ops.mask_targets: hand cases, numpy resampling, XLA."""

import numpy as np
import tensorflow as tf

from official_maskrcnn.data import preprocess_ops
from official_maskrcnn.ops import mask_targets as mt


def _np_targets(crop, gt_box, roi, output_size):
    """One ROI's target by loops from the definition: bin centre -> crop index -> bilinear."""
    size = crop.shape[0]
    out = np.zeros([output_size, output_size])
    for k in range(output_size):
        cy = roi[0] + (k + 0.5) * (roi[2] - roi[0]) / output_size
        for m in range(output_size):
            cx = roi[1] + (m + 0.5) * (roi[3] - roi[1]) / output_size
            if not (gt_box[0] <= cy <= gt_box[2] and gt_box[1] <= cx <= gt_box[3]):
                continue
            u = min(max((cy - gt_box[0]) * size / (gt_box[2] - gt_box[0]) - 0.5, 0), size - 1)
            v = min(max((cx - gt_box[1]) * size / (gt_box[3] - gt_box[1]) - 0.5, 0), size - 1)
            y0, x0 = int(np.floor(u)), int(np.floor(v))
            y1, x1 = min(y0 + 1, size - 1), min(x0 + 1, size - 1)
            fy, fx = u - y0, v - x0
            out[k, m] = ((1 - fy) * (1 - fx) * crop[y0, x0] + (1 - fy) * fx * crop[y0, x1]
                         + fy * (1 - fx) * crop[y1, x0] + fy * fx * crop[y1, x1])
    return out


def _np_sample_mask(mask, roi, output_size):
    """Samples a full-image mask directly at a ROI's bin centres (pixel i centred at i + 0.5)."""
    height, width = mask.shape
    out = np.zeros([output_size, output_size])
    for k in range(output_size):
        cy = roi[0] + (k + 0.5) * (roi[2] - roi[0]) / output_size - 0.5
        for m in range(output_size):
            cx = roi[1] + (m + 0.5) * (roi[3] - roi[1]) / output_size - 0.5
            u, v = min(max(cy, 0), height - 1), min(max(cx, 0), width - 1)
            y0, x0 = int(np.floor(u)), int(np.floor(v))
            y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
            fy, fx = u - y0, v - x0
            out[k, m] = ((1 - fy) * (1 - fx) * mask[y0, x0] + (1 - fy) * fx * mask[y0, x1]
                         + fy * (1 - fx) * mask[y1, x0] + fy * fx * mask[y1, x1])
    return out


def _ellipse_mask():
    """[64, 80] mask of an ellipse, and its tight box in continuous corners."""
    yy, xx = np.mgrid[0:64, 0:80] + 0.5
    mask = (((yy - 30) / 18) ** 2 + ((xx - 38) / 27) ** 2 <= 1).astype(np.uint8)
    rows, cols = np.nonzero(mask)
    box = np.array([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1], np.float32)
    return mask, box


class MaskTargetsTest(tf.test.TestCase):

    def _crop(self, mask, box, size=112):
        return preprocess_ops.crop_and_resize_masks(mask[None], box[None], size).numpy()[0]

    def test_roi_equal_gt_matches_direct_resampling(self):
        mask, box = _ellipse_mask()
        crop = self._crop(mask, box)
        rois = np.stack([box, box + np.array([-3, 2, 4, 5], np.float32)])
        targets = mt.mask_targets(crop[None, None], box[None, None], rois[None],
                                  np.zeros([1, 2], np.int32)).numpy()[0]
        for target, roi in zip(targets, rois):
            direct = _np_sample_mask(mask.astype(np.float64), roi, 28)
            # Two resamplings (mask -> 112 crop -> 28) vs one: equal away from the 0.5 contour.
            clear = np.abs(direct - 0.5) > 0.15
            self.assertAllEqual(target[clear], (direct >= 0.5)[clear])
            self.assertGreater(clear.mean(), 0.9)
            self.assertGreater(target.sum(), 100)
        # The roi == gt target is the crop itself downsampled: it touches all four box sides.
        self.assertTrue(targets[0][:, 12:16].any(axis=1).all())

    def test_left_half_roi_hand_computed(self):
        # gt box x in [0, 8] with an 8-pixel crop: crop pixel j is centred at j + 0.5. The ROI
        # x in [0, 4] with 4 bins samples exactly the crop's columns 0..3; y in [0, 8] with 4
        # bins samples between rows 2i and 2i + 1 (their mean).
        rng = np.random.default_rng(0)
        crop = (rng.random([8, 8]) > 0.5).astype(np.float32)
        gt_box = np.array([0, 0, 8, 8], np.float32)
        roi = np.array([0, 0, 8, 4], np.float32)
        target = mt.mask_targets(crop[None, None], gt_box[None, None], roi[None, None],
                                 np.zeros([1, 1], np.int32), output_size=4).numpy()[0, 0]
        expected = 0.5 * (crop[0::2, :4] + crop[1::2, :4]) >= 0.5
        self.assertAllEqual(target, expected.astype(np.float32))

    def test_left_half_of_a_real_mask(self):
        mask, box = _ellipse_mask()
        crop = self._crop(mask, box)
        left = box.copy()
        left[3] = 0.5 * (box[1] + box[3])
        target = mt.mask_targets(crop[None, None], box[None, None], left[None, None],
                                 np.zeros([1, 1], np.int32)).numpy()[0, 0]
        direct = _np_sample_mask(mask.astype(np.float64), left, 28)
        clear = np.abs(direct - 0.5) > 0.15
        self.assertAllEqual(target[clear], (direct >= 0.5)[clear])
        # The ellipse's centre column is inside the left half: the right edge is mostly filled.
        self.assertGreater(target[:, -1].sum(), 10)

    def test_roi_larger_than_gt_is_zero_outside(self):
        crop = np.ones([16, 16], np.float32)
        gt_box = np.array([10, 10, 20, 20], np.float32)
        roi = np.array([0, 0, 30, 30], np.float32)
        target = mt.mask_targets(crop[None, None], gt_box[None, None], roi[None, None],
                                 np.zeros([1, 1], np.int32)).numpy()[0, 0]
        centres = (np.arange(28) + 0.5) * 30 / 28
        inside = (centres >= 10) & (centres <= 20)
        self.assertAllEqual(np.flatnonzero(inside), np.arange(9, 19))
        self.assertAllEqual(target, np.outer(inside, inside).astype(np.float32))
        small = mt.mask_targets(crop[None, None], gt_box[None, None], roi[None, None],
                                np.zeros([1, 1], np.int32), output_size=3).numpy()[0, 0]
        self.assertAllEqual(small, [[0, 0, 0], [0, 1, 0], [0, 0, 0]])

    def test_random_against_numpy_eager_and_xla(self):
        rng = np.random.default_rng(1)
        batch, instances, rois, size = 2, 3, 6, 16
        crops = rng.random([batch, instances, size, size]).astype(np.float32)
        crops[1, 2] = -1.0  # a padding row
        gt_boxes = np.sort(rng.uniform(0, 100, [batch, instances, 2, 2]), axis=2)
        gt_boxes = gt_boxes.transpose(0, 1, 3, 2).reshape(batch, instances, 4)
        gt_boxes = gt_boxes[..., [0, 2, 1, 3]].astype(np.float32)  # [ymin, xmin, ymax, xmax]
        gt_boxes[1, 2] = -1.0
        matched = rng.integers(0, instances, [batch, rois]).astype(np.int32)
        matched[1, :2] = 2  # ROIs matched to padding
        matched[0, 0] = -1  # a background ROI's "no match"
        jitter = rng.uniform(-10, 10, [batch, rois, 4]).astype(np.float32)
        roi_boxes = np.take_along_axis(gt_boxes, np.maximum(matched, 0)[..., None], 1) + jitter
        out = mt.mask_targets(crops, gt_boxes, roi_boxes, matched, output_size=14).numpy()
        xla = tf.function(mt.mask_targets, jit_compile=True)(
            crops, gt_boxes, roi_boxes, matched, output_size=14).numpy()
        self.assertAllEqual(out, xla)
        self.assertEqual(out.shape, (batch, rois, 14, 14))
        self.assertAllEqual(out[1, :2], np.zeros([2, 14, 14]))
        for b in range(batch):
            for s in range(rois):
                g = max(matched[b, s], 0)
                if b == 1 and g == 2:
                    continue
                values = _np_targets(crops[b, g], gt_boxes[b, g], roi_boxes[b, s], 14)
                clear = np.abs(values - 0.5) > 1e-4
                self.assertAllEqual(out[b, s][clear], (values >= 0.5)[clear])
                self.assertGreater(clear.mean(), 0.98)

    def test_degenerate_rois_and_boxes_are_finite(self):
        crops = np.full([1, 2, 8, 8], -1.0, np.float32)
        crops[0, 0] = 1.0
        gt_boxes = np.array([[[5, 5, 5, 5], [-1, -1, -1, -1]]], np.float32)
        rois = np.array([[[5, 5, 5, 5], [3, 3, 3, 9], [-1, -1, -1, -1]]], np.float32)
        matched = np.array([[0, 0, 1]], np.int32)
        out = mt.mask_targets(crops, gt_boxes, rois, matched).numpy()
        self.assertFalse(np.any(np.isnan(out)))
        self.assertAllEqual(out[0, 2], np.zeros([28, 28]))
        self.assertTrue(np.all((out == 0) | (out == 1)))
