"""Region Proposal Network head, as maskrcnn-benchmark's `RPNHead` (single conv, shared weights).

Shape legend: B images; Hf, Wf a level's feature-map size; F input channels (256); A anchors per
location (3: one size x ratios 0.5, 1, 2, ratio-major as `ops/anchors.py`); N = Hf * Wf * A
anchors of a level. Level keys are strings "2".."6".

Every level goes through the *same* layers (weights shared across levels):
    t = relu(conv3x3(features))                      [B, Hf, Wf, F]
    objectness_logits = conv1x1_A(t)                  [B, Hf, Wf, A]
    box_deltas = conv1x1_4A(t)                        [B, Hf, Wf, 4A]
Flattening: both are reshaped row-major to [B, Hf * Wf * A] and [B, Hf * Wf * A, 4], i.e. in
(y, x, a) order, which is the order of `ops.anchors.grid_anchors`: anchor index
n = y * Wf * A + x * A + a. Channel layout of the deltas conv: channel a * 4 + j holds coordinate j
of anchor a, with coordinates (dx, dy, dw, dh) as `ops.box_ops.BoxCoder` (the reference's order).
This is the reference's layout too: its `bbox_pred` has A * 4 channels that `permute_and_flatten`
views as [N, A, 4, H, W], so a weight converter can copy the 1x1 convs channel for channel.

Initialisation (maskrcnn-benchmark rpn/rpn.py `RPNHead`): all three convs normal(std=0.01),
biases 0.
"""

import tensorflow as tf
import tf_keras

from official_maskrcnn.modeling.layers.pointwise_conv import PointwiseConv2D
from official_maskrcnn.ops import anchors as anchors_lib

NUM_ANCHORS_PER_LOCATION = len(anchors_lib.ASPECT_RATIOS)
RPN_INIT_STDDEV = 0.01


@tf_keras.utils.register_keras_serializable(package="official_maskrcnn")
class RPNHead(tf_keras.layers.Layer):
    """Objectness logits and anchor deltas for every anchor of every FPN level."""

    def __init__(self, num_anchors=NUM_ANCHORS_PER_LOCATION, num_filters=256, **kwargs):
        """Creates the head.

        Args:
          num_anchors: A, anchors per feature-map location.
          num_filters: channels of the shared 3x3 conv (the reference uses the input's 256).
          **kwargs: tf_keras.layers.Layer arguments (name, dtype, ...).
        """
        super().__init__(**kwargs)
        self._num_anchors = num_anchors
        self._num_filters = num_filters

        def conv(filters, kernel_size, name):
            conv_class = PointwiseConv2D if kernel_size == 1 else tf_keras.layers.Conv2D
            return conv_class(
                filters, kernel_size, padding="same",
                kernel_initializer=tf_keras.initializers.RandomNormal(stddev=RPN_INIT_STDDEV),
                bias_initializer="zeros", dtype=self.dtype_policy, name=name)

        self._conv = conv(num_filters, 3, "rpn_conv")
        self._objectness = conv(num_anchors, 1, "rpn_objectness")
        self._deltas = conv(4 * num_anchors, 1, "rpn_deltas")

    def call(self, features):
        """Applies the shared head to every level.

        Args:
          features: dict str(level) -> [B, Hf, Wf, F].
        Returns:
          dict with
            "objectness_logits": dict str(level) -> [B, Hf * Wf * A] float32;
            "box_deltas": dict str(level) -> [B, Hf * Wf * A, 4] float32, (dx, dy, dw, dh);
          both ordered (y, x, a) as the anchors of `ops.anchors.multilevel_anchors`.
        """
        objectness_logits = {}
        box_deltas = {}
        for level in sorted(features, key=int):
            hidden = tf.nn.relu(self._conv(features[level]))
            shape = tf.shape(hidden)
            batch = shape[0]
            # Static sizes when known (XLA), dynamic otherwise.
            height = hidden.shape[1] if hidden.shape[1] is not None else shape[1]
            width = hidden.shape[2] if hidden.shape[2] is not None else shape[2]
            num_anchors = height * width * self._num_anchors
            logits = self._objectness(hidden)  # [B, Hf, Wf, A]
            deltas = self._deltas(hidden)  # [B, Hf, Wf, A * 4], channel a * 4 + coordinate.
            objectness_logits[level] = tf.cast(tf.reshape(logits, [batch, num_anchors]),
                                               tf.float32)
            box_deltas[level] = tf.cast(tf.reshape(deltas, [batch, num_anchors, 4]), tf.float32)
        return {"objectness_logits": objectness_logits, "box_deltas": box_deltas}

    def get_config(self):
        config = super().get_config()
        config.update(num_anchors=self._num_anchors, num_filters=self._num_filters)
        return config
