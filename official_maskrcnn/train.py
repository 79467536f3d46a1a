r"""Trains Mask R-CNN: `python -m official_maskrcnn.train --gin_file F [...] --model_dir M`.

Writes into the model dir: `operative_config.gin` (every setting the run used),
`label_map.json` (the classes of the records' manifest, `data/label_maps.py`), `mlperf.log`
(the MLPerf compliance log; every line carries the run's id as `metadata.run_id`),
`metrics.jsonl` (one line per evaluation, with the run id too), checkpoints `ckpt-<step>.*` (at
epoch ends and every N steps), `best/` (the checkpoint of the best evaluation, with its metrics;
`training/best_checkpoint.py`) and TensorBoard events: under `train/` the losses, learning rate,
images/s, the loss scale (mixed_float16) and memory (each GPU's allocator, or the process's RSS)
of every host call (`training/callbacks.py`); under `eval/` the 24 COCO stats of each evaluation
(`eval/bbox/AP` ...) and `run.summary_images` val images with its detections drawn
(`eval/images/<source id>`), at the step of the evaluated checkpoint
(`evaluation/eval_summaries.py`); only the chief (worker 0) writes them. With
`run.nan_recovery_trials` > 0 also `nan_recoveries.jsonl` (one line per recovered non-finite
step; `training/nan_recovery.py`).
Running the same command again resumes from the newest readable checkpoint, at the exact batch
where the run stopped; checkpoints are found by their files too, so a missing or stale
`checkpoint` state file never restarts a run from step 0 over its checkpoints. An evaluation a
kill interrupted (its epoch's checkpoint was written before it) is run first on resume, with
that epoch's weights, and results logged before count toward the target
(`evaluation/coco_eval_callback.py`).

`mlperf.log` ends with `run_stop` whenever the run ends after `run_start` (status `aborted` for
a failure), except after SIGTERM / SIGINT: the resumed run continues that log.

One run per model dir: the chief holds `train.lock` there (`training/model_dir_lock.py`) before
it writes anything; a second run on the same folder exits at once with code 1, naming the
holder's host and pid.

Exit codes: 0 done; 1 a non-finite loss (with `run.nan_recovery_trials = K` > 0: the first K
of the run are recovered, by restoring the newest checkpoint with a shifted sampling seed, and
the next one exits 1 saying the K recoveries were used), a configuration / input error,
unreadable checkpoints or the model dir in use by another run (the message says which); 124
the hang watchdog: no host call completed in `run.watchdog_seconds` (the last step, the worker
and every thread's stack are on stderr; `training/watchdog.py`); 128 + signal number after
SIGTERM / SIGINT (a checkpoint was written first; run the same command to resume).

Gin: `run.<setting>` (`runtime.RunSettings`) and the gin scopes `train/DatasetBuilder` (the
training data), `build_maskrcnn_model` (the model) and `build_optimizer` (the optimizer and
schedule). The macros `num_gpus`, `seed` and `coco_annotations_file` exist so that
`run_and_time.sh` can set them.
"""

# First, before TensorFlow loads: run as a command, this entry keeps TensorFlow's chatter off
# the console (tfrecord_tools/quiet_tensorflow.py).
from tfrecord_tools import quiet_tensorflow  # noqa: F401  # isort: split

import dataclasses
import os
import sys
import uuid

import gin
import numpy as np
import tensorflow as tf
import tf_keras
from absl import app, flags, logging

from official_maskrcnn import gin_bindings, runtime
from official_maskrcnn.data import dataset_builder, decode_failures, label_maps, startup_checks
from official_maskrcnn.evaluation import coco_eval_callback, coco_metrics
from official_maskrcnn.modeling import summary
from official_maskrcnn.training import best_checkpoint
from official_maskrcnn.training import callbacks as callbacks_lib
from official_maskrcnn.training import checkpointing, distribution
from official_maskrcnn.training import hooks as hooks_lib
from official_maskrcnn.training import mlperf_logger, model_dir_lock, nan_recovery
from official_maskrcnn.training import optimizer as optimizer_lib
from official_maskrcnn.training import trainer as trainer_lib
from official_maskrcnn.training import watchdog

FLAGS = flags.FLAGS  # --gin_file, --gin_param, --model_dir: defined in `runtime`


