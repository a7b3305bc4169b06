"""Episodes produced in worker processes, handed back in the order they were asked for (``collect`` runs the
scripted expert there, ``data convert`` renders cameras there).

Workers start with ``forkserver`` (``spawn`` where it does not exist), never ``fork``: a forked child of a process
holding an EGL context or torch's thread pool can hang. Each worker builds its env once, at its first job, so
errors in making it reach the caller.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any


def default_worker_processes() -> int:
    """Two worker processes where the machine has two cores or more (one otherwise): episode jobs on robosuite are
    CPU-bound and the caller mostly waits."""
    return max(1, min(2, os.cpu_count() or 1))


def worker_pool(processes: int) -> ProcessPoolExecutor:
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context(method))


def ordered_results(pool: ProcessPoolExecutor, processes: int, count: int,
                    job: Callable[[int], tuple[Callable[..., Any], tuple]]) -> Iterator[Any]:
    """The results of jobs ``job(0) .. job(count - 1)`` (each a (function, arguments) pair) in that order.

    At most two jobs per process are submitted ahead of the one being waited for, so a caller that stops early
    (enough successes) wastes little, and results are yielded in order whatever finishes first: the output does not
    depend on the number of processes.
    """
    pending: deque[Future] = deque()
    submitted = 0
    while submitted < count or pending:
        while submitted < count and len(pending) < 2 * processes:
            function, arguments = job(submitted)
            pending.append(pool.submit(function, *arguments))
            submitted += 1
        yield pending.popleft().result()
