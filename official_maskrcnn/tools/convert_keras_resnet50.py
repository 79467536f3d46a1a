"""Converts Keras's ImageNet ResNet-50 weights into a TF checkpoint of our ResNet-50 backbone.

    python -m official_maskrcnn.tools.convert_keras_resnet50 --input resnet50_weights.h5 \
        --output /ckpt/r50_keras

reads the weights of `tf_keras.applications.ResNet50` (include_top False or True, as written by
`model.save_weights(path)`, e.g. Keras's `resnet50_weights_tf_dim_ordering_tf_kernels*.h5`) and
writes `tf.train.Checkpoint(backbone=ResNet(depth=50, norm="frozen_bn"))` at the given prefix,
the layout `modeling.backbones.checkpoint.load_backbone_checkpoint` restores.

Keras's ResNet50 is the original ResNet v1, the same network as our MSRA backbone:
  - stem: ZeroPadding2D(3) + 7x7/2 'valid' conv + BN + ReLU + ZeroPadding2D(1) + 3x3/2 max pool;
    ours pads 3 symmetrically + 'valid' conv, and pads 1 with zeros + 'VALID' pool: identical
    (the pool's zero padding cannot win the max after the ReLU, in either implementation);
  - bottleneck: the stride sits on the FIRST 1x1 conv ('valid', so a 1x1/2 conv samples the
    even pixels in both), the 3x3 is 'same' with stride 1 (= symmetric padding 1, ours), and the
    first block of every stage (conv2 included) has a 1x1 projection shortcut with the stride;
  - the only structural differences are that Keras's convs have biases and its BatchNormalization
    keeps gamma/beta/moving statistics with epsilon 1.001e-5. Both fold into our FrozenBatchNorm:
        scale = gamma / sqrt(moving_variance + epsilon)
        bias  = beta - moving_mean * scale + conv_bias * scale
    since BN(conv(x) + b) = conv(x) * scale + (beta - (mean - b) * scale).

Layer names: conv1_conv/conv1_bn -> conv1/res_conv1_bn; conv{L}_block{i}_{n}_conv/_bn ->
res{L}_{i-1}_branch{1,2a,2b,2c}[_bn] for n = 0 (shortcut), 1, 2, 3.

Pixels: Keras's ResNet50 expects `preprocess_input(mode="caffe")`: BGR, 0..255, minus the mean
KERAS_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68), no std scaling. That is our "bgr_caffe"
pixel mode except for the mean, which there is Detectron's (102.9801, 115.9465, 122.7717): about
one grey level lower per channel (0.96, 0.83, 0.91). Running these weights with "bgr_caffe"
shifts every input pixel by that constant; small, but not bit-exact with Keras.
"""

# First, before TensorFlow loads: run as a command, this entry keeps TensorFlow's chatter off
# the console (tfrecord_tools/quiet_tensorflow.py).
from tfrecord_tools import quiet_tensorflow  # noqa: F401  # isort: split

import os
import re
import sys

import h5py
import numpy as np
import tf_keras

from official_maskrcnn.modeling.backbones import checkpoint
from official_maskrcnn.modeling.layers.frozen_batch_norm import FrozenBatchNorm
from official_maskrcnn.tools import conversion_cli
from official_maskrcnn.tools.convert_r50_pkl import ConversionError

# Keras's BatchNormalization epsilon in applications.ResNet50 (the layers' own value is used).
KERAS_BN_EPSILON = 1.001e-5
# keras.applications.imagenet_utils.preprocess_input(mode="caffe"): BGR order, 0..255.
KERAS_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
# Our branch suffix -> Keras's conv index inside a block.
_BRANCH_TO_KERAS = {"branch1": 0, "branch2a": 1, "branch2b": 2, "branch2c": 3}
_BLOCK_CONV_RE = re.compile(r"^res(\d)_(\d+)_(branch1|branch2a|branch2b|branch2c)$")
# Our stem conv and its norm (the norm of every other conv is named "{conv}_bn").
STEM_CONV = "conv1"
STEM_NORM = "res_conv1_bn"


