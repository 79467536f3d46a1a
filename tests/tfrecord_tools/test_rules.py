"""Unit tests of the converter's rules and helpers, against hand-computed values."""

import io
import operator
import os

import numpy as np
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_utils

from tfrecord_tools import annotation_rules, image_codec, masks, parallel, progress
from tfrecord_tools import tally as T


def _square(x, y, size):
    return [x, y, x + size, y, x + size, y + size, x, y + size]


class AnnotationRulesTest(tf.test.TestCase):

    def clean(self, **fields):
        annotation = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20],
                      "area": 400.0, "segmentation": [_square(10, 10, 20)]}
        annotation.update(fields)
        tally = T.Tally()
        return annotation_rules.clean_annotation(annotation, 48, 64, tally), tally

    def test_box_inside_is_kept_unchanged(self):
        clean, tally = self.clean()
        self.assertEqual(clean.box_xyxy, (10.0, 10.0, 30.0, 30.0))
        self.assertEqual(dict(tally.counts), {})

    def test_box_clipped_on_every_side(self):
        clean, tally = self.clean(bbox=[-4, -2, 80, 60])
        self.assertEqual(clean.box_xyxy, (0.0, 0.0, 64.0, 48.0))
        self.assertEqual(tally.counts[T.CONVERTED_BOX_CLIPPED], 1)

    def test_rounding_noise_is_clipped_silently(self):
        clean, tally = self.clean(bbox=[0, 0, 64.0000001, 48])
        self.assertEqual(clean.box_xyxy[2], 64.0)
        self.assertEqual(dict(tally.counts), {})

    def test_degenerate_boxes(self):
        for bbox in ([10, 10, 0, 5], [10, 10, 5, -1], [70, 10, 5, 5], [10, -9, 5, 5]):
            clean, tally = self.clean(bbox=bbox)
            self.assertIsNone(clean, bbox)
            self.assertEqual(tally.counts[T.ANNOTATION_BOX_DEGENERATE], 1, bbox)

    def test_malformed_boxes(self):
        for bbox in (None, [1, 2, 3], [1, 2, 3, float("nan")], [1, 2, 3, "4"], [True, 1, 2, 3]):
            clean, tally = self.clean(bbox=bbox)
            self.assertIsNone(clean)
            self.assertEqual(tally.counts[T.ANNOTATION_BBOX_MALFORMED], 1, bbox)

    def test_polygon_parts(self):
        good = _square(10, 10, 20)
        clean, tally = self.clean(segmentation=[[1, 1, 2, 2], good, [1, 2, 3, 4, 5], []])
        self.assertEqual(clean.segmentation, [good])
        self.assertEqual(tally.counts[T.CONVERTED_POLYGON_DROPPED], 3)
        for segmentation in ([], [[1, 1, 2, 2]], None, "polygon", [[1, 1, 2, 2, 3, float("inf")]]):
            clean, tally = self.clean(segmentation=segmentation)
            self.assertIsNone(clean)
            self.assertEqual(tally.counts[T.ANNOTATION_SEGMENTATION_INVALID], 1, segmentation)

    def test_rle_checks(self):
        self.assertTrue(annotation_rules.valid_rle({"size": [48, 64], "counts": [3072]}, 48, 64))
        self.assertFalse(annotation_rules.valid_rle({"size": [48, 64], "counts": [3071]}, 48, 64))
        self.assertFalse(annotation_rules.valid_rle({"size": [64, 48], "counts": [3072]}, 48, 64))
        compressed = mask_utils.encode(np.asfortranarray(np.ones((48, 64), np.uint8)))
        compressed["counts"] = compressed["counts"].decode()
        self.assertTrue(annotation_rules.valid_rle(compressed, 48, 64))

    def test_crowd_flag_and_area(self):
        clean, _ = self.clean(iscrowd=1, area="big")
        self.assertEqual((clean.is_crowd, clean.area), (1, None))


def _compressed(mask):
    """uint8 mask [h, w] -> COCO compressed RLE as JSON holds it (counts a str)."""
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _runs(mask):
    """uint8 mask [h, w] -> column-major run lengths starting with background, by numpy alone."""
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0] + runs if flat[0] else runs


