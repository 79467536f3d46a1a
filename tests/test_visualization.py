"""Tests for official_maskrcnn.visualization: blended masks, outlines, labels, colours (no TF)."""

import subprocess
import sys
import unittest

import numpy as np

from official_maskrcnn import visualization

GRAY = 128
HEIGHT, WIDTH = 64, 96
ALPHA = 0.45


def gray_image():
    return np.full((HEIGHT, WIDTH, 3), GRAY, np.uint8)


def rectangle_mask(y0, y1, x0, x1):
    """[H, W] bool, True on rows y0..y1 and columns x0..x1 (inclusive)."""
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[y0:y1 + 1, x0:x1 + 1] = True
    return mask


def box_region(box):
    """[H, W] bool, True inside the inclusive box [x1, y1, x2, y2]."""
    x1, y1, x2, y2 = box
    return rectangle_mask(y1, y2, x1, x2)


def outline(box, width):
    """[H, W] bool: the `width` innermost rings of the box's pixels."""
    x1, y1, x2, y2 = box
    inner = rectangle_mask(y1 + width, y2 - width, x1 + width, x2 - width)
    return box_region(box) & ~inner


class DrawDetectionsTest(unittest.TestCase):

    def setUp(self):
        # Two instances: A's mask lies inside its box, B's mask spills 3 columns out of it.
        self.boxes = np.array([[10, 8, 40, 40], [52, 20, 80, 50]], np.float32)
        self.masks = np.stack([rectangle_mask(15, 35, 15, 35), rectangle_mask(25, 45, 56, 83)])

    def draw(self, **kwargs):
        image = gray_image()
        drawn = visualization.draw_detections(image, self.boxes, self.masks,
                                              **dict(dict(line_width=1), **kwargs))
        np.testing.assert_array_equal(image, gray_image())  # the input is not modified
        self.assertEqual((drawn.shape, drawn.dtype), ((HEIGHT, WIDTH, 3), np.uint8))
        return drawn

    def test_mask_pixels_are_the_colour_blended_at_alpha(self):
        drawn = self.draw()
        for t in range(2):
            color = np.array(visualization.color_for(t), np.float64)
            expected = np.rint((1 - ALPHA) * GRAY + ALPHA * color)
            inside = self.masks[t] & ~outline(self.boxes[t].astype(int), 1)
            self.assertGreater(inside.sum(), 300)
            np.testing.assert_allclose(drawn[inside], np.broadcast_to(expected, (inside.sum(), 3)),
                                       atol=1)

    def test_overlapping_masks_blend_in_order(self):
        masks = np.stack([rectangle_mask(20, 30, 20, 30), rectangle_mask(25, 35, 25, 35)])
        drawn = visualization.draw_detections(gray_image(), np.zeros((2, 4)) - 10, masks,
                                              alpha=ALPHA)
        first, second = (np.array(visualization.color_for(t), np.float64) for t in range(2))
        under = (1 - ALPHA) * GRAY + ALPHA * first
        np.testing.assert_allclose(drawn[28, 28], np.rint((1 - ALPHA) * under + ALPHA * second),
                                   atol=1)
        np.testing.assert_allclose(drawn[21, 21], np.rint(under), atol=1)

    def test_pixels_outside_every_mask_and_box_are_unchanged(self):
        drawn = self.draw()
        touched = self.masks.any(0) | box_region(self.boxes[0].astype(int)) | box_region(
            self.boxes[1].astype(int))
        self.assertGreater((~touched).sum(), 3000)
        np.testing.assert_array_equal(drawn[~touched], GRAY)
        # Inside box A but outside its mask and outline: unchanged too (no label drawn).
        x1, y1, x2, y2 = self.boxes[0].astype(int)
        self.assertEqual(drawn[y1 + 2, x1 + 2].tolist(), [GRAY] * 3)

    def test_outline_pixels_have_the_box_colour_and_grow_inward(self):
        for width in (1, 3):
            drawn = self.draw(line_width=width)
            for t in range(2):
                ring = outline(self.boxes[t].astype(int), width)
                np.testing.assert_array_equal(
                    drawn[ring], np.broadcast_to(visualization.color_for(t), (ring.sum(), 3)))
            x1, y1, x2, y2 = self.boxes[0].astype(int)
            self.assertEqual(drawn[y1 + 3, x1 - 1].tolist(), [GRAY] * 3)  # outside: untouched
            self.assertEqual(drawn[y1 + 3, x1 + width].tolist(), [GRAY] * 3)  # next ring in

    def test_two_instances_get_different_colours(self):
        drawn = self.draw()
        x1a, y1a = self.boxes[0, :2].astype(int)
        x1b, y1b = self.boxes[1, :2].astype(int)
        self.assertNotEqual(drawn[y1a, x1a].tolist(), drawn[y1b, x1b].tolist())
        self.assertNotEqual(visualization.color_for(0), visualization.color_for(1))

    def test_explicit_colours_are_used(self):
        drawn = self.draw(colors=[(0, 0, 0), (255, 255, 255)])
        self.assertEqual(drawn[8, 10].tolist(), [0, 0, 0])
        self.assertEqual(drawn[20, 52].tolist(), [255, 255, 255])
        self.assertEqual(drawn[25, 25].tolist(), [70, 70, 70])  # round(0.55 * 128)

    def test_labels_sit_on_a_filled_background_above_the_box_or_inside_at_the_top(self):
        boxes = np.array([[10, 30, 60, 60], [70, 0, 90, 40]], np.float32)  # B touches the top
        drawn = visualization.draw_detections(gray_image(), boxes, None,
                                              ["ellipse 0.87", "box 0.50"], line_width=1)
        color_a, color_b = (np.array(visualization.color_for(t)) for t in range(2))
        above_a = drawn[18:30, 10:40]
        self.assertGreater((above_a == color_a).all(-1).sum(), 40)  # the filled background
        text = ~(above_a == color_a).all(-1) & ~(above_a == GRAY).all(-1)
        self.assertGreater(text.sum(), 5)  # and text of another colour on it
        inside_b = drawn[1:12, 71:89]
        self.assertGreater((inside_b == color_b).all(-1).sum(), 40)
        np.testing.assert_array_equal(drawn[45, 20], GRAY)  # inside A, below its label
        np.testing.assert_array_equal(drawn[63, 95], GRAY)  # far from everything

    def test_no_detections_give_the_image_unchanged(self):
        image = gray_image()
        image[5, 5] = (1, 2, 3)
        drawn = visualization.draw_detections(image, np.zeros((0, 4)),
                                              np.zeros((0, HEIGHT, WIDTH), bool), [])
        np.testing.assert_array_equal(drawn, image)
        self.assertIsNot(drawn, image)

    def test_uint8_masks_and_no_masks(self):
        as_uint8 = visualization.draw_detections(gray_image(), self.boxes,
                                                 self.masks.astype(np.uint8), line_width=1)
        np.testing.assert_array_equal(as_uint8, self.draw())
        boxes_only = visualization.draw_detections(gray_image(), self.boxes, None, line_width=1)
        np.testing.assert_array_equal(boxes_only[25, 25], GRAY)

    def test_scored_detections_are_coloured_by_rank_with_the_best_on_top(self):
        # Both masks cover the same square: the best detection (slot 0) is blended last.
        masks = np.stack([rectangle_mask(20, 30, 20, 30)] * 2)
        boxes = np.array([[5, 5, 60, 60], [20, 20, 30, 30]], np.float32)
        drawn = visualization.draw_scored_detections(gray_image(), boxes, masks, [2, 7],
                                                     [0.9, 0.6], {2: "ellipse"})
        expected = visualization.draw_detections(
            gray_image(), boxes[::-1], masks[::-1], ["class 7 0.60", "ellipse 0.90"],
            [visualization.color_for(1), visualization.color_for(0)])
        np.testing.assert_array_equal(drawn, expected)
        np.testing.assert_array_equal(drawn[5, 5], visualization.color_for(0))
        np.testing.assert_array_equal(drawn[20, 20], visualization.color_for(1))

    def test_bad_shapes_are_clear_errors(self):
        with self.assertRaisesRegex(ValueError, r"masks should be \[T, H, W\]"):
            visualization.draw_detections(gray_image(), self.boxes, self.masks[:, :10])
        with self.assertRaisesRegex(ValueError, "2 boxes but 2 colors and 1 labels"):
            visualization.draw_detections(gray_image(), self.boxes, self.masks, ["a"])
        with self.assertRaisesRegex(ValueError, r"\[H, W, 3\] uint8"):
            visualization.draw_detections(gray_image()[..., 0], self.boxes, None)


class HelpersTest(unittest.TestCase):

    def test_palette_is_distinct_and_cycles(self):
        palette = [visualization.color_for(t) for t in range(len(visualization.PALETTE))]
        self.assertEqual(len(set(palette)), len(palette))
        self.assertEqual(visualization.color_for(len(palette)), visualization.color_for(0))

    def test_label_text(self):
        self.assertEqual(visualization.format_label("ellipse", np.float32(0.8749)),
                         "ellipse 0.87")

    def test_module_does_not_import_tensorflow(self):
        code = ("import sys, official_maskrcnn.visualization; "
                "print('tensorflow' in sys.modules)")
        output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout
        self.assertEqual(output.strip(), "False")


if __name__ == "__main__":
    unittest.main()
