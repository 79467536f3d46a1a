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

Bounded NaN recovery (`LoopSettings.nan_recovery_trials` = K > 0, Model Garden's
`recovery_max_trials`): instead of ending the run, a non-finite step restores the newest
readable checkpoint (model, optimizer, step), adds one to the run's recovery count r, tells the
hooks (`Hook.after_recovery`, with a `Recovery`) and trains on from the restored step's epoch
and batch on a fresh iterator. The epoch's begin events are not repeated when the restored step
lies in the same epoch (the usual case: every epoch end is a checkpoint). What a retry changes:
the model's sampling seed (`sampling_seed`: anchors and ROIs sampled anew); what it replays:
the same images in the same order with the same flips (the data position is a function of the
step, so an epoch still sees each image once and a resume stays exact), so a NaN that a batch
causes whatever the sampling recurs and uses up the trials. A fresh run first saves its
initial state as checkpoint 0, so that a NaN before the first checkpoint is recoverable too.
After K recoveries the next non-finite step raises `NonFiniteLossError` saying so. r is the
run's, not the process's: the caller passes the recoveries of earlier processes
(`nan_recovery.recoveries_done`), so a resumed run neither resets the bound nor the seed shift.

Position: the global step is the only state; epoch = step // steps_per_epoch and the batch
inside the epoch = step % steps_per_epoch, so a resumed run asks the dataset for
(epoch, start_batch) and sees exactly the batches the interrupted run would have seen. The model's
sampling seed of each step and replica is (seed + r * SEED_SHIFT, step * replicas + replica), a
function of the step and the recovery count r only (r = 0 unless a NaN was recovered).

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

# Added to the first word of the sampling seed per NaN recovery: a multiple of 2**32 so that a
# shifted seed never equals the seed of another run (train.py draws seeds below 2**31).
SEED_SHIFT = 2**32


def sampling_seed(seed, recoveries, step, num_replicas, replica_id):
    """The model's stateless sampling seed of one step and replica, as two int64 words:
    [seed + recoveries * SEED_SHIFT, step * num_replicas + replica_id] (python ints or int64
    tensors). With no recovery it is (seed, step * replicas + replica), as before recoveries."""
    return [seed + recoveries * SEED_SHIFT, step * num_replicas + replica_id]


class NonFiniteLossError(FloatingPointError):
    """A step has a NaN / Inf loss or gradient; the message names the step, each loss and the
    learning rate.

    Attributes:
      step: the 1-based number of the failing step (None when not known).
      losses: {name: float} of that step (`ALL_LOSSES` and "gradients_finite", 1.0 or 0.0).
      learning_rate: the learning rate of that step's update.
    """

    def __init__(self, message, step=None, losses=None, learning_rate=None):
        super().__init__(message)
        self.step = step
        self.losses = dict(losses or {})
        self.learning_rate = learning_rate


