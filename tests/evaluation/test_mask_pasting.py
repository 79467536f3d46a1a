"""Tests for official_maskrcnn.evaluation.mask_pasting's C paster (`_mask_rle`): exact equality
with an independent float32 numpy evaluation of every pixel (torch's order of operations) and with
pycocotools' encode / area / toBbox of that mask, on random, adversarial and degenerate cases."""

import numpy as np
import tensorflow as tf
from pycocotools import mask as mask_util

from official_maskrcnn.evaluation import _mask_rle, mask_pasting

F32 = np.float32


def _taps(out_size, in_size, dst):
    """torch's bilinear source taps (align_corners=False) in float32, one op at a time."""
    scale = F32(in_size) / F32(out_size)
    src = np.maximum(scale * (dst.astype(F32) + F32(0.5)) - F32(0.5), F32(0))
    low = np.minimum(src.astype(np.int64), in_size - 1)
    high = low + (low < in_size - 1)
    frac = src - low.astype(F32)
    return low, high, F32(1) - frac, frac


def float32_paste(mask, int_box, height, width, threshold):
    """Every pixel of the pasted mask by numpy elementwise float32 ops (each rounded: no fused
    multiply-add), x interpolation first, as torch's bilinear kernel."""
    side = mask.shape[0] + 2
    padded = np.zeros((side, side), F32)
    padded[1:-1, 1:-1] = mask
    x0, y0, x1, y1 = (int(v) for v in int_box)
    image = np.zeros((height, width), np.uint8)
    cols = np.arange(max(x0, 0), min(x1 + 1, width))
    rows = np.arange(max(y0, 0), min(y1 + 1, height))
    if cols.size == 0 or rows.size == 0:
        return image
    xl, xh, xw0, xw1 = _taps(max(x1 - x0 + 1, 1), side, cols - x0)
    yl, yh, yw0, yw1 = _taps(max(y1 - y0 + 1, 1), side, rows - y0)
    along_x = xw0 * padded[:, xl] + xw1 * padded[:, xh]  # [S, w]
    values = yw0[:, None] * along_x[yl] + yw1[:, None] * along_x[yh]  # [h, w]
    image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = values > F32(threshold)
    return image


