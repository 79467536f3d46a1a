"""The faster_coco_eval back end gives pycocotools' 12 bbox and 12 segm stats (to 1e-12) on real
coco128 results and on hard cases; pycocotools stays the reference here."""

import copy
from unittest import mock

import numpy as np
import tensorflow as tf
from pycocotools import coco as coco_lib
from pycocotools import mask as mask_util

from official_maskrcnn.evaluation import coco_metrics, coco_results
from official_maskrcnn.evaluation import evaluator as evaluator_lib
from tests.evaluation.test_coco_metrics import gt_as_outputs, perturbed_results
from tests.evaluation.test_coco_results import COCO128_JSON, TENSORFLOW_LOADED

# A C++ COCOeval sums precisions in another order than numpy: a few float64 ulps of stats <= 1.
TOLERANCE = 1e-12


def _shifted_rle(ground_truth, ann, dx, dy):
    """The annotation's mask moved by (dx, dy) pixels, as a result RLE ('counts' as str)."""
    mask = np.roll(ground_truth.annToMask(ann), (dy, dx), axis=(0, 1))
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


class BackendEqualityTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.ground_truth = coco_metrics.load_ground_truth(COCO128_JSON)
        cls.image_ids = sorted(cls.ground_truth.getImgIds())

    def assert_same_stats(self, results, image_ids=None):
        reference = coco_metrics.evaluate(COCO128_JSON, results, image_ids=image_ids)
        fast = coco_metrics.evaluate(COCO128_JSON, results, image_ids=image_ids,
                                     backend="faster_coco_eval")
        for iou_type in coco_metrics.IOU_TYPES:
            for name in coco_metrics.STAT_NAMES:
                self.assertAllClose(fast[iou_type][name], reference[iou_type][name], rtol=0,
                                    atol=TOLERANCE, msg=f"{iou_type} {name}")
        self.assertEqual(fast["summary_text"],
                         coco_metrics.format_stats_table(reference))
        return reference

    def test_coco128_round_trip(self):
        image_ids = self.image_ids[:32]
        reference = self.assert_same_stats(
            perturbed_results(self.ground_truth, image_ids, seed=3), image_ids)
        self.assertBetween(reference["bbox"]["AP"], 0.1, 0.95)  # a real, non-trivial score
        self.assertBetween(reference["segm"]["AP"], 0.1, 0.95)

    def _results(self, rng, scores):
        """One result per non-crowd annotation (jittered box, shifted mask), given scores."""
        results = []
        anns = [a for a in self.ground_truth.dataset["annotations"] if not a["iscrowd"]]
        for ann, score in zip(anns, scores):
            x, y, w, h = ann["bbox"]
            dx, dy = (int(v) for v in rng.integers(-3, 4, 2))
            results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                            "bbox": [x + dx, y + dy, w * rng.uniform(0.9, 1.1), h],
                            "score": float(score),
                            "segmentation": _shifted_rle(self.ground_truth, ann, dx, dy)})
        return results

    def test_many_exact_score_ties(self):
        rng = np.random.default_rng(0)
        # Four distinct scores over ~900 detections: matching order decides among equals.
        scores = rng.choice([0.25, 0.5, 0.75, 1.0], 2000)
        self.assert_same_stats(self._results(rng, scores))

    def test_detections_aimed_at_crowd_regions(self):
        rng = np.random.default_rng(1)
        crowds = [a for a in self.ground_truth.dataset["annotations"] if a["iscrowd"]]
        self.assertNotEmpty(crowds)  # coco128 has crowd annotations
        results = self._results(rng, rng.random(2000))
        for ann in crowds:
            for k in range(3):  # several detections inside each crowd region
                x, y, w, h = ann["bbox"]
                rle = mask_util.frPyObjects(ann["segmentation"], *ann["segmentation"]["size"]) \
                    if isinstance(ann["segmentation"]["counts"], list) else ann["segmentation"]
                rle = dict(rle, counts=rle["counts"].decode("ascii")
                           if isinstance(rle["counts"], bytes) else rle["counts"])
                results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                                "bbox": [x + k, y, w / (k + 1), h], "score": 0.9 - 0.1 * k,
                                "segmentation": rle})
        self.assert_same_stats(results)

    def test_two_hundred_detections_of_one_category_in_an_image(self):
        rng = np.random.default_rng(2)
        image_id = max(self.image_ids, key=lambda i: len(self.ground_truth.imgToAnns[i]))
        ann = self.ground_truth.imgToAnns[image_id][0]
        info = self.ground_truth.imgs[image_id]
        results = []
        for k in range(200):  # more than maxDets = 100: which 100 are kept must agree
            dx, dy = (int(v) for v in rng.integers(-20, 21, 2))
            x, y, w, h = ann["bbox"]
            results.append({"image_id": image_id, "category_id": ann["category_id"],
                            "bbox": [min(max(x + dx, 0), info["width"] - 1), y + dy, w, h],
                            "score": float(rng.choice([0.3, 0.6, 0.9])),
                            "segmentation": _shifted_rle(self.ground_truth, ann, dx, dy)})
        self.assert_same_stats(results, image_ids=[image_id])
        self.assert_same_stats(results)

    def test_ground_truth_object_is_not_modified(self):
        # A pycocotools COCO handed to the fast back end is copied: it writes into annotations.
        ground_truth = coco_lib.COCO()
        ground_truth.dataset = copy.deepcopy(self.ground_truth.dataset)
        ground_truth.createIndex()
        before = copy.deepcopy(ground_truth.dataset)
        results = perturbed_results(self.ground_truth, self.image_ids[:8], seed=4)
        fast = coco_metrics.evaluate(ground_truth, results, image_ids=self.image_ids[:8],
                                     backend="faster_coco_eval")
        self.assertEqual(ground_truth.dataset, before)
        reference = coco_metrics.evaluate(ground_truth, results, image_ids=self.image_ids[:8])
        self.assertAllClose(fast["segm"]["AP"], reference["segm"]["AP"], atol=TOLERANCE)

    def test_malformed_mask_result_is_named(self):
        results = perturbed_results(self.ground_truth, self.image_ids[:2], seed=5)
        results[1] = dict(results[1], segmentation={"size": [3, 3], "counts": "d0"})
        with self.assertRaisesRegex(ValueError, r"segm results: RLE 1 \(size 3 x 3\): counts "
                                    "that do not cover"):
            coco_metrics.evaluate(COCO128_JSON, results, iou_types=("segm",),
                                  backend="faster_coco_eval")

    def test_empty_results_and_unknown_backend(self):
        fast = coco_metrics.evaluate(COCO128_JSON, [], backend="faster_coco_eval")
        self.assertEqual(fast["bbox"], dict.fromkeys(coco_metrics.STAT_NAMES, 0.0))
        with self.assertRaisesRegex(ValueError, r"coco backend 'detectron'.*pycocotools"):
            coco_metrics.evaluate(COCO128_JSON, [], backend="detectron")
        with self.assertRaisesRegex(ValueError, r"coco backend 'fast'"):
            coco_metrics.load_ground_truth(COCO128_JSON, backend="fast")


