"""Collect demonstration episodes by running a scripted expert in ``make_env(task)``."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from robofinetune.data.episode import Episode
from robofinetune.envs import TaskSpec, load_task_spec, make_env
from robofinetune.envs.experts import make_expert
from robofinetune.errors import ConfigError

SOURCES = ("scripted",)


def collect_episodes(
    task: str | Path | TaskSpec,
    num_episodes: int,
    source: str = "scripted",
    noise: float = 0.0,
    seed: int = 0,
    only_success: bool = False,
    progress: bool = True,
) -> list[Episode]:
    """Run the task's scripted expert for ``num_episodes`` episodes (sequentially, one env).

    Attempt ``k`` resets the env with seed ``seed + k`` and uses a fresh expert seeded with ``seed + k``,
    so one episode can be reproduced alone from its ``metadata["seed"]``. ``noise`` > 0 gives imperfect,
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
    spec = load_task_spec(task)
    make_expert(spec)  # fail early, before building a slow env, when the task has no expert
    env = make_env(spec)
    episodes: list[Episode] = []
    max_attempts = 20 * num_episodes + 20 if only_success else num_episodes
    successes = attempts = 0
    bar = tqdm(total=num_episodes, desc=f"collect {spec.name}", unit="ep", disable=not progress)
    try:
        while len(episodes) < num_episodes and attempts < max_attempts:
            episode = _run_episode(env, spec, noise=noise, seed=seed + attempts)
            episode.metadata["attempt"] = attempts
            attempts += 1
            successes += int(episode.success)
            if episode.success or not only_success:
                episodes.append(episode)
                bar.update(1)
            bar.set_postfix(successes=f"{successes}/{attempts}")
    finally:
        bar.close()
        env.close()
    if len(episodes) < num_episodes:
        warnings.warn(
            f"collect {spec.name}: only {len(episodes)} successful episodes of {num_episodes} wanted after "
            f"{attempts} attempts (noise={noise}); returning those",
            RuntimeWarning,
            stacklevel=2,
        )
    return episodes


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
        observations={key: np.stack(values).astype(np.float32) for key, values in observations.items()},
        actions=np.stack(actions),
        rewards=np.asarray(rewards, dtype=np.float32),
        terminals=np.asarray(terminals, dtype=bool),
        success=bool(info.get("is_success", False)),
        final_observation={key: np.asarray(obs[key], dtype=np.float32).copy() for key in spec.obs_keys},
        states=np.stack(states) if states else None,
        metadata=metadata,
    )
