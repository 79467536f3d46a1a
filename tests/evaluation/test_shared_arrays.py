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

    def test_several_arrays_side_by_side(self):
        arrays = [np.arange(5, dtype=np.uint8), np.ones((3, 7)), np.zeros(0, np.int32),
                  np.frombuffer(b"payload", np.uint8)]
        refs = self.buffer.put_all(arrays)
        self.assertLen({ref.block_name for ref in refs}, 1)
        self.assertTrue(all(ref.offset % 64 == 0 for ref in refs))  # aligned starts
        for ref, array in zip(refs, arrays):
            self.assertAllEqual(shared_arrays.read(ref), array)
            self.assertEqual(shared_arrays.read(ref).dtype, array.dtype)
        self.assertEqual(shared_arrays.read(refs[3]).tobytes(), b"payload")

    def test_a_reader_maps_one_block_per_buffer(self):
        other = shared_arrays.SharedBuffer()
        self.addCleanup(other.close)
        first, second = self.buffer.put(np.ones(4)), other.put(np.zeros(4))
        for _ in range(2):  # alternating: both stay mapped
            self.assertAllEqual(shared_arrays.read(first), np.ones(4))
            self.assertAllEqual(shared_arrays.read(second), np.zeros(4))
        self.assertEqual(shared_arrays._mapped[first.buffer_id].name, first.block_name)
        self.assertEqual(shared_arrays._mapped[second.buffer_id].name, second.block_name)
        grown = self.buffer.put(np.arange(1000.0))  # a new block replaces the mapped one
        self.assertAllEqual(shared_arrays.read(grown), np.arange(1000.0))
        self.assertEqual(shared_arrays._mapped[first.buffer_id].name, grown.block_name)
        self.assertEqual(shared_arrays._mapped[second.buffer_id].name, second.block_name)

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
