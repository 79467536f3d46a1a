r"""A calibrated stand-in for R-50.pkl: frozen-BN statistics measured on real images.

    python -m official_maskrcnn.tools.calibrate_backbone --gin_file F [--gin_param B ...] \
        --file_pattern 'P-*' --num_images N --output PREFIX [--image_size S] [--seed K]

FOR TESTING ONLY, never for a benchmark run: the convolution weights stay random (seeded), only
the frozen batch norms are set. The recipe (configs/mlperf_r50_fpn.gin) freezes every batch norm
of its ResNet-50 as a fixed affine map y = x * scale + bias that R-50.pkl fills with ImageNet
statistics; left at scale 1 and bias 0 with random convolutions, activations grow by orders of
magnitude per stage (losses ~1e9 at the second step, then a non-finite step). This tool builds
the config's backbone (`build_maskrcnn_model.backbone_depth`, `backbone_norm` must be
'frozen_bn') and, in one forward pass over N training images, sets every frozen norm in the
order the network runs them: the per-channel mean m and variance v of that norm's input are
measured over all N images (its inputs already pass through the norms set before it) and folded
into scale = 1 / sqrt(v + eps), bias = -m * scale, as a batch norm's statistics are folded into
R-50.pkl's `*_bn_s` / `*_bn_b`. Every norm's output then has mean 0 and variance 1 per channel on
those images, stage by stage.

Images: the first N records of the pattern (in the pipeline's record order), decoded as the
pipeline decodes them, resized so that the shorter side is S (default: the config's
`DatasetBuilder.min_size`), centre-cropped to S x S (no padding: a padded border would bias the
statistics) and normalised with the config's `pixel_mode`, as the training pipeline does.

Writes `tf.train.Checkpoint(backbone=ResNet(...))` at PREFIX, which
`build_maskrcnn_model.backbone_checkpoint = 'PREFIX'` restores (checked here by restoring it),
and prints per stage the number of norms set and the range of their scales.
Exit codes: 0 done; 1 a bad config, input or output (one `error:` line).
"""

# First, before TensorFlow loads: run as a command, this entry keeps TensorFlow's chatter off
# the console (tfrecord_tools/quiet_tensorflow.py).
from tfrecord_tools import quiet_tensorflow  # noqa: F401  # isort: split

import argparse
import collections
import contextlib
import inspect
import sys
import types

import numpy as np
import tensorflow as tf
import tf_keras

from official_maskrcnn import gin_bindings, runtime
from official_maskrcnn.data import dataset_builder, decoder, preprocess_ops, records
from official_maskrcnn.modeling import factory
from official_maskrcnn.modeling.backbones import checkpoint, resnet
from official_maskrcnn.modeling.layers.frozen_batch_norm import FrozenBatchNorm

# Added to the variance, as a batch norm adds it (Detectron's and PyTorch's default).
EPSILON = 1e-5


class CalibrationError(records.InputError):
    """The config, the records or the output cannot give a calibrated backbone."""


def config_backbone(seed):
    """The config's backbone, built with seeded random convolutions and unit norms.

    Raises:
      CalibrationError: the config's backbone has no frozen norms.
    """
    defaults = inspect.signature(factory.build_maskrcnn_model).parameters
    depth = gin_bindings.bound_value("build_maskrcnn_model.backbone_depth",
                                     default=defaults["backbone_depth"].default)
    norm = gin_bindings.bound_value("build_maskrcnn_model.backbone_norm",
                                    default=defaults["backbone_norm"].default)
    if norm != "frozen_bn":
        raise CalibrationError(f"build_maskrcnn_model.backbone_norm = {norm!r}: only a "
                               f"'frozen_bn' backbone has fixed statistics to calibrate")
    tf_keras.utils.set_random_seed(seed)
    backbone = resnet.ResNet(depth=depth, norm=norm)
    backbone(tf.zeros([1, checkpoint.BUILD_IMAGE_SIZE, checkpoint.BUILD_IMAGE_SIZE, 3]))
    return backbone


def training_data_setting(name):
    """The training pipeline's `DatasetBuilder` argument `name` (e.g. "pixel_mode"): bound in
    `train/`, else unscoped, else the constructor's default."""
    default = inspect.signature(dataset_builder.DatasetBuilder).parameters[name].default
    return gin_bindings.bound_value(f"train/DatasetBuilder.{name}", f"DatasetBuilder.{name}",
                                    default=default)


def square_crop(image, size):
    """[H, W, 3] uint8 -> [size, size, 3] float32: the shorter side resized to `size`
    (`preprocess_ops.resize_image`, the pipeline's filter), the centre cropped."""
    height, width = int(image.shape[0]), int(image.shape[1])
    scale = size / min(height, width)
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    resized = preprocess_ops.resize_image(image, new_height, new_width)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return resized[top:top + size, left:left + size]


def calibration_images(file_pattern, num_images, size, mode):
    """[N, size, size, 3] float32: the first N records' images, cropped and normalised.

    Raises:
      CalibrationError: fewer than N records.
    """
    files = records.resolve_files(file_pattern)
    images = []
    for serialized in tf.data.TFRecordDataset(files).take(num_images):
        parsed = decoder.parse_example(serialized, include_masks=False)
        image = square_crop(decoder.decode_image(parsed["encoded_image"]), size)
        images.append(preprocess_ops.normalize_image(image, mode))
    if len(images) < num_images:
        raise CalibrationError(f"{file_pattern}: {len(images)} record(s), --num_images asks "
                               f"for {num_images}")
    return tf.stack(images)


