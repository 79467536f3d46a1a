"""The memory this process uses, sampled at each host call for TensorBoard (`callbacks`).

Where TensorFlow sees GPUs: its allocator's bytes in use on each local GPU, now and the peak
since the process started (`tf.config.experimental.get_memory_info`), the number an out-of-memory
error is about. Otherwise (CPU runs): the process's resident set size now (`/proc/self/statm`,
Linux only) and its peak (`resource.getrusage`). Values in MiB (2^20 bytes).
"""

import os
import resource
import sys

import tensorflow as tf

MIB = 2**20
STATM_PATH = "/proc/self/statm"  # "size resident shared ..." in pages


def memory_usage():
    """{TensorBoard tag: MiB} of this process's memory.

    Returns:
      with GPUs: `memory/gpu<i>_mib` and `memory/gpu<i>_peak_mib` for each local GPU i;
      without: `memory/peak_rss_mib`, and `memory/rss_mib` where /proc/self/statm exists.
    """
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return device_memory(len(gpus))
    return host_memory()


def device_memory(num_gpus):
    """{tag: MiB}: current and peak allocator bytes of GPU:0 .. GPU:num_gpus-1."""
    usage = {}
    for index in range(num_gpus):
        info = tf.config.experimental.get_memory_info(f"GPU:{index}")
        usage[f"memory/gpu{index}_mib"] = info["current"] / MIB
        usage[f"memory/gpu{index}_peak_mib"] = info["peak"] / MIB
    return usage


def host_memory():
    """{tag: MiB}: the resident set size now (Linux) and its peak."""
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    usage = {"memory/peak_rss_mib": peak / (MIB if sys.platform == "darwin" else 1024)}
    current = current_rss_bytes()
    if current is not None:
        usage["memory/rss_mib"] = current / MIB
    return usage


def current_rss_bytes():
    """The resident set size now in bytes, or None where /proc/self/statm does not exist."""
    try:
        with open(STATM_PATH) as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
