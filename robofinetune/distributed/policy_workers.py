"""Env workers that also run the residual policy's rollout: ``train residual --num-env-workers=N --rollout-in-workers``.

Each :class:`ResidualRolloutWorker` (a Ray actor) owns a contiguous share of the run's envs, a copy of the frozen
base, the residual actor and the exploration noise, and steps them with :class:`ResidualActing`, the code the
in-process loop uses; it returns replay rows, not observations, so the learner never runs the policy. The actor's
weights come through Ray's object store (:mod:`robofinetune.distributed.weights`): the learner publishes them
every ``weights_every`` updates and a worker fetches the newest version at the start of each call; every row is
tagged with the version it was collected with, and the learner logs the staleness.

The learner side is :class:`RayPolicyRollout`: one call (``steps`` vector steps) in flight per worker, so a
worker waits for the learner at most between two calls; batches are handed over in the order they finish.

Seeds. A worker is started with (reset seed, base sampling seed, noise seed) from :func:`worker_seeds`, a function
of the run's seed, the env steps done when the rollout started (a resumed run starts from its checkpoint's count)
and the worker's first env; with the same seeds and weights a worker's rows equal those of an in-process
``ResidualActing`` on the same envs. The split into workers changes which random streams each env draws from, as
a different ``num_envs`` does, and the order in which workers' batches arrive depends on timing, so a run through
workers is not repeatable bit for bit.

Faults follow :mod:`robofinetune.distributed.ray_envs`: a killed worker is rebuilt by Ray (``max_restarts``) from
its constructor with a new incarnation token; its in-flight call is lost (those env steps are collected again),
its unfinished episodes are dropped (:attr:`RolloutBatch.dropped_envs`: the learner ends their replay chains and
counts no outcome), and it starts new episodes from fresh seeds: nothing delivered is lost or delivered twice.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robofinetune import logs
from robofinetune.distributed.cluster import import_ray, init_ray
from robofinetune.distributed.ray_envs import (EnvWorkerError, check_cluster_cpus, restore_worker_logs,
                                               start_error, stop_workers)
from robofinetune.distributed.weights import WeightBroadcaster, WeightSubscriber, load_numpy_state
from robofinetune.errors import ConfigError

#: How long to wait for a policy worker to start or come back after a crash. Longer than an env worker's: it
#: imports torch and the learner's modules and loads the base (measured: over 120 s on the loaded 2-core
#: machine at nice 19, a few seconds when idle).
DEFAULT_START_TIMEOUT_S = 300.0


def worker_seeds(run_seed: int, env_steps: int, first_env: int, restarts: int = 0) -> tuple[int, int, int]:
    """(reset seed, base sampling seed, noise seed) of a worker whose envs start at global index ``first_env``.

    The reset seed is the in-process path's (``200_000 + 1_000 * seed + env steps``, env i adding i), so a worker
    resets its envs as the in-process loop would. After the worker's ``restarts``-th restart the seeds come from
    (run seed, env steps, first env, restarts) instead: the restarted worker must not replay the episodes of its
    previous life."""
    reset_seed = 200_000 + 1_000 * run_seed + env_steps + first_env
    if restarts:
        entropy = [run_seed, env_steps, first_env, restarts]
        reset_seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0] >> np.uint32(1))
    noise_seed = int(np.random.SeedSequence([reset_seed, 1]).generate_state(1, np.uint32)[0])
    return reset_seed, reset_seed, noise_seed


class ResidualRolloutWorker:
    """Ray actor: the envs ``env_indices`` of the run (env i built with ``env_seed + i``), base + residual acting
    on them (:class:`robofinetune.rl.residual_acting.ResidualActing`) and a weight subscriber.

    ``actor_kwargs``: :class:`robofinetune.algos.residual.ResidualActor`'s constructor arguments; its weights
    arrive from ``weight_store``. ``feature_kind``: what the actor sees of a frame (``rl.features``).
    ``overrides``: make_env's task overrides (e.g. a short ``horizon`` in tests). ``incarnation`` is new each
    time Ray (re)builds the actor; calls carry the token they expect.
    """

    def __init__(self, task: str, env_seed: int, env_indices: list[int], base_path: str, actor_kwargs: dict[str, Any],
                 feature_kind: str, exploration_noise: float, warmup_noise: float, weight_store: Any,
                 log_settings: dict[str, str | None], overrides: dict[str, Any] | None = None) -> None:
        import torch

        from robofinetune.algos.residual import ResidualActor
        from robofinetune.envs import load_task_spec, make_vector_env
        from robofinetune.rl.features import FrozenFeatures, observation_encoder_of
        from robofinetune.rl.setup import load_base_policy

        restore_worker_logs(log_settings)
        torch.set_num_threads(1)   # one simulator loop and a small MLP: one core, as Ray reserved
        self.env_indices = np.asarray(env_indices, np.int64)
        # the envs step one after another in this process, as the subprocess vector env's workers do
        self.envs = make_vector_env(task, len(env_indices), seed=env_seed, asynchronous=False, **(overrides or {}))
        self.base = load_base_policy(base_path, task).requires_grad_(False).eval()
        # as train residual computes replay rows: the task's keys, the base's own encoder for camera tasks
        self.features = FrozenFeatures(feature_kind, list(load_task_spec(task).obs_keys),
                                       observation_encoder_of(self.base))
        self.actor = ResidualActor(**actor_kwargs).requires_grad_(False)
        self.exploration_noise, self.warmup_noise = exploration_noise, warmup_noise
        self.subscriber = WeightSubscriber(weight_store)
        self.acting: Any = None
        self.incarnation = uuid.uuid4().hex

    def identity(self) -> tuple[str, int]:
        """(incarnation token, process id): the pid lets tests kill this worker."""
        return self.incarnation, os.getpid()

    def start(self, reset_seed: int, sampling_seed: int, noise_seed: int) -> str:
        """Start new episodes on every env from these seeds (:func:`worker_seeds`); return the incarnation."""
        from robofinetune.rl import VectorRollout
        from robofinetune.rl.residual_acting import ResidualActing

        self.acting = ResidualActing(VectorRollout(self.envs), self.base, self.actor, self.features,
                                     np.random.default_rng(noise_seed), self.exploration_noise, self.warmup_noise)
        self.acting.start(reset_seed, sampling_seed)
        return self.incarnation

    def sync_weights(self) -> int:
        """Load the newest published actor weights if there are newer ones; the version acted with."""
        state = self.subscriber.poll()
        if state is not None:
            load_numpy_state(self.actor, state)
        return self.subscriber.version

    def run(self, steps: int, warming_up: bool, incarnation: str) -> dict[str, Any] | None:
        """``steps`` vector steps with the newest weights; None when this is not the incarnation the caller
        expects (Ray rebuilt this worker: it has to be started again, its old episodes are gone).

        Returns ``rows`` (the seven arrays ``train residual``'s ``store`` takes, step after step, env order
        within a step), ``env_index`` (global) and ``version`` per row, and ``finished`` (EpisodeOutcome with
        global env indices)."""
        if incarnation != self.incarnation or self.acting is None:
            return None
        version = self.sync_weights()
        if version < 0 and not warming_up:
            raise RuntimeError("policy worker asked to act with the residual actor before any weights were published")
        rows, finished = [], []
        for _ in range(steps):
            row, transitions = self.acting.step(warming_up)
            rows.append(row)
            for outcome in transitions.finished:
                outcome.env_index = int(self.env_indices[outcome.env_index])
                finished.append(outcome)
        columns = tuple(np.concatenate(parts) for parts in zip(*rows))
        return {"rows": columns, "env_index": np.tile(self.env_indices, steps),
                "version": np.full(steps * len(self.env_indices), version, np.int64), "finished": finished}

    def close(self) -> None:
        self.envs.close()


@dataclass(eq=False)   # rows are arrays: batches compare by identity
class RolloutBatch:
    """What one worker call delivered: ``rows`` for the replay (None when the call was lost to a crash),
    ``env_index`` and weights ``version`` per row, the episodes that ``finished``, and ``dropped_envs``: envs
    whose unfinished episodes a worker crash dropped (their replay chains end at the last delivered row)."""

    worker: int
    rows: tuple[np.ndarray, ...] | None
    env_index: np.ndarray
    version: np.ndarray
    finished: list[Any] = field(default_factory=list)
    dropped_envs: list[int] = field(default_factory=list)

    @property
    def env_steps(self) -> int:
        return len(self.env_index)


class RayPolicyRollout:
    """Learner side of the policy workers (module docstring): ``num_workers`` :class:`ResidualRolloutWorker`\\ s
    over ``num_envs`` envs, one call of up to ``steps_per_call`` vector steps in flight on each.

    Usage: :meth:`start` (publishes the first weights and starts the episodes), then :meth:`next_batch` until it
    returns None (the env-step budget is spent), :meth:`publish` after learner updates, :meth:`close`.
    Counters: ``restarts`` (worker restarts handled), ``dropped_episodes``, ``lost_env_steps``.
    """

    def __init__(self, task: str, num_envs: int, num_workers: int, env_seed: int, base_path: str | Path,
                 actor_kwargs: dict[str, Any], feature_kind: str, exploration_noise: float, warmup_noise: float,
                 warmup_steps: int, run_seed: int, steps_per_call: int = 8, weights_every: int = 10,
                 ray_address: str | None = None, cpus_per_worker: float = 1.0, max_restarts: int = -1,
                 restart_timeout_s: float = DEFAULT_START_TIMEOUT_S, overrides: dict[str, Any] | None = None) -> None:
        if not 1 <= num_workers <= num_envs:
            raise ConfigError(f"num_env_workers must be between 1 and num_envs ({num_envs}), got {num_workers}")
        if steps_per_call < 1:
            raise ConfigError(f"config field 'worker_steps' must be >= 1, got {steps_per_call}")
        if weights_every < 1:
            raise ConfigError(f"config field 'weights_every' must be >= 1, got {weights_every}")
        self._ray = import_ray()
        self._owns_ray = init_ray(ray_address)
        self.closed = False
        self.shares = [list(map(int, share)) for share in np.array_split(np.arange(num_envs), num_workers)]
        self.warmup_steps, self.run_seed, self.steps_per_call = warmup_steps, run_seed, steps_per_call
        self._max_restarts, self._restart_timeout_s = max_restarts, restart_timeout_s
        self.restarts = 0
        self.dropped_episodes = 0
        self.lost_env_steps = 0
        self._restarts_per_worker = np.zeros(num_workers, np.int64)
        self._in_flight: dict[Any, tuple[int, int]] = {}   # call reference -> (worker, env steps it claimed)
        self._claimed = 0          # env steps received or in flight
        self._total = 0
        self._start_steps = 0
        self.workers: list[Any] = []
        self.broadcaster: WeightBroadcaster | None = None
        try:
            check_cluster_cpus(self._ray, num_workers, cpus_per_worker)
            self.broadcaster = WeightBroadcaster(weights_every)
            remote = self._ray.remote(ResidualRolloutWorker).options(num_cpus=cpus_per_worker,
                                                                     max_restarts=max_restarts, max_task_retries=0)
            log_settings = logs.snapshot()
            self.workers = [remote.remote(task, env_seed + share[0], share, str(base_path), actor_kwargs, feature_kind,
                                          exploration_noise, warmup_noise, self.broadcaster.store, log_settings,
                                          overrides)
                            for share in self.shares]
            identities = self._ray.get([worker.identity.remote() for worker in self.workers],
                                       timeout=restart_timeout_s)
        except BaseException as error:
            self.close()
            translated = start_error(self._ray, error, "policy workers", task, restart_timeout_s)
            if translated is not None:
                raise translated from error
            raise
        self.incarnations = [token for token, _ in identities]
        self.pids = [pid for _, pid in identities]

    def start(self, env_steps: int, total_env_steps: int, updates: int, actor: Any) -> None:
        """Publish ``actor``'s weights as version ``updates``, start every worker's episodes (seeds from
        ``env_steps``, the run's count so far) and put the first call in flight on each."""
        self.broadcaster.publish(updates, actor)
        self._start_steps, self._claimed, self._total = env_steps, env_steps, total_env_steps
        seeds = [worker_seeds(self.run_seed, env_steps, share[0]) for share in self.shares]
        self.incarnations = self._ray.get([worker.start.remote(*seed) for worker, seed in zip(self.workers, seeds)])
        for worker_index in range(len(self.workers)):
            self._submit(worker_index)

    def publish(self, updates: int, actor: Any) -> bool:
        """Publish the weights if ``weights_every`` updates passed since the last publication."""
        return self.broadcaster.maybe_publish(updates, actor)

    def next_batch(self) -> RolloutBatch | None:
        """The next call to finish (its worker gets its next call at once), or None when nothing is in flight
        because the env-step budget is claimed."""
        if not self._in_flight:
            return None
        ready, _ = self._ray.wait(list(self._in_flight), num_returns=1)
        worker_index, claimed = self._in_flight.pop(ready[0])
        try:
            result = self._ray.get(ready[0])
        except self._ray.exceptions.RayActorError as error:
            result = error
        if result is None or isinstance(result, BaseException):
            self._claimed -= claimed   # lost with the call: those env steps are collected again
            self.lost_env_steps += claimed
            self._restart(worker_index, result if result is not None else "restarted since its last call")
            self._submit(worker_index)
            share = self.shares[worker_index]
            return RolloutBatch(worker_index, None, np.zeros(0, np.int64), np.zeros(0, np.int64), [], list(share))
        self._submit(worker_index)
        return RolloutBatch(worker_index, result["rows"], result["env_index"], result["version"], result["finished"])

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        stop_workers(self._ray, self.workers)
        if self.broadcaster is not None:
            self._ray.kill(self.broadcaster.store)
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False

    # -- internals -----------------------------------------------------------------------------------------------

    def _submit(self, worker_index: int) -> None:
        """Put the worker's next call in flight: up to ``steps_per_call`` steps of the budget not yet claimed;
        warm-up (uniform noise, no actor) while the env steps before the call are fewer than ``warmup_steps``."""
        share = self.shares[worker_index]
        left = self._total - self._claimed
        if left <= 0:
            return
        steps = min(self.steps_per_call, math.ceil(left / len(share)))
        warming_up = self._claimed < self.warmup_steps
        ref = self.workers[worker_index].run.remote(steps, warming_up, self.incarnations[worker_index])
        self._in_flight[ref] = (worker_index, steps * len(share))
        self._claimed += steps * len(share)

    def _restart(self, worker_index: int, error: Any) -> None:
        """Wait for Ray to bring the worker back, start fresh episodes on it (seeds counting its restarts)."""
        ray = self._ray
        share = self.shares[worker_index]
        what = f"policy worker {worker_index} (envs {share[0]}..{share[-1]})"
        if 0 <= self._max_restarts <= self._restarts_per_worker[worker_index]:
            raise EnvWorkerError(f"{what} died after its {self._max_restarts} restarts: {error}")
        self._restarts_per_worker[worker_index] += 1
        seeds = worker_seeds(self.run_seed, self._start_steps, share[0], int(self._restarts_per_worker[worker_index]))
        deadline = time.monotonic() + self._restart_timeout_s
        last_error = error
        while time.monotonic() < deadline:
            try:
                worker = self.workers[worker_index]
                self.incarnations[worker_index] = ray.get(worker.start.remote(*seeds),
                                                          timeout=max(deadline - time.monotonic(), 0.1))
                _, self.pids[worker_index] = ray.get(worker.identity.remote(), timeout=30)
                self.restarts += 1
                self.dropped_episodes += len(share)
                return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as retry_error:
                last_error = retry_error
                time.sleep(0.2)   # calls to an actor Ray is still restarting fail at once
        raise EnvWorkerError(f"{what} died and was not back within {self._restart_timeout_s:.0f} s: {last_error}")
