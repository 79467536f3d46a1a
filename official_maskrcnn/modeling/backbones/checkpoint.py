"""Backbone weights from a checkpoint: what `factory.build_maskrcnn_model(backbone_checkpoint=)`
restores before the first step.

The checkpoints are `tf.train.Checkpoint(backbone=ResNet(...))` files, as written by
`tools/convert_r50_pkl` (Detectron's R-50.pkl) and `tools/convert_keras_resnet50`. Restoring
checks that every variable of the backbone was found with its shape, so a checkpoint of another
depth or norm fails here, naming the file, instead of training from half-initialised weights.
"""

import os

import tensorflow as tf

from official_maskrcnn.modeling.backbones.resnet import ResNet

# An input size that builds every variable of a ResNet (any size works; small is fast).
BUILD_IMAGE_SIZE = 64


class BackboneWeightsError(ValueError):
    """Backbone weights that cannot be converted or restored; the message names the file."""


def build_reference_backbone():
    """The reference backbone with its variables: ResNet(depth=50, norm="frozen_bn")."""
    backbone = ResNet(depth=50, norm="frozen_bn")
    backbone(tf.zeros([1, BUILD_IMAGE_SIZE, BUILD_IMAGE_SIZE, 3]))
    return backbone


def write_backbone_checkpoint(backbone, prefix):
    """Writes `backbone` as the checkpoint `load_backbone_checkpoint` reads (folders created);
    returns the written prefix."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    return tf.train.Checkpoint(backbone=backbone).write(prefix)


def load_backbone_checkpoint(backbone, prefix):
    """Restores the checkpoint at `prefix` into `backbone` (built first if needed).

    Trainability is not stored: the backbone's own `freeze_at` decides what trains.

    Returns:
      the restore status.
    Raises:
      BackboneWeightsError: the checkpoint is missing or unreadable, misses a variable of the
        backbone or holds it with another shape.
    """
    if not backbone.built:
        backbone(tf.zeros([1, BUILD_IMAGE_SIZE, BUILD_IMAGE_SIZE, 3]))
    try:
        status = tf.train.Checkpoint(backbone=backbone).read(prefix)
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise BackboneWeightsError(f"{prefix}: checkpoint does not match the backbone "
                                   f"{backbone.get_config()}: {e}") from e
    return status