class RleRulesTest(tf.test.TestCase):
    """RLE is checked once, in the rules; anything not covering exactly the image is skipped."""

    def clean_rle(self, rle):
        annotation = {"id": 7, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20],
                      "area": 400.0, "iscrowd": 1, "segmentation": rle}
        tally = T.Tally()
        return annotation_rules.clean_annotation(annotation, 48, 64, tally), tally

    def assert_skipped(self, rle):
        clean, tally = self.clean_rle(rle)
        self.assertIsNone(clean, rle)
        self.assertEqual(dict(tally.counts), {T.ANNOTATION_SEGMENTATION_INVALID: 1}, rle)
        self.assertEqual(tally.example_ids[T.ANNOTATION_SEGMENTATION_INVALID], [7])

    def test_string_decoder_matches_pycocotools_encoder(self):
        rng = np.random.default_rng(0)
        cases = [np.zeros((48, 64), np.uint8), np.ones((48, 64), np.uint8),
                 (rng.random((48, 64)) < 0.5).astype(np.uint8),  # many short runs
                 (rng.random((300, 200)) < 0.002).astype(np.uint8)]  # long runs, big deltas
        first_pixel_set = np.zeros((48, 64), np.uint8)
        first_pixel_set[0, 0] = 1
        cases.append(first_pixel_set)
        for mask in cases:
            counts = _compressed(mask)["counts"]
            self.assertEqual(annotation_rules.rle_counts_from_string(counts), _runs(mask))
        # By hand: '0' -> 0; 'T' (36 = more | 4) then '3' (3 << 5 = 96) -> 100.
        self.assertEqual(annotation_rules.rle_counts_from_string("0T3"), [0, 100])

    def test_valid_rle_is_kept_as_run_lengths(self):
        mask = np.zeros((48, 64), np.uint8)
        mask[5:15, 30:50] = 1
        for rle in (_compressed(mask), {"size": [48, 64], "counts": _runs(mask)},
                    {"size": [48, 64], "counts": _compressed(mask)["counts"].encode()}):
            clean, tally = self.clean_rle(rle)
            self.assertEqual(dict(tally.counts), {})
            self.assertEqual(clean.segmentation, {"size": [48, 64], "counts": _runs(mask)})
            self.assertAllEqual(masks.rasterize(clean.segmentation, 48, 64), mask)

    def test_compressed_rle_of_another_size_is_skipped(self):
        # A valid 10x10 string claiming the image size: pycocotools decodes it into a 48x64
        # buffer it never fully writes, i.e. uninitialised memory.
        ten_by_ten = _compressed(np.ones((10, 10), np.uint8))["counts"]
        self.assert_skipped({"size": [48, 64], "counts": ten_by_ten})

    def test_compressed_runs_must_cover_the_image_exactly(self):
        full = _compressed(np.ones((48, 64), np.uint8))["counts"]
        short = _compressed(np.ones((47, 64), np.uint8))["counts"]
        longer = _compressed(np.ones((49, 64), np.uint8))["counts"]
        self.assertTrue(self.clean_rle({"size": [48, 64], "counts": full})[0])
        for counts in (short, longer, ""):
            self.assert_skipped({"size": [48, 64], "counts": counts})

    def test_malformed_compressed_strings_are_skipped(self):
        mask = np.zeros((48, 64), np.uint8)
        mask[5:15, 30:50] = 1
        good = _compressed(mask)["counts"]
        for counts in ("!!!", good + " ", good[:3] + "\x7f" + good[3:], "0T",  # bad char, cut
                       good[:-1],  # truncated: loses the last group of the last run
                       "hm2M[2",  # runs [3000, -3, 75]: they sum to 48 * 64, one is negative
                       "\u00e9" + good, b"\xff" + good.encode()):
            self.assert_skipped({"size": [48, 64], "counts": counts})

    def test_uncompressed_counts_rules(self):
        for counts in ([3071], [3073], [-1, 3073], [1.5, 3070.5], [True, 3071], ["3072"], [],
                       None, 3072, {"counts": [3072]}):
            self.assert_skipped({"size": [48, 64], "counts": counts})

    def test_size_must_be_the_images_height_and_width(self):
        for size in ([64, 48], [48, 64, 1], [48.0, 64.0], [True, 64], "48x64", None):
            self.assert_skipped({"size": size, "counts": [3072]})
        self.assert_skipped({"counts": [3072]})


class MasksTest(tf.test.TestCase):

    def test_polygon_rle_and_png_round_trip(self):
        polygon = masks.rasterize([_square(10, 10, 20)], 48, 64)
        self.assertEqual(polygon.shape, (48, 64))
        self.assertEqual(int(polygon.sum()), 400)  # pycocotools fills [10, 30) x [10, 30)
        self.assertEqual(int(polygon[10:30, 10:30].sum()), 400)
        rle = {"size": [48, 64], "counts": [10 * 48 + 5, 7, 48 * 64 - 10 * 48 - 12]}
        crowd = masks.rasterize(rle, 48, 64)
        self.assertEqual(int(crowd.sum()), 7)
        self.assertAllEqual(np.nonzero(crowd[:, 10])[0], np.arange(5, 12))  # column-major runs
        for mask in (polygon, crowd):
            self.assertAllEqual(masks.decode_png(masks.encode_png(mask)), mask)
            # TensorFlow reads the same PNG to the same 0/1 values.
            self.assertAllEqual(tf.io.decode_png(masks.encode_png(mask))[..., 0], mask)


class ImageCodecTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.create_tempdir().full_path
        rng = np.random.default_rng(0)
        self.rgb = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))

    def save(self, name, image, **kwargs):
        path = os.path.join(self.dir, name)
        image.save(path, **kwargs)
        return path

    def test_rgb_jpeg_bytes_are_kept(self):
        path = self.save("a.jpg", self.rgb, format="JPEG")
        data, conversion = image_codec.read_rgb_jpeg(path, 30, 40)
        with open(path, "rb") as f:
            self.assertEqual(data, f.read())
        self.assertIsNone(conversion)

    def test_conversions(self):
        cases = [("g.jpg", self.rgb.convert("L"), "JPEG", T.CONVERTED_GRAYSCALE),
                 ("c.jpg", self.rgb.convert("CMYK"), "JPEG", T.CONVERTED_CMYK),
                 ("p.png", self.rgb.convert("P"), "PNG", T.CONVERTED_PALETTE),
                 ("a.png", self.rgb.convert("RGBA"), "PNG", T.CONVERTED_OTHER_MODE),
                 ("r.png", self.rgb, "PNG", T.CONVERTED_NOT_JPEG),
                 ("b.png", self.rgb.convert("1"), "PNG", T.CONVERTED_GRAYSCALE)]
        for name, image, fmt, reason in cases:
            data, conversion = image_codec.read_rgb_jpeg(self.save(name, image, format=fmt), 30, 40)
            self.assertEqual(conversion, reason, name)
            decoded = tf.io.decode_jpeg(data)  # TensorFlow reads it as a 3-channel JPEG
            self.assertEqual(decoded.shape, (30, 40, 3), name)
        # Grayscale stays grayscale: the three channels are equal.
        data, _ = image_codec.read_rgb_jpeg(os.path.join(self.dir, "g.jpg"), 30, 40)
        pixels = np.asarray(Image.open(io.BytesIO(data)), dtype=np.int32)
        self.assertLessEqual(np.abs(pixels[..., 0] - pixels[..., 2]).max(), 2)

    def test_skips(self):
        good = self.save("good.jpg", self.rgb, format="JPEG")
        with open(good, "rb") as f:
            data = f.read()
        truncated = os.path.join(self.dir, "t.jpg")
        with open(truncated, "wb") as f:
            f.write(data[: len(data) * 2 // 3])
        junk = os.path.join(self.dir, "j.jpg")
        with open(junk, "wb") as f:
            f.write(b"\x00" * 100)
        cases = [(os.path.join(self.dir, "none.jpg"), 30, 40, T.IMAGE_MISSING, "no such file"),
                 (truncated, 30, 40, T.IMAGE_CORRUPT, "not a readable image"),
                 (junk, 30, 40, T.IMAGE_CORRUPT, "not a readable image"),
                 (good, 40, 30, T.IMAGE_SIZE_MISMATCH, "the JSON says 30x40 (w x h), the file "
                  "is 40x30")]
        for path, height, width, reason, message in cases:
            with self.assertRaises(image_codec.ImageSkip) as raised:
                image_codec.read_rgb_jpeg(path, height, width)
            self.assertEqual(raised.exception.reason, reason)
            self.assertIn(message, str(raised.exception))
            self.assertIn(path, str(raised.exception))


class HelpersTest(tf.test.TestCase):

    def test_ordered_map_keeps_order_in_and_out_of_process(self):
        # A builtin as the work: spawned workers then need not import this (TensorFlow) module.
        items = list(range(40))
        want = [-x for x in items]
        self.assertEqual(list(parallel.ordered_map(operator.neg, iter(items), 1)), want)
        self.assertEqual(list(parallel.ordered_map(operator.neg, iter(items), 2,
                                                   max_in_flight=3)), want)

    def test_ordered_map_bounds_items_in_flight(self):
        pulled = []

        def items():
            for i in range(100):
                pulled.append(i)
                yield i

        results = parallel.ordered_map(operator.neg, items(), 2, max_in_flight=4)
        self.assertEqual(next(results), 0)
        self.assertLessEqual(len(pulled), 4)
        results.close()

    def test_tally_merge_keeps_first_ids_and_rejects_unknown_reasons(self):
        a, b = T.Tally(), T.Tally()
        for i in range(4):
            a.add(T.IMAGE_MISSING, i)
            b.add(T.IMAGE_MISSING, 10 + i)
        a.merge(b)
        self.assertEqual(a.counts[T.IMAGE_MISSING], 8)
        self.assertEqual(a.example_ids[T.IMAGE_MISSING], [0, 1, 2, 3, 10])
        with self.assertRaises(KeyError):
            a.add("made_up_reason", 1)

    def test_progress_line(self):
        stream = io.StringIO()
        bar = progress.Progress(200, label="x", stream=stream, log_interval=0.0)
        bar.update(50)
        bar.finish()
        lines = stream.getvalue().splitlines()
        self.assertLen(lines, 2)
        self.assertRegex(lines[0], r"^x: 50/200 images \( 25\.0%\) \| [\d.]+ images/s \| "
                         r"elapsed 0:00 \| ETA \d+:\d\d$")
        self.assertEqual(progress.format_seconds(3725), "1:02:05")


if __name__ == "__main__":
    tf.test.main()
