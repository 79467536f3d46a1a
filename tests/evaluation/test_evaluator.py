"""Evaluator + PostProcessor on a tiny model: every image exactly once, on one and two replicas;
what a subset of the eval split is scored on."""

import gc
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf

from official_maskrcnn.data import dataset_builder
from official_maskrcnn.evaluation import coco_metrics
from official_maskrcnn.evaluation import evaluator as evaluator_lib
from official_maskrcnn.modeling import factory
from official_maskrcnn.runtime import dummy_training_inputs
from official_maskrcnn.training import distribution
from tests import synthetic_records
from tests.evaluation.test_coco_metrics import gt_as_outputs
from tests.evaluation.test_coco_results import COCO128_JSON

NUM_IMAGES = 13  # not a multiple of the eval batch (4) nor of the replicas (2)
TINY = dict(num_classes=4, backbone_depth=18, backbone_norm="group_norm", freeze_at=0,
            fpn_num_filters=16, box_head_mlp_dim=32, mask_head_num_convs=1,
            mask_head_num_filters=8, rpn_pre_nms_top_n_eval=100, rpn_post_nms_top_n_eval=50,
            max_detections=20)


class EvaluatorTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.pattern, cls.annotations = synthetic_records.write_split(
            cls.tmp, "v", NUM_IMAGES, seed=4, num_shards=3)

    def predict(self, strategy):
        with strategy.scope():
            tf.keras.utils.set_random_seed(3)
            model = factory.build_maskrcnn_model(**TINY)
            model(dummy_training_inputs(), training=True)
        builder = dataset_builder.DatasetBuilder(self.pattern, False, 4, min_size=64,
                                                 max_size=96)
        return evaluator_lib.Evaluator(strategy, model, builder).predict()

    def test_every_image_once_on_one_and_two_replicas_with_a_partial_last_batch(self):
        one = self.predict(tf.distribute.get_strategy())
        two = self.predict(distribution.build_strategy("mirrored"))
        for outputs in (one, two):
            self.assertCountEqual(outputs["source_id"].tolist(), range(1, NUM_IMAGES + 1))
            self.assertEqual(outputs["detection_masks"].shape[1:], (20, 28, 28))
            self.assertEqual(outputs["original_size"].shape, (NUM_IMAGES, 2))
        # Same weights, same images: the same detections whatever the replica count.
        order_one = np.argsort(one["source_id"])
        order_two = np.argsort(two["source_id"])
        self.assertAllClose(one["detection_boxes"][order_one],
                            two["detection_boxes"][order_two], atol=1e-3)

        # The post-processor turns them into COCO metrics over all 13 images.
        post = evaluator_lib.PostProcessor(self.annotations, num_processes=1)
        try:
            metrics, columns = post.run(two)
            results = columns.to_dicts()
        finally:
            post.close()
        self.assertLen(metrics["bbox"], 12)
        self.assertLen(metrics["segm"], 12)
        self.assertTrue({r["image_id"] for r in results} <= set(range(1, NUM_IMAGES + 1)))

    def test_missing_or_duplicated_images_are_an_error(self):
        strategy = tf.distribute.get_strategy()
        with strategy.scope():
            model = factory.build_maskrcnn_model(**TINY)
            model(dummy_training_inputs(), training=True)
        builder = dataset_builder.DatasetBuilder(self.pattern, False, 4, min_size=64,
                                                 max_size=96)
        evaluator = evaluator_lib.Evaluator(strategy, model, builder)
        with mock.patch.object(type(builder), "num_records", NUM_IMAGES + 1):
            with self.assertRaisesRegex(evaluator_lib.EvaluationError, "13 image"):
                evaluator.predict()


class SubsetScoringTest(tf.test.TestCase):
    """What a subset of the eval split (`run.eval_allow_subset`) is scored on."""

    def test_coco_eval_scores_exactly_the_images_of_the_outputs(self):
        # The ground truth of 16 of coco128's 128 images as perfect detections: box AP 1.0 on
        # those 16 (COCOeval's imgIds = the outputs' ids); scored over the whole file, the 112
        # images without outputs would count as missed (recall 16 images' worth, not 1).
        ground_truth = coco_metrics.load_ground_truth(COCO128_JSON)
        subset = sorted(ground_truth.getImgIds())[5:21]
        post = evaluator_lib.PostProcessor(COCO128_JSON)
        try:
            metrics, columns = post.run(gt_as_outputs(ground_truth, subset))
            results = columns.to_dicts()
        finally:
            post.close()
        self.assertEqual(metrics["num_images"], 16)
        self.assertEqual({r["image_id"] for r in results}, set(subset))
        self.assertAllClose(metrics["bbox"]["AP"], 1.0, atol=1e-9)
        self.assertAllClose(metrics["bbox"]["ARmax100"], 1.0, atol=1e-9)
        whole = coco_metrics.evaluate(COCO128_JSON, results, iou_types=("bbox",))
        self.assertLess(whole["bbox"]["ARmax100"], 0.5)


class CyclicGcPauseTest(tf.test.TestCase):

    def test_paused_inside_and_restored_after_even_on_error(self):
        self.assertTrue(gc.isenabled())
        with self.assertRaises(KeyError):
            with evaluator_lib.cyclic_gc_paused():
                self.assertFalse(gc.isenabled())
                raise KeyError("boom")
        self.assertTrue(gc.isenabled())
        gc.disable()  # a caller that disabled it itself keeps it disabled
        try:
            with evaluator_lib.cyclic_gc_paused():
                pass
            self.assertFalse(gc.isenabled())
        finally:
            gc.enable()


if __name__ == "__main__":
    tf.test.main()
