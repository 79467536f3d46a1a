"""Converts Detectron's ImageNet `R-50.pkl` into a TF checkpoint of our ResNet-50 backbone.

    python -m official_maskrcnn.tools.convert_r50_pkl --input R-50.pkl --output /ckpt/r50_detectron

writes `tf.train.Checkpoint(backbone=ResNet(depth=50, norm="frozen_bn"))` at the given prefix
(`PREFIX.index`, `PREFIX.data-*`); `modeling.backbones.checkpoint.load_backbone_checkpoint`
restores it into a backbone (`build_maskrcnn_model(backbone_checkpoint=PREFIX)`).

The pickle (Python 2, read with latin1) is a dict of numpy blobs, possibly nested under "blobs":
  - `{layer}_w`: conv kernels [out, in, kh, kw] -> our Conv2D kernel [kh, kw, in, out];
  - `{layer}_bn_s`, `{layer}_bn_b`: folded BatchNorm scale and bias [C] -> FrozenBatchNorm;
  - `*_momentum` (SGD state) and blobs no layer uses (the classifier `fc1000_w`, `fc1000_b`) are
    ignored, counted and listed.
A blob missing for any variable, or of the wrong shape, is an error that names it.
"""

# First, before TensorFlow loads: run as a command, this entry keeps TensorFlow's chatter off
# the console (tfrecord_tools/quiet_tensorflow.py).
from tfrecord_tools import quiet_tensorflow  # noqa: F401  # isort: split

import pickle
import sys

import numpy as np
import tf_keras

from official_maskrcnn.modeling.backbones import checkpoint
from official_maskrcnn.modeling.backbones.checkpoint import BackboneWeightsError
from official_maskrcnn.modeling.layers.frozen_batch_norm import FrozenBatchNorm
from official_maskrcnn.tools import conversion_cli

MOMENTUM_SUFFIX = "_momentum"
# The pickle cannot be converted (unreadable, wrong structure, missing or misshapen blobs): the
# error of every backbone-weights problem, so that one `except` in the entries covers both.
ConversionError = BackboneWeightsError


def load_detectron_pickle(path):
    """Reads a Detectron weights pickle -> {blob name: np.ndarray}.

    Accepts a plain dict of blobs or a dict with the blobs under "blobs" (Detectron's model files).
    """
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError,
            ValueError, TypeError) as e:
        raise ConversionError(f"{path}: cannot read a pickle: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise ConversionError(
            f"{path}: expected a dict of numpy blobs (Detectron R-50.pkl), found "
            f"{type(data).__name__}")
    if isinstance(data.get("blobs"), dict):
        data = data["blobs"]
    blobs = {}
    for name, value in data.items():
        if isinstance(name, bytes):
            name = name.decode("latin1")
        blobs[str(name)] = value
    return blobs


def _variable_blobs(model):
    """[(blob name, variable, transpose)] for every variable of `model`, by layer name."""
    pairs = []
    for layer in model.submodules:
        if isinstance(layer, tf_keras.layers.Conv2D):
            if layer.use_bias:
                raise ConversionError(f"layer {layer.name}: expected a bias-free conv")
            # Caffe2 [out, in, kh, kw] -> Keras [kh, kw, in, out].
            pairs.append((f"{layer.name}_w", layer.kernel, (2, 3, 1, 0)))
        elif isinstance(layer, FrozenBatchNorm):
            pairs.append((f"{layer.name}_s", layer.scale, None))
            pairs.append((f"{layer.name}_b", layer.bias, None))
        elif not layer.submodules and layer.weights:
            raise ConversionError(
                f"layer {layer.name} ({type(layer).__name__}) has variables the Detectron "
                "pickle cannot fill; convert into a backbone with norm='frozen_bn'")
    return pairs


def assign_blobs(model, blobs):
    """Assigns Detectron blobs to every variable of a built ResNet with norm="frozen_bn".

    Args:
        model: a built ResNet (depth 50 for R-50.pkl) whose norm layers are FrozenBatchNorm.
        blobs: {blob name: array}, as from `load_detectron_pickle`.

    Returns:
        {"assigned": [blob names used], "momentum": [ignored *_momentum names],
         "unused": [other ignored names]}, each sorted.

    Raises:
        ConversionError naming every missing blob, or the first blob whose shape differs.
        Nothing is assigned unless every variable has a blob of the right shape.
    """
    pairs = _variable_blobs(model)
    missing = [name for name, _, _ in pairs if name not in blobs]
    if missing:
        raise ConversionError(
            f"{len(missing)} blob(s) needed by the backbone are missing from the pickle: "
            f"{', '.join(missing)}")
    values = []
    for name, variable, transpose in pairs:
        value = np.asarray(blobs[name])
        if transpose is not None:
            if value.ndim != len(transpose):
                raise ConversionError(
                    f"blob {name}: expected a {len(transpose)}-d conv weight [out, in, kh, kw] "
                    f"for {variable.shape} [kh, kw, in, out], found shape {value.shape}")
            value = np.transpose(value, transpose)
        if tuple(value.shape) != tuple(variable.shape):
            raise ConversionError(
                f"blob {name}: shape mismatch, expected {tuple(variable.shape)} (after "
                f"transposing convs to [kh, kw, in, out]), found {tuple(value.shape)}")
        values.append((variable, value))
    for variable, value in values:
        variable.assign(value.astype(variable.dtype.as_numpy_dtype))
    used = {name for name, _, _ in pairs}
    ignored = sorted(set(blobs) - used)
    return {
        "assigned": sorted(used),
        "momentum": [n for n in ignored if n.endswith(MOMENTUM_SUFFIX)],
        "unused": [n for n in ignored if not n.endswith(MOMENTUM_SUFFIX)],
    }


def convert(input_path, output_prefix):
    """Reads `input_path`, fills a ResNet-50 and writes its checkpoint at `output_prefix`.

    Returns the `assign_blobs` report plus "checkpoint": the written path prefix.
    """
    blobs = load_detectron_pickle(input_path)
    model = checkpoint.build_reference_backbone()
    try:
        report = assign_blobs(model, blobs)
    except ConversionError as e:
        raise ConversionError(f"{input_path}: {e}") from e
    report["checkpoint"] = checkpoint.write_backbone_checkpoint(model, output_prefix)
    return report


def main(argv=None):
    return conversion_cli.main(
        argv, description="Convert Detectron's ImageNet R-50.pkl to a TF checkpoint of the "
        "backbone.", input_help="path of Detectron's R-50.pkl", convert=convert,
        summary=lambda report: [
            f"assigned {len(report['assigned'])} blobs; ignored {len(report['momentum'])} "
            f"*{MOMENTUM_SUFFIX} blobs and {len(report['unused'])} unused blobs"
            + (f": {', '.join(report['unused'])}" if report["unused"] else "")])


if __name__ == "__main__":
    sys.exit(main())
