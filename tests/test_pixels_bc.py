"""`train bc` from pixels on pointmass_image: the goal is only in the camera image, so a policy that gets close to
it has learned to read the image."""

import numpy as np
import pytest
import torch
from pixels_common import expert_image_demos

from robofinetune.cli import main
from robofinetune.data.io import save_dataset
from robofinetune.envs import make_env
from robofinetune.policies import load_policy

# Going to the arena's centre, the best a policy that ignores the image can do, ends this far from a goal drawn
# uniformly in [-0.3, 0.3]^2 on average (0.3 * E|u| for u uniform in the square [-1, 1]^2).
CENTRE_DISTANCE = 0.3 * 0.7652


@pytest.fixture(scope="module")
def image_demos(tmp_path_factory):
    path = tmp_path_factory.mktemp("pixels") / "pointmass_image_demos.hdf5"
    episodes = expert_image_demos(40, seed=0)
    assert sum(e.success for e in episodes) == 40
    return save_dataset(episodes, path, env_meta={"env_name": "pointmass_image", "task": "pointmass_image"})


def mean_final_distance(policy, episodes=8, seed=1000):
    env = make_env("pointmass_image")
    distances = []
    try:
        for index in range(episodes):
            obs, info = env.reset(seed=seed + index)
            policy.reset()
            for _ in range(100):
                obs, _, terminated, truncated, info = env.step(
                    policy.select_action({key: value[None] for key, value in obs.items()})[0])
                if terminated or truncated:
                    break
            distances.append(info["distance"])
    finally:
        env.close()
    return float(np.mean(distances))


def untrained_copy(policy):
    """The same checkpoint (config, normalisers, sampler) with its networks back at initialisation."""
    torch.manual_seed(1)
    for name, module in policy.named_modules():
        if hasattr(module, "reset_parameters") and "normalizer" not in name:
            module.reset_parameters()
    return policy


def train(image_demos, tmp_path, kind, steps):
    runs = tmp_path / "runs"
    assert main(["train", "bc", "--task=pointmass_image", f"--policy={kind}", f"--dataset={image_demos}",
                 f"--runs-dir={runs}", f"--max-steps={steps}", "--eval-episodes=0", "--seed=0"]) == 0
    return next(runs.iterdir()) / "policy"


def test_bc_from_pixels_beats_an_untrained_policy(image_demos, tmp_path):
    path = train(image_demos, tmp_path, "diffusion", steps=250)
    trained = mean_final_distance(load_policy(path, device="cpu"))
    untrained = mean_final_distance(untrained_copy(load_policy(path, device="cpu")))
    assert trained < 0.5 * untrained, (trained, untrained)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_bc_from_pixels_reads_the_goal_from_the_image(image_demos, tmp_path, kind):
    path = train(image_demos, tmp_path, kind, steps=1000)
    trained = mean_final_distance(load_policy(path, device="cpu"), episodes=20)
    assert trained < 0.5 * CENTRE_DISTANCE, trained
