"""Collect demonstration episodes by running a scripted expert in ``make_env(task)``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from robofinetune import logs
from robofinetune.data.episode import Episode
from robofinetune.data.workers import RayWorkerPool, default_worker_processes, ordered_results, worker_pool
from robofinetune.envs import TaskSpec, load_task_spec, make_env
from robofinetune.envs.experts import make_expert
from robofinetune.errors import ConfigError
from robofinetune.images import is_image_key

SOURCES = ("scripted",)


def default_collect_envs() -> int:
    """Env processes ``collect`` uses by default: two where the machine has two cores (one per core otherwise)."""
    return default_worker_processes()


def collect_episodes(
    task: str | Path | TaskSpec,
    num_episodes: int,
    source: str = "scripted",
    noise: float = 0.0,
    seed: int = 0,
    only_success: bool = False,
    progress: bool = True,
    num_envs: int = 1,
    num_env_workers: int = 0,
    ray_address: str = "",
) -> list[Episode]:
    """Run the task's scripted expert for ``num_episodes`` episodes, in ``num_envs`` env processes, or with
    ``num_env_workers`` > 0 in that many Ray actors (one env each; ``ray_address`` "" starts a local Ray, "auto" or
    "ray://host:port" joins a cluster) instead.

    Attempt ``k`` resets the env with seed ``seed + k`` and uses a fresh expert seeded with ``seed + k``,
    so one episode can be reproduced alone from its ``metadata["seed"]``, and ``num_envs`` changes only the
    speed: the episodes, their order and the dataset written from them are the same for any ``num_envs`` and
    any ``num_env_workers`` (attempts are handed out in order and their results taken back in order). ``noise`` > 0 gives imperfect,
    multi-operator-like demos (see :mod:`robofinetune.envs.experts`). With ``only_success`` failures are
    dropped and collection goes on until ``num_episodes`` successes (or gives up, with a warning, after
    ``20 * num_episodes + 20`` attempts). Robosuite episodes carry ``states`` (flattened MuJoCo state before
    each action) for replay; ``metadata`` holds task, source, noise, seed, the expert's operator style and
    the env's robomimic-style ``env_meta``.
    """
    if source not in SOURCES:
        raise ConfigError(f"collect source must be one of {list(SOURCES)}, got {source!r}")
    if num_episodes < 0:
        raise ConfigError(f"num_episodes must be >= 0, got {num_episodes}")
    if noise < 0:
        raise ConfigError(f"noise must be >= 0, got {noise}")
    if num_envs < 1:
        raise ConfigError(f"num_envs must be >= 1, got {num_envs}")
    if num_env_workers < 0:
        raise ConfigError(f"num_env_workers must be >= 0 (0 = local env processes), got {num_env_workers}")
    spec = load_task_spec(task)
    make_expert(spec)  # fail early, before building a slow env, when the task has no expert
    if num_episodes == 0:
        return []
    max_attempts = 20 * num_episodes + 20 if only_success else num_episodes
    episodes: list[Episode] = []
    successes = attempts = 0
    bar = tqdm(total=num_episodes, desc=f"collect {spec.name}", unit="ep", disable=not progress)
    if num_env_workers > 0:
        runner = _ParallelAttempts(spec, noise, seed, max_attempts, num_env_workers, ray_address=ray_address)
    elif num_envs > 1 and num_episodes > 1:
        runner = _ParallelAttempts(spec, noise, seed, max_attempts, num_envs)
    else:
        runner = _SerialAttempts(spec, noise, seed, max_attempts)
    try:
        for episode in runner:  # attempt 0, 1, 2, ... in order
            episode.metadata["attempt"] = attempts
            attempts += 1
            successes += int(episode.success)
            if episode.success or not only_success:
                episodes.append(episode)
                bar.update(1)
            bar.set_postfix(successes=f"{successes}/{attempts}")
            if len(episodes) >= num_episodes:
                break
    finally:
        bar.close()
        runner.close()
    if len(episodes) < num_episodes:
        warnings.warn(
            f"collect {spec.name}: only {len(episodes)} successful episodes of {num_episodes} wanted after "
            f"{attempts} attempts (noise={noise}); returning those",
            RuntimeWarning,
            stacklevel=2,
        )
    return episodes


class _SerialAttempts:
    """Attempts ``0 .. max_attempts - 1`` one after the other in one env of this process."""

    def __init__(self, spec: TaskSpec, noise: float, seed: int, max_attempts: int) -> None:
        self.spec, self.noise, self.seed, self.max_attempts = spec, noise, seed, max_attempts
        self.env = make_env(spec) if max_attempts > 0 else None

    def __iter__(self) -> Iterator[Episode]:
        for attempt in range(self.max_attempts):
            yield _run_episode(self.env, self.spec, noise=self.noise, seed=self.seed + attempt)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


class _ParallelAttempts:
    """The same attempts, in ``num_envs`` workers that each keep one env: local processes, or Ray actors when
    ``ray_address`` is given ("" for a local Ray).

    Attempts are submitted in order, at most two per worker ahead of the one being waited for, and yielded in
    order, so the caller sees exactly what :class:`_SerialAttempts` gives; once the caller stops, attempts not
    started are cancelled (``robofinetune.data.workers``).
    """

    def __init__(self, spec: TaskSpec, noise: float, seed: int, max_attempts: int, num_envs: int,
                 ray_address: str | None = None) -> None:
        self.spec, self.noise, self.seed, self.max_attempts = spec, noise, seed, max_attempts
        self.num_envs = max(1, min(num_envs, max_attempts))
        self.log_settings = logs.snapshot()  # the forkserver may predate the current settings: pass them on
        self.executor = (worker_pool(self.num_envs) if ray_address is None
                         else RayWorkerPool(self.num_envs, spec.name, ray_address=ray_address or None))

    def __iter__(self) -> Iterator[Episode]:
        return ordered_results(self.executor, self.num_envs, self.max_attempts,
                               lambda k: (_worker_episode, (self.spec, self.noise, self.seed + k, self.log_settings)))

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


_worker_envs: dict[str, Any] = {}  # a worker's env, made at its first attempt (errors then reach the caller)


def _worker_episode(spec: TaskSpec, noise: float, seed: int, log_settings: dict[str, str | None]) -> Episode:
    if spec.name not in _worker_envs:
        logs.restore(log_settings)
        _worker_envs[spec.name] = make_env(spec)
    return _run_episode(_worker_envs[spec.name], spec, noise=noise, seed=seed)


def _run_episode(env, spec: TaskSpec, noise: float, seed: int) -> Episode:
    expert = make_expert(spec, noise=noise, seed=seed)
    obs, info = env.reset(seed=seed)
    expert.reset(env)
    unwrapped = env.unwrapped
    get_state = getattr(unwrapped, "get_state", None)
    observations: dict[str, list[np.ndarray]] = {key: [] for key in spec.obs_keys}
    actions, rewards, terminals, states = [], [], [], []
    terminated = truncated = False
    while not (terminated or truncated):
        for key in spec.obs_keys:
            observations[key].append(obs[key])
        if get_state is not None:
            states.append(get_state())
        action = np.asarray(expert.act(obs), dtype=np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        actions.append(np.clip(action, -1.0, 1.0))
        rewards.append(reward)
        terminals.append(terminated)
    metadata = {
        "task": spec.name,
        "source": "scripted",
        "expert": type(expert).__name__,
        "noise": float(noise),
        "seed": int(seed),
        "expert_style": expert.style.to_dict() if hasattr(expert, "style") else {},
        "control_freq": spec.control_freq,
    }
    env_meta = getattr(unwrapped, "env_meta", None)
    if env_meta is not None:
        metadata["env_meta"] = env_meta
    return Episode(
        observations={key: _stored(key, np.stack(values)) for key, values in observations.items()},
        actions=np.stack(actions),
        rewards=np.asarray(rewards, dtype=np.float32),
        terminals=np.asarray(terminals, dtype=bool),
        success=bool(info.get("is_success", False)),
        final_observation={key: _stored(key, np.asarray(obs[key])).copy() for key in spec.obs_keys},
        states=np.stack(states) if states else None,
        metadata=metadata,
    )


def _stored(key: str, values: np.ndarray) -> np.ndarray:
    """State keys as float32; camera images stay uint8 (as robomimic stores them, 4x smaller than float)."""
    return values.astype(np.uint8 if is_image_key(key) else np.float32, copy=False)
