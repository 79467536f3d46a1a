"""Bounded NaN recovery (`run.nan_recovery_trials`): the run's record of recoveries and its report.

The recovery itself is the loop's (`trainer.Trainer`, module docstring): a non-finite step
restores the newest checkpoint, the run's recovery count r goes up by one, the sampling seed is
shifted by r and training goes on from the restored step. This module keeps what outlives the
process:

  - `RecoveryLog`, a `trainer.Hook` whose `after_recovery` prints one console line, appends one
    JSON line to `<model_dir>/nan_recoveries.jsonl` (the record) and writes a `nan_recovery`
    event into `mlperf.log` (not a key of the rules: the 3.1.0 checker ignores it, tested).
  - `recoveries_done(model_dir)`: r so far, the record's lines. `train.py` hands it to the
    Trainer, so that a resumed process (preemption, a rerun of the command) continues the count:
    K bounds the whole run, and the seed shift goes on where it was, which keeps a resumed run
    sampling as the uninterrupted one. To allow more recoveries, raise K: the recorded ones
    count against it.

The record is written before training goes on, so a kill right after a recovery keeps it.
"""

import json
import math
import os
import sys
import time

from absl import logging

from official_maskrcnn.training.trainer import ALL_LOSSES, Hook

RECORD_FILE_NAME = "nan_recoveries.jsonl"


def record_path(model_dir):
    return os.path.join(model_dir, RECORD_FILE_NAME)


def read_records(model_dir):
    """The recoveries recorded in `model_dir` (dicts, oldest first); a torn line (a kill while
    it was written) is skipped with a warning: that recovery is not counted."""
    path = record_path(model_dir)
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                logging.warning("%s: line %d is not JSON (torn by a kill?); skipped", path,
                                number)
    return records


def recoveries_done(model_dir):
    """How many NaN recoveries the run in `model_dir` used before this process."""
    return len(read_records(model_dir))


def describe(recovery):
    """The console line of a `trainer.Recovery`."""
    losses = ", ".join(f"{key}={recovery.losses[key]:.6g}" for key in ALL_LOSSES
                       if key in recovery.losses)
    gradients = "finite" if recovery.losses.get("gradients_finite") == 1.0 else "NOT finite"
    return (f"nan recovery {recovery.trial} of {recovery.trials}: step {recovery.failed_step} "
            f"(epoch {recovery.failed_epoch}) was not finite ({losses}; gradients {gradients}) "
            f"and was not applied; restored {recovery.checkpoint} (step {recovery.restored_step}"
            f"), training again from epoch {recovery.restored_epoch}, batch "
            f"{recovery.restored_batch} with the sampling seed shifted by {recovery.trial}")


def _json_number(value):
    """A float for JSON: NaN and Inf as the strings "nan", "inf", "-inf" (strict readers
    such as jq refuse the bare tokens Python would write)."""
    return value if math.isfinite(value) else str(value)


class RecoveryLog(Hook):
    """Reports each NaN recovery: console line, record line, MLPerf-neutral log event.

    Args:
      model_dir: the record's folder; None: no record (non-chief workers).
      mllog: the run's `mlperf_logger.MLPerfLogger` (disabled on non-chief workers), or None.
      stream: where the console line goes (None: absl's log, as on non-chief workers).
      run_id: written into each record line.
    """

    def __init__(self, model_dir=None, mllog=None, stream=sys.stdout, run_id=None):
        self.model_dir = model_dir
        self.mllog = mllog
        self.stream = stream
        self.run_id = run_id

    def after_recovery(self, recovery):
        line = describe(recovery)
        if self.stream is None:
            logging.warning("%s", line)
        else:
            print(line, file=self.stream, flush=True)
        if self.model_dir is not None:
            self._append_record(recovery)
        if self.mllog is not None:
            self.mllog.nan_recovery(failed_step=recovery.failed_step,
                                    restored_step=recovery.restored_step,
                                    trial=recovery.trial, trials=recovery.trials)

    def _append_record(self, recovery):
        record = {
            "trial": recovery.trial, "trials": recovery.trials,
            "failed_step": recovery.failed_step, "failed_epoch": recovery.failed_epoch,
            "losses": {key: _json_number(value) for key, value in recovery.losses.items()},
            "learning_rate": _json_number(recovery.learning_rate),
            "checkpoint": recovery.checkpoint, "restored_step": recovery.restored_step,
            "restored_epoch": recovery.restored_epoch,
            "restored_batch": recovery.restored_batch, "seed_shift": recovery.trial,
            "run_id": self.run_id, "time": time.time(),
        }
        with open(record_path(self.model_dir), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
