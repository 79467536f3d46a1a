"""The converter's output under failure: nothing half-written stays, nothing keeps running."""

import errno
import glob
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

import tensorflow as tf
from PIL import Image

from tfrecord_tools import create_coco_tfrecord

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COCO128 = os.path.join(REPO, "..", "shared", "data", "coco128")
COCO128_IMAGES = os.path.join(COCO128, "train2017")
COCO128_JSON = os.path.join(COCO128, "annotations", "instances_train2017.json")
REAL_WRITER = tf.io.TFRecordWriter


def _enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FailingWriter:
    """A real TFRecordWriter that raises `error` at its `fail_at` call ("write" or "close")."""

    def __init__(self, path, fail_at, error, after_writes=2):
        self._writer = REAL_WRITER(path)
        self._fail_at, self._error, self._writes_left = fail_at, error, after_writes

    def write(self, record):
        self._writes_left -= 1
        if self._fail_at == "write" and self._writes_left < 0:
            raise self._error
        self._writer.write(record)

    def close(self):
        self._writer.close()
        if self._fail_at == "close":
            raise self._error


class WriteFailureTest(tf.test.TestCase):
    """A failure while writing removes every partial file and says so in one line."""

    def setUp(self):
        super().setUp()
        self.tmp = self.create_tempdir().full_path
        self.image_dir = os.path.join(self.tmp, "images")
        os.makedirs(self.image_dir)
        Image.new("RGB", (8, 8)).save(os.path.join(self.image_dir, "a.jpg"))
        self.json_path = os.path.join(self.tmp, "ann.json")
        with open(self.json_path, "w") as f:
            json.dump({"images": [{"id": i, "file_name": "a.jpg", "height": 8, "width": 8}
                                  for i in range(1, 9)],
                       "annotations": [], "categories": [{"id": 1, "name": "a"}]}, f)
        self.out_dir = os.path.join(self.tmp, "out")

    def run_cli(self, output_prefix=None):
        argv = ["--image_dir", self.image_dir, "--annotations_file", self.json_path,
                "--output_prefix", output_prefix or os.path.join(self.out_dir, "x"),
                "--num_shards", "3", "--num_workers", "1"]
        stderr = io.StringIO()
        with mock.patch("sys.stderr", stderr), mock.patch("sys.stdout", io.StringIO()):
            code = create_coco_tfrecord.main(argv)
        return code, stderr.getvalue()

    def assert_clean_failure(self, code, stderr, want_code, fragment):
        self.assertEqual(code, want_code, stderr)
        self.assertIn(fragment, stderr)
        last_lines = [line for line in stderr.splitlines() if "create_coco_tfrecord:" in line]
        self.assertLen(last_lines, 1, stderr)
        self.assertIn("the partial output was removed", last_lines[0])
        self.assertEqual(os.listdir(self.out_dir), [], "nothing may be left behind")

    def test_disk_full_while_writing_shards(self):
        # The real TensorFlow writer on /dev/full: its writes are buffered and fail with ENOSPC
        # when flushed, i.e. when the shards are closed, one error per shard.
        with mock.patch.object(tf.io, "TFRecordWriter", lambda path: REAL_WRITER("/dev/full")):
            code, stderr = self.run_cli()
        self.assert_clean_failure(code, stderr, 1, "No space left on device")

    def test_any_exception_while_writing_removes_the_partial_output(self):
        cases = [("write", _enospc(), 1, "No space left on device"),
                 ("close", _enospc(), 1, "No space left on device"),
                 ("write", tf.errors.ResourceExhaustedError(None, None, "disk quota"), 1,
                  "disk quota"),
                 ("write", KeyboardInterrupt(), 130, "interrupted"),
                 ("close", KeyboardInterrupt(), 130, "interrupted")]
        for number, (fail_at, error, want_code, fragment) in enumerate(cases):
            with self.subTest(fail_at=fail_at, error=repr(error)):
                self.out_dir = os.path.join(self.tmp, f"out{number}")

                def factory(path, fail_at=fail_at, error=error):
                    return _FailingWriter(path, fail_at, error)

                with mock.patch.object(tf.io, "TFRecordWriter", factory):
                    code, stderr = self.run_cli()
                self.assert_clean_failure(code, stderr, want_code, fragment)

    def test_disk_full_while_writing_the_manifest_leaves_no_shards(self):
        with mock.patch("json.dump", side_effect=_enospc()):
            code, stderr = self.run_cli()
        self.assert_clean_failure(code, stderr, 1, "No space left on device")

    def test_a_commit_leaves_shards_and_manifest_together(self):
        code, _ = self.run_cli()
        self.assertEqual(code, 0)
        self.assertEqual(sorted(os.listdir(self.out_dir)),
                         ["x-00000-of-00003.tfrecord", "x-00001-of-00003.tfrecord",
                          "x-00002-of-00003.tfrecord", "x.manifest.json"])

    def test_unwritable_output_prefix_exits_2_naming_the_path(self):
        blocker = os.path.join(self.tmp, "a_file")
        with open(blocker, "w") as f:
            f.write("not a folder")
        prefix = os.path.join(blocker, "sub", "x")
        code, stderr = self.run_cli(prefix)
        self.assertEqual(code, 2, stderr)
        self.assertEqual(stderr.count("error:"), 1, stderr)
        self.assertIn(f"--output_prefix {prefix}", stderr)
        self.assertIn("cannot write", stderr)
        self.assertNotIn("Traceback", stderr)

    def test_output_folder_without_write_permission_exits_2(self):
        os.makedirs(self.out_dir)
        denied = OSError(errno.EACCES, os.strerror(errno.EACCES), self.out_dir)
        # Root ignores permission bits, so the refusal is simulated where the folder is written.
        with mock.patch.object(tempfile, "mkdtemp", side_effect=denied):
            code, stderr = self.run_cli()
        self.assertEqual(code, 2, stderr)
        self.assertIn("Permission denied", stderr)
        self.assertIn(self.out_dir, stderr)
        self.assertEqual(os.listdir(self.out_dir), [])


