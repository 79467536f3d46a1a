"""Tests for official_maskrcnn.ops.mask_paste (the serving export's in-graph paste): pixel for
pixel equal to the evaluation's C paster (`mask_pasting.paste_masks`, itself held to an
independent float32 evaluation in tests/evaluation/test_mask_pasting.py) on random, near-threshold
and degenerate cases, eagerly and inside a tf.function with unknown shapes."""

import numpy as np
import tensorflow as tf

from official_maskrcnn.evaluation import mask_pasting
from official_maskrcnn.ops import mask_paste


def random_case(rng, num, height, width, quantized=False):
    masks = rng.random((num, 28, 28)).astype(np.float32)
    if quantized:  # many values exactly at or near the threshold after interpolation
        masks = (np.round(masks * 4) / 8 + 0.25).astype(np.float32)
    x1 = rng.uniform(-0.2 * width, 1.1 * width, num)
    y1 = rng.uniform(-0.2 * height, 1.1 * height, num)
    boxes = np.stack([x1, y1, x1 + rng.exponential(width / 3, num),
                      y1 + rng.exponential(height / 3, num)], axis=1).astype(np.float32)
    return masks, boxes


class MaskPasteTest(tf.test.TestCase):

    def assert_same_pixels(self, masks, boxes, height, width, threshold=0.5, paste=None):
        expected = mask_pasting.paste_masks(masks, boxes, height, width, threshold)
        got = (paste or mask_paste.paste_masks)(masks, boxes, height, width, threshold)
        got = np.asarray(got)
        self.assertEqual(got.dtype, np.uint8)
        self.assertEqual(got.shape, expected.shape)
        differing = np.argwhere(got != expected)
        self.assertEqual(differing.size, 0, f"{len(differing)} pixels differ, first "
                                            f"(detection, y, x) {differing[:5].tolist()}")

    def test_paste_boxes_equal_the_evaluations(self):
        rng = np.random.default_rng(0)
        _, boxes = random_case(rng, 500, 480, 640)
        self.assertAllEqual(mask_paste.paste_boxes(boxes, 28),
                            mask_pasting.expanded_int_boxes(boxes, 28))

    def test_random_boxes_and_masks(self):
        rng = np.random.default_rng(1)
        for trial in range(12):
            height, width = (int(v) for v in rng.integers(1, 260, 2))
            masks, boxes = random_case(rng, int(rng.integers(1, 10)), height, width,
                                       quantized=trial % 2 == 0)
            with self.subTest(trial=trial, height=height, width=width):
                self.assert_same_pixels(masks, boxes, height, width)

    def test_other_thresholds_and_saturated_masks(self):
        rng = np.random.default_rng(2)
        masks, boxes = random_case(rng, 6, 120, 90)
        masks[0] = 1.0
        masks[1] = 0.0
        for threshold in (0.0, 0.3, 0.5, 0.99):
            self.assert_same_pixels(masks, boxes, 120, 90, threshold)

    def test_degenerate_boxes(self):
        masks = np.full((5, 28, 28), 0.9, np.float32)
        boxes = np.array([[10, 10, 10, 10],     # one pixel
                          [30, 5, 20, 40],      # inverted: width clamps to 1
                          [-50, -50, -10, -10],  # wholly outside, left / top
                          [200, 200, 300, 300],  # wholly outside, right / bottom
                          [-5, -5, 100, 100]],  # larger than the image
                         np.float32)
        self.assert_same_pixels(masks, boxes, 64, 80)
        pasted = mask_paste.paste_masks(masks, boxes, 64, 80).numpy()
        self.assertEqual(pasted[2].sum() + pasted[3].sum(), 0)
        self.assertEqual(pasted[4].sum(), 64 * 80)

    def test_no_detection(self):
        pasted = mask_paste.paste_masks(np.zeros((0, 28, 28), np.float32),
                                        np.zeros((0, 4), np.float32), 7, 9)
        self.assertEqual(pasted.shape, (0, 7, 9))

    def test_in_a_function_with_unknown_shapes(self):
        paste = tf.function(mask_paste.paste_masks, input_signature=[
            tf.TensorSpec([None, 28, 28], tf.float32), tf.TensorSpec([None, 4], tf.float32),
            tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.float32)])
        rng = np.random.default_rng(3)
        for num, height, width in ((4, 50, 70), (0, 10, 10), (9, 200, 33)):
            masks, boxes = random_case(rng, num, height, width, quantized=True)
            self.assert_same_pixels(masks, boxes, height, width, 0.5, paste=lambda *a: paste(
                *(tf.constant(v) for v in a[:2]), tf.constant(a[2]), tf.constant(a[3]),
                tf.constant(a[4], tf.float32)))


if __name__ == "__main__":
    tf.test.main()
