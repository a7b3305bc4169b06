"""A vector env whose environments live in Ray actors, with the subprocess vector env's interface and semantics.

``RayVectorEnv`` behaves like the ``AsyncVectorEnv`` that ``make_vector_env`` returns: env ``i`` is built by
``make_env(task, seed=seed + i)``, ``reset(seed=s)`` reseeds env ``i`` with ``s + i``, ``step_async`` /
``step_wait`` overlap the simulators with the caller's work, and autoreset is SAME_STEP (a finished env's last
observation in ``info["final_obs"]``, its step info in ``info["final_info"]``). The environments are split into
``num_workers`` contiguous shares, one Ray actor (:class:`EnvWorker`) each, on whichever nodes Ray places them.

Faults. Each actor is created with ``max_restarts``; a killed actor (``kill -9``, a lost node, ``ray.kill(actor,
no_restart=False)``) is rebuilt by Ray from its constructor. The step that was in flight on it never completed,
so its envs cannot deliver that step's transition. For each of them ``step_wait`` reports the episode as
**aborted**: ``truncated[i]`` is True (so every consumer ends the episode and the replay ends its n-step chain),
``reward[i]`` is 0, ``info["final_obs"][i]`` is the last observation delivered for it (so the row is not a real
transition), ``info["final_info"]["is_success"][i]`` is False and ``info["final_info"]["aborted"][i]`` is True;
``obs[i]`` is the first observation of a new episode from a fresh seed. A consumer that reads ``aborted`` drops
that row and does not count the episode as a failure. Every transition delivered before the kill stays as it
was, and none is delivered twice: the restarted actor starts new episodes, it never replays old ones.
An actor that was restarted while idle (between two steps) is found by its incarnation token and handled alike.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array

from robofinetune import logs
from robofinetune.distributed.cluster import import_ray, init_ray
from robofinetune.envs.spec import TaskSpec
from robofinetune.errors import ConfigError, RobofinetuneError

#: How long step_wait waits for Ray to bring a killed worker back (robosuite's first construction takes ~5 s).
DEFAULT_RESTART_TIMEOUT_S = 120.0


class EnvWorkerError(RobofinetuneError):
    """An env worker died and was not restarted (its restarts are used up, or it did not come back in time)."""


def restore_worker_logs(log_settings: dict[str, str | None]) -> None:
    """In a worker: the driver's logging settings (``logs.snapshot()``), without its log file when the driver's
    run folder is not on this machine."""
    log_file = log_settings.get(logs.LOG_FILE_ENV)
    if log_file and not Path(log_file).parent.is_dir():   # another machine: the driver's run folder is not here
        log_settings = {**log_settings, logs.LOG_FILE_ENV: None}
    logs.restore(log_settings)


def check_env_workers(num_envs: int, num_workers: int, seed: int = 0) -> None:
    """ConfigError, naming the config field, for a split Ray env workers cannot make: each worker needs at least
    one env, and the env seeds (``seed + i``) must be >= 0. Commands call it before loading anything slow."""
    if not 1 <= num_workers <= num_envs:
        raise ConfigError(f"num_env_workers must be between 1 and num_envs ({num_envs}), got {num_workers}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0 for Ray env workers, got {seed}")


def check_cluster_cpus(ray: Any, num_workers: int, cpus_per_worker: float, kind: str = "env workers") -> None:
    """A worker Ray cannot place waits forever: refuse now, naming the config field, when the cluster lacks CPUs."""
    needed, total = num_workers * cpus_per_worker, ray.cluster_resources().get("CPU", 0.0)
    if needed > total:
        raise ConfigError(f"{num_workers} {kind} reserve {needed:g} CPUs but the Ray cluster has {total:g}: use fewer "
                          f"workers (config field 'num_env_workers'), or add nodes (`ray start --address=<head>:6379`)")


def start_error(ray: Any, error: BaseException, kind: str, task: str, timeout_s: float) -> EnvWorkerError | None:
    """The error to raise when workers failed to start (their own exception, or the time-out), or None for an
    error that is not Ray's and should propagate as it is."""
    if isinstance(error, ray.exceptions.RayActorError):   # e.g. make_env raised in a worker
        cause = str(error).strip().splitlines()[-1]   # the worker's own exception, last in Ray's report
        return EnvWorkerError(f"{kind} for task '{task}' failed to start: {cause}")
    if isinstance(error, ray.exceptions.GetTimeoutError):
        return EnvWorkerError(f"{kind} for task '{task}' did not start within {timeout_s:.0f} s "
                              f"(`ray status` shows what the cluster lacks)")
    return None


