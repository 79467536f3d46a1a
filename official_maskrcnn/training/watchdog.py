"""A hang watchdog for the training loop: a run that stops making progress ends, and says where.

A run can hang without failing: a collective waiting for a worker that died, an input file on a
stalled network disk, a deadlock in a callback. It then holds its accelerators and its model
dir's lock until someone notices. `HangWatchdog` is a `trainer.Hook` that notes the end of every
host call (the loop's periodic return to Python); a background thread waits for the next one,
and when none completes within `seconds` it writes to stderr what the run was doing (the last
completed step, the worker, and every thread's Python stack by `faulthandler`) and ends the
process with `EXIT_CODE`, 124 (what `timeout(1)` uses for "timed out").

It watches from `before_train` to `after_train`: the first host call (which compiles the step),
the evaluations at epoch ends and the wait for pending asynchronous ones are inside, so
`seconds` must exceed the longest of those (the default, 1800 s, does on one accelerator
host). The thread never touches TensorFlow: a hung runtime would hang it too.

The exit is `os._exit`: a hung main thread cannot run clean-up, and waiting for it is what the
watchdog is there to stop. The kernel releases the model dir's lock; `mlperf.log` ends without
`run_stop` (as after a kill) and the newest checkpoint is the last one written.
"""

import faulthandler
import os
import sys
import threading
import time

from official_maskrcnn.training.trainer import Hook

EXIT_CODE = 124


class HangWatchdog(Hook):
    """Ends the process when no host call completes within `seconds` (see the module docstring).

    Args:
      seconds: the longest wait for the next host call's end, > 0; 0 or None: no watchdog.
      worker_id: this process's worker index, named in the report.
      stream: where the report goes; it needs a file descriptor (`faulthandler`).
      exit_fn: called with `EXIT_CODE` after the report (tests may replace `os._exit`).
    """

    def __init__(self, seconds, worker_id=0, stream=None, exit_fn=os._exit):
        if seconds is not None and seconds < 0:
            raise ValueError(f"run.watchdog_seconds: expected >= 0 (0: off), found {seconds}")
        self.seconds = seconds or 0
        self.worker_id = worker_id
        self.stream = stream
        self.exit_fn = exit_fn
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = None
        self._last_step = None  # the step at the end of the last host call (None: none yet)
        self._since = None  # time.monotonic() of that end, or of before_train

    def before_train(self):
        if not self.seconds:
            return
        self._since = time.monotonic()
        self._stopped.clear()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()

    def after_host_call(self, step, steps_run, epoch_end):
        with self._lock:
            self._last_step, self._since = step, time.monotonic()

    def after_train(self):
        if self._thread is not None:
            self._stopped.set()
            self._thread.join()
            self._thread = None

    def _watch(self):
        while True:
            with self._lock:
                remaining = self._since + self.seconds - time.monotonic()
            if remaining <= 0:
                self._report_and_exit()
                return
            if self._stopped.wait(remaining):
                return

    def _report_and_exit(self):
        stream = self.stream or sys.stderr
        with self._lock:
            step, waited = self._last_step, time.monotonic() - self._since
        last = (f"the last one ended at step {step}" if step is not None
                else "none has completed since training began")
        print(f"error: hang watchdog: no host call completed in {waited:.0f} s "
              f"(run.watchdog_seconds = {self.seconds}) on worker {self.worker_id}; {last}. "
              f"Python stacks of every thread follow; exiting with code {EXIT_CODE}.",
              file=stream, flush=True)
        faulthandler.dump_traceback(file=stream, all_threads=True)
        stream.flush()
        self.exit_fn(EXIT_CODE)
