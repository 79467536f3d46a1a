"""Fast R-CNN box head: maskrcnn-benchmark's `FPN2MLPFeatureExtractor` + `FPNPredictor`.

Shape legend: B images; R ROIs per image; P ROIAlign output size (7); F ROI feature channels (256);
D hidden width (1024); K classes *including* background (index 0), 81 for COCO.

    x = flatten(roi_features)         [B, R, P * P * F], NHWC order: index (y * P + x) * F + c
    x = relu(fc6(x)); x = relu(fc7(x))   [B, R, D]
    class_logits = cls_score(x)       [B, R, K]
    box_deltas = bbox_pred(x)         [B, R, K, 4], (dx, dy, dw, dh) per class, coded with the head
                                      weights (10, 10, 5, 5) by `ops.box_ops.BoxCoder`
The reference's bbox_pred has K * 4 outputs laid out k * 4 + coordinate; we reshape them the same
way. Flatten order differs from the reference: it flattens [F, P, P] (channels first, index
(c * P + y) * P + x); we flatten [P, P, F]. Converting reference fc6 weights therefore needs a
row permutation: ours[(y * P + x) * F + c] = theirs[(c * P + y) * P + x].

Initialisation (maskrcnn-benchmark): fc6, fc7 by `make_fc` (make_layers.py, use_gn False):
`kaiming_uniform_(a=1)` = U(+-sqrt(3 / fan_in)), bias 0; `FPNPredictor` (roi_box_predictors.py):
cls_score normal(std=0.01), bbox_pred normal(std=0.001), biases 0.
"""

import tensorflow as tf
import tf_keras

from official_maskrcnn.modeling.coco_classes import NUM_CLASSES_COCO

CLASS_INIT_STDDEV = 0.01
BOX_INIT_STDDEV = 0.001


@tf_keras.utils.register_keras_serializable(package="official_maskrcnn")
class BoxHead(tf_keras.layers.Layer):
    """Two-fc MLP on ROI features, then class logits and class-specific box deltas."""

    def __init__(self, num_classes=NUM_CLASSES_COCO, mlp_dim=1024, **kwargs):
        """Creates the head.

        Args:
          num_classes: K, including background.
          mlp_dim: D, width of fc6 and fc7.
          **kwargs: tf_keras.layers.Layer arguments (name, dtype, ...).
        """
        super().__init__(**kwargs)
        self._num_classes = num_classes
        self._mlp_dim = mlp_dim

        def dense(units, initializer, name):
            return tf_keras.layers.Dense(units, kernel_initializer=initializer,
                                         bias_initializer="zeros", dtype=self.dtype_policy,
                                         name=name)

        def kaiming_uniform_a1():
            return tf_keras.initializers.VarianceScaling(1.0, mode="fan_in", distribution="uniform")

        self._fc6 = dense(mlp_dim, kaiming_uniform_a1(), "fc6")
        self._fc7 = dense(mlp_dim, kaiming_uniform_a1(), "fc7")
        self._cls_score = dense(
            num_classes, tf_keras.initializers.RandomNormal(stddev=CLASS_INIT_STDDEV), "cls_score")
        self._bbox_pred = dense(
            4 * num_classes, tf_keras.initializers.RandomNormal(stddev=BOX_INIT_STDDEV),
            "bbox_pred")

    def call(self, roi_features):
        """Classifies and refines ROIs.

        Args:
          roi_features: [B, R, P, P, F] ROIAlign features.
        Returns:
          dict with "class_logits": [B, R, K] float32 and "box_deltas": [B, R, K, 4] float32.
        """
        shape = tf.shape(roi_features)
        batch, num_rois = shape[0], shape[1]
        flat_size = 1
        for dim in roi_features.shape[2:]:
            flat_size *= dim
        x = tf.reshape(roi_features, [-1, flat_size])  # [B * R, P * P * F], NHWC flatten order.
        x = tf.nn.relu(self._fc6(x))
        x = tf.nn.relu(self._fc7(x))
        class_logits = tf.reshape(self._cls_score(x), [batch, num_rois, self._num_classes])
        box_deltas = tf.reshape(self._bbox_pred(x), [batch, num_rois, self._num_classes, 4])
        return {"class_logits": tf.cast(class_logits, tf.float32),
                "box_deltas": tf.cast(box_deltas, tf.float32)}

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self._num_classes, mlp_dim=self._mlp_dim)
        return config