@dataclasses.dataclass
class _Context:
    """What every phase of a run reads: where it writes, its settings and its place."""
    model_dir: str
    settings: runtime.RunSettings
    strategy: tf.distribute.Strategy
    worker_id: int
    num_workers: int
    mllog: mlperf_logger.MLPerfLogger
    seed: int
    run_id: str
    label_map: label_maps.LabelMap  # None: neither records nor ground truth carry one

    @property
    def chief(self):
        return self.worker_id == 0

    @property
    def per_replica_batch_size(self):
        return self.settings.global_batch_size // self.strategy.num_replicas_in_sync

    @property
    def metrics_path(self):
        """The evaluations' `metrics.jsonl` (written by the chief, read by every worker)."""
        return os.path.join(self.model_dir, "metrics.jsonl")


def run(model_dir, settings=None, extra_callbacks=(), **overrides):
    """Builds everything from gin and trains; returns the final logs dict.

    The chief holds the model dir's lock (`model_dir_lock`) from before its first write into
    the folder until the end, however the run ends.

    Args:
      model_dir: output folder (created); an existing run there is resumed.
      settings: a `runtime.RunSettings` (None: the gin-bound one).
      extra_callbacks: more tf_keras callbacks.
      **overrides: `RunSettings` fields that take precedence over gin.
    Raises:
      model_dir_lock.ModelDirLockedError: another live run holds the model dir.
      coco_metrics.GroundTruthNotFoundError: no `run.eval_annotations_file` (before anything
        is written into the model dir).
    """
    settings = settings or runtime.run_settings(**overrides)
    _check_files(settings)
    runtime.set_graph_rewrites(settings)
    label_map = run_label_map(model_dir, settings)
    strategy, worker_id, num_workers = _strategy(settings)
    run_id = new_run_id()
    lock = model_dir_lock.ModelDirLock(model_dir, run_id)
    if worker_id == 0:
        lock.acquire()
    try:
        context = _start(model_dir, settings, strategy, worker_id, num_workers, run_id,
                         label_map)
        return _run(context, extra_callbacks)
    finally:
        lock.release()


def new_run_id():
    """A fresh id for one run (one process): 32 hex digits (uuid4)."""
    return uuid.uuid4().hex


def _check_files(settings):
    """Files named by the settings that are only opened later: their absence is reported before
    the run writes anything (the model dir, its lock, the MLPerf log)."""
    if settings.eval_annotations_file:
        coco_metrics.check_ground_truth_file(settings.eval_annotations_file)


def _run(context, extra_callbacks):
    """From the model to `run_stop`: every way out after `run_start` but a preemption ends the
    MLPerf log with `run_stop` (`aborted` for a failure), as the rules want of a run."""
    model, optimizer = _build_model_and_optimizer(context)
    context.mllog.init_stop()
    context.mllog.run_start()
    try:
        logs, success = _timed_run(context, model, optimizer, extra_callbacks)
    except trainer_lib.Preempted:
        context.mllog.close()  # no run_stop: the same command resumes the run and its log
        raise
    except Exception:
        context.mllog.run_stop(success=False)
        context.mllog.close()
        raise
    context.mllog.run_stop(success=success)
    context.mllog.close()
    return logs


def _timed_run(context, model, optimizer, extra_callbacks):
    """Everything on the MLPerf clock; returns (the final logs, whether the targets were met)."""
    # The clock runs from here: the dataset is touched only now (REFERENCE.md, rules).
    train_builder = _training_data(context)
    loop = _loop_settings(context, train_builder)
    eval_callback = _eval_callback(context, model)
    try:  # from here on every way out, failures included, ends the post-processor's workers
        eval_samples = _check_inputs(context, model, train_builder, eval_callback)
        log_hyperparameters(context.mllog, optimizer, model, train_builder, eval_samples,
                            context.seed)
        _write_operative_config(context)
        callbacks = _callbacks(context, loop, eval_callback, extra_callbacks)
        trainer = _trainer(context, model, optimizer, train_builder, loop, callbacks)
        restored = _restore(trainer)
        with decode_failures.named_decode_failures(
                train_builder, eval_callback.evaluator.builder if eval_callback else None):
            _redo_lost_evaluations(context, trainer, eval_callback, restored)
            logs = _train(context, trainer, train_builder)
    finally:
        if eval_callback:
            eval_callback.postprocessor.close()
    _print_final_weights(trainer)
    # MLPerf success: both accuracy targets reached, which only an evaluation can tell.
    return logs, eval_callback is not None and eval_callback.targets_met


