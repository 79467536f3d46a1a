"""The serving export end to end: a smoke model trained for two steps is exported (the CLI's
`run_command`), reloaded in a fresh Python process that never imports official_maskrcnn (plain
`tf.saved_model.load`), and its outputs on real coco128 images (landscape and portrait JPEGs, the
grayscale JPEG, a PNG; one batch of mixed sizes and each image alone) are compared with the
in-framework predictions: boxes, scores, classes, and the pasted masks against the evaluation's
C paster. Also: the other input types, a fixed batch size, thresholds, assets, `saved_model_cli`,
`predict --saved_model`, and the bad inputs of export time and of serving time.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import gin
import numpy as np
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_util

from official_maskrcnn import export, predict
from official_maskrcnn.inference import image_files
from official_maskrcnn.inference import predictor as predictor_lib
from official_maskrcnn.inference import serving
from official_maskrcnn.inference.image_files import PredictError
from tests.test_predict import SMOKE, trained_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO128_IMAGES = os.path.join(REPO, "..", "shared", "data", "coco128", "train2017")
LANDSCAPE, PORTRAIT, GRAYSCALE, FOR_PNG = ("000000000009.jpg", "000000000036.jpg",
                                           "000000000086.jpg", "000000000025.jpg")
OUTPUT_DTYPES = {"detection_boxes": "DT_FLOAT", "detection_scores": "DT_FLOAT",
                 "detection_classes": "DT_INT32", "num_detections": "DT_INT32",
                 "detection_masks": "DT_FLOAT", "detection_masks_image": "DT_UINT8",
                 "original_size": "DT_INT32"}

# A wrong input shape: refused by the loaded signature's binding (TypeError) or by the graph's
# own check (`serving.checked_input`); both name the shapes.
WRONG_SHAPE = ((TypeError, ValueError, tf.errors.InvalidArgumentError),
               r"Can not cast TensorSpec\(shape=|is not compatible with expected shape")

# Runs in a fresh interpreter: loads the export with TensorFlow alone, serves the images as one
# batch and one by one, and saves every output.
FRESH_PROCESS_SCRIPT = r"""
import sys
import numpy as np
import tensorflow as tf
export_dir, output, *paths = sys.argv[1:]
serve = tf.saved_model.load(export_dir).signatures["serving_default"]
encoded = [open(path, "rb").read() for path in paths]
arrays = {}
for key, value in serve(inputs=tf.constant(encoded)).items():
    arrays["batch/" + key] = value.numpy()
for i, data in enumerate(encoded):
    for key, value in serve(inputs=tf.constant([data])).items():
        arrays[f"alone{i}/" + key] = value.numpy()
assert not any(name.startswith("official_maskrcnn") for name in sys.modules), "imported"
np.savez(output, **arrays)
"""


def coco128_inputs(root):
    """The four test images: three coco128 JPEGs as they are and one re-encoded as PNG."""
    paths = [os.path.join(COCO128_IMAGES, name) for name in (LANDSCAPE, PORTRAIT, GRAYSCALE)]
    png = os.path.join(root, "inputs", os.path.splitext(FOR_PNG)[0] + ".png")
    os.makedirs(os.path.dirname(png))
    Image.open(os.path.join(COCO128_IMAGES, FOR_PNG)).save(png)
    return paths + [png]


def in_framework(predictor, label_to_category, path):
    """`predict`'s detections of one image at score threshold 0 (all the model returns)."""
    encoded, kind = image_files.read_image_bytes(path)
    outputs = predictor(image_files.decode_image(encoded, kind, path))
    keep = predictor_lib.select_detections(outputs, 0.0, 100)
    return predictor_lib.image_detections(outputs, keep, 1, label_to_category)


class ExportTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.annotations, cls.bindings, cls.model, cls.checkpoint = trained_checkpoint(cls.tmp)
        cls.images = coco128_inputs(cls.tmp)
        cls.export_dir = os.path.join(cls.tmp, "export")
        cls.stdout, cls.stderr = io.StringIO(), io.StringIO()
        gin.clear_config()  # run_command parses the config, as a fresh process would
        cls.code = export.run_command([SMOKE], cls.bindings, os.path.dirname(cls.checkpoint),
                                      cls.export_dir, score_threshold=0.0, stdout=cls.stdout,
                                      stderr=cls.stderr)
        # run_command parsed the config: the same model and preprocessing in this process.
        cls.parser = predictor_lib.eval_preprocessing()
        label_map = predictor_lib.load_label_map(cls.annotations)
        _, cls.label_to_category = predictor_lib.class_maps(label_map, 4)
        cls.predictor = predictor_lib.Predictor(cls.model, cls.parser)
        cls.expected = [in_framework(cls.predictor, cls.label_to_category, path)
                        for path in cls.images]
        cls.served = tf.saved_model.load(cls.export_dir).signatures["serving_default"]

    @classmethod
    def tearDownClass(cls):
        gin.clear_config()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def server(self, **kwargs):
        category_ids = [0] + [self.label_to_category[label] for label in (1, 2, 3)]
        return serving.DetectionServer(self.model, self.parser, category_ids, **kwargs)

    def assert_matches_in_framework(self, outputs, index, expected, where):
        """outputs: one image's slice of the serving outputs (numpy)."""
        count = int(outputs["num_detections"])
        self.assertEqual(count, len(expected["scores"]), where)
        self.assertGreater(count, 0, where)
        height, width = expected["masks"].shape[1:]
        self.assertAllEqual(outputs["original_size"], [height, width])
        self.assertAllClose(outputs["detection_boxes"][:count][:, [1, 0, 3, 2]],
                            expected["boxes_xyxy"], atol=1e-3, rtol=0, msg=where)
        self.assertAllClose(outputs["detection_scores"][:count], expected["scores"], atol=1e-4,
                            rtol=0, msg=where)
        self.assertAllEqual(outputs["detection_classes"][:count],
                            [self.label_to_category[int(label)] for label in expected["labels"]])
        masks = outputs["detection_masks_image"]
        differing = int((masks[:count, :height, :width] != expected["masks"]).sum())
        self.assertLessEqual(differing, 1e-4 * expected["masks"].size,
                             f"{where}: {differing} of {expected['masks'].size} mask pixels "
                             f"differ")
        # Padding slots and the canvas beyond this image are empty.
        self.assertEqual(masks[count:].sum() + masks[:, height:].sum() + masks[:, :, width:].sum(),
                         0, where)
        self.assertAllEqual(outputs["detection_scores"][count:], np.zeros(100 - count))
        return differing

    def assert_same_outputs(self, first, second, where=""):
        """One image's outputs of two signatures (two batches: oneDNN may round differently):
        boxes to 1e-3 px, scores and mask probabilities to 1e-4 (a sigmoid of logits in the
        tens, seen 1.5e-5 apart between a batch of 2 and of 1), the rest exactly, pasted masks
        on >= 99.99 % of pixels."""
        self.assertAllEqual(first["num_detections"], second["num_detections"])
        self.assertAllEqual(first["original_size"], second["original_size"])
        self.assertAllEqual(first["detection_classes"], second["detection_classes"])
        self.assertAllClose(first["detection_boxes"], second["detection_boxes"], atol=1e-3,
                            rtol=0, msg=where)
        for key in ("detection_scores", "detection_masks"):
            self.assertAllClose(first[key], second[key], atol=1e-4, rtol=0, msg=f"{where} {key}")
        masks = first["detection_masks_image"], second["detection_masks_image"]
        self.assertEqual(masks[0].shape, masks[1].shape)
        self.assertLessEqual(int((masks[0] != masks[1]).sum()), 1e-4 * max(masks[0].size, 1))

    def test_export_command(self):
        self.assertEqual(self.code, 0, self.stderr.getvalue())
        self.assertIn(f"to {self.export_dir}", self.stdout.getvalue())
        assets = os.path.join(self.export_dir, "assets")
        with open(os.path.join(assets, "label_map.json")) as f:
            self.assertEqual(json.load(f), [
                {"label": label, "id": self.label_to_category[label], "name": name}
                for label, name in zip((1, 2, 3), ("rectangle", "ellipse", "triangle"))])
        with open(os.path.join(assets, "export.json")) as f:
            settings = json.load(f)
        self.assertEqual((settings["input_type"], settings["batch_size"]), ("image_bytes", None))
        self.assertEqual(settings["checkpoint"], self.checkpoint)
        with open(os.path.join(assets, "config.gin")) as f:
            self.assertIn("build_maskrcnn_model.num_classes = 4", f.read())

    def test_fresh_process_serves_what_predict_predicts(self):
        output = os.path.join(self.tmp, "fresh.npz")
        subprocess.run([sys.executable, "-c", FRESH_PROCESS_SCRIPT, self.export_dir, output,
                        *self.images], check=True, capture_output=True, timeout=600)
        arrays = np.load(output)
        differing, pixels = 0, 0
        for i, expected in enumerate(self.expected):
            for where in ("batch", f"alone{i}"):
                row = i if where == "batch" else 0
                outputs = {key.split("/", 1)[1]: value[row] for key, value in arrays.items()
                           if key.startswith(where + "/")}
                differing += self.assert_matches_in_framework(outputs, i, expected,
                                                              f"{where}, {self.images[i]}")
                pixels += expected["masks"].size
        # The masks of the mixed batch's largest image set the canvas.
        largest = np.max([e["masks"].shape[1:] for e in self.expected], axis=0)
        self.assertEqual(arrays["batch/detection_masks_image"].shape[2:], tuple(largest))
        print(f"pasted masks: {differing} of {pixels} pixels differ from the in-framework paste")

    def test_saved_model_cli_lists_the_signature(self):
        cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
        shown = subprocess.run([cli, "show", "--dir", self.export_dir, "--tag_set", "serve",
                                "--signature_def", "serving_default"], check=True,
                               capture_output=True, text=True, timeout=600).stdout
        inputs, outputs = shown.split("output(s):", 1)
        self.assertRegex(inputs, r"inputs\['inputs'\] tensor_info:\s+dtype: DT_STRING\s+"
                                 r"shape: \(-1\)")
        for key, dtype in OUTPUT_DTYPES.items():
            self.assertRegex(outputs, rf"outputs\['{key}'\] tensor_info:\s+dtype: {dtype}")

    def test_tf_examples_with_a_score_threshold_and_a_cap(self):
        records = tf.io.gfile.glob(os.path.join(self.tmp, "rec", "t-*"))
        serialized = list(tf.data.TFRecordDataset(records).take(3).as_numpy_iterator())
        encoded = [tf.train.Example.FromString(s).features.feature["image/encoded"]
                   .bytes_list.value[0] for s in serialized]
        everything = {k: v.numpy() for k, v in self.served(inputs=tf.constant(encoded)).items()}
        threshold = float(everything["detection_scores"][0, 2])  # record 0 keeps 3
        outputs = self.server(score_threshold=threshold, max_detections=5).serving_function(
            "tf_example")(tf.constant(serialized))
        for i in range(3):
            count = min(5, int((everything["detection_scores"][i] >= threshold).sum()))
            self.assertEqual(int(outputs["num_detections"][i]), count)
            height, width = everything["original_size"][i]
            # The first `count` slots of the unthresholded outputs (slots beyond: zero).
            expected = {key: np.concatenate([value[i][:count], np.zeros_like(value[i][count:5])])
                        for key, value in everything.items()
                        if key not in ("num_detections", "original_size")}
            expected["detection_masks_image"] = expected["detection_masks_image"][
                :, :outputs["detection_masks_image"].shape[2],
                :outputs["detection_masks_image"].shape[3]]
            expected.update(num_detections=count, original_size=[height, width])
            self.assert_same_outputs({k: v[i].numpy() for k, v in outputs.items()}, expected,
                                     f"record {i}")
        self.assertEqual(int(outputs["num_detections"][0]), 3)
        self.assertAllEqual(outputs["original_size"], everything["original_size"])

    def test_no_detection_above_the_threshold(self):
        outputs = self.server(score_threshold=1.0, max_detections=7).serving_function(
            "image_bytes")(tf.constant([open(path, "rb").read() for path in self.images[:2]]))
        self.assertAllEqual(outputs["num_detections"], [0, 0])
        self.assertEqual(outputs["detection_boxes"].shape, (2, 7, 4))
        self.assertEqual(outputs["detection_masks_image"].shape[:2], (2, 7))
        for key in ("detection_boxes", "detection_scores", "detection_classes",
                    "detection_masks", "detection_masks_image"):
            self.assertEqual(float(tf.reduce_sum(tf.cast(outputs[key], tf.float32))), 0.0, key)

    def test_bad_requests_fail_the_call_not_the_server(self):
        good = open(self.images[0], "rb").read()
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                    r"serving input.*1.*is not a JPEG or PNG image"):
            self.served(inputs=tf.constant([good, b"GIF89a not an image"]))
        with self.assertRaises(tf.errors.InvalidArgumentError):
            self.served(inputs=tf.constant([good[:len(good) // 3]]))  # a truncated JPEG
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "is not a JPEG or PNG"):
            self.served(inputs=tf.constant([b""]))
        with self.assertRaisesRegex(*WRONG_SHAPE):
            self.served(inputs=tf.constant([[good, good]]))
        self.assertGreater(int(self.served(inputs=tf.constant([good]))["num_detections"][0]), 0)

    def test_bad_export_arguments(self):
        target = os.path.join(self.tmp, "never")
        cases = [
            (dict(checkpoint=os.path.join(self.tmp, "missing", "ckpt-3")), "no such checkpoint"),
            (dict(export_dir=self.export_dir), "exists; pass --overwrite"),
            (dict(batch_size="0"), "--batch_size must be a positive integer or 'dynamic'"),
            (dict(batch_size="two"), "--batch_size must be a positive integer or 'dynamic'"),
            (dict(score_threshold=1.5), r"--score_threshold must be in \[0, 1\]"),
            (dict(max_detections=0), r"max_detections must be in \[1, 100\]"),
            (dict(max_detections=101), r"max_detections must be in \[1, 100\]"),
            (dict(input_type="jpeg"), "--input_type must be one of"),
            (dict(gin_params=self.bindings + ["build_maskrcnn_model.num_classes = 7"]),
             "class"),
            (dict(gin_files=[]), "give at least one --gin_file"),
        ]
        for overrides, message in cases:
            arguments = dict(gin_files=[SMOKE], gin_params=self.bindings,
                             checkpoint=self.checkpoint, export_dir=target)
            arguments.update(overrides)
            stderr = io.StringIO()
            with self.subTest(overrides=overrides):
                gin.clear_config()
                code = export.run_command(arguments["gin_files"], arguments["gin_params"],
                                          arguments["checkpoint"], arguments["export_dir"],
                                          overrides.get("input_type", "image_bytes"),
                                          overrides.get("batch_size", "dynamic"),
                                          overrides.get("score_threshold", 0.0),
                                          overrides.get("max_detections", 100),
                                          stdout=io.StringIO(), stderr=stderr)
                self.assertEqual(code, 1)
                self.assertRegex(stderr.getvalue(), message)
                self.assertFalse(os.path.exists(target))
        self.assertFalse([name for name in os.listdir(self.tmp) if name.startswith(".export-")])

    def test_overwrite_with_a_fixed_batch_of_tensors(self):
        target = os.path.join(self.tmp, "fixed")
        os.makedirs(target)
        with open(os.path.join(target, "old.txt"), "w") as f:
            f.write("the previous export")
        stderr = io.StringIO()
        gin.clear_config()
        code = export.run_command([SMOKE], self.bindings, self.checkpoint, target,
                                  "image_tensor", "2", 0.0, 100, overwrite=True,
                                  stdout=io.StringIO(), stderr=stderr)
        self.assertEqual(code, 0, stderr.getvalue())
        self.assertFalse(os.path.exists(os.path.join(target, "old.txt")))
        serve = tf.saved_model.load(target).signatures["serving_default"]
        self.assertEqual(serve.structured_input_signature[1]["inputs"].shape.as_list(),
                         [2, None, None, 3])
        pixels = np.asarray(Image.open(self.images[1]).convert("RGB"))
        flipped = np.ascontiguousarray(pixels[:, ::-1])
        outputs = {k: v.numpy() for k, v in serve(inputs=tf.constant(np.stack(
            [flipped, pixels]))).items()}
        self.assert_matches_in_framework({k: v[1] for k, v in outputs.items()}, 1,
                                         self.expected[1], "fixed batch of tensors, portrait")
        # The same pixels as bytes (a lossless PNG) give the same outputs.
        buffer = io.BytesIO()
        Image.fromarray(flipped).save(buffer, format="PNG")
        as_bytes = self.served(inputs=tf.constant([buffer.getvalue()]))
        self.assert_same_outputs({k: v[0] for k, v in outputs.items()},
                                 {k: v[0].numpy() for k, v in as_bytes.items()})
        for wrong in (tf.zeros([3, 32, 32, 3], tf.uint8), tf.zeros([2, 32, 32, 4], tf.uint8),
                      tf.zeros([2, 32, 32], tf.uint8)):
            with self.assertRaisesRegex(*WRONG_SHAPE):
                serve(inputs=wrong)
        with self.assertRaisesRegex((TypeError, tf.errors.InvalidArgumentError),
                                    r"dtype=tf.uint8|expected to be a uint8 tensor"):
            serve(inputs=tf.zeros([2, 32, 32, 3], tf.float32))

    def test_predict_with_the_saved_model(self):
        output_dir = os.path.join(self.tmp, "predict_saved")
        stdout, stderr = io.StringIO(), io.StringIO()
        code = predict.run_command([], [], None, output_dir, self.images, 0.0, 100,
                                   stdout=stdout, stderr=stderr, saved_model=self.export_dir)
        self.assertEqual(code, 0, stderr.getvalue())
        with open(os.path.join(output_dir, predict.PREDICTIONS_FILE)) as f:
            results = json.load(f)
        expected = [r for e in self.expected for r in e["results"]]
        self.assertLen(results, len(expected))
        ids = image_files.assign_image_ids(self.images)
        counts = [len(e["results"]) for e in self.expected]
        self.assertEqual([r["image_id"] for r in results],
                         [i for i, n in zip(ids, counts) for _ in range(n)])
        # The same masks up to float rounding: the two graphs may round a logit differently
        # (oneDNN picks kernels per shape), which flips a pixel whose probability is within
        # rounding of 0.5 and so changes that mask's RLE string (one pixel in ~30k, seen on a
        # few of 400 masks). The criterion of `assert_matches_in_framework`: <= 1e-4 of pixels.
        differing = sum(int((mask_util.decode(a["segmentation"])
                             != mask_util.decode(b["segmentation"])).sum())
                        for a, b in zip(results, expected)
                        if a["segmentation"] != b["segmentation"])
        pixels = sum(int(np.prod(b["segmentation"]["size"])) for b in expected)
        self.assertLessEqual(differing, 1e-4 * pixels, f"{differing} of {pixels} mask pixels")
        for got, want in zip(results, expected):
            self.assertEqual(got["category_id"], want["category_id"])
            self.assertAllClose(got["bbox"], want["bbox"], atol=1e-3, rtol=0)
        for path in self.images:
            stem = os.path.splitext(os.path.basename(path))[0]
            self.assertTrue(os.path.exists(os.path.join(output_dir, stem + ".png")))

    def test_predict_saved_model_errors(self):
        stderr = io.StringIO()
        code = predict.run_command([SMOKE], [], self.checkpoint, os.path.join(self.tmp, "x"),
                                   self.images[:1], stderr=stderr, saved_model=self.export_dir)
        self.assertEqual(code, 1)
        self.assertIn("--saved_model carries its model and config", stderr.getvalue())
        with self.assertRaisesRegex(PredictError, "no saved_model.pb there"):
            predict.predict_saved_model(self.images[:1], os.path.join(self.tmp, "y"), self.tmp)


if __name__ == "__main__":
    tf.test.main()
