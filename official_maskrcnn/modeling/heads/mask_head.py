"""Mask head: maskrcnn-benchmark's `MaskRCNNFPNFeatureExtractor` convs + `MaskRCNNC4Predictor`.

Shape legend: B images; R ROIs per image; M ROIAlign output size (14); F channels (256);
K classes *including* background (index 0), 81 for COCO. One mask per class (class-specific);
the caller picks the ground-truth or predicted class.

    x = roi_features                                   [B * R, M, M, F]
    4 x: x = relu(conv3x3(x))  (mask_fcn1..4)          [B * R, M, M, F]
    x = relu(conv_transpose2x2_stride2(x))  (conv5_mask)  [B * R, 2M, 2M, F]
    mask_logits = conv1x1_K(x)  (mask_fcn_logits)      [B, R, 2M, 2M, K]

conv5_mask is a Keras `Conv2DTranspose` (its variables, names and initialisation) whose
arithmetic is written as a matrix product: a 2x2 stride-2 transposed convolution does not
overlap, so it is one [B*R*M*M, F] x [F, 4F] product and a depth-to-space. mask_fcn_logits is
a `PointwiseConv2D` (a 1x1 convolution as a [B*R*4M*M, F] x [F, K] product). Same sums, but
XLA:CPU compiles the transposed convolution to a dilated convolution (2.1 s of a 9-13 s step
at 512x512, batch 2, all 128 mask slots) and the weight gradients of both to transposed copies
of [B*R, 28, 28, 256] activations (~1 s); as products the compiled step at 512x512 was ~8 %
faster (BENCHMARKS.md, "The XLA step profiled"), the graph without XLA unchanged.

Initialisation (maskrcnn-benchmark): mask_fcn1..4 by `make_conv3x3` (make_layers.py, default
kaiming_init=True): `kaiming_normal_(mode="fan_out", nonlinearity="relu")`, bias 0;
`MaskRCNNC4Predictor` (roi_mask_predictors.py, also used for FPN): conv5_mask and mask_fcn_logits
`kaiming_normal_(mode="fan_out", nonlinearity="relu")` ("Caffe2 MSRAFill"), biases 0. That is
N(0, std=sqrt(2 / fan_out)), untruncated, = `VarianceScaling(2, "fan_out", "untruncated_normal")`.
The fans agree with torch's: torch takes fan_out from weight dim 0 (out channels of a conv, *in*
channels of a ConvTranspose2d) times the kernel area, and Keras from the kernel's last dim, which
is likewise out channels for Conv2D and in channels for Conv2DTranspose.
"""

import tensorflow as tf
import tf_keras

from official_maskrcnn.modeling.coco_classes import NUM_CLASSES_COCO
from official_maskrcnn.modeling.layers.pointwise_conv import PointwiseConv2D


def msra_fill():
    """torch's `kaiming_normal_(mode="fan_out", nonlinearity="relu")`, fresh per layer."""
    return tf_keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal")


@tf_keras.utils.register_keras_serializable(package="official_maskrcnn")
class MaskHead(tf_keras.layers.Layer):
    """Per-class 2M x 2M mask logits for every ROI."""

    def __init__(self, num_classes=NUM_CLASSES_COCO, num_convs=4, num_filters=256, **kwargs):
        """Creates the head.

        Args:
          num_classes: K, including background.
          num_convs: number of 3x3 conv + ReLU layers before the upsampling.
          num_filters: F, channels of the convs and of the transposed conv.
          **kwargs: tf_keras.layers.Layer arguments (name, dtype, ...).
        """
        super().__init__(**kwargs)
        self._num_classes = num_classes
        self._num_convs = num_convs
        self._num_filters = num_filters
        common = dict(bias_initializer="zeros", dtype=self.dtype_policy)
        self._convs = [
            tf_keras.layers.Conv2D(num_filters, 3, padding="same", activation="relu",
                                   kernel_initializer=msra_fill(), name=f"mask_fcn{i + 1}",
                                   **common)
            for i in range(num_convs)]
        self._upsample = tf_keras.layers.Conv2DTranspose(
            num_filters, 2, strides=2, padding="valid", activation="relu",
            kernel_initializer=msra_fill(), name="conv5_mask", **common)
        self._logits = PointwiseConv2D(num_classes, kernel_initializer=msra_fill(),
                                       name="mask_fcn_logits", **common)

    def build(self, input_shape):
        """Builds conv5_mask, which `call` does not call (see the module docstring), under its
        own name scope: the same variables as calling it. The 3x3 convs are built first, so
        that the initialisers draw in the order they did when `call` built every layer."""
        size, channels = input_shape[-2], input_shape[-1]
        for conv in self._convs:
            with tf.name_scope(conv.name):
                conv.build(tf.TensorShape([None, size, size, channels]))
            channels = self._num_filters
        with tf.name_scope(self._upsample.name):
            self._upsample.build(tf.TensorShape([None, size, size, channels]))
        super().build(input_shape)

    def call(self, roi_features):
        """Predicts mask logits.

        Args:
          roi_features: [B, R, M, M, F] ROIAlign features.
        Returns:
          [B, R, 2M, 2M, K] float32 mask logits.
        """
        shape = tf.shape(roi_features)
        batch, num_rois = shape[0], shape[1]
        x = tf.reshape(roi_features, [-1, *roi_features.shape[2:]])  # [B * R, M, M, F]
        for conv in self._convs:
            x = conv(x)
        x = self._logits(_transposed_conv_2x2_stride_2(x, self._upsample))  # [B*R, 2M, 2M, K]
        x = tf.reshape(x, [batch, num_rois, *x.shape[1:]])
        return tf.cast(x, tf.float32)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self._num_classes, num_convs=self._num_convs,
                      num_filters=self._num_filters)
        return config


def _transposed_conv_2x2_stride_2(x, layer):
    """`layer(x)` of a built `Conv2DTranspose(F', 2, strides=2, padding="valid")`, as a matrix
    product: output pixel (2i + a, 2j + b) is input pixel (i, j) times kernel tap (a, b).

    Args:
      x: [N, M, M, F] features.
      layer: the Keras layer (its kernel [2, 2, F', F], bias [F'] and activation).
    Returns:
      [N, 2M, 2M, F'] activation(transposed convolution + bias).
    """
    size = x.shape[1]
    kernel = tf.cast(layer.kernel, x.dtype)
    out_channels, in_channels = kernel.shape[2], kernel.shape[3]
    # [(a, b, F'), F]: the four taps stacked, used transposed by the product. Not a transposed
    # copy of the kernel: its gradient would end in a Transpose, which grappler's arithmetic
    # optimizer swaps with the trainer's elementwise `is_finite` check into a bool Transpose,
    # and oneDNN logs an error for that ("supports DT_BOOL only on platforms with AVX-512").
    taps = tf.reshape(kernel, [4 * out_channels, in_channels])
    y = tf.matmul(tf.reshape(x, [-1, in_channels]), taps, transpose_b=True)  # [N*M*M, 4F']
    y = tf.reshape(y, [-1, size, size, 2, 2, out_channels])  # [N, i, j, a, b, F']
    y = tf.transpose(y, [0, 1, 3, 2, 4, 5])  # [N, i, a, j, b, F']
    y = tf.reshape(y, [-1, 2 * size, 2 * size, out_channels])
    return layer.activation(tf.nn.bias_add(y, tf.cast(layer.bias, x.dtype)))