def frozen_norms(backbone):
    return [layer for layer in backbone.submodules if isinstance(layer, FrozenBatchNorm)]


@contextlib.contextmanager
def norms_calling(backbone, call):
    """Within the block, each frozen norm of `backbone` runs call(layer, inputs) -> outputs
    instead of its own `call` (eager forward passes only); yields the norms."""
    norms = frozen_norms(backbone)
    for layer in norms:
        layer.call = types.MethodType(call, layer)
    try:
        yield norms
    finally:
        for layer in norms:
            del layer.call  # the class's own call again


def calibrate(backbone, images):
    """Sets every frozen norm of `backbone` from its input's statistics on `images`.

    Args:
      backbone: a built `resnet.ResNet` with frozen norms.
      images: [N, S, S, 3] float32, normalised.
    Returns:
      [(norm name, [C] scale)] in the order the network ran the norms.
    """
    calibrated = []

    def calibrating_call(layer, inputs):
        mean, variance = tf.nn.moments(tf.cast(inputs, tf.float64), axes=[0, 1, 2])
        scale = 1.0 / tf.sqrt(variance + EPSILON)
        layer.scale.assign(tf.cast(scale, layer.scale.dtype))
        layer.bias.assign(tf.cast(-mean * scale, layer.bias.dtype))
        calibrated.append((layer.name, layer.scale.numpy()))
        return FrozenBatchNorm.call(layer, inputs)

    with norms_calling(backbone, calibrating_call) as norms:
        backbone(images)
    if len(calibrated) != len(norms):
        raise CalibrationError(f"the forward pass ran {len(calibrated)} of the backbone's "
                               f"{len(norms)} frozen norms")
    return calibrated


def stage_summary(calibrated):
    """Lines 'res2: 10 norms, scale 0.0123 .. 4.56' per stage (the stem is 'res_conv1')."""
    stages = collections.OrderedDict()
    for name, scale in calibrated:
        stage = name.split("_")[0] if not name.startswith("res_conv1") else "res_conv1"
        stages.setdefault(stage, []).append(scale)
    return [f"{stage}: {len(scales)} norm(s), scale {min(s.min() for s in scales):.4g} .. "
            f"{max(s.max() for s in scales):.4g}" for stage, scales in stages.items()]


def run(file_pattern, num_images, output, image_size=None, seed=0, stream=sys.stdout):
    """Calibrates the parsed config's backbone and writes it; returns the written prefix."""
    if num_images < 2:
        raise CalibrationError(f"--num_images must be >= 2 (a variance needs two images), "
                               f"found {num_images}")
    size = image_size or training_data_setting("min_size")
    if size < checkpoint.BUILD_IMAGE_SIZE:
        raise CalibrationError(f"--image_size must be >= {checkpoint.BUILD_IMAGE_SIZE}, "
                               f"found {size}")
    backbone = config_backbone(seed)
    mode = training_data_setting("pixel_mode")
    images = calibration_images(file_pattern, num_images, size, mode)
    print(f"calibrating {len(frozen_norms(backbone))} frozen norms of ResNet-"
          f"{backbone.get_config()['depth']} on {num_images} image(s) of {size} x {size} "
          f"({mode})", file=stream, flush=True)
    calibrated = calibrate(backbone, images)
    for line in stage_summary(calibrated):
        print(line, file=stream)
    if not all(np.isfinite(scale).all() for _, scale in calibrated):
        raise CalibrationError("a calibrated scale is not finite")
    try:
        prefix = checkpoint.write_backbone_checkpoint(backbone, output)
    except (OSError, tf.errors.OpError) as e:
        raise CalibrationError(f"--output {output}: cannot be written ({e})") from e
    checkpoint.load_backbone_checkpoint(config_backbone(seed), prefix)  # what the recipe does
    print(f"wrote {prefix} (a stand-in for testing: random convolutions, calibrated norms; "
          f"never for a benchmark run)", file=stream, flush=True)
    return prefix


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m official_maskrcnn.tools.calibrate_backbone",
        description="Frozen-BN statistics of the config's backbone from real images "
                    "(a stand-in for R-50.pkl, for testing only).")
    parser.add_argument("--gin_file", action="append", default=[], required=True,
                        help="the training config (repeatable)")
    parser.add_argument("--gin_param", action="append", default=[], help="a gin binding")
    parser.add_argument("--file_pattern", required=True, help="training records, e.g. 'P-*'")
    parser.add_argument("--num_images", type=int, default=16, help="images measured (16)")
    parser.add_argument("--output", required=True, help="checkpoint prefix to write")
    parser.add_argument("--image_size", type=int, default=None,
                        help="side of the square crops (default: DatasetBuilder.min_size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random convolutions")
    args = parser.parse_args(argv)
    try:
        runtime.parse_gin(args.gin_file, args.gin_param)
        run(args.file_pattern, args.num_images, args.output, args.image_size, args.seed)
    except (CalibrationError, *runtime.INPUT_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
