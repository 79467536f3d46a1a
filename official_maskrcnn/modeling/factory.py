"""The only place where configuration becomes model objects (gin stays here, at the edge).

`build_maskrcnn_model` builds the ResNet backbone, the FPN, the RPN / box / mask heads and injects
them into `MaskRCNNModel` with its plain settings. Defaults are the MLPerf reference's
(ResNet-50, frozen BN, stem + res2 frozen, 81 COCO classes including background).
"""

import gin

from official_maskrcnn.modeling import maskrcnn_model
from official_maskrcnn.modeling.backbones import resnet
from official_maskrcnn.modeling.decoders import fpn
from official_maskrcnn.modeling.heads import box_head, mask_head, rpn_head
from official_maskrcnn.ops import anchors as anchors_lib
from official_maskrcnn.tools import convert_r50_pkl


@gin.configurable
def build_maskrcnn_model(num_classes=81, backbone_depth=50, backbone_norm="frozen_bn",
                         freeze_at=2, fpn_num_filters=256, box_head_mlp_dim=1024,
                         mask_head_num_convs=4, mask_head_num_filters=256,
                         anchor_sizes=anchors_lib.FPN_ANCHOR_SIZES,
                         aspect_ratios=anchors_lib.ASPECT_RATIOS,
                         rpn_batch_size_per_image=256, rpn_positive_fraction=0.5,
                         rpn_fg_iou_threshold=0.7, rpn_bg_iou_threshold=0.3,
                         rpn_straddle_thresh=0, rpn_nms_threshold=0.7,
                         rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000,
                         rpn_pre_nms_top_n_eval=1000, rpn_post_nms_top_n_eval=1000,
                         rpn_post_nms_per_image=True, roi_num_samples=512, roi_fg_fraction=0.25,
                         roi_fg_iou_threshold=0.5, roi_bg_iou_threshold=0.5, box_roi_size=7,
                         mask_roi_size=14, sampling_ratio=2, detection_score_threshold=0.05,
                         detection_iou_threshold=0.5, max_detections=100, mask_size=28,
                         backbone_checkpoint=None):
    """Builds a Mask R-CNN model from plain arguments (see `MaskRCNNModel` for the settings).

    Args:
      num_classes: K, including background.
      backbone_depth, backbone_norm, freeze_at: `resnet.ResNet` arguments.
      fpn_num_filters: FPN channels (also the RPN head's hidden channels).
      box_head_mlp_dim: width of the box head's two fc layers.
      mask_head_num_convs, mask_head_num_filters: the mask head's 3x3 conv tower.
      mask_size: side of the mask head's output, 2 * mask_roi_size (the head upsamples by 2).
      backbone_checkpoint: optional prefix of a backbone checkpoint written by
        `tools.convert_r50_pkl` or `tools.convert_keras_resnet50`; restored into the backbone
        here, before the first step (a mismatch raises `ConversionError`).
      other arguments: passed to `MaskRCNNModel` unchanged.
    Returns:
      a `maskrcnn_model.MaskRCNNModel` (the backbone is built when a checkpoint is restored,
      everything else on the first call).
    """
    if mask_size != 2 * mask_roi_size:
        raise ValueError(f"build_maskrcnn_model: the mask head upsamples by 2, so mask_size must "
                         f"be 2 * mask_roi_size = {2 * mask_roi_size}, found {mask_size}.")
    backbone = resnet.ResNet(depth=backbone_depth, norm=backbone_norm, freeze_at=freeze_at,
                             name="resnet")
    if backbone_checkpoint:
        convert_r50_pkl.load_backbone_checkpoint(backbone, backbone_checkpoint)
    decoder = fpn.FPN(num_filters=fpn_num_filters, name="fpn")
    rpn = rpn_head.RPNHead(num_anchors=len(aspect_ratios), num_filters=fpn_num_filters,
                           name="rpn_head")
    boxes = box_head.BoxHead(num_classes=num_classes, mlp_dim=box_head_mlp_dim, name="box_head")
    masks = mask_head.MaskHead(num_classes=num_classes, num_convs=mask_head_num_convs,
                               num_filters=mask_head_num_filters, name="mask_head")
    return maskrcnn_model.MaskRCNNModel(
        backbone=backbone, decoder=decoder, rpn_head=rpn, box_head=boxes, mask_head=masks,
        num_classes=num_classes, anchor_sizes=anchor_sizes, aspect_ratios=aspect_ratios,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        rpn_positive_fraction=rpn_positive_fraction, rpn_fg_iou_threshold=rpn_fg_iou_threshold,
        rpn_bg_iou_threshold=rpn_bg_iou_threshold, rpn_straddle_thresh=rpn_straddle_thresh,
        rpn_nms_threshold=rpn_nms_threshold, rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_eval=rpn_pre_nms_top_n_eval,
        rpn_post_nms_top_n_eval=rpn_post_nms_top_n_eval,
        rpn_post_nms_per_image=rpn_post_nms_per_image, roi_num_samples=roi_num_samples,
        roi_fg_fraction=roi_fg_fraction, roi_fg_iou_threshold=roi_fg_iou_threshold,
        roi_bg_iou_threshold=roi_bg_iou_threshold, box_roi_size=box_roi_size,
        mask_roi_size=mask_roi_size, sampling_ratio=sampling_ratio,
        detection_score_threshold=detection_score_threshold,
        detection_iou_threshold=detection_iou_threshold, max_detections=max_detections,
        mask_size=mask_size, name="maskrcnn")
