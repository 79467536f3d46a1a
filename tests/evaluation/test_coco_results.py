"""Tests for official_maskrcnn.evaluation.coco_results: label map, mask pasting, RLE, conversion."""

import importlib
import json
import os
import sys
import tempfile
from multiprocessing import shared_memory
from unittest import mock

import numpy as np
import tensorflow as tf
from pycocotools import mask as mask_util

from official_maskrcnn.evaluation import coco_results, shared_arrays

COCO128_JSON = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                            "coco128", "annotations", "instances_train2017.json")
COCO128_JSON = os.path.normpath(COCO128_JSON)
TENSORFLOW_LOADED = "'tensorflow' in __import__('sys').modules"
WORKER_MAIN_MARK = "getattr(__import__('sys').modules.get('__mp_main__'), 'HEAVY', None)"


def reference_paste(mask, box_xyxy, height, width, threshold=0.5):
    """Independent per-pixel float64 version of maskrcnn-benchmark's paste_mask_in_image."""
    size = mask.shape[0]
    padded = np.zeros((size + 2, size + 2))
    padded[1:-1, 1:-1] = mask
    x0, y0, x1, y1 = [float(v) for v in np.float32(box_xyxy)]
    scale = (size + 2.0) / size
    half_w, half_h = (x1 - x0) * 0.5 * scale, (y1 - y0) * 0.5 * scale
    centre_x, centre_y = (x0 + x1) * 0.5, (y0 + y1) * 0.5
    bx0, by0 = int(centre_x - half_w), int(centre_y - half_h)  # int(): toward zero
    bx1, by1 = int(centre_x + half_w), int(centre_y + half_h)
    w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)

    def taps(out_size, in_size, index):
        src = max((index + 0.5) * in_size / out_size - 0.5, 0.0)
        low = min(int(np.floor(src)), in_size - 1)
        return low, min(low + 1, in_size - 1), src - low

    image = np.zeros((height, width), np.uint8)
    for y in range(max(by0, 0), min(by1 + 1, height)):
        ylo, yhi, fy = taps(h, size + 2, y - by0)
        for x in range(max(bx0, 0), min(bx1 + 1, width)):
            xlo, xhi, fx = taps(w, size + 2, x - bx0)
            top = padded[ylo, xlo] * (1 - fx) + padded[ylo, xhi] * fx
            bottom = padded[yhi, xlo] * (1 - fx) + padded[yhi, xhi] * fx
            image[y, x] = top * (1 - fy) + bottom * fy > threshold
    return image


def random_outputs(rng, num_images, num_slots, height=60, width=80, scale=1.5):
    """Batched model outputs with random boxes (some partly outside), masks and labels 1..3."""
    y0 = rng.uniform(-10, height * scale, (num_images, num_slots))
    x0 = rng.uniform(-10, width * scale, (num_images, num_slots))
    size = rng.uniform(1, 50, (num_images, num_slots, 2))
    boxes = np.stack([y0, x0, y0 + size[..., 0], x0 + size[..., 1]], -1).astype(np.float32)
    return {
        "source_id": np.arange(1, num_images + 1, dtype=np.int64),
        "original_size": np.tile([height, width], (num_images, 1)).astype(np.int32),
        "scale": np.full((num_images, 2), scale, np.float32),
        "is_valid": np.ones(num_images, bool),
        "num_detections": rng.integers(0, num_slots + 1, num_images).astype(np.int32),
        "detection_boxes": boxes,
        "detection_scores": rng.random((num_images, num_slots)).astype(np.float32),
        "detection_classes": rng.integers(0, 4, (num_images, num_slots)).astype(np.int32),
        "detection_masks": rng.random((num_images, num_slots, 28, 28)).astype(np.float32),
    }


