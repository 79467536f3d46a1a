"""A 1x1 convolution computed as a matrix product.

Shape legend: B images, H, W spatial size, C input channels, F filters, s the stride.

`PointwiseConv2D` is a Keras `Conv2D` with a 1x1 kernel (same variables, names, initialisers,
config and checkpoints) whose arithmetic is `x[:, ::s, ::s] @ kernel`: the same sums over C.
Why: XLA:CPU computes a convolution's weight gradient as a convolution with the batch and
channel axes swapped, which needs a physically transposed copy of the layer's input; on the
ResNet-50-FPN step at 800x1344 those copies of the blocks' outputs were about 7 of the 11
traced seconds of the compiled step (BENCHMARKS.md). A matrix product's weight gradient is a
product with a transposed operand, which Eigen takes without a copy. Without XLA the product
runs on the same oneDNN / MKL kernels family and costs about the same.
"""

import tensorflow as tf
import tf_keras


@tf_keras.utils.register_keras_serializable(package="official_maskrcnn")
class PointwiseConv2D(tf_keras.layers.Conv2D):
    """`Conv2D(filters, 1, strides)` as a matrix product; channels-last, no dilation or groups.

    With a 1x1 kernel, 'valid' and 'same' padding are the same map (output ceil(H / s) x
    ceil(W / s): the pixels at multiples of the stride), so both are accepted.
    """

    def __init__(self, filters, kernel_size=1, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        unsupported = {"kernel_size": (self.kernel_size, (1, 1)),
                       "dilation_rate": (self.dilation_rate, (1, 1)),
                       "groups": (self.groups, 1), "data_format": (self.data_format,
                                                                   "channels_last")}
        for name, (found, expected) in unsupported.items():
            if found != expected:
                raise ValueError(f"PointwiseConv2D {self.name!r}: {name} must be {expected!r}, "
                                 f"got {found!r}")

    def convolution_op(self, inputs, kernel):
        """inputs [B, H, W, C], kernel [1, 1, C, F] -> [B, ceil(H / s), ceil(W / s), F]."""
        stride_h, stride_w = self.strides
        if (stride_h, stride_w) != (1, 1):
            inputs = inputs[:, ::stride_h, ::stride_w, :]
        channels = kernel.shape[2]
        outputs = tf.matmul(tf.reshape(inputs, [-1, channels]),
                            tf.reshape(kernel, [channels, self.filters]))
        outputs = tf.reshape(outputs, tf.concat([tf.shape(inputs)[:3], [self.filters]], 0))
        outputs.set_shape(inputs.shape[:3].concatenate([self.filters]))
        return outputs
