"""ModelSettings: the flat <-> grouped mapping, and get_config round-trips of every argument."""

import dataclasses

import gin
import tensorflow as tf

from official_maskrcnn.modeling import factory, maskrcnn_model, model_settings
from official_maskrcnn.ops import anchors as anchors_lib
from official_maskrcnn.ops import nms, proposals

# The factory's own arguments and the part config key each one lands in.
FACTORY_ARGUMENTS = {
    "backbone_depth": (18, "backbone", "depth"),
    "backbone_norm": ("group_norm", "backbone", "norm"),
    "freeze_at": (1, "backbone", "freeze_at"),
    "fpn_num_filters": (24, "decoder", "num_filters"),
    "box_head_mlp_dim": (40, "box_head", "mlp_dim"),
    "mask_head_num_convs": (1, "mask_head", "num_convs"),
    "mask_head_num_filters": (8, "mask_head", "num_filters"),
}


def non_default_settings():
    """{flat name: a value different from its default} for every setting, consistent as a whole
    (mask_size = 2 * mask_roi_size). Derived from the fields, so a new setting is covered."""
    values = {}
    for name, default in model_settings.ModelSettings().flat().items():
        if isinstance(default, bool):
            values[name] = not default
        elif isinstance(default, tuple):
            values[name] = tuple(v * 2 for v in default)
        elif isinstance(default, int):
            values[name] = default + 3
        else:
            values[name] = default / 2 + 0.01
    values["mask_size"] = 2 * values["mask_roi_size"]
    return values


class ModelSettingsTest(tf.test.TestCase):

    def test_defaults_are_the_references(self):
        settings = model_settings.ModelSettings()
        self.assertEqual(settings.num_classes, 81)
        self.assertEqual(settings.anchors.sizes, anchors_lib.FPN_ANCHOR_SIZES)
        self.assertEqual(settings.anchors.aspect_ratios, (0.5, 1.0, 2.0))
        self.assertEqual(
            (settings.rpn.batch_size_per_image, settings.rpn.positive_fraction,
             settings.rpn.fg_iou_threshold, settings.rpn.bg_iou_threshold,
             settings.rpn.nms_threshold), (256, 0.5, 0.7, 0.3, 0.7))
        self.assertEqual(settings.rpn.top_n(training=True),
                         (2000, proposals.POST_NMS_TOP_N_TRAIN_PER_IMAGE, True))
        self.assertEqual(settings.rpn.top_n(training=False), (1000, 1000, True))
        self.assertEqual((settings.roi.num_samples, settings.roi.fg_fraction,
                          settings.roi.fg_iou_threshold, settings.roi.bg_iou_threshold),
                         (512, 0.25, 0.5, 0.5))
        self.assertEqual((settings.roi.box_roi_size, settings.roi.mask_roi_size,
                          settings.roi.sampling_ratio), (7, 14, 2))
        self.assertEqual(settings.roi.num_mask_slots, 128)
        self.assertEqual(
            (settings.detection.score_threshold, settings.detection.iou_threshold,
             settings.detection.max_detections, settings.detection.mask_size),
            (nms.INFERENCE_SCORE_THRESHOLD, nms.INFERENCE_IOU_THRESHOLD, 100, 28))

    def test_flat_round_trip_of_every_setting(self):
        values = non_default_settings()
        self.assertEqual(tuple(values), model_settings.ModelSettings.flat_names())
        settings = model_settings.ModelSettings.from_flat(**values)
        self.assertEqual(settings.flat(), values)
        self.assertNotEqual(settings, model_settings.ModelSettings())
        # Every group changed, so no flat name is mapped onto the wrong group.
        for field in dataclasses.fields(settings):
            self.assertNotEqual(getattr(settings, field.name),
                                getattr(model_settings.ModelSettings(), field.name), field.name)

    def test_missing_names_keep_defaults(self):
        settings = model_settings.ModelSettings.from_flat(roi_num_samples=64)
        self.assertEqual(settings.roi.num_samples, 64)
        self.assertEqual(settings.rpn, model_settings.RPNSettings())
        self.assertEqual(settings.num_classes, 81)

    def test_post_nms_per_batch_is_training_only(self):
        rpn = model_settings.RPNSettings(post_nms_per_image=False)
        self.assertFalse(rpn.top_n(training=True)[2])
        self.assertTrue(rpn.top_n(training=False)[2])

    def test_lists_become_tuples(self):
        settings = model_settings.ModelSettings.from_flat(anchor_sizes=[16, 32, 64, 128, 256])
        self.assertEqual(settings.anchors.sizes, (16, 32, 64, 128, 256))
        self.assertEqual(hash(settings), hash(model_settings.ModelSettings.from_flat(
            anchor_sizes=(16, 32, 64, 128, 256))))

    def test_unknown_name_is_named(self):
        with self.assertRaisesRegex(TypeError, r"unknown setting\(s\) \['rpn_nms_thresh'\]"):
            model_settings.ModelSettings.from_flat(rpn_nms_thresh=0.5)

    def test_inconsistent_mask_size(self):
        with self.assertRaisesRegex(ValueError, "mask_size must be 2 \\* mask_roi_size = 28, "
                                    "found 14"):
            model_settings.ModelSettings.from_flat(mask_size=14)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            model_settings.ModelSettings().num_classes = 3


class GetConfigRoundTripTest(tf.test.TestCase):

    def tearDown(self):
        gin.clear_config()
        super().tearDown()

    def test_every_argument_round_trips(self):
        values = non_default_settings()
        factory_values = {name: value for name, (value, _, _) in FACTORY_ARGUMENTS.items()}
        model = factory.build_maskrcnn_model(**factory_values, **values)
        config = model.get_config()
        for name, value in values.items():
            self.assertEqual(config[name], value, name)
        for name, (value, part, key) in FACTORY_ARGUMENTS.items():
            self.assertEqual(config[part]["config"][key], value, name)
        self.assertEqual(config["box_head"]["config"]["num_classes"], values["num_classes"])
        self.assertEqual(config["rpn_head"]["config"]["num_anchors"],
                         len(values["aspect_ratios"]))
        clone = maskrcnn_model.MaskRCNNModel.from_config(config)
        self.assertEqual(clone.settings, model.settings)
        self.assertEqual(clone.name, model.name)
        self.assertEqual(clone.get_config(), config)

    def test_gin_binds_flat_names(self):
        gin.parse_config("build_maskrcnn_model.backbone_depth = 18\n"
                         "build_maskrcnn_model.rpn_nms_threshold = 0.6\n"
                         "build_maskrcnn_model.detection_score_threshold = 0.1\n"
                         "build_maskrcnn_model.anchor_sizes = [16, 32, 64, 128, 256]")
        settings = factory.build_maskrcnn_model().settings
        self.assertEqual(settings.rpn.nms_threshold, 0.6)
        self.assertEqual(settings.detection.score_threshold, 0.1)
        self.assertEqual(settings.anchors.sizes, (16, 32, 64, 128, 256))

    def test_unknown_gin_name_fails(self):
        with self.assertRaisesRegex(TypeError, "roi_samples"):
            factory.build_maskrcnn_model(backbone_depth=18, roi_samples=64)


if __name__ == "__main__":
    tf.test.main()
