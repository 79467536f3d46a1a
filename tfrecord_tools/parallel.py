"""An ordered, bounded parallel map over worker processes."""

import collections
import concurrent.futures
import multiprocessing
import os
import signal
import threading
import time

# How often a worker checks that its parent still exists, in seconds: the delay with which
# workers follow a parent killed by SIGKILL.
PARENT_CHECK_SECONDS = 0.5
ORPHANED_EXIT_CODE = 1


def ordered_map(fn, items, num_workers, max_in_flight=None):
    """Yields fn(item) for each item, in input order, computed by `num_workers` processes.

    At most `max_in_flight` items (default 4 per worker) are submitted and not yet consumed, so
    memory stays flat however many items there are and however slow the consumer is (unlike
    `multiprocessing.Pool.imap`, whose results pile up unboundedly). With `num_workers` <= 1 the
    work runs in this process. Workers are spawned, not forked: the parent may already hold
    TensorFlow's threads, which do not survive a fork. Workers exit by themselves when the parent
    dies without shutting them down (`kill -9`), within PARENT_CHECK_SECONDS.

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
        initializer=_init_worker, initargs=(os.getpid(),))
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


def _init_worker(parent_pid):
    """Runs first in each worker: leaves Ctrl-C to the parent, and follows the parent's death.

    Ctrl-C reaches the whole process group; only the parent should act on it (and clean up).
    A parent killed by SIGKILL cannot shut its pool down, and its workers would wait on the task
    queue forever: they hold that queue's write end themselves, so no end-of-file ever comes. So
    each worker watches its parent pid from a daemon thread and exits once it has been
    re-parented (to init or a subreaper), which is portable and needs no cooperation from the
    dead parent.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), name="parent-watch",
                     daemon=True).start()


def _exit_when_orphaned(parent_pid):
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(ORPHANED_EXIT_CODE)  # at once: the main thread may be blocked on the task queue
