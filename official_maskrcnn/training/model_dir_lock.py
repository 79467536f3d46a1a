"""One training run per model dir: an exclusive lock held by the chief for the whole run.

Without it a second `train` started on the same `--model_dir` (a typo, a job scheduled twice)
silently overwrites the first run's checkpoints and operative config and interleaves its lines
into `mlperf.log` and `metrics.jsonl`. The lock is `fcntl.flock` on `<model_dir>/train.lock`:
the kernel releases it when its holder dies, however it dies (SIGKILL, OOM), so a lock can never
outlive its run. The file also records who holds it (host, pid, start time, run id), for the
message the second run prints, and is emptied on release. Finding it non-empty on acquiring
therefore means its last holder died without releasing: the lock is taken over with a warning
naming that holder.

The lock file is never deleted: deleting it would let a run that opened the old file and a run
that creates a new one both "hold" a lock. flock works on local disks and on NFSv4 (Linux maps it
to a POSIX lock there); object-store paths (`gs://...`) cannot be locked, and the run says so.
"""

import datetime
import fcntl
import json
import os
import socket

from absl import logging

LOCK_FILE_NAME = "train.lock"


class ModelDirLockedError(RuntimeError):
    """Another live run holds the model dir; the message names its host and pid."""


class ModelDirLock:
    """The exclusive lock of one model dir (see the module docstring).

    Args:
      model_dir: the run's folder (created if missing).
      run_id: this run's id, recorded in the lock file.

    Use as a context manager, or `acquire()` then `release()`.
    """

    def __init__(self, model_dir, run_id):
        self.model_dir = model_dir
        self.run_id = run_id
        self.path = os.path.join(model_dir, LOCK_FILE_NAME)
        self._file = None

    def acquire(self):
        """Takes the lock, or raises at once (never waits) if a live run holds it.

        Returns:
          self.
        Raises:
          ModelDirLockedError: another process holds the lock.
        """
        if "://" in self.model_dir:
            logging.warning("--model_dir %s is not a local path: it cannot be locked against a "
                            "second run writing into it", self.model_dir)
            return self
        os.makedirs(self.model_dir, exist_ok=True)
        # "a+": open without truncating, so the holder's record survives our failed attempt.
        lock_file = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(lock_file)
            lock_file.close()
            raise ModelDirLockedError(
                f"{self.model_dir} is in use by another training run ({_describe(holder)}; "
                f"lock file {self.path}): wait for it to end or use another --model_dir"
            ) from None
        previous = _read_holder(lock_file)
        if previous:
            logging.warning("%s: taking over the lock of a run that ended without releasing "
                            "it (%s)", self.path, _describe(previous))
        record = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": self.run_id,
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(json.dumps(record) + "\n")
        lock_file.flush()
        os.fsync(lock_file.fileno())
        self._file = lock_file
        return self

    def release(self):
        """Empties the record and releases the lock (a no-op when not held)."""
        if self._file is None:
            return
        try:
            self._file.seek(0)
            self._file.truncate()  # an empty file: the lock ended cleanly
            self._file.flush()
        finally:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()


def _read_holder(lock_file):
    """The record in the lock file: a dict, {} when empty, {"record": text} when unparsable."""
    lock_file.seek(0)
    text = lock_file.read().strip()
    if not text:
        return {}
    try:
        record = json.loads(text)
    except ValueError:
        return {"record": text[:200]}
    return record if isinstance(record, dict) else {"record": text[:200]}


def _describe(holder):
    if not holder:
        return "holder unknown: the lock file is empty"
    if "pid" not in holder:
        return f"unreadable record {holder.get('record')!r}"
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started "
            f"{holder.get('started')}, run id {holder.get('run_id')}")
