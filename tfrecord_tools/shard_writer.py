"""Writing records into `PREFIX-SSSSS-of-NNNNN.tfrecord` shards, atomically.

Shards are written into a hidden temporary folder beside the output, together with their
manifest, and moved into place (the manifest last) only when all of it is written, so a crash, a
full disk or a kill never leaves files that look like finished shards, nor shards without their
manifest. Any exception before that (including KeyboardInterrupt) deletes the temporary folder.
Only a SIGKILL can leave it behind; the next run reports it. Records go to shards round-robin
(record i -> shard i mod N), which keeps shard sizes within one record of each other and is
deterministic.
"""

import contextlib
import dataclasses
import glob
import json
import os
import re
import shutil
import tempfile

import tensorflow as tf

from tfrecord_tools.coco_index import ConversionError, file_sha256

SHARD_SUFFIX_RE = re.compile(r"-(\d{5})-of-(\d{5})\.tfrecord$")
INCOMPLETE_MARK = ".incomplete-"


def shard_name(prefix, index, num_shards):
    """'PREFIX-00003-of-00008.tfrecord'."""
    return f"{prefix}-{index:05d}-of-{num_shards:05d}.tfrecord"


def prefix_of_shard(path):
    """The output prefix of a shard path, or None if the name is not a shard name."""
    match = SHARD_SUFFIX_RE.search(path)
    return path[:match.start()] if match else None


def manifest_path(prefix):
    """Where the manifest of the shards of `prefix` lives."""
    return prefix + ".manifest.json"


class OutputWriteError(Exception):
    """Writing the output failed (disk full, I/O error); the message names the file.

    Raised only after the partial output has been removed (by leaving the writer's `with`).
    """


# What a failing write raises: Python's file functions an OSError, TensorFlow's writer an OpError
# (a full disk is a ResourceExhaustedError).
_WRITE_ERRORS = (OSError, tf.errors.OpError)


@contextlib.contextmanager
def _as_write_error(action, path):
    """Turns a failing write of `path` into one OutputWriteError naming it."""
    try:
        yield
    except _WRITE_ERRORS as e:
        detail = e.message if isinstance(e, tf.errors.OpError) else (e.strerror or str(e))
        raise OutputWriteError(f"{action} {path} failed: {detail}") from e


def _unwritable(output_prefix, folder, error):
    return ConversionError(f"--output_prefix {output_prefix}: cannot write in {folder}: "
                           f"{error.strerror or error}")


@dataclasses.dataclass
class ShardInfo:
    file: str  # base name
    records: int
    sha256: str


class ShardSetWriter:
    """Context manager writing serialized records round-robin into `num_shards` shards.

    After the last `write`, `close()` returns the shards' ShardInfo list and `commit(manifest)`
    moves shards and manifest into place. Leaving the `with` block by any exception (or without
    commit) deletes the temporary folder and everything in it.

    Raises:
      ConversionError: the output prefix is a folder, cannot be written, or would mix with
        shards of another count (raised by the constructor, before anything is written).
      OutputWriteError: a write, close or move failed (disk full, I/O error).
    """

    def __init__(self, output_prefix, num_shards):
        self.prefix = os.path.abspath(output_prefix)
        self.num_shards = num_shards
        out_dir, base = os.path.split(self.prefix)
        if os.path.isdir(self.prefix):
            raise ConversionError(
                f"--output_prefix {output_prefix} is a directory; give a path prefix such as "
                f"{os.path.join(output_prefix, 'train')}")
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise _unwritable(output_prefix, out_dir, e) from e
        self._refuse_other_shard_counts()
        try:
            self.tmp_dir = tempfile.mkdtemp(prefix=f".{base}{INCOMPLETE_MARK}", dir=out_dir)
        except OSError as e:
            raise _unwritable(output_prefix, out_dir, e) from e
        self._tmp_paths = [os.path.join(self.tmp_dir, os.path.basename(
            shard_name(self.prefix, i, num_shards))) for i in range(num_shards)]
        self._writers = []
        self._counts = [0] * num_shards
        self._next = 0
        self._closed = False
        self.committed = False
        try:
            for path in self._tmp_paths:
                with _as_write_error("creating", path):
                    self._writers.append(tf.io.TFRecordWriter(path))
        except BaseException:
            self._discard()
            raise

    def _refuse_other_shard_counts(self):
        """Existing shards of this prefix with another shard count would mix with ours."""
        others = sorted(
            path for path in glob.glob(glob.escape(self.prefix) + "-*-of-*.tfrecord")
            if prefix_of_shard(path) == self.prefix
            and int(SHARD_SUFFIX_RE.search(path).group(2)) != self.num_shards)
        if others:
            raise ConversionError(
                f"{len(others)} shard(s) of another shard count already exist for this "
                f"--output_prefix (e.g. {others[0]}); a file pattern would mix them with the new "
                f"{self.num_shards} shard(s). Remove them or choose another --output_prefix.")

    def write(self, serialized_record):
        shard = self._next % self.num_shards
        with _as_write_error("writing", self._tmp_paths[shard]):
            self._writers[shard].write(serialized_record)
        self._counts[shard] += 1
        self._next += 1

    def close(self):
        """Flushes and closes the shards (still in the temporary folder) -> their ShardInfo list."""
        for writer, tmp_path in zip(self._writers, self._tmp_paths):
            with _as_write_error("writing", tmp_path):
                writer.close()
        self._closed = True
        return [ShardInfo(file=os.path.basename(tmp_path), records=self._counts[index],
                          sha256=file_sha256(tmp_path))
                for index, tmp_path in enumerate(self._tmp_paths)]

    def commit(self, manifest):
        """Writes `manifest` (a JSON-able dict) beside the closed shards, then moves them in.

        The manifest is written while still hidden, so a full disk fails here, with nothing in
        place yet. An older manifest of this prefix is deleted before the first shard replaces
        an older shard; the new manifest is moved in last. Should a move fail, the shards already
        moved are deleted again.
        """
        if not self._closed:
            raise RuntimeError("ShardSetWriter.commit() before close()")
        final_manifest = manifest_path(self.prefix)
        tmp_manifest = os.path.join(self.tmp_dir, os.path.basename(final_manifest))
        with _as_write_error("writing", tmp_manifest):
            with open(tmp_manifest, "w") as f:
                json.dump(manifest, f, indent=2)
                f.write("\n")
        moved = []
        try:
            with _as_write_error("moving the shards into place at", self.prefix):
                if os.path.lexists(final_manifest):
                    os.remove(final_manifest)
                for index, tmp_path in enumerate(self._tmp_paths):
                    moved.append(shard_name(self.prefix, index, self.num_shards))
                    os.replace(tmp_path, moved[-1])
                os.replace(tmp_manifest, final_manifest)
        except BaseException:
            for path in moved:
                with contextlib.suppress(OSError):
                    os.remove(path)
            raise
        self.committed = True
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # empty by now

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if not self.committed:
            self._discard()
        return False

    def _discard(self):
        """Closes what is open and deletes the temporary folder, whatever fails on the way."""
        try:
            for writer in self._writers:
                # A writer with unflushed records fails again on a full disk; its file goes anyway.
                with contextlib.suppress(Exception):
                    writer.close()
        finally:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)


def stale_incomplete_dirs(output_prefix):
    """Temporary folders left by killed runs for this prefix (reported, never deleted by us)."""
    out_dir, base = os.path.split(os.path.abspath(output_prefix))
    return sorted(glob.glob(os.path.join(glob.escape(out_dir),
                                         glob.escape(f".{base}{INCOMPLETE_MARK}") + "*")))
