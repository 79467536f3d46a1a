"""Tests for the MSRA ResNet backbone and FrozenBatchNorm (numerics vs. Detectron: tests/tools)."""

import numpy as np
import tensorflow as tf
import tf_keras

from official_maskrcnn.modeling.backbones import resnet
from official_maskrcnn.modeling.backbones.resnet import ResNet
from official_maskrcnn.modeling.layers.frozen_batch_norm import FrozenBatchNorm


class FrozenBatchNormTest(tf.test.TestCase):

    def test_affine_without_epsilon(self):
        layer = FrozenBatchNorm()
        x = np.random.default_rng(0).standard_normal([2, 3, 4, 5]).astype(np.float32)
        layer.build(x.shape)
        scale = np.array([0.5, -2.0, 0.0, 1.0, 3.0], np.float32)
        bias = np.array([1.0, 0.0, -1.0, 0.25, 0.0], np.float32)
        layer.scale.assign(scale)
        layer.bias.assign(bias)
        self.assertAllClose(layer(x), x * scale + bias, atol=1e-6)
        # Same in training mode: nothing is estimated from the batch.
        self.assertAllClose(layer(x, training=True), x * scale + bias, atol=1e-6)
        self.assertEmpty(layer.trainable_variables)
        self.assertLen(layer.non_trainable_variables, 2)

    def test_runs_in_input_dtype(self):
        layer = FrozenBatchNorm(dtype="float64")
        x = tf.ones([1, 2, 2, 3], tf.float64)
        self.assertEqual(layer(x).dtype, tf.float64)
        mixed = FrozenBatchNorm(dtype=tf_keras.mixed_precision.Policy("mixed_float16"))
        y = mixed(tf.ones([1, 2, 2, 3]))
        self.assertEqual(y.dtype, tf.float16)
        self.assertEqual(mixed.scale.dtype, tf.float32)

    def test_config_round_trip(self):
        layer = FrozenBatchNorm(name="res2_0_branch2a_bn")
        clone = FrozenBatchNorm.from_config(layer.get_config())
        self.assertEqual(clone.name, "res2_0_branch2a_bn")
        self.assertEqual(clone.get_config(), layer.get_config())