class NativePasteTest(tf.test.TestCase):

    def assert_matches_float32(self, masks, boxes_xyxy, height, width, threshold=0.5):
        masks = np.asarray(masks, F32)
        int_boxes = mask_pasting.expanded_int_boxes(boxes_xyxy, masks.shape[1])
        pasted = mask_pasting.pasted_masks(masks, boxes_xyxy, height, width, threshold)
        self.assertLen(pasted, len(masks))
        for t, result in enumerate(pasted):
            expected = float32_paste(masks[t], int_boxes[t], height, width, threshold)
            rle = mask_util.encode(np.asfortranarray(expected))
            context = f"detection {t}, box {int_boxes[t].tolist()}, image {height}x{width}"
            self.assertEqual(result.rle, {"size": [height, width],
                                          "counts": rle["counts"].decode("ascii")}, context)
            self.assertEqual(result.area, int(expected.sum()), context)
            self.assertEqual(result.bbox, mask_util.toBbox(rle).tolist(), context)
        return pasted

    def test_random_masks_and_boxes(self):
        rng = np.random.default_rng(5)
        for case in range(40):
            height, width = (int(v) for v in rng.integers(1, 90, 2))
            num = int(rng.integers(1, 8))
            x0 = rng.uniform(-40, width + 5, num)
            y0 = rng.uniform(-40, height + 5, num)
            if case % 4 == 0:  # boxes spanning the whole height: runs merge across columns
                y0 = np.full(num, -3.0)
            size = rng.uniform(0, 120, (num, 2))
            boxes = np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], 1)
            if case % 4 == 0:
                boxes[:, 3] = height + 3.0
            masks = rng.random((num, 28, 28))
            masks[0] = rng.random() > 0.3  # large constant regions
            self.assert_matches_float32(masks, boxes, height, width)

    def test_values_at_the_threshold(self):
        # Values a few float32 ulps from the threshold, constant masks equal to it, and steps:
        # the segments that the paster writes whole must still be decided exactly.
        rng = np.random.default_rng(6)
        threshold = F32(0.5)
        ulps = rng.integers(-3, 4, (6, 28, 28))
        near = np.nextafter(threshold, F32(2)) * (ulps > 0) + np.nextafter(
            threshold, F32(-2)) * (ulps < 0) + threshold * (ulps == 0)
        near = near.astype(F32)
        near[1] = threshold
        near[2] = np.nextafter(threshold, F32(2))
        near[3, :, :14] = 1.0
        near[3, :, 14:] = threshold
        boxes = np.array([[2, 3, 60, 40], [0, 0, 70, 50], [-5, -5, 30, 90], [10, 1, 12, 60],
                          [3, 3, 3.2, 3.3], [5, 8, 200, 9]], F32)
        self.assert_matches_float32(near, boxes, 55, 75, threshold)

    def test_other_thresholds_sizes_and_values(self):
        rng = np.random.default_rng(7)
        boxes = np.array([[1, 2, 30, 25], [-10, -10, 50, 60], [4, 4, 4, 4]], F32)
        for threshold in (0.0, -0.25, 1.0, 0.999, 1e-7):
            self.assert_matches_float32(rng.random((3, 28, 28)), boxes, 40, 45, threshold)
        for mask_size in (1, 2, 14, 56):
            self.assert_matches_float32(rng.random((3, mask_size, mask_size)), boxes, 40, 45)
        wild = rng.normal(0, 3, (3, 28, 28))  # logit-like values, far outside [0, 1]
        self.assert_matches_float32(wild, boxes, 40, 45)

    def test_one_pixel_images_and_thin_images(self):
        rng = np.random.default_rng(8)
        boxes = np.array([[-2, -2, 3, 3], [0, 0, 0, 0], [-1, 0, 40, 1]], F32)
        for height, width in ((1, 1), (1, 37), (41, 1)):
            self.assert_matches_float32(rng.random((3, 28, 28)) + 0.3, boxes, height, width)

    def test_large_image(self):
        masks = np.random.default_rng(9).random((2, 28, 28))
        masks[1] = 1.0
        boxes = np.array([[-50, -50, 1400, 1000], [100.5, 200.25, 900.75, 640.5]], F32)
        pasted = self.assert_matches_float32(masks, boxes, 900, 1300)
        # A full mask covers its "+1" box [100.5, 900.75] x [200.25, 640.5] to within a pixel.
        x, y, w, h = pasted[1].bbox
        self.assertEqual((x, y), (100, 200))
        self.assertAllClose([w, h], [801.25, 441.25], atol=1.0)

    def test_no_detections_and_empty_masks(self):
        self.assertEqual(mask_pasting.pasted_masks(np.zeros((0, 28, 28)), np.zeros((0, 4)), 10,
                                                   20), [])
        self.assertEqual(mask_pasting.paste_masks(np.zeros((0, 28, 28)), np.zeros((0, 4)), 10,
                                                  20).shape, (0, 10, 20))
        (empty,) = mask_pasting.pasted_masks(np.zeros((1, 28, 28)), [[2, 2, 8, 8]], 10, 20)
        self.assertEqual((empty.area, empty.bbox), (0, [0, 0, 0, 0]))
        self.assertEqual(mask_util.decode({"size": [10, 20], "counts": empty.rle["counts"]}).sum(),
                         0)

    def test_bad_inputs(self):
        masks = np.ones((2, 28, 28), F32)
        with self.assertRaisesRegex(ValueError, r"masks should be \[T, M, M\]"):
            mask_pasting.pasted_masks(masks[:, :, :5], [[0, 0, 5, 5]] * 2, 10, 10)
        with self.assertRaisesRegex(ValueError, "2 masks but 3 boxes"):
            mask_pasting.pasted_masks(masks, [[0, 0, 5, 5]] * 3, 10, 10)
        with self.assertRaisesRegex(ValueError, "image size 0 x 10"):
            mask_pasting.pasted_masks(masks, [[0, 0, 5, 5]] * 2, 0, 10)
        boxes = np.zeros((2, 4), np.int64)
        # The C function checks what it is given, whoever calls it.
        with self.assertRaisesRegex(ValueError, "masks: expected a C-contiguous 3-d array of "
                                    "4-byte items"):
            _mask_rle.paste_rles(masks.astype(np.float64), boxes, 10, 10, 0.5)
        with self.assertRaisesRegex(ValueError, "boxes: expected"):
            _mask_rle.paste_rles(masks, boxes.astype(np.int32), 10, 10, 0.5)
        with self.assertRaisesRegex(ValueError, r"2 masks need boxes \[2, 4\], found \[1, 4\]"):
            _mask_rle.paste_rles(masks, boxes[:1], 10, 10, 0.5)
        with self.assertRaisesRegex(ValueError, "not C-contiguous"):
            _mask_rle.paste_rles(np.ones((2, 28, 56), F32)[:, :, ::2], boxes, 10, 10, 0.5)
        with self.assertRaisesRegex(ValueError, "too large"):
            _mask_rle.paste_rles(masks, boxes, 2**40, 2**40, 0.5)


