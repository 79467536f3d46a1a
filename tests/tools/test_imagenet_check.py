"""Tests for the R-50.pkl self-check (tools/imagenet_check.py, convert_r50_pkl --check).

The fake pickle's network is random, so its real fc1000 means nothing; the tests plant one. The
planted classifier is computed from an independent reference: the shipped JPEGs decoded by PIL,
put in Detectron's convention by hand (BGR, minus the mean written out below), and run through
the numpy ResNet-50 of test_convert_r50_pkl, reading the pickle's blobs by name. For each image,
its class's row is the linear separator that gives +1 to that image's reference C5 features and
-1 to the other images' and to the features the same images get after a plausible mistake: RGB
order, no mean, the mean in RGB order, conv kernels with kh and kw swapped (scaled to +-10 as
logits; every other class has logit 0). So the expected class wins only if our TF path (restore
from the written checkpoint, the input pipeline's preprocessing) reproduces the reference, and
each of those mistakes, made in our code, pushes the class out of the top 5.

What this cannot show: that a real R-50.pkl passes. The separator is built against exactly these
mistakes; others (e.g. a subtly wrong mean on a real network) are caught only as far as they
move a real classifier's top 5.
"""

import contextlib
import io
import os
import pickle
import re
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf
from PIL import Image

from official_maskrcnn.data import preprocess_ops
from official_maskrcnn.modeling.backbones import checkpoint
from official_maskrcnn.tools import convert_r50_pkl, imagenet_check
from tests.tools.test_convert_r50_pkl import _fake_r50_blobs, _np_r50

# Detectron's pixel mean in BGR order (REFERENCE.md), written out rather than imported.
DETECTRON_BGR_MEAN = np.array([102.9801, 115.9465, 122.7717])
# logits of the planted rows: +PLANT_SCALE for the image's class, -PLANT_SCALE for the others;
# every other class has a zero row and bias, logit 0.
PLANT_SCALE = 10.0
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _reference_pooled(encoded, blobs, variant="ok"):
    """Independent reference: JPEG bytes -> [2048] average-pooled C5, float64.

    The forward pass runs in float32 (ten times faster than float64 here, and the comparison
    is at 1e-3); independence, not precision, is what the reference is for.

    variant: "ok" (Detectron's convention), "rgb" (channels not reversed), "no_mean"
    (BGR 0..255), "mean_rgb" (BGR minus the mean in RGB order). Kernel mistakes come in
    through `blobs`.
    """
    rgb = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"), np.float64)
    bgr = rgb[..., ::-1]
    pixels = {"ok": bgr - DETECTRON_BGR_MEAN, "rgb": rgb - DETECTRON_BGR_MEAN, "no_mean": bgr,
              "mean_rgb": bgr - DETECTRON_BGR_MEAN[::-1]}[variant]
    return _np_r50(pixels, blobs, np.float32)["5"].mean(axis=(0, 1), dtype=np.float64)


def _swap_kernel_axes(blobs):
    """The blobs as a converter that mixed up kh and kw would read them ([out, in, kw, kh])."""
    return {k: (np.swapaxes(v, 2, 3) if k.endswith("_w") and v.ndim == 4 else v)
            for k, v in blobs.items()}


def _plant_classifier(positives, negatives, classes):
    """fc1000 (w [1000, C], b [1000]) whose row classes[i] gives +PLANT_SCALE to positives[i]
    and -PLANT_SCALE to every other positive and every negative (min-norm exact solution)."""
    features = np.concatenate([positives, negatives])  # [P + Q, C]
    augmented = np.concatenate([features, np.ones([len(features), 1])], axis=1)
    w = np.zeros([imagenet_check.NUM_CLASSES, features.shape[1]])
    b = np.zeros([imagenet_check.NUM_CLASSES])
    for i, cls in enumerate(classes):
        target = -np.ones(len(features))
        target[i] = 1.0
        solution = np.linalg.lstsq(augmented, target * PLANT_SCALE, rcond=None)[0]
        w[cls], b[cls] = solution[:-1], solution[-1]
    return w.astype(np.float32), b.astype(np.float32)


