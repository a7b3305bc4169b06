"""Diffusion and flow policies from pixels: end-to-end gradients, checkpoints that carry the encoder and refuse other
cameras, images kept uint8 up to the encoder, state-only policies unchanged."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from robofinetune.envs import load_task_spec, make_env
from robofinetune.envs.spec import Camera
from robofinetune.errors import CheckpointError, TaskError
from robofinetune.policies import POLICY_TYPES, check_policy_matches_env, load_policy, save_policy

REPO = Path(__file__).resolve().parents[1]


def image_policy(kind, encoder="conv", size=32, **overrides):
    spec = load_task_spec("pointmass_image")
    shapes = {key: list(shape) for key, shape in spec.obs_shapes.items()}
    shapes["top_image"] = [size, size, 3]
    policy_class, config_class = POLICY_TYPES[kind]
    config = config_class(task="pointmass_image", obs_keys=spec.obs_keys, obs_shapes=shapes, action_dim=2,
                          n_obs_steps=2, horizon=4, n_action_steps=2, hidden_dim=32, depth=1, encoder=encoder,
                          image_feature_dim=16, **overrides)
    policy = policy_class(config)
    generator = np.random.default_rng(0)
    policy.set_normalizers(generator.uniform(-0.4, 0.4, (100, 4)), generator.uniform(-1, 1, (100, 2)))
    return policy


def image_obs(batch=3, steps=2, size=32, seed=1):
    generator = np.random.default_rng(seed)
    return {"agent_pos": generator.uniform(-0.3, 0.3, (batch, steps, 2)).astype(np.float32),
            "agent_vel": generator.normal(0, 0.1, (batch, steps, 2)).astype(np.float32),
            "top_image": generator.integers(0, 256, (batch, steps, size, size, 3), dtype=np.uint8)}


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_bc_loss_trains_the_image_encoder_end_to_end(kind):
    policy = image_policy(kind).train()
    assert policy.condition_dim == 2 * (16 + 4)
    loss = policy.bc_loss(image_obs(), torch.rand(3, 4, 2) * 2 - 1)
    loss.backward()
    first_conv = policy.obs_encoder.image_encoders["top_image"].backbone.convs[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    before = first_conv.detach().clone()
    optimizer.step()
    assert not torch.equal(before, first_conv)


@pytest.mark.parametrize("kind, encoder", [("diffusion", "conv"), ("flow", "conv"), ("diffusion", "resnet18"),
                                          ("flow", "strided_conv")])
def test_image_policy_round_trips_through_a_checkpoint(tmp_path, kind, encoder):
    # resnet18's spatial softmax needs >= 33 px, strided_conv's four stride-2 layers >= 39 px
    size = {"conv": 32, "strided_conv": 52, "resnet18": 48}[encoder]
    policy = image_policy(kind, encoder=encoder, size=size, augmentation="crop").eval()
    obs = image_obs(size=size)
    noise = torch.randn(3, 4, 2)
    with torch.no_grad():
        expected = policy.sample(obs, noise=noise).actions
        # eval mode: the centre crop, no randomness
        assert torch.equal(expected, policy.sample(obs, noise=noise).actions)
    save_policy(policy, tmp_path / "policy", {"task": "pointmass_image"})
    document = json.loads((tmp_path / "policy" / "policy.json").read_text())
    assert document["config"]["encoder"] == encoder and document["config"]["augmentation"] == "crop"
    with safe_open(str(tmp_path / "policy" / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert any(name.startswith("obs_encoder.image_encoders.top_image.backbone.") for name in names)
    assert "obs_encoder.state_normalizer.low" in names and "obs_normalizer.low" not in names  # stored once
    loaded = load_policy(tmp_path / "policy", device="cpu")
    assert loaded.obs_normalizer is loaded.obs_encoder.state_normalizer
    assert torch.equal(loaded.obs_normalizer.high, policy.obs_normalizer.high)
    with torch.no_grad():
        assert torch.equal(loaded.sample(obs, noise=noise).actions, expected)


def _variant_env(size):
    spec = load_task_spec("pointmass_image")
    shapes = dict(spec.obs_shapes, top_image=(size, size, 3))
    return make_env(replace(spec, cameras=[Camera("top", size, size)], obs_shapes=shapes))


def test_checkpoint_refuses_another_camera_size_or_set(tmp_path):
    save_policy(image_policy("diffusion"), tmp_path / "policy")
    policy = load_policy(tmp_path / "policy", device="cpu")
    same = make_env("pointmass_image")
    check_policy_matches_env(policy, same, "policy")  # the camera it was trained on: accepted
    same.close()
    bigger = _variant_env(48)
    with pytest.raises(CheckpointError, match=r"policy: camera image 'top_image' is \(32, 32, 3\) in the checkpoint "
                                              r"but \(48, 48, 3\) in the env"):
        check_policy_matches_env(policy, bigger, "policy")
    bigger.close()
    without = make_env("pointmass")
    with pytest.raises(CheckpointError, match=r"trained on camera image 'top_image' \(cameras \['top_image'\]\), "
                                              r"which the env does not provide \(env cameras: \[\]\)"):
        check_policy_matches_env(policy, without, "policy")
    without.close()
    # observations handed to the policy directly are checked too, naming the key and both shapes
    frame = {key: value[:, 0] for key, value in image_obs(size=48).items()}
    with pytest.raises(TaskError, match=r"observation 'top_image' has shape \(48, 48, 3\), policy for task "
                                        r"'pointmass_image' expects \(32, 32, 3\)"):
        policy.select_action(frame)
    frame = {key: value[:, 0] for key, value in image_obs().items() if key != "top_image"}
    frame["front_image"] = np.zeros((3, 32, 32, 3), np.uint8)
    with pytest.raises(TaskError, match=r"needs observation key 'top_image' \(it was trained on cameras "
                                        r"\['top_image'\]\)"):
        policy.select_action(frame)
    frame = {key: value[:, 0].astype(np.float32) for key, value in image_obs().items()}
    with pytest.raises(TaskError, match=r"observation 'top_image' is float32; .* takes images as uint8"):
        policy.select_action(frame)


def test_images_stay_uint8_until_the_encoder():
    policy = image_policy("flow").eval()
    seen = []
    forward = policy.obs_encoder.forward

    def spy(obs):
        seen.append(np.asarray(obs["top_image"]).dtype)
        return forward(obs)

    policy.obs_encoder.forward = spy
    policy.reset()
    frame = {key: value[:, 0] for key, value in image_obs().items()}
    for _ in range(3):
        actions = policy.select_action(frame)
    assert actions.shape == (3, 2) and seen and all(dtype == np.uint8 for dtype in seen)


def test_state_only_policies_keep_their_layout():
    policy_class, config_class = POLICY_TYPES["diffusion"]
    config = config_class(task="toy", obs_keys=["pos", "goal"], obs_shapes={"pos": [3], "goal": [2]}, action_dim=2,
                          hidden_dim=32, depth=1)
    policy = policy_class(config)
    assert not hasattr(policy, "obs_encoder") and policy.condition_dim == 2 * 5
    assert {name.split(".")[0] for name in policy.state_dict()} == {"obs_normalizer", "action_normalizer", "denoiser"}
    # a shipped checkpoint (written before image policies existed) loads, weights and all
    shipped = REPO / "policies" / "can" / "strong_diffusion"
    loaded = load_policy(shipped, device="cpu")
    assert not hasattr(loaded, "obs_encoder") and loaded.config.image_keys == []
    with safe_open(str(shipped / "model.safetensors"), "pt") as weights:
        assert set(weights.keys()) == set(loaded.state_dict())
    with pytest.raises(ValueError, match=r"flat state observations \(N, 5\)"):
        policy.set_normalizers(np.zeros((10, 6)), np.zeros((10, 2)))
