"""Tests of the RPN, box and mask heads: layouts against hand-set weights, init statistics, dtypes.

Shape legend: B images, Hf, Wf a level's map size, A anchors per location, R ROIs per image,
P / M ROI feature size, F channels, K classes including background.
"""

import numpy as np
import tensorflow as tf
import tf_keras

from official_maskrcnn.modeling.heads import box_head as box_head_lib
from official_maskrcnn.modeling.heads import mask_head as mask_head_lib
from official_maskrcnn.modeling.heads import rpn_head as rpn_head_lib
from official_maskrcnn.ops import anchors as anchors_lib
from tests import numerics

MIXED = tf_keras.mixed_precision.Policy("mixed_bfloat16")


def _random(shape, seed=0):
    return tf.constant(np.random.default_rng(seed).normal(size=shape), tf.float32)


class LayerContractTest(tf.test.TestCase):
    """get_config returns the constructor arguments and from_config rebuilds the same layer."""

    def _round_trip(self, cls, args, inputs):
        layer = cls(name="under_test", **args)
        config = layer.get_config()
        self.assertEqual({k: config[k] for k in args}, args)
        clone = cls.from_config(config)
        self.assertEqual(clone.get_config(), config)
        layer(inputs)
        clone(inputs)
        self.assertEqual([w.shape for w in clone.weights], [w.shape for w in layer.weights])

    def test_rpn_head(self):
        self._round_trip(rpn_head_lib.RPNHead, dict(num_anchors=2, num_filters=8),
                         {"2": tf.zeros([1, 4, 4, 3])})

    def test_box_head(self):
        self._round_trip(box_head_lib.BoxHead, dict(num_classes=5, mlp_dim=16),
                         tf.zeros([1, 2, 7, 7, 4]))

    def test_mask_head(self):
        self._round_trip(mask_head_lib.MaskHead, dict(num_classes=3, num_convs=2, num_filters=8),
                         tf.zeros([1, 2, 14, 14, 4]))


