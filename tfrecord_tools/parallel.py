"""An ordered, bounded parallel map over worker processes."""

import collections
import concurrent.futures
import multiprocessing
import signal


def ordered_map(fn, items, num_workers, max_in_flight=None):
    """Yields fn(item) for each item, in input order, computed by `num_workers` processes.

    At most `max_in_flight` items (default 4 per worker) are submitted and not yet consumed, so
    memory stays flat however many items there are and however slow the consumer is (unlike
    `multiprocessing.Pool.imap`, whose results pile up unboundedly). With `num_workers` <= 1 the
    work runs in this process. Workers are spawned, not forked: the parent may already hold
    TensorFlow's threads, which do not survive a fork.

    Args:
      fn: a picklable function of one argument.
      items: an iterable of picklable arguments; consumed lazily.
      num_workers: the number of worker processes.
      max_in_flight: bound on submitted-but-unconsumed items.
    """
    if num_workers <= 1:
        yield from map(fn, items)
        return
    max_in_flight = max_in_flight or 4 * num_workers
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=num_workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_ignore_interrupts)
    pending = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max_in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ignore_interrupts():
    """Ctrl-C reaches the whole process group; only the parent should act on it (and clean up)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
