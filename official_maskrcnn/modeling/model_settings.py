"""The plain settings of `MaskRCNNModel`, grouped by the stage that reads them.

Four small frozen groups (anchors, RPN, ROI heads, detections) inside one `ModelSettings`.
Configuration and serialisation stay flat: gin binds `build_maskrcnn_model.rpn_nms_threshold`,
`get_config()` returns {"rpn_nms_threshold": ...}; `ModelSettings.from_flat` and `.flat()` are the
one mapping between the two, each field naming its flat key. Defaults are the MLPerf reference's.
"""

import dataclasses

from official_maskrcnn.modeling.coco_classes import NUM_CLASSES_COCO
from official_maskrcnn.ops import anchors as anchors_lib
from official_maskrcnn.ops import nms, proposals


def _flat(name, default):
    """A field whose flat (gin / get_config) key is `name`."""
    return dataclasses.field(default=default, metadata={"flat": name})


@dataclasses.dataclass(frozen=True)
class AnchorSettings:
    """One anchor size per RPN level (strides 4..64) and the height / width ratios."""
    sizes: tuple = _flat("anchor_sizes", anchors_lib.FPN_ANCHOR_SIZES)
    aspect_ratios: tuple = _flat("aspect_ratios", anchors_lib.ASPECT_RATIOS)

    def __post_init__(self):
        # Tuples, so that settings from gin lists or JSON compare and hash like the defaults.
        object.__setattr__(self, "sizes", tuple(self.sizes))
        object.__setattr__(self, "aspect_ratios", tuple(self.aspect_ratios))


@dataclasses.dataclass(frozen=True)
class RPNSettings:
    """RPN anchor sampling (`rpn_targets`) and proposal generation (`generate_proposals`).

    post_nms_per_image: training keeps post_nms_top_n_train proposals per image (True) or per
    batch (False, the reference's per-GPU behaviour); evaluation is always per image.
    """
    batch_size_per_image: int = _flat("rpn_batch_size_per_image", 256)
    positive_fraction: float = _flat("rpn_positive_fraction", 0.5)
    fg_iou_threshold: float = _flat("rpn_fg_iou_threshold", 0.7)
    bg_iou_threshold: float = _flat("rpn_bg_iou_threshold", 0.3)
    straddle_thresh: float = _flat("rpn_straddle_thresh", 0)
    nms_threshold: float = _flat("rpn_nms_threshold", proposals.RPN_NMS_THRESHOLD)
    pre_nms_top_n_train: int = _flat("rpn_pre_nms_top_n_train", proposals.PRE_NMS_TOP_N_TRAIN)
    post_nms_top_n_train: int = _flat("rpn_post_nms_top_n_train",
                                      proposals.POST_NMS_TOP_N_TRAIN_PER_IMAGE)
    pre_nms_top_n_eval: int = _flat("rpn_pre_nms_top_n_eval", proposals.PRE_NMS_TOP_N_EVAL)
    post_nms_top_n_eval: int = _flat("rpn_post_nms_top_n_eval", proposals.POST_NMS_TOP_N_EVAL)
    post_nms_per_image: bool = _flat("rpn_post_nms_per_image", True)

    def top_n(self, training):
        """(pre_nms_top_n, post_nms_top_n, per_image) of the training or the inference call."""
        if training:
            return self.pre_nms_top_n_train, self.post_nms_top_n_train, self.post_nms_per_image
        return self.pre_nms_top_n_eval, self.post_nms_top_n_eval, True