class RPNHeadTest(tf.test.TestCase):

    def test_shapes_match_anchors_of_a_128_image(self):
        features = {str(level): _random([2, 128 // 2**level, 128 // 2**level, 256], level)
                    for level in range(2, 7)}
        outputs = rpn_head_lib.RPNHead()(features)
        anchors = anchors_lib.multilevel_anchors(128, 128)
        self.assertEqual(sorted(outputs), ["box_deltas", "objectness_logits"])
        for level in anchors:
            num_anchors = anchors[level].shape[0]
            self.assertEqual(outputs["objectness_logits"][level].shape, (2, num_anchors))
            self.assertEqual(outputs["box_deltas"][level].shape, (2, num_anchors, 4))
            self.assertEqual(outputs["box_deltas"][level].dtype, tf.float32)
        self.assertEqual(outputs["objectness_logits"]["2"].shape, (2, 32 * 32 * 3))

    def test_flatten_order_is_y_x_anchor(self):
        # Features (y, x, 1) per location; the 3x3 conv passes them through (centre tap identity,
        # positive so the ReLU keeps them); the 1x1 convs make
        #   objectness[y, x, a] = 100 y + 10 x + a,  deltas[y, x, a, j] = 1000 y + 100 x + 10 a + j.
        height, width, num_anchors = 3, 5, 3
        grid_y, grid_x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        features = np.stack([grid_y, grid_x, np.ones_like(grid_y)], axis=-1)[None]
        features = tf.constant(np.concatenate([features, features]), tf.float32)  # B = 2.
        layer = rpn_head_lib.RPNHead(num_anchors=num_anchors, num_filters=3)
        layer({"3": features})
        conv_kernel = np.zeros([3, 3, 3, 3], np.float32)
        conv_kernel[1, 1] = np.eye(3)
        layer._conv.set_weights([conv_kernel, np.zeros(3, np.float32)])
        objectness_kernel = np.zeros([1, 1, 3, num_anchors], np.float32)
        objectness_kernel[0, 0, 0], objectness_kernel[0, 0, 1] = 100.0, 10.0
        objectness_kernel[0, 0, 2] = np.arange(num_anchors)
        layer._objectness.set_weights([objectness_kernel, np.zeros(num_anchors, np.float32)])
        deltas_kernel = np.zeros([1, 1, 3, 4 * num_anchors], np.float32)
        deltas_kernel[0, 0, 0], deltas_kernel[0, 0, 1] = 1000.0, 100.0
        # Channel a * 4 + j holds coordinate j of anchor a (the reference's layout).
        deltas_kernel[0, 0, 2] = [10 * a + j for a in range(num_anchors) for j in range(4)]
        layer._deltas.set_weights([deltas_kernel, np.zeros(4 * num_anchors, np.float32)])

        outputs = layer({"3": features})
        objectness = outputs["objectness_logits"]["3"].numpy()
        deltas = outputs["box_deltas"]["3"].numpy()
        self.assertEqual(objectness.shape, (2, height * width * num_anchors))
        for y in range(height):
            for x in range(width):
                for a in range(num_anchors):
                    index = y * width * num_anchors + x * num_anchors + a
                    self.assertEqual(objectness[1, index], 100 * y + 10 * x + a)
                    self.assertAllEqual(deltas[1, index],
                                        [1000 * y + 100 * x + 10 * a + j for j in range(4)])

    def test_weights_shared_across_levels(self):
        layer = rpn_head_lib.RPNHead(num_filters=8)
        feature = _random([1, 4, 4, 8])
        outputs = layer({"2": feature, "3": feature, "4": _random([1, 2, 2, 8], 1)})
        self.assertLen(layer.weights, 6)
        self.assertAllEqual(outputs["objectness_logits"]["2"], outputs["objectness_logits"]["3"])
        self.assertAllEqual(outputs["box_deltas"]["2"], outputs["box_deltas"]["3"])

    def test_initialisation_normal_0_01(self):
        layer = rpn_head_lib.RPNHead()
        layer({"2": tf.zeros([1, 2, 2, 256])})
        for conv in (layer._conv, layer._objectness, layer._deltas):
            kernel, bias = conv.get_weights()
            # A std estimated from n draws is off by ~1 / sqrt(2n) (relative): 0.1 % for the
            # 3x3 conv's 590k weights, 2.6 % for the 768 objectness weights; >= 4 sigma each.
            rtol = 0.02 if kernel.size > 100000 else 0.1
            self.assertAllClose(kernel.std(), 0.01, rtol=rtol, msg=conv.name)
            self.assertAllEqual(bias, np.zeros_like(bias))

    def test_mixed_bfloat16_outputs_float32(self):
        layer = rpn_head_lib.RPNHead(num_filters=16, dtype=MIXED)
        outputs = layer({"2": _random([1, 8, 8, 16]), "3": _random([1, 4, 4, 16])})
        self.assertEqual(layer._conv.compute_dtype, "bfloat16")
        for key in outputs:
            for level, value in outputs[key].items():
                self.assertEqual(value.dtype, tf.float32, msg=f"{key} {level}")
        self.assertTrue(all(w.dtype == tf.float32 for w in layer.weights))

    def test_jit_compile_matches_eager(self):
        layer = rpn_head_lib.RPNHead(num_filters=16)
        features = {"2": _random([2, 8, 8, 16]), "3": _random([2, 4, 4, 16], 1)}
        eager = layer(features)
        compiled = tf.function(layer, jit_compile=True)(features)
        for key in eager:
            for level in eager[key]:
                self.assertAllClose(compiled[key][level], eager[key][level], atol=1e-6)


class BoxHeadTest(tf.test.TestCase):

    def test_default_shapes(self):
        outputs = box_head_lib.BoxHead()(_random([2, 3, 7, 7, 256]))
        self.assertEqual(outputs["class_logits"].shape, (2, 3, 81))
        self.assertEqual(outputs["box_deltas"].shape, (2, 3, 81, 4))

    def test_against_numpy_with_reference_layout_weights(self):
        # Weights given in the reference's layout (fc6 rows in [F, P, P] flatten order, bbox_pred
        # outputs k * 4 + j) and permuted as the module docstring says must reproduce a numpy
        # forward pass that flattens channels first, as torch does.
        rng = np.random.default_rng(3)
        batch, rois, size, channels, hidden, classes = 2, 3, 7, 4, 6, 5
        roi_features = rng.normal(size=(batch, rois, size, size, channels)).astype(np.float32)
        fc6_ref = rng.normal(size=(channels * size * size, hidden)).astype(np.float32) * 0.1
        fc7 = rng.normal(size=(hidden, hidden)).astype(np.float32)
        cls = rng.normal(size=(hidden, classes)).astype(np.float32)
        bbox = rng.normal(size=(hidden, 4 * classes)).astype(np.float32)
        bias_sizes = (hidden, hidden, classes, 4 * classes)
        biases = [rng.normal(size=n).astype(np.float32) for n in bias_sizes]
        layer = box_head_lib.BoxHead(num_classes=classes, mlp_dim=hidden)
        layer(tf.constant(roi_features))
        # ours[(y * P + x) * F + c] = theirs[(c * P + y) * P + x]
        fc6_ours = fc6_ref.reshape(channels, size, size, hidden).transpose(1, 2, 0, 3)
        layer._fc6.set_weights([fc6_ours.reshape(-1, hidden), biases[0]])
        layer._fc7.set_weights([fc7, biases[1]])
        layer._cls_score.set_weights([cls, biases[2]])
        layer._bbox_pred.set_weights([bbox, biases[3]])
        outputs = layer(tf.constant(roi_features))

        x = roi_features.transpose(0, 1, 4, 2, 3).reshape(batch * rois, -1).astype(np.float64)
        x = np.maximum(x @ fc6_ref + biases[0], 0)
        x = np.maximum(x @ fc7 + biases[1], 0)
        expected_logits = (x @ cls + biases[2]).reshape(batch, rois, classes)
        expected_deltas = (x @ bbox + biases[3]).reshape(batch, rois, classes, 4)
        self.assertAllClose(outputs["class_logits"], expected_logits, atol=1e-4, rtol=1e-4)
        self.assertAllClose(outputs["box_deltas"], expected_deltas, atol=1e-4, rtol=1e-4)

    def test_initialisation(self):
        layer = box_head_lib.BoxHead()
        layer(tf.zeros([1, 1, 7, 7, 256]))
        for dense, fan_in in ((layer._fc6, 7 * 7 * 256), (layer._fc7, 1024)):
            kernel = dense.kernel.numpy()
            bound = np.sqrt(3.0 / fan_in)  # kaiming_uniform_(a=1)
            # The initializer's float32 limit and scaling round twice: 2 float32 ulps over.
            self.assertLessEqual(np.abs(kernel).max(), bound + numerics.ulps(bound, 2))
            self.assertAllClose(kernel.std(), bound / np.sqrt(3.0), rtol=0.02)
        self.assertAllClose(layer._cls_score.kernel.numpy().std(), 0.01, rtol=0.05)
        self.assertAllClose(layer._bbox_pred.kernel.numpy().std(), 0.001, rtol=0.05)
        for dense in (layer._fc6, layer._fc7, layer._cls_score, layer._bbox_pred):
            self.assertAllEqual(dense.bias, np.zeros(dense.bias.shape), msg=dense.name)

    def test_mixed_bfloat16_and_jit(self):
        layer = box_head_lib.BoxHead(num_classes=7, mlp_dim=32, dtype=MIXED)
        roi_features = _random([2, 4, 7, 7, 8])
        eager = layer(roi_features)
        self.assertEqual(layer._fc6.compute_dtype, "bfloat16")
        self.assertEqual(eager["class_logits"].dtype, tf.float32)
        self.assertEqual(eager["box_deltas"].dtype, tf.float32)
        compiled = tf.function(layer, jit_compile=True)(roi_features)
        for key in eager:
            self.assertEqual(compiled[key].shape, eager[key].shape)
            # XLA keeps fused intermediates in float32 where eager rounds every layer's output
            # to bfloat16 (2^-8 = 0.4 % relative): a few such roundings per layer, plus an
            # absolute floor for outputs near 0. A wrong layer is off by O(1).
            self.assertAllClose(compiled[key], eager[key], atol=0.05, rtol=0.05)


class MaskHeadTest(tf.test.TestCase):

    def test_default_shapes(self):
        outputs = mask_head_lib.MaskHead()(_random([2, 3, 14, 14, 256]))
        self.assertEqual(outputs.shape, (2, 3, 28, 28, 81))
        self.assertEqual(outputs.dtype, tf.float32)

    def test_rois_stay_separate(self):
        layer = mask_head_lib.MaskHead(num_classes=3, num_filters=8)
        roi_features = _random([2, 3, 14, 14, 4])
        outputs = layer(roi_features)
        single = layer(roi_features[1:2, 2:3])
        self.assertAllClose(outputs[1:2, 2:3], single, atol=1e-5)
        self.assertNotAllClose(outputs[1, 2], outputs[0, 2])

    def test_upsampling_is_2x2_stride_2(self):
        # One logit per class; a 2x2 stride-2 transposed conv makes each input cell a 2x2 block.
        layer = mask_head_lib.MaskHead(num_classes=1, num_convs=0, num_filters=1)
        roi_features = tf.reshape(tf.range(4, dtype=tf.float32) + 1.0, [1, 1, 2, 2, 1])
        layer(roi_features)
        layer._upsample.set_weights([np.array([1, 2, 3, 4], np.float32).reshape(2, 2, 1, 1),
                                     np.zeros(1, np.float32)])
        layer._logits.set_weights([np.ones([1, 1, 1, 1], np.float32), np.zeros(1, np.float32)])
        masks = layer(roi_features)[0, 0, :, :, 0]
        expected = np.kron([[1, 2], [3, 4]], [[1, 2], [3, 4]])
        self.assertAllEqual(masks, expected)

    def test_initialisation_msra_fill(self):
        layer = mask_head_lib.MaskHead()
        layer(tf.zeros([1, 1, 14, 14, 256]))
        for conv, fan_out in ((layer._convs[0], 9 * 256), (layer._upsample, 4 * 256),
                              (layer._logits, 81)):
            kernel, bias = conv.get_weights()
            # Estimated from >= 20736 draws (the logits conv): ~0.5 % standard error; 3 % = 6
            # sigma, while a wrong fan (in for out) is off by >= 40 %.
            self.assertAllClose(kernel.std(), np.sqrt(2.0 / fan_out), rtol=0.03, msg=conv.name)
            self.assertAllEqual(bias, np.zeros_like(bias))
        self.assertEqual([c.name for c in layer._convs],
                         ["mask_fcn1", "mask_fcn2", "mask_fcn3", "mask_fcn4"])

    def test_mixed_bfloat16_and_jit(self):
        layer = mask_head_lib.MaskHead(num_classes=5, num_filters=16, dtype=MIXED)
        roi_features = _random([2, 3, 14, 14, 16])
        eager = layer(roi_features)
        self.assertEqual(layer._upsample.compute_dtype, "bfloat16")
        self.assertEqual(eager.dtype, tf.float32)
        compiled = tf.function(layer, jit_compile=True)(roi_features)
        self.assertEqual(compiled.shape, (2, 3, 28, 28, 5))
        # As for the box head (bfloat16 rounding of every layer's output in eager), over six
        # layers; seen 0.025 at most.
        self.assertAllClose(compiled, eager, atol=0.1, rtol=0.05)


class MaskHeadMatmulFormTest(tf.test.TestCase):
    """conv5_mask runs as a matrix product and a depth-to-space (faster under XLA, see
    mask_head.py): it must compute what the Keras layer computes, values and gradients."""

    def _layer(self, dtype, in_channels=6, out_channels=5, seed=3):
        upsample = tf_keras.layers.Conv2DTranspose(out_channels, 2, strides=2, padding="valid",
                                                   activation="relu", dtype=dtype)
        upsample.build([None, 7, 7, in_channels])
        rng = np.random.default_rng(seed)
        # Non-zero biases, so that a misplaced bias shows.
        upsample.set_weights([rng.normal(size=w.shape) for w in upsample.get_weights()])
        x = tf.constant(rng.normal(size=[3, 7, 7, in_channels]), dtype)
        return upsample, x

    def test_values_and_gradients_equal_the_keras_layer_in_float64(self):
        # In float64 the two orders of summation differ by ~1e-16 relative; a wrong tap, layout
        # or bias is off by O(1).
        upsample, x = self._layer("float64")
        upstream = tf.constant(np.random.default_rng(4).normal(size=[3, 14, 14, 5]))

        def values_and_gradients(fn):
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = fn(x)
                loss = tf.reduce_sum(out * upstream)
            return [out] + tape.gradient(loss, [x] + upsample.trainable_variables)

        keras = values_and_gradients(upsample)
        ours = values_and_gradients(
            lambda v: mask_head_lib._transposed_conv_2x2_stride_2(v, upsample))
        for name, got, want in zip(["upsampled", "d/dx", "d/dkernel", "d/dbias"], ours, keras):
            self.assertEqual(got.shape, want.shape, name)
            scale = float(tf.reduce_max(tf.abs(want)))
            self.assertAllClose(got, want, atol=1e-12 * scale, rtol=1e-12, msg=name)

    def test_float32_within_the_rounding_bound_eager_and_compiled(self):
        upsample, x = self._layer("float32", in_channels=64, out_channels=48)
        twin = tf_keras.layers.Conv2DTranspose.from_config(
            {**upsample.get_config(), "dtype": "float64"})
        twin.build(x.shape)
        twin.set_weights(upsample.get_weights())
        exact = twin(tf.cast(x, tf.float64)).numpy()
        # Each output sums 64 products and a bias; the ReLU is 1-Lipschitz.
        twin.activation = tf_keras.activations.linear
        twin.set_weights([np.abs(w) for w in twin.get_weights()])
        bound = numerics.sum_of_products_bound(twin(tf.abs(tf.cast(x, tf.float64))), 65)
        positive = exact > 0
        # The bound is not vacuous: a wrong tap or layout is far outside it.
        self.assertLess(np.median(bound), 1e-3 * np.median(exact[positive]))

        def form(v):
            return mask_head_lib._transposed_conv_2x2_stride_2(v, upsample)

        for name, fn in (("eager", form), ("XLA", tf.function(form, jit_compile=True))):
            error = np.abs(fn(x).numpy().astype(np.float64) - exact)
            self.assertTrue(np.all(error <= bound), f"{name}: max error / bound "
                            f"{np.max(error / bound):.3g}")

    def test_no_gradient_of_a_variable_ends_in_a_transpose(self):
        # The trainer checks `is_finite` on every gradient; grappler's arithmetic optimizer moves
        # that elementwise check before the value-preserving ops the gradient ends in, and a
        # bool Transpose makes oneDNN log a C++ error line on every training run.
        head = mask_head_lib.MaskHead(num_classes=3, num_filters=8)
        features = tf.random.normal([1, 2, 14, 14, 4])
        head(features)

        @tf.function
        def gradients():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(head(features))
            return tape.gradient(loss, head.trainable_variables)

        graph = gradients.get_concrete_function().graph
        outputs = graph.outputs
        self.assertLen(outputs, len(head.trainable_variables))
        value_preserving = {"Reshape", "Identity", "Cast", "Transpose", "Squeeze", "ExpandDims"}
        for variable, output in zip(head.trainable_variables, outputs):
            ops, op = [], output.op
            while op.type in value_preserving:
                ops.append(op.type)
                op = op.inputs[0].op
            self.assertNotIn("Transpose", ops, variable.name)
            self.assertNotIn(op.type, value_preserving, variable.name)

    def test_the_head_keeps_its_variables(self):
        # Checkpoints of the head written before the matmul form restore into it.
        layer = mask_head_lib.MaskHead(num_classes=3, num_filters=8, name="mask_head")
        layer(tf.zeros([1, 2, 14, 14, 4]))
        self.assertEqual(
            [(v.name, tuple(v.shape)) for v in layer.weights[-4:]],
            [("mask_head/conv5_mask/kernel:0", (2, 2, 8, 8)),
             ("mask_head/conv5_mask/bias:0", (8,)),
             ("mask_head/mask_fcn_logits/kernel:0", (1, 1, 8, 3)),
             ("mask_head/mask_fcn_logits/bias:0", (3,))])
        # And a seed draws the initial weights it drew when calling the layers built them
        # (3x3 convs, then conv5_mask, then the logits): seeded runs start where they did.
        tf_keras.utils.set_random_seed(11)
        head = mask_head_lib.MaskHead(num_classes=3, num_convs=2, num_filters=8)
        head(tf.zeros([1, 2, 14, 14, 4]))

        def init():  # a fresh initializer per layer, as the head's
            return dict(kernel_initializer=mask_head_lib.msra_fill(), bias_initializer="zeros")

        tf_keras.utils.set_random_seed(11)
        layers = [tf_keras.layers.Conv2D(8, 3, padding="same", **init()),
                  tf_keras.layers.Conv2D(8, 3, padding="same", **init()),
                  tf_keras.layers.Conv2DTranspose(8, 2, strides=2, **init()),
                  tf_keras.layers.Conv2D(3, 1, **init())]
        x = tf.zeros([2, 14, 14, 4])
        for layer in layers:
            x = layer(x)
        for got, want in zip(head.weights, [w for layer in layers for w in layer.weights]):
            self.assertAllEqual(got, want, msg=got.name)
        head_without_convs = mask_head_lib.MaskHead(num_classes=2, num_convs=0, num_filters=5)
        head_without_convs(tf.zeros([1, 1, 14, 14, 3]))
        self.assertEqual(head_without_convs._upsample.kernel.shape, (2, 2, 5, 3))


if __name__ == "__main__":
    tf.test.main()
