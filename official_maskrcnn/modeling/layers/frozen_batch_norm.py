"""Detectron's frozen batch normalisation: a fixed per-channel affine map.

Shape legend: B images, H, W spatial size, C channels (the last axis).

Detectron's ImageNet weights store each BatchNorm already folded into a scale and a bias
(`*_bn_s` = gamma / sqrt(var + eps), `*_bn_b` = beta - mean * scale), and the reference
(maskrcnn-benchmark `layers/batch_norm.py`, FrozenBatchNorm2d as used with R-50.pkl) applies them
as y = x * scale + bias: no epsilon, no running statistics, no update during training.
"""

import tensorflow as tf
import tf_keras


@tf_keras.utils.register_keras_serializable(package="official_maskrcnn")
class FrozenBatchNorm(tf_keras.layers.Layer):
    """y = x * scale + bias with non-trainable per-channel `scale` and `bias`.

    The variables are always created non-trainable, whatever `trainable` says: they only change by
    loading a checkpoint. The affine map runs in the input's dtype (variables are kept in the
    layer's variable dtype and cast), so it works under a mixed-precision policy.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scale = None
        self.bias = None

    def build(self, input_shape):
        """Creates `scale` (ones) and `bias` (zeros), both [C]."""
        channels = tf.TensorShape(input_shape)[-1]
        if channels is None:
            raise ValueError(
                f"{self.name}: the channel (last) axis must be known, got shape {input_shape}")
        self.scale = self.add_weight(
            name="scale", shape=[channels], initializer="ones", trainable=False)
        self.bias = self.add_weight(
            name="bias", shape=[channels], initializer="zeros", trainable=False)
        super().build(input_shape)

    def call(self, inputs):
        """Applies the affine map.

        Args:
            inputs: [..., C] (typically [B, H, W, C]) of any float dtype.

        Returns:
            [..., C], same dtype as `inputs`: inputs * scale + bias.
        """
        scale = tf.cast(self.scale, inputs.dtype)
        bias = tf.cast(self.bias, inputs.dtype)
        return inputs * scale + bias

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        # No constructor arguments beyond the base layer's (name, dtype, trainable).
        return super().get_config()
