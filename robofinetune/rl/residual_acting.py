"""How a residual RL run acts and turns a vector step into replay rows, in one place.

``train residual`` steps its envs in-process with it, and the Ray policy workers
(:mod:`robofinetune.distributed.policy_workers`) step their share of the envs with it, so both produce the same
transitions from the same seeds and weights. One step: the residual actor (or, in warm-up, uniform noise) plus
Gaussian exploration noise corrects the frozen base's action; the env steps; the row is the RL state
x = (features of the frame, base action) before and after, as :mod:`robofinetune.algos.residual` describes.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import torch

from robofinetune.rl.rollout import StepTransitions, VectorRollout

#: One vector step as the replay takes it: (rl_obs, executed action, reward, next_rl_obs, terminated, truncated,
#: intervened), row i env i.
ResidualRow = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class ResidualActing:
    """Acts with base + residual + exploration noise on ``rollout``'s envs and builds each step's replay row.

    ``base``: the frozen base policy this object drives (its per-env state is reset as episodes end; give it a
    base of its own). ``actor``: the residual actor (read, never trained here). ``features``: the frame's
    features (:class:`robofinetune.rl.features.FrozenFeatures`). ``noise_rng``: the exploration and warm-up noise.
    """

    def __init__(self, rollout: VectorRollout, base: Any, actor: torch.nn.Module,
                 features: Callable[[dict[str, np.ndarray]], np.ndarray], noise_rng: np.random.Generator,
                 exploration_noise: float, warmup_noise: float) -> None:
        self.rollout, self.base, self.actor, self.features = rollout, base, actor, features
        self.noise_rng = noise_rng
        self.exploration_noise, self.warmup_noise = exploration_noise, warmup_noise
        self.base_action: np.ndarray | None = None
        self.obs_features: np.ndarray | None = None

    def start(self, reset_seed: int, sampling_seed: int) -> None:
        """Reset the envs (env i with ``reset_seed + i``) and the base, whose sampling noise then depends on
        ``sampling_seed``, env and episode alone, not on what ran before in the process."""
        self.rollout.reset(seed=reset_seed)
        self.base.seed_sampling(sampling_seed)
        self.base.reset()
        self.base_action = np.asarray(self.base.select_action(self.rollout.obs), np.float32)
        self.obs_features = self.features(self.rollout.obs)

    def step(self, warming_up: bool, while_waiting: Callable[[], Any] | None = None
             ) -> tuple[ResidualRow, StepTransitions]:
        """One vector step: the replay row and the rollout's transitions (finished episodes, raw observations).
        ``warming_up``: ResFiT's warm-up, the base acts with small uniform noise and the actor is not asked.
        ``while_waiting`` runs while the envs simulate (the learner's updates)."""
        if self.base_action is None:
            raise RuntimeError("call start() before step()")
        base_action = self.base_action
        rl_obs = np.concatenate([self.obs_features, base_action], axis=1)
        if warming_up:
            residual = self.noise_rng.uniform(-self.warmup_noise, self.warmup_noise, base_action.shape)
        else:
            with torch.no_grad():
                device = self.actor.obs_mean.device
                residual = self.actor(torch.as_tensor(rl_obs, device=device)).cpu().numpy()
            residual = residual + self.noise_rng.normal(0.0, self.exploration_noise, residual.shape)
        action = np.clip(base_action + residual, -1.0, 1.0).astype(np.float32)
        transitions = self.rollout.step(action, while_waiting=while_waiting)
        # an intervention replaced some envs' actions: learn from what was executed
        executed, intervened = transitions.action, transitions.is_intervention

        # Base action in each next state. Where an episode was cut by the time limit the target bootstraps
        # from its last state, so ask the base what it would do there (on a copy: its state must not leak
        # into the next episode). Then reset the base for every env that starts a new episode: a chunked
        # base must not continue the previous episode's queued actions (ResFiT's public code forgets this).
        done = transitions.done
        next_base_action = np.zeros_like(base_action)
        if transitions.truncated.any():
            final_actions = copy.deepcopy(self.base).select_action(transitions.next_obs)
            next_base_action[transitions.truncated] = final_actions[transitions.truncated]
        for index in np.flatnonzero(done):
            self.base.reset(int(index))
        self.base_action = np.asarray(self.base.select_action(self.rollout.obs), np.float32)
        next_base_action[~done] = self.base_action[~done]
        # one encoder pass per step: the next frame's features are the following step's, except where an
        # episode ended and the env already shows the next episode's first frame
        next_features = self.features(transitions.next_obs)
        self.obs_features = next_features.copy()
        if done.any():
            self.obs_features[done] = self.features({key: np.asarray(value)[done]
                                                     for key, value in self.rollout.obs.items()})
        next_rl_obs = np.concatenate([next_features, next_base_action], axis=1)
        row = (rl_obs, executed, transitions.reward.copy(), next_rl_obs, transitions.terminated.copy(),
               transitions.truncated.copy(), intervened)
        return row, transitions