def _process_state(pid):
    """The state letter of /proc/PID/stat, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[0]


def _is_pool_worker(pid):
    """Whether PID is a live process spawned by `multiprocessing` (a pool worker)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"spawn_main" in cmdline and _process_state(pid) not in (None, "Z")


def _worker_pids(parent_pid):
    """Live pool workers whose parent is `parent_pid`."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == parent_pid and _is_pool_worker(entry):
            pids.append(int(entry))
    return pids


class KilledConverterTest(tf.test.TestCase):

    def test_workers_exit_when_the_converter_is_killed(self):
        if not os.path.isdir("/proc"):
            self.skipTest("finds the workers in /proc")
        tmp = self.create_tempdir().full_path
        with open(COCO128_JSON) as f:
            data = json.load(f)
        # coco128 eight times over (new ids, same files): minutes of work for two workers, so the
        # converter is surely mid-run when it is killed.
        copies = 8
        big = {"categories": data["categories"], "images": [], "annotations": []}
        for copy in range(copies):
            offset = copy * 10**7
            big["images"] += [{**image, "id": image["id"] + offset} for image in data["images"]]
            big["annotations"] += [{**a, "id": a["id"] + offset, "image_id": a["image_id"] + offset}
                                   for a in data["annotations"]]
        annotations_file = os.path.join(tmp, "big.json")
        with open(annotations_file, "w") as f:
            json.dump(big, f)
        converter = subprocess.Popen(
            [sys.executable, "-m", "tfrecord_tools.create_coco_tfrecord",
             "--image_dir", COCO128_IMAGES, "--annotations_file", annotations_file,
             "--output_prefix", os.path.join(tmp, "out", "x"), "--num_shards", "2",
             "--num_workers", "2"],
            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        workers = []
        try:
            deadline = time.monotonic() + 120
            while len(workers) < 2 and time.monotonic() < deadline:
                self.assertIsNone(converter.poll(), "the converter ended before it was killed")
                time.sleep(0.2)
                workers = _worker_pids(converter.pid)
            self.assertLen(workers, 2)
            time.sleep(1.0)  # let them take work
            os.kill(converter.pid, signal.SIGKILL)
            converter.wait(timeout=30)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(map(_is_pool_worker, workers)):
                time.sleep(0.1)
            alive = [pid for pid in workers if _is_pool_worker(pid)]
            self.assertEqual(alive, [], "workers outlived the killed converter by 5 s")
        finally:
            if converter.poll() is None:
                converter.kill()
                converter.wait()
            for pid in workers:  # only the workers this test started, by pid
                if _is_pool_worker(pid):
                    os.kill(pid, signal.SIGKILL)
        # What a kill -9 leaves is the hidden folder (reported by the next run), never shards.
        self.assertEqual(glob.glob(os.path.join(tmp, "out", "x-*")), [])


if __name__ == "__main__":
    tf.test.main()
