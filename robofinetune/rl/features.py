"""What the off-policy learners see of an observation: flat state, or a frozen policy's own image features.

A state-only task gives the RL networks its flattened observation keys (``flatten_observation``). A task with
cameras cannot: a 84x84x3 image is 21k floats, 4x that as float32, twice per replay row (obs and next_obs).
Instead :class:`FrozenFeatures` runs the frozen base policy's own
:class:`~robofinetune.policies.encoders.ObservationEncoder` (eval mode: no augmentation; no gradient) on the
current frame and the learners store and read those features (LeRobot and HIL-SERL freeze and share the
pretrained encoder; LeRobot caches the frozen features). Per frame that is ``cameras * image_feature_dim +
state_dim`` float32 (68 on pointmass_image, 137 on can_image), so replay rows stay small and an update never
touches a convolution. The same extractor runs at act time inside the exported policy, so the policy acts from
raw observations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from robofinetune.errors import ConfigError
from robofinetune.images import image_keys
from robofinetune.rl.replay import flatten_observation

STATE, BASE_ENCODER = "state", "base_encoder"
FEATURE_KINDS = (STATE, BASE_ENCODER)


def observation_encoder_of(policy: Any) -> nn.Module | None:
    """The image encoder a policy (or the base it is built on, e.g. a residual's) conditions on; None without one."""
    seen = policy
    while seen is not None:
        encoder = getattr(seen, "obs_encoder", None)
        if encoder is not None:
            return encoder
        seen = getattr(seen, "base", None)
    return None


def default_feature_kind(obs_keys: list[str]) -> str:
    """Camera keys -> the frozen base's encoder features; state only -> the flat state (unchanged behaviour)."""
    return BASE_ENCODER if image_keys(obs_keys) else STATE


class FrozenFeatures:
    """``(B, ...) per key -> (B, D)`` float32 features of the current frame, for replay rows and the residual actor.

    ``kind`` "state": the flattened ``obs_keys``. "base_encoder": ``encoder`` (a frozen ObservationEncoder) on a
    one-step history, always in eval mode, without gradient, on the encoder's device, returned on the CPU.
    """

    def __init__(self, kind: str, obs_keys: list[str], encoder: nn.Module | None = None) -> None:
        if kind not in FEATURE_KINDS:
            raise ConfigError(f"residual policy field 'features' is {kind!r}; choose one of {list(FEATURE_KINDS)}")
        if kind == BASE_ENCODER and encoder is None:
            raise ConfigError("residual policy field 'features' is 'base_encoder' but the base policy has no "
                              "observation encoder (a state-only base): use 'state'")
        if kind == STATE and image_keys(obs_keys):
            raise ConfigError(f"residual policy field 'features' is 'state' but the observation has cameras "
                              f"{image_keys(obs_keys)}; images are never flattened into replay: use 'base_encoder'")
        self.kind, self.obs_keys, self.encoder = kind, list(obs_keys), encoder

    def dim(self, obs_shapes: Mapping[str, Any]) -> int:
        """Features per frame."""
        if self.kind == BASE_ENCODER:
            return int(self.encoder.output_dim)
        return int(sum(int(np.prod(obs_shapes[key])) for key in self.obs_keys))

    @torch.no_grad()
    def __call__(self, obs: Mapping[str, Any]) -> np.ndarray:
        if self.kind == STATE:
            return flatten_observation(dict(obs), self.obs_keys)
        was_training = self.encoder.training
        self.encoder.eval()   # a residual policy put in train mode must not switch augmentation on here
        try:
            history = {key: torch.as_tensor(np.asarray(obs[key]))[:, None] for key in self.encoder.shapes}
            features = self.encoder(history)[:, 0]
        finally:
            self.encoder.train(was_training)
        return features.float().cpu().numpy()

    def of_episode(self, observations: Mapping[str, np.ndarray], final: Mapping[str, Any] | None,
                   batch: int = 256) -> np.ndarray:
        """(T + 1, D): features of every state of an episode, the final observation last (row T)."""
        final = final or {key: observations[key][-1] for key in self.obs_keys}
        states = {key: np.concatenate([np.asarray(observations[key]), np.asarray(final[key])[None]])
                  for key in self.obs_keys}
        count = len(states[self.obs_keys[0]])
        return np.concatenate([self({key: value[start: start + batch] for key, value in states.items()})
                               for start in range(0, count, batch)])


def replay_row_bytes(feature_dim: int, action_dim: int) -> int:
    """Bytes one replay transition takes: obs and next_obs (features + base action, float32), the executed
    action (float32), reward (float32), terminated and is_intervention (bool), next_index and serial (int64)."""
    rl_obs = feature_dim + action_dim
    return 2 * 4 * rl_obs + 4 * action_dim + 4 + 1 + 1 + 8 + 8
