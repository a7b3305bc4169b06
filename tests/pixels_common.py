"""Shared by the tests/test_pixels_*.py files: scripted demos with camera observations, rendered on pointmass_image."""

from __future__ import annotations

import numpy as np

from robofinetune.data.episode import Episode
from robofinetune.envs import load_task_spec, make_env
from robofinetune.envs.experts import make_expert


def expert_image_demos(num_episodes: int, seed: int = 0, task: str = "pointmass_image",
                       max_steps: int | None = None) -> list[Episode]:
    """The scripted expert on an image task (it reads the goal from the simulator, the episodes keep what the
    task observes: state keys as float32, camera keys as uint8)."""
    spec = load_task_spec(task)
    env = make_env(spec)
    episodes = []
    try:
        for index in range(num_episodes):
            obs, _ = env.reset(seed=seed + index)
            expert = make_expert(spec, seed=seed + index)
            expert.reset(env)
            frames: dict[str, list[np.ndarray]] = {key: [] for key in spec.obs_keys}
            actions = []
            terminated = truncated = False
            while not (terminated or truncated) and (max_steps is None or len(actions) < max_steps):
                for key in spec.obs_keys:
                    frames[key].append(obs[key])
                action = expert.act(obs)
                actions.append(action)
                obs, _, terminated, truncated, _ = env.step(action)
            episodes.append(Episode(observations={key: np.stack(values) for key, values in frames.items()},
                                    actions=np.stack(actions), success=bool(terminated),
                                    final_observation={key: obs[key] for key in spec.obs_keys},
                                    metadata={"seed": seed + index}))
    finally:
        env.close()
    return episodes
