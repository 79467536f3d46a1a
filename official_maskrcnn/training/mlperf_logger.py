"""The MLPerf compliance log of a run (`<model_dir>/mlperf.log`) and the 3.1.0 checker.

This is the only module of the project that imports `mlperf_logging.mllog`; everything else logs
through `MLPerfLogger`, whose methods name the benchmark's events and take plain values, so the
key names and metadata the checker wants live in one place. `mlperf_compliance` runs the
checker on a written log.

mllog keeps one process-global logger (`mllog.config(...)`, `mllog.get_mllogger()`). We do not use
it: each `MLPerfLogger` builds its own `mllog.MLLogger` on top of a private `logging.Logger` with
its own file handler, so two loggers in one process (tests, an evaluator beside a trainer) never
write into each other's files.

What the 3.1.0 checker requires of a maskrcnn log (training_3.1.0/common.yaml, closed_common.yaml,
closed_maskrcnn.yaml):
  - exactly one each of submission_benchmark ("maskrcnn"), submission_org (non-empty),
    submission_division ("closed" | "open"), submission_platform (non-empty), submission_status
    ("cloud" | "onprem" | "preview" | "research");
  - at least one cache_clear (with a value), then init_start; exactly one init_stop, at most
    30 min (closed) after the first init_start; exactly one run_start after init_stop and one
    run_stop with metadata.status;
  - epoch_start / epoch_stop with metadata.epoch_num (or block_start / block_stop with
    metadata.first_epoch_num and epoch_count > 0);
  - eval_start / eval_stop with metadata.epoch_num; eval_accuracy with value {"BBOX", "SEGM"} and
    metadata.epoch_num, at least one with BBOX >= 0.377 and SEGM >= 0.339 (closed division);
  - exactly one each of train_samples, eval_samples, gradient_accumulation_steps (> 0),
    global_batch_size (> 0), opt_base_learning_rate (0.02 * K, or 0.02 / K below batch 16),
    opt_learning_rate_warmup_steps (>= 0), opt_learning_rate_warmup_factor (> 0),
    num_image_candidates (a multiple of 1000), opt_learning_rate_decay_factor (== 0.1),
    opt_learning_rate_decay_steps (a list of two), min_image_size, max_image_size (>= 0).
  `seed` is not checked but every MLPerf reference logs it, so we do too.

Usage (chief worker only writes; the others pass enabled=False and every call is a no-op):

    mllogger = MLPerfLogger(os.path.join(model_dir, "mlperf.log"), enabled=is_chief)
    mllogger.cache_clear()
    mllogger.init_start()
    ...
    mllogger.eval_accuracy(epoch_num=3, bbox=0.38, segm=0.34)
    mllogger.run_stop(success=True)
"""

import logging
import os
import sys
from typing import Any, Mapping, Optional, Sequence

from mlperf_logging.mllog import constants
from mlperf_logging.mllog.mllog import MLLogger

LOG_FILE_NAME = "mlperf.log"

# Not a key of the rules: a bounded NaN recovery (`run.nan_recovery_trials`), beyond the
# reference. The 3.1.0 checker ignores keys it does not know (tested), so the note leaves the
# log's verdict alone.
NAN_RECOVERY = "nan_recovery"

# Values the 3.1.0 checker accepts for which mllog has no constants.
_SUBMISSION_STATUSES = ("cloud", "onprem", "preview", "research")
_DIVISIONS = ("closed", "open")

# Public method -> _emit -> MLLogger.event/start/end -> _log_helper -> get_caller. With this offset
# mllog's "file"/"lineno" metadata names the code that called the public method, not this module.
_CALLER_STACK_OFFSET = 3


