"""The one in-memory form every reader produces and every writer consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robofinetune.errors import DatasetError
from robofinetune.images import image_problem, is_image_key


@dataclass
class Episode:
    """One episode: T observations, the T actions taken from them, and what followed.

    ``observations[key][t]`` is what the policy saw before ``actions[t]``; ``final_observation`` is what it
    saw after the last action, so next-observations are ``observations[1:] + final_observation``.
    ``rewards`` are the task's sparse 0/1 success reward unless the source says otherwise.
    ``step_data`` holds any other per-step arrays, (T, ...) each, that travel with the episode through every
    writer and reader, e.g. ``is_intervention`` (T,) bool and ``policy_action`` (T, A) of a run with human
    interventions (``actions`` is then what was executed).
    """

    observations: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray | None = None
    terminals: np.ndarray | None = None
    success: bool = False
    final_observation: dict[str, np.ndarray] | None = None
    states: np.ndarray | None = None  # flattened MuJoCo states (T, S), when the source is a simulator
    metadata: dict[str, Any] = field(default_factory=dict)
    step_data: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.actions = np.asarray(self.actions, dtype=np.float32)
        if self.actions.ndim != 2:
            raise DatasetError(f"episode field 'actions' must be (T, action_dim), got shape {self.actions.shape}")
        length = len(self.actions)
        for key, value in self.observations.items():
            value = np.asarray(value)
            if len(value) != length:
                raise DatasetError(
                    f"episode observation '{key}' has {len(value)} steps but 'actions' has {length}"
                )
            self.observations[key] = value
        if self.rewards is None:
            self.rewards = np.zeros(length, dtype=np.float32)
            if self.success and length:
                self.rewards[-1] = 1.0
        self.rewards = np.asarray(self.rewards, dtype=np.float32)
        if self.terminals is None:
            self.terminals = np.zeros(length, dtype=bool)
            if self.success and length:
                self.terminals[-1] = True
        self.terminals = np.asarray(self.terminals, dtype=bool)
        for name in ("rewards", "terminals"):
            if len(getattr(self, name)) != length:
                raise DatasetError(f"episode field '{name}' has {len(getattr(self, name))} steps, expected {length}")
        for key, value in self.step_data.items():
            value = np.asarray(value)
            if value.ndim == 0 or len(value) != length:
                raise DatasetError(f"episode step_data '{key}' has shape {value.shape}, expected {length} steps first")
            self.step_data[key] = value

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def obs_keys(self) -> list[str]:
        return list(self.observations)

    def next_observations(self) -> dict[str, np.ndarray]:
        """Observation after each action; the last one is ``final_observation`` (or a copy of the last)."""
        result = {}
        for key, value in self.observations.items():
            last = value[-1:] if self.final_observation is None else np.asarray(self.final_observation[key])[None]
            result[key] = np.concatenate([value[1:], last.astype(value.dtype)], axis=0)
        return result

    def validate(self, source: str = "episode") -> None:
        """Raise a DatasetError naming ``source`` and the field when any value is NaN or infinite, or when a
        camera observation (``<camera>_image``) is not (T, H, W, C) uint8 with 1, 3 or 4 channels."""
        if not np.all(np.isfinite(self.actions)):
            raise DatasetError(f"{source}: field 'actions' contains NaN or inf")
        for key, value in self.observations.items():
            if is_image_key(key):
                problem = image_problem(key, value)
                if problem is not None:
                    raise DatasetError(f"{source}: {problem}")
                continue
            if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
                raise DatasetError(f"{source}: observation '{key}' contains NaN or inf")
        if not np.all(np.isfinite(self.rewards)):
            raise DatasetError(f"{source}: field 'rewards' contains NaN or inf")