class RleAreaBboxTest(tf.test.TestCase):
    """`_mask_rle.rle_area_bbox` (the fast back end's mask areas and boxes) against pycocotools'
    `area` and `toBbox`."""

    def assert_like_pycocotools(self, binary_masks):
        rles = [mask_util.encode(np.asfortranarray(m, dtype=np.uint8)) for m in binary_masks]
        as_text = [{"size": rle["size"], "counts": rle["counts"].decode("ascii")} for rle in rles]
        for given in (rles, as_text):  # counts as bytes or str
            ours = _mask_rle.rle_area_bbox(given)
            self.assertEqual([area for area, _ in ours],
                             [int(mask_util.area(rle)) for rle in rles])
            self.assertEqual([box for _, box in ours],
                             [mask_util.toBbox(rle).tolist() for rle in rles])

    def test_random_and_special_masks(self):
        rng = np.random.default_rng(10)
        masks = [rng.random((h, w)) > p for h, w, p in ((7, 9, 0.5), (30, 20, 0.95),
                                                        (1, 50, 0.7), (50, 1, 0.7))]
        masks += [np.zeros((6, 8)), np.ones((6, 8)), np.eye(5), np.eye(5)[::-1]]
        corner = np.zeros((9, 9))
        corner[-1, -1] = 1  # the last pixel set: counts end with ones
        spanning = np.zeros((9, 9))
        spanning[6:, 2] = spanning[:3, 3] = 1  # one run across a column boundary
        masks += [corner, spanning]
        self.assert_like_pycocotools(masks)

    def test_pasted_masks(self):
        rng = np.random.default_rng(11)
        boxes = rng.uniform(-20, 90, (30, 2))
        boxes = np.concatenate([boxes, boxes + rng.uniform(0, 80, (30, 2))], 1)
        pasted = mask_pasting.pasted_masks(rng.random((30, 28, 28)), boxes, 70, 90)
        ours = _mask_rle.rle_area_bbox([p.rle for p in pasted])
        self.assertEqual(ours, [(p.area, [float(v) for v in p.bbox]) for p in pasted])

    def test_bad_rles(self):
        good = {"size": [4, 5], "counts": "d0"}  # 20 zeros
        self.assertEqual(_mask_rle.rle_area_bbox([good]), [(0, [0.0, 0.0, 0.0, 0.0])])
        for rle, message in (
                ({"size": [4, 5], "counts": "d0 "}, "RLE 1 .*a character outside"),
                ({"size": [4, 5], "counts": "d"}, "RLE 1 .*ending inside a count"),
                ({"size": [4, 6], "counts": "d0"}, r"RLE 1 \(size 4 x 6\): counts that do not"),
                ({"size": [4, 5], "counts": [20]}, "RLE 1: 'counts' should be compressed"),
                ({"counts": "d0"}, "RLE 1: expected a dict with 'size'"),
                ("d0", "RLE 1: expected a dict")):
            with self.assertRaisesRegex(ValueError, message):
                _mask_rle.rle_area_bbox([good, rle])


if __name__ == "__main__":
    tf.test.main()
