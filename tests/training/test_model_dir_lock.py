"""ModelDirLock: one holder at a time, a clear message naming it, takeover after a dead holder."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import tensorflow as tf

from official_maskrcnn.training import model_dir_lock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A holder in another process: takes the lock, says so, then waits to be killed.
HOLDER = """
import sys, time
from official_maskrcnn.training import model_dir_lock
lock = model_dir_lock.ModelDirLock(sys.argv[1], "holder-run").acquire()
print("locked", flush=True)
time.sleep(600)
"""


def read_record(model_dir):
    with open(os.path.join(model_dir, model_dir_lock.LOCK_FILE_NAME)) as f:
        text = f.read()
    return json.loads(text) if text.strip() else {}


class ModelDirLockTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = os.path.join(self.create_tempdir().full_path, "model")

    def start_holder(self):
        process = subprocess.Popen([sys.executable, "-c", HOLDER, self.dir], cwd=REPO,
                                   env=dict(os.environ, PYTHONPATH=REPO),
                                   stdout=subprocess.PIPE, text=True)
        self.addCleanup(lambda: (process.kill(), process.wait()))
        self.assertEqual(process.stdout.readline().strip(), "locked")
        return process

    def test_records_the_holder_and_empties_the_record_on_release(self):
        with model_dir_lock.ModelDirLock(self.dir, "abc") as lock:
            record = read_record(self.dir)
            self.assertEqual((record["pid"], record["host"], record["run_id"]),
                             (os.getpid(), socket.gethostname(), "abc"))
            self.assertIn("started", record)
            self.assertEqual(lock.path, os.path.join(self.dir, "train.lock"))
        self.assertEqual(read_record(self.dir), {})  # released cleanly
        with model_dir_lock.ModelDirLock(self.dir, "def"):  # free again, no warning needed
            self.assertEqual(read_record(self.dir)["run_id"], "def")

    def test_a_second_holder_in_this_process_is_refused(self):
        with model_dir_lock.ModelDirLock(self.dir, "first"):
            with self.assertRaisesRegex(model_dir_lock.ModelDirLockedError,
                                        f"pid {os.getpid()}, .*run id first"):
                model_dir_lock.ModelDirLock(self.dir, "second").acquire()
            self.assertEqual(read_record(self.dir)["run_id"], "first")  # record untouched

    def test_a_live_holder_in_another_process_is_named(self):
        holder = self.start_holder()
        with self.assertRaises(model_dir_lock.ModelDirLockedError) as raised:
            model_dir_lock.ModelDirLock(self.dir, "mine").acquire()
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertIn(f"host {socket.gethostname()}, pid {holder.pid}", message)
        self.assertIn(self.dir, message)

    def test_the_lock_of_a_killed_holder_is_taken_over_with_a_warning(self):
        holder = self.start_holder()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with self.assertLogs(level="WARNING") as logs:
            lock = model_dir_lock.ModelDirLock(self.dir, "mine").acquire()
        lock.release()
        self.assertIn(f"pid {holder.pid}", "\n".join(logs.output))
        self.assertIn("without releasing", "\n".join(logs.output))

    def test_release_without_acquire_is_a_no_op(self):
        model_dir_lock.ModelDirLock(self.dir, "x").release()
        start = time.time()
        with model_dir_lock.ModelDirLock(self.dir, "x"):
            pass
        self.assertLess(time.time() - start, 5)


if __name__ == "__main__":
    tf.test.main()
