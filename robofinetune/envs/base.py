"""Pieces shared by every robofinetune env: spaces from a TaskSpec, action checking."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from robofinetune.envs.spec import TaskSpec
from robofinetune.errors import TaskError
from robofinetune.images import is_image_key  # noqa: F401  (camera observations ``<camera>_image`` stay uint8)


def observation_space(spec: TaskSpec) -> spaces.Dict:
    """A Dict of unbounded float32 Boxes (uint8 0..255 for image keys), one per observation key, in spec order."""
    boxes = []
    for key, shape in spec.obs_shapes.items():
        if is_image_key(key):
            boxes.append((key, spaces.Box(0, 255, shape=shape, dtype=np.uint8)))
        else:
            boxes.append((key, spaces.Box(-np.inf, np.inf, shape=shape, dtype=np.float32)))
    # a sequence of pairs keeps the spec's order (gymnasium sorts the keys of a plain dict)
    return spaces.Dict(boxes)


def action_space(spec: TaskSpec) -> spaces.Box:
    return spaces.Box(-1.0, 1.0, shape=(spec.action_dim,), dtype=np.float32)


def check_action(action: object, action_dim: int) -> np.ndarray:
    """The action as a float64 vector clipped to [-1, 1]; ValueError on a wrong shape, NaN or inf."""
    arr = np.asarray(action, dtype=np.float64)
    if arr.shape != (action_dim,):
        arr = arr.reshape(-1) if arr.size == action_dim else arr
        if arr.shape != (action_dim,):
            raise ValueError(f"action must have shape ({action_dim},), got shape {np.shape(action)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"action contains NaN or inf: {arr.tolist()}")
    return np.clip(arr, -1.0, 1.0)


def check_obs_shapes(spec: TaskSpec, obs: dict[str, np.ndarray]) -> None:
    """TaskError naming the key when a simulator observation does not match the spec."""
    for key, shape in spec.obs_shapes.items():
        if key not in obs:
            raise TaskError(f"task '{spec.name}': observation key '{key}' is not produced by the simulator")
        if tuple(np.shape(obs[key])) != tuple(shape):
            raise TaskError(
                f"task '{spec.name}': observation '{key}' has shape {tuple(np.shape(obs[key]))}, "
                f"the spec says {tuple(shape)}"
            )