def keras_prefix(conv_name):
    """Our conv layer name -> the prefix of its Keras conv/BN pair (without "_conv"/"_bn").

    "conv1" -> "conv1"; "res3_0_branch1" -> "conv3_block1_0"; "res5_2_branch2c" ->
    "conv5_block3_3".
    """
    if conv_name == STEM_CONV:
        return "conv1"
    match = _BLOCK_CONV_RE.match(conv_name)
    if match is None:
        raise ConversionError(f"layer {conv_name}: no Keras ResNet50 counterpart")
    level, block, branch = match.groups()
    return f"conv{level}_block{int(block) + 1}_{_BRANCH_TO_KERAS[branch]}"


def fold_batch_norm(gamma, beta, mean, variance, epsilon, conv_bias=None):
    """Folds BatchNormalization (after a conv with bias `conv_bias`) into (scale, bias) [C].

    y = (x + conv_bias - mean) / sqrt(variance + epsilon) * gamma + beta = x * scale + bias.
    Computed in float64 and returned as float32.
    """
    gamma, beta, mean, variance = (np.asarray(v, np.float64) for v in (gamma, beta, mean, variance))
    scale = gamma / np.sqrt(variance + epsilon)
    bias = beta - mean * scale
    if conv_bias is not None:
        bias = bias + np.asarray(conv_bias, np.float64) * scale
    return scale.astype(np.float32), bias.astype(np.float32)


def load_keras_resnet50(path):
    """Builds tf_keras.applications.ResNet50 and loads `path` into it.

    Tries include_top=False, then include_top=True (the h5 loader matches layers by topology, so
    only the right variant accepts the file).

    Returns:
        (keras model, include_top).

    Raises:
        ConversionError if the file is missing, not HDF5, or not ResNet50 weights.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise ConversionError(
            f"{path}: not an HDF5 file; expected the weights of tf_keras.applications.ResNet50 "
            "written by model.save_weights('....h5')")
    errors = []
    for include_top in (False, True):
        model = tf_keras.applications.ResNet50(weights=None, include_top=include_top)
        try:
            model.load_weights(path)
        except (ValueError, KeyError, OSError, TypeError, IndexError) as e:
            errors.append(f"include_top={include_top}: {type(e).__name__}: {e}")
            continue
        return model, include_top
    raise ConversionError(
        f"{path}: not the weights of tf_keras.applications.ResNet50 (include_top False or "
        f"True): {'; '.join(errors)}")


def _keras_conv_bn(keras_model, prefix):
    """Keras's `{prefix}_conv/_bn` pair -> (kernel [kh, kw, in, out], folded scale, bias [out])."""
    try:
        conv = keras_model.get_layer(f"{prefix}_conv")
        bn = keras_model.get_layer(f"{prefix}_bn")
    except ValueError as e:
        raise ConversionError(f"Keras model has no layer pair {prefix}_conv/_bn: {e}") from e
    if not isinstance(conv, tf_keras.layers.Conv2D) or not isinstance(
            bn, tf_keras.layers.BatchNormalization):
        raise ConversionError(
            f"Keras layers {conv.name}/{bn.name} are {type(conv).__name__}/"
            f"{type(bn).__name__}, expected Conv2D/BatchNormalization")
    kernel = conv.kernel.numpy()
    conv_bias = conv.bias.numpy() if conv.use_bias else None
    channels = kernel.shape[-1]
    gamma = bn.gamma.numpy() if bn.scale else np.ones([channels])
    beta = bn.beta.numpy() if bn.center else np.zeros([channels])
    scale, bias = fold_batch_norm(
        gamma, beta, bn.moving_mean.numpy(), bn.moving_variance.numpy(), bn.epsilon, conv_bias)
    return kernel, scale, bias


