"""Episodes produced in worker processes, handed back in the order they were asked for (``collect`` runs the
scripted expert there, ``data convert`` renders cameras there).

Workers start with ``forkserver`` (``spawn`` where it does not exist), never ``fork``: a forked child of a process
holding an EGL context or torch's thread pool can hang. Each worker builds its env once, at its first job, so
errors in making it reach the caller.

:class:`RayWorkerPool` runs the same jobs in Ray actors instead (``collect --num-env-workers``), behind the same
``submit`` / ``shutdown`` interface, so :func:`ordered_results` hands back the same results in the same order.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from robofinetune import logs


def default_worker_processes() -> int:
    """Two worker processes where the machine has two cores or more (one otherwise): episode jobs on robosuite are
    CPU-bound and the caller mostly waits."""
    return max(1, min(2, os.cpu_count() or 1))


def worker_pool(processes: int) -> ProcessPoolExecutor:
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context(method))


def ordered_results(pool: ProcessPoolExecutor | RayWorkerPool, processes: int, count: int,
                    job: Callable[[int], tuple[Callable[..., Any], tuple]]) -> Iterator[Any]:
    """The results of jobs ``job(0) .. job(count - 1)`` (each a (function, arguments) pair) in that order.

    At most two jobs per process are submitted ahead of the one being waited for, so a caller that stops early
    (enough successes) wastes little, and results are yielded in order whatever finishes first: the output does not
    depend on the number of processes.
    """
    pending: deque[Future | RayJob] = deque()
    submitted = 0
    while submitted < count or pending:
        while submitted < count and len(pending) < 2 * processes:
            function, arguments = job(submitted)
            pending.append(pool.submit(function, *arguments))
            submitted += 1
        yield pending.popleft().result()


class JobWorker:
    """One Ray actor of a :class:`RayWorkerPool`: runs the jobs sent to it one after another in its own process,
    as a local pool's worker process does (a module-level cache a job fills, like collect's env, lives on)."""

    def __init__(self, log_settings: dict[str, str | None]) -> None:
        from robofinetune.distributed.ray_envs import restore_worker_logs

        restore_worker_logs(log_settings)

    def ready(self) -> bool:
        return True

    def run(self, function: Callable[..., Any], arguments: tuple) -> Any:
        return function(*arguments)


class RayJob:
    """A job submitted to a :class:`RayWorkerPool`; ``result()`` waits for it as ``Future.result()`` does."""

    def __init__(self, ray: Any, ref: Any, worker_index: int) -> None:
        self._ray, self._ref, self.worker_index = ray, ref, worker_index

    def result(self) -> Any:
        from robofinetune.distributed.ray_envs import EnvWorkerError

        try:
            return self._ray.get(self._ref)
        except self._ray.exceptions.RayActorError as error:   # a job's own exception propagates as it is
            raise EnvWorkerError(f"worker {self.worker_index} died and was not restarted: {error}") from error


class RayWorkerPool:
    """``processes`` Ray actors (:class:`JobWorker`, one CPU each) with the ``submit`` / ``shutdown`` of the local
    ``ProcessPoolExecutor`` that :func:`ordered_results` drives.

    Jobs go to the actors in turn. A killed actor is rebuilt by Ray and its unfinished jobs run again on it
    (``max_restarts`` times at most), so a job must give the same result whenever it runs: collect's episodes are
    fixed by their seeds. ``ray_address`` as for the Ray env workers: None/"" starts a local Ray (shut down again
    by :meth:`shutdown`), "auto" or "ray://host:port" joins a cluster; an existing connection is used as it is.
    """

    def __init__(self, processes: int, task: str, ray_address: str | None = None, max_restarts: int = 3,
                 start_timeout_s: float = 120.0) -> None:
        from robofinetune.distributed.cluster import import_ray, init_ray
        from robofinetune.distributed.ray_envs import check_cluster_cpus, start_error

        self._ray = import_ray()
        self._owns_ray = init_ray(ray_address)
        self.workers: list[Any] = []
        self._submitted = 0
        try:
            check_cluster_cpus(self._ray, processes, 1.0)
            remote = self._ray.remote(JobWorker).options(num_cpus=1, max_restarts=max_restarts,
                                                         max_task_retries=max_restarts)
            log_settings = logs.snapshot()
            self.workers = [remote.remote(log_settings) for _ in range(processes)]
            self._ray.get([worker.ready.remote() for worker in self.workers], timeout=start_timeout_s)
        except BaseException as error:
            self.shutdown()
            translated = start_error(self._ray, error, "episode workers", task, start_timeout_s)
            if translated is not None:
                raise translated from error
            raise

    def submit(self, function: Callable[..., Any], *arguments: Any) -> RayJob:
        index = self._submitted % len(self.workers)
        self._submitted += 1
        return RayJob(self._ray, self.workers[index].run.remote(function, arguments), index)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Kill the actors (jobs not yet done are dropped) and end the Ray this pool started, if it did."""
        for worker in self.workers:
            self._ray.kill(worker)   # no restart
        self.workers = []
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False
