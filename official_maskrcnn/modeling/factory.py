"""The only place where configuration becomes model objects (gin stays here, at the edge).

`build_maskrcnn_model` builds the ResNet backbone, the FPN, the RPN / box / mask heads and injects
them into `MaskRCNNModel` with its plain settings. Defaults are the MLPerf reference's
(ResNet-50, frozen BN, stem + res2 frozen, 81 COCO classes including background).
"""

import gin

from official_maskrcnn.modeling import maskrcnn_model
from official_maskrcnn.modeling.backbones import checkpoint, resnet
from official_maskrcnn.modeling.coco_classes import NUM_CLASSES_COCO
from official_maskrcnn.modeling.decoders import fpn
from official_maskrcnn.modeling.heads import box_head, mask_head, rpn_head
from official_maskrcnn.ops import anchors as anchors_lib


@gin.configurable
def build_maskrcnn_model(num_classes=NUM_CLASSES_COCO, backbone_depth=50, backbone_norm="frozen_bn",
                         freeze_at=2, fpn_num_filters=256, box_head_mlp_dim=1024,
                         mask_head_num_convs=4, mask_head_num_filters=256,
                         backbone_checkpoint=None, **model_settings):
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
      **model_settings: `MaskRCNNModel`'s plain settings (anchors, sampling, NMS, ROI sizes,
        detections), passed on unchanged; their defaults are the model's, which are the
        reference's. gin binds them here like the named arguments.
    Returns:
      a `maskrcnn_model.MaskRCNNModel` (the backbone is built when a checkpoint is restored,
      everything else on the first call).
    """
    backbone = resnet.ResNet(depth=backbone_depth, norm=backbone_norm, freeze_at=freeze_at,
                             name="resnet")
    if backbone_checkpoint:
        checkpoint.load_backbone_checkpoint(backbone, backbone_checkpoint)
    decoder = fpn.FPN(num_filters=fpn_num_filters, name="fpn")
    num_anchors = len(model_settings.get("aspect_ratios", anchors_lib.ASPECT_RATIOS))
    rpn = rpn_head.RPNHead(num_anchors=num_anchors, num_filters=fpn_num_filters, name="rpn_head")
    boxes = box_head.BoxHead(num_classes=num_classes, mlp_dim=box_head_mlp_dim, name="box_head")
    masks = mask_head.MaskHead(num_classes=num_classes, num_convs=mask_head_num_convs,
                               num_filters=mask_head_num_filters, name="mask_head")
    return maskrcnn_model.MaskRCNNModel(
        backbone=backbone, decoder=decoder, rpn_head=rpn, box_head=boxes, mask_head=masks,
        num_classes=num_classes, name="maskrcnn", **model_settings)