def assign_keras_weights(model, keras_model):
    """Assigns the folded Keras ResNet50 weights to every variable of our built ResNet-50.

    Args:
        model: a built ResNet(depth=50, norm="frozen_bn").
        keras_model: tf_keras.applications.ResNet50 with its weights loaded.

    Returns:
        {"assigned": [our conv layer names], "unused": [Keras layers with weights not used]},
        each sorted.

    Raises:
        ConversionError on a missing layer, a shape mismatch, or a backbone variable that no
        Keras layer fills. Nothing is assigned unless everything matches.
    """
    layers = {layer.name: layer for layer in model.submodules}
    values = []
    used_keras = set()
    assigned = []
    for layer in model.submodules:
        if isinstance(layer, tf_keras.layers.Conv2D):
            norm_name = STEM_NORM if layer.name == STEM_CONV else f"{layer.name}_bn"
            norm = layers.get(norm_name)
            if not isinstance(norm, FrozenBatchNorm):
                raise ConversionError(
                    f"layer {norm_name}: expected a FrozenBatchNorm after conv {layer.name}, "
                    f"found {type(norm).__name__}; convert into a backbone with norm='frozen_bn'")
            if layer.use_bias:
                raise ConversionError(f"layer {layer.name}: expected a bias-free conv")
            prefix = keras_prefix(layer.name)
            kernel, scale, bias = _keras_conv_bn(keras_model, prefix)
            for variable, value, what in ((layer.kernel, kernel, f"{prefix}_conv kernel"),
                                          (norm.scale, scale, f"{prefix}_bn folded scale"),
                                          (norm.bias, bias, f"{prefix}_bn folded bias")):
                if tuple(value.shape) != tuple(variable.shape):
                    raise ConversionError(
                        f"{what}: shape {tuple(value.shape)} does not fit {variable.name} "
                        f"{tuple(variable.shape)}")
                values.append((variable, value))
            used_keras.update({f"{prefix}_conv", f"{prefix}_bn"})
            assigned.append(layer.name)
    filled = {variable.ref() for variable, _ in values}
    unfilled = [v.name for v in model.variables if v.ref() not in filled]
    if unfilled:
        raise ConversionError(
            f"{len(unfilled)} backbone variable(s) have no Keras counterpart: "
            f"{', '.join(unfilled)}")
    for variable, value in values:
        variable.assign(value.astype(variable.dtype.as_numpy_dtype))
    unused = sorted(
        layer.name for layer in keras_model.layers
        if layer.weights and layer.name not in used_keras)
    return {"assigned": sorted(assigned), "unused": unused}


def convert(input_path, output_prefix):
    """Reads Keras ResNet50 weights at `input_path`, writes our checkpoint at `output_prefix`.

    Returns the `assign_keras_weights` report plus "include_top" (which Keras variant the file
    held) and "checkpoint" (the written path prefix).
    """
    keras_model, include_top = load_keras_resnet50(input_path)
    model = checkpoint.build_reference_backbone()
    try:
        report = assign_keras_weights(model, keras_model)
    except ConversionError as e:
        raise ConversionError(f"{input_path}: {e}") from e
    report["include_top"] = include_top
    report["checkpoint"] = checkpoint.write_backbone_checkpoint(model, output_prefix)
    return report


def main(argv=None):
    return conversion_cli.main(
        argv, description="Convert tf_keras.applications.ResNet50 ImageNet weights (.h5) to a "
        "TF checkpoint of the ResNet-50 backbone (norm='frozen_bn').",
        input_help="ResNet50 weights .h5 (save_weights)", convert=convert, summary=_summary)


def _summary(report):
    unused = f": {', '.join(report['unused'])}" if report["unused"] else ""
    return [f"converted {len(report['assigned'])} conv+BN pairs from ResNet50(include_top="
            f"{report['include_top']}); ignored {len(report['unused'])} unused Keras "
            f"layers{unused}",
            f"note: these weights expect Keras 'caffe' pixels (BGR, 0..255, minus "
            f"{KERAS_CAFFE_BGR_MEAN})"]


if __name__ == "__main__":
    sys.exit(main())
