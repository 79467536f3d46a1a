"""COCO evaluation after every epoch, with the MLPerf log lines and the stop at the target.

Synchronous (the reference): at the end of epoch e, inference on the eval set, then pasting, RLE
and COCOeval; training waits. Asynchronous (beyond the reference; one worker only): inference
still runs at the epoch end (it needs the accelerators and the weights of that epoch), but the
CPU-heavy part runs in the background while training goes on; each result is logged with the
epoch it belongs to as soon as it is ready (checked after every host call), the run stops at the
next step boundary after a result that meets both targets, and pending evaluations are awaited at
the end of training. Either way evaluation time stays on the MLPerf clock.

Outputs: `eval_start` / `eval_accuracy` {"BBOX", "SEGM"} / `eval_stop` (metadata epoch_num) in the
MLPerf log, one JSON line per evaluation in `metrics.jsonl`, with the run's id, and, given
`summaries`, the stats and a few drawn val images as TensorBoard events at the step of the
evaluated checkpoint (`eval_summaries`).

An epoch's evaluation is part of the epoch, but the epoch-end checkpoint is written before it
(and, async, training goes on while it runs): a run killed in between resumes after that epoch.
`metrics.jsonl` is the record of which evaluations have a result, written when the result is
logged; a resumed run reads it (`read_results`), runs first the evaluations its epoch-end
checkpoints lack (`evaluations_to_redo`, with each epoch's own weights) and counts the earlier
results toward the target (`add_earlier_results`), so that it stops, or trains on, exactly as
an uninterrupted run would. A line is appended whole; a line torn by a kill is skipped.
"""

import concurrent.futures
import dataclasses
import json
import os
import time

import tf_keras
from absl import logging

from official_maskrcnn.evaluation import coco_metrics

BOX_TARGET = 0.377
MASK_TARGET = 0.339


@dataclasses.dataclass
class _Pending:
    """An evaluation whose inference is done and whose result is not logged yet."""
    epoch_num: int
    future: concurrent.futures.Future  # of (metrics, results)
    started: float  # time.perf_counter() at its start
    inference_seconds: float
    reservation: object  # best.reserve's, None without `best`
    evaluated_step: int  # the step of the checkpoint holding the evaluated weights
    pictures: dict  # summaries.draw's, None without `summaries`


