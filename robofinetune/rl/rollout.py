"""Stepping a vector env for online RL: transitions with the right next observation, and finished episodes.

The project's vector envs use gymnasium's SAME_STEP autoreset: when env i finishes, the observation that
``step`` returns for it already belongs to the next episode. A transition's next observation must instead
be the finished episode's last one (``info["final_obs"]``); :meth:`VectorRollout.step` puts it there.
Per-env state of a policy (observation history, queued action chunk) must be cleared when its env starts a
new episode; pass the policy's ``reset`` as a ``reset_hook`` and it is called for exactly those envs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np


@dataclass
class EpisodeOutcome:
    env_index: int
    success: bool
    length: int
    episode_return: float


@dataclass
class StepTransitions:
    """One vector step: row i is env i's transition (obs, action) -> (reward, next_obs)."""

    obs: dict[str, np.ndarray]
    action: np.ndarray
    reward: np.ndarray
    next_obs: dict[str, np.ndarray]       # for finished envs, the finished episode's last observation
    terminated: np.ndarray
    truncated: np.ndarray
    finished: list[EpisodeOutcome] = field(default_factory=list)

    @property
    def done(self) -> np.ndarray:
        return self.terminated | self.truncated


class VectorRollout:
    """Owns a vector env's current observation and per-env episode counters.

    ``reset_hooks`` are called as ``hook(None)`` on :meth:`reset` and ``hook(env_index)`` for every env whose
    episode ended during :meth:`step`, before the next action is chosen (a chunked base policy must forget
    its queued actions there).
    """

    def __init__(self, envs: Any, reset_hooks: list[Callable[[int | None], None]] | None = None) -> None:
        self.envs = envs
        self.num_envs = int(envs.num_envs)
        self.reset_hooks = list(reset_hooks or [])
        self.obs: dict[str, np.ndarray] | None = None
        self.lengths = np.zeros(self.num_envs, np.int64)
        self.returns = np.zeros(self.num_envs, np.float64)

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        self.obs, _ = self.envs.reset(seed=seed)
        self.lengths[:] = 0
        self.returns[:] = 0
        for hook in self.reset_hooks:
            hook(None)
        return self.obs

    def step(self, actions: np.ndarray, while_waiting: Callable[[], Any] | None = None) -> StepTransitions:
        """Step every env with ``actions`` (num_envs, A). ``while_waiting`` runs while the env processes
        simulate (between ``step_async`` and ``step_wait``), e.g. gradient updates, so learner and
        simulators use the cores at the same time."""
        if self.obs is None:
            raise RuntimeError("call reset() before step()")
        actions = np.asarray(actions, np.float32)
        if hasattr(self.envs, "step_async"):
            self.envs.step_async(actions)
            if while_waiting is not None:
                while_waiting()
            next_obs, reward, terminated, truncated, info = self.envs.step_wait()
        else:
            if while_waiting is not None:
                while_waiting()
            next_obs, reward, terminated, truncated, info = self.envs.step(actions)
        reward = np.asarray(reward, np.float32)
        terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
        self.lengths += 1
        self.returns += reward
        transition_next = {key: np.array(value, copy=True) for key, value in next_obs.items()}
        finished = []
        for index in np.flatnonzero(terminated | truncated):
            index = int(index)
            for key, value in info["final_obs"][index].items():
                transition_next[key][index] = value
            finished.append(EpisodeOutcome(index, _final_success(info, index, terminated), int(self.lengths[index]),
                                           float(self.returns[index])))
            self.lengths[index] = 0
            self.returns[index] = 0.0
            for hook in self.reset_hooks:
                hook(index)
        transitions = StepTransitions(self.obs, actions, reward, transition_next, terminated, truncated, finished)
        self.obs = next_obs
        return transitions

    def steps(self, action_fn: Callable[[dict[str, np.ndarray]], np.ndarray], count: int) -> Iterator[StepTransitions]:
        """Yield ``count`` vector steps, acting with ``action_fn(obs) -> (num_envs, A)``."""
        if self.obs is None:
            self.reset()
        for _ in range(count):
            yield self.step(action_fn(self.obs))

    def close(self) -> None:
        self.envs.close()


def _final_success(info: dict[str, Any], index: int, terminated: np.ndarray) -> bool:
    final_info = info.get("final_info")
    if isinstance(final_info, dict) and "is_success" in final_info:
        return bool(final_info["is_success"][index])
    return bool(terminated[index])
