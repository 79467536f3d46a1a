"""Machine facts shared by the benchmark scripts' reports (nothing heavy is imported)."""

import importlib.metadata
import platform


def cpu_model():
    """CPU model name from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_gib():
    """Total RAM in GiB from /proc/meminfo."""
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2.0**20
    return float("nan")


def package_version(name):
    """Installed version of a distribution (importlib.metadata, nothing is imported)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def spin(iterations):
    """Pure CPU work (a Python loop, no memory traffic): the unit of `ProcessScaling`."""
    total = 0
    for i in range(iterations):
        total += i
    return total


class ProcessScaling:
    """The machine's own ceiling for two processes against one: the same pure CPU task timed
    alone and as two concurrent copies in two worker processes. On 2 vCPUs that share a physical
    core, or a host with noisy neighbours, this is well below 2, and no workload of ours can
    scale better. `measure()` once per repeat, interleaved with what it bounds; `ceiling()` is
    2 x median(one) / median(two)."""

    def __init__(self, iterations=5_000_000):
        import concurrent.futures
        import multiprocessing
        self.iterations = iterations
        self.one, self.two = [], []
        self._pool = concurrent.futures.ProcessPoolExecutor(
            2, mp_context=multiprocessing.get_context("spawn"))
        for future in [self._pool.submit(spin, 1000) for _ in range(2)]:
            future.result()

    def measure(self):
        import time
        start = time.perf_counter()
        self._pool.submit(spin, self.iterations).result()
        self.one.append(time.perf_counter() - start)
        start = time.perf_counter()
        for future in [self._pool.submit(spin, self.iterations) for _ in range(2)]:
            future.result()
        self.two.append(time.perf_counter() - start)

    def ceiling(self):
        import statistics
        return 2 * statistics.median(self.one) / statistics.median(self.two)

    def close(self):
        self._pool.shutdown()