class COCOEvalCallback(tf_keras.callbacks.Callback):
    """Evaluates every `interval` epochs; sets `model.stop_training` once the targets are met.

    Args:
      evaluator: `evaluator.Evaluator` (inference).
      postprocessor: `evaluator.PostProcessor` (results and metrics).
      mlperf: optional `MLPerfLogger`.
      metrics_path: optional path of the `metrics.jsonl` to append to (None: no file).
      interval: evaluate after epochs interval, 2 * interval, ... (1-based).
      box_target, mask_target: the accuracy targets (box AP, mask AP).
      asynchronous: post-process in the background (see the module docstring).
      stream: where the stats tables are printed (None: not printed).
      run_id: the run's id (`train.new_run_id`), written into each `metrics.jsonl` line as in
        the MLPerf log's metadata, so that the lines of a resumed run can be told apart.
      best: optional keeper of the best checkpoint (`training.best_checkpoint.BestCheckpoint`):
        `best.reserve(step)` when an evaluation of the weights of checkpoint `step` starts,
        `best.offer(reservation, epoch_num, metrics)` when its result is logged.
      summaries: optional `eval_summaries.EvalSummaries`: `draw(outputs)` when the inference
        is done, `write(step, metrics, pictures)` when the result is logged, `step` that of
        the evaluated checkpoint.
    Attributes:
      history: [(epoch_num, metrics)] in the order the results arrived.
      earlier: {epoch_num: metrics} logged by earlier runs in this model dir
        (`add_earlier_results`).
      targets_met: (read-only) whether a result in `history` or `earlier` met both targets.
    """

    def __init__(self, evaluator, postprocessor, mlperf=None, metrics_path=None, interval=1,
                 box_target=BOX_TARGET, mask_target=MASK_TARGET, asynchronous=False,
                 stream=None, run_id=None, best=None, summaries=None):
        super().__init__()
        if interval < 1:
            raise ValueError(f"eval interval must be >= 1, found {interval}")
        self.evaluator = evaluator
        self.postprocessor = postprocessor
        self.mlperf = mlperf
        self.metrics_path = metrics_path
        self.interval = interval
        self.box_target = box_target
        self.mask_target = mask_target
        self.asynchronous = asynchronous
        self.stream = stream
        self.run_id = run_id
        self.best = best
        self.summaries = summaries
        self.history = []
        self.earlier = {}
        self._pending = []  # _Pending, oldest first
        self._stall = {}  # epoch_num -> seconds training waited at that epoch's end
        self._step = 0

    @property
    def targets_met(self):
        """Whether an evaluation logged so far, by this run or an earlier one in the model dir,
        met both targets (the run's MLPerf success)."""
        return any(self._meets_targets(metrics) for metrics in
                   [metrics for _, metrics in self.history] + list(self.earlier.values()))

    def add_earlier_results(self, results):
        """Counts results that earlier runs logged (`read_results`) toward the target: a run
        killed after its target was met must not train on when resumed."""
        self.earlier.update(results)

    def _meets_targets(self, metrics):
        return (metrics["bbox"]["AP"] >= self.box_target
                and metrics["segm"]["AP"] >= self.mask_target)

    # --------------------------------------------------------------- Keras hooks

    def on_train_begin(self, logs=None):
        # The Trainer clears stop_training before this: a target met before (a redone
        # evaluation, an earlier run) ends the run here, before any step.
        if self.targets_met and self.model is not None:
            self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        self._step = (logs or {}).get("step", batch + 1)
        self._collect(wait=False)

    def on_epoch_end(self, epoch, logs=None):
        epoch_num = epoch + 1
        if epoch_num % self.interval or (self.model is not None and self.model.stop_training):
            return  # not this epoch, or the run stopped inside it (a target met, a signal)
        self.evaluate(epoch_num)

    def on_train_end(self, logs=None):
        self._collect(wait=True)
        if self.summaries is not None:
            self.summaries.close()

    # --------------------------------------------------------------- the work

    def evaluate(self, epoch_num, step=None, checkpoint_step=None):
        """Runs (or starts) the evaluation of `epoch_num` with the model's current weights.

        Args:
          epoch_num: the 1-based epoch whose end weights the model holds.
          step: the global step now (None: the last one seen at a batch end); recorded as
            `step_logged` when the result is logged at once (sync).
          checkpoint_step: the step of the checkpoint holding those weights (None: the step
            now, as at an epoch's end, whose checkpoint is written before its evaluation).
        """
        if step is not None:
            self._step = step
        evaluated_step = int(self._step if checkpoint_step is None else checkpoint_step)
        reservation = self.best.reserve(evaluated_step) if self.best is not None else None
        started = time.perf_counter()
        if self.mlperf:
            self.mlperf.eval_start(epoch_num)
        outputs = self.evaluator.predict()
        future = self.postprocessor.submit(outputs)
        inference_seconds = time.perf_counter() - started
        pictures = self.summaries.draw(outputs) if self.summaries is not None else None
        if not self.asynchronous:
            concurrent.futures.wait([future])
        # Training waits this long here: inference, plus post-processing when synchronous.
        self._stall[epoch_num] = time.perf_counter() - started
        self._pending.append(_Pending(epoch_num, future, started, inference_seconds,
                                      reservation, evaluated_step, pictures))
        self._collect(wait=not self.asynchronous)

    def _collect(self, wait):
        """Logs every finished evaluation (all of them when `wait`), in epoch order."""
        while self._pending:
            pending = self._pending[0]
            if not wait and not pending.future.done():
                return
            self._pending.pop(0)
            metrics, _ = pending.future.result()
            self._finish(pending.epoch_num, metrics, time.perf_counter() - pending.started,
                         pending.inference_seconds)
            if self.summaries is not None:
                self.summaries.write(pending.evaluated_step, metrics, pending.pictures)
            if self.best is not None:
                self.best.offer(pending.reservation, pending.epoch_num, metrics)

    def _finish(self, epoch_num, metrics, seconds, inference_seconds):
        box, mask = metrics["bbox"]["AP"], metrics["segm"]["AP"]
        if self.mlperf:
            self.mlperf.eval_accuracy(epoch_num, bbox=box, segm=mask)
            self.mlperf.eval_stop(epoch_num)
        met = self._meets_targets(metrics)
        first_met = met and not self.targets_met
        record = {"epoch": epoch_num, "run_id": self.run_id, "step_logged": int(self._step),
                  "bbox": metrics["bbox"],
                  "segm": metrics["segm"], "targets_met": met,
                  "seconds": {"inference": inference_seconds,
                              "postprocess": metrics.get("seconds", {}),
                              "since_start": seconds,
                              "training_stall": self._stall.get(epoch_num)},
                  "asynchronous": self.asynchronous,
                  "coco_backend": metrics.get("coco_backend"),
                  "num_images": metrics.get("num_images")}
        self.history.append((epoch_num, metrics))
        if self.metrics_path:
            append_json_line(self.metrics_path, record)
        if self.stream:
            print(f"eval after epoch {epoch_num}: box AP {box:.4f}, mask AP {mask:.4f} "
                  f"(targets {self.box_target} / {self.mask_target}{', MET' if met else ''}; "
                  f"{seconds:.1f} s)\n{coco_metrics.format_stats_table(metrics)}",
                  file=self.stream, flush=True)
        logging.info("eval epoch %d: box AP %.4f mask AP %.4f", epoch_num, box, mask)
        if first_met and self.model is not None:
            self.model.stop_training = True


