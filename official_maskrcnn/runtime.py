"""The entry layer: the flags, settings and builders that `train`, `evaluate` and `predict` share.

An entry parses gin (`parse_gin`), reads its run settings (`RunSettings`, bound in gin as
`run.<name>`), and builds from them with the functions below: the strategy, the model, a
restored model, the eval data and the per-epoch evaluation. No entry imports another entry;
what two of them need lives here, the common command-line flags included.
"""

import dataclasses

import gin
import tensorflow as tf
import tf_keras
from absl import flags

from official_maskrcnn.data import dataset_builder
from official_maskrcnn.evaluation import coco_eval_callback, coco_metrics
from official_maskrcnn.evaluation import evaluator as evaluator_lib
from official_maskrcnn.modeling import factory
from official_maskrcnn.modeling.backbones.checkpoint import BackboneWeightsError
from official_maskrcnn.training import distribution
from official_maskrcnn.training import optimizer as _optimizer  # noqa: F401  (see below)

# `training.optimizer` is imported for its gin configurable `optimizer.build_optimizer`: every
# entry parses the training config, which binds it.

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")

flags.DEFINE_multi_string("gin_file", [], "Gin config file(s), applied in order.")
flags.DEFINE_multi_string("gin_param", [], "Gin bindings applied after the files, e.g. "
                          "\"run.num_epochs = 2\" or \"train/DatasetBuilder.file_pattern = 'x'\".")
flags.DEFINE_string("model_dir", None, "The run's folder: checkpoints, logs, evaluation outputs.")
flags.DEFINE_string("checkpoint", None, "Checkpoint prefix (.../ckpt-N) or a folder (its newest "
                    "checkpoint); evaluate's default: the newest in --model_dir.")