@dataclasses.dataclass(frozen=True)
class Recovery:
    """One bounded NaN recovery: what failed, what was restored (`Hook.after_recovery`).

    Attributes:
      trial: the recovery's 1-based number in the run (earlier processes' included); from now
        on the sampling seed is shifted by `trial` (`sampling_seed`).
      trials: the bound K (`LoopSettings.nan_recovery_trials`).
      failed_step: 1-based number of the non-finite step; failed_epoch its 1-based epoch.
      losses: {name: float} of the failing step (`NonFiniteLossError.losses`).
      learning_rate: the learning rate of the failing step.
      checkpoint: the restored checkpoint's path prefix.
      restored_step: the global step it holds; training goes on at restored_epoch (1-based),
        batch restored_batch (0-based) of that epoch.
    """

    trial: int
    trials: int
    failed_step: int
    failed_epoch: int
    losses: dict
    learning_rate: float
    checkpoint: str
    restored_step: int
    restored_epoch: int
    restored_batch: int


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
      nan_recovery_trials: K, the non-finite steps the run may recover from by restoring the
        newest checkpoint (module docstring); 0: the first one ends the run.
    """

    per_replica_batch_size: int
    steps_per_epoch: int
    num_epochs: int
    max_steps: int = None
    steps_per_loop: int = 10
    jit_compile: bool = True
    seed: int = 0
    nan_recovery_trials: int = 0

    def __post_init__(self):
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, found {self.steps_per_epoch} "
                             "(fewer training images than one global batch?)")
        if self.nan_recovery_trials < 0:
            raise ValueError(f"nan_recovery_trials must be >= 0 (0: off), found "
                             f"{self.nan_recovery_trials}")

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
      after_recovery   after a non-finite step was undone by restoring a checkpoint (bounded
                       NaN recovery), before training goes on; `recovery` is a `Recovery`.
                       The failing host call had no after_host_call.
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

    def after_recovery(self, recovery):
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
      checkpointer: optional `checkpointing.Checkpointer` of (model, optimizer, step):
        `NonFiniteLossError` names its newest checkpoint. When to save is the hooks' business
        (`hooks.CheckpointHook`), except with `nan_recovery_trials` > 0, which needs it: a NaN
        restores its newest checkpoint, and a fresh run saves checkpoint 0 first.
      hooks: `Hook`s (see there for when each method runs), called in this order.
      callbacks: tf_keras callbacks, driven through a `CallbackList`.
      recoveries: NaN recoveries the run used in earlier processes (a resumed run), counted
        against `nan_recovery_trials` and shifting the sampling seed.
    Attributes:
      recoveries: int64 variable, the run's recovery count r (not saved in checkpoints: a
        restore must not undo it; the caller persists it, `nan_recovery`).
    """

    def __init__(self, strategy, model, optimizer, train_data, image_shapes, settings, *,
                 step=None, checkpointer=None, hooks=(), callbacks=(), recoveries=0):
        if settings.nan_recovery_trials and checkpointer is None:
            raise ValueError("nan_recovery_trials > 0 needs a checkpointer to restore from")
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
        with strategy.scope():
            self.recoveries = tf.Variable(recoveries, dtype=tf.int64, trainable=False,
                                          name="nan_recoveries",
                                          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
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
        # Grappler moves this elementwise check before the Reshape / Transpose a gradient ends
        # in: a layer whose kernel gradient ends in a Transpose makes it a bool Transpose, which
        # oneDNN reports as a C++ error line (see mask_head._transposed_conv_2x2_stride_2).
        losses["gradients_finite"] = tf.cast(
            tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads]), tf.float32)
        return losses, grads

    def _replica_step(self, inputs, step, recoveries):
        context = tf.distribute.get_replica_context()
        seed = tf.stack(sampling_seed(tf.constant(self.seed, tf.int64), recoveries, step,
                                      self.strategy.num_replicas_in_sync,
                                      tf.cast(context.replica_id_in_sync_group, tf.int64)))
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
            losses, grads = self.strategy.run(
                self._replica_step,
                args=(next(iterator), self.step.read_value(), self.recoveries.read_value()))
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
        losses = {key: float(last[key]) for key in ALL_LOSSES + ("gradients_finite",)}
        values = ", ".join(f"{key}={losses[key]:.6g}" for key in ALL_LOSSES)
        gradients = "finite" if losses["gradients_finite"] == 1.0 else "NOT finite"
        learning_rate = self.learning_rate()
        raise NonFiniteLossError(
            f"non-finite step {failing} (epoch {(failing - 1) // self.steps_per_epoch + 1}"
            f"): {values}; gradients {gradients}; learning_rate={learning_rate:.6g}. "
            f"The step's update was not applied and no checkpoint was written after it; the "
            f"newest checkpoint is {self.checkpointer.latest if self.checkpointer else None}.",
            step=failing, losses=losses, learning_rate=learning_rate)

    def train(self):
        """Trains from the restored position to `total_steps`; returns the final logs dict.

        Raises:
          NonFiniteLossError: a step's loss or gradients were not finite (it was not applied)
            and no NaN recovery is left (`LoopSettings.nan_recovery_trials`).
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
        recoveries = int(self.recoveries.numpy())
        if recoveries:
            logging.info("%d NaN recovery(ies) of %d used by this run so far; sampling seeds "
                         "shifted by %d", recoveries, self.settings.nan_recovery_trials,
                         recoveries)
        if self.settings.nan_recovery_trials and step == 0:
            # Before the first epoch-end checkpoint, a NaN needs a state to go back to: the
            # initial one (every worker saves: the save reads variables collectively).
            self.checkpointer.save(0, self.model.variables)
        open_epoch = None  # the epoch whose begin events ran and whose end events did not
        while step < self.total_steps and not self.model.stop_training:
            epoch = step // self.steps_per_epoch
            epoch_end = min((epoch + 1) * self.steps_per_epoch, self.total_steps)
            if epoch != open_epoch:  # not again when a recovery restarts inside the epoch
                for hook in self.hooks:
                    hook.before_epoch(epoch, step)
                self.callbacks.on_epoch_begin(epoch)
                open_epoch = epoch
            try:
                step, logs = self._run_epoch(epoch, step, epoch_end, logs)
            except NonFiniteLossError as error:
                if not self.settings.nan_recovery_trials:
                    raise
                step = self._recover(error)
                continue
            for hook in self.hooks:
                hook.after_epoch(epoch, step, epoch_end)
            self.callbacks.on_epoch_end(epoch, logs)
            open_epoch = None
        self.callbacks.on_train_end(logs)
        return logs

    def _run_epoch(self, epoch, step, epoch_end, logs):
        """The host calls of `epoch` from global step `step` until `epoch_end` or
        stop_training, on an iterator that starts at that step's batch; returns (step, logs)."""
        iterator = iter(self.train_data(epoch, step - epoch * self.steps_per_epoch))
        while step < epoch_end:
            step, logs = self._host_call(iterator, epoch, step, epoch_end)
            if self.model.stop_training:
                break
        return step, logs

    def _recover(self, error):
        """Undoes the non-finite step of `error` by restoring the newest readable checkpoint
        (model, optimizer, step), counts the recovery (which shifts the sampling seed) and
        tells the hooks; returns the restored global step.

        Raises:
          NonFiniteLossError: the run's `nan_recovery_trials` recoveries are used up, or there
            is no checkpoint to restore; chained to `error`.
          checkpointing.CheckpointError: no checkpoint can be read.
        """
        trials = self.settings.nan_recovery_trials
        used = int(self.recoveries.numpy())
        if used >= trials:
            raise NonFiniteLossError(
                f"{error} No NaN recovery left: the run used {used} of {trials} "
                f"(run.nan_recovery_trials = {trials}).", step=error.step,
                losses=error.losses, learning_rate=error.learning_rate) from error
        checkpoint = self.checkpointer.restore()
        if checkpoint is None:
            raise NonFiniteLossError(f"{error} No checkpoint to recover from.", step=error.step,
                                     losses=error.losses,
                                     learning_rate=error.learning_rate) from error
        self.recoveries.assign(used + 1)
        restored = int(self.step.numpy())
        recovery = Recovery(
            trial=used + 1, trials=trials, failed_step=error.step,
            failed_epoch=(error.step - 1) // self.steps_per_epoch + 1, losses=error.losses,
            learning_rate=error.learning_rate, checkpoint=checkpoint, restored_step=restored,
            restored_epoch=restored // self.steps_per_epoch + 1,
            restored_batch=restored % self.steps_per_epoch)
        for hook in self.hooks:
            hook.after_recovery(recovery)
        return restored

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
