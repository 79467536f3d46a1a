"""Tests of PointwiseConv2D: a 1x1 Conv2D computed as a matrix product must compute what the
Keras Conv2D computes (values and gradients), keep its variables and config, and refuse what it
does not implement."""

import numpy as np
import tensorflow as tf
import tf_keras

from official_maskrcnn.modeling.layers.pointwise_conv import PointwiseConv2D
from tests import numerics


def _pair(dtype, strides, padding, channels=6, filters=5, use_bias=True, seed=0):
    """A Keras Conv2D and a PointwiseConv2D with the same random weights (biases non-zero, so
    that a misplaced bias shows)."""
    args = dict(strides=strides, padding=padding, use_bias=use_bias, dtype=dtype)
    keras, ours = tf_keras.layers.Conv2D(filters, 1, **args), PointwiseConv2D(filters, **args)
    for layer in (keras, ours):
        layer.build([None, 9, 7, channels])
    weights = [np.random.default_rng(seed).normal(size=w.shape) for w in keras.get_weights()]
    keras.set_weights(weights)
    ours.set_weights(weights)
    return keras, ours


def _float64_twin(conv):
    """A float64 Keras Conv2D of `conv`'s config holding its weights (exactly: float32 values are
    float64 values), built for [None, 9, 7, C] inputs."""
    twin = tf_keras.layers.Conv2D.from_config({**conv.get_config(), "dtype": "float64"})
    twin.build([None, 9, 7, conv.kernel.shape[2]])
    twin.set_weights([w.astype(np.float64) for w in conv.get_weights()])
    return twin


class PointwiseConv2DTest(tf.test.TestCase):

    def test_values_and_gradients_equal_conv2d_in_float64(self):
        # Odd sizes and strides 1, 2, 3: the output keeps the pixels at multiples of the stride.
        # In float64 the two orders of summation differ by ~1e-16 relative; a wrong pixel,
        # channel or bias is off by O(1).
        x = tf.constant(np.random.default_rng(1).normal(size=[2, 9, 7, 6]))
        for strides in (1, 2, 3, (2, 1)):
            for padding in ("valid", "same"):
                keras, ours = _pair("float64", strides, padding)
                results = []
                for layer in (keras, ours):
                    with tf.GradientTape() as tape:
                        tape.watch(x)
                        y = layer(x)
                        # A fixed random upstream gradient (of y's shape, the same for both).
                        upstream = np.random.default_rng(3).normal(size=y.shape)
                        loss = tf.reduce_sum(y * upstream)
                    results.append([y] + tape.gradient(loss, [x] + layer.trainable_variables))
                names = ["outputs", "d/dx", "d/dkernel", "d/dbias"]
                for name, want, got in zip(names, *results):
                    message = f"{name}, strides {strides}, {padding}"
                    self.assertEqual(got.shape, want.shape, message)
                    scale = float(tf.reduce_max(tf.abs(want)))
                    self.assertAllClose(got, want, atol=1e-12 * scale, rtol=1e-12, msg=message)

    def test_float32_within_the_rounding_bound_eager_and_compiled(self):
        keras, ours = _pair("float32", 2, "valid", channels=256, filters=8)
        x = tf.constant(np.random.default_rng(2).normal(size=[2, 9, 7, 256]), tf.float32)
        keras64 = _float64_twin(keras)
        exact = keras64(tf.cast(x, tf.float64)).numpy()
        keras64.set_weights([np.abs(w) for w in keras64.get_weights()])
        bound = numerics.sum_of_products_bound(keras64(tf.abs(tf.cast(x, tf.float64))), 257)
        # The bound is not vacuous: a wrong pixel or channel is far outside it.
        self.assertLess(np.median(bound), 1e-3 * np.median(np.abs(exact)))
        for name, fn in (("eager", ours), ("XLA", tf.function(ours, jit_compile=True))):
            error = np.abs(fn(x).numpy().astype(np.float64) - exact)
            self.assertTrue(np.all(error <= bound),
                            f"{name}: max error / bound {np.max(error / bound):.3g}")

    def test_same_variables_config_and_checkpoint_as_conv2d(self):
        keras, ours = _pair("float32", 2, "valid", use_bias=False)
        self.assertEqual([(w.name.split("/")[-1], w.shape) for w in ours.weights],
                         [(w.name.split("/")[-1], w.shape) for w in keras.weights])
        self.assertIsInstance(ours, tf_keras.layers.Conv2D)  # the weight converters look for it
        clone = PointwiseConv2D.from_config(ours.get_config())
        self.assertEqual(clone.get_config(), ours.get_config())
        self.assertEqual(clone.kernel_size, (1, 1))
        # A checkpoint of the Conv2D restores into the PointwiseConv2D.
        directory = self.get_temp_dir()
        path = tf.train.Checkpoint(layer=keras).write(f"{directory}/conv")
        _, fresh = _pair("float32", 2, "valid", use_bias=False, seed=9)
        tf.train.Checkpoint(layer=fresh).read(path).assert_consumed()
        self.assertAllEqual(fresh.kernel, keras.kernel)

    def test_mixed_bfloat16(self):
        layer = PointwiseConv2D(4, dtype=tf_keras.mixed_precision.Policy("mixed_bfloat16"))
        outputs = layer(tf.ones([1, 3, 3, 8]))
        self.assertEqual(outputs.dtype, tf.bfloat16)
        self.assertEqual(layer.kernel.dtype, tf.float32)

    def test_dynamic_spatial_size(self):
        layer = PointwiseConv2D(3, strides=2)
        function = tf.function(layer, input_signature=[tf.TensorSpec([None, None, None, 5])])
        self.assertEqual(function(tf.ones([2, 5, 4, 5])).shape, (2, 3, 2, 3))

    def test_refuses_what_it_does_not_implement(self):
        for kwargs, field in ((dict(kernel_size=3), "kernel_size"),
                              (dict(dilation_rate=2), "dilation_rate"),
                              (dict(groups=2), "groups"),
                              (dict(data_format="channels_first"), "data_format")):
            with self.assertRaisesRegex(ValueError, f"PointwiseConv2D .*{field} must be"):
                PointwiseConv2D(4, **kwargs)


if __name__ == "__main__":
    tf.test.main()
