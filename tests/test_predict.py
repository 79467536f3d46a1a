"""The predict entry on a tiny model trained for two steps: pictures, COCO results, errors.

One synthetic split (8 images of at most 96 px) trains the smoke config's model (ResNet-18, group
norm, 4 classes) for two SGD steps; its checkpoint is then used to predict on a landscape JPEG,
a portrait JPEG and a grayscale PNG, with a score threshold of 0 so that detections exist.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

import gin
import numpy as np
import tensorflow as tf
import tf_keras
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from official_maskrcnn import predict, runtime
from official_maskrcnn.data import dataset_builder, decoder
from official_maskrcnn.inference import image_files
from official_maskrcnn.inference import predictor as predictor_lib
from official_maskrcnn.inference.image_files import PredictError
from official_maskrcnn.training import optimizer as optimizer_lib
from tfrecord_tools import conversion, make_synthetic_coco

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "configs", "smoke_cpu.gin")
CATEGORY_IDS = {3, 7, 11}  # make_synthetic_coco's classes


def make_data(root):
    """The synthetic split, its records, and the gin bindings pointing the smoke config there."""
    with mock.patch("sys.stderr", io.StringIO()):
        make_synthetic_coco.main(["--output_dir", os.path.join(root, "coco"), "--split", "t",
                                  "--num_images", "8", "--image_size", "96", "--seed", "3"])
    annotations = os.path.join(root, "coco", "annotations", "instances_t.json")
    conversion.convert(os.path.join(root, "coco", "t"), annotations,
                       os.path.join(root, "rec", "t"), 1, 1, progress_stream=io.StringIO())
    return annotations, [f"train/DatasetBuilder.file_pattern = '{root}/rec/t-*'",
                         f"coco_annotations_file = '{annotations}'"]


def train_two_steps(bindings):
    """The smoke model after two SGD steps on real batches; returns it (weights changed)."""
    gin.clear_config()
    runtime.parse_gin([SMOKE], bindings)
    tf_keras.utils.set_random_seed(1)
    model = runtime.build_model(tf.distribute.get_strategy(), "float32")
    with gin.config_scope("train"):
        builder = dataset_builder.DatasetBuilder(is_training=True, global_batch_size=2, seed=1)
    optimizer = optimizer_lib.MomentumSGD(0.01)
    initial = [v.numpy() for v in model.trainable_variables]
    for batch in builder().take(2):
        batch = {key: value for key, value in batch.items() if key != "source_id"}
        with tf.GradientTape() as tape:
            loss = model(batch, training=True)["total_loss"]
        assert np.isfinite(loss.numpy()), loss
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    changed = sum(not np.array_equal(a, v.numpy())
                  for a, v in zip(initial, model.trainable_variables))
    assert changed > 10, changed
    return model


def trained_checkpoint(root):
    """make_data + train_two_steps + a checkpoint of the model: (annotations, bindings, model,
    checkpoint prefix under root/model)."""
    annotations, bindings = make_data(root)
    model = train_two_steps(bindings)
    checkpoint = tf.train.Checkpoint(model=model).save(os.path.join(root, "model", "ckpt"))
    return annotations, bindings, model, checkpoint


def pick_inputs(root, annotations):
    """A landscape JPEG, a portrait JPEG and a grayscale PNG (COCO-style names)."""
    with open(annotations) as f:
        images = json.load(f)["images"]
    landscape = next(i for i in images if i["width"] > i["height"])
    portrait = next(i for i in images if i["height"] > i["width"])
    third = next(i for i in images if i not in (landscape, portrait))
    os.makedirs(os.path.join(root, "png"))
    png = os.path.join(root, "png", os.path.splitext(third["file_name"])[0] + ".png")
    Image.open(os.path.join(root, "coco", "t", third["file_name"])).convert("L").save(png)
    return [os.path.join(root, "coco", "t", landscape["file_name"]),
            os.path.join(root, "coco", "t", portrait["file_name"]), png]


class PredictTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.annotations, cls.bindings, cls.model, cls.checkpoint = trained_checkpoint(cls.tmp)
        cls.images = pick_inputs(cls.tmp, cls.annotations)
        cls.output_dir = os.path.join(cls.tmp, "out")
        cls.stdout = io.StringIO()
        cls.results = predict.predict(cls.images, cls.output_dir, cls.checkpoint,
                                      score_threshold=0.0, stream=cls.stdout)

    @classmethod
    def tearDownClass(cls):
        gin.clear_config()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        gin.clear_config()
        runtime.parse_gin([SMOKE], self.bindings)

    def image_ids(self):
        return [int(os.path.splitext(os.path.basename(path))[0]) for path in self.images]

    def test_pictures_are_the_original_size_with_detections_drawn(self):
        self.assertGreater(len(self.results), 3)  # the threshold of 0 keeps detections
        for path in self.images:
            stem = os.path.splitext(os.path.basename(path))[0]
            original = np.asarray(Image.open(path).convert("RGB"))
            with Image.open(os.path.join(self.output_dir, stem + ".png")) as picture:
                self.assertEqual((picture.format, picture.mode), ("PNG", "RGB"))
                drawn = np.asarray(picture)
            self.assertEqual(drawn.shape, original.shape)
            self.assertGreater((drawn != original).any(-1).mean(), 0.05)
        lines = self.stdout.getvalue().splitlines()
        self.assertLen(lines, 4)
        for path, line in zip(self.images, lines):
            self.assertRegex(line, rf"^{path}: image_id \d+, \d+ detection\(s\) kept -> .*\.png$")

    def test_predictions_json_is_coco_results_that_pycocotools_loads(self):
        with open(os.path.join(self.output_dir, "predictions.json")) as f:
            results = json.load(f)
        self.assertEqual(results, json.loads(json.dumps(self.results)))
        ground_truth = COCO(self.annotations)
        loaded = ground_truth.loadRes(results)
        self.assertLen(loaded.getAnnIds(), len(results))
        self.assertEqual({r["image_id"] for r in results}, set(self.image_ids()))
        sizes = {img["id"]: [img["height"], img["width"]]
                 for img in ground_truth.loadImgs(self.image_ids())}
        for result in results:
            self.assertIn(result["category_id"], CATEGORY_IDS)
            self.assertIsInstance(result["segmentation"]["counts"], str)
            self.assertEqual(result["segmentation"]["size"], sizes[result["image_id"]])
            x, y, w, h = result["bbox"]
            height, width = sizes[result["image_id"]]
            self.assertTrue(0 <= x and 0 <= y, result["bbox"])
            # Clipped to the image, plus the reference's "+1" width (float rounding allowed).
            self.assertTrue(x + w <= width + 1.001 and y + h <= height + 1.001, result["bbox"])
            self.assertGreaterEqual(result["score"], 0.05)  # the model's own threshold
        with open(os.path.join(self.output_dir, "images.json")) as f:
            self.assertEqual(json.load(f), {str(i): os.path.abspath(p)
                                            for i, p in zip(self.image_ids(), self.images)})

    def test_restored_model_gives_the_trained_models_detections(self):
        predictor = predictor_lib.Predictor(self.model, predictor_lib.eval_preprocessing())
        label_map = predictor_lib.load_label_map(self.annotations)
        _, label_to_category = predictor_lib.class_maps(label_map, 4)
        expected = []
        for path, image_id in zip(self.images, self.image_ids()):
            encoded, kind = image_files.read_image_bytes(path)
            outputs = predictor(image_files.decode_image(encoded, kind))
            detections = predictor_lib.image_detections(
                outputs, predictor_lib.select_detections(outputs, 0.0, 100), image_id,
                label_to_category)
            expected.extend(detections["results"])
            # The drawn masks are the pixels of the results' RLEs.
            for mask, result in zip(detections["masks"], detections["results"]):
                np.testing.assert_array_equal(mask, mask_util.decode(result["segmentation"]))
        self.assertEqual(len(expected), len(self.results))
        for ours, theirs in zip(expected, self.results):
            self.assertEqual((ours["image_id"], ours["category_id"]),
                             (theirs["image_id"], theirs["category_id"]))
            self.assertAllClose(ours["bbox"], theirs["bbox"], atol=1e-3)
            self.assertAllClose(ours["score"], theirs["score"], atol=1e-5)
        # One traced function per padded shape: landscape, then portrait (the PNG is either).
        self.assertEqual(predictor.infer.experimental_get_tracing_count(), 2)

    def test_preprocessing_equals_the_eval_parser(self):
        parser = predictor_lib.eval_preprocessing()
        self.assertEqual((parser.min_size, parser.max_size, parser.pixel_mode),
                         (64, 96, "bgr_caffe"))  # the smoke config's unscoped bindings
        predictor = predictor_lib.Predictor(self.model, parser)
        for path in self.images[:2]:
            with open(path, "rb") as f:
                encoded = f.read()
            image = decoder.decode_image(encoded)
            expected = parser({"encoded_image": encoded, "height": tf.shape(image)[0],
                               "width": tf.shape(image)[1], "source_id": tf.constant(1, tf.int64)})
            ours = predictor.preprocess(image)
            for key in ("images", "image_size", "scale"):
                self.assertAllEqual(ours[key], expected[key])
        with gin.unlock_config():
            gin.parse_config("eval/DatasetBuilder.min_size = 32")
        self.assertEqual(predictor_lib.eval_preprocessing().min_size, 32)

    def test_max_detections_and_score_threshold_limit_the_count(self):
        output_dir = self.create_tempdir().full_path
        results = predict.predict(self.images[:1], output_dir, os.path.dirname(self.checkpoint),
                                  score_threshold=0.0, max_detections=2, stream=io.StringIO())
        first = [r for r in self.results if r["image_id"] == self.image_ids()[0]]
        self.assertGreater(len(first), 2)
        self.assertEqual([r["score"] for r in results], [r["score"] for r in first[:2]])
        threshold = float(np.median([r["score"] for r in first]))
        strict = predict.predict(self.images[:1], output_dir, self.checkpoint,
                                 score_threshold=threshold, stream=io.StringIO())
        self.assertEqual(len(strict), sum(r["score"] >= threshold for r in first))

    def test_bad_images_are_named_and_exit_1_before_anything_is_written(self):
        fake = os.path.join(self.create_tempdir().full_path, "notes.jpg")
        with open(fake, "w") as f:
            f.write("not an image\n")
        missing = os.path.join(self.tmp, "missing.jpg")
        output_dir = os.path.join(self.create_tempdir().full_path, "never")
        stderr = io.StringIO()
        gin.clear_config()  # run_command parses the config, as a fresh process would
        code = predict.run_command([SMOKE], self.bindings, self.checkpoint, output_dir,
                                   [self.images[0], missing, fake], stderr=stderr)
        self.assertEqual(code, 1)
        message = stderr.getvalue()
        self.assertIn("2 of 3 input(s) cannot be used", message)
        self.assertIn(f"{missing}: no such file", message)
        self.assertIn(f"{fake}: not a JPEG or PNG image", message)
        self.assertFalse(os.path.exists(output_dir))

    def test_checkpoint_errors(self):
        output_dir = self.create_tempdir().full_path
        with self.assertRaisesRegex(PredictError, "no such checkpoint"):
            predict.predict(self.images, output_dir, os.path.join(self.tmp, "nope", "ckpt-3"))
        with self.assertRaisesRegex(PredictError, "no checkpoint in this folder"):
            predict.predict(self.images, output_dir, output_dir)
        other = tf.train.Checkpoint(model=tf_keras.layers.Dense(2))
        other.model.build([None, 3])
        prefix = other.save(os.path.join(output_dir, "other", "ckpt"))
        with self.assertRaisesRegex(PredictError, "does not hold this config's model"):
            predict.predict(self.images, output_dir, prefix)

    def test_a_truncated_newest_checkpoint_falls_back_in_a_folder_and_is_named_as_a_prefix(self):
        folder = os.path.join(self.create_tempdir().full_path, "run")
        manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=self.model), folder, 3)
        first, second = manager.save(1), manager.save(2)
        with open(tf.io.gfile.glob(second + ".data-*")[0], "r+b") as f:
            f.truncate(100)  # a copy cut short
        output_dir = self.create_tempdir().full_path
        with self.assertLogs(level="WARNING") as logs:
            results = predict.predict(self.images[:1], output_dir, folder, score_threshold=0.0,
                                      stream=io.StringIO())
        self.assertIn(f"checkpoint {second} cannot be restored", "\n".join(logs.output))
        self.assertIn(f"restored {first}", "\n".join(logs.output))
        first_image = [r for r in self.results if r["image_id"] == self.image_ids()[0]]
        self.assertEqual([r["score"] for r in results], [r["score"] for r in first_image])
        with self.assertRaises(PredictError) as raised:
            predict.predict(self.images[:1], output_dir, second)
        self.assertNotIn("\n", str(raised.exception))
        self.assertIn(f"{second}: IndexError", str(raised.exception))

    def test_without_annotations_labels_are_names_and_category_ids(self):
        names, categories = predictor_lib.class_maps(None, 4)
        self.assertEqual(names, {1: "class 1", 2: "class 2", 3: "class 3"})
        self.assertEqual(categories, {1: 1, 2: 2, 3: 3})
        label_map = predictor_lib.load_label_map(self.annotations)
        names, categories = predictor_lib.class_maps(label_map, 4)
        self.assertEqual(names, {1: "rectangle", 2: "ellipse", 3: "triangle"})
        self.assertEqual(categories, {1: 3, 2: 7, 3: 11})
        with self.assertRaisesRegex(PredictError, "has 3 categories, but the model"):
            predictor_lib.class_maps(label_map, 81)

    def test_command_line_exit_code_and_message(self):
        missing = os.path.join(self.tmp, "missing.png")
        process = subprocess.run(
            [sys.executable, "-m", "official_maskrcnn.predict", "--gin_file", SMOKE,
             *[arg for binding in self.bindings for arg in ("--gin_param", binding)],
             "--checkpoint", self.checkpoint, "--output_dir", os.path.join(self.tmp, "cli"),
             missing], capture_output=True, text=True, cwd=REPO, timeout=300)
        self.assertEqual(process.returncode, 1, process.stderr[-2000:])
        self.assertIn(f"{missing}: no such file", process.stderr)


if __name__ == "__main__":
    tf.test.main()
