"""README "Train on your own COCO-format dataset", end to end, on a synthetic dataset of 5
classes with non-contiguous ids: convert, verify, train with the label map taken from the data
(configs/custom_dataset.gin leaves num_classes unset), evaluate, predict, the best checkpoint;
and every label-map disagreement as a clear error before anything is written.

The README's commands run here in this process (their entries' functions), with the model and
images shrunk to the smoke config's sizes so that the test takes about a minute.
"""

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile

import gin
import tensorflow as tf

from official_maskrcnn import evaluate, predict, runtime, train
from official_maskrcnn.data import label_maps
from official_maskrcnn.inference import predictor as predictor_lib
from official_maskrcnn.training import best_checkpoint
from tfrecord_tools import create_coco_tfrecord, make_synthetic_coco, verify_tfrecord

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "custom_dataset.gin")
CATEGORY_IDS = {3: "rectangle", 7: "ellipse", 11: "triangle", 14: "cross", 20: "star"}
# The smoke config's sizes (configs/smoke_cpu.gin): the walkthrough's steps, in seconds.
SMALL = [
    "run.global_batch_size = 2", "run.num_epochs = 2", "run.steps_per_loop = 4",
    "run.eval_batch_size = 4", "DatasetBuilder.min_size = 64", "DatasetBuilder.max_size = 96",
    "build_maskrcnn_model.fpn_num_filters = 16", "build_maskrcnn_model.box_head_mlp_dim = 32",
    "build_maskrcnn_model.mask_head_num_convs = 1",
    "build_maskrcnn_model.mask_head_num_filters = 16",
    "build_maskrcnn_model.rpn_post_nms_top_n_eval = 100",
    "build_maskrcnn_model.roi_num_samples = 64", "optimizer.build_optimizer.warmup_steps = 2",
]


