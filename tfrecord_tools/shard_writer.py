"""Writing records into `PREFIX-SSSSS-of-NNNNN.tfrecord` shards, atomically.

Shards are written into a hidden temporary folder beside the output and moved into place only
when every record is written, so a crash or a kill never leaves files that look like finished
shards. Records go to shards round-robin (record i -> shard i mod N), which keeps shard sizes
within one record of each other and is deterministic.
"""

import dataclasses
import glob
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


@dataclasses.dataclass
class ShardInfo:
    file: str  # base name
    records: int
    sha256: str


class ShardSetWriter:
    """Context manager writing serialized records round-robin into `num_shards` shards.

    On a clean exit call `commit()` to move the shards into place; leaving the `with` block by an
    exception (or without commit) deletes the temporary folder and everything in it.
    """

    def __init__(self, output_prefix, num_shards):
        self.prefix = os.path.abspath(output_prefix)
        self.num_shards = num_shards
        out_dir, base = os.path.split(self.prefix)
        if os.path.isdir(self.prefix):
            raise ConversionError(
                f"--output_prefix {output_prefix} is a directory; give a path prefix such as "
                f"{os.path.join(output_prefix, 'train')}")
        os.makedirs(out_dir, exist_ok=True)
        self._refuse_other_shard_counts()
        self.tmp_dir = tempfile.mkdtemp(prefix=f".{base}{INCOMPLETE_MARK}", dir=out_dir)
        self._tmp_paths = [os.path.join(self.tmp_dir, os.path.basename(
            shard_name(self.prefix, i, num_shards))) for i in range(num_shards)]
        self._writers = [tf.io.TFRecordWriter(path) for path in self._tmp_paths]
        self._counts = [0] * num_shards
        self._next = 0
        self.committed = False

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
        self._writers[shard].write(serialized_record)
        self._counts[shard] += 1
        self._next += 1

    def commit(self):
        """Closes the shards, moves them into place and returns their ShardInfo list."""
        for writer in self._writers:
            writer.close()
        infos = []
        for index, tmp_path in enumerate(self._tmp_paths):
            infos.append(ShardInfo(file=os.path.basename(tmp_path), records=self._counts[index],
                                   sha256=file_sha256(tmp_path)))
        for index, tmp_path in enumerate(self._tmp_paths):
            os.replace(tmp_path, shard_name(self.prefix, index, self.num_shards))
        os.rmdir(self.tmp_dir)
        self.committed = True
        return infos

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if not self.committed:
            for writer in self._writers:
                writer.close()
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        return False


def stale_incomplete_dirs(output_prefix):
    """Temporary folders left by killed runs for this prefix (reported, never deleted by us)."""
    out_dir, base = os.path.split(os.path.abspath(output_prefix))
    return sorted(glob.glob(os.path.join(glob.escape(out_dir),
                                         glob.escape(f".{base}{INCOMPLETE_MARK}") + "*")))
