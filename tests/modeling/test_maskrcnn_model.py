"""MaskRCNNModel and its factory on a tiny model: losses, gradients, inference, XLA, precision.

Shape legend: B images; H, W the padded image size (128); I padded ground-truth instances;
M the side of the gt mask crops (112); T max detections; Q mask side (28); K classes including
background.
"""

import os

import gin
import numpy as np
import tensorflow as tf
import tf_keras
from absl.testing import parameterized

from official_maskrcnn.modeling import factory, maskrcnn_model, model_settings
from official_maskrcnn.modeling.backbones import checkpoint, resnet

BATCH = 2
IMAGE_SIDE = 128
NUM_INSTANCES = 5
MASK_CROP = 112
NUM_CLASSES = 4
MAX_DETECTIONS = 20
MASK_SIZE = 28
LOSS_KEYS = {"rpn_score_loss", "rpn_box_loss", "frcnn_class_loss", "frcnn_box_loss", "mask_loss",
             "total_loss"}
SMALL_SETTINGS = dict(
    num_classes=NUM_CLASSES, backbone_depth=18, backbone_norm="group_norm", freeze_at=0,
    fpn_num_filters=32, box_head_mlp_dim=64, mask_head_num_convs=1, mask_head_num_filters=16,
    rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_eval=200,
    rpn_post_nms_top_n_eval=100, roi_num_samples=64, max_detections=MAX_DETECTIONS)


def build_small_model():
    return factory.build_maskrcnn_model(**SMALL_SETTINGS)


def training_inputs(with_gt=(True, True), seed=0):
    """A synthetic parser-like training batch; images without gt have all rows -1.

    Returns:
      dict: images [B, H, W, 3], image_size [B, 2] int32, gt_boxes [B, I, 4], gt_classes [B, I]
      int32, gt_masks [B, I, M, M] (ones for real instances, -1 for padding), gt_mask_boxes
      [B, I, 4] (the boxes one pixel longer at ymax and xmax, as the parser's extents of
      inclusive boxes at scale 1; padding -1), seed [2] int32.
    """
    rng = np.random.default_rng(seed)
    real_boxes = [[10.0, 12.0, 60.0, 70.0], [40.0, 50.0, 118.0, 100.0], [5.0, 70.0, 40.0, 95.0]]
    real_classes = [1, 3, 2]
    boxes = -np.ones([BATCH, NUM_INSTANCES, 4], np.float32)
    classes = -np.ones([BATCH, NUM_INSTANCES], np.int32)
    for b, has_gt in enumerate(with_gt):
        if has_gt:
            boxes[b, :len(real_boxes)] = real_boxes
            classes[b, :len(real_classes)] = real_classes
    masks = np.where(classes[:, :, None, None] > 0, 1.0, -1.0) * np.ones(
        [BATCH, NUM_INSTANCES, MASK_CROP, MASK_CROP])
    return {
        "images": tf.constant(rng.normal(size=[BATCH, IMAGE_SIDE, IMAGE_SIDE, 3]), tf.float32),
        "image_size": tf.constant([[IMAGE_SIDE, IMAGE_SIDE], [100, 120]], tf.int32),
        "gt_boxes": tf.constant(boxes),
        "gt_classes": tf.constant(classes),
        "gt_masks": tf.constant(masks, tf.float32),
        "gt_mask_boxes": tf.constant(np.where(boxes >= 0, boxes + [0, 0, 1, 1], -1.0),
                                     tf.float32),
        "seed": tf.constant([3, 7], tf.int32),
    }