class MLPerfLogger:
    """Writes `:::MLLOG {...}` lines for one run to one file, appending.

    Appending means a resumed run continues the log of the run it resumes. Such a log fails the
    checker (its second init_start and init_stop come after run_start), which is right: a resumed
    run is not a valid timed result, and the log keeps the evidence instead of hiding it.

    Every write is flushed at once, so a crash loses no line already logged.
    """

    def __init__(self, path: str, enabled: bool = True, stdout: bool = False,
                 run_id: Optional[str] = None):
        """Opens `path` for appending (creating its folder) unless disabled.

        Args:
            path: the log file, normally `<model_dir>/mlperf.log`. A local path: the file is
                appended to line by line, which object stores do not support.
            enabled: False on every worker but the chief; then nothing is opened or written.
            stdout: also print each line to stdout (MLPerf harnesses collect stdout too).
            run_id: written into the metadata of every line (`metadata.run_id`), so that the
                lines of each run in an appended log (a resumed run) can be told apart. The
                3.1.0 checker ignores metadata keys it does not know (tested).
        """
        self.path = path
        self.enabled = enabled
        self.run_id = run_id
        self._handlers = []
        self._mllogger = None
        if not enabled:
            return
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        # A Logger made directly (not through logging.getLogger) is not registered in the
        # global logging tree: it has no parent, so nothing propagates to the root logger and
        # no other code can fetch it by name and add handlers to it.
        logger = logging.Logger(f"mlperf_logger:{os.path.abspath(path)}", level=logging.INFO)
        self._handlers.append(logging.FileHandler(path, mode="a", encoding="utf-8"))
        if stdout:
            self._handlers.append(logging.StreamHandler(sys.stdout))
        for handler in self._handlers:
            handler.setLevel(logging.INFO)
            logger.addHandler(handler)
        self._mllogger = MLLogger(logger=logger, default_stack_offset=_CALLER_STACK_OFFSET)

    # -- lifecycle of the object -------------------------------------------------------------

    def close(self) -> None:
        """Closes the file; later calls become no-ops."""
        for handler in self._handlers:
            handler.close()
        self._handlers = []
        self._mllogger = None

    def __enter__(self) -> "MLPerfLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- the generic writer ------------------------------------------------------------------

    def event(self, key: str, value: Any = None, metadata: Optional[Mapping] = None) -> None:
        """Logs a POINT_IN_TIME event `key` (any mllog key) with a JSON-serialisable value."""
        self._emit(constants.POINT_IN_TIME, key, value, metadata)

    def _emit(self, event_type: str, key: str, value: Any = None,
              metadata: Optional[Mapping] = None) -> None:
        """Writes one line of `event_type` (POINT_IN_TIME, INTERVAL_START or INTERVAL_END)."""
        if self._mllogger is None:
            return
        if metadata is not None and not isinstance(metadata, Mapping):
            # mllog would write a non-MLLOG warning line into the file instead; fail here.
            raise TypeError(f"mlperf log '{key}': metadata must be a mapping, found "
                            f"{type(metadata).__name__}")
        metadata = dict(metadata) if metadata else {}
        if self.run_id is not None:
            metadata["run_id"] = self.run_id
        metadata = metadata or None
        if event_type == constants.INTERVAL_START:
            self._mllogger.start(key, value, metadata=metadata)
        elif event_type == constants.INTERVAL_END:
            self._mllogger.end(key, value, metadata=metadata)
        else:
            self._mllogger.event(key, value, metadata=metadata)

    # -- submission and run ------------------------------------------------------------------

    def submission_info(self, org: str, division: str, platform: str, status: str,
                        benchmark: str = constants.MASKRCNN) -> None:
        """Logs the five submission_* events the checker requires exactly once each.

        Args:
            org: the submitting organisation (non-empty).
            division: "closed" (reference hyperparameters, accuracy target enforced) or "open".
            platform: the system name (non-empty), e.g. "1xA100-80GB".
            status: "cloud", "onprem", "preview" or "research".
            benchmark: the benchmark name; "maskrcnn" for this project.
        """
        if division not in _DIVISIONS:
            raise ValueError(f"submission_division: expected one of {_DIVISIONS}, found "
                             f"{division!r}")
        if status not in _SUBMISSION_STATUSES:
            raise ValueError(f"submission_status: expected one of {_SUBMISSION_STATUSES}, "
                             f"found {status!r}")
        self._emit(constants.POINT_IN_TIME, constants.SUBMISSION_BENCHMARK, benchmark)
        self._emit(constants.POINT_IN_TIME, constants.SUBMISSION_ORG, org)
        self._emit(constants.POINT_IN_TIME, constants.SUBMISSION_DIVISION, division)
        self._emit(constants.POINT_IN_TIME, constants.SUBMISSION_PLATFORM, platform)
        self._emit(constants.POINT_IN_TIME, constants.SUBMISSION_STATUS, status)

    def cache_clear(self) -> None:
        """Logs that the caches were cleared before the run (the checker wants a value)."""
        self._emit(constants.POINT_IN_TIME, constants.CACHE_CLEAR, True)

    def init_start(self) -> None:
        """Start of initialisation (model build, compilation); not yet timed."""
        self._emit(constants.INTERVAL_START, constants.INIT_START)

    def init_stop(self) -> None:
        """End of initialisation; at most 30 minutes after the first init_start (closed)."""
        self._emit(constants.INTERVAL_END, constants.INIT_STOP)

    def run_start(self) -> None:
        """The clock starts: nothing may have touched the dataset before this line."""
        self._emit(constants.INTERVAL_START, constants.RUN_START)

    def run_stop(self, success: bool) -> None:
        """The clock stops; metadata.status is "success" (target reached) or "aborted"."""
        status = constants.SUCCESS if success else constants.ABORTED
        self._emit(constants.INTERVAL_END, constants.RUN_STOP, None,
                   {constants.STATUS: status})

    # -- hyperparameters ---------------------------------------------------------------------

    def hyperparameters(self, global_batch_size: int, train_samples: int, eval_samples: int,
                        base_learning_rate: float, warmup_steps: int, warmup_factor: float,
                        decay_steps: Sequence[int], decay_factor: float,
                        num_image_candidates: int, min_image_size: int, max_image_size: int,
                        seed: int, gradient_accumulation_steps: int = 1) -> None:
        """Logs each hyperparameter the maskrcnn rules check, one event each.

        Args:
            global_batch_size: images per optimizer step over all replicas.
            train_samples: images in one training epoch (117,266 for COCO train2017).
            eval_samples: images evaluated each epoch (5,000 for val2017).
            base_learning_rate: the peak learning rate after warmup (0.02 per 16 images).
            warmup_steps: linear warmup length in optimizer steps.
            warmup_factor: the warmup's starting fraction of the base rate (1/3 in Detectron).
            decay_steps: the two optimizer steps at which the rate is multiplied by decay_factor.
            decay_factor: the multiplier at each decay step (the rules require 0.1).
            num_image_candidates: RPN proposals kept after NMS in training (multiple of 1000).
            min_image_size: target length of the shorter image side (800).
            max_image_size: limit of the longer image side (1333).
            seed: the run's random seed.
            gradient_accumulation_steps: micro-batches summed into one optimizer step.

        Raises:
            ValueError: decay_steps does not hold exactly two steps.
        """
        decay_steps = [int(step) for step in decay_steps]
        if len(decay_steps) != 2:
            raise ValueError(f"opt_learning_rate_decay_steps: expected two steps, found "
                             f"{decay_steps}")
        values = {
            constants.GLOBAL_BATCH_SIZE: int(global_batch_size),
            constants.TRAIN_SAMPLES: int(train_samples),
            constants.EVAL_SAMPLES: int(eval_samples),
            constants.GRADIENT_ACCUMULATION_STEPS: int(gradient_accumulation_steps),
            constants.OPT_BASE_LR: float(base_learning_rate),
            constants.OPT_LR_WARMUP_STEPS: int(warmup_steps),
            constants.OPT_LR_WARMUP_FACTOR: float(warmup_factor),
            constants.OPT_LR_DECAY_STEPS: decay_steps,
            constants.OPT_LR_DECAY_FACTOR: float(decay_factor),
            constants.NUM_IMAGE_CANDIDATES: int(num_image_candidates),
            constants.MIN_IMAGE_SIZE: int(min_image_size),
            constants.MAX_IMAGE_SIZE: int(max_image_size),
            constants.SEED: int(seed),
        }
        for key, value in values.items():
            self._emit(constants.POINT_IN_TIME, key, value)

    # -- epochs, blocks, evaluation (epochs are numbered from 1 by the caller) ----------------

    def epoch_start(self, epoch_num: int) -> None:
        """Start of training epoch `epoch_num` (1-based)."""
        self._emit(constants.INTERVAL_START, constants.EPOCH_START, None,
                   {constants.EPOCH_NUM: int(epoch_num)})

    def epoch_stop(self, epoch_num: int) -> None:
        """End of training epoch `epoch_num` (1-based)."""
        self._emit(constants.INTERVAL_END, constants.EPOCH_STOP, None,
                   {constants.EPOCH_NUM: int(epoch_num)})

    def block_start(self, first_epoch_num: int, epoch_count: int) -> None:
        """Start of a block of `epoch_count` epochs trained between two evaluations."""
        self._emit(constants.INTERVAL_START, constants.BLOCK_START, None,
                   {constants.FIRST_EPOCH_NUM: int(first_epoch_num),
                    constants.EPOCH_COUNT: int(epoch_count)})

    def block_stop(self, first_epoch_num: int) -> None:
        """End of the block that started at `first_epoch_num`."""
        self._emit(constants.INTERVAL_END, constants.BLOCK_STOP, None,
                   {constants.FIRST_EPOCH_NUM: int(first_epoch_num)})

    def eval_start(self, epoch_num: int) -> None:
        """Start of the evaluation after epoch `epoch_num`."""
        self._emit(constants.INTERVAL_START, constants.EVAL_START, None,
                   {constants.EPOCH_NUM: int(epoch_num)})

    def eval_stop(self, epoch_num: int) -> None:
        """End of the evaluation after epoch `epoch_num`."""
        self._emit(constants.INTERVAL_END, constants.EVAL_STOP, None,
                   {constants.EPOCH_NUM: int(epoch_num)})

    def nan_recovery(self, failed_step: int, restored_step: int, trial: int,
                     trials: int) -> None:
        """A non-finite step `failed_step` (1-based) was undone by restoring the checkpoint of
        step `restored_step`: recovery `trial` of `trials` (`NAN_RECOVERY`, not a rules key)."""
        self._emit(constants.POINT_IN_TIME, NAN_RECOVERY,
                   {"failed_step": int(failed_step), "restored_step": int(restored_step),
                    "trial": int(trial), "trials": int(trials)})

    def eval_accuracy(self, epoch_num: int, bbox: float, segm: float) -> None:
        """COCO box and mask mAP (IoU 0.50:0.95) after epoch `epoch_num`."""
        self._emit(constants.POINT_IN_TIME, constants.EVAL_ACCURACY,
                   {"BBOX": float(bbox), "SEGM": float(segm)},
                   {constants.EPOCH_NUM: int(epoch_num)})