@dataclasses.dataclass(frozen=True)
class ROISettings:
    """ROI sampling (`sample_rois`) and ROIAlign of the box and mask heads."""
    num_samples: int = _flat("roi_num_samples", 512)
    fg_fraction: float = _flat("roi_fg_fraction", 0.25)
    fg_iou_threshold: float = _flat("roi_fg_iou_threshold", 0.5)
    bg_iou_threshold: float = _flat("roi_bg_iou_threshold", 0.5)
    box_roi_size: int = _flat("box_roi_size", 7)
    mask_roi_size: int = _flat("mask_roi_size", 14)
    sampling_ratio: int = _flat("sampling_ratio", 2)
    mask_slot_buckets: int = _flat("mask_slot_buckets", 4)

    def __post_init__(self):
        if not isinstance(self.mask_slot_buckets, int) or self.mask_slot_buckets < 1:
            raise ValueError(f"MaskRCNNModel: mask_slot_buckets must be an int >= 1 (1: the mask "
                             f"head always runs on all {self.num_mask_slots} slots), found "
                             f"{self.mask_slot_buckets!r}.")

    @property
    def num_mask_slots(self):
        """F = int(S * fg_fraction) (>= 1): the most foreground ROIs `sample_rois` keeps."""
        return max(min(int(self.num_samples * self.fg_fraction), self.num_samples), 1)


def mask_slot_sizes(num_slots, buckets):
    """The slot counts the mask head may run on: `buckets` evenly spaced sizes up to num_slots
    (e.g. 128 slots, 4 buckets: (32, 64, 96, 128)), fewer when num_slots < buckets."""
    return tuple(sorted({-(-num_slots * (i + 1) // buckets) for i in range(buckets)}))


@dataclasses.dataclass(frozen=True)
class DetectionSettings:
    """Inference post-processing: per-class NMS and the mask head's output side Q."""
    score_threshold: float = _flat("detection_score_threshold", nms.INFERENCE_SCORE_THRESHOLD)
    iou_threshold: float = _flat("detection_iou_threshold", nms.INFERENCE_IOU_THRESHOLD)
    max_detections: int = _flat("max_detections", nms.INFERENCE_MAX_DETECTIONS)
    mask_size: int = _flat("mask_size", 28)


_GROUPS = (("anchors", AnchorSettings), ("rpn", RPNSettings), ("roi", ROISettings),
           ("detection", DetectionSettings))


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Every plain setting of `MaskRCNNModel`: K classes (with background) and the four groups."""
    num_classes: int = NUM_CLASSES_COCO
    anchors: AnchorSettings = AnchorSettings()
    rpn: RPNSettings = RPNSettings()
    roi: ROISettings = ROISettings()
    detection: DetectionSettings = DetectionSettings()

    def __post_init__(self):
        if self.detection.mask_size != 2 * self.roi.mask_roi_size:
            raise ValueError(f"MaskRCNNModel: the mask head upsamples its ROI features by 2, so "
                             f"mask_size must be 2 * mask_roi_size = "
                             f"{2 * self.roi.mask_roi_size}, found {self.detection.mask_size}.")

    @staticmethod
    def flat_names():
        """Every flat key, in order: num_classes, then each group's fields."""
        return ("num_classes",) + tuple(field.metadata["flat"] for _, group in _GROUPS
                                        for field in dataclasses.fields(group))

    @classmethod
    def from_flat(cls, **flat):
        """Settings from flat keys (gin, get_config); missing keys keep their defaults.

        Raises:
          TypeError: a key that is no setting (named, with the valid keys).
        """
        unknown = sorted(set(flat) - set(cls.flat_names()))
        if unknown:
            raise TypeError(f"MaskRCNNModel: unknown setting(s) {unknown}; the settings are "
                            f"{list(cls.flat_names())}")
        groups = {}
        for attribute, group in _GROUPS:
            groups[attribute] = group(**{
                field.name: flat[field.metadata["flat"]] for field in dataclasses.fields(group)
                if field.metadata["flat"] in flat})
        if "num_classes" in flat:
            groups["num_classes"] = flat["num_classes"]
        return cls(**groups)

    def flat(self):
        """{flat key: value} of every setting (tuples stay tuples)."""
        values = {"num_classes": self.num_classes}
        for attribute, group in _GROUPS:
            settings = getattr(self, attribute)
            for field in dataclasses.fields(group):
                values[field.metadata["flat"]] = getattr(settings, field.name)
        return values
