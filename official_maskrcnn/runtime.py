"""The entry layer: the flags, settings and builders that `train`, `evaluate` and `predict` share.

An entry parses gin (`parse_gin`), reads its run settings (`RunSettings`, bound in gin as
`run.<name>`), and builds from them with the functions below: the strategy, the model, a
restored model, the eval data and the per-epoch evaluation. No entry imports another entry;
what two of them need lives here, the common command-line flags included.
"""

import contextlib
import dataclasses
import gc
import logging
import os

import gin
import tensorflow as tf
import tf_keras
from absl import flags
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context

from official_maskrcnn.data import dataset_builder, label_maps
from official_maskrcnn.evaluation import coco_eval_callback, coco_metrics, eval_summaries
from official_maskrcnn.evaluation import evaluator as evaluator_lib
from official_maskrcnn.evaluation import summary_images
from official_maskrcnn.modeling import factory
from official_maskrcnn.modeling.backbones.checkpoint import BackboneWeightsError
from official_maskrcnn.training import best_checkpoint, checkpointing, distribution
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
flags.DEFINE_float("score_threshold", None, "predict, export: keep detections with at least this "
                   "score (default: predict 0.5, export 0.05, the model's own).")
flags.DEFINE_integer("max_detections", 100, "predict, export: keep at most this many detections "
                     "per image.")


