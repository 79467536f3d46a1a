"""The memory scalars: host RSS on this CPU machine, GPU allocator stats where there are GPUs."""

import os
from unittest import mock

import numpy as np
import tensorflow as tf

from official_maskrcnn.training import memory


class MemoryTest(tf.test.TestCase):

    def test_without_a_gpu_the_process_rss_now_and_its_peak(self):
        self.assertEmpty(tf.config.list_logical_devices("GPU"))  # the test machine's case
        before = memory.memory_usage()
        self.assertEqual(set(before), {"memory/rss_mib", "memory/peak_rss_mib"})
        # A process holding TensorFlow uses more than 100 MiB; the peak bounds the present.
        self.assertGreater(before["memory/rss_mib"], 100)
        self.assertGreaterEqual(before["memory/peak_rss_mib"], before["memory/rss_mib"] - 1)
        block = np.ones(64 * memory.MIB, np.uint8)  # touched: resident
        after = memory.host_memory()
        self.assertGreater(after["memory/rss_mib"], before["memory/rss_mib"] + 48)
        self.assertGreater(after["memory/peak_rss_mib"], before["memory/rss_mib"] + 48)
        del block

    def test_current_rss_reads_statm_pages(self):
        page = os.sysconf("SC_PAGE_SIZE")
        with mock.patch("builtins.open", mock.mock_open(read_data="900 250 40 1 0 300 0\n")):
            self.assertEqual(memory.current_rss_bytes(), 250 * page)
        with mock.patch("builtins.open", side_effect=FileNotFoundError):
            self.assertIsNone(memory.current_rss_bytes())  # not Linux: no current value
            self.assertEqual(set(memory.host_memory()), {"memory/peak_rss_mib"})

    def test_with_gpus_each_gpus_allocator_bytes_now_and_peak(self):
        info = {"GPU:0": {"current": 3 * memory.MIB, "peak": 5 * memory.MIB},
                "GPU:1": {"current": memory.MIB // 2, "peak": 7 * memory.MIB}}
        gpus = [tf.config.LogicalDevice(f"/device:GPU:{i}", "GPU") for i in range(2)]
        with mock.patch.object(tf.config, "list_logical_devices", return_value=gpus), \
                mock.patch.object(tf.config.experimental, "get_memory_info",
                                  side_effect=info.__getitem__):
            usage = memory.memory_usage()
        self.assertEqual(usage, {"memory/gpu0_mib": 3.0, "memory/gpu0_peak_mib": 5.0,
                                 "memory/gpu1_mib": 0.5, "memory/gpu1_peak_mib": 7.0})


if __name__ == "__main__":
    tf.test.main()