def quietly(function, *args):
    """Runs a command's main(argv) with its output captured; returns (exit code, output)."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = function(*args)
    return code, output.getvalue()


class CustomDatasetWalkthroughTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp(prefix="custom_dataset_")
        coco = os.path.join(cls.root, "coco")
        for split, num_images, num_classes in (("train", 12, 5), ("val", 6, 5),
                                               ("three", 4, 3)):
            code, out = quietly(make_synthetic_coco.main, [
                "--output_dir", coco, "--split", split, "--num_images", str(num_images),
                "--image_size", "96", "--seed", "5", "--num_classes", str(num_classes)])
            assert code == 0, out
            code, out = quietly(create_coco_tfrecord.main, [
                "--image_dir", os.path.join(coco, split),
                "--annotations_file", cls.annotations(split),
                "--output_prefix", os.path.join(cls.root, "tfrecords", split),
                "--num_shards", "2"])
            assert code == 0, out
        cls.model_dir = os.path.join(cls.root, "model")
        cls.train_out = cls.train(cls.model_dir)

    @classmethod
    def tearDownClass(cls):
        gin.clear_config()
        shutil.rmtree(cls.root)
        super().tearDownClass()

    @classmethod
    def annotations(cls, split):
        return os.path.join(cls.root, "coco", "annotations", f"instances_{split}.json")

    @classmethod
    def bindings(cls, train_split="train", val_split="val", *extra):
        return [f"train_records = '{cls.root}/tfrecords/{train_split}-*'",
                f"val_records = '{cls.root}/tfrecords/{val_split}-*'",
                f"val_annotations = '{cls.annotations(val_split)}'", *SMALL, *extra]

    @classmethod
    def train(cls, model_dir, *bindings):
        """`python -m official_maskrcnn.train --gin_file configs/custom_dataset.gin ...`."""
        gin.clear_config()
        runtime.parse_gin([CONFIG], list(bindings) or cls.bindings())
        stdout = io.StringIO()
        try:
            with contextlib.redirect_stdout(stdout):
                train.run(model_dir)
        finally:
            sys.stdout.write(stdout.getvalue()[-2000:])  # shown by pytest when a test fails
        return stdout.getvalue()

    def train_fails(self, model_dir, *bindings):
        with self.assertRaises(label_maps.LabelMapError) as raised:
            self.train(model_dir, *bindings)
        return str(raised.exception)

    def test_the_records_verify(self):
        for split in ("train", "val"):
            code, out = quietly(verify_tfrecord.main, [
                "--file_pattern", f"{self.root}/tfrecords/{split}-*",
                "--annotations_file", self.annotations(split)])
            self.assertEqual(code, 0, out)

    def test_training_took_the_class_count_from_the_records_and_saved_the_map(self):
        manifest = os.path.join(self.root, "tfrecords", "train.manifest.json")
        self.assertIn(f"label map: 5 classes from {manifest}; build_maskrcnn_model.num_classes "
                      f"= 6 (set from it)", self.train_out)
        with open(os.path.join(self.model_dir, "operative_config.gin")) as f:
            self.assertIn("build_maskrcnn_model.num_classes = 6", f.read())
        with open(os.path.join(self.model_dir, label_maps.LABEL_MAP_FILE)) as f:
            saved = json.load(f)
        self.assertEqual({row["id"]: row["name"] for row in saved}, CATEGORY_IDS)
        self.assertEqual([row["label"] for row in saved], [1, 2, 3, 4, 5])
        best = os.path.join(self.model_dir, best_checkpoint.BEST_DIR_NAME)
        self.assertTrue(tf.io.gfile.exists(os.path.join(best, best_checkpoint.METRICS_FILE_NAME)))

    def test_evaluate_the_best_checkpoint(self):
        gin.clear_config()
        runtime.parse_gin([CONFIG], self.bindings())
        best = os.path.join(self.model_dir, best_checkpoint.BEST_DIR_NAME)
        metrics, results, checkpoint = evaluate.evaluate_checkpoint(self.model_dir, best)
        self.assertStartsWith(checkpoint, best)
        self.assertLen(metrics["bbox"], 12)
        self.assertNotEmpty(results)
        self.assertContainsSubset({r["category_id"] for r in results}, set(CATEGORY_IDS))

    def test_predict_names_the_classes_from_the_saved_map_without_annotations(self):
        gin.clear_config()
        runtime.parse_gin([CONFIG], self.bindings() + ["run.eval_annotations_file = None"])
        best = os.path.join(self.model_dir, best_checkpoint.BEST_DIR_NAME)
        label_map = predictor_lib.run_label_map(best, None)
        self.assertEqual({label_map.label_to_category[label]: name
                          for label, name in label_map.class_names.items()}, CATEGORY_IDS)
        output_dir = os.path.join(self.create_tempdir().full_path, "pictures")
        image = os.path.join(self.root, "coco", "val", "000000000001.jpg")
        gin.clear_config()
        code, out = quietly(predict.run_command, [CONFIG],
                            self.bindings() + ["run.eval_annotations_file = None"], best,
                            output_dir, [image], 0.0)
        self.assertEqual(code, 0, out)
        with open(os.path.join(output_dir, predict.PREDICTIONS_FILE)) as f:
            predictions = json.load(f)
        self.assertNotEmpty(predictions)
        self.assertContainsSubset({r["category_id"] for r in predictions}, set(CATEGORY_IDS))

    def test_a_configured_num_classes_is_checked(self):
        model_dir = os.path.join(self.create_tempdir().full_path, "model")
        message = self.train_fails(model_dir, *self.bindings(),
                                   "build_maskrcnn_model.num_classes = 4")
        self.assertIn("build_maskrcnn_model.num_classes = 4", message)
        self.assertIn("train.manifest.json lists 5 classes (num_classes = 6)", message)
        self.assertFalse(os.path.exists(model_dir))  # nothing written
        # The same number is accepted.
        gin.clear_config()
        runtime.parse_gin([CONFIG], self.bindings() + ["build_maskrcnn_model.num_classes = 6"])
        self.assertIsNotNone(train.run_label_map(model_dir, runtime.run_settings()))

    def test_records_and_ground_truth_of_other_classes_are_refused(self):
        model_dir = os.path.join(self.create_tempdir().full_path, "model")
        # Eval records and ground truth of three classes beside training records of five.
        message = self.train_fails(model_dir, *self.bindings("train", "three"))
        self.assertIn("train.manifest.json and", message)
        self.assertIn("three.manifest.json disagree (5 classes vs 3)", message)
        # Training records of three classes into the model dir of the five-class run.
        message = self.train_fails(self.model_dir, *self.bindings("three", "three"))
        self.assertIn(os.path.join(self.model_dir, label_maps.LABEL_MAP_FILE), message)
        self.assertIn("(3 classes vs 5)", message)
        # Evaluating the five-class run against three-class ground truth.
        gin.clear_config()
        runtime.parse_gin([CONFIG], self.bindings("train", "three"))
        with self.assertRaisesRegex(label_maps.LabelMapError, "instances_three.json disagree"):
            evaluate.evaluate_checkpoint(self.model_dir)

    def test_the_commands_exit_1_with_one_error_line(self):
        gin.clear_config()
        stderr = io.StringIO()
        code = predict.run_command(
            [CONFIG], self.bindings("train", "three"), self.model_dir,
            os.path.join(self.create_tempdir().full_path, "out"),
            [os.path.join(self.root, "coco", "val", "000000000001.jpg")], stderr=stderr)
        self.assertEqual(code, 1)
        self.assertRegex(stderr.getvalue(), r"^error: the label maps of .* disagree .*\n$")


if __name__ == "__main__":
    tf.test.main()
