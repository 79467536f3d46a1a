"""What the training loop does around its steps: checkpoints, MLPerf epoch events, preemption.

Each hook is built by the caller and handed to `trainer.Trainer(hooks=[...])`, which calls them
in the order given (`trainer.Hook` says when each method runs). `train.py` uses
  [watchdog.HangWatchdog, MLPerfEpochHook, PreemptionHook, CheckpointHook,
   nan_recovery.RecoveryLog]
so that a host call counts as done before a save can hang, at an epoch's end `epoch_stop` is
logged before the epoch-end checkpoint is written, and at a host-call boundary a stop request is
served (one checkpoint, then `Preempted`) before the periodic checkpoint would be written at the
same step; the report of NaN recoveries comes last.
"""

import signal

import tensorflow as tf
from absl import logging

from official_maskrcnn.training.trainer import Hook, Preempted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class MLPerfEpochHook(Hook):
    """Logs `epoch_start` / `epoch_stop` (1-based epoch_num) on an `mlperf_logger.MLPerfLogger`.

    An epoch cut short by `stop_training` still gets its `epoch_stop`; one ended by an
    exception (`Preempted`, a non-finite step) does not.
    """

    def __init__(self, mllog):
        self.mllog = mllog

    def before_epoch(self, epoch, step):
        self.mllog.epoch_start(epoch + 1)

    def after_epoch(self, epoch, step, epoch_end):
        self.mllog.epoch_stop(epoch + 1)


class CheckpointHook(Hook):
    """Saves a checkpoint at every epoch end and, optionally, every N steps inside epochs.

    The periodic rule: after each host call whose steps reached or passed a multiple of N (a
    host call runs `steps_per_loop` steps, so the multiple may fall inside it; the checkpoint
    then holds the step at the call's end), except at the epoch's end, which gets the
    epoch-end checkpoint anyway. An epoch cut short by `stop_training` gets no epoch-end
    checkpoint.

    Args:
      checkpointer: a `checkpointing.Checkpointer` of (at least) the model and the global step.
      model: the model whose variables must be finite for a save to happen (the checkpointer
        refuses NaN / Inf weights).
      every_n_steps: the periodic interval N (0: epoch ends only).
    """

    def __init__(self, checkpointer, model, every_n_steps=0):
        self.checkpointer = checkpointer
        self.model = model
        self.every_n_steps = every_n_steps

    def save(self, step):
        """Saves checkpoint `step` (python int); returns its path prefix."""
        return self.checkpointer.save(step, self.model.variables)

    def after_host_call(self, step, steps_run, epoch_end):
        n = self.every_n_steps
        if n and step < epoch_end and step // n > (step - steps_run) // n:
            self.save(step)

    def after_epoch(self, epoch, step, epoch_end):
        if step == epoch_end:
            self.save(step)


class PreemptionHook(Hook):
    """On SIGTERM / SIGINT: a checkpoint at the end of the current host call, then `Preempted`.

    The signal handler only sets a flag (`signum`): Python runs it between two bytecodes of
    whatever the main thread is doing (a callback, say), not at a point where the step and the
    weights belong together. After each host call every worker takes part in one all-reduce of
    "was I signalled", so that all of them stop at the same step even when the cluster manager
    signalled only one (a worker that leaves alone would hang the others' next collective).
    The handlers are installed for the duration of `Trainer.train` and the previous ones are
    restored after it.

    Args:
      strategy: the run's `tf.distribute.Strategy` (for the all-reduce).
      num_workers: processes in the cluster (1: no all-reduce, the local flag decides).
      save: callable step -> checkpoint path (e.g. `CheckpointHook.save`); None: no checkpoint
        is written and `Preempted.checkpoint` is None.
    Attributes:
      signum: the signal received by this process (None: none yet).
    """

    def __init__(self, strategy, num_workers=1, save=None):
        self.num_workers = num_workers
        self.save = save
        self.signum = None
        self._previous_handlers = {}
        # ReduceOp has only SUM and MEAN: count the workers that were signalled.
        self._count_signalled = tf.function(lambda flag: strategy.reduce(
            tf.distribute.ReduceOp.SUM, strategy.run(lambda: flag), axis=None))

    def _handle(self, signum, _):
        logging.warning("signal %d received: checkpoint at the end of this host call, then "
                        "exit", signum)
        self.signum = signum

    def before_train(self):
        for signum in STOP_SIGNALS:
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass

    def after_train(self):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def stop_requested(self):
        """The signal to stop on (a worker that was not signalled itself reports SIGTERM), or
        0; collective when num_workers > 1: every worker must call it at the same step."""
        local = self.signum or 0
        if self.num_workers == 1:
            return local
        signalled = self._count_signalled(tf.constant(1.0 if local else 0.0))
        return local or (signal.SIGTERM if float(signalled) > 0 else 0)

    def after_host_call(self, step, steps_run, epoch_end):
        signum = self.stop_requested()
        if signum:
            raise Preempted(signum, step, self.save(step) if self.save else None)
