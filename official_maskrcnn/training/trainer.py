"""The custom training loop: `strategy.run` of an XLA-compiled step, several steps per host call.

One step, on every replica:
  images + padded ground truth (one orientation per replica batch, padded to the static
  landscape or portrait shape) -> model losses -> gradients of total_loss / num_replicas
  (compiled with XLA when `jit_compile`) -> all-reduced (summed) by `apply_gradients`.
Each replica normalises its losses over its own images and the gradients are averaged over
replicas, as the reference's DistributedDataParallel does; N replicas with B/N images each
therefore update the weights as one replica with B images does whenever the per-image sample
counts are equal (exactly so for the RPN and box losses with full sampling).

Static shapes: the input's element_spec has None spatial dims (two orientations), so the step
branches on the orientation and pins each branch's shape with `tf.ensure_shape`: the model is
traced and compiled once per padded shape, never per batch.

Host calls: `steps_per_loop` steps run inside one `tf.function`; the loop stops early inside the
call at the first step whose loss is not finite and that step's update is not applied (the
weights stay those of the last good step), then `NonFiniteLossError` names the step, each loss
and the learning rate.

Position: the global step is the only state; epoch = step // steps_per_epoch and the batch
inside the epoch = step % steps_per_epoch, so a resumed run asks the dataset for
(epoch, start_batch) and sees exactly the batches the interrupted run would have seen. The model's
sampling seed of each step and replica is (seed, step * replicas + replica), also a function of
the step only.

Hooks: the loop itself only runs steps and drives the Keras callbacks; what happens around the
steps (checkpoints, the MLPerf epoch events, stopping on SIGTERM) is done by `Hook`s passed in
already built (`training/hooks.py`), in the spirit of detectron2's `SimpleTrainer`.
"""

import dataclasses
import time
import zlib

import numpy as np
import tensorflow as tf
import tf_keras
from absl import logging

from official_maskrcnn.modeling.maskrcnn_model import LOSS_NAMES
from official_maskrcnn.training import optimizer as optimizer_lib

ALL_LOSSES = LOSS_NAMES + ("total_loss",)


class NonFiniteLossError(FloatingPointError):
    """A step has a NaN / Inf loss or gradient; the message names the step, each loss and the
    learning rate."""