class LabelMapTest(tf.test.TestCase):

    def test_coco_ids_are_not_contiguous(self):
        with open(COCO128_JSON, encoding="utf-8") as handle:
            categories = json.load(handle)["categories"]
        mapping = coco_results.label_to_category_id(categories)
        self.assertLen(mapping, 80)
        self.assertEqual(mapping[1], 1)  # person
        self.assertEqual(mapping[11], 11)  # fire hydrant
        self.assertEqual(mapping[12], 13)  # stop sign: COCO has no id 12
        self.assertEqual(mapping[80], 90)  # toothbrush

    def test_unsorted_categories(self):
        categories = [{"id": 11, "name": "c"}, {"id": 3, "name": "a"}, {"id": 7, "name": "b"}]
        self.assertEqual(coco_results.label_to_category_id(categories), {1: 3, 2: 7, 3: 11})


class PasteMasksTest(tf.test.TestCase):
    # Box x in [10, 37.5], y in [20, 47.5]: expanded by 30/28 about the centre to x in
    # [9.02, 38.48], y in [19.02, 48.48], truncated to columns 9..38 and rows 19..48: 30 pixels
    # each, the padded mask's size, so the resize is the identity and the 28 x 28 mask lands on
    # columns 10..37 and rows 20..47 exactly.
    IDENTITY_BOX = (10.0, 20.0, 37.5, 47.5)

    def test_full_mask_fills_its_box(self):
        pasted = coco_results.paste_masks(np.ones((1, 28, 28)), [self.IDENTITY_BOX], 60, 70)
        self.assertEqual(pasted.shape, (1, 60, 70))
        self.assertEqual(pasted.dtype, np.uint8)
        expected = np.zeros((60, 70), np.uint8)
        expected[20:48, 10:38] = 1
        self.assertAllEqual(pasted[0], expected)

    def test_identity_resize_keeps_every_cell(self):
        mask = np.random.default_rng(1).random((28, 28)).astype(np.float32)
        pasted = coco_results.paste_masks(mask[None], [self.IDENTITY_BOX], 60, 70)[0]
        self.assertAllEqual(pasted[20:48, 10:38], (mask > 0.5).astype(np.uint8))
        self.assertEqual(pasted.sum(), (mask > 0.5).sum())

    def test_threshold_is_strict(self):
        mask = np.full((1, 28, 28), 0.5, np.float32)
        mask[0, :14] = 0.5001
        pasted = coco_results.paste_masks(mask, [self.IDENTITY_BOX], 60, 70)[0]
        self.assertEqual(pasted.sum(), 14 * 28)
        self.assertAllEqual(pasted[20:34, 10:38], np.ones((14, 28)))
        lower = coco_results.paste_masks(mask, [self.IDENTITY_BOX], 60, 70, threshold=0.4)[0]
        self.assertEqual(lower.sum(), 28 * 28)

    def test_box_partly_outside_is_clipped(self):
        # Same 30-pixel geometry shifted to x in [-5.118, 22.382]: expanded [-6.1, 23.36] -> int
        # [-6, 23] (truncation toward zero), 30 columns; mask cells land on columns -5..22.
        # And y in [40, 67.5] -> rows 40..67 in an image of 50 rows.
        box = (-5.118, 40.0, 22.382, 67.5)
        pasted = coco_results.paste_masks(np.ones((1, 28, 28)), [box], 50, 30)[0]
        expected = np.zeros((50, 30), np.uint8)
        expected[40:50, 0:23] = 1
        self.assertAllEqual(pasted, expected)

    def test_box_outside_and_degenerate_boxes(self):
        boxes = [(100.0, 100.0, 120.0, 120.0), (5.0, 5.0, 5.0, 5.0), (-30.0, -30.0, -2.0, -2.0)]
        pasted = coco_results.paste_masks(np.ones((3, 28, 28)), boxes, 20, 20)
        self.assertEqual(pasted[0].sum(), 0)
        # A point box: expanded box of 1 pixel; the 30 -> 1 resize samples source 14.5.
        self.assertEqual(pasted[1].sum(), 1)
        self.assertEqual(pasted[1, 5, 5], 1)
        self.assertEqual(pasted[2].sum(), 0)

    def test_matches_independent_reference(self):
        rng = np.random.default_rng(0)
        for _ in range(60):
            mask = rng.random((28, 28)).astype(np.float32)
            x0, y0 = rng.uniform(-20, 40, 2)
            box = np.array([x0, y0, x0 + rng.uniform(0, 45), y0 + rng.uniform(0, 45)], np.float32)
            ours = coco_results.paste_masks(mask[None], box[None], 40, 50)[0]
            self.assertAllEqual(ours, reference_paste(mask, box, 40, 50), msg=str(box))

    def test_rle_equals_pycocotools_encode(self):
        rng = np.random.default_rng(2)
        height, width = 30, 25
        for case in range(150):
            masks = rng.random((4, 28, 28)).astype(np.float32)
            masks[0] = 1.0  # large runs, across columns when the box spans the image height
            x0 = rng.uniform(-30, width, 4)
            y0 = rng.uniform(-30, height, 4) if case % 3 else np.full(4, -20.0)
            boxes = np.stack([x0, y0, x0 + rng.uniform(0, 60, 4), y0 + rng.uniform(0, 60, 4)], 1)
            pasted = coco_results.paste_masks(masks, boxes, height, width)
            expected = mask_util.encode(np.asfortranarray(np.transpose(pasted, (1, 2, 0))))
            for rle in expected:
                rle["counts"] = rle["counts"].decode("ascii")
            self.assertEqual(coco_results.pasted_rles(masks, boxes, height, width), expected)
            self.assertEqual(coco_results.encode_masks(pasted), expected)

    def test_bad_mask_shape(self):
        with self.assertRaisesRegex(ValueError, r"\[T, M, M\]"):
            coco_results.paste_masks(np.ones((1, 28, 14)), [(0, 0, 5, 5)], 10, 10)


