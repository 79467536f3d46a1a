"""Checkpoints of a training run: save, keep the newest few, restore the newest readable one.

Atomic writes: TensorFlow writes a checkpoint's data and index into a temporary folder
(`ckpt-<N>_temp/`, files `*.tempstate<random>`) and renames them, and rewrites the `checkpoint`
state file (the list of checkpoints) atomically after that, so a crash mid-save leaves the
previous checkpoints listed and intact. It also leaves two kinds of debris, which the chief
reports (count, size) and removes when it starts (`remove_stale_writes`): the temporary folder
of a save killed mid-write, and data files without an index.

The state file is not the only source of truth: a checkpoint is also found by its files
(`ckpt-<N>.index`), because the state file can be missing (deleted, not copied) or behind (a crash
between the rename and its rewrite). Trusting only the list would restart such a run from step 0
and overwrite its checkpoints without a word; instead the list is rebuilt from the files, with a
warning, before the manager reads it, so that resume and `max_to_keep` see every checkpoint.

A listed checkpoint can also be damaged later (a full disk, a copy cut short): `restore` then
falls back to the previous one with a warning instead of failing the run, and fails loudly only
when no checkpoint can be read. `restore_newest_readable` is that rule, shared with the entries
that restore a model from a folder (`runtime.restore_model_weights`).

Multi-worker: every worker must call `save` (the strategy's variables are read collectively);
only the chief writes into the model dir, the others into a scratch folder that is emptied after
each save.
"""

import os
import re
import shutil
import uuid

import numpy as np
import tensorflow as tf
from absl import logging
from google.protobuf import text_format

CHECKPOINT_NAME = "ckpt"
STATE_FILE_NAME = "checkpoint"  # TensorFlow's name for the list of checkpoints


class CheckpointError(RuntimeError):
    """No checkpoint can be restored; the message names each one and why."""


class NonFiniteWeightsError(RuntimeError):
    """A save was refused because the weights are not finite."""


def checkpoint_step(path):
    """The number N of a `.../<name>-N` prefix, or None."""
    match = re.search(r"-(\d+)$", path)
    return int(match.group(1)) if match else None


def find_checkpoints(directory, name=CHECKPOINT_NAME):
    """The checkpoints of `directory` found by their files (`<name>-N.index`), by step.

    Returns:
      [path prefix] sorted by N, oldest first (an index whose data is damaged is still listed:
      restoring it tells).
    """
    pattern = re.compile(rf"^{re.escape(name)}-(\d+)\.index$")
    steps = [int(m.group(1)) for m in map(pattern.match, _listdir(directory)) if m]
    return [os.path.join(directory, f"{name}-{step}") for step in sorted(steps)]


def list_checkpoints(directory, name=CHECKPOINT_NAME):
    """Every checkpoint of `directory`: the state file's list plus those found by their files.

    Returns:
      (paths oldest first, the found paths the state file does not list). With nothing unlisted
      the order is the state file's (the order of the saves); otherwise the union by step.
    """
    state = tf.train.get_checkpoint_state(directory)
    listed = list(state.all_model_checkpoint_paths) if state else []
    if state and state.model_checkpoint_path and state.model_checkpoint_path not in listed:
        listed.append(state.model_checkpoint_path)
    unlisted = [path for path in find_checkpoints(directory, name) if path not in listed]
    if not unlisted:
        return listed, []
    union = sorted(set(listed) | set(unlisted), key=lambda p: (checkpoint_step(p) or -1))
    return union, unlisted


def write_state_file(directory, paths):
    """Rewrites `directory/checkpoint` to list `paths` (oldest first), atomically.

    Timestamps are the index files' modification times; `last_preserved_timestamp` is set
    before all of them, since `CheckpointManager` ignores entries older than it.
    """
    directory = os.path.abspath(directory)
    times = [_mtime(path + ".index") for path in paths]
    state = tf.compat.v1.train.generate_checkpoint_state_proto(
        directory, os.path.basename(paths[-1]),
        all_model_checkpoint_paths=[os.path.basename(p) for p in paths],
        all_model_checkpoint_timestamps=times, last_preserved_timestamp=min(times) - 1.0)
    target = os.path.join(directory, STATE_FILE_NAME)
    temporary = f"{target}.tmp{uuid.uuid4().hex}"  # TensorFlow's own name for it
    with tf.io.gfile.GFile(temporary, "w") as f:
        f.write(text_format.MessageToString(state))
    tf.io.gfile.rename(temporary, target, overwrite=True)