# ------------------------------------------------------------------- metrics.jsonl and resume


def append_json_line(path, record):
    """Appends `record` as one JSON line, in one write; after a line torn by a kill (the file
    does not end with a newline) it starts a line of its own, so that it stays readable."""
    line = (json.dumps(record) + "\n").encode()
    with open(path, "ab+") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)


def read_results(metrics_path):
    """{epoch_num: {"bbox": stats, "segm": stats}} of the evaluations logged in `metrics_path`
    (a later line of an epoch wins); {} when there is no such file.

    A line that is not a complete JSON record (a write cut by a kill) is skipped with a warning
    naming it: its evaluation has no result, so a resumed run redoes it.
    """
    if not os.path.exists(metrics_path):
        return {}
    results, skipped = {}, []
    with open(metrics_path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                results[int(record["epoch"])] = {key: record[key] for key in ("bbox", "segm")}
            except (ValueError, TypeError, KeyError):
                if line.strip():
                    skipped.append(number)
    if skipped:
        logging.warning("%s: skipped %d line(s) that are not complete evaluation records (a "
                        "write cut short by a kill?): line %s", metrics_path, len(skipped),
                        ", ".join(map(str, skipped)))
    return results


def evaluations_to_redo(checkpoint_steps, results, steps_per_epoch, total_steps, interval=1):
    """The evaluations a resumed run lacks: [(epoch_num, step)], oldest first.

    An epoch's evaluation is due when the epoch ended (its end checkpoint exists) and the
    interval selects it; it lacks a result when no result of it or of a later epoch was logged
    (results arrive in epoch order, so the evaluations lost to a kill are those after the
    newest result; an epoch of a run that had evaluation off is not evaluated afterwards).

    Args:
      checkpoint_steps: the steps of the checkpoints available up to the restored one.
      results: {epoch_num: ...} logged so far (`read_results`).
      steps_per_epoch: steps of one epoch.
      total_steps: the run's last step: an epoch cut short by max_steps ends there, and is
        numbered as the run numbers it (the epoch it lies in).
      interval: the eval interval in epochs.
    Returns:
      (epoch_num, step of its epoch-end checkpoint) for each such evaluation.
    """
    newest = max(results, default=0)
    lost = []
    for step in sorted(set(checkpoint_steps)):
        if step % steps_per_epoch and step != total_steps:
            continue  # inside an epoch
        epoch_num = -(-step // steps_per_epoch)
        if epoch_num > newest and epoch_num % interval == 0:
            lost.append((epoch_num, step))
    return lost