class Preempted(Exception):
    """The run stopped on SIGTERM / SIGINT after saving a checkpoint; `signum` tells which.

    Raised out of `Trainer.train` by `hooks.PreemptionHook`.
    """

    def __init__(self, signum, step, checkpoint):
        super().__init__(f"stopped by signal {signum} at step {step}; checkpoint {checkpoint}")
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How many steps the loop runs and how.

    Attributes:
      per_replica_batch_size: images per replica and step.
      steps_per_epoch: steps of one epoch (the same on every input pipeline), >= 1.
      num_epochs: epochs to train (the run may stop earlier: max_steps, stop_training).
      max_steps: optional cap on the global step (smoke runs, tests); None or 0: no cap.
      steps_per_loop: steps per host call (values below 1 mean 1).
      jit_compile: compile the forward/backward step with XLA.
      seed: python int, the model's sampling seed (mixed with the step).
    """

    per_replica_batch_size: int
    steps_per_epoch: int
    num_epochs: int
    max_steps: int = None
    steps_per_loop: int = 10
    jit_compile: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, found {self.steps_per_epoch} "
                             "(fewer training images than one global batch?)")

    @property
    def total_steps(self):
        """The global step at which training ends (unless stopped earlier)."""
        total = self.steps_per_epoch * self.num_epochs
        return min(total, self.max_steps) if self.max_steps else total


def create_step_variable(strategy):
    """The global step: an int64 scalar variable in `strategy`'s scope, 0 until restored.

    Created before the Trainer so that the checkpointer that saves it can be built first and
    handed to the hooks; the Trainer advances it by one per applied step.
    """
    with strategy.scope():
        return tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


class Hook:
    """Something the loop does at its events besides training; every method here does nothing.

    Arguments are python ints: `epoch` is 0-based (as in Keras callbacks); `step` is the global
    step when the event happens (steps done so far); `steps_run` the steps of the host call
    that just ended; `epoch_end` the step at which the current epoch ends (the run's last step
    when that comes first). Hooks run in the order given to the Trainer, at fixed places
    relative to the Keras callbacks:
      before_train     before callbacks.on_train_begin
      before_epoch     before callbacks.on_epoch_begin
      after_host_call  after callbacks.on_train_batch_end, before `model.stop_training` is read
      after_epoch      before callbacks.on_epoch_end; also when stop_training ended the epoch
                       early (then step < epoch_end)
      after_train      last, also when `train` raises (only hooks whose before_train ran)
    A hook may raise to end training (`PreemptionHook` raises `Preempted`).
    """

    def before_train(self):
        pass

    def before_epoch(self, epoch, step):
        pass

    def after_host_call(self, step, steps_run, epoch_end):
        pass

    def after_epoch(self, epoch, step, epoch_end):
        pass

    def after_train(self):
        pass


class Trainer:
    """Runs the training loop of DESIGN.md for a built model, optimizer and dataset.

    Args:
      strategy: the `tf.distribute.Strategy`; model and optimizer were created in its scope.
      model: a `MaskRCNNModel` (training call: inputs dict -> loss dict).
      optimizer: a tf_keras optimizer (possibly a `LossScaleOptimizer`).
      train_data: callable (epoch, start_batch) -> the distributed dataset of that epoch,
        starting at its batch `start_batch` (e.g. `DatasetBuilder.distribute`).
      image_shapes: ((Hl, Wl), (Hp, Wp)) the static padded landscape and portrait shapes.
      settings: `LoopSettings` (batch size, steps, compilation, seed).
      step: the global step variable (`create_step_variable`); None: a new one. Give the one
        the checkpointer saves, so that restoring it sets the loop's position.
      checkpointer: optional `checkpointing.Checkpointer`, only read: `NonFiniteLossError` names
        its newest checkpoint. When to save is the hooks' business (`hooks.CheckpointHook`).
      hooks: `Hook`s (see there for when each method runs), called in this order.
      callbacks: tf_keras callbacks, driven through a `CallbackList`.
    """

    def __init__(self, strategy, model, optimizer, train_data, image_shapes, settings, *,
                 step=None, checkpointer=None, hooks=(), callbacks=()):
        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.train_data = train_data
        self.settings = settings
        self.steps_per_epoch = settings.steps_per_epoch
        self.total_steps = settings.total_steps
        self.steps_per_loop = max(1, settings.steps_per_loop)
        self.seed = settings.seed
        self.batch_size = settings.per_replica_batch_size
        self.global_batch_size = self.batch_size * strategy.num_replicas_in_sync
        (hl, wl), (hp, wp) = image_shapes
        self.landscape_shape = [self.batch_size, hl, wl, 3]
        self.portrait_shape = [self.batch_size, hp, wp, 3]
        self.loss_scaled = isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
        self.step = create_step_variable(strategy) if step is None else step
        self.checkpointer = checkpointer
        self.hooks = list(hooks)
        self.callbacks = tf_keras.callbacks.CallbackList(list(callbacks), model=model)
        self._forward_backward_fn = tf.function(self._forward_backward,
                                                jit_compile=settings.jit_compile)
        self._loop_fn = tf.function(self._loop)

    # ------------------------------------------------------------------ the step

    def _with_shape(self, inputs, image_shape):
        """Pins the static batch size of every input and the image shape of one orientation."""
        pinned = {key: tf.ensure_shape(value, [self.batch_size] + value.shape[1:].as_list())
                  for key, value in inputs.items()}
        pinned["images"] = tf.ensure_shape(inputs["images"], image_shape)
        return pinned

    def _forward_backward(self, inputs, seed):
        """One replica: losses, gradients of total_loss / replicas (unscaled), and whether those
        gradients are finite (a finite loss can still have NaN gradients)."""
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            losses = self.model(dict(inputs, seed=seed), training=True)
            loss = losses["total_loss"] / self.strategy.num_replicas_in_sync
            if self.loss_scaled:
                loss = self.optimizer.get_scaled_loss(loss)
        grads = tape.gradient(loss, variables)
        if self.loss_scaled:
            grads = self.optimizer.get_unscaled_gradients(grads)
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
        losses = {key: losses[key] for key in ALL_LOSSES}
        losses["gradients_finite"] = tf.cast(
            tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads]), tf.float32)
        return losses, grads

    def _replica_step(self, inputs, step):
        context = tf.distribute.get_replica_context()
        seed = tf.stack([tf.constant(self.seed, tf.int64),
                         step * self.strategy.num_replicas_in_sync
                         + tf.cast(context.replica_id_in_sync_group, tf.int64)])
        images = inputs["images"]
        portrait = tf.shape(images)[1] > tf.shape(images)[2]
        return tf.cond(
            portrait,
            lambda: self._forward_backward_fn(self._with_shape(inputs, self.portrait_shape), seed),
            lambda: self._forward_backward_fn(self._with_shape(inputs, self.landscape_shape),
                                              seed))

    def _apply(self, grads):
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))

    def _loop(self, iterator, num_steps):
        """Up to `num_steps` steps; stops at the first non-finite step without applying it.

        A step is non-finite when a loss is NaN / Inf, or (without loss scaling, which skips
        such steps itself) when a gradient is.
        Returns:
          (mean losses over the applied steps, losses of the last step run, steps run, whether
          the last step was finite).
        """
        zero = {key: tf.constant(0.0) for key in ALL_LOSSES}
        sums = dict(zero)
        last = dict(zero, gradients_finite=tf.constant(1.0))
        done = tf.constant(0, tf.int64)
        finite = tf.constant(True)
        for _ in tf.range(num_steps):
            losses, grads = self.strategy.run(self._replica_step,
                                              args=(next(iterator), self.step.read_value()))
            last = {key: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
                    for key, value in losses.items()}
            done += 1
            finite = tf.reduce_all([tf.math.is_finite(last[key]) for key in ALL_LOSSES])
            if not self.loss_scaled:
                finite = tf.logical_and(finite, last["gradients_finite"] == 1.0)
            if not finite:
                break
            self.strategy.run(self._apply, args=(grads,))
            self.step.assign_add(1)
            sums = {key: sums[key] + last[key] for key in ALL_LOSSES}
        applied = done - tf.cast(tf.logical_not(finite), tf.int64)
        count = tf.cast(tf.maximum(applied, 1), tf.float32)
        return {key: sums[key] / count for key in ALL_LOSSES}, last, done, finite

    # ------------------------------------------------------------------ the host loop

    def learning_rate(self):
        """The learning rate the optimizer's next update uses (python float)."""
        return optimizer_lib.next_learning_rate(self.optimizer)

    def build(self):
        """Creates the model's and optimizer's variables (before a restore, so it is checked)."""
        if not self.model.built or not self.model.trainable_variables:
            raise ValueError("build the model (one call) before creating the Trainer's state")
        with self.strategy.scope():
            self.optimizer.build(self.model.trainable_variables)

    def _check_finite(self, last, finite, step_after):
        if finite:
            return
        failing = int(step_after) + 1  # 1-based number of the step that failed
        values = ", ".join(f"{key}={float(last[key]):.6g}" for key in ALL_LOSSES)
        gradients = "finite" if float(last["gradients_finite"]) == 1.0 else "NOT finite"
        raise NonFiniteLossError(
            f"non-finite step {failing} (epoch {(failing - 1) // self.steps_per_epoch + 1}"
            f"): {values}; gradients {gradients}; learning_rate={self.learning_rate():.6g}. "
            f"The step's update was not applied and no checkpoint was written after it; the "
            f"newest checkpoint is {self.checkpointer.latest if self.checkpointer else None}.")

    def train(self):
        """Trains from the restored position to `total_steps`; returns the final logs dict.

        Raises:
          NonFiniteLossError: a step's loss or gradients were not finite (it was not applied).
          whatever a hook raises to end training, e.g. `Preempted`.
        """
        started = []
        try:
            for hook in self.hooks:
                hook.before_train()
                started.append(hook)
            return self._train()
        finally:
            for hook in started:
                hook.after_train()

    def _train(self):
        step = int(self.step.numpy())
        logs = {}
        self.model.stop_training = False
        self.callbacks.on_train_begin()
        if step:
            logging.info("resuming at step %d (epoch %d, batch %d)", step,
                         step // self.steps_per_epoch + 1, step % self.steps_per_epoch)
        while step < self.total_steps and not self.model.stop_training:
            epoch = step // self.steps_per_epoch
            epoch_end = min((epoch + 1) * self.steps_per_epoch, self.total_steps)
            for hook in self.hooks:
                hook.before_epoch(epoch, step)
            self.callbacks.on_epoch_begin(epoch)
            iterator = iter(self.train_data(epoch, step - epoch * self.steps_per_epoch))
            while step < epoch_end:
                step, logs = self._host_call(iterator, epoch, step, epoch_end)
                if self.model.stop_training:
                    break
            for hook in self.hooks:
                hook.after_epoch(epoch, step, epoch_end)
            self.callbacks.on_epoch_end(epoch, logs)
        self.callbacks.on_train_end(logs)
        return logs

    def _host_call(self, iterator, epoch, step, epoch_end):
        """Runs the steps of one host call (up to `steps_per_loop`, never past `epoch_end`),
        then the callbacks' and hooks' batch-end events; returns (global step, logs)."""
        num_steps = min(self.steps_per_loop, epoch_end - step)
        self.callbacks.on_train_batch_begin(step)
        start = time.perf_counter()
        means, last, done, finite = self._loop_fn(iterator, tf.constant(num_steps))
        seconds = time.perf_counter() - start
        self._check_finite(last, bool(finite), self.step.numpy())
        step = int(self.step.numpy())
        done = int(done)
        logs = {key: float(value) for key, value in means.items()}
        logs.update(step=step, epoch=epoch + 1, steps=done, seconds=seconds,
                    learning_rate=self.learning_rate(),
                    images_per_second=done * self.global_batch_size / seconds)
        if self.loss_scaled:  # the dynamic loss scale after the call's last step
            logs["loss_scale"] = float(self.optimizer.loss_scale)
        self.callbacks.on_train_batch_end(step - 1, logs)
        for hook in self.hooks:
            hook.after_host_call(step, done, epoch_end)
        return step, logs


def weights_fingerprint(variables):
    """CRC32 of the variables' bytes in name order (8 hex digits): equal weights, equal prints.

    Printed at the end of a run so that workers, replicas or a resumed and an uninterrupted run
    can be compared at a glance.
    """
    crc = 0
    for variable in sorted(variables, key=lambda v: v.name):
        crc = zlib.crc32(np.ascontiguousarray(variable.numpy()).tobytes(), crc)
    return f"{crc:08x}"


def weights_abs_sum(variables):
    """Sum of |w| over the floating-point variables, in float64: a tolerance-friendly summary.

    Two workers of one run agree on it to ~1e-7 relative; their bytes (the fingerprint) were
    seen to differ in the last bits of a few elements on this CPU, sporadically.
    """
    return float(sum(np.abs(v.numpy().astype(np.float64)).sum() for v in variables
                     if v.dtype.is_floating))