def stop_workers(ray: Any, workers: list[Any]) -> None:
    """Close the workers' envs where they still answer, then kill them without restart."""
    try:
        ray.get([worker.close.remote() for worker in workers], timeout=30)
    except (ray.exceptions.RayError, TimeoutError):
        pass   # a dead or hung worker is killed below anyway
    for worker in workers:
        ray.kill(worker)   # no_restart: closed workers stay gone


class EnvWorker:
    """One Ray actor: a share of the vector env's environments, stepped one after another in this process.

    ``incarnation`` is new every time Ray (re)builds the actor, so the driver can tell a restarted actor from the
    one it was talking to. Steps carry the token they expect; a restarted actor refuses them (returns None)
    instead of stepping fresh environments with actions chosen for the old ones.
    """

    def __init__(self, spec: TaskSpec, seeds: list[int], render: bool, overrides: dict[str, Any],
                 log_settings: dict[str, str | None]) -> None:
        from robofinetune.envs import make_env

        restore_worker_logs(log_settings)
        self.envs = [make_env(spec, seed=seed, render=render, **overrides) for seed in seeds]
        self.incarnation = uuid.uuid4().hex

    def identity(self) -> tuple[str, int]:
        """(incarnation token, process id): the pid lets tests and benchmarks kill this worker."""
        return self.incarnation, os.getpid()

    def node_id(self) -> str:
        """The Ray node this worker runs on (benchmarks check that workers were spread over nodes)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def reset(self, seeds: list[int | None], options: dict[str, Any] | None) -> tuple[str, list[tuple[Any, dict]]]:
        return self.incarnation, [env.reset(seed=seed, options=options) for env, seed in zip(self.envs, seeds)]

    def step(self, actions: np.ndarray, incarnation: str) -> list[tuple[Any, Any, bool, bool, dict]] | None:
        """One step of each env; SAME_STEP autoreset exactly as gymnasium's AsyncVectorEnv worker does it."""
        if incarnation != self.incarnation:
            return None
        results = []
        for env, action in zip(self.envs, actions):
            observation, reward, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                reset_observation, reset_info = env.reset()
                info = {"final_info": info, "final_obs": observation, **reset_info}
                observation = reset_observation
            results.append((observation, reward, terminated, truncated, info))
        return results

    def render(self) -> list[Any]:
        return [env.render() for env in self.envs]

    def close(self) -> None:
        for env in self.envs:
            env.close()