def _fresh_faster_ground_truth(ground_truth):
    """A faster_coco_eval COCO of the pycocotools COCO `ground_truth` (a copy of its dataset,
    as `evaluate` makes it), no annotation converted yet."""
    return coco_metrics._as_backend_ground_truth(ground_truth, "faster_coco_eval")


class RleReuseTest(tf.test.TestCase):
    """faster_coco_eval converts each segmentation to its 'rle' once: the ground truth's at its
    first evaluation, the results' never (they are compressed RLE already); the stats equal the
    unmodified library's bit for bit."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.ground_truth = coco_metrics.load_ground_truth(COCO128_JSON)
        cls.image_ids = sorted(cls.ground_truth.getImgIds())[:24]
        cls.results = perturbed_results(cls.ground_truth, cls.image_ids, seed=7)
        import faster_coco_eval.core.mask as faster_mask
        cls.faster_mask = faster_mask

    def _converted_counts(self, ground_truth, iou_types=("segm",)):
        """(metrics, [(annotations handed to the C conversion, compute_rle), per call]) of one
        evaluation."""
        native = self.faster_mask._mask
        calls = []

        def record(annotations, image_sizes, compute_rle, *args):
            calls.append((len(annotations), compute_rle))
            return original(annotations, image_sizes, compute_rle, *args)

        original = native.calculateRleForAllAnnotations
        with mock.patch.object(native, "calculateRleForAllAnnotations", record):
            metrics = coco_metrics.evaluate(ground_truth, self.results, self.image_ids,
                                            iou_types=iou_types, backend="faster_coco_eval")
        return metrics, calls

    def test_ground_truth_converted_once_results_never(self):
        ground_truth = _fresh_faster_ground_truth(self.ground_truth)
        num_objects = len(ground_truth.getAnnIds(imgIds=self.image_ids))
        first, calls = self._converted_counts(ground_truth)
        self.assertEqual(calls, [(num_objects, True), (0, True)])  # ground truth, results
        second, calls = self._converted_counts(ground_truth)
        self.assertEqual(calls, [(0, True), (0, True)])
        self.assertEqual(second["segm"], first["segm"])
        _, calls = self._converted_counts(ground_truth, iou_types=("bbox",))
        self.assertEqual([compute for _, compute in calls], [False, False])  # box IoU: no RLE

    def test_stats_equal_the_unmodified_library(self):
        reused = coco_metrics.evaluate(_fresh_faster_ground_truth(self.ground_truth),
                                       self.results, self.image_ids, backend="faster_coco_eval")
        calls, library_function = [], self.faster_mask.calculateRleForAllAnnotations.__wrapped__

        def stock(*args):  # the library's own, converting every annotation
            calls.append(len(args[0]))
            return library_function(*args)

        stock.reuses_rles = True  # so that `_faster_coco_eval` leaves it in place
        with mock.patch.object(self.faster_mask, "calculateRleForAllAnnotations", stock):
            converted = coco_metrics.evaluate(_fresh_faster_ground_truth(self.ground_truth),
                                              self.results, self.image_ids,
                                              backend="faster_coco_eval")
        self.assertEqual(calls[-1], len(self.results))  # the results were converted
        self.assertEqual(reused["bbox"], converted["bbox"])
        self.assertEqual(reused["segm"], converted["segm"])
        self.assertGreater(reused["segm"]["AP"], 0.1)

    def test_results_with_bytes_counts(self):
        as_bytes = [dict(r, segmentation=dict(r["segmentation"],
                                              counts=r["segmentation"]["counts"].encode()))
                    for r in self.results]
        reference = coco_metrics.evaluate(COCO128_JSON, self.results, self.image_ids,
                                          iou_types=("segm",))
        fast = coco_metrics.evaluate(COCO128_JSON, as_bytes, self.image_ids,
                                     iou_types=("segm",), backend="faster_coco_eval")
        for name in coco_metrics.STAT_NAMES:
            self.assertAllClose(fast["segm"][name], reference["segm"][name], rtol=0,
                                atol=TOLERANCE, msg=name)

    def test_boundary_conversion_is_left_whole(self):
        calls = []
        wrapper = coco_metrics._reusing_rles(lambda annotations, *args: calls.append(
            [ann["id"] for ann in annotations]))
        annotations = [{"id": 1, "rle": {}}, {"id": 2}]
        wrapper(annotations, {}, True, False, 0.02, 1)
        wrapper(annotations, {}, True, True, 0.02, 1)  # boundary IoU: needs more than 'rle'
        wrapper(annotations, {}, False, False, 0.02, 1)
        self.assertEqual(calls, [[2], [1, 2], [1, 2]])
        coco_metrics._faster_coco_eval()
        coco_metrics._faster_coco_eval()  # installed once, not wrapped twice
        installed = self.faster_mask.calculateRleForAllAnnotations
        self.assertTrue(installed.reuses_rles)
        self.assertFalse(getattr(installed.__wrapped__, "reuses_rles", False))


class MaskGeometryTest(tf.test.TestCase):
    """Masks' areas and boxes from the paster (`ResultColumns.mask_geometry`) give the stats of
    those computed from the RLEs, bit for bit, in one evaluation and in shards."""

    def test_same_stats_with_the_pasters_geometry(self):
        ground_truth = coco_metrics.load_ground_truth(COCO128_JSON)
        image_ids = sorted(ground_truth.getImgIds())[:20]
        label_map = coco_results.label_to_category_id(
            ground_truth.loadCats(ground_truth.getCatIds()))
        columns = coco_results.detections_to_columns(gt_as_outputs(ground_truth, image_ids),
                                                     label_map)
        # Each object found twice: the second, unmatched, counts in its own area range.
        columns = coco_results.ResultColumns.concatenate([columns, columns])
        results, geometry = columns.to_dicts(), columns.mask_geometry()
        for backend in coco_metrics.BACKENDS:
            plain = coco_metrics.evaluate(COCO128_JSON, results, image_ids, backend=backend)
            given = coco_metrics.evaluate(COCO128_JSON, results, image_ids, backend=backend,
                                          mask_geometry=geometry)
            self.assertEqual(given["segm"], plain["segm"], msg=backend)
            shard = sorted({r["category_id"] for r in results})[::2]
            self.assertAllEqual(
                coco_metrics.accumulate(COCO128_JSON, results, image_ids, shard, ("segm",),
                                        backend, geometry)["segm"]["precision"],
                coco_metrics.accumulate(COCO128_JSON, results, image_ids, shard, ("segm",),
                                        backend)["segm"]["precision"])
        # The fast back end reads it (a wrong one changes the area splits); wrong length refused.
        tiny = [(1, box) for _, box in geometry]
        wrong = coco_metrics.evaluate(COCO128_JSON, results, image_ids,
                                      backend="faster_coco_eval", mask_geometry=tiny)
        self.assertNotEqual(wrong["segm"]["APl"], plain["segm"]["APl"])
        with self.assertRaisesRegex(ValueError, r"mask_geometry: 2 entries for \d+ results"):
            coco_metrics.evaluate(COCO128_JSON, results, image_ids, mask_geometry=geometry[:2])


class CategoryShardTest(tf.test.TestCase):
    """COCOeval in category shards (how several processes score) gives `evaluate`'s stats bit for
    bit, with either back end."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.ground_truth = coco_metrics.load_ground_truth(COCO128_JSON)
        cls.image_ids = sorted(cls.ground_truth.getImgIds())[:40]
        cls.results = perturbed_results(cls.ground_truth, cls.image_ids, seed=6)
        cls.categories = [r["category_id"] for r in cls.results]

    def test_shards_cover_every_category_once_and_balance(self):
        categories = sorted(self.ground_truth.getCatIds())
        for num_shards in (1, 2, 3, 7):
            shards = coco_metrics.category_shards(self.ground_truth, self.categories, num_shards)
            self.assertLen(shards, num_shards)
            self.assertEqual(sorted(c for shard in shards for c in shard), categories)
            with_results = {r["category_id"] for r in self.results}
            for shard in shards:
                self.assertTrue(with_results & set(shard), msg=str(shard))
        loads = [sum(r["category_id"] in set(shard) for r in self.results)
                 for shard in coco_metrics.category_shards(self.ground_truth, self.categories, 2)]
        self.assertLess(abs(loads[0] - loads[1]), 0.2 * sum(loads))
        # Fewer categories with results than shards asked for: one shard per such category.
        few = [c for c in self.categories if c in (1, 3)]
        self.assertLen(coco_metrics.category_shards(self.ground_truth, few, 5), 2)
        self.assertEqual(coco_metrics.category_shards(self.ground_truth, [], 3), [])

    def test_sharded_stats_equal_one_evaluation(self):
        for backend in coco_metrics.BACKENDS:
            whole = coco_metrics.evaluate(COCO128_JSON, self.results, self.image_ids,
                                          backend=backend)
            for num_shards in (2, 3, 5):
                shards = coco_metrics.category_shards(self.ground_truth, self.categories,
                                                      num_shards)
                parts = [coco_metrics.accumulate(COCO128_JSON, self.results, self.image_ids,
                                                 shard, backend=backend) for shard in shards]
                # Precision only at maxDets 100 (the stats read no other), recall at all 3.
                self.assertEqual(parts[0]["segm"]["precision"].shape[-1], 1)
                self.assertEqual(parts[0]["segm"]["recall"].shape[-1], 3)
                joined = coco_metrics.summarize(parts[::-1], backend=backend)  # any order
                for iou_type in coco_metrics.IOU_TYPES:
                    self.assertEqual(joined[iou_type], whole[iou_type],
                                     msg=f"{backend}, {num_shards} shards, {iou_type}")
                self.assertEqual(joined["summary_text"], whole["summary_text"])

    def test_bad_shards(self):
        unused = sorted(set(self.ground_truth.getCatIds()) -
                        {r["category_id"] for r in self.results})[:2]
        with self.assertRaisesRegex(ValueError, "no results of categories"):
            coco_metrics.accumulate(COCO128_JSON, self.results, self.image_ids, unused)
        part = coco_metrics.accumulate(COCO128_JSON, self.results, self.image_ids, [1, 3])
        with self.assertRaisesRegex(ValueError, "the shards' categories overlap"):
            coco_metrics.summarize([part, part])
        with self.assertRaisesRegex(ValueError, "category_id 12 is not a category"):
            coco_metrics.accumulate(COCO128_JSON, [dict(self.results[0], category_id=12)],
                                    self.image_ids, [1, 12])


