"""Large numpy arrays handed to worker processes through a reused POSIX shared memory block.

`ResultConverter` sends each worker the mask probabilities of its images: [N, T, M, M] float32,
40 MB for 128 images of 100 detections, 1.6 GB for val2017; and each scoring worker its
category shard's results (a few MB pickled). Pickled into a `ProcessPoolExecutor` they pass
through one feeder thread and a 64 kB pipe, the worker waiting ~10 ms per MB while the other
processes hold the cores (measured: a fifth of the 2-process conversion). Copied into shared
memory, a task carries only the block's name and an offset.

The block is reused from one evaluation to the next (grown when an array does not fit): a new
block per call costs its page faults again in this process and in every worker, as much as the
pipes saved (measured). Workers keep the current block mapped (`read`). It lives as long as its
`SharedBuffer` (`close()`), and multiprocessing's resource tracker, which 'spawn' workers share,
removes it if this process dies first.

A block is only taken when the shared memory file system has room: its pages are reserved with
`posix_fallocate`, so a full /dev/shm is an error here (the caller pickles instead), not a
SIGBUS later. Docker's default /dev/shm is 64 MB: val2017's masks then go through pipes unless
the container has `--shm-size` (or `--ipc=host`).

No TensorFlow here: this module runs in the worker processes.
"""

import collections
import os
import threading
from multiprocessing import shared_memory

import numpy as np

# A worker's handle of an array in shared memory (picklable): the `SharedBuffer` it came from
# (`buffer_id`), its current block, byte offset, shape and dtype.
ArrayRef = collections.namedtuple("ArrayRef",
                                  ["buffer_id", "block_name", "offset", "shape", "dtype"])
_ALIGNMENT = 64  # bytes between the starts of arrays in a block (a cache line)


class SharedBuffer:
    """This process's end: one shared memory block, reused by `put` (one caller at a time)."""

    def __init__(self):
        self._block = None
        self._lock = threading.Lock()
        self._id = f"{os.getpid()}:{id(self)}"

    def put(self, array):
        """Copies `array` into the block (a bigger block replaces a small one): its `ArrayRef`,
        valid until the next `put` or `close`; None when /dev/shm has no room for it."""
        refs = self.put_all([array])
        return None if refs is None else refs[0]

    def put_all(self, arrays):
        """`put` of several arrays side by side: their `ArrayRef`s, or None (no room)."""
        arrays = [np.ascontiguousarray(array) for array in arrays]
        offsets = [0]
        for array in arrays:
            offsets.append(offsets[-1] + -(-array.nbytes // _ALIGNMENT) * _ALIGNMENT)
        with self._lock:
            if self._block is None or self._block.size < offsets[-1]:
                self._release()
                self._block = _new_block(max(offsets[-1], 1))
                if self._block is None:
                    return None
            refs = []
            for array, offset in zip(arrays, offsets):
                view = np.ndarray(array.shape, array.dtype, buffer=self._block.buf,
                                  offset=offset)
                view[...] = array
                del view  # closing the block needs every view of its buffer released
                refs.append(ArrayRef(self._id, self._block.name, offset, array.shape,
                                     array.dtype.str))
            return refs

    def close(self):
        with self._lock:
            self._release()

    def _release(self):
        if self._block is not None:
            self._block.close()
            self._block.unlink()
            self._block = None


def _new_block(size):
    """A new shared memory block of `size` bytes with its pages reserved, or None."""
    try:
        block = shared_memory.SharedMemory(create=True, size=size)
    except OSError:
        return None
    try:
        # tmpfs allocates pages when first written: reserve them now, or a full /dev/shm would
        # kill this process with SIGBUS during the copy.
        os.posix_fallocate(block._fd, 0, size)
    except (OSError, AttributeError):
        block.close()
        block.unlink()
        return None
    return block


_mapped = {}  # in a worker: {buffer id: the block of that buffer last read}


def read(ref):
    """In a worker: the array of `ref`, mapped in place (read it, do not keep it beyond the
    task: the next `put` overwrites it). The worker keeps each buffer's block mapped for the
    next task, and unmaps a block when its buffer has replaced it."""
    block = _mapped.get(ref.buffer_id)
    if block is None or block.name != ref.block_name:
        if block is not None:
            try:
                block.close()
            except BufferError:  # a view is still alive: unmapped when collected
                pass
        block = _mapped[ref.buffer_id] = shared_memory.SharedMemory(name=ref.block_name)
    return np.ndarray(ref.shape, np.dtype(ref.dtype), buffer=block.buf, offset=ref.offset)