class RayVectorEnv(gymnasium.vector.VectorEnv):
    """``num_envs`` environments of ``spec`` in ``num_workers`` Ray actors (module docstring).

    ``ray_address``: None/"" starts a local Ray (shut down again by :meth:`close`), "auto" or "ray://host:port"
    joins a cluster; if this process already called ``ray.init`` that connection is used and left open.
    ``cpus_per_worker`` is what each actor reserves from Ray's scheduler (one simulator loop is one core);
    ``max_restarts`` how often Ray may rebuild each actor (-1: without limit).

    Counters for logs and benchmarks: ``restarts`` (worker restarts handled), ``aborted_episodes``,
    ``recovery_seconds`` (per restart, from the failed step to the fresh episodes being ready).
    """

    def __init__(self, spec: TaskSpec, num_envs: int, seed: int = 0, num_workers: int = 1, render: bool = False,
                 overrides: dict[str, Any] | None = None, ray_address: str | None = None,
                 cpus_per_worker: float = 1.0, max_restarts: int = -1,
                 restart_timeout_s: float = DEFAULT_RESTART_TIMEOUT_S) -> None:
        from robofinetune.envs import _WRAPPER_KWARGS, AUTORESET_MODE
        from robofinetune.envs.base import action_space, observation_space

        check_env_workers(num_envs, num_workers, seed)
        overrides = dict(overrides or {})
        task_overrides = {key: value for key, value in overrides.items() if key not in _WRAPPER_KWARGS}
        spec_here = spec.replace(**task_overrides) if task_overrides else spec
        self.num_envs = num_envs
        self.single_observation_space = observation_space(spec_here)
        self.single_action_space = action_space(spec_here)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.metadata = {"render_modes": ["rgb_array"], "render_fps": spec_here.control_freq,
                         "autoreset_mode": AUTORESET_MODE}
        self.render_mode = "rgb_array" if render else None
        self.closed = True   # until the workers exist: nothing for close() (or __del__) to do before that

        self._ray = import_ray()
        self._owns_ray = init_ray(ray_address)
        self._seed = seed
        self._max_restarts = max_restarts
        self._restart_timeout_s = restart_timeout_s
        #: env indices of each worker, contiguous so row order is env order
        self.shares = [list(map(int, share)) for share in np.array_split(np.arange(num_envs), num_workers)]
        self.restarts = 0
        self.aborted_episodes = 0
        self.recovery_seconds: list[float] = []
        self._aborts_per_env = np.zeros(num_envs, np.int64)
        self._restarts_per_worker = np.zeros(num_workers, np.int64)
        self._last_obs: list[Any] = [None] * num_envs
        self._pending: list[Any] | None = None
        self.workers: list[Any] = []
        try:
            check_cluster_cpus(self._ray, num_workers, cpus_per_worker)
            remote = self._ray.remote(EnvWorker).options(num_cpus=cpus_per_worker, max_restarts=max_restarts,
                                                          max_task_retries=0)
            log_settings = logs.snapshot()
            self.workers = [remote.remote(spec, [seed + index for index in share], render, overrides, log_settings)
                            for share in self.shares]
            identities = self._ray.get([worker.identity.remote() for worker in self.workers],
                                       timeout=restart_timeout_s)
        except BaseException as error:
            for worker in self.workers:
                self._ray.kill(worker)
            self._shutdown_ray()
            translated = start_error(self._ray, error, "env workers", spec.name, restart_timeout_s)
            if translated is not None:
                raise translated from error
            raise
        self.incarnations = [token for token, _ in identities]
        self.pids = [pid for _, pid in identities]
        self.closed = False

    # -- gymnasium VectorEnv interface -------------------------------------------------------------------------

    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Reset every env: ``seed`` an int (env i gets ``seed + i``), a list (one per env) or None."""
        if self._pending is not None:
            raise RuntimeError("reset() while a step_async() is waiting for step_wait()")
        if options and "reset_mask" in options:
            raise ValueError("RayVectorEnv.reset does not take options['reset_mask'] (SAME_STEP autoreset resets "
                             "finished envs itself)")
        if seed is None:
            seeds: list[int | None] = [None] * self.num_envs
        elif isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + index for index in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"reset: {len(seeds)} seeds for {self.num_envs} envs")
        refs = [worker.reset.remote([seeds[i] for i in share], options)
                for worker, share in zip(self.workers, self.shares)]
        per_env: list[tuple[Any, dict]] = [None] * self.num_envs   # type: ignore[list-item]
        for worker_index, ref in enumerate(refs):
            share = self.shares[worker_index]
            try:
                token, results = self._ray.get(ref)
            except self._ray.exceptions.RayActorError as error:
                # a reset starts new episodes anyway: repeat it on the restarted worker, nothing is aborted
                start = time.monotonic()
                token, results = self._call_restarted(worker_index, "reset", [seeds[i] for i in share], options,
                                                      error=error)
                self._count_restart(worker_index, time.monotonic() - start)
            self.incarnations[worker_index] = token
            for index, result in zip(share, results):
                per_env[index] = result
        infos: dict[str, Any] = {}
        for index, (observation, info) in enumerate(per_env):
            self._last_obs[index] = observation
            infos = self._add_info(infos, info, index)
        return self._batch([observation for observation, _ in per_env]), infos

    def step_async(self, actions: np.ndarray) -> None:
        if self._pending is not None:
            raise RuntimeError("step_async() twice without step_wait()")
        actions = np.asarray(actions)
        if len(actions) != self.num_envs:
            raise ValueError(f"step: {len(actions)} actions for {self.num_envs} envs")
        self._pending = [worker.step.remote(actions[share], token)
                         for worker, share, token in zip(self.workers, self.shares, self.incarnations)]

    def step_wait(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if self._pending is None:
            raise RuntimeError("step_wait() without step_async()")
        refs, self._pending = self._pending, None
        try:   # one wait for all workers, the common case
            gathered: list[Any] = self._ray.get(refs)
        except self._ray.exceptions.RayActorError:
            gathered = [self._get_or_error(ref) for ref in refs]   # which of them failed
        per_env: list[tuple[Any, Any, bool, bool, dict]] = [None] * self.num_envs   # type: ignore[list-item]
        for worker_index, results in enumerate(gathered):
            share = self.shares[worker_index]
            failure = results if isinstance(results, BaseException) else "restarted since the last step"
            if results is None or isinstance(results, BaseException):
                results = self._abort_worker_episodes(worker_index, failure)
            for index, result in zip(share, results):
                per_env[index] = result
        infos: dict[str, Any] = {}
        for index, (observation, _, _, _, info) in enumerate(per_env):
            self._last_obs[index] = observation
            infos = self._add_info(infos, info, index)
        return (self._batch([result[0] for result in per_env]),
                np.array([result[1] for result in per_env], dtype=np.float64),
                np.array([result[2] for result in per_env], dtype=np.bool_),
                np.array([result[3] for result in per_env], dtype=np.bool_),
                infos)

    def step(self, actions: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray,
                                                 dict[str, Any]]:
        self.step_async(actions)
        return self.step_wait()

    def render(self) -> tuple[Any, ...]:
        frames = self._ray.get([worker.render.remote() for worker in self.workers])
        return tuple(frame for share_frames in frames for frame in share_frames)

    def close_extras(self, **kwargs: Any) -> None:
        stop_workers(self._ray, getattr(self, "workers", []))
        self._shutdown_ray()

    # -- faults --------------------------------------------------------------------------------------------------

    def _abort_worker_episodes(self, worker_index: int, failure: Any) -> list[tuple[Any, Any, bool, bool, dict]]:
        """The step rows of a worker whose step did not complete: its episodes aborted (module docstring), new
        ones started from fresh seeds on the restarted worker."""
        start = time.monotonic()
        share = self.shares[worker_index]
        for index in share:
            self._aborts_per_env[index] += 1
        seeds = [self._fresh_seed(index) for index in share]
        token, resets = self._call_restarted(worker_index, "reset", seeds, None, error=failure)
        self.incarnations[worker_index] = token
        self._count_restart(worker_index, time.monotonic() - start)
        self.aborted_episodes += len(share)
        rows = []
        for index, (observation, reset_info) in zip(share, resets):
            info = {**reset_info, "final_obs": self._last_obs[index],
                    "final_info": {"is_success": False, "aborted": True}}
            rows.append((observation, 0.0, False, True, info))
        return rows

    def _get_or_error(self, ref: Any) -> Any:
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayActorError as error:
            return error

    def _fresh_seed(self, index: int) -> int:
        """A reset seed for env ``index`` after its ``n``-th abort: a function of (seed, env, n) alone, so a run
        is reproducible given where the faults fell, and distinct from the seeds of earlier episodes' resets."""
        entropy = [self._seed, index, int(self._aborts_per_env[index])]
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])

    def _call_restarted(self, worker_index: int, method: str, *args: Any, error: Any) -> Any:
        """Call ``method`` on a worker that died, once Ray has restarted it; EnvWorkerError when it does not come
        back (restarts used up, or not within ``restart_timeout_s``)."""
        ray = self._ray
        share = self.shares[worker_index]
        what = f"env worker {worker_index} (envs {share[0]}..{share[-1]})"
        if 0 <= self._max_restarts <= self._restarts_per_worker[worker_index]:
            raise EnvWorkerError(f"{what} died after its {self._max_restarts} restarts: {error}")
        deadline = time.monotonic() + self._restart_timeout_s
        last_error = error
        while time.monotonic() < deadline:
            try:
                result = ray.get(getattr(self.workers[worker_index], method).remote(*args),
                                 timeout=max(deadline - time.monotonic(), 0.1))
                _, pid = ray.get(self.workers[worker_index].identity.remote(), timeout=30)
                self.pids[worker_index] = pid
                return result
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as retry_error:
                last_error = retry_error
                time.sleep(0.2)   # calls to an actor Ray is still restarting fail at once
        raise EnvWorkerError(f"{what} died and was not back within {self._restart_timeout_s:.0f} s: {last_error}")

    def _count_restart(self, worker_index: int, seconds: float) -> None:
        self.restarts += 1
        self._restarts_per_worker[worker_index] += 1
        self.recovery_seconds.append(seconds)

    # -- helpers -------------------------------------------------------------------------------------------------

    def _batch(self, observations: list[Any]) -> Any:
        return concatenate(self.single_observation_space, observations,
                           create_empty_array(self.single_observation_space, self.num_envs))

    def _shutdown_ray(self) -> None:
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False


def make_training_ray_envs(task: str, num_envs: int, seed: int, num_workers: int, ray_address: str = "",
                           intervener: str = "none", teleop: str = "") -> RayVectorEnv:
    """The vector env of an online RL run (``train residual --num-env-workers=N``) in ``num_workers`` Ray actors.

    Interventions are refused rather than silently dropped: a scripted intervener reads the simulator inside the
    env worker and a teleop operator sits at the robot, neither of which the Ray workers carry yet."""
    from robofinetune.envs import make_vector_env

    if intervener != "none" or teleop:
        raise ConfigError("config field 'num_env_workers' (Ray env workers) cannot be combined with 'intervener' or "
                          "'teleop' yet: run interventions with num_env_workers=0 (local env processes)")
    return make_vector_env(task, num_envs, seed=seed, backend="ray", num_workers=num_workers,
                           ray_address=ray_address or None)