class DetectionsToCocoTest(tf.test.TestCase):

    def _one_image(self):
        masks = np.zeros((4, 28, 28), np.float32)
        masks[0] = 1.0
        return {
            "source_id": np.array([42]), "original_size": np.array([[100, 80]]),
            "scale": np.array([[2.0, 4.0]], np.float32), "is_valid": np.array([True]),
            "num_detections": np.array([3]),
            # [ymin, xmin, ymax, xmax] in the resized image (y scale 2, x scale 4).
            "detection_boxes": np.array([[[20, 40, 60, 120], [0, 0, 10, 10], [2, 4, 6, 8],
                                          [0, 0, 50, 50]]], np.float32),
            "detection_scores": np.array([[0.9, 0.8, 0.7, 0.6]], np.float32),
            "detection_classes": np.array([[12, 0, 1, 2]], np.int32),  # slot 3: beyond num
            "detection_masks": masks[None],
        }

    def test_boxes_categories_scores(self):
        results = coco_results.detections_to_coco(self._one_image(), {1: 1, 2: 2, 12: 13})
        self.assertLen(results, 2)  # class 0 and the slot beyond num_detections are skipped
        first, second = results
        self.assertEqual(first["image_id"], 42)
        self.assertEqual(first["category_id"], 13)
        # Original frame: x1 = 40/4 = 10, y1 = 20/2 = 10, x2 = 30, y2 = 30; w = x2 - x1 + 1.
        self.assertAllClose(first["bbox"], [10.0, 10.0, 21.0, 21.0])
        self.assertAllClose(first["score"], 0.9)
        self.assertAllClose(second["bbox"], [1.0, 1.0, 2.0, 3.0])
        self.assertEqual(second["category_id"], 1)
        json.dumps(results)  # JSON-serialisable: plain ints, floats, str counts
        self.assertIsInstance(first["segmentation"]["counts"], str)
        pasted = coco_results.paste_masks(np.ones((1, 28, 28)), [[10, 10, 30, 30]], 100, 80)[0]
        decoded = mask_util.decode({"size": [100, 80],
                                    "counts": first["segmentation"]["counts"].encode()})
        self.assertAllEqual(decoded, pasted)
        # Expanded box 9..30 (22 pixels); samples 1..20 read mostly inside cells 1..28: the full
        # mask covers rows and columns 10..29, one fewer than the "+1" box [10, 30] (reference).
        expected = np.zeros((100, 80), np.uint8)
        expected[10:30, 10:30] = 1
        self.assertAllEqual(decoded, expected)
        self.assertEqual(mask_util.decode({"size": [100, 80], "counts": second[
            "segmentation"]["counts"].encode()}).sum(), 0)  # all-zero mask probabilities

    def test_without_masks(self):
        results = coco_results.detections_to_coco(self._one_image(), {1: 1, 12: 13},
                                                  include_masks=False)
        self.assertNotIn("segmentation", results[0])

    def test_no_detections_and_invalid_images(self):
        outputs = self._one_image()
        outputs["num_detections"][:] = 0
        self.assertEqual(coco_results.detections_to_coco(outputs, {1: 1, 12: 13}), [])
        outputs = self._one_image()
        outputs["is_valid"][:] = False
        self.assertEqual(coco_results.detections_to_coco(outputs, {1: 1, 12: 13}), [])
        outputs["source_id"] = outputs["source_id"][:0]
        self.assertEqual(coco_results.detections_to_coco(outputs, {1: 1, 12: 13}), [])

    def test_unknown_label(self):
        with self.assertRaisesRegex(ValueError, r"image 42: detection_classes \[12\]"):
            coco_results.detections_to_coco(self._one_image(), {1: 1, 2: 2})


