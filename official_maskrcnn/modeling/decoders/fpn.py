"""Feature Pyramid Network decoder, as maskrcnn-benchmark's `FPN` with `LastLevelMaxPool`.

Shape legend: B images; H, W the padded input image size (multiples of 32); C_l the backbone's
channels at level l (256, 512, 1024, 2048 for ResNet-50; 64, 128, 256, 512 for ResNet-18/34);
F the FPN channels (256). Level l has stride 2**l, so its map is [B, H / 2**l, W / 2**l, *].
Dict keys are level strings "2".."6", as Model Garden's multilevel feature dicts.

For each backbone level (top to bottom):
    inner_5 = lateral_5(C5)
    inner_l = lateral_l(C_l) + nearest_upsample_x2(inner_{l+1})     (l = 4, 3, 2)
    P_l = output_l(inner_l)                                         (3x3 conv, padding 1)
    P6 = P5[:, ::2, ::2]                  (the reference's max_pool2d(P5, kernel 1, stride 2))
No activation anywhere. The top-down path adds the *lateral sums* (inner_l), not the P_l.

Initialisation (maskrcnn-benchmark `conv_with_kaiming_uniform`, make_layers.py): weights
`kaiming_uniform_(a=1)`, i.e. U(-b, b) with b = sqrt(6 / ((1 + a**2) * fan_in)) = sqrt(3 / fan_in),
which is `VarianceScaling(scale=1, mode="fan_in", distribution="uniform")`; biases 0.
"""

import tensorflow as tf
import tf_keras

from official_maskrcnn.modeling.layers.pointwise_conv import PointwiseConv2D

# Backbone levels the reference's R-50-FPN reads (C2..C5); P6 is added on top.
DEFAULT_MIN_LEVEL = 2
DEFAULT_MAX_LEVEL = 5


def kaiming_uniform_a1():
    """torch's `kaiming_uniform_(w, a=1)`: U(+-sqrt(3 / fan_in)). A fresh instance per layer."""
    return tf_keras.initializers.VarianceScaling(scale=1.0, mode="fan_in", distribution="uniform")


def upsample_nearest_x2(features):
    """Nearest-neighbour x2 upsampling, as `F.interpolate(x, scale_factor=2, mode="nearest")`.

    Args:
      features: [B, h, w, F].
    Returns:
      [B, 2h, 2w, F], out[:, y, x] = features[:, y // 2, x // 2].
    """
    return tf.repeat(tf.repeat(features, 2, axis=1), 2, axis=2)


@tf_keras.utils.register_keras_serializable(package="official_maskrcnn")
class FPN(tf_keras.layers.Layer):
    """Feature Pyramid Network: backbone features C2..C5 -> pyramid P2..P6 of F channels.

    Input channel counts are read from the inputs when the layer is built, so the same layer
    serves ResNet-50 (256..2048) and ResNet-18/34 (64..512).
    """

    def __init__(self, num_filters=256, min_level=DEFAULT_MIN_LEVEL, max_level=DEFAULT_MAX_LEVEL,
                 add_p6=True, **kwargs):
        """Creates the FPN.

        Args:
          num_filters: F, channels of every lateral and output conv.
          min_level: lowest backbone level read (2 -> C2, stride 4).
          max_level: highest backbone level read (5 -> C5, stride 32).
          add_p6: whether to add P_{max_level + 1} = P_max[:, ::2, ::2] (the reference's
            `LastLevelMaxPool`).
          **kwargs: tf_keras.layers.Layer arguments (name, dtype, ...).
        """
        super().__init__(**kwargs)
        if not min_level <= max_level:
            raise ValueError(f"FPN: expected min_level <= max_level, found min_level={min_level}, "
                             f"max_level={max_level}.")
        self._num_filters = num_filters
        self._min_level = min_level
        self._max_level = max_level
        self._add_p6 = add_p6
        self._levels = [str(level) for level in range(min_level, max_level + 1)]
        conv_args = dict(use_bias=True, bias_initializer="zeros", dtype=self.dtype_policy)
        self._lateral_convs = {
            level: PointwiseConv2D(num_filters, kernel_initializer=kaiming_uniform_a1(),
                                   name=f"lateral_{level}", **conv_args)
            for level in self._levels}
        self._output_convs = {
            level: tf_keras.layers.Conv2D(num_filters, 3, padding="same",
                                          kernel_initializer=kaiming_uniform_a1(),
                                          name=f"output_{level}", **conv_args)
            for level in self._levels}

    def call(self, inputs):
        """Runs the top-down pathway.

        Args:
          inputs: dict str(level) -> [B, H / 2**level, W / 2**level, C_level] for every level in
            min_level..max_level (other keys are ignored). Each level must be exactly twice the
            size of the next one (true for images padded to a multiple of 2**max_level).
        Returns:
          dict str(level) -> [B, H / 2**level, W / 2**level, F] for min_level..max_level (+1 if
          add_p6), in the layer's compute dtype.
        """
        missing = [level for level in self._levels if level not in inputs]
        if missing:
            raise ValueError(f"FPN: expected backbone levels {self._levels}, found keys "
                             f"{sorted(inputs)} (missing {missing}).")
        outputs = {}
        inner = None
        for level in reversed(self._levels):
            lateral = self._lateral_convs[level](inputs[level])
            if inner is None:
                inner = lateral
            else:
                top_down = upsample_nearest_x2(inner)
                if not top_down.shape[1:3].is_compatible_with(lateral.shape[1:3]):
                    raise ValueError(
                        f"FPN: level {level} is {lateral.shape[1:3]} but twice level "
                        f"{int(level) + 1} is {top_down.shape[1:3]}; pad images to a multiple "
                        f"of {2**self._max_level}.")
                inner = lateral + top_down
            outputs[level] = self._output_convs[level](inner)
        if self._add_p6:
            # max_pool2d(kernel_size=1, stride=2) is a plain subsample: ceil(h / 2) rows.
            outputs[str(self._max_level + 1)] = outputs[str(self._max_level)][:, ::2, ::2, :]
        return dict(sorted(outputs.items(), key=lambda item: int(item[0])))

    def get_config(self):
        config = super().get_config()
        config.update(num_filters=self._num_filters, min_level=self._min_level,
                      max_level=self._max_level, add_p6=self._add_p6)
        return config
