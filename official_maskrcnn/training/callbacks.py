"""Callbacks the training loop ships: a progress line and TensorBoard scalars.

The loop (`trainer.Trainer`) calls `on_train_batch_end` once per host call, i.e. every
`steps_per_loop` steps, with `logs` holding: step (global steps done), epoch (1-based), the five
losses and total_loss (means over the steps of that call), learning_rate (after the last step),
steps (steps in that call), seconds (wall time of that call), images_per_second and, under
mixed_float16 only, loss_scale (the dynamic loss scale after the last step).
"""

import sys
import time

import tensorflow as tf
import tf_keras

from official_maskrcnn.modeling.maskrcnn_model import LOSS_NAMES
from official_maskrcnn.training import memory
from tfrecord_tools.progress import format_seconds

LOSS_KEYS = ("total_loss",) + LOSS_NAMES  # in the order the progress line prints them
# The logs' entries ScalarSummaries writes (under these names), when present.
SCALAR_KEYS = LOSS_KEYS + ("learning_rate", "images_per_second", "loss_scale")


class ProgressLogger(tf_keras.callbacks.Callback):
    """One line per host call: step, epoch, losses, learning rate, images/s and the ETA.

    The ETA uses the throughput of the calls after the first one of the run (which includes
    tracing and XLA compilation) and counts the steps left to `total_steps`.

    Args:
      total_steps: steps of the whole run (for the ETA and the percentage).
      stream: where lines go (stdout by default).
      every: print every `every`-th call (1: all).
    """

    def __init__(self, total_steps, stream=None, every=1):
        super().__init__()
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.every = max(1, every)
        self._calls = 0
        self._timed_steps = 0
        self._timed_seconds = 0.0

    def on_train_begin(self, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        self._calls += 1
        if self._calls > 1:  # the first call pays for tracing and compilation
            self._timed_steps += logs.get("steps", 0)
            self._timed_seconds += logs.get("seconds", 0.0)
        if self._calls % self.every:
            return
        step = int(logs.get("step", batch + 1))
        if self._timed_steps:
            eta = format_seconds((self.total_steps - step) * self._timed_seconds
                                 / self._timed_steps)
        else:
            eta = "?"
        losses = " ".join(f"{key.replace('_loss', '')}={logs[key]:.4f}" for key in LOSS_KEYS
                          if key in logs)
        print(f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%) "
              f"epoch {logs.get('epoch', '?')} | {losses} | lr={logs.get('learning_rate', 0):.5g}"
              f" | {logs.get('images_per_second', 0):.2f} img/s | elapsed "
              f"{format_seconds(time.perf_counter() - self._start)} ETA {eta}",
              file=self.stream, flush=True)


class ScalarSummaries(tf_keras.callbacks.Callback):
    """TensorBoard scalars at each host call, by global step: the losses, learning_rate,
    images_per_second, loss_scale (when the logs have it) and this process's memory
    (`memory.memory_usage`: each GPU's allocator bytes, or the host RSS without a GPU).

    Args:
      log_dir: the event files' folder (e.g. MODEL_DIR/train).
    """

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = log_dir
        self._writer = None

    def on_train_begin(self, logs=None):
        self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        step = int(logs.get("step", batch + 1))
        with self._writer.as_default(step=step):
            for key in SCALAR_KEYS:
                if key in logs:
                    tf.summary.scalar(key, logs[key])
            for tag, mib in memory.memory_usage().items():
                tf.summary.scalar(tag, mib)

    def on_epoch_end(self, epoch, logs=None):
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
