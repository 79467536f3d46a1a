"""Mask R-CNN: injected parts (backbone, FPN, heads) wired with the ops into losses or detections.

Shape legend: B images; H, W the padded input size (static, multiples of 32); I padded
ground-truth instances per image (100 from the parsers; padding rows have class -1); M the side of
the ground-truth mask crops (112); N anchors of all levels; P proposals per image; S sampled ROIs
per image; F = int(S * roi_fg_fraction) mask-head ROI slots per image; T `max_detections`;
K classes *including* background (index 0); Q `mask_size` (28).

Boxes are [ymin, xmin, ymax, xmax] in absolute pixels of the (padded) network input. The parts
compute in their dtype policy; boxes, targets, losses and detections are float32.

Training, `call(inputs, training=True)`:
  images -> backbone C2..C5 -> FPN P2..P6 -> RPN head on P2..P6 -> rpn_targets + rpn_losses;
  generate_proposals (no gradient) -> sample_rois (adds the gt boxes) -> ROIAlign 7x7 on P2..P5
  -> box head -> box_head_losses; the foreground ROIs (compacted into F slots) -> ROIAlign 14x14
  -> mask head -> mask_targets -> mask_loss. Returns the losses of DESIGN.md.
Inference, `call(inputs, training=False)`:
  proposals -> box head -> softmax, class-specific decoding (BoxCoder (10, 10, 5, 5)), clipping
  to image_size -> per-class NMS -> mask head on the detections -> sigmoid of the detected class.
"""

import tensorflow as tf
import tf_keras

from official_maskrcnn.modeling import losses as losses_lib
from official_maskrcnn.modeling import model_settings
from official_maskrcnn.ops import anchors as anchors_lib
from official_maskrcnn.ops import box_ops, mask_targets, nms, proposals, roi_align, roi_targets
from official_maskrcnn.ops import rpn_targets as rpn_targets_lib

PARTS = ("backbone", "decoder", "rpn_head", "box_head", "mask_head")
LOSS_NAMES = ("rpn_score_loss", "rpn_box_loss", "frcnn_class_loss", "frcnn_box_loss", "mask_loss")
# FPN levels the RPN sees (P2..P6) and the ROI heads pool from (P2..P5).
RPN_LEVELS = ("2", "3", "4", "5", "6")
ROI_LEVELS = ("2", "3", "4", "5")
# The name scopes of the training stages between the layers (profiles report time per scope).
STAGE_SCOPES = ("rpn_targets", "rpn_losses", "proposals", "sample_rois", "box_roi_align",
                "box_head_losses", "mask_roi_align", "mask_targets", "mask_loss")
DEFAULT_SEED = (0, 0)
# Mixed into the seed for the ROI sampler, so that it draws independently of the RPN sampler.
ROI_SEED_XOR = (0x2545F491, 0x9E3779B9)


def _compiling_with_xla():
    """True while tracing for XLA (a jit_compile function, or a graph inside one)."""
    # TensorFlow's own test for XLA tracing (cond_v2 and while_v2 use it); no public API.
    from tensorflow.python.ops import control_flow_util  # pylint: disable=import-outside-toplevel
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _smallest_fitting(count, sizes, fn):
    """fn(size) for the smallest of `sizes` (ascending Python ints) that is >= count, the last
    one otherwise, as nested tf.cond: only the chosen branch runs.

    Nested tf.cond rather than tf.switch_case: under XLA, TensorFlow marks a Case op to
    propagate compile-time constants, and XLA then tries to infer the value of every input of
    the op (here the FPN features) by evaluating the ops upstream in its HLO interpreter, the
    backbone's convolutions included (minutes of compile time at 256 x 256). An If op only does
    that for the inputs its branches need as constants (none here).
    """
    if len(sizes) == 1:
        return fn(sizes[0])
    return tf.cond(count <= sizes[0], lambda: fn(sizes[0]),
                   lambda: _smallest_fitting(count, sizes[1:], fn))