def _softmax(logits):
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def _write_pickle(path, blobs):
    # Detectron's own pickles are protocol 2 (test_convert_r50_pkl reads those); the newest
    # protocol writes the same arrays several times faster.
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=pickle.HIGHEST_PROTOCOL)


def _run_main(argv):
    """convert_r50_pkl.main(argv) -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = convert_r50_pkl.main(argv)
    return code, out.getvalue(), err.getvalue()


class ImagenetCheckTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.images = imagenet_check.load_check_images()
        cls.classes = [min(image["expected"]) for image in cls.images]
        # Without the *_momentum blobs: half the pickle to write and read, same conversion.
        blobs = {k: v for k, v in _fake_r50_blobs().items()
                 if not k.endswith(convert_r50_pkl.MOMENTUM_SUFFIX)}
        swapped = _swap_kernel_axes(blobs)
        encoded = [image["encoded"] for image in cls.images]
        cls.reference = np.stack([_reference_pooled(e, blobs) for e in encoded])
        negatives = np.stack([_reference_pooled(e, blobs, v) for e in encoded
                              for v in ("rgb", "no_mean", "mean_rgb")]
                             + [_reference_pooled(e, swapped) for e in encoded])
        cls.fc_w, cls.fc_b = _plant_classifier(cls.reference, negatives, cls.classes)
        cls.blobs = {**blobs, "fc1000_w": cls.fc_w, "fc1000_b": cls.fc_b}
        cls.pkl = os.path.join(cls.tmp, "planted.pkl")
        _write_pickle(cls.pkl, cls.blobs)
        cls.prefix = os.path.join(cls.tmp, "planted", "r50")
        cls.code, cls.stdout, cls.stderr = _run_main(
            ["--input", cls.pkl, "--output", cls.prefix, "--check"])
        cls.backbone = checkpoint.build_reference_backbone()
        checkpoint.load_backbone_checkpoint(cls.backbone, cls.prefix)

    def _run(self, weights=None, bias=None):
        return imagenet_check.run_self_check(
            self.backbone, self.fc_w if weights is None else weights,
            self.fc_b if bias is None else bias)

    def test_planted_classifier_passes_check(self):
        self.assertEqual(self.code, 0, self.stderr)
        self.assertEqual(self.stderr, "")
        self.assertIn("self-check passed", self.stdout)
        for image, cls in zip(self.images, self.classes):
            self.assertRegex(self.stdout, rf"{re.escape(image['file'])} \(expected {cls} .*\): ok")

    def test_probabilities_match_the_numpy_reference(self):
        logits = self.reference @ self.fc_w.T.astype(np.float64) + self.fc_b
        expected = _softmax(logits)
        for result, probs, cls in zip(self._run(), expected, self.classes):
            indices = [i for i, _, _ in result["top"]]
            # The planted class first, then the zero-logit classes in index order.
            self.assertEqual(indices, [cls] + [i for i in range(6) if i not in self.classes][:4])
            self.assertGreater(probs[cls], 0.9)
            self.assertAllClose([p for _, _, p in result["top"]], probs[indices], rtol=1e-3)
            self.assertTrue(result["passed"])

    def test_channel_order_mistake_fails(self):
        # The pipeline forgetting RGB -> BGR: the check must see it, since it preprocesses with
        # the pipeline's own functions.
        with mock.patch.object(preprocess_ops, "order_channels", lambda image, mode: image):
            results = self._run()
        self.assertEqual([r["passed"] for r in results], [False] * 3)

    def test_mean_mistakes_fail(self):
        for mean in ((0.0, 0.0, 0.0), tuple(DETECTRON_BGR_MEAN[::-1])):
            with mock.patch.object(preprocess_ops, "CAFFE_BGR_MEAN", mean):
                results = self._run()
            self.assertEqual([r["passed"] for r in results], [False] * 3, mean)

    def test_kernel_mapping_mistake_fails_check(self):
        pkl = os.path.join(self.create_tempdir().full_path, "swapped.pkl")
        _write_pickle(pkl, _swap_kernel_axes(self.blobs))
        prefix = os.path.join(self.create_tempdir().full_path, "r50")
        code, stdout, stderr = _run_main(["--input", pkl, "--output", prefix, "--check"])
        self.assertEqual(code, 1)
        self.assertIn("error: self-check failed", stderr)
        self.assertIn("3 of 3 image(s)", stderr)
        for image in self.images:
            self.assertRegex(stderr, rf"{re.escape(image['file'])} .*NOT in the top 5")
        self.assertIn("NOT in the top 5", stdout)  # the table is printed before the error

    def test_wrong_planted_classifier_fails_check_and_warns_without(self):
        # The pizza's row moved to class 0: the pizza image now wins class 0, not 963. Run as
        # main runs it after writing, on the planted checkpoint already written.
        w, b = self.fc_w.copy(), self.fc_b.copy()
        pizza = self.classes[0]
        w[[0, pizza]], b[[0, pizza]] = w[[pizza, 0]], b[[pizza, 0]]
        report = {"checkpoint": self.prefix, "classifier": (w, b)}
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(
                imagenet_check.SelfCheckFailed) as cm:
            convert_r50_pkl.self_check(report, check=True)
        name = re.escape(self.images[0]["file"])
        self.assertRegex(str(cm.exception), rf"1 of 3 image\(s\).*\n{name} \(expected {pizza} "
                         r"pizza\): NOT in the top 5\n    1\.    0 tench")
        for image in self.images[1:]:
            self.assertNotIn(image["file"], str(cm.exception))
            self.assertRegex(out.getvalue(), rf"{re.escape(image['file'])} .*: ok")
        # Without --check: the same table, a warning, exit 0.
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = convert_r50_pkl.self_check(report)
        self.assertEqual(code, 0)
        self.assertRegex(out.getvalue(), rf"warning: self-check failed.*1 of 3.*\n{name}")
        self.assertIn("(--check makes this an error)", out.getvalue())

    def test_without_fc1000(self):
        tmp = self.create_tempdir().full_path
        pkl = os.path.join(tmp, "no_fc.pkl")
        _write_pickle(pkl, {k: v for k, v in self.blobs.items() if not k.startswith("fc1000")})
        code, _, stderr = _run_main(["--input", pkl, "--output", os.path.join(tmp, "a"),
                                     "--check"])
        self.assertEqual(code, 1)
        self.assertRegex(stderr, r"no_fc\.pkl has no classifier blobs fc1000_w, fc1000_b: "
                         r"--check cannot .*nothing written.*--no_self_check")
        self.assertFalse(tf.io.gfile.exists(os.path.join(tmp, "a.index")))
        code, stdout, _ = _run_main(["--input", pkl, "--output", os.path.join(tmp, "b")])
        self.assertEqual(code, 0)
        self.assertIn("warning: self-check skipped: ", stdout)
        self.assertIn("has no classifier blobs fc1000_w, fc1000_b", stdout)
        self.assertTrue(tf.io.gfile.exists(os.path.join(tmp, "b.index")))

    def test_no_self_check(self):
        prefix = os.path.join(self.create_tempdir().full_path, "r50")
        code, stdout, _ = _run_main(["--input", self.pkl, "--output", prefix,
                                     "--no_self_check"])
        self.assertEqual(code, 0)
        self.assertIn("self-check skipped (--no_self_check)", stdout)
        self.assertNotIn("top 5", stdout)
        self.assertTrue(tf.io.gfile.exists(prefix + ".index"))

    def test_check_and_no_self_check_exclude_each_other(self):
        with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            convert_r50_pkl.main(["--input", "x", "--output", "y", "--check", "--no_self_check"])

    def test_bad_classifier_blobs_are_named(self):
        half = {k: v for k, v in self.blobs.items() if k != "fc1000_b"}
        with self.assertRaisesRegex(checkpoint.BackboneWeightsError,
                                    "f.pkl: has fc1000_w but not fc1000_b"):
            imagenet_check.classifier_from_blobs(half, "f.pkl")
        narrow = self.fc_w[:, :1024]
        with self.assertRaisesRegex(checkpoint.BackboneWeightsError,
                                    r"f.pkl: blob fc1000_w: expected shape \(1000, 2048\), "
                                    r"found \(1000, 1024\)"):
            imagenet_check.classifier_from_blobs({**self.blobs, "fc1000_w": narrow}, "f.pkl")
        # Through the command: --check refuses it before converting (so a pickle of the
        # classifier alone is enough to show it).
        tmp = self.create_tempdir().full_path
        pkl = os.path.join(tmp, "bad.pkl")
        _write_pickle(pkl, {"fc1000_w": narrow, "fc1000_b": self.fc_b})
        code, _, stderr = _run_main(["--input", pkl, "--output", os.path.join(tmp, "a"),
                                     "--check"])
        self.assertEqual(code, 1)
        self.assertIn("bad.pkl: blob fc1000_w", stderr)
        self.assertFalse(tf.io.gfile.exists(os.path.join(tmp, "a.index")))

    def test_format_result(self):
        result = {"file": "a.jpg", "expected": {963: "pizza, pizza pie", 7: "cock"},
                  "top": [(963, "pizza, pizza pie", 0.9123), (0, "tench, Tinca tinca", 0.05),
                          (1, "goldfish", 0.02), (2, "x", 0.01), (3, "y", 0.0077)],
                  "passed": True}
        self.assertEqual(imagenet_check.format_result(result), [
            "a.jpg (expected 7 cock, 963 pizza): ok",
            "    1.  963 pizza                     91.23%",
            "    2.    0 tench                      5.00%",
            "    3.    1 goldfish                   2.00%",
            "    4.    2 x                          1.00%",
            "    5.    3 y                          0.77%"])
        result["passed"] = False
        self.assertEqual(imagenet_check.format_result(result)[0],
                         "a.jpg (expected 7 cock, 963 pizza): NOT in the top 5")


class CheckDataTest(tf.test.TestCase):

    def test_data_files_come_with_the_package(self):
        package_dir = os.path.dirname(os.path.abspath(imagenet_check.__file__))
        path = imagenet_check.data_path(imagenet_check.IMAGES_JSON)
        self.assertEqual(os.path.dirname(os.fspath(path)),
                         os.path.join(package_dir, imagenet_check.DATA_DIR))
        # setup.cfg ships every file of the data folder (installed copies read them the same way).
        with open(os.path.join(REPO_ROOT, "setup.cfg")) as f:
            setup_cfg = f.read()
        for name in os.listdir(os.path.dirname(os.fspath(path))):
            self.assertIn(f"{imagenet_check.DATA_DIR}/*{os.path.splitext(name)[1]}", setup_cfg)

    def test_class_names(self):
        names = imagenet_check.load_class_names()
        self.assertLen(names, 1000)
        self.assertLen(set(names), 1000)
        self.assertEqual(names[0], "tench, Tinca tinca")
        self.assertEqual((names[340], names[779], names[850], names[963]),
                         ("zebra", "school bus", "teddy, teddy bear", "pizza, pizza pie"))

    def test_images(self):
        images = imagenet_check.load_check_images()
        self.assertLen(images, 3)
        names = imagenet_check.load_class_names()
        for image in images:
            self.assertLess(len(image["encoded"]), 30_000)
            self.assertEqual(Image.open(io.BytesIO(image["encoded"])).size, (224, 224))
            for index, name in image["expected"].items():
                self.assertEqual(names[index], name)
            for key in ("image_id", "coco_url", "license", "license_url"):
                self.assertIn(key, image["coco"])

    def test_pipeline_pixel_mode_is_detectrons(self):
        # The recipe feeds the backbone what the check feeds it.
        with open(os.path.join(REPO_ROOT, "configs", "mlperf_r50_fpn.gin")) as f:
            self.assertIn(f"DatasetBuilder.pixel_mode = '{imagenet_check.DETECTRON_PIXEL_MODE}'",
                          f.read())

    def test_preprocess_refuses_other_sizes(self):
        encoded = tf.io.encode_jpeg(tf.zeros([224, 200, 3], tf.uint8)).numpy()
        with self.assertRaisesRegex(ValueError, r"b.jpg: expected a 224x224 image, found "
                                    r"\[224, 200\]"):
            imagenet_check.preprocess(encoded, "bgr_caffe", 224, "b.jpg")


if __name__ == "__main__":
    tf.test.main()
