"""Checkpoints of a training run: save, keep the newest few, restore the newest readable one.

Atomic writes: TensorFlow writes a checkpoint's data and index into temporary files and renames
them, and rewrites the `checkpoint` state file (the list of checkpoints) atomically after that, so
a crash mid-save leaves the previous checkpoints listed and intact. What remains possible is a
listed checkpoint whose files were damaged later (a full disk, a copy cut short): `restore` then
falls back to the previous one with a warning instead of failing the run, and fails loudly only
when no listed checkpoint can be read.

Multi-worker: every worker must call `save` (the strategy's variables are read collectively);
only the chief writes into the model dir, the others into a scratch folder that is emptied after
each save.
"""

import os
import shutil

import numpy as np
import tensorflow as tf
from absl import logging

CHECKPOINT_NAME = "ckpt"


class CheckpointError(RuntimeError):
    """No listed checkpoint can be restored; the message lists each one and why."""


class Checkpointer:
    """`tf.train.Checkpoint` + `CheckpointManager` with fallback restore and non-finite refusal.

    Args:
      directory: the model dir (checkpoints are `directory/ckpt-<step>.*`).
      objects: the trackable objects to save, by name (e.g. model=, optimizer=, step=).
      max_to_keep: newest checkpoints kept (older ones are deleted after a save).
      is_chief: False on non-chief workers (they write to a scratch folder, see above).
      worker_id: this worker's index, names its scratch folder.
    """

    def __init__(self, directory, objects, max_to_keep=5, is_chief=True, worker_id=0):
        self.directory = directory
        self.is_chief = is_chief
        self.checkpoint = tf.train.Checkpoint(**objects)
        target = directory if is_chief else os.path.join(directory, f".worker-{worker_id}-tmp")
        self.manager = tf.train.CheckpointManager(self.checkpoint, target,
                                                  max_to_keep=max_to_keep,
                                                  checkpoint_name=CHECKPOINT_NAME)
        self._target = target

    @property
    def latest(self):
        """The newest listed checkpoint's path prefix, or None."""
        return self.manager.latest_checkpoint

    def save(self, step, variables):
        """Saves checkpoint number `step`, unless a variable is not finite.

        Args:
          step: python int, the global step (the checkpoint's number).
          variables: the variables checked before writing (e.g. the model's weights).
        Returns:
          the written path prefix (a scratch path on non-chief workers).
        Raises:
          NonFiniteWeightsError: a variable holds NaN or Inf; nothing is written, so the last
            good checkpoint stays the newest.
        """
        bad = [v.name for v in variables
               if v.dtype.is_floating and not np.isfinite(v.numpy()).all()]
        if bad:
            raise NonFiniteWeightsError(
                f"refusing to save checkpoint {step}: {len(bad)} variable(s) hold NaN or Inf "
                f"(first: {bad[:3]}); the newest checkpoint stays {self.latest}")
        path = self.manager.save(checkpoint_number=step)
        if not self.is_chief:
            shutil.rmtree(self._target, ignore_errors=True)
        return path

    def restore(self):
        """Restores the newest checkpoint that can be read; older ones are the fallback.

        Returns:
          the restored path prefix, or None when no checkpoint is listed (a fresh run).
        Raises:
          CheckpointError: checkpoints are listed but none can be read.
        """
        listed = list(reversed(self.manager.checkpoints))
        failures = []
        for path in listed:
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            # A damaged file surfaces as any of OpError, IndexError, ValueError, DecodeError...
            except Exception as e:  # pylint: disable=broad-except
                reason = getattr(e, "message", str(e)).splitlines()[0][:300]
                failures.append(f"{path}: {type(e).__name__}: {reason}")
                logging.warning("checkpoint %s cannot be restored (%s: %s); trying the "
                                "previous one", path, type(e).__name__, reason)
                continue
            if failures:
                logging.warning("restored %s after %d unreadable newer checkpoint(s)", path,
                                len(failures))
            return path
        if failures:
            raise CheckpointError("no checkpoint in %s can be restored:\n  %s"
                                  % (self.directory, "\n  ".join(failures)))
        return None


class NonFiniteWeightsError(RuntimeError):
    """A save was refused because the weights are not finite."""
