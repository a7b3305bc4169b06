"""Camera observations: the one naming convention and the checks every layer (task spec, env, dataset, policy)
shares.

An observation key ``<camera>_image`` (robomimic's convention: ``agentview_image``,
``robot0_eye_in_hand_image``) holds an H x W x C uint8 image, C = 3 (RGB) for simulated cameras (1 or 4 from a
robot's mono / RGBA cameras). Images stay uint8 everywhere they are stored or batched; only an observation
encoder turns them into floats, per batch, on its device.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

IMAGE_SUFFIX = "_image"
IMAGE_CHANNELS = (1, 3, 4)


def is_image_key(key: str) -> bool:
    """Camera observations are named ``<camera>_image``."""
    return key.endswith(IMAGE_SUFFIX)


def image_key(camera: str) -> str:
    return f"{camera}{IMAGE_SUFFIX}"


def camera_of(key: str) -> str:
    return key[: -len(IMAGE_SUFFIX)] if is_image_key(key) else key


def image_keys(keys: Iterable[str]) -> list[str]:
    return [key for key in keys if is_image_key(key)]


def state_keys(keys: Iterable[str]) -> list[str]:
    return [key for key in keys if not is_image_key(key)]


def image_problem(key: str, value: np.ndarray, steps: bool = True,
                  expected: tuple[int, ...] | None = None) -> str | None:
    """Why ``value`` is not a valid stack of images for ``key`` (None when it is).

    ``steps``: ``value`` is (T, H, W, C), else one (H, W, C) frame. ``expected``: the (H, W, C) the caller needs.
    """
    value = np.asarray(value)
    lead = 1 if steps else 0
    shape = tuple(value.shape[lead:])
    if value.dtype != np.uint8:
        return f"observation '{key}' is {value.dtype}; images must be uint8 (0..255)"
    if len(shape) != 3:
        layout = "(T, H, W, C)" if steps else "(H, W, C)"
        return f"observation '{key}' has shape {tuple(value.shape)}; images must be {layout}"
    if shape[-1] not in IMAGE_CHANNELS:
        return f"observation '{key}' has {shape[-1]} channels (shape {shape}); images have 1, 3 or 4"
    if expected is not None and shape != tuple(expected):
        return f"observation '{key}' has image shape {shape}, expected {tuple(expected)}"
    return None
