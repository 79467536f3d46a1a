"""Tests of official_maskrcnn.modeling.decoders.fpn against an independent numpy FPN.

Shape legend: B images, H, W image size, C_l backbone channels at level l, F FPN channels.
"""

import numpy as np
import tensorflow as tf
import tf_keras

from official_maskrcnn.modeling.decoders import fpn as fpn_lib
from tests import numerics

R50_CHANNELS = (256, 512, 1024, 2048)
R18_CHANNELS = (64, 128, 256, 512)


def _backbone_features(height, width, channels, batch=1, seed=0):
    """Random C2..C5 of an image of size (height, width): dict str(level) -> [B, h, w, C_l]."""
    rng = np.random.default_rng(seed)
    return {str(level): tf.constant(rng.normal(size=(batch, height // 2**level,
                                                     width // 2**level, c)), tf.float32)
            for level, c in zip(range(2, 6), channels)}


def _numpy_conv_same(x, kernel, bias):
    """Stride-1 conv with zero padding (k - 1) / 2, as torch's Conv2d(padding=k // 2).

    Args:
      x: [B, h, w, Cin]; kernel: [k, k, Cin, Cout]; bias: [Cout].
    Returns:
      [B, h, w, Cout] float64.
    """
    k = kernel.shape[0]
    pad = (k - 1) // 2
    padded = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    height, width = x.shape[1:3]
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],)) + bias
    for dy in range(k):
        for dx in range(k):
            window = padded[:, dy:dy + height, dx:dx + width, :]
            out += np.einsum("bhwi,io->bhwo", window, kernel[dy, dx].astype(np.float64))
    return out


def _numpy_fpn(features, params):
    """maskrcnn-benchmark's FPN.forward + LastLevelMaxPool, written from its definition.

    Args:
      features: dict str(level) -> [B, h, w, C] numpy arrays, levels "2".."5".
      params: dict name -> (kernel, bias) with names lateral_l and output_l.
    Returns:
      dict str(level) -> [B, h, w, F] float64, levels "2".."6".
    """
    results = {}
    last_inner = _numpy_conv_same(features["5"], *params["lateral_5"])
    results["5"] = _numpy_conv_same(last_inner, *params["output_5"])
    for level in ("4", "3", "2"):
        top_down = last_inner.repeat(2, axis=1).repeat(2, axis=2)  # nearest, scale_factor 2.
        last_inner = _numpy_conv_same(features[level], *params[f"lateral_{level}"]) + top_down
        results[level] = _numpy_conv_same(last_inner, *params[f"output_{level}"])
    results["6"] = results["5"][:, ::2, ::2, :]  # max_pool2d(kernel_size=1, stride=2).
    return results


