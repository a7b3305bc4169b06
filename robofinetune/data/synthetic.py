"""Random episodes with the can task's layout, for tests and examples (no simulator needed)."""

from __future__ import annotations

import numpy as np

from robofinetune.data.episode import Episode

CAN_OBS_SHAPES: dict[str, tuple[int, ...]] = {
    "robot0_eef_pos": (3,),
    "robot0_eef_quat": (4,),
    "robot0_gripper_qpos": (2,),
    "object": (14,),
}


def synthetic_episodes(
    n: int = 4,
    length: int | tuple[int, int] = (5, 12),
    obs_shapes: dict[str, tuple[int, ...]] | None = None,
    action_dim: int = 7,
    image_key: str | None = None,
    image_shape: tuple[int, int, int] = (8, 8, 3),
    state_dim: int | None = 71,
    seed: int = 0,
) -> list[Episode]:
    """``n`` random episodes: float32 low-dim observations (can layout by default), actions in [-1, 1],
    every other episode successful (sparse reward 1 and terminal on its last step), an optional uint8
    image key, flattened states, a final observation and a little metadata. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    shapes = dict(CAN_OBS_SHAPES if obs_shapes is None else obs_shapes)
    low, high = (length, length) if isinstance(length, int) else length
    episodes = []
    for i in range(n):
        steps = int(rng.integers(low, high + 1))

        def draw(shape: tuple[int, ...], key: str, count: int) -> np.ndarray:
            if key == image_key:
                return rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)
            return rng.normal(size=(count, *shape)).astype(np.float32)

        all_shapes = dict(shapes)
        if image_key:
            all_shapes[image_key] = image_shape
        observations = {key: draw(shape, key, steps) for key, shape in all_shapes.items()}
        final = {key: draw(shape, key, 1)[0] for key, shape in all_shapes.items()}
        success = i % 2 == 0
        episodes.append(
            Episode(
                observations=observations,
                actions=rng.uniform(-1, 1, size=(steps, action_dim)).astype(np.float32),
                success=success,
                final_observation=final,
                states=rng.normal(size=(steps, state_dim)) if state_dim else None,
                metadata={"index": i, "operator": "synthetic", "tags": ["a", "b"]},
            )
        )
    return episodes
