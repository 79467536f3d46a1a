"""COCO evaluation after every epoch, with the MLPerf log lines and the stop at the target.

Synchronous (the reference): at the end of epoch e, inference on the eval set, then pasting, RLE
and COCOeval; training waits. Asynchronous (beyond the reference; one worker only): inference
still runs at the epoch end (it needs the accelerators and the weights of that epoch), but the
CPU-heavy part runs in the background while training goes on; each result is logged with the
epoch it belongs to as soon as it is ready (checked after every host call), the run stops at the
next step boundary after a result that meets both targets, and pending evaluations are awaited at
the end of training. Either way evaluation time stays on the MLPerf clock.

Outputs: `eval_start` / `eval_accuracy` {"BBOX", "SEGM"} / `eval_stop` (metadata epoch_num) in the
MLPerf log, and one JSON line per evaluation in `metrics.jsonl`.
"""

import concurrent.futures
import json
import time

import tf_keras
from absl import logging

from official_maskrcnn.evaluation import coco_metrics

BOX_TARGET = 0.377
MASK_TARGET = 0.339


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
    Attributes:
      history: [(epoch_num, metrics)] in the order the results arrived.
      targets_met: (read-only) whether a result in `history` met both targets.
    """

    def __init__(self, evaluator, postprocessor, mlperf=None, metrics_path=None, interval=1,
                 box_target=BOX_TARGET, mask_target=MASK_TARGET, asynchronous=False,
                 stream=None):
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
        self.history = []
        self._pending = []  # (epoch_num, future, started, inference seconds)
        self._stall = {}  # epoch_num -> seconds training waited at that epoch's end
        self._step = 0

    @property
    def targets_met(self):
        """Whether an evaluation logged so far met both targets (the run's MLPerf success)."""
        return any(self._meets_targets(metrics) for _, metrics in self.history)

    def _meets_targets(self, metrics):
        return (metrics["bbox"]["AP"] >= self.box_target
                and metrics["segm"]["AP"] >= self.mask_target)

    # --------------------------------------------------------------- Keras hooks

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

    # --------------------------------------------------------------- the work

    def evaluate(self, epoch_num):
        """Runs (or starts) the evaluation of `epoch_num`."""
        started = time.perf_counter()
        if self.mlperf:
            self.mlperf.eval_start(epoch_num)
        outputs = self.evaluator.predict()
        future = self.postprocessor.submit(outputs)
        inference_seconds = time.perf_counter() - started
        if not self.asynchronous:
            concurrent.futures.wait([future])
        # Training waits this long here: inference, plus post-processing when synchronous.
        self._stall[epoch_num] = time.perf_counter() - started
        self._pending.append((epoch_num, future, started, inference_seconds))
        self._collect(wait=not self.asynchronous)

    def _collect(self, wait):
        """Logs every finished evaluation (all of them when `wait`), in epoch order."""
        while self._pending:
            epoch_num, future, started, inference_seconds = self._pending[0]
            if not wait and not future.done():
                return
            self._pending.pop(0)
            metrics, _ = future.result()
            self._finish(epoch_num, metrics, time.perf_counter() - started, inference_seconds)

    def _finish(self, epoch_num, metrics, seconds, inference_seconds):
        box, mask = metrics["bbox"]["AP"], metrics["segm"]["AP"]
        if self.mlperf:
            self.mlperf.eval_accuracy(epoch_num, bbox=box, segm=mask)
            self.mlperf.eval_stop(epoch_num)
        met = self._meets_targets(metrics)
        first_met = met and not self.targets_met
        record = {"epoch": epoch_num, "step_logged": int(self._step), "bbox": metrics["bbox"],
                  "segm": metrics["segm"], "targets_met": met,
                  "seconds": {"inference": inference_seconds,
                              "postprocess": metrics.get("seconds", {}),
                              "since_start": seconds,
                              "training_stall": self._stall.get(epoch_num)},
                  "asynchronous": self.asynchronous,
                  "coco_backend": metrics.get("coco_backend")}
        self.history.append((epoch_num, metrics))
        if self.metrics_path:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.stream:
            print(f"eval after epoch {epoch_num}: box AP {box:.4f}, mask AP {mask:.4f} "
                  f"(targets {self.box_target} / {self.mask_target}{', MET' if met else ''}; "
                  f"{seconds:.1f} s)\n{coco_metrics.format_stats_table(metrics)}",
                  file=self.stream, flush=True)
        logging.info("eval epoch %d: box AP %.4f mask AP %.4f", epoch_num, box, mask)
        if first_met and self.model is not None:
            self.model.stop_training = True
