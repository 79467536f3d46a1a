"""The hang watchdog: alone with a fake exit, then a real Trainer whose callback blocks, in a
subprocess so that the exit code and stderr are the real ones."""

import os
import subprocess
import sys
import tempfile
import threading
import time
import types

import tensorflow as tf

from official_maskrcnn import runtime, train
from official_maskrcnn.training import watchdog

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A Trainer of the one-weight stand-in model (tests/training/test_hooks.py), 1 step per host
# call, the watchdog at 10 s, and a callback that blocks when the third host call begins (the
# first two completed: steps 1 and 2). Not less: the first host call traces the loop, which
# took 3 s on a busy 2-core machine (and the watchdog then rightly fired before step 1).
HANGING_TRAINER = r"""
import time
import numpy as np
import tensorflow as tf
import tf_keras
from official_maskrcnn.training import trainer as trainer_lib
from official_maskrcnn.training import watchdog
from tests.training.test_hooks import SIZE, StandInModel

class BlockAtThirdHostCall(tf_keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        if batch == 2:
            time.sleep(3600)

strategy = tf.distribute.get_strategy()
model = StandInModel()
model({"images": tf.zeros([1, SIZE, SIZE, 3])})
images = np.zeros([4, SIZE, SIZE, 3], np.float32)
trainer = trainer_lib.Trainer(
    strategy, model, tf_keras.optimizers.SGD(0.01),
    lambda epoch, start: strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices({"images": images[start:]}).batch(1)),
    ((SIZE, SIZE), (SIZE, SIZE)),
    trainer_lib.LoopSettings(per_replica_batch_size=1, steps_per_epoch=4, num_epochs=1,
                             steps_per_loop=1, jit_compile=False),
    hooks=[watchdog.HangWatchdog(10, worker_id=3)], callbacks=[BlockAtThirdHostCall()])
trainer.build()
trainer.train()
print("training ended", flush=True)
"""


class HangWatchdogTest(tf.test.TestCase):

    def start(self, seconds, **kwargs):
        """A started watchdog whose exit is recorded (`self.exited`), reporting to a file."""
        self.exited = threading.Event()
        self.codes = []
        self.report = tempfile.TemporaryFile("w+")
        self.addCleanup(self.report.close)

        def fake_exit(code):
            self.codes.append(code)
            self.exited.set()

        dog = watchdog.HangWatchdog(seconds, stream=self.report, exit_fn=fake_exit, **kwargs)
        dog.before_train()
        self.addCleanup(dog.after_train)
        return dog

    def report_text(self):
        self.report.seek(0)
        return self.report.read()

    def test_host_calls_in_time_keep_it_quiet_and_after_train_stops_it(self):
        dog = self.start(1.0)
        for step in range(1, 7):  # 6 host calls 0.25 s apart: 1.5 s in all, never 1 s apart
            time.sleep(0.25)
            dog.after_host_call(step, 1, 6)
        dog.after_train()
        self.assertIsNone(dog._thread)
        self.assertFalse(self.exited.wait(1.2))
        self.assertEqual((self.codes, self.report_text()), ([], ""))

    def test_a_late_host_call_reports_the_last_step_the_worker_and_every_stack(self):
        dog = self.start(0.5, worker_id=3)
        dog.after_host_call(6, 2, 8)
        self.assertTrue(self.exited.wait(10))
        self.assertEqual(self.codes, [watchdog.EXIT_CODE])
        report = self.report_text()
        self.assertRegex(report.splitlines()[0],
                         r"^error: hang watchdog: no host call completed in \d+ s "
                         r"\(run.watchdog_seconds = 0.5\) on worker 3; the last one ended at "
                         r"step 6\. Python stacks of every thread follow; exiting with code 124")
        # faulthandler's dump: this test's thread (waiting in exited.wait) among them.
        self.assertIn("(most recent call first)", report)
        self.assertIn("in test_a_late_host_call_reports_the_last_step_the_worker_and_every_",
                      report)

    def test_before_any_host_call_the_report_says_so(self):
        self.start(0.3)
        self.assertTrue(self.exited.wait(10))
        self.assertIn("none has completed since training began", self.report_text())

    def test_zero_is_off_and_a_negative_time_is_refused(self):
        dog = self.start(0)
        self.assertIsNone(dog._thread)
        with self.assertRaisesRegex(ValueError, "run.watchdog_seconds: expected a number >= 0 "
                                                r"\(0: off\), found -1"):
            runtime.RunSettings(watchdog_seconds=-1)
        with self.assertRaisesRegex(ValueError, "expected >= 0"):
            watchdog.HangWatchdog(-1)

    def test_train_builds_it_first_from_the_run_settings(self):
        context = types.SimpleNamespace(
            settings=runtime.RunSettings(watchdog_seconds=7), worker_id=1, num_workers=1,
            chief=False, model_dir=None, run_id="r", mllog=None,
            strategy=tf.distribute.get_strategy())
        hooks = train._hooks(context, model=None, checkpointer=None)
        self.assertIsInstance(hooks[0], watchdog.HangWatchdog)
        self.assertEqual((hooks[0].seconds, hooks[0].worker_id), (7, 1))
        self.assertEqual(runtime.RunSettings().watchdog_seconds, 1800)

    def test_a_blocking_callback_ends_the_process_with_exit_124_and_its_stack(self):
        process = subprocess.run([sys.executable, "-c", HANGING_TRAINER], cwd=REPO,
                                 env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2"),
                                 capture_output=True, text=True, timeout=300)
        self.assertEqual(process.returncode, watchdog.EXIT_CODE,
                         process.stdout[-2000:] + process.stderr[-3000:])
        self.assertNotIn("training ended", process.stdout)
        self.assertIn("error: hang watchdog: no host call completed in 10 s "
                      "(run.watchdog_seconds = 10) on worker 3; the last one ended at step 2.",
                      process.stderr)
        # The stacks: the main thread in the blocking callback below the Trainer's host loop,
        # and the watchdog's own thread (faulthandler's "current thread") reporting.
        self.assertIn("in on_train_batch_begin", process.stderr)
        self.assertIn("in _host_call", process.stderr)
        self.assertRegex(process.stderr, r"Current thread 0x[0-9a-f]+ \(most recent call first\)")
        self.assertIn("in _report_and_exit", process.stderr)


if __name__ == "__main__":
    tf.test.main()