def flag_or(value, default):
    """A flag whose default differs between entries: its value, or the entry's default."""
    return default if value is None else value


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
      grappler_memory_optimizer: let TensorFlow's graph optimizer (Grappler) apply its memory
        optimizer to what train, evaluate and predict run. Off by default: it turns a sum of
        more than two tensors (AddN, e.g. the gradients reaching one tensor from its several
        consumers) that it expects live at the memory peak into an accumulation in the order
        the summands arrive, so runs from one seed trained different weights now and then
        (about one smoke run in five on 2 busy cores) and a resumed run could not equal an
        uninterrupted one (README, Tests). TensorFlow declares 256 MiB for a CPU device, so
        on a CPU every real graph qualifies. Off costs time without XLA (the R-50-FPN CPU
        step at 512 x 512: about 9 % longer, BENCHMARKS.md).
      precision: "float32", "mixed_float16" (dynamic loss scaling) or "mixed_bfloat16".
      seed: seeds initialisation, data order, flips and sampling; None draws one (logged).
      checkpoint_every_n_steps: extra checkpoints inside epochs (0: epoch ends only).
      max_checkpoints: newest checkpoints kept.
      print_every: print the progress line every N host calls.
      submission_*: the MLPerf log's submission fields.
      eval_annotations_file: the eval split's COCO annotation JSON; None: no evaluation. The
        eval records come from the gin scope `eval/DatasetBuilder`.
      eval_allow_subset: the eval records may cover only some of the annotation file's images
        (scored on those alone); False (MLPerf: "the entire validation set") makes any image
        of the file without a record a start-up error (`startup_checks`).
      eval_batch_size: eval images per step over all replicas (None: global_batch_size).
      eval_interval: evaluate every N epochs.
      eval_async: post-process evaluations in the background (one worker only).
      eval_processes: processes pasting masks, encoding RLE and running COCOeval in category
        shards (1: all in the training process).
      coco_backend: the COCOeval implementation, "pycocotools" (the reference's) or
        "faster_coco_eval" (the same metrics, C++; `evaluation.coco_metrics`).
      box_target, mask_target: stop when both APs reach them (MLPerf: 0.377, 0.339).
      summary_images: the first N eval records, with each evaluation's detections drawn, go
        to TensorBoard (MODEL_DIR/eval, `evaluation.eval_summaries`); 0: none.
      watchdog_seconds: end the run (exit code 124, every thread's stack on stderr) when no
        host call completes for this long (`training.watchdog`); 0: no watchdog.
      nan_recovery_trials: K, the non-finite steps the run may recover from by restoring its
        newest checkpoint with a shifted sampling seed (`training.trainer`,
        `training.nan_recovery`); counted over the whole run, resumes included; 0 (the MLPerf
        recipe): the first one ends the run with exit code 1.
    """

    strategy: str = "default"
    num_gpus: int = None
    global_batch_size: int = 16
    num_epochs: int = 13
    max_steps: int = None
    steps_per_loop: int = 50
    jit_compile: bool = True
    grappler_memory_optimizer: bool = False
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
    eval_allow_subset: bool = False
    eval_batch_size: int = None
    eval_interval: int = 1
    eval_async: bool = False
    eval_processes: int = 1
    coco_backend: str = "pycocotools"
    box_target: float = coco_eval_callback.BOX_TARGET
    mask_target: float = coco_eval_callback.MASK_TARGET
    summary_images: int = 3
    watchdog_seconds: float = 1800
    nan_recovery_trials: int = 0

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
        if (isinstance(self.summary_images, bool) or not isinstance(self.summary_images, int)
                or self.summary_images < 0):
            raise ValueError(f"run.summary_images: expected an integer >= 0 (0: no images), "
                             f"found {self.summary_images!r}")
        if self.watchdog_seconds is None or self.watchdog_seconds < 0:
            raise ValueError(f"run.watchdog_seconds: expected a number >= 0 (0: off), found "
                             f"{self.watchdog_seconds!r}")
        trials = self.nan_recovery_trials
        if not isinstance(trials, int) or isinstance(trials, bool) or trials < 0:
            raise ValueError(f"run.nan_recovery_trials: expected an integer >= 0 (0: off), "
                             f"found {trials!r}")

    @property
    def eval_global_batch_size(self):
        return self.eval_batch_size or self.global_batch_size


def set_graph_rewrites(settings):
    """Grappler's memory optimizer on or off (`run.grappler_memory_optimizer`) for every
    function this process instantiates from now on. A process-wide TensorFlow option that
    `tf.config.optimizer` does not expose, so it goes into the eager context's base config."""
    tf_context = context.context()
    config = config_pb2.ConfigProto()
    if tf_context._config is not None:
        config.CopyFrom(tf_context._config)
    rewriter = rewriter_config_pb2.RewriterConfig
    config.graph_options.rewrite_options.memory_optimization = (
        rewriter.DEFAULT_MEM_OPT if settings.grappler_memory_optimizer else rewriter.NO_MEM_OPT)
    tf_context._config = config
    # Function calls take their config from a per-thread cache built from the base config.
    tf_context._thread_local_data.function_call_options = None


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
        "gt_mask_boxes": -tf.ones([batch_size, num_instances, 4]),
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


def checkpoint_candidates(checkpoint):
    """What restoring `checkpoint` may use: [the prefix] for a prefix (`.../ckpt-N`), or a
    folder's checkpoints, oldest first (its state file's list plus those found by their files,
    `checkpointing.list_checkpoints`), so that an unreadable newest one falls back.

    Raises:
      CheckpointNotFoundError: the folder holds no checkpoint, or the prefix has no index file.
    """
    if tf.io.gfile.isdir(checkpoint):
        paths, _ = checkpointing.list_checkpoints(checkpoint)
        if not paths:
            raise CheckpointNotFoundError(f"--checkpoint {checkpoint}: no checkpoint in this "
                                          f"folder")
        return paths
    if not tf.io.gfile.exists(checkpoint + ".index"):
        raise CheckpointNotFoundError(f"--checkpoint {checkpoint}: no such checkpoint (expected "
                                      f"the file {checkpoint}.index)")
    return [checkpoint]


def resolve_checkpoint(checkpoint):
    """A checkpoint prefix from a prefix (`.../ckpt-N`) or a folder (its newest checkpoint).

    Raises:
      CheckpointNotFoundError: the folder holds no checkpoint, or the prefix has no index file.
    """
    return checkpoint_candidates(checkpoint)[-1]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not hold the configured model's weights."""


# Errors of the user's config or files that every entry reports as one line, with exit code 1.
INPUT_ERRORS = (FileNotFoundError, dataset_builder.InputError, BackboneWeightsError,
                CheckpointMismatchError, checkpointing.CheckpointError,
                coco_metrics.GroundTruthNotFoundError)

# The box head's class logits in a checkpoint of `tf.train.Checkpoint(model=...)`: its bias
# has one value per class, background included (tests/test_runtime.py checks the key).
CLASS_LOGITS_BIAS_KEY = "model/box_head/_cls_score/bias/.ATTRIBUTES/VARIABLE_VALUE"


def saved_label_map(checkpoint):
    """The `label_map.json` training saved for `checkpoint` (a prefix or a folder): in the
    checkpoint's folder, or, for the best checkpoint (`M/best/`), in its run's folder M; None
    when there is none (runs from before the file existed, checkpoints of another tool)."""
    folder = checkpoint if tf.io.gfile.isdir(checkpoint) else os.path.dirname(checkpoint)
    folders = [folder]
    if os.path.basename(os.path.normpath(folder)) == best_checkpoint.BEST_DIR_NAME:
        folders.append(os.path.dirname(os.path.normpath(folder)))
    for candidate in folders:
        path = os.path.join(candidate, label_maps.LABEL_MAP_FILE)
        if tf.io.gfile.exists(path):
            return label_maps.read(path)
    return None


def restore_model_weights(model, checkpoint):
    """Restores only the model's weights; the optimizer's slots and the step in the checkpoint
    are not needed outside training.

    Args:
      model: a built `MaskRCNNModel`.
      checkpoint: a prefix, a folder (its newest readable checkpoint, falling back to older
        ones with a warning as training does, `checkpointing.restore_newest_readable`), or a
        list of prefixes oldest first (`checkpoint_candidates`).
    Returns:
      the restored prefix.
    Raises:
      CheckpointNotFoundError: no such checkpoint or folder, or an empty folder.
      CheckpointMismatchError: a checkpoint of another config (another class count, a missing
        weight, another shape); one line naming the checkpoint. Not a reason to fall back.
      checkpointing.CheckpointError: no candidate can be read; one line naming each.
    """
    paths = checkpoint if isinstance(checkpoint, (list, tuple)) else \
        checkpoint_candidates(checkpoint)
    where = paths[0] if len(paths) == 1 else os.path.dirname(paths[-1])
    return checkpointing.restore_newest_readable(
        paths, lambda path: _restore_model_only(model, path), where,
        fatal=(CheckpointMismatchError,))


def _restore_model_only(model, path):
    """Restores `path` into `model`; another config's checkpoint is a `CheckpointMismatchError`,
    an unreadable one raises what TensorFlow raised (`restore_newest_readable` reports it)."""
    _check_class_count(model, path)
    failed = None
    with _quiet_unrestored_value_warnings():
        try:
            tf.train.Checkpoint(model=model).restore(path).expect_partial() \
                .assert_existing_objects_matched()
        except (AssertionError, ValueError) as e:
            failed = f"{path} does not hold this config's model: {str(e).splitlines()[0][:300]}"
        if failed:
            # The failed restore's bookkeeping, freed here, would log one warning per value of
            # the checkpoint not restored yet (a training checkpoint: every optimizer slot too).
            gc.collect()
    if failed:
        raise CheckpointMismatchError(failed)


def _check_class_count(model, path):
    """The one line for the commonest mismatch, before TensorFlow's shape error of some layer."""
    try:
        shapes = tf.train.load_checkpoint(path).get_variable_to_shape_map()
    except Exception:  # pylint: disable=broad-except
        return  # unreadable: the restore says how
    shape = shapes.get(CLASS_LOGITS_BIAS_KEY)
    configured = getattr(getattr(model, "settings", None), "num_classes", None)
    if shape and configured and shape[0] != configured:
        raise CheckpointMismatchError(
            f"{path} holds a model of {shape[0]} classes, the config builds {configured} "
            f"(build_maskrcnn_model.num_classes, background included)")


@contextlib.contextmanager
def _quiet_unrestored_value_warnings():
    """Drops TensorFlow's "unrestored values" warnings while active (see the caller)."""
    logger = tf.get_logger()
    quiet = _DropMessages(("could not be found in the restored object",
                           "being deleted with unrestored values"))
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class _DropMessages(logging.Filter):
    def __init__(self, fragments):
        super().__init__()
        self.fragments = fragments

    def filter(self, record):
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def build_eval_dataset(batch_size):
    """The eval records, from the gin scope `eval/DatasetBuilder` (plus unscoped bindings)."""
    with gin.config_scope("eval"):
        return dataset_builder.DatasetBuilder(is_training=False, global_batch_size=batch_size)


def build_eval_callback(strategy, model, settings, mllog, metrics_path, stream, run_id=None,
                        best=None, summary_dir=None):
    """The per-epoch COCO evaluation of `settings` (its eval_* fields and targets); `run_id`
    goes into each `metrics.jsonl` line; `best` keeps the best checkpoint; `summary_dir` (None:
    no TensorBoard) receives the stats and `settings.summary_images` drawn val images
    (`COCOEvalCallback`, `eval_summaries`)."""
    evaluator = evaluator_lib.Evaluator(strategy, model,
                                        build_eval_dataset(settings.eval_global_batch_size))
    postprocessor = evaluator_lib.PostProcessor(settings.eval_annotations_file,
                                                settings.eval_processes, settings.coco_backend)
    summaries = None
    if summary_dir:
        images = None
        if settings.summary_images:
            images = summary_images.SummaryImages(evaluator.builder.files,
                                                  settings.summary_images,
                                                  postprocessor.class_names)
        summaries = eval_summaries.EvalSummaries(summary_dir, images)
    return coco_eval_callback.COCOEvalCallback(
        evaluator, postprocessor, mlperf=mllog, metrics_path=metrics_path,
        interval=settings.eval_interval, box_target=settings.box_target,
        mask_target=settings.mask_target, asynchronous=settings.eval_async, stream=stream,
        run_id=run_id, best=best, summaries=summaries)
