r"""Trains Mask R-CNN: `python -m official_maskrcnn.train --gin_file F [...] --model_dir M`.

Writes into the model dir: `operative_config.gin` (every setting the run used), `mlperf.log`
(the MLPerf compliance log), checkpoints `ckpt-<step>.*` (at epoch ends and every N steps) and
TensorBoard events under `train/`. Running the same command again resumes from the newest
readable checkpoint, at the exact batch where the run stopped.

Exit codes: 0 done; 1 a non-finite loss or a configuration / input error (the message says
which); 128 + signal number after SIGTERM / SIGINT (a checkpoint was written first; run the
same command to resume).

Gin: `run` below and the gin scopes `train/DatasetBuilder` (the training data),
`build_maskrcnn_model` (the model) and `build_optimizer` (the optimizer and schedule). The
macros `num_gpus`, `seed` and `coco_annotations_file` exist so that `run_and_time.sh` can set them.
"""

import inspect
import os
import sys

import gin
import numpy as np
import tensorflow as tf
import tf_keras
from absl import app, flags, logging

from official_maskrcnn.data import dataset_builder, preprocess_ops
from official_maskrcnn.evaluation import callback as callback_lib
from official_maskrcnn.evaluation import evaluator as evaluator_lib
from official_maskrcnn.modeling import factory, summary
from official_maskrcnn.training import callbacks as callbacks_lib
from official_maskrcnn.training import checkpointing, distribution, mlperf_logger
from official_maskrcnn.training import optimizer as optimizer_lib
from official_maskrcnn.training import trainer as trainer_lib

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin config file(s), applied in order.")
flags.DEFINE_multi_string("gin_param", [], "Gin bindings applied after the files, e.g. "
                          "\"run.num_epochs = 2\" or \"train/DatasetBuilder.file_pattern = 'x'\".")
flags.DEFINE_string("model_dir", None, "Where checkpoints, logs and the operative config go.")

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def dummy_training_inputs(batch_size=1, size=64, num_instances=1, mask_size=112):
    """A tiny all-background batch: one call with it creates every variable of the model."""
    return {
        "images": tf.zeros([batch_size, size, size, 3]),
        "image_size": tf.fill([batch_size, 2], size),
        "gt_boxes": -tf.ones([batch_size, num_instances, 4]),
        "gt_classes": -tf.ones([batch_size, num_instances], tf.int32),
        "gt_masks": tf.zeros([batch_size, num_instances, mask_size, mask_size]),
    }


def num_image_candidates(model_config):
    """The `num_image_candidates` the MLPerf log wants: post-NMS proposals per image (or batch)."""
    return int(model_config["rpn_post_nms_top_n_train"])