class MaskRCNNModel(tf_keras.Model):
    """Mask R-CNN with FPN; the sub-layers are injected, the settings are one `ModelSettings`.

    get_config returns the flat settings (`ModelSettings.flat`) and each part's Keras config;
    `from_config` rebuilds the parts from those. Weights are saved and restored through
    checkpoints.
    """

    def __init__(self, backbone, decoder, rpn_head, box_head, mask_head, settings=None,
                 **kwargs):
        """Creates the model.

        Args:
          backbone: layer, images [B, H, W, 3] -> {"2".."5": C_l}.
          decoder: layer, {"2".."5"} -> {"2".."6": [B, H / 2**l, W / 2**l, F]}.
          rpn_head: layer, {"2".."6"} -> {"objectness_logits": {l: [B, N_l]},
            "box_deltas": {l: [B, N_l, 4]}}.
          box_head: layer, [B, R, 7, 7, F] -> {"class_logits": [B, R, K],
            "box_deltas": [B, R, K, 4]}.
          mask_head: layer, [B, R, 14, 14, F] -> [B, R, Q, Q, K] logits.
          settings: a `model_settings.ModelSettings` (None: the reference's); the heads must
            agree with its num_classes and anchors (the factory builds them so).
          **kwargs: tf_keras.Model arguments (name, ...).
        """
        super().__init__(**kwargs)
        self.backbone = backbone
        self.decoder = decoder
        self.rpn_head = rpn_head
        self.box_head = box_head
        self.mask_head = mask_head
        self.settings = settings or model_settings.ModelSettings()
        self._box_coder = box_ops.BoxCoder(box_ops.HEAD_BOX_CODER_WEIGHTS)

    def get_config(self):
        """The plain settings plus each injected part serialised by Keras (its own config)."""
        parts = {part: tf_keras.layers.serialize(getattr(self, part)) for part in PARTS}
        return {"name": self.name, **self.settings.flat(), **parts}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        parts = {part: tf_keras.layers.deserialize(config.pop(part), custom_objects=custom_objects)
                 for part in PARTS}
        name = config.pop("name", None)
        return cls(**parts, settings=model_settings.ModelSettings.from_flat(**config), name=name)

    # ---------------------------------------------------------------- shared pieces

    def _features(self, images, training):
        """images [B, H, W, 3] -> FPN dict "2".."6" -> [B, H / 2**l, W / 2**l, F]."""
        return self.decoder(self.backbone(images, training=training))

    def _anchors(self, images):
        """Anchors {"2".."6": [N_l, 4]} of the static padded size of images [B, H, W, 3]."""
        height, width = images.shape[1], images.shape[2]
        if height is None or width is None:
            raise ValueError(f"MaskRCNNModel: expected a static padded image size in images "
                             f"[B, H, W, 3], found {images.shape}.")
        strides = tuple(2**int(level) for level in RPN_LEVELS)
        return anchors_lib.multilevel_anchors(height, width, strides=strides,
                                              sizes=self.settings.anchors.sizes,
                                              aspect_ratios=self.settings.anchors.aspect_ratios)

    def _proposals(self, rpn_outputs, anchors, image_size, training):
        """RPN outputs -> proposals [B, P, 4] float32 and proposal_valid [B, P] bool."""
        rpn = self.settings.rpn
        pre_nms_top_n, post_nms_top_n, per_image = rpn.top_n(training)
        result = proposals.generate_proposals(
            rpn_outputs["objectness_logits"], rpn_outputs["box_deltas"], anchors, image_size,
            pre_nms_top_n=pre_nms_top_n, post_nms_top_n=post_nms_top_n,
            nms_threshold=rpn.nms_threshold, per_image=per_image)
        return (tf.stop_gradient(result["proposal_boxes"]),
                tf.stop_gradient(result["proposal_valid"]))

    def _roi_features(self, features, boxes, output_size):
        """ROIAlign of boxes [B, R, 4] on P2..P5 -> [B, R, output_size, output_size, F]."""
        return roi_align.multilevel_roi_align(
            {level: features[level] for level in ROI_LEVELS}, tf.stop_gradient(boxes),
            output_size, self.settings.roi.sampling_ratio)

    def call(self, inputs, training=None):
        """Losses (training) or detections (inference); see the module docstring.

        Args:
          inputs: dict with
            images: [B, H, W, 3], H and W static;
            image_size: [B, 2] int (h, w) of each resized image inside the padding;
            training only: gt_boxes [B, I, 4] (padding -1), gt_classes [B, I] int (padding -1),
              gt_masks [B, I, M, M] float, gt_mask_boxes [B, I, 4] (the continuous extent
              each crop covers, padding -1; see data/parsers.py), and optionally seed [2] int
              (the stateless sampling seed, e.g. from the step number; DEFAULT_SEED otherwise).
          training: python bool.
        Returns:
          training: dict of float32 scalars rpn_score_loss, rpn_box_loss, frcnn_class_loss,
            frcnn_box_loss, mask_loss, total_loss (their sum).
          inference: dict with detection_boxes [B, T, 4] float32 (input-image pixels),
            detection_scores [B, T] float32, detection_classes [B, T] int32 (1..K-1, 0 when
            invalid), detection_masks [B, T, Q, Q] float32 probabilities of the detected class,
            num_detections [B] int32.
        """
        if training:
            return self._train_losses(inputs)
        return self._detections(inputs)

    # ---------------------------------------------------------------- training

    def _train_losses(self, inputs):
        rpn, roi = self.settings.rpn, self.settings.roi
        images = inputs["images"]
        image_size = inputs["image_size"]
        gt_boxes = tf.cast(inputs["gt_boxes"], tf.float32)  # [B, I, 4]
        gt_classes = tf.cast(inputs["gt_classes"], tf.int32)  # [B, I]
        seed = inputs.get("seed")
        if seed is None:
            seed = tf.constant(DEFAULT_SEED, tf.int32)
        # Two sampling streams from one seed by bit operations only: tf.random's stateless ops
        # differ between eager and XLA (see ops/sampling.py), bitwise ops do not.
        rpn_seed = tf.cast(seed, tf.int64)
        roi_seed = tf.bitwise.bitwise_xor(rpn_seed, tf.constant(ROI_SEED_XOR, tf.int64))

        features = self._features(images, training=True)
        rpn_outputs = self.rpn_head({level: features[level] for level in RPN_LEVELS})
        anchors = self._anchors(images)
        # Name scopes (STAGE_SCOPES) group the ops of each stage in profiles and graphs.
        with tf.name_scope("rpn_targets"):
            targets = rpn_targets_lib.rpn_targets(
                tf.concat([anchors[level] for level in RPN_LEVELS], axis=0), gt_boxes,
                gt_classes, image_size, rpn_seed, batch_size_per_image=rpn.batch_size_per_image,
                positive_fraction=rpn.positive_fraction, high=rpn.fg_iou_threshold,
                low=rpn.bg_iou_threshold, straddle_thresh=rpn.straddle_thresh)
        with tf.name_scope("rpn_losses"):
            losses = losses_lib.rpn_losses(
                tf.concat([rpn_outputs["objectness_logits"][level] for level in RPN_LEVELS],
                          axis=1),
                tf.concat([rpn_outputs["box_deltas"][level] for level in RPN_LEVELS], axis=1),
                targets["labels"], targets["box_targets"])

        with tf.name_scope("proposals"):
            boxes, valid = self._proposals(rpn_outputs, anchors, image_size, training=True)
        with tf.name_scope("sample_rois"):
            rois = roi_targets.sample_rois(
                boxes, valid, gt_boxes, gt_classes, roi_seed, num_samples=roi.num_samples,
                fg_fraction=roi.fg_fraction, fg_iou_threshold=roi.fg_iou_threshold,
                bg_iou_threshold=roi.bg_iou_threshold)
        with tf.name_scope("box_roi_align"):
            box_features = self._roi_features(features, rois["rois"], roi.box_roi_size)
        box_outputs = self.box_head(box_features)
        with tf.name_scope("box_head_losses"):
            losses.update(losses_lib.box_head_losses(
                box_outputs["class_logits"], box_outputs["box_deltas"], rois["class_targets"],
                rois["box_targets"], rois["roi_valid"]))

        if "gt_mask_boxes" not in inputs:
            raise ValueError(f"training inputs: expected 'gt_mask_boxes' [B, I, 4] (the extent "
                             f"of each gt_masks crop, from data.parsers.TrainParser) with "
                             f"gt_masks; found keys {sorted(inputs)}")
        # The mask targets span each object's continuous extent, not its "+1" box (the
        # parser's gt_mask_boxes, one pixel wider before the resize).
        losses.update(self._mask_loss(features, rois, inputs["gt_masks"],
                                      tf.cast(inputs["gt_mask_boxes"], tf.float32)))
        losses = {name: tf.cast(losses[name], tf.float32) for name in LOSS_NAMES}
        losses["total_loss"] = tf.add_n([losses[name] for name in LOSS_NAMES])
        return losses

    def _mask_loss(self, features, rois, gt_masks, gt_mask_boxes):
        """Mask loss on the foreground ROIs, compacted into F = int(S * fg_fraction) slots.

        gt_masks [B, I, M, M] are crops over gt_mask_boxes [B, I, 4] (continuous extents).
        The reference runs the mask head on the foreground ROIs only; static shapes need a
        fixed slot count, so the slots are cut into `mask_slot_buckets` sizes (F / 4, F / 2,
        3F / 4, F by default) and the mask head, its ROIAlign and its targets run on the
        smallest size holding every image's foreground ROIs (nested tf.cond: one branch per
        size; under XLA all F slots, see below). The loss is that of all F slots: the slots cut
        off are padding, which the loss masks out.
        """
        roi = self.settings.roi
        num_slots = roi.num_mask_slots
        foreground = rois["foreground"]  # [B, S]
        # top_k is stable: the foreground slots first, in ROI order. sample_rois samples at most
        # int(S * fg_fraction) foreground ROIs, so none is dropped.
        _, index = tf.math.top_k(tf.cast(foreground, tf.int32), k=num_slots)  # [B, F]
        slots = {
            "rois": tf.gather(rois["rois"], index, batch_dims=1),  # [B, F, 4]
            "valid": tf.gather(foreground, index, batch_dims=1),  # [B, F]
            "classes": tf.gather(rois["class_targets"], index, batch_dims=1),  # [B, F]
            "matched": tf.gather(rois["matched_gt"], index, batch_dims=1),  # [B, F]
        }

        def loss_on(size):
            first = {key: value[:, :size] for key, value in slots.items()}
            return self._slot_mask_loss(features, first, gt_masks, gt_mask_boxes)

        sizes = model_settings.mask_slot_sizes(num_slots, roi.mask_slot_buckets)
        if len(sizes) == 1 or not self.mask_head.built or _compiling_with_xla():
            # One size, the call that creates the mask head's variables (not in a branch), or
            # XLA: its conditionals holding the mask head's forward and backward ran the CPU
            # step 18x slower here (TF 2.20), so XLA keeps one static size.
            return loss_on(num_slots)
        most = tf.reduce_max(tf.reduce_sum(tf.cast(slots["valid"], tf.int32), axis=1))
        with tf.name_scope("mask_slot_bucket"):
            return _smallest_fitting(most, sizes, loss_on)

    def _slot_mask_loss(self, features, slots, gt_masks, gt_mask_boxes):
        """The mask loss of R slots: rois [B, R, 4], valid [B, R], classes [B, R], matched
        [B, R] (index of the matched gt instance)."""
        roi = self.settings.roi
        with tf.name_scope("mask_roi_align"):
            mask_features = self._roi_features(features, slots["rois"], roi.mask_roi_size)
        mask_logits = self.mask_head(mask_features)  # [B, R, Q, Q, K]
        with tf.name_scope("mask_targets"):
            targets = mask_targets.mask_targets(
                gt_masks, gt_mask_boxes, slots["rois"], slots["matched"],
                output_size=self.settings.detection.mask_size)  # [B, R, Q, Q]
        with tf.name_scope("mask_loss"):
            return losses_lib.mask_loss(mask_logits, targets, slots["classes"], slots["valid"])

    # ---------------------------------------------------------------- inference

    def _detections(self, inputs):
        roi, detection = self.settings.roi, self.settings.detection
        images = inputs["images"]
        image_size = tf.cast(inputs["image_size"], tf.float32)  # [B, 2]
        features = self._features(images, training=False)
        rpn_outputs = self.rpn_head({level: features[level] for level in RPN_LEVELS})
        boxes, valid = self._proposals(rpn_outputs, self._anchors(images), image_size,
                                       training=False)  # [B, P, 4], [B, P]

        box_outputs = self.box_head(self._roi_features(features, boxes, roi.box_roi_size))
        scores = tf.nn.softmax(box_outputs["class_logits"], axis=-1)  # [B, P, K]
        class_boxes = self._box_coder.decode(box_outputs["box_deltas"],
                                             boxes[:, :, None, :])  # [B, P, K, 4]
        class_boxes = box_ops.clip_boxes(class_boxes, image_size[:, None, :])
        detections = nms.batched_per_class_nms(
            class_boxes, scores, score_threshold=detection.score_threshold,
            iou_threshold=detection.iou_threshold, max_detections=detection.max_detections,
            valid=valid)

        detection_boxes = detections["detection_boxes"]  # [B, T, 4]
        classes = detections["detection_classes"]  # [B, T]
        mask_logits = self.mask_head(
            self._roi_features(features, detection_boxes, roi.mask_roi_size))  # [B, T, Q, Q, K]
        own_logits = tf.gather(tf.transpose(mask_logits, [0, 1, 4, 2, 3]), classes, axis=2,
                               batch_dims=2)  # [B, T, Q, Q]
        masks = tf.where(detections["detection_valid"][:, :, None, None],
                         tf.sigmoid(tf.cast(own_logits, tf.float32)), 0.0)
        return {
            "detection_boxes": detection_boxes,
            "detection_scores": detections["detection_scores"],
            "detection_classes": classes,
            "detection_masks": masks,
            "num_detections": detections["num_detections"],
        }