class FPNTest(tf.test.TestCase):

    def test_output_levels_and_shapes_resnet50(self):
        features = _backbone_features(128, 96, R50_CHANNELS, batch=2)
        outputs = fpn_lib.FPN()(features)
        self.assertEqual(list(outputs), ["2", "3", "4", "5", "6"])
        expected = {"2": (32, 24), "3": (16, 12), "4": (8, 6), "5": (4, 3), "6": (2, 2)}
        for level, (height, width) in expected.items():
            self.assertEqual(outputs[level].shape, (2, height, width, 256), msg=level)
            self.assertEqual(outputs[level].dtype, tf.float32)

    def test_input_channels_of_resnet18(self):
        outputs = fpn_lib.FPN(num_filters=64)(_backbone_features(64, 64, R18_CHANNELS))
        self.assertEqual(outputs["2"].shape, (1, 16, 16, 64))
        self.assertEqual(outputs["6"].shape, (1, 1, 1, 64))

    def test_top_down_matches_numpy(self):
        # Tiny maps, small channels, random weights set by hand: C5 is 3x2 (image 96x64), so P6
        # subsamples an odd height too.
        features = _backbone_features(96, 64, (3, 4, 5, 6), batch=2, seed=1)
        layer = fpn_lib.FPN(num_filters=2)
        layer(features)  # Builds the variables.
        rng = np.random.default_rng(2)
        params = {}
        for level in ("2", "3", "4", "5"):
            for kind in ("lateral", "output"):
                conv = getattr(layer, f"_{kind}_convs")[level]
                kernel_shape, bias_shape = [tuple(w.shape) for w in conv.get_weights()]
                weights = (rng.uniform(-0.5, 0.5, kernel_shape).astype(np.float32),
                           rng.uniform(-0.5, 0.5, bias_shape).astype(np.float32))
                conv.set_weights(weights)
                params[f"{kind}_{level}"] = weights
        outputs = layer(features)
        expected = _numpy_fpn({k: v.numpy() for k, v in features.items()}, params)
        self.assertEqual(sorted(outputs), sorted(expected))
        for level in expected:
            self.assertAllClose(outputs[level], expected[level], atol=1e-5, rtol=1e-5, msg=level)
        self.assertEqual(outputs["6"].shape, (2, 2, 1, 2))

    def test_p6_is_stride_two_subsample_of_p5(self):
        outputs = fpn_lib.FPN(num_filters=8)(_backbone_features(160, 96, (4, 4, 4, 4)))
        p5 = outputs["5"].numpy()  # [1, 5, 3, 8]
        self.assertEqual(outputs["6"].shape, (1, 3, 2, 8))
        self.assertAllEqual(outputs["6"][0, 1, 1], p5[0, 2, 2])
        self.assertAllEqual(outputs["6"], p5[:, ::2, ::2])

    def test_upsample_nearest(self):
        x = tf.reshape(tf.range(6, dtype=tf.float32), [1, 2, 3, 1])
        up = fpn_lib.upsample_nearest_x2(x)[0, :, :, 0]
        self.assertAllEqual(up, [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2],
                                 [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]])

    def test_errors_name_levels(self):
        features = _backbone_features(64, 64, (2, 2, 2, 2))
        del features["3"]
        with self.assertRaisesRegex(ValueError, r"missing \['3'\]"):
            fpn_lib.FPN(num_filters=2)(features)
        bad = _backbone_features(64, 64, (2, 2, 2, 2))
        bad["4"] = tf.zeros([1, 3, 3, 2])
        with self.assertRaisesRegex(ValueError, "level 4 is"):
            fpn_lib.FPN(num_filters=2)(bad)
        with self.assertRaisesRegex(ValueError, "min_level <= max_level"):
            fpn_lib.FPN(min_level=5, max_level=4)

    def test_config_round_trip(self):
        args = dict(num_filters=32, min_level=3, max_level=5, add_p6=False)
        layer = fpn_lib.FPN(name="my_fpn", **args)
        config = layer.get_config()
        self.assertEqual({k: config[k] for k in args}, args)
        clone = fpn_lib.FPN.from_config(config)
        self.assertEqual(clone.get_config(), config)
        features = _backbone_features(64, 64, (2, 2, 2, 2))
        self.assertEqual(sorted(clone(features)), ["3", "4", "5"])

    def test_initialisation_is_kaiming_uniform_a1(self):
        layer = fpn_lib.FPN()
        layer(_backbone_features(64, 64, R50_CHANNELS))
        convs = ((layer._lateral_convs["5"], 2048), (layer._output_convs["2"], 9 * 256))
        for conv, fan_in in convs:
            kernel, bias = conv.get_weights()
            bound = np.sqrt(3.0 / fan_in)
            # The initializer's float32 limit and scaling round twice: 2 float32 ulps over.
            self.assertLessEqual(np.abs(kernel).max(), bound + numerics.ulps(bound, 2))
            self.assertGreater(np.abs(kernel).max(), 0.99 * bound)
            self.assertAllClose(kernel.std(), bound / np.sqrt(3.0), rtol=0.02)
            self.assertAllEqual(bias, np.zeros_like(bias))

    def test_mixed_bfloat16(self):
        layer = fpn_lib.FPN(dtype=tf_keras.mixed_precision.Policy("mixed_bfloat16"))
        outputs = layer(_backbone_features(64, 64, R18_CHANNELS))
        for level, output in outputs.items():
            self.assertEqual(output.dtype, tf.bfloat16, msg=level)
        self.assertTrue(all(w.dtype == tf.float32 for w in layer.weights))
        self.assertLen(layer.weights, 16)

    def test_global_mixed_policy_reaches_sublayers(self):
        tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            layer = fpn_lib.FPN(num_filters=4)
        finally:
            tf_keras.mixed_precision.set_global_policy("float32")
        outputs = layer(_backbone_features(64, 64, (2, 2, 2, 2)))
        self.assertEqual(outputs["2"].dtype, tf.bfloat16)
        self.assertEqual(layer._output_convs["2"].compute_dtype, "bfloat16")

    def test_jit_compile_matches_eager(self):
        layer = fpn_lib.FPN(num_filters=16)
        features = _backbone_features(64, 64, (8, 8, 8, 8), batch=2)
        eager = layer(features)
        compiled = tf.function(layer, jit_compile=True)(features)
        for level in eager:
            self.assertAllClose(compiled[level], eager[level], atol=1e-5, msg=level)


if __name__ == "__main__":
    tf.test.main()