class PostProcessorBackendTest(tf.test.TestCase):
    """The post-processor in one process and in two (COCOeval in category shards in the
    workers), each back end."""

    def test_same_metrics_and_results_in_one_and_two_processes(self):
        ground_truth = coco_metrics.load_ground_truth(COCO128_JSON)
        image_ids = sorted(ground_truth.getImgIds())[:12]
        outputs = gt_as_outputs(ground_truth, image_ids)
        runs = {}
        for backend in coco_metrics.BACKENDS:
            for processes in (1, 2):
                post = evaluator_lib.PostProcessor(COCO128_JSON, processes, backend)
                try:
                    metrics, columns = post.run(outputs)
                    results = columns.to_dicts()
                    if processes == 2:  # scoring segm did not pull TensorFlow into a worker
                        self.assertFalse(post._converter.submit(eval, TENSORFLOW_LOADED).result())
                finally:
                    post.close()
                self.assertEqual(metrics["coco_backend"], backend)
                runs[backend, processes] = metrics, results
        reference, reference_results = runs["pycocotools", 1]
        self.assertGreater(reference["segm"]["AP"], 0.5)  # ground truth as detections
        for key, (metrics, results) in runs.items():
            self.assertEqual(results, reference_results, msg=str(key))
            self.assertEqual(coco_metrics.format_stats_table(metrics),
                             coco_metrics.format_stats_table(reference), msg=str(key))
            for iou_type in coco_metrics.IOU_TYPES:
                for name in coco_metrics.STAT_NAMES:
                    self.assertAllClose(metrics[iou_type][name], reference[iou_type][name],
                                        rtol=0, atol=TOLERANCE, msg=f"{key} {iou_type} {name}")

    def test_unknown_backend_is_refused_before_any_work(self):
        with self.assertRaisesRegex(ValueError, r"coco backend 'cocoapi'"):
            evaluator_lib.PostProcessor(COCO128_JSON, 1, "cocoapi")


if __name__ == "__main__":
    tf.test.main()