def run_label_map(model_dir, settings):
    """The run's label map (`data/label_maps.py`), before the model is built: the training
    records' manifest, checked against the eval records', the eval ground truth's and the one
    an earlier run saved in `model_dir`; without a manifest, the ground truth's categories.
    `build_maskrcnn_model.num_classes` is set from it when the config leaves it unset, checked
    otherwise. Only metadata is read (a glob and small JSON files), not the data itself.

    Returns:
      the LabelMap, or None when neither the records nor the ground truth carry one.
    Raises:
      label_maps.LabelMapError: any two of them disagree (the message names both files).
    """
    train_map = label_maps.from_records(_records_pattern("train"))
    eval_map = ground_truth_map = None
    if settings.eval_annotations_file:
        eval_map = label_maps.from_records(_records_pattern("eval"))
        ground_truth_map = label_maps.from_annotations(settings.eval_annotations_file)
    label_map = train_map or eval_map or ground_truth_map
    for other in (eval_map, ground_truth_map, runtime.saved_label_map(model_dir)):
        label_maps.check_same(label_map, other)
    num_classes, was_set = label_maps.apply_num_classes(label_map)
    if label_map is not None:
        how = "set from it" if was_set else "as configured"
        print(f"label map: {len(label_map.entries)} classes from {label_map.source}; "
              f"{label_maps.NUM_CLASSES_PARAMETER} = {num_classes} ({how})", flush=True)
    return label_map


def _records_pattern(scope):
    """`<scope>/DatasetBuilder.file_pattern` (or the unscoped one) as gin binds it; None when
    unbound (the builder's own error names it later)."""
    return gin_bindings.bound_value(f"{scope}/DatasetBuilder.file_pattern",
                                    "DatasetBuilder.file_pattern")


def _strategy(settings):
    """The strategy and this process's place in the cluster, checked against the settings."""
    strategy = runtime.build_strategy(settings)
    worker_id, num_workers = distribution.worker_info(strategy)
    if settings.eval_async and num_workers > 1:
        raise ValueError("run.eval_async needs a single worker: workers would see results at "
                         "different steps and disagree on when to stop")
    replicas = strategy.num_replicas_in_sync
    if settings.global_batch_size % replicas:
        raise ValueError(f"run.global_batch_size={settings.global_batch_size} is not a multiple "
                         f"of the {replicas} replicas")
    return strategy, worker_id, num_workers


def _start(model_dir, settings, strategy, worker_id, num_workers, run_id, label_map):
    """The MLPerf log (init_start) and the seed; the model dir is locked by now (chief)."""
    tf.io.gfile.makedirs(model_dir)
    mllog = mlperf_logger.MLPerfLogger(os.path.join(model_dir, "mlperf.log"),
                                       enabled=worker_id == 0, run_id=run_id)
    mllog.cache_clear()
    mllog.init_start()
    mllog.submission_info(org=settings.submission_org, division=settings.submission_division,
                          platform=settings.submission_platform,
                          status=settings.submission_status)
    seed = settings.seed
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**31))
    context = _Context(model_dir, settings, strategy, worker_id, num_workers, mllog, seed,
                       run_id, label_map)
    logging.info("run id %s, seed %d, %d replica(s) on %d worker(s), %d image(s) per replica, "
                 "%s", run_id, seed, strategy.num_replicas_in_sync, num_workers,
                 context.per_replica_batch_size, settings.precision)
    return context


def _build_model_and_optimizer(context):
    """The seeded model (printed as a table of layers) and its optimizer."""
    tf_keras.utils.set_random_seed(context.seed)
    model = runtime.build_model(context.strategy, context.settings.precision)
    with context.strategy.scope():
        optimizer = optimizer_lib.build_optimizer(context.settings.global_batch_size)
        if context.settings.precision == "mixed_float16":
            optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
    print(summary.format_layer_table(model), flush=True)
    return model, optimizer


def _training_data(context):
    with gin.config_scope("train"):
        return dataset_builder.DatasetBuilder(
            is_training=True, global_batch_size=context.settings.global_batch_size,
            seed=context.seed)


