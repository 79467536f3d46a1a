"""Converts Detectron's ImageNet `R-50.pkl` into a TF checkpoint of our ResNet-50 backbone.

    python -m official_maskrcnn.tools.convert_r50_pkl --input R-50.pkl --output /ckpt/r50 \\
        [--check | --no_self_check]

writes `tf.train.Checkpoint(backbone=ResNet(depth=50, norm="frozen_bn"))` at the given prefix
(`PREFIX.index`, `PREFIX.data-*`); `modeling.backbones.checkpoint.load_backbone_checkpoint`
restores it into a backbone (`build_maskrcnn_model(backbone_checkpoint=PREFIX)`).

The pickle (Python 2, read with latin1) is a dict of numpy blobs, possibly nested under "blobs":
  - `{layer}_w`: conv kernels [out, in, kh, kw] -> our Conv2D kernel [kh, kw, in, out];
  - `{layer}_bn_s`, `{layer}_bn_b`: folded BatchNorm scale and bias [C] -> FrozenBatchNorm;
  - `*_momentum` (SGD state) and blobs no backbone layer uses (the classifier `fc1000_w`
    [1000, 2048], `fc1000_b` [1000]) are not converted; they are counted and listed.
A blob missing for any variable, or of the wrong shape, is an error that names it.

Then the self-check (`tools/imagenet_check.py`): the backbone restored from the written
checkpoint, fed three real images preprocessed as the input pipeline does it (BGR minus
Detectron's mean), average-pooled C5 and the pickle's fc1000 must rank each image's ImageNet class
in the top 5; the top 5 of every image is printed. A miss is a warning, or with `--check` an error
(exit 1) naming the image and its top 5. A pickle without fc1000 skips the check with a warning
(an error with `--check`, before anything is written); `--no_self_check` skips it.
It has never run on the real R-50.pkl, which cannot be downloaded where it was written; its tests
plant a classifier in a fake pickle.
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
from official_maskrcnn.tools import conversion_cli, imagenet_check

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


def convert(input_path, output_prefix, check=False, no_self_check=False):
    """Reads `input_path`, fills a ResNet-50 and writes its checkpoint at `output_prefix`.

    Args:
      check: the self-check must run and pass (`self_check`): a pickle without a usable fc1000
        is an error here, before anything is written.
      no_self_check: the self-check will not run: fc1000 is not even read.
    Returns:
      the `assign_blobs` report plus "checkpoint" (the written path prefix) and "classifier":
      (fc1000_w [1000, 2048], fc1000_b [1000]) float32, or None with "classifier_problem" (why).
    """
    blobs = load_detectron_pickle(input_path)
    classifier, problem = _classifier(blobs, input_path, check, no_self_check)
    model = checkpoint.build_reference_backbone()
    try:
        report = assign_blobs(model, blobs)
    except ConversionError as e:
        raise ConversionError(f"{input_path}: {e}") from e
    report["checkpoint"] = checkpoint.write_backbone_checkpoint(model, output_prefix)
    report["classifier"], report["classifier_problem"] = classifier, problem
    return report


def _classifier(blobs, input_path, check, no_self_check):
    """(fc1000 weights and bias, None) for the self-check, or (None, why there is none).

    Raises ConversionError with `check` when the pickle has no usable fc1000.
    """
    if no_self_check:
        return None, "skipped (--no_self_check)"
    try:
        classifier = imagenet_check.classifier_from_blobs(blobs, input_path)
    except ConversionError as e:  # half a classifier, or a misshapen one
        if check:
            raise
        return None, str(e)
    if classifier is not None:
        return classifier, None
    problem = (f"{input_path} has no classifier blobs {imagenet_check.CLASSIFIER_WEIGHTS}, "
               f"{imagenet_check.CLASSIFIER_BIAS}")
    if check:
        raise ConversionError(f"{problem}: --check cannot classify without them (nothing "
                              "written; convert with --no_self_check to skip the check)")
    return None, problem


def self_check(report, check=False, no_self_check=False):
    """The ImageNet self-check of the written checkpoint; prints every image's top 5.

    Returns the exit code: 0 when it passed, was skipped or failed without `check` (a warning);
    raises `imagenet_check.SelfCheckFailed` (exit 1) naming the failed images with `check`.
    """
    if report["classifier"] is None:
        prefix = "self-check" if no_self_check else "warning: self-check skipped:"
        print(f"{prefix} {report['classifier_problem']}")
        return 0
    results = imagenet_check.check_checkpoint(report["checkpoint"], *report["classifier"])
    print(f"self-check: top {imagenet_check.TOP_K} ImageNet classes of the restored backbone "
          "+ fc1000:")
    for result in results:
        for line in imagenet_check.format_result(result):
            print(f"  {line}")
    if all(r["passed"] for r in results):
        print("self-check passed")
        return 0
    if check:
        raise imagenet_check.SelfCheckFailed(imagenet_check.failure_message(results))
    print(f"warning: {imagenet_check.failure_message(results)}\n(--check makes this an error)")
    return 0


def _add_arguments(parser):
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true",
                       help="exit 1 unless every self-check image has its ImageNet class in the "
                       "top 5 (a pickle without fc1000_w/fc1000_b is then an error)")
    group.add_argument("--no_self_check", action="store_true",
                       help="skip the ImageNet self-check (e.g. a pickle without fc1000)")


def main(argv=None):
    return conversion_cli.main(
        argv, description="Convert Detectron's ImageNet R-50.pkl to a TF checkpoint of the "
        "backbone, then classify a few real images with it and the pickle's fc1000.",
        input_help="path of Detectron's R-50.pkl", convert=convert,
        summary=lambda report: [
            f"assigned {len(report['assigned'])} blobs; ignored {len(report['momentum'])} "
            f"*{MOMENTUM_SUFFIX} blobs and {len(report['unused'])} blobs no backbone layer uses"
            + (f": {', '.join(report['unused'])}" if report["unused"] else "")],
        add_arguments=_add_arguments, finish=self_check)


if __name__ == "__main__":
    sys.exit(main())
