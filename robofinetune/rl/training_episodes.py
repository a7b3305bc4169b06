"""The episodes an online RL run drives, written as a dataset while it runs (robomimic HDF5 or LeRobot v3).

Each finished episode becomes an :class:`~robofinetune.data.episode.Episode` whose ``actions`` are the executed
ones and whose ``step_data`` holds ``is_intervention`` (T,) and ``policy_action`` (T, A), the policy's own
proposal, so a run with interventions leaves data that BC, the OPE gate and another residual run read (the
flags reach that run's replay rows). Appends are durable one episode at a time (``robot.recorder``'s writers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from robofinetune.data.episode import Episode
from robofinetune.errors import ConfigError

EPISODE_FORMATS = ("robomimic", "lerobot", "none")


def episodes_path(run_path: Path, fmt: str) -> Path:
    return run_path / ("episodes.hdf5" if fmt == "robomimic" else "episodes_lerobot")


class TrainingEpisodes:
    """Collects each env's steps; :meth:`finish` turns an env's finished episode into an Episode and appends it."""

    def __init__(self, num_envs: int, obs_keys: list[str], writer: Any = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self.obs_keys = list(obs_keys)
        self.writer = writer
        self.metadata = dict(metadata or {})
        self._steps: list[list[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, bool, float]]] = \
            [[] for _ in range(num_envs)]

    def add(self, obs: dict[str, np.ndarray], executed: np.ndarray, proposed: np.ndarray, intervened: np.ndarray,
            reward: np.ndarray) -> None:
        """One vector step: row i of each array belongs to env i."""
        for index, steps in enumerate(self._steps):
            steps.append(({key: np.array(obs[key][index]) for key in self.obs_keys}, np.array(executed[index]),
                          np.array(proposed[index]), bool(intervened[index]), float(reward[index])))

    def discard(self, index: int | None = None) -> None:
        """Forget env ``index``'s episode in progress (all envs when None), e.g. after a resume."""
        for position in range(len(self._steps)) if index is None else [index]:
            self._steps[position] = []

    def finish(self, index: int, final_obs: dict[str, np.ndarray], success: bool, terminated: bool,
               reward_last: float | None = None, metadata: dict[str, Any] | None = None) -> Episode | None:
        """Env ``index``'s episode ended after its last added step; build it, append it when there is a writer.
        ``reward_last`` replaces the last step's reward (an operator's success mark on a robot without a success
        signal)."""
        steps, self._steps[index] = self._steps[index], []
        if not steps:
            return None
        rewards = np.array([step[4] for step in steps], np.float32)
        if reward_last is not None:
            rewards[-1] = reward_last
        terminals = np.zeros(len(steps), bool)
        terminals[-1] = terminated
        intervened = np.array([step[3] for step in steps], bool)
        episode = Episode(
            observations={key: np.stack([step[0][key] for step in steps]) for key in self.obs_keys},
            actions=np.stack([step[1] for step in steps]), rewards=rewards, terminals=terminals, success=success,
            final_observation={key: np.asarray(final_obs[key][index]) for key in self.obs_keys},
            metadata={**self.metadata, **(metadata or {}), "intervened_steps": int(intervened.sum())},
            step_data={"is_intervention": intervened,
                       "policy_action": np.stack([step[2] for step in steps]).astype(np.float32)})
        if self.writer is not None:
            self.writer.append(episode)
        return episode


def open_training_episodes(run_path: Path, fmt: str, num_envs: int, obs_keys: list[str], env_meta: dict[str, Any],
                           fps: float, resume: bool, metadata: dict[str, Any] | None = None) -> TrainingEpisodes:
    """A :class:`TrainingEpisodes` writing ``<run>/episodes.hdf5`` (robomimic) or ``<run>/episodes_lerobot``
    (LeRobot v3); ``none`` keeps nothing. A resumed run appends to the same dataset."""
    if fmt not in EPISODE_FORMATS:
        raise ConfigError(f"config field 'episodes_format' is {fmt!r}; choose one of {list(EPISODE_FORMATS)}")
    writer = None
    if fmt != "none":
        from robofinetune.robot.recorder import open_episode_writer

        writer = open_episode_writer(episodes_path(run_path, fmt), fmt, env_meta, resume=resume, fps=fps)
    return TrainingEpisodes(num_envs, obs_keys, writer, metadata)
