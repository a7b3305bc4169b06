"""Stepping a vector env for online RL: transitions with the right next observation, and finished episodes.

The project's vector envs use gymnasium's SAME_STEP autoreset: when env i finishes, the observation that
``step`` returns for it already belongs to the next episode. A transition's next observation must instead
be the finished episode's last one (``info["final_obs"]``); :meth:`VectorRollout.step` puts it there.
Per-env state of a policy (observation history, queued action chunk) must be cleared when its env starts a
new episode; pass the policy's ``reset`` as a ``reset_hook`` and it is called for exactly those envs.

Envs wrapped in :class:`robofinetune.rl.interventions.InterventionWrapper` report takeovers in their step info
(``is_intervention``, ``executed_action``); a transition's ``action`` is then the executed one, the policy's
proposal is kept in ``proposed_action``, and each finished episode counts its intervened steps and takeovers.
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
    intervened_steps: int = 0     # steps whose executed action was a takeover's
    takeovers: int = 0            # separate takeovers (runs of intervened steps)
    aborted: bool = False         # cut by an env worker's crash (Ray backend): neither a success nor a failure


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
    # the policy's own actions (``action`` is what was executed: a takeover's action where ``is_intervention``)
    proposed_action: np.ndarray | None = None
    is_intervention: np.ndarray | None = None
    # rows whose env worker died during the step (robofinetune.distributed): no real transition, drop them
    aborted: np.ndarray | None = None

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
        self.intervened_steps = np.zeros(self.num_envs, np.int64)
        self.takeovers = np.zeros(self.num_envs, np.int64)
        self._was_intervening = np.zeros(self.num_envs, bool)

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        self.obs, _ = self.envs.reset(seed=seed)
        self.lengths[:] = 0
        self.returns[:] = 0
        self.intervened_steps[:] = 0
        self.takeovers[:] = 0
        self._was_intervening[:] = False
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
        done = terminated | truncated
        intervened = _step_info(info, "is_intervention", done, np.zeros(self.num_envs, bool)).astype(bool)
        executed = _step_info(info, "executed_action", done, actions).astype(np.float32)
        aborted = _step_info(info, "aborted", done, np.zeros(self.num_envs, bool)).astype(bool) & done
        self.lengths += 1
        self.returns += reward
        self.intervened_steps += intervened
        self.takeovers += intervened & ~self._was_intervening
        self._was_intervening = intervened.copy()
        transition_next = {key: np.array(value, copy=True) for key, value in next_obs.items()}
        finished = []
        for index in np.flatnonzero(terminated | truncated):
            index = int(index)
            for key, value in info["final_obs"][index].items():
                transition_next[key][index] = value
            finished.append(EpisodeOutcome(index, _final_success(info, index, terminated), int(self.lengths[index]),
                                           float(self.returns[index]), int(self.intervened_steps[index]),
                                           int(self.takeovers[index]), bool(aborted[index])))
            self.lengths[index] = 0
            self.returns[index] = 0.0
            self.intervened_steps[index] = 0
            self.takeovers[index] = 0
            self._was_intervening[index] = False
            for hook in self.reset_hooks:
                hook(index)
        transitions = StepTransitions(self.obs, executed, reward, transition_next, terminated, truncated, finished,
                                      proposed_action=actions, is_intervention=intervened, aborted=aborted)
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


def _step_info(info: dict[str, Any], key: str, done: np.ndarray, default: np.ndarray) -> np.ndarray:
    """Per-env value of step-info ``key``: SAME_STEP autoreset puts a finished env's step info in
    ``final_info`` (its ``info`` is the next episode's reset info). ``default`` rows where no env reported it."""
    result = np.array(default, copy=True)
    sources = [(info, ~done)]
    final_info = info.get("final_info")
    if isinstance(final_info, dict):
        sources.append((final_info, done))
    for source, rows in sources:
        if key not in source:
            continue
        values = np.asarray(source[key])
        present = np.asarray(source.get(f"_{key}", np.ones(len(values), bool)), bool) & rows
        result[present] = values[present]
    return result


def _final_success(info: dict[str, Any], index: int, terminated: np.ndarray) -> bool:
    final_info = info.get("final_info")
    if isinstance(final_info, dict) and "is_success" in final_info:
        return bool(final_info["is_success"][index])
    return bool(terminated[index])
