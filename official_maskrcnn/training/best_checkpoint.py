"""The best evaluated checkpoint of a run, kept in `<model dir>/best/` whatever gets pruned.

`best/` holds one checkpoint, `best/ckpt-<step>.*` (its own `checkpoint` state file too, so that
`--checkpoint M/best` and `tf.train.latest_checkpoint` find it), and `best/metrics.json`: the
epoch, the step, the source checkpoint, the run id and both 12-stat dicts of its evaluation.
"Best" is the highest box AP, then the highest mask AP (a tie on both keeps the earlier one);
an evaluation with a NaN AP is never best. `max_checkpoints` prunes only the model dir's own
checkpoints, never this folder.

Two steps, because an evaluation's result can arrive after its checkpoint was pruned
(asynchronous evaluation while training writes step checkpoints): when an evaluation starts,
`reserve` hard-links (or copies, where links are not possible) the files of the checkpoint
holding the weights being evaluated into a hidden `.best-pending-<step>/` folder; when its
result arrives, `offer` either makes that folder the new `best/` or removes it.

Resume: the best so far is read back from `best/metrics.json` when the keeper is built, so an
earlier run's best stays unless a later evaluation beats it. The swap is two renames
(`best/` -> `.best-replaced-<step>/`, the pending folder -> `best/`); what a kill can leave of
it (pending folders; a replaced folder and no `best/`) is put right at start.
"""

import glob
import json
import math
import os
import shutil

from absl import logging

from official_maskrcnn.training import checkpointing

BEST_DIR_NAME = "best"
METRICS_FILE_NAME = "metrics.json"
_PENDING_PREFIX = ".best-pending-"
_REPLACED_PREFIX = ".best-replaced-"


class BestCheckpointError(checkpointing.CheckpointError):
    """`best/metrics.json` exists but cannot be read; the message names the file."""


def rank(metrics):
    """The sort key of an evaluation: (box AP, mask AP); None when either is NaN or missing."""
    try:
        key = (float(metrics["bbox"]["AP"]), float(metrics["segm"]["AP"]))
    except (KeyError, TypeError, ValueError):
        return None
    return None if any(math.isnan(value) for value in key) else key


class BestCheckpoint:
    """Keeps `<model_dir>/best/` (see the module docstring); build it on the chief only.

    Args:
      model_dir: the run's folder, whose checkpoints are `ckpt-<step>`.
      run_id: the run's id, written into `best/metrics.json`.
    Attributes:
      best: the `best/metrics.json` record ({"epoch", "step", "bbox", "segm", ...}), None
        before the first eligible evaluation.
    Raises:
      BestCheckpointError: `best/metrics.json` is not a JSON record with both APs.
    """

    def __init__(self, model_dir, run_id=None):
        self.model_dir = model_dir
        self.run_id = run_id
        self.directory = os.path.join(model_dir, BEST_DIR_NAME)
        self._recover()
        self.best = self._read()

    @property
    def metrics_path(self):
        return os.path.join(self.directory, METRICS_FILE_NAME)

    def reserve(self, step):
        """Keeps the files of checkpoint `ckpt-<step>` (the weights an evaluation starting now
        sees) until `offer` decides; returns the pending folder, or None (with a warning) when
        the model dir holds no such checkpoint."""
        source = os.path.join(self.model_dir, f"{checkpointing.CHECKPOINT_NAME}-{step}")
        files = glob.glob(glob.escape(source) + ".*")
        if not os.path.exists(source + ".index"):
            logging.warning("best checkpoint: no checkpoint %s to keep for the evaluation "
                            "starting now; it cannot become best/", source)
            return None
        pending = os.path.join(self.model_dir, f"{_PENDING_PREFIX}{step}")
        shutil.rmtree(pending, ignore_errors=True)
        os.makedirs(pending)
        for path in files:
            target = os.path.join(pending, os.path.basename(path))
            try:
                os.link(path, target)  # no copy: the bytes stay shared until pruned
            except OSError:
                shutil.copy2(path, target)
        checkpointing.write_state_file(pending, [os.path.join(pending,
                                                              os.path.basename(source))])
        return pending

    def offer(self, pending, epoch_num, metrics):
        """The result of the evaluation that `reserve` returned `pending` for: makes it
        `best/` when it ranks above the best so far, else drops it; returns whether it did."""
        if pending is None:
            return False
        key, best_key = rank(metrics), rank(self.best) if self.best else None
        if key is None or (best_key is not None and key <= best_key):
            if key is None:
                logging.warning("best checkpoint: epoch %d has a NaN AP; never best",
                                epoch_num)
            shutil.rmtree(pending, ignore_errors=True)
            return False
        step = checkpointing.checkpoint_step(pending)
        record = {"epoch": epoch_num, "step": step, "run_id": self.run_id,
                  "checkpoint": os.path.join(self.directory,
                                             f"{checkpointing.CHECKPOINT_NAME}-{step}"),
                  "source": os.path.join(self.model_dir,
                                         f"{checkpointing.CHECKPOINT_NAME}-{step}"),
                  "bbox": metrics["bbox"], "segm": metrics["segm"]}
        with open(os.path.join(pending, METRICS_FILE_NAME), "w") as f:
            json.dump(record, f, indent=1)
        self._swap_in(pending, step)
        self.best = record
        logging.info("best checkpoint: epoch %d (step %d), box AP %.4f, mask AP %.4f -> %s",
                     epoch_num, step, key[0], key[1], self.directory)
        return True

    def _swap_in(self, pending, step):
        replaced = os.path.join(self.model_dir, f"{_REPLACED_PREFIX}{step}")
        if os.path.isdir(self.directory):
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(self.directory, replaced)
        os.rename(pending, self.directory)
        shutil.rmtree(replaced, ignore_errors=True)

    def _recover(self):
        """Undoes what a kill left: a replaced best/ without its successor comes back;
        pending and replaced folders go."""
        replaced = sorted(glob.glob(os.path.join(glob.escape(self.model_dir),
                                                 _REPLACED_PREFIX + "*")))
        if replaced and not os.path.isdir(self.directory):
            os.rename(replaced.pop(), self.directory)
        for path in replaced + glob.glob(os.path.join(glob.escape(self.model_dir),
                                                      _PENDING_PREFIX + "*")):
            shutil.rmtree(path, ignore_errors=True)

    def _read(self):
        if not os.path.exists(self.metrics_path):
            return None
        try:
            with open(self.metrics_path, encoding="utf-8") as f:
                record = json.load(f)
            if not isinstance(record, dict) or rank(record) is None:
                raise ValueError("expected a record with bbox.AP and segm.AP numbers")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise BestCheckpointError(
                f"{self.metrics_path}: cannot read the best checkpoint's metrics ({e}); "
                f"fix or remove {self.directory}") from None
        return record
