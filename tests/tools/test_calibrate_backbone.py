"""tools/calibrate_backbone: every frozen norm folded from its input's statistics, checked by an
independent numpy computation of those statistics through the restored checkpoint."""

import contextlib
import io
import os
import shutil
import tempfile

import gin
import numpy as np
import tensorflow as tf

from official_maskrcnn import runtime
from official_maskrcnn.modeling import factory
from official_maskrcnn.modeling.backbones import checkpoint
from official_maskrcnn.modeling.layers.frozen_batch_norm import FrozenBatchNorm
from official_maskrcnn.tools import calibrate_backbone
from official_maskrcnn.tools.calibrate_backbone import CalibrationError
from tests import synthetic_records

FROZEN_R18 = ["build_maskrcnn_model.backbone_depth = 18",
              "build_maskrcnn_model.backbone_norm = 'frozen_bn'",
              "DatasetBuilder.min_size = 64"]
NUM_IMAGES = 6


def norm_inputs(backbone, images):
    """{norm name: its input [N, H, W, C] as float64 numpy}, by a plain forward pass."""
    seen = {}

    def recording_call(layer, inputs):
        seen[layer.name] = inputs.numpy().astype(np.float64)
        return FrozenBatchNorm.call(layer, inputs)

    with calibrate_backbone.norms_calling(backbone, recording_call):
        backbone(images)
    return seen


class CalibrateBackboneTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp(prefix="calibrate_")
        cls.pattern, _ = synthetic_records.write_split(cls.root, "train", 8, seed=4, num_shards=2)

    @classmethod
    def tearDownClass(cls):
        gin.clear_config()
        shutil.rmtree(cls.root)
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        gin.clear_config()
        runtime.parse_gin([], FROZEN_R18)

    def calibrate(self, **kwargs):
        prefix = os.path.join(self.create_tempdir().full_path, "calibrated")
        out = io.StringIO()
        written = calibrate_backbone.run(self.pattern, NUM_IMAGES, prefix, stream=out, **kwargs)
        return written, out.getvalue()

    def test_every_norm_output_is_standardised_on_the_images(self):
        written, out = self.calibrate()
        self.assertIn("calibrating 20 frozen norms of ResNet-18 on 6 image(s) of 64 x 64 "
                      "(bgr_caffe)", out)
        for stage in ("res_conv1: 1 norm(s)", "res2: 4 norm(s)", "res3: 5 norm(s)",
                      "res5: 5 norm(s)"):
            self.assertIn(stage, out)
        self.assertIn(f"wrote {written}", out)
        # Restored into a backbone of other random weights: the checkpoint holds everything.
        backbone = calibrate_backbone.config_backbone(seed=99)
        checkpoint.load_backbone_checkpoint(backbone, written)
        images = calibrate_backbone.calibration_images(self.pattern, NUM_IMAGES, 64, "bgr_caffe")
        inputs = norm_inputs(backbone, images)
        self.assertLen(inputs, 20)
        for layer in calibrate_backbone.frozen_norms(backbone):
            x = inputs[layer.name]
            mean, variance = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
            scale = 1.0 / np.sqrt(variance + calibrate_backbone.EPSILON)
            # float32 activations: relative agreement to ~1e-5 per norm, compounding slightly
            # over the 20 norms of the network; 1e-3 leaves room and still catches any slip.
            self.assertAllClose(layer.scale.numpy(), scale, rtol=1e-3, msg=layer.name)
            self.assertAllClose(layer.bias.numpy(), -mean * scale, rtol=1e-3,
                                atol=1e-3 * np.abs(mean * scale).max(), msg=layer.name)
            y = x * layer.scale.numpy() + layer.bias.numpy()
            self.assertAllClose(y.mean(axis=(0, 1, 2)), np.zeros_like(mean), atol=1e-2)
            self.assertAllClose(y.var(axis=(0, 1, 2)), variance / (variance + 1e-5), rtol=1e-2)
        # The recipe's path: the model restores it as its backbone_checkpoint.
        model = factory.build_maskrcnn_model(num_classes=4, backbone_depth=18,
                                             backbone_norm="frozen_bn", backbone_checkpoint=written)
        restored = {v.name: v.numpy() for v in model.backbone.variables}
        self.assertTrue(any(np.array_equal(value, backbone.variables[0].numpy())
                            for value in restored.values()))

    def test_the_default_size_is_the_configs_min_size_and_the_seed_sets_the_convolutions(self):
        first, out = self.calibrate(seed=1)
        self.assertIn("of 64 x 64", out)
        again, _ = self.calibrate(seed=1)
        other, _ = self.calibrate(seed=2)
        read = tf.train.load_checkpoint
        key = "backbone/_stages/0/0/_conv_a/kernel/.ATTRIBUTES/VARIABLE_VALUE"
        self.assertAllEqual(read(first).get_tensor(key), read(again).get_tensor(key))
        self.assertNotAllClose(read(first).get_tensor(key), read(other).get_tensor(key))

    def test_bad_settings_and_input_are_clear_errors(self):
        with self.assertRaisesRegex(CalibrationError, r"for 50"):
            calibrate_backbone.run(self.pattern, 50, os.path.join(self.root, "x"),
                                   stream=io.StringIO())
        with self.assertRaisesRegex(CalibrationError, "--num_images must be >= 2"):
            calibrate_backbone.run(self.pattern, 1, os.path.join(self.root, "x"))
        with self.assertRaisesRegex(CalibrationError, "--image_size must be >= 64"):
            calibrate_backbone.run(self.pattern, 4, os.path.join(self.root, "x"), image_size=32)
        gin.clear_config()
        runtime.parse_gin([], ["build_maskrcnn_model.backbone_norm = 'group_norm'"])
        with self.assertRaisesRegex(CalibrationError, "backbone_norm = 'group_norm'"):
            calibrate_backbone.run(self.pattern, 4, os.path.join(self.root, "x"))
        self.assertFalse(tf.io.gfile.glob(os.path.join(self.root, "x*")))

    def test_command_line_exit_codes(self):
        gin.clear_config()
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = calibrate_backbone.main([
                "--gin_file", os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                           "smoke_cpu.gin"),
                "--file_pattern", self.pattern, "--output", os.path.join(self.root, "y")])
        self.assertEqual(code, 1)
        self.assertEqual(stderr.getvalue(), "error: build_maskrcnn_model.backbone_norm = "
                                            "'group_norm': only a 'frozen_bn' backbone has fixed "
                                            "statistics to calibrate\n")
        gin.clear_config()
        prefix = os.path.join(self.root, "cli", "r18")
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = calibrate_backbone.main(
                ["--gin_file", os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                            "smoke_cpu.gin"),
                 *[arg for binding in FROZEN_R18 for arg in ("--gin_param", binding)],
                 "--file_pattern", self.pattern, "--num_images", "4", "--output", prefix])
        self.assertEqual(code, 0, stdout.getvalue())
        self.assertTrue(tf.io.gfile.exists(prefix + ".index"))


if __name__ == "__main__":
    tf.test.main()
