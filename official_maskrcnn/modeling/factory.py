"""The only place where configuration becomes model objects (gin stays here, at the edge).

`build_maskrcnn_model` builds the ResNet backbone, the FPN, the RPN / box / mask heads and injects
them into `MaskRCNNModel` with its grouped settings (`model_settings.ModelSettings`, bound by gin
under their flat names). Defaults are the MLPerf reference's
(ResNet-50, frozen BN, stem + res2 frozen, 81 COCO classes including background).
"""

import gin

from official_maskrcnn.modeling import maskrcnn_model, model_settings
from official_maskrcnn.modeling.backbones import checkpoint, resnet
from official_maskrcnn.modeling.coco_classes import NUM_CLASSES_COCO
from official_maskrcnn.modeling.decoders import fpn
from official_maskrcnn.modeling.heads import box_head, mask_head, rpn_head


@gin.configurable
def build_maskrcnn_model(num_classes=NUM_CLASSES_COCO, backbone_depth=50, backbone_norm="frozen_bn",
                         freeze_at=2, fpn_num_filters=256, box_head_mlp_dim=1024,
                         mask_head_num_convs=4, mask_head_num_filters=256,
                         backbone_checkpoint=None, **flat_settings):
    """Builds a Mask R-CNN model from plain arguments.

    Args:
      num_classes: K, including background.
      backbone_depth, backbone_norm, freeze_at: `resnet.ResNet` arguments.
      fpn_num_filters: FPN channels (also the RPN head's hidden channels).
      box_head_mlp_dim: width of the box head's two fc layers.
      mask_head_num_convs, mask_head_num_filters: the mask head's 3x3 conv tower.
      backbone_checkpoint: optional prefix of a backbone checkpoint written by
        `tools.convert_r50_pkl` or `tools.convert_keras_resnet50`; restored into the backbone
        here, before the first step (a mismatch raises
        `checkpoint.BackboneWeightsError`).
      **flat_settings: the flat names of `model_settings.ModelSettings` (anchors, RPN and ROI
        sampling, NMS, ROI sizes, detections; `ModelSettings.flat_names()`); their defaults are
        the reference's. gin binds them here like the named arguments; an unknown name raises
        TypeError.
    Returns:
      a `maskrcnn_model.MaskRCNNModel` (the backbone is built when a checkpoint is restored,
      everything else on the first call).
    """
    settings = model_settings.ModelSettings.from_flat(num_classes=num_classes, **flat_settings)
    backbone = resnet.ResNet(depth=backbone_depth, norm=backbone_norm, freeze_at=freeze_at,
                             name="resnet")
    if backbone_checkpoint:
        checkpoint.load_backbone_checkpoint(backbone, backbone_checkpoint)
    decoder = fpn.FPN(num_filters=fpn_num_filters, name="fpn")
    num_anchors = len(settings.anchors.aspect_ratios)
    rpn = rpn_head.RPNHead(num_anchors=num_anchors, num_filters=fpn_num_filters, name="rpn_head")
    boxes = box_head.BoxHead(num_classes=num_classes, mlp_dim=box_head_mlp_dim, name="box_head")
    masks = mask_head.MaskHead(num_classes=num_classes, num_convs=mask_head_num_convs,
                               num_filters=mask_head_num_filters, name="mask_head")
    return maskrcnn_model.MaskRCNNModel(
        backbone=backbone, decoder=decoder, rpn_head=rpn, box_head=boxes, mask_head=masks,
        settings=settings, name="maskrcnn")