def _loop_settings(context, train_builder):
    """The Trainer's `LoopSettings`; an epoch is as many steps as every input pipeline has."""
    settings = context.settings
    replicas_per_worker = context.strategy.num_replicas_in_sync // context.num_workers
    return trainer_lib.LoopSettings(
        per_replica_batch_size=context.per_replica_batch_size,
        steps_per_epoch=train_builder.steps_per_epoch(context.num_workers, replicas_per_worker),
        num_epochs=settings.num_epochs, max_steps=settings.max_steps,
        steps_per_loop=settings.steps_per_loop, jit_compile=settings.jit_compile,
        seed=context.seed, nan_recovery_trials=settings.nan_recovery_trials)


def _eval_callback(context, model):
    """The per-epoch evaluation, or None without `run.eval_annotations_file`."""
    if not context.settings.eval_annotations_file:
        return None
    best = (best_checkpoint.BestCheckpoint(context.model_dir, context.run_id) if context.chief
            else None)
    return runtime.build_eval_callback(
        context.strategy, model, context.settings, context.mllog,
        context.metrics_path if context.chief else None,
        stream=sys.stdout if context.chief else None, run_id=context.run_id, best=best,
        summary_dir=os.path.join(context.model_dir, "eval") if context.chief else None)


def _check_inputs(context, model, train_builder, eval_callback):
    """Data errors that would otherwise surface at the first step or after an epoch; returns
    the number of images each evaluation scores (0 without evaluation), the MLPerf log's
    `eval_samples`."""
    startup_checks.check_labels(train_builder, model.settings.num_classes)
    if not eval_callback:
        return 0
    return startup_checks.check_eval_ground_truth(eval_callback.evaluator.builder,
                                                  context.settings.eval_annotations_file,
                                                  context.settings.eval_allow_subset)


def _write_operative_config(context):
    """Every setting the run used, as gin, and the label map, into the model dir (by the
    chief): what evaluate, predict and export need beside the checkpoints."""
    if context.chief:
        with tf.io.gfile.GFile(os.path.join(context.model_dir, "operative_config.gin"), "w") as f:
            f.write(gin.operative_config_str())
        if context.label_map is not None:
            label_maps.write(context.model_dir, context.label_map)


def _callbacks(context, loop, eval_callback, extra_callbacks):
    callbacks = [callbacks_lib.ProgressLogger(loop.total_steps,
                                              every=context.settings.print_every)]
    if eval_callback:
        callbacks.append(eval_callback)
    if context.chief:
        callbacks.append(callbacks_lib.ScalarSummaries(os.path.join(context.model_dir, "train")))
    return callbacks + list(extra_callbacks)


def _trainer(context, model, optimizer, train_builder, loop, callbacks):
    """The Trainer with its hooks and its variables built (not restored yet: `_restore`)."""
    settings, strategy = context.settings, context.strategy
    step = trainer_lib.create_step_variable(strategy)
    checkpointer = checkpointing.Checkpointer(
        context.model_dir, {"model": model, "optimizer": optimizer, "step": step},
        max_to_keep=settings.max_checkpoints, is_chief=context.chief,
        worker_id=context.worker_id)
    trainer = trainer_lib.Trainer(
        strategy, model, optimizer,
        train_data=lambda epoch, start: train_builder.distribute(strategy, epoch, start),
        image_shapes=train_builder.image_shapes, settings=loop, step=step,
        checkpointer=checkpointer,
        hooks=_hooks(context, model, checkpointer), callbacks=callbacks,
        recoveries=nan_recovery.recoveries_done(context.model_dir))
    trainer.build()
    return trainer


def _restore(trainer):
    """Restores the newest readable checkpoint; returns its prefix (None: a fresh run)."""
    restored = trainer.checkpointer.restore()
    if restored:
        print(f"resumed from {restored} (step {int(trainer.step.numpy())})", flush=True)
    return restored