def stale_writes(directory, name=CHECKPOINT_NAME):
    """What killed saves left in `directory`: `<name>-N_temp` folders, `<name>-N*.tempstate*`
    files, `<name>-N.data-*` files whose `<name>-N.index` is missing, and temporary copies of
    the state file (`checkpoint.tmp<hex>`). Returns [path]."""
    names = _listdir(directory)
    indexed = {n[:-len(".index")] for n in names if n.endswith(".index")}
    temp = re.compile(rf"^({re.escape(name)}-\d+(_temp.*|.*\.tempstate\d*)"
                      rf"|{STATE_FILE_NAME}\.tmp[0-9a-f]+)$")
    data = re.compile(rf"^({re.escape(name)}-\d+)\.data-\d+-of-\d+$")
    stale = []
    for entry in sorted(names):
        orphan = data.match(entry)
        if temp.match(entry) or (orphan and orphan.group(1) not in indexed):
            stale.append(os.path.join(directory, entry))
    return stale


def remove_stale_writes(directory, name=CHECKPOINT_NAME):
    """Removes `stale_writes(directory)` with one warning (count, bytes); returns the paths."""
    stale = stale_writes(directory, name)
    if stale:
        size = sum(_size(path) for path in stale)
        logging.warning("removing %d leftover(s) of interrupted checkpoint writes in %s "
                        "(%.1f MB): %s", len(stale), directory, size / 1e6,
                        ", ".join(os.path.basename(p) for p in stale))
        for path in stale:
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    return stale


def restore_newest_readable(paths, restore, where, fatal=()):
    """Restores the newest of `paths` that can be read; the older ones are the fallback.

    Args:
      paths: checkpoint prefixes, oldest first.
      restore: restores one prefix; raises if it cannot.
      where: names the set of checkpoints in the error (e.g. the folder).
      fatal: exception types that end the search at once (a config mismatch: every older
        checkpoint of the run holds the same model, so falling back would only repeat it).
    Returns:
      the restored prefix, or None when `paths` is empty.
    Raises:
      CheckpointError: none can be read; one line naming each and why.
    """
    failures = []
    for path in reversed(list(paths)):
        try:
            restore(path)
        except fatal:
            raise
        # A damaged file surfaces as any of OpError, IndexError, ValueError, DecodeError...
        except Exception as e:  # pylint: disable=broad-except
            reason = (getattr(e, "message", None) or str(e) or "").splitlines()
            reason = reason[0][:300] if reason else ""
            failures.append(f"{path}: {type(e).__name__}: {reason}")
            logging.warning("checkpoint %s cannot be restored (%s: %s); trying the previous "
                            "one", path, type(e).__name__, reason)
            continue
        if failures:
            logging.warning("restored %s after %d unreadable newer checkpoint(s)", path,
                            len(failures))
        return path
    if failures:
        raise CheckpointError(f"no checkpoint in {where} can be restored: "
                              + "; ".join(failures))
    return None


class Checkpointer:
    """`tf.train.Checkpoint` + `CheckpointManager` with fallback restore and non-finite refusal.

    On the chief, construction first removes the leftovers of interrupted saves and rebuilds the
    state file from the checkpoint files when it misses some (see the module docstring); build it
    while holding the model dir's lock (`model_dir_lock`).

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
        if is_chief:
            remove_stale_writes(directory)
            self._adopt_unlisted_checkpoints()
        else:
            shutil.rmtree(target, ignore_errors=True)  # a save of ours killed mid-write
        self.manager = tf.train.CheckpointManager(self.checkpoint, target,
                                                  max_to_keep=max_to_keep,
                                                  checkpoint_name=CHECKPOINT_NAME)
        self._target = target

    def _adopt_unlisted_checkpoints(self):
        """Rewrites the state file when checkpoint files exist that it does not list."""
        paths, unlisted = list_checkpoints(self.directory)
        if not unlisted:
            return
        state = ("missing" if not tf.io.gfile.exists(os.path.join(self.directory,
                                                                  STATE_FILE_NAME))
                 else "incomplete")
        logging.warning("%s: the checkpoint state file is %s; found %d checkpoint(s) it does not "
                        "list (%s), so the list is rebuilt from the files: the run resumes from "
                        "the newest readable one and none is overwritten", self.directory, state,
                        len(unlisted), ", ".join(os.path.basename(p) for p in unlisted))
        write_state_file(self.directory, paths)

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
          the restored path prefix, or None when there is no checkpoint (a fresh run).
        Raises:
          CheckpointError: checkpoints exist but none can be read.
        """
        # Every worker restores from the model dir: a non-chief's manager only knows its
        # scratch folder, which holds nothing between saves.
        paths = (self.manager.checkpoints if self.is_chief
                 else list_checkpoints(self.directory)[0])
        return restore_newest_readable(
            paths,
            lambda path: self.checkpoint.restore(path).assert_existing_objects_matched(),
            self.directory)


def _listdir(directory):
    return os.listdir(directory) if os.path.isdir(directory) else []


def _mtime(path):
    return os.path.getmtime(path) if os.path.exists(path) else 0.0


def _size(path):
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)