class ResNetTest(tf.test.TestCase):

    def test_output_shapes_and_strides(self):
        expected_channels = {18: (64, 128, 256, 512), 34: (64, 128, 256, 512),
                             50: (256, 512, 1024, 2048), 101: (256, 512, 1024, 2048)}
        for depth, channels in expected_channels.items():
            model = ResNet(depth=depth)
            outputs = model(tf.zeros([1, 64, 64, 3]))
            self.assertEqual(sorted(outputs), ["2", "3", "4", "5"])
            for level, c in zip(["2", "3", "4", "5"], channels):
                size = 64 // 2 ** int(level)
                self.assertEqual(outputs[level].shape, (1, size, size, c), f"R{depth} C{level}")
                self.assertEqual(model.output_specs[level], c)

    def test_block_counts_and_names(self):
        model = ResNet(depth=101)
        names = {layer.name for layer in model.submodules}
        self.assertIn("res4_22_branch2c_bn", names)
        self.assertNotIn("res4_23", names)
        # ResNet-101: 1 stem conv + 33 blocks * 3 + 4 projections = 104 convs.
        convs = [m for m in model.submodules if isinstance(m, tf_keras.layers.Conv2D)]
        self.assertLen(convs, 104)

    def test_stride_on_first_1x1(self):
        model = ResNet(depth=50)
        model(tf.zeros([1, 64, 64, 3]))
        by_name = {layer.name: layer for layer in model.submodules}
        self.assertEqual(by_name["res3_0_branch2a"].strides, (2, 2))
        self.assertEqual(by_name["res3_0_branch2a"].kernel.shape, (1, 1, 256, 128))
        self.assertEqual(by_name["res3_0_branch2b"].strides, (1, 1))
        self.assertEqual(by_name["res3_0_branch1"].strides, (2, 2))
        self.assertEqual(by_name["res2_0_branch2a"].strides, (1, 1))
        self.assertEqual(by_name["res2_0_branch1"].kernel.shape, (1, 1, 64, 256))
        self.assertNotIn("res3_1_branch1", by_name)
        self.assertFalse(any(getattr(m, "use_bias", False) for m in model.submodules))

    def test_symmetric_padding(self):
        # The stem's 7x7/2 conv with an all-ones kernel on an all-ones image counts the valid
        # (unpadded) pixels each output sees. torch pads 3 on every side; TF 'SAME' would pad
        # 2 at the top/left and 3 at the bottom/right, giving 5 * 5 * 3 at the top-left.
        model = ResNet(depth=18, freeze_at=0)
        model(tf.zeros([1, 32, 32, 3]))
        conv1 = model.get_layer("conv1")
        conv1.kernel.assign(tf.ones_like(conv1.kernel))
        stem = conv1(resnet.symmetric_pad(tf.ones([1, 32, 32, 3]), 3))[0, :, :, 0].numpy()
        self.assertEqual(stem.shape, (16, 16))
        # Top-left output sees rows/cols -3..3 -> 4x4 valid pixels x 3 channels; bottom-right
        # sees rows 27..33 -> 5 valid; torch gives exactly these counts.
        self.assertEqual(stem[0, 0], 4 * 4 * 3)
        self.assertEqual(stem[-1, -1], 5 * 5 * 3)
        self.assertEqual(stem[5, 5], 7 * 7 * 3)

    def test_freeze_at_2_frozen_bn(self):
        model = ResNet(depth=50, norm="frozen_bn", freeze_at=2)
        model(tf.zeros([1, 32, 32, 3]))
        trainable = {v.ref() for v in model.trainable_variables}
        by_name = {layer.name: layer for layer in model.submodules}
        for name in ["conv1", "res2_0_branch1", "res2_0_branch2a", "res2_2_branch2c"]:
            self.assertNotIn(by_name[name].kernel.ref(), trainable, name)
        for name in ["res3_0_branch2a", "res3_0_branch1", "res5_2_branch2c"]:
            self.assertIn(by_name[name].kernel.ref(), trainable, name)
        for layer in model.submodules:
            if isinstance(layer, FrozenBatchNorm):
                for v in layer.weights:
                    self.assertNotIn(v.ref(), trainable, layer.name)
        # Trainable = the conv kernels of res3..res5: 13 blocks * 3 + 3 projections.
        self.assertLen(model.trainable_variables, 42)

    def test_freeze_at_0_and_batch_norm(self):
        model = ResNet(depth=18, norm="frozen_bn", freeze_at=0)
        model(tf.zeros([1, 32, 32, 3]))
        # All 20 convs of ResNet-18 (incl. 3 projections) train; no norm variable does.
        self.assertLen(model.trainable_variables, 20)
        bn_model = ResNet(depth=18, norm="batch_norm", freeze_at=2)
        bn_model(tf.zeros([1, 32, 32, 3]))
        trainable = {v.ref() for v in bn_model.trainable_variables}
        self.assertNotIn(bn_model.get_layer("res_conv1_bn").gamma.ref(), trainable)
        by_name = {layer.name: layer for layer in bn_model.submodules}
        self.assertNotIn(by_name["res2_1_branch2b_bn"].gamma.ref(), trainable)
        self.assertIn(by_name["res3_0_branch2a_bn"].gamma.ref(), trainable)

    def test_frozen_batch_norm_stage_keeps_statistics(self):
        # A frozen batch_norm stage keeps its moving statistics even in training mode.
        model = ResNet(depth=18, norm="batch_norm", freeze_at=2)
        images = tf.random.uniform([2, 32, 32, 3])
        model(images)
        stem_bn = model.get_layer("res_conv1_bn")
        res3_bn = {m.name: m for m in model.submodules}["res3_0_branch2a_bn"]
        stem_before = stem_bn.moving_mean.numpy()
        res3_before = res3_bn.moving_mean.numpy()
        model(images, training=True)
        self.assertAllEqual(stem_bn.moving_mean, stem_before)
        self.assertNotAllClose(res3_bn.moving_mean, res3_before)

    def test_group_norm_runs(self):
        model = ResNet(depth=18, norm="group_norm", freeze_at=0)
        outputs = model(tf.random.uniform([1, 64, 64, 3]))
        self.assertEqual(outputs["5"].shape, (1, 2, 2, 512))
        self.assertTrue(np.isfinite(outputs["5"].numpy()).all())
        gn = model.get_layer("res_conv1_bn")
        self.assertIsInstance(gn, tf_keras.layers.GroupNormalization)
        self.assertEqual(gn.groups, 32)

    def test_get_config_round_trip(self):
        model = ResNet(depth=34, norm="group_norm", freeze_at=1, name="backbone")
        config = model.get_config()
        self.assertEqual(config, {"name": "backbone", "depth": 34, "norm": "group_norm",
                                  "freeze_at": 1})
        clone = ResNet.from_config(config)
        self.assertEqual(clone.get_config(), config)
        model(tf.zeros([1, 32, 32, 3]))
        clone(tf.zeros([1, 32, 32, 3]))
        self.assertEqual([v.shape for v in clone.weights], [v.shape for v in model.weights])
        self.assertLen(clone.trainable_variables, len(model.trainable_variables))
        block = {m.name: m for m in model.submodules}["res3_0"]
        block_clone = type(block).from_config(block.get_config())
        self.assertEqual(block_clone.get_config(), block.get_config())

    def test_invalid_arguments(self):
        with self.assertRaisesRegex(ValueError, "depth.*152"):
            ResNet(depth=152)
        with self.assertRaisesRegex(ValueError, "norm.*'sync_bn'"):
            ResNet(norm="sync_bn")
        with self.assertRaisesRegex(ValueError, "freeze_at.*7"):
            ResNet(freeze_at=7)


if __name__ == "__main__":
    tf.test.main()