class ResultColumnsTest(tf.test.TestCase):
    """The columns between processes hold exactly the results `detections_to_coco` gives."""

    def setUp(self):
        super().setUp()
        self.outputs = random_outputs(np.random.default_rng(5), num_images=6, num_slots=9)
        self.label_map = {1: 3, 2: 7, 3: 11}
        self.columns = coco_results.detections_to_columns(self.outputs, self.label_map)
        self.dicts = coco_results.detections_to_coco(self.outputs, self.label_map)

    def test_the_dicts_of_the_columns_are_the_results(self):
        self.assertNotEmpty(self.dicts)
        self.assertLen(self.columns, len(self.dicts))
        results = self.columns.to_dicts()
        self.assertEqual(results, self.dicts)
        # Built independently: each result from its image's slots, in slot order.
        expected = []
        for index in range(6):
            classes = self.outputs["detection_classes"][index]
            for slot in range(int(self.outputs["num_detections"][index])):
                if classes[slot]:
                    box = self.outputs["detection_boxes"][index][slot] / np.float32(1.5)
                    expected.append((index + 1, self.label_map[int(classes[slot])],
                                     [float(box[1]), float(box[0]),
                                      float(np.float32(box[3] - box[1] + 1)),
                                      float(np.float32(box[2] - box[0] + 1))],
                                     float(self.outputs["detection_scores"][index][slot])))
        self.assertEqual([(r["image_id"], r["category_id"], r["bbox"], r["score"])
                          for r in results], expected)
        self.assertTrue(all(type(r["image_id"]) is int and type(r["score"]) is float
                            and r["segmentation"]["size"] == [60, 80] for r in results))
        json.dumps(results)  # JSON-ready: no numpy scalars

    def test_take_and_concatenate(self):
        positions = np.flatnonzero(np.isin(self.columns.category_ids, [3, 11]))
        part = self.columns.take(positions)
        self.assertEqual(part.to_dicts(), [r for r in self.dicts if r["category_id"] != 7])
        rest = self.columns.take(np.flatnonzero(self.columns.category_ids == 7))
        joined = coco_results.ResultColumns.concatenate([part, rest])
        self.assertCountEqual([json.dumps(r) for r in joined.to_dicts()],
                              [json.dumps(r) for r in self.dicts])
        self.assertEqual(coco_results.ResultColumns.concatenate([]).to_dicts(), [])
        self.assertEqual(self.columns.take([]).to_dicts(), [])
        without = coco_results.detections_to_columns(self.outputs, self.label_map,
                                                     include_masks=False)
        self.assertFalse(without.has_masks)
        self.assertEqual(without.to_dicts(), coco_results.detections_to_coco(
            self.outputs, self.label_map, include_masks=False))
        with self.assertRaisesRegex(ValueError, "with and without masks"):
            coco_results.ResultColumns.concatenate([self.columns, without])

    def test_inconsistent_columns_are_refused(self):
        with self.assertRaisesRegex(ValueError, r"different lengths: \[1, 2\]"):
            coco_results.ResultColumns([1, 2], [1, 1], np.zeros([2, 4]), [0.5])
        with self.assertRaisesRegex(ValueError, "both or neither"):
            coco_results.ResultColumns([1], [1], np.zeros([1, 4]), [0.5], mask_sizes=[[2, 2]])
        masks = ([[2, 2]], ["04"])
        with self.assertRaisesRegex(ValueError, "mask_areas and mask_bboxes go together"):
            coco_results.ResultColumns([1], [1], np.zeros([1, 4]), [0.5], *masks, mask_areas=[0])
        with self.assertRaisesRegex(ValueError, "need the masks"):
            coco_results.ResultColumns([1], [1], np.zeros([1, 4]), [0.5], mask_areas=[0],
                                       mask_bboxes=np.zeros([1, 4]))
        with self.assertRaisesRegex(ValueError, r"different lengths: \[1, 2\]"):
            coco_results.ResultColumns([1], [1], np.zeros([1, 4]), [0.5], *masks,
                                       mask_areas=[0, 0], mask_bboxes=np.zeros([2, 4]))

    def test_mask_geometry_is_that_of_the_rles(self):
        # The paster's areas and boxes equal pycocotools' `area` and `toBbox` of the RLEs.
        rles = [r["segmentation"] for r in self.dicts]
        self.assertTrue(self.columns.has_mask_geometry)
        self.assertEqual([area for area, _ in self.columns.mask_geometry()],
                         mask_util.area(rles).tolist())
        self.assertEqual([box for _, box in self.columns.mask_geometry()],
                         mask_util.toBbox(rles).tolist())
        self.assertIn(0, self.columns.mask_areas)  # empty masks among them: box [0, 0, 0, 0]
        self.assertTrue(all(type(area) is int and all(type(v) is float for v in box)
                            for area, box in self.columns.mask_geometry()))
        # Carried through take and concatenate; dropped when a part lacks it.
        positions = np.flatnonzero(self.columns.category_ids == 7)
        part = self.columns.take(positions)
        self.assertAllEqual(part.mask_areas, self.columns.mask_areas[positions])
        self.assertAllEqual(part.mask_bboxes, self.columns.mask_bboxes[positions])
        joined = coco_results.ResultColumns.concatenate([part, self.columns])
        self.assertAllEqual(joined.mask_areas,
                            np.concatenate([part.mask_areas, self.columns.mask_areas]))
        plain = coco_results.ResultColumns(part.image_ids, part.category_ids, part.boxes,
                                           part.scores, part.mask_sizes, part.mask_counts)
        self.assertIsNone(plain.mask_geometry())
        self.assertFalse(coco_results.ResultColumns.concatenate([part, plain]).has_mask_geometry)
        self.assertTrue(coco_results.ResultColumns.empty().has_mask_geometry)

    def test_accumulate_columns_equals_accumulate_of_the_dicts(self):
        from official_maskrcnn.evaluation import coco_metrics
        ground_truth = coco_metrics.load_ground_truth(COCO128_JSON)
        image_ids = sorted(ground_truth.getImgIds())[:6]
        categories = sorted(ground_truth.getCatIds())
        label_map = {1: categories[0], 2: categories[1], 3: categories[2]}
        outputs = dict(self.outputs, source_id=np.array(image_ids))
        columns = coco_results.detections_to_columns(outputs, label_map)
        shard = categories[:2]
        got = coco_results.accumulate_columns(COCO128_JSON, columns, image_ids, shard,
                                              coco_metrics.IOU_TYPES, "pycocotools")
        want = coco_metrics.accumulate(COCO128_JSON, columns.to_dicts(), image_ids, shard)
        self.assertEqual(got["category_ids"], want["category_ids"])
        for iou_type in coco_metrics.IOU_TYPES:
            for key in ("precision", "recall"):
                self.assertAllEqual(got[iou_type][key], want[iou_type][key])