@gin.configurable(denylist=["model_dir"])
def run(model_dir, strategy="default", num_gpus=None, global_batch_size=16, num_epochs=13,
        max_steps=None, steps_per_loop=50, jit_compile=True, precision="float32", seed=None,
        checkpoint_every_n_steps=0, max_checkpoints=5, print_every=1,
        submission_org="official_maskrcnn", submission_division="closed",
        submission_platform="unknown", submission_status="research", eval_annotations_file=None,
        eval_batch_size=None, eval_interval=1, eval_async=False, eval_processes=1,
        box_target=callback_lib.BOX_TARGET, mask_target=callback_lib.MASK_TARGET,
        extra_callbacks=()):
    """Builds everything from gin and trains; returns the final logs dict.

    Args:
      model_dir: output folder (created); an existing run there is resumed.
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
      box_target, mask_target: stop when both APs reach them (MLPerf: 0.377, 0.339).
      extra_callbacks: more tf_keras callbacks.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"run.precision: expected one of {PRECISIONS}, found {precision!r}")
    if strategy == "mirrored" and num_gpus == 0:
        strategy = "default"
    strategy_obj = distribution.build_strategy(strategy, num_gpus)
    worker_id, num_workers = distribution.worker_info(strategy_obj)
    if eval_async and num_workers > 1:
        raise ValueError("run.eval_async needs a single worker: workers would see results at "
                         "different steps and disagree on when to stop")
    chief = worker_id == 0
    tf.io.gfile.makedirs(model_dir)
    mllog = mlperf_logger.MLPerfLogger(os.path.join(model_dir, "mlperf.log"), enabled=chief)
    mllog.cache_clear()
    mllog.init_start()
    mllog.submission_info(org=submission_org, division=submission_division,
                          platform=submission_platform, status=submission_status)

    replicas = strategy_obj.num_replicas_in_sync
    if global_batch_size % replicas:
        raise ValueError(f"run.global_batch_size={global_batch_size} is not a multiple of the "
                         f"{replicas} replicas")
    per_replica = global_batch_size // replicas
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**31))
    logging.info("seed %d, %d replica(s) on %d worker(s), %d image(s) per replica, %s", seed,
                 replicas, num_workers, per_replica, precision)
    tf_keras.utils.set_random_seed(seed)
    model = build_model(strategy_obj, precision)
    with strategy_obj.scope():
        optimizer = optimizer_lib.build_optimizer(global_batch_size)
        if precision == "mixed_float16":
            optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
    print(summary.format_layer_table(model), flush=True)

    mllog.init_stop()
    mllog.run_start()
    # The clock runs from here: the dataset is touched only now (REFERENCE.md, rules).
    with gin.config_scope("train"):
        train_builder = dataset_builder.DatasetBuilder(is_training=True,
                                                       global_batch_size=global_batch_size,
                                                       seed=seed)
    num_pipelines = num_workers  # distribute_datasets_from_function: one pipeline per worker
    steps_per_epoch = train_builder.steps_per_epoch(num_pipelines, replicas // num_pipelines)
    parser = train_builder.parser
    image_shapes = tuple(preprocess_ops.padded_image_size(
        parser.min_size, parser.max_size, parser.size_divisibility, portrait=p)
        for p in (False, True))

    callbacks = [callbacks_lib.ProgressLogger(
        min(steps_per_epoch * num_epochs, max_steps or sys.maxsize), every=print_every)]
    eval_callback = None
    if eval_annotations_file:
        eval_callback = build_eval_callback(
            strategy_obj, model, eval_annotations_file,
            eval_batch_size or global_batch_size, mllog,
            os.path.join(model_dir, "metrics.jsonl") if chief else None,
            interval=eval_interval, box_target=box_target, mask_target=mask_target,
            asynchronous=eval_async, num_processes=eval_processes,
            stream=sys.stdout if chief else None)
        callbacks.append(eval_callback)

    log_hyperparameters(mllog, optimizer, model, train_builder,
                        eval_callback.evaluator.num_images if eval_callback else 0, seed)

    if chief:
        with tf.io.gfile.GFile(os.path.join(model_dir, "operative_config.gin"), "w") as f:
            f.write(gin.operative_config_str())
        callbacks.append(callbacks_lib.ScalarSummaries(os.path.join(model_dir, "train")))
    callbacks.extend(extra_callbacks)
    trainer = trainer_lib.Trainer(
        strategy_obj, model, optimizer,
        train_data=lambda epoch, start: train_builder.distribute(strategy_obj, epoch, start),
        image_shapes=image_shapes, per_replica_batch_size=per_replica,
        steps_per_epoch=steps_per_epoch, num_epochs=num_epochs, max_steps=max_steps,
        steps_per_loop=steps_per_loop, jit_compile=jit_compile, seed=seed,
        checkpoint_every_n_steps=checkpoint_every_n_steps, callbacks=callbacks, mlperf=mllog,
        num_workers=num_workers)
    trainer.build()
    trainer.checkpointer = checkpointing.Checkpointer(
        model_dir, {"model": model, "optimizer": optimizer, "step": trainer.step},
        max_to_keep=max_checkpoints, is_chief=chief, worker_id=worker_id)
    restored = trainer.checkpointer.restore()
    if restored:
        print(f"resumed from {restored} (step {int(trainer.step.numpy())})", flush=True)
    print(f"training: {steps_per_epoch} steps per epoch of {train_builder.num_train_images} "
          f"images, {trainer.total_steps} steps in all, global batch {global_batch_size}; "
          f"outputs in {model_dir}", flush=True)
    try:
        logs = trainer.train()
    except trainer_lib.Preempted:
        mllog.close()
        raise
    except Exception:
        mllog.run_stop(success=False)
        mllog.close()
        raise
    print(f"final weights: step {int(trainer.step.numpy())}, fingerprint "
          f"{trainer_lib.weights_fingerprint(model.variables)}, sum|w| "
          f"{trainer_lib.weights_abs_sum(model.variables)!r}", flush=True)
    if eval_callback:
        eval_callback.postprocessor.close()
    # Success means the accuracy targets were reached (an evaluation callback says so).
    success = any(getattr(callback, "targets_met", False) for callback in callbacks)
    mllog.run_stop(success=success)
    mllog.close()
    return logs


def build_model(strategy, precision):
    """The gin-configured model under `precision`, built (every variable created)."""
    tf_keras.mixed_precision.set_global_policy(precision)
    with strategy.scope():
        model = factory.build_maskrcnn_model()
        model(dummy_training_inputs(), training=True)
    return model


def build_eval_dataset(batch_size):
    """The eval records, from the gin scope `eval/DatasetBuilder` (plus unscoped bindings)."""
    with gin.config_scope("eval"):
        return dataset_builder.DatasetBuilder(is_training=False, global_batch_size=batch_size)


def build_eval_callback(strategy, model, annotations_file, batch_size, mllog, metrics_path,
                        num_processes=1, **options):
    """The per-epoch COCO evaluation."""
    return callback_lib.COCOEvalCallback(
        evaluator_lib.Evaluator(strategy, model, build_eval_dataset(batch_size)),
        evaluator_lib.PostProcessor(annotations_file, num_processes), mlperf=mllog,
        metrics_path=metrics_path, **options)


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


def run_settings():
    """`run`'s arguments as gin binds them (defaults filled in), for the other entry points."""
    settings = {name: parameter.default
                for name, parameter in inspect.signature(run).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    settings.update(gin.get_bindings(run))
    return settings


def parse_gin(gin_files, gin_params):
    """Applies the gin files then the bindings; a missing file is a clear error."""
    for path in gin_files:
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"--gin_file {path}: no such file")
    gin.parse_config_files_and_bindings(gin_files, gin_params)


def main(argv):
    del argv
    if not FLAGS.model_dir:
        raise app.UsageError("--model_dir is required")
    if not FLAGS.gin_file:
        raise app.UsageError("give at least one --gin_file (e.g. configs/smoke_cpu.gin)")
    parse_gin(FLAGS.gin_file, FLAGS.gin_param)
    try:
        run(FLAGS.model_dir)
    except trainer_lib.Preempted as e:
        print(f"{e}. Run the same command again to resume.", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except (trainer_lib.NonFiniteLossError, dataset_builder.InputError,
            checkpointing.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