@gin.configurable("run")
@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How a run trains and evaluates; gin binds each field as `run.<field>`.

    Attributes:
      strategy: "default", "mirrored" or "multi_worker" (`distribution.build_strategy`);
        "mirrored" with num_gpus=0 runs on the default strategy (CPU).
      num_gpus: devices for "mirrored" (None: all visible).
      global_batch_size: images per step over all replicas (a multiple of the replica count).
      num_epochs: epochs to train (the MLPerf rule: stop at the accuracy target, see evaluation).
      max_steps: optional cap on the global step (the reference's 90000 x 16 / batch; smoke runs).
      steps_per_loop: steps per host call (fewer Python round trips; signals, logs and
        step-checkpoints happen at host-call boundaries).
      jit_compile: compile the training step with XLA.
      precision: "float32", "mixed_float16" (dynamic loss scaling) or "mixed_bfloat16".
      seed: seeds initialisation, data order, flips and sampling; None draws one (logged).
      checkpoint_every_n_steps: extra checkpoints inside epochs (0: epoch ends only).
      max_checkpoints: newest checkpoints kept.
      print_every: print the progress line every N host calls.
      submission_*: the MLPerf log's submission fields.
      eval_annotations_file: the eval split's COCO annotation JSON; None: no evaluation. The
        eval records come from the gin scope `eval/DatasetBuilder`.
      eval_batch_size: eval images per step over all replicas (None: global_batch_size).
      eval_interval: evaluate every N epochs.
      eval_async: post-process evaluations in the background (one worker only).
      eval_processes: processes pasting masks and encoding RLE.
      coco_backend: the COCOeval implementation, "pycocotools" (the reference's) or
        "faster_coco_eval" (the same metrics, C++; `evaluation.coco_metrics`).
      box_target, mask_target: stop when both APs reach them (MLPerf: 0.377, 0.339).
    """

    strategy: str = "default"
    num_gpus: int = None
    global_batch_size: int = 16
    num_epochs: int = 13
    max_steps: int = None
    steps_per_loop: int = 50
    jit_compile: bool = True
    precision: str = "float32"
    seed: int = None
    checkpoint_every_n_steps: int = 0
    max_checkpoints: int = 5
    print_every: int = 1
    submission_org: str = "official_maskrcnn"
    submission_division: str = "closed"
    submission_platform: str = "unknown"
    submission_status: str = "research"
    eval_annotations_file: str = None
    eval_batch_size: int = None
    eval_interval: int = 1
    eval_async: bool = False
    eval_processes: int = 1
    coco_backend: str = "pycocotools"
    box_target: float = coco_eval_callback.BOX_TARGET
    mask_target: float = coco_eval_callback.MASK_TARGET

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"run.precision: expected one of {PRECISIONS}, found "
                             f"{self.precision!r}")
        if self.coco_backend not in coco_metrics.BACKENDS:
            raise ValueError(f"run.coco_backend: expected one of {coco_metrics.BACKENDS}, "
                             f"found {self.coco_backend!r}")
        if self.strategy not in distribution.STRATEGIES:
            raise ValueError(f"run.strategy: expected one of {distribution.STRATEGIES}, found "
                             f"{self.strategy!r}")

    @property
    def eval_global_batch_size(self):
        return self.eval_batch_size or self.global_batch_size


def run_settings(**overrides):
    """The gin-bound `RunSettings`, with `overrides` (field: value) taking precedence."""
    return RunSettings(**overrides)


def parse_gin(gin_files, gin_params):
    """Applies the gin files then the bindings; a missing file is a clear error."""
    for path in gin_files:
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"--gin_file {path}: no such file")
    gin.parse_config_files_and_bindings(gin_files, gin_params)


def build_strategy(settings):
    """The run's `tf.distribute.Strategy` ("mirrored" over 0 GPUs is the default strategy)."""
    kind = settings.strategy
    if kind == "mirrored" and settings.num_gpus == 0:
        kind = "default"
    return distribution.build_strategy(kind, settings.num_gpus)


def dummy_training_inputs(batch_size=1, size=64, num_instances=1, mask_size=112):
    """A tiny all-background batch: one call with it creates every variable of the model."""
    return {
        "images": tf.zeros([batch_size, size, size, 3]),
        "image_size": tf.fill([batch_size, 2], size),
        "gt_boxes": -tf.ones([batch_size, num_instances, 4]),
        "gt_classes": -tf.ones([batch_size, num_instances], tf.int32),
        "gt_masks": tf.zeros([batch_size, num_instances, mask_size, mask_size]),
    }


def build_model(strategy, precision):
    """The gin-configured model under `precision`, built (every variable created)."""
    tf_keras.mixed_precision.set_global_policy(precision)
    with strategy.scope():
        model = factory.build_maskrcnn_model()
        model(dummy_training_inputs(), training=True)
    return model


class CheckpointNotFoundError(FileNotFoundError):
    """--checkpoint names neither a checkpoint nor a folder holding one."""


def resolve_checkpoint(checkpoint):
    """A checkpoint prefix from a prefix (`.../ckpt-N`) or a folder (its newest checkpoint).

    Raises:
      CheckpointNotFoundError: the folder holds no checkpoint, or the prefix has no index file.
    """
    if tf.io.gfile.isdir(checkpoint):
        newest = tf.train.latest_checkpoint(checkpoint)
        if not newest:
            raise CheckpointNotFoundError(f"--checkpoint {checkpoint}: no checkpoint in this "
                                          f"folder")
        return newest
    if not tf.io.gfile.exists(checkpoint + ".index"):
        raise CheckpointNotFoundError(f"--checkpoint {checkpoint}: no such checkpoint (expected "
                                      f"the file {checkpoint}.index)")
    return checkpoint


class CheckpointMismatchError(ValueError):
    """A checkpoint does not hold the configured model's weights."""


# Errors of the user's config or files that every entry reports as one line, with exit code 1.
INPUT_ERRORS = (FileNotFoundError, dataset_builder.InputError, BackboneWeightsError,
                CheckpointMismatchError)


def restore_model_weights(model, checkpoint):
    """Restores only the model's weights from `checkpoint` (a prefix); the optimizer's slots and
    the step in it are not needed outside training.

    Raises:
      CheckpointMismatchError: the checkpoint misses a weight of the model or has another shape
        (e.g. another config), or cannot be read; the message names the checkpoint.
    """
    try:
        tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial() \
            .assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise CheckpointMismatchError(f"{checkpoint} does not hold this config's model: "
                                      f"{str(e).splitlines()[0][:300]}") from e


def build_eval_dataset(batch_size):
    """The eval records, from the gin scope `eval/DatasetBuilder` (plus unscoped bindings)."""
    with gin.config_scope("eval"):
        return dataset_builder.DatasetBuilder(is_training=False, global_batch_size=batch_size)


def build_eval_callback(strategy, model, settings, mllog, metrics_path, stream):
    """The per-epoch COCO evaluation of `settings` (its eval_* fields and targets)."""
    return coco_eval_callback.COCOEvalCallback(
        evaluator_lib.Evaluator(strategy, model,
                                build_eval_dataset(settings.eval_global_batch_size)),
        evaluator_lib.PostProcessor(settings.eval_annotations_file, settings.eval_processes,
                                    settings.coco_backend),
        mlperf=mllog, metrics_path=metrics_path, interval=settings.eval_interval,
        box_target=settings.box_target, mask_target=settings.mask_target,
        asynchronous=settings.eval_async, stream=stream)