class ParallelConversionTest(tf.test.TestCase):

    def test_processes_match_serial(self):
        outputs = random_outputs(np.random.default_rng(3), num_images=9, num_slots=12)
        label_map = {1: 3, 2: 7, 3: 11}
        serial = coco_results.detections_to_coco(outputs, label_map)
        self.assertNotEmpty(serial)
        self.assertEqual(coco_results.convert_in_processes(outputs, label_map, 1), serial)
        with coco_results.ResultConverter(2, chunks_per_process=2) as converter:
            self.assertEqual(converter.convert(outputs, label_map), serial)
            self.assertEqual(converter.convert_columns(outputs, label_map).to_dicts(), serial)
            # Reused pool, different data.
            more = random_outputs(np.random.default_rng(4), num_images=3, num_slots=5)
            self.assertEqual(converter.convert(more, label_map),
                             coco_results.detections_to_coco(more, label_map))
            # Larger than the shared block so far: a new block, read by the same workers.
            most = random_outputs(np.random.default_rng(5), num_images=14, num_slots=20)
            self.assertEqual(converter.convert(most, label_map),
                             coco_results.detections_to_coco(most, label_map))
            # No room in /dev/shm: the masks are pickled with their chunks.
            with mock.patch.object(shared_arrays.SharedBuffer, "put", return_value=None), \
                    self.assertLogs("absl", "WARNING") as logs:
                self.assertEqual(converter.convert(outputs, label_map), serial)
                self.assertEqual(converter.convert(outputs, label_map), serial)
            self.assertLen(logs.output, 1)  # said once
            self.assertRegex(logs.output[0], r"no room in shared memory \(/dev/shm\) for "
                             r"0\.3 MB.*pipes.*--shm-size")
            # Workers never import TensorFlow (this test module does, so the check is a builtin).
            self.assertFalse(converter.submit(eval, TENSORFLOW_LOADED).result())
            block = converter._shared_masks._block.name
        self.assertFalse(converter._shared_masks._block)  # closed with the converter
        with self.assertRaises(FileNotFoundError):
            shared_memory.SharedMemory(name=block)
        self.assertEqual(coco_results.convert_in_processes(outputs, label_map, 2), serial)

    def test_map_shared(self):
        payloads = [np.arange(n) for n in (3, 200_000, 0)] + [{"text": "x" * 10_000}]
        with coco_results.ResultConverter(2) as converter:
            self.assertEqual(converter.map_shared(repr, payloads), [repr(p) for p in payloads])
            self.assertEqual(converter.map_shared(divmod, [7, 9], 4), [(1, 3), (2, 1)])
            self.assertEqual(converter.map_shared(len, []), [])
            with mock.patch.object(shared_arrays.SharedBuffer, "put_all", return_value=None):
                self.assertEqual(converter.map_shared(repr, payloads),  # through the pipes
                                 [repr(p) for p in payloads])
            with self.assertRaisesRegex(ZeroDivisionError, "modulo by zero"):
                converter.map_shared(divmod, [1, 2], 0)  # a worker's error reaches the caller
            self.assertEqual(converter.map_shared(abs, [-2]), [2])  # and the pool goes on
        with self.assertRaisesRegex(ValueError, "no worker processes"):
            coco_results.ResultConverter(1).map_shared(abs, [1])

    def test_workers_do_not_import_the_parents_main_module(self):
        # Started with `python -m official_maskrcnn.train`, spawn would re-import the entry
        # (and TensorFlow) in every worker.
        with tempfile.TemporaryDirectory() as directory:
            with open(os.path.join(directory, "heavy_entry.py"), "w", encoding="utf-8") as f:
                f.write("HEAVY = 'imported'\n")
            sys.path.insert(0, directory)
            main = sys.modules["__main__"]
            try:
                sys.modules["__main__"] = importlib.import_module("heavy_entry")
                with coco_results.ResultConverter(2) as converter:
                    # Every worker was started at construction.
                    self.assertLen(converter._executor._processes, 2)
                    seen = [converter.submit(eval, WORKER_MAIN_MARK).result() for _ in range(4)]
            finally:
                sys.modules["__main__"] = main
                sys.path.remove(directory)
                sys.modules.pop("heavy_entry", None)
        self.assertEqual(seen, [None] * 4)


if __name__ == "__main__":
    tf.test.main()