class MaskRCNNModelTest(tf.test.TestCase):
    """One small float32 model for the whole class (building and tracing dominate the time)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = build_small_model()
        cls.inputs = training_inputs()
        cls.losses = cls.model(cls.inputs, training=True)

    def assert_valid_losses(self, losses):
        self.assertEqual(set(losses), LOSS_KEYS)
        for name, value in losses.items():
            self.assertEqual(value.dtype, tf.float32, name)
            self.assertEqual(value.shape.rank, 0, name)
            self.assertTrue(np.isfinite(value.numpy()), f"{name} = {value.numpy()}")
            self.assertGreaterEqual(value.numpy(), 0.0, name)
        parts = sum(losses[name].numpy() for name in maskrcnn_model.LOSS_NAMES)
        self.assertAllClose(losses["total_loss"], parts, rtol=1e-6)

    def test_training_losses(self):
        self.assert_valid_losses(self.losses)
        # Ground truth present: every loss is active (the mask loss of random weights ~ log 2).
        for name in ("rpn_score_loss", "rpn_box_loss", "frcnn_class_loss", "mask_loss"):
            self.assertGreater(self.losses[name].numpy(), 0.0, name)

    def test_no_ground_truth(self):
        # One image without ground truth next to one with it.
        self.assert_valid_losses(self.model(training_inputs((True, False)), training=True))
        # No ground truth in the whole batch: only the classification losses remain.
        losses = self.model(training_inputs((False, False)), training=True)
        self.assert_valid_losses(losses)
        for name in ("rpn_box_loss", "frcnn_box_loss", "mask_loss"):
            self.assertEqual(losses[name].numpy(), 0.0, name)
        self.assertGreater(losses["rpn_score_loss"].numpy(), 0.0)
        self.assertGreater(losses["frcnn_class_loss"].numpy(), 0.0)

    def test_mask_targets_follow_the_mask_extents(self):
        # The mask loss reads the crops over gt_mask_boxes, never gt_boxes: extents half as
        # wide as the boxes put zeros into the right half of the targets of ROIs near a box
        # (the crops are all ones), and change the mask loss only.
        inputs = dict(self.inputs)
        extents = inputs["gt_mask_boxes"].numpy()
        real = extents[..., 0] >= 0
        extents[..., 3] = np.where(real, 0.5 * (extents[..., 1] + extents[..., 3]), -1.0)
        inputs["gt_mask_boxes"] = tf.constant(extents)
        losses = self.model(inputs, training=True)
        for name in LOSS_KEYS - {"mask_loss", "total_loss"}:
            self.assertEqual(losses[name].numpy(), self.losses[name].numpy(), name)
        self.assertNotAllClose(losses["mask_loss"], self.losses["mask_loss"])
        del inputs["gt_mask_boxes"]
        with self.assertRaisesRegex(ValueError, "training inputs: expected 'gt_mask_boxes'"):
            self.model(inputs, training=True)

    def test_gradients_and_sgd_step(self):
        model = build_small_model()
        inputs = training_inputs()
        with tf.GradientTape() as tape:
            total = model(inputs, training=True)["total_loss"]
        variables = model.trainable_variables
        grads = tape.gradient(total, variables)
        missing = [v.name for v, g in zip(variables, grads) if g is None]
        self.assertEqual(missing, [])
        for v, g in zip(variables, grads):
            self.assertTrue(np.all(np.isfinite(g.numpy())), v.name)
        # Every part receives gradient.
        for part in ("resnet", "fpn", "rpn_head", "box_head", "mask_head"):
            norm = sum(float(tf.norm(g)) for v, g in zip(variables, grads) if part in v.name)
            self.assertGreater(norm, 0.0, part)
        before = [v.numpy() for v in variables]
        tf_keras.optimizers.SGD(0.01).apply_gradients(zip(grads, variables))
        changed = [not np.array_equal(b, v.numpy()) for b, v in zip(before, variables)]
        self.assertGreater(sum(changed), len(variables) // 2)
        after = model(inputs, training=True)["total_loss"]
        self.assertNotAllClose(total, after)

    def test_inference_outputs(self):
        images = self.inputs["images"]
        image_size = self.inputs["image_size"]
        outputs = self.model({"images": images, "image_size": image_size}, training=False)
        expected = {
            "detection_boxes": ([BATCH, MAX_DETECTIONS, 4], tf.float32),
            "detection_scores": ([BATCH, MAX_DETECTIONS], tf.float32),
            "detection_classes": ([BATCH, MAX_DETECTIONS], tf.int32),
            "detection_masks": ([BATCH, MAX_DETECTIONS, MASK_SIZE, MASK_SIZE], tf.float32),
            "num_detections": ([BATCH], tf.int32),
        }
        self.assertEqual(set(outputs), set(expected))
        for name, (shape, dtype) in expected.items():
            self.assertEqual(outputs[name].shape.as_list(), shape, name)
            self.assertEqual(outputs[name].dtype, dtype, name)
        num = outputs["num_detections"].numpy()
        self.assertTrue(np.all((num >= 0) & (num <= MAX_DETECTIONS)))
        classes = outputs["detection_classes"].numpy()
        masks = outputs["detection_masks"].numpy()
        boxes = outputs["detection_boxes"].numpy()
        size = image_size.numpy()
        for b in range(BATCH):
            valid_classes = classes[b, :num[b]]
            self.assertTrue(np.all((valid_classes >= 1) & (valid_classes < NUM_CLASSES)))
            self.assertTrue(np.all(outputs["detection_scores"].numpy()[b, :num[b]] > 0.05))
            self.assertTrue(np.all(masks[b, :num[b]] >= 0.0) and np.all(masks[b, :num[b]] <= 1.0))
            self.assertAllEqual(masks[b, num[b]:], np.zeros_like(masks[b, num[b]:]))
            self.assertTrue(np.all(boxes[b, :num[b], 2] <= size[b, 0] - 1))
            self.assertTrue(np.all(boxes[b, :num[b], 3] <= size[b, 1] - 1))
            self.assertTrue(np.all(boxes[b, :num[b]] >= 0.0))

    def test_xla_matches_eager(self):
        compiled = tf.function(lambda inputs: self.model(inputs, training=True),
                               jit_compile=True)
        xla_losses = compiled(self.inputs)
        self.assertEqual(set(xla_losses), LOSS_KEYS)
        for name in LOSS_KEYS:
            self.assertAllClose(xla_losses[name], self.losses[name], rtol=1e-4, atol=1e-6,
                                msg=name)

    def test_xla_inference_matches_eager(self):
        inputs = {"images": self.inputs["images"], "image_size": self.inputs["image_size"]}
        eager = self.model(inputs, training=False)
        compiled = tf.function(lambda x: self.model(x, training=False), jit_compile=True)(inputs)
        self.assertAllEqual(compiled["num_detections"], eager["num_detections"])
        self.assertAllEqual(compiled["detection_classes"], eager["detection_classes"])
        for name in ("detection_boxes", "detection_scores", "detection_masks"):
            self.assertAllClose(compiled[name], eager[name], rtol=1e-4, atol=1e-4, msg=name)

    def test_seed_changes_sampling(self):
        inputs = dict(self.inputs, seed=tf.constant([11, 5], tf.int32))
        other = self.model(inputs, training=True)
        self.assertNotAllClose(other["frcnn_class_loss"], self.losses["frcnn_class_loss"])

    def test_get_config(self):
        config = self.model.get_config()
        self.assertEqual(config["num_classes"], NUM_CLASSES)
        self.assertEqual(config["roi_num_samples"], 64)
        self.assertEqual(config["max_detections"], MAX_DETECTIONS)
        self.assertEqual(config["rpn_pre_nms_top_n_train"], 200)
        self.assertEqual(config["backbone"]["config"]["depth"], 18)
        # from_config rebuilds every part from its own config: same settings, same architecture.
        clone = maskrcnn_model.MaskRCNNModel.from_config(config)
        self.assertEqual(clone.get_config(), config)
        losses = clone(training_inputs(), training=True)
        self.assertTrue(all(np.isfinite(v.numpy()) for v in losses.values()))
        self.assertEqual(clone.count_params(), self.model.count_params())


class MaskSlotBucketsTest(tf.test.TestCase):
    """The mask head on the smallest bucket of slots gives the losses and gradients of all
    F slots (model_settings.mask_slot_sizes), eagerly and in a graph; XLA keeps all slots."""

    def test_buckets_match_all_slots(self):
        bucketed = build_small_model()  # F = 16 slots in 4 buckets: 4, 8, 12, 16
        inputs = training_inputs()
        bucketed(inputs, training=True)  # builds the variables (no branch yet)
        padded = factory.build_maskrcnn_model(**SMALL_SETTINGS, mask_slot_buckets=1)
        padded(inputs, training=True)
        padded.set_weights(bucketed.get_weights())
        mask_rois = []
        call = bucketed.mask_head.call
        bucketed.mask_head.call = lambda x: mask_rois.append(x.shape[1]) or call(x)

        def losses_and_grads(model, batch):
            with tf.GradientTape() as tape:
                losses = model(batch, training=True)
            return losses, tape.gradient(losses["total_loss"], model.trainable_variables)

        one_gt = dict(inputs, gt_classes=tf.constant(
            np.where(np.arange(NUM_INSTANCES) < 1, inputs["gt_classes"].numpy(), -1)))
        for batch in (inputs, one_gt):
            mask_rois.clear()
            want, want_grads = losses_and_grads(padded, batch)
            got, got_grads = losses_and_grads(bucketed, batch)
            # Eagerly only the chosen branch runs: fewer than F slots for these batches.
            self.assertLen(mask_rois, 1)
            self.assertLess(mask_rois[0], 16)
            for name in LOSS_KEYS:
                self.assertAllClose(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
            for variable, g, w in zip(bucketed.trainable_variables, got_grads, want_grads):
                self.assertAllClose(g, w, rtol=1e-5, atol=1e-6, msg=variable.name)
        # In a graph every size is traced and the chosen one runs; under XLA all 16 slots.
        for jit, traced in ((False, [4, 8, 12, 16]), (True, [16])):
            mask_rois.clear()
            compiled = tf.function(lambda b: bucketed(b, training=True), jit_compile=jit)
            for name, value in compiled(one_gt).items():
                self.assertAllClose(value, want[name], rtol=1e-4, atol=1e-6, msg=name)
            self.assertEqual(sorted(set(mask_rois)), traced)
        self.assertEqual(model_settings.mask_slot_sizes(128, 4), (32, 64, 96, 128))
        self.assertEqual(model_settings.mask_slot_sizes(3, 4), (1, 2, 3))
        self.assertEqual(model_settings.mask_slot_sizes(16, 1), (16,))
        with self.assertRaisesRegex(ValueError, "mask_slot_buckets must be an int >= 1"):
            factory.build_maskrcnn_model(**SMALL_SETTINGS, mask_slot_buckets=0)


class MixedPrecisionTest(tf.test.TestCase, parameterized.TestCase):

    def tearDown(self):
        tf_keras.mixed_precision.set_global_policy("float32")
        super().tearDown()

    @parameterized.parameters("mixed_bfloat16", "mixed_float16")
    def test_losses_and_detections_stay_float32(self, policy):
        tf_keras.mixed_precision.set_global_policy(policy)
        compute_dtype = policy.split("_")[1]
        model = build_small_model()
        losses = model(training_inputs(), training=True)
        self.assertEqual(model.backbone.compute_dtype, compute_dtype)
        self.assertEqual(model.mask_head.compute_dtype, compute_dtype)
        self.assertEqual(set(losses), LOSS_KEYS)
        for name, value in losses.items():
            self.assertEqual(value.dtype, tf.float32, name)
            self.assertTrue(np.isfinite(value.numpy()), name)
        self.assertTrue(all(v.dtype == tf.float32 for v in model.trainable_variables))
        inputs = training_inputs()
        outputs = model({"images": inputs["images"], "image_size": inputs["image_size"]},
                        training=False)
        for name in ("detection_boxes", "detection_scores", "detection_masks"):
            self.assertEqual(outputs[name].dtype, tf.float32, name)


class FactoryTest(tf.test.TestCase):

    def tearDown(self):
        gin.clear_config()
        super().tearDown()

    def test_gin_binds_settings(self):
        gin.parse_config("build_maskrcnn_model.num_classes = 7\n"
                         "build_maskrcnn_model.roi_num_samples = 32\n"
                         "build_maskrcnn_model.backbone_depth = 18")
        model = factory.build_maskrcnn_model()
        self.assertIsInstance(model, maskrcnn_model.MaskRCNNModel)
        self.assertEqual(model.get_config()["num_classes"], 7)
        self.assertEqual(model.get_config()["roi_num_samples"], 32)
        self.assertEqual(model.backbone.get_config()["depth"], 18)
        self.assertEqual(model.box_head.get_config()["num_classes"], 7)
        self.assertEqual(model.mask_head.get_config()["num_classes"], 7)

    def test_backbone_checkpoint_is_restored_before_the_first_step(self):
        source = resnet.ResNet(depth=18, norm="frozen_bn")
        source(tf.zeros([1, 64, 64, 3]))
        kernel = source.get_layer("conv1").kernel
        kernel.assign(tf.fill(kernel.shape, 0.125))
        prefix = os.path.join(self.create_tempdir().full_path, "backbone")
        tf.train.Checkpoint(backbone=source).write(prefix)
        model = factory.build_maskrcnn_model(num_classes=3, backbone_depth=18,
                                             backbone_checkpoint=prefix)
        restored = model.backbone.get_layer("conv1").kernel
        self.assertAllEqual(restored, tf.fill(kernel.shape, 0.125))
        with self.assertRaises(checkpoint.BackboneWeightsError):
            factory.build_maskrcnn_model(num_classes=3, backbone_depth=34,
                                         backbone_checkpoint=prefix)

    def test_rejects_inconsistent_mask_size(self):
        with self.assertRaisesRegex(ValueError, "mask_size"):
            factory.build_maskrcnn_model(mask_roi_size=14, mask_size=14)