def _redo_lost_evaluations(context, trainer, eval_callback, restored):
    """Before training on: counts the results logged by earlier runs toward the target, and
    runs the evaluations of trained epochs that have none (a kill during the evaluation, or,
    async, while it was post-processed), each with its epoch-end checkpoint's weights; the
    model then holds the restored weights again. `coco_eval_callback` says why."""
    if eval_callback is None:
        return
    results = coco_eval_callback.read_results(context.metrics_path)
    eval_callback.add_earlier_results(results)
    if restored is None:
        return
    step = int(trainer.step.numpy())
    paths = {checkpointing.checkpoint_step(path): path
             for path in checkpointing.list_checkpoints(context.model_dir)[0]}
    paths[step] = restored
    lost = coco_eval_callback.evaluations_to_redo(
        [s for s in paths if s is not None and s <= step], results, trainer.steps_per_epoch,
        trainer.total_steps, context.settings.eval_interval)
    loaded = restored
    for epoch_num, epoch_end in lost:
        print(f"the evaluation of epoch {epoch_num} has no result (interrupted): running it "
              f"now with the weights of {paths[epoch_end]}", flush=True)
        try:
            loaded = _load_model_weights(trainer.model, paths[epoch_end], loaded)
        except checkpointing.CheckpointError as e:
            logging.warning("the evaluation of epoch %d cannot be redone: %s", epoch_num, e)
            loaded = None  # a failed restore may have changed some weights
            continue
        eval_callback.evaluate(epoch_num, step=step, checkpoint_step=epoch_end)
    _load_model_weights(trainer.model, restored, loaded)


def _load_model_weights(model, path, loaded):
    """Restores the model's weights of checkpoint `path` unless `loaded` (the checkpoint the
    model holds now) is that one; returns `path`. The optimizer and the step stay untouched."""
    if path != loaded:
        runtime.restore_model_weights(model, path)
    return path


def _hooks(context, model, checkpointer):
    """The hang watchdog, then MLPerf epoch events, preemption and checkpoints, in the order
    `hooks` explains (the watchdog first: a host call counts as done before a save can hang);
    last the report of NaN recoveries (the chief's record and console line)."""
    checkpoints = hooks_lib.CheckpointHook(checkpointer, model,
                                           context.settings.checkpoint_every_n_steps)
    return [watchdog.HangWatchdog(context.settings.watchdog_seconds, context.worker_id),
            hooks_lib.MLPerfEpochHook(context.mllog),
            hooks_lib.PreemptionHook(context.strategy, context.num_workers,
                                     save=checkpoints.save),
            checkpoints,
            nan_recovery.RecoveryLog(context.model_dir if context.chief else None,
                                     context.mllog, sys.stdout if context.chief else None,
                                     context.run_id)]


def _train(context, trainer, train_builder):
    """Runs the trainer; returns its final logs."""
    print(f"training: {trainer.steps_per_epoch} steps per epoch of "
          f"{train_builder.num_train_images} images, {trainer.total_steps} steps in all, global "
          f"batch {context.settings.global_batch_size}; outputs in {context.model_dir}",
          flush=True)
    return trainer.train()


def _print_final_weights(trainer):
    """One line to compare runs by: the step and two summaries of the model's weights."""
    variables = trainer.model.variables
    print(f"final weights: step {int(trainer.step.numpy())}, fingerprint "
          f"{trainer_lib.weights_fingerprint(variables)}, sum|w| "
          f"{trainer_lib.weights_abs_sum(variables)!r}", flush=True)


def num_image_candidates(model_config):
    """The `num_image_candidates` the MLPerf log wants: post-NMS proposals per image (or batch)."""
    return int(model_config["rpn_post_nms_top_n_train"])


def log_hyperparameters(mllog, optimizer, model, train_builder, eval_samples, seed):
    """The MLPerf log's hyperparameter lines, from the objects actually built."""
    schedule = optimizer_lib.learning_rate_schedule(optimizer)
    parser = train_builder.parser
    mllog.hyperparameters(
        global_batch_size=train_builder.global_batch_size,
        train_samples=train_builder.num_train_images, eval_samples=eval_samples,
        base_learning_rate=schedule.base_learning_rate, warmup_steps=schedule.warmup_steps,
        warmup_factor=schedule.warmup_factor, decay_steps=schedule.decay_steps,
        decay_factor=schedule.decay_factor,
        num_image_candidates=num_image_candidates(model.get_config()),
        min_image_size=parser.min_size, max_image_size=parser.max_size, seed=seed)


def main(argv):
    del argv
    if not FLAGS.model_dir:
        raise app.UsageError("--model_dir is required")
    if not FLAGS.gin_file:
        raise app.UsageError("give at least one --gin_file (e.g. configs/smoke_cpu.gin)")
    try:
        runtime.parse_gin(FLAGS.gin_file, FLAGS.gin_param)
        run(FLAGS.model_dir)
    except trainer_lib.Preempted as e:
        print(f"{e}. Run the same command again to resume.", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except (trainer_lib.NonFiniteLossError, checkpointing.CheckpointError,
            model_dir_lock.ModelDirLockedError, *runtime.INPUT_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
