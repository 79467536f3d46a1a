"""Tests for official_maskrcnn.evaluation.shared_arrays: the reused shared memory block."""

from multiprocessing import shared_memory
from unittest import mock

import numpy as np
import tensorflow as tf

from official_maskrcnn.evaluation import shared_arrays


def _block_exists(name):
    try:
        shared_memory.SharedMemory(name=name).close()
    except FileNotFoundError:
        return False
    return True


class SharedBufferTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.buffer = shared_arrays.SharedBuffer()
        self.addCleanup(self.buffer.close)

    def test_round_trip_reuse_and_growth(self):
        rng = np.random.default_rng(0)
        first = rng.random((3, 5, 4, 4)).astype(np.float32)
        ref = self.buffer.put(first)
        self.assertEqual((ref.shape, np.dtype(ref.dtype)), (first.shape, first.dtype))
        self.assertAllEqual(shared_arrays.read(ref), first)
        smaller = rng.random((2, 5, 4, 4)).astype(np.float32)
        reused = self.buffer.put(smaller)
        self.assertEqual(reused.block_name, ref.block_name)  # fits: the same block
        self.assertAllEqual(shared_arrays.read(reused), smaller)
        larger = rng.integers(0, 9, (7, 5, 4, 4)).astype(np.int64)
        grown = self.buffer.put(larger)
        self.assertNotEqual(grown.block_name, ref.block_name)
        self.assertFalse(_block_exists(ref.block_name))  # the small block is gone
        self.assertAllEqual(shared_arrays.read(grown), larger)
        self.assertEqual(shared_arrays.read(grown).dtype, np.int64)
        # A non-contiguous array is copied in its logical order.
        strided = first[:, ::2]
        self.assertAllEqual(shared_arrays.read(self.buffer.put(strided)), strided)
        self.buffer.close()
        self.assertFalse(_block_exists(grown.block_name))
        self.buffer.close()  # twice is fine

    def test_empty_array(self):
        ref = self.buffer.put(np.zeros((0, 100, 28, 28), np.float32))
        self.assertEqual(shared_arrays.read(ref).shape, (0, 100, 28, 28))

    def test_no_room_gives_none_and_leaves_nothing(self):
        created = []
        original = shared_memory.SharedMemory

        def recording(*args, **kwargs):
            created.append(original(*args, **kwargs))
            return created[-1]

        full = OSError(28, "No space left on device")
        with mock.patch.object(shared_arrays.shared_memory, "SharedMemory", recording), \
                mock.patch.object(shared_arrays.os, "posix_fallocate", side_effect=full):
            self.assertIsNone(self.buffer.put(np.ones((4, 4), np.float32)))
        self.assertLen(created, 1)
        self.assertFalse(_block_exists(created[0].name))  # unlinked at once
        with mock.patch.object(shared_arrays.shared_memory, "SharedMemory",
                               side_effect=OSError(24, "Too many open files")):
            self.assertIsNone(self.buffer.put(np.ones((4, 4), np.float32)))
        # Room again: a block is taken.
        self.assertAllEqual(shared_arrays.read(self.buffer.put(np.ones((4, 4)))), np.ones((4, 4)))


if __name__ == "__main__":
    tf.test.main()
