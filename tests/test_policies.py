import json
import math

import numpy as np
import pytest
import torch

from robofinetune.errors import CheckpointError, TaskError
from robofinetune.policies import (POLICY_TYPES, DiffusionPolicy, DiffusionPolicyConfig, FlowPolicy,
                                   FlowPolicyConfig, load_policy, save_policy)
from robofinetune.policies.normalizer import MinMaxNormalizer


def make_policy(kind: str, **overrides):
    policy_class, config_class = POLICY_TYPES[kind]
    config = config_class(task="toy", obs_keys=["pos", "goal"], obs_shapes={"pos": [3], "goal": [2]}, action_dim=2,
                          n_obs_steps=2, horizon=4, n_action_steps=2, hidden_dim=32, depth=1, **overrides)
    policy = policy_class(config)
    policy.set_normalizers(np.random.uniform(-2, 2, (100, 5)), np.random.uniform(-1, 1, (100, 2)))
    return policy.eval()


def toy_obs(batch: int = 3):
    generator = np.random.default_rng(1)
    return {"pos": generator.normal(size=(batch, 2, 3)).astype(np.float32),
            "goal": generator.normal(size=(batch, 2, 2)).astype(np.float32)}


def test_normalizer_round_trip_and_constant_features():
    data = np.stack([np.linspace(-3, 5, 50), np.full(50, 7.0)], axis=1)
    normalizer = MinMaxNormalizer.from_data(data)
    x = torch.as_tensor(data, dtype=torch.float32)
    normalized = normalizer.normalize(x)
    assert normalized[:, 0].min() == pytest.approx(-1) and normalized[:, 0].max() == pytest.approx(1)
    assert torch.isfinite(normalized).all() and torch.allclose(normalized[:, 1], torch.zeros(50))
    assert torch.allclose(normalizer.unnormalize(normalized), x, atol=1e-5)


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_sampling_is_deterministic_given_noise(kind):
    policy = make_policy(kind)
    noise = torch.randn(3, 4, 2)
    first = policy.sample(toy_obs(), noise=noise).actions
    second = policy.sample(toy_obs(), noise=noise).actions
    assert torch.equal(first, second)
    assert not torch.equal(first, policy.sample(toy_obs(), noise=torch.randn(3, 4, 2)).actions)


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_chain_log_prob_is_the_gaussian_density_of_each_transition(kind):
    policy = make_policy(kind)
    obs = toy_obs()
    with torch.no_grad():
        sample = policy.sample(obs, steps=5, return_chain=True, stochastic=True)
        log_prob = policy.chain_log_prob(obs, sample.chain)
    assert sample.chain.shape == (3, 6, 4, 2) and log_prob.shape == (3, 5)
    # Recompute one transition's density independently of chain_log_prob's batching.
    condition = policy.encode_observation(obs)
    k = 2
    if kind == "flow":
        velocity = policy.velocity(sample.chain[:, k], torch.full((3,), k / 5), condition)
        mean, std = sample.chain[:, k] + velocity / 5, policy.config.chain_min_std
    else:
        scheduler = policy._ddim(5)
        timestep = int(scheduler.timesteps[k])
        eps = policy.denoiser(sample.chain[:, k], torch.full((3,), timestep), condition)
        mean = scheduler.step(eps, timestep, sample.chain[:, k], eta=policy.config.chain_eta,
                              variance_noise=torch.zeros_like(eps)).prev_sample
        std = policy._transition_std(scheduler, timestep)
        assert std >= policy.config.chain_min_std
    elementwise = torch.distributions.Normal(mean, std).log_prob(sample.chain[:, k + 1])
    assert torch.allclose(log_prob[:, k], elementwise.sum(dim=(1, 2)).detach(), atol=1e-3)
    with torch.no_grad():
        per_element = policy.chain_log_prob(obs, sample.chain, per_element=True)
    assert per_element.shape == (3, 5, 4, 2)
    assert torch.allclose(per_element[:, k], elementwise.detach(), atol=1e-4)
    assert torch.allclose(per_element.sum(dim=(2, 3)), log_prob, atol=1e-3)


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_unchanged_policy_gives_ratio_one_and_changed_policy_does_not(kind):
    policy = make_policy(kind)
    obs = toy_obs()
    with torch.no_grad():
        chain = policy.sample(obs, return_chain=True, stochastic=True).chain
        old = policy.chain_log_prob(obs, chain)
        ratio = torch.exp(policy.chain_log_prob(obs, chain) - old)
        assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)
        for parameter in policy.denoiser.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        changed = torch.exp(policy.chain_log_prob(obs, chain) - old)
    assert (changed - 1).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_bc_loss_trains_towards_the_expert(kind):
    policy = make_policy(kind).train()
    obs = toy_obs(64)
    # The expert's chunk depends on the goal: a learnable mapping.
    actions = torch.as_tensor(np.tanh(obs["goal"][:, -1:, :]).repeat(4, axis=1))
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = policy.bc_loss(obs, actions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    with torch.no_grad():
        predicted = policy.eval().sample(obs, steps=10).actions
    assert (predicted - actions).abs().mean() < 0.35


def test_select_action_executes_chunks_and_resets_one_env():
    policy = make_policy("flow")
    calls = []
    original = policy.act
    policy.act = lambda obs: calls.append(len(obs["pos"])) or original(obs)
    frame = {"pos": np.zeros((2, 3), np.float32), "goal": np.zeros((2, 2), np.float32)}
    assert policy.select_action(frame).shape == (2, 2)
    policy.select_action(frame)  # second step of the 2-step chunk: no new inference
    assert calls == [2]
    policy.reset(1)
    policy.select_action(frame)  # env 0 needs a new chunk, env 1 too after its reset
    assert calls == [2, 2]
    policy.reset(1)
    policy.select_action(frame)
    assert calls == [2, 2, 1]  # only env 1 replans


def test_checkpoint_round_trip_and_errors(tmp_path):
    policy = make_policy("diffusion")
    path = save_policy(policy, tmp_path / "ckpt", metadata={"made_by": "test"})
    loaded = load_policy(path, device="cpu")
    assert isinstance(loaded, DiffusionPolicy) and loaded.checkpoint_metadata["made_by"] == "test"
    noise = torch.randn(3, 4, 2)
    assert torch.allclose(policy.sample(toy_obs(), noise=noise).actions, loaded.sample(toy_obs(), noise=noise).actions)
    assert torch.equal(loaded.action_normalizer.low, policy.action_normalizer.low)
    with pytest.raises(CheckpointError, match="trained for task 'toy', not 'can'"):
        load_policy(path, task="can")
    document = json.loads((path / "policy.json").read_text())
    document["config"]["bogus_field"] = 1
    (path / "policy.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="bogus_field"):
        load_policy(path)
    save_policy(policy, path)
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_policy(path)
    with pytest.raises(CheckpointError, match="no such policy"):
        load_policy(tmp_path / "missing")


def test_wrong_observation_is_named():
    policy = make_policy("flow")
    with pytest.raises(TaskError, match="'goal'"):
        policy.select_action({"pos": np.zeros((1, 3), np.float32)})
    with pytest.raises(TaskError, match="'pos' has shape \\(4,\\)"):
        policy.select_action({"pos": np.zeros((1, 4), np.float32), "goal": np.zeros((1, 2), np.float32)})


def test_unet_policy_shapes():
    policy = make_policy("diffusion", network="unet", unet_dims=[16, 32])
    assert policy.sample(toy_obs(), steps=3).actions.shape == (3, 4, 2)


def test_package_mish_is_torch_mish_in_value_and_gradient():
    from torch import nn

    from robofinetune.policies.networks import Mish

    x = torch.linspace(-40.0, 40.0, 4001, dtype=torch.float64, requires_grad=True)
    reference = x.detach().clone().requires_grad_(True)
    ours, theirs = Mish()(x), nn.Mish()(reference)
    assert torch.allclose(ours, theirs, atol=1e-12, rtol=1e-10)
    ours.sum().backward()
    theirs.sum().backward()
    assert torch.allclose(x.grad, reference.grad, atol=1e-10, rtol=1e-8)
    for kind in ("diffusion", "flow"):
        modules = list(make_policy(kind).modules())
        assert any(isinstance(module, Mish) for module in modules)
        assert not any(isinstance(module, nn.Mish) for module in modules)
