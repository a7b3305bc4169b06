"""DPPO mode: GAE over chunk transitions (semi-MDP discounts, terminal vs time-limit ends) and PPO over the last
K' denoising steps."""

import numpy as np
import pytest
import torch

from robofinetune.algos.chain_rl import ChunkedActor, unflatten_history
from robofinetune.algos.dppo import (DPPOLearner, DPPOSettings, OnPolicyBatch, RunningReturnScale,
                                     build_on_policy_batch, clip_schedule, dppo_update, generalized_advantage)
from robofinetune.algos.ogpo import OGPOConfig
from robofinetune.rl import VectorRollout

from test_ogpo import make_policy


def test_gae_stops_at_terminals_and_uses_each_chunks_discount():
    advantage = generalized_advantage(reward=np.array([0.0, 0.0, 1.0]), discount=np.array([0.9, 0.81, 0.9]),
                                      value=np.array([0.5, 0.6, 0.7]), next_value=np.array([0.6, 0.7, 0.9]),
                                      terminated=np.array([False, False, True]),
                                      episode_end=np.array([False, False, True]), lam=0.5)
    last = 1.0 - 0.7                                  # success: no bootstrap from next_value
    middle = (0.81 * 0.7 - 0.6) + 0.81 * 0.5 * last  # a chunk of two steps discounts by gamma^2
    first = (0.9 * 0.6 - 0.5) + 0.9 * 0.5 * middle
    assert advantage == pytest.approx([first, middle, last])


def test_gae_bootstraps_a_time_limit_and_does_not_leak_into_the_next_episode():
    advantage = generalized_advantage(reward=np.array([0.0, 0.0]), discount=np.array([0.9, 0.9]),
                                      value=np.array([0.2, 0.3]), next_value=np.array([0.4, 0.5]),
                                      terminated=np.array([False, False]), episode_end=np.array([True, False]), lam=0.9)
    assert advantage == pytest.approx([0.9 * 0.4 - 0.2, 0.9 * 0.5 - 0.3])


@pytest.mark.parametrize("ft_steps", [0, 2])
def test_dppo_ratio_is_one_before_the_update_on_the_last_k_denoising_steps(ft_steps):
    from robofinetune.envs import make_vector_env

    torch.manual_seed(0)
    policy = make_policy("diffusion", n_obs_steps=2)
    config = OGPOConfig(task="pointmass")
    config.dppo.ft_denoising_steps, config.dppo.epochs, config.dppo.minibatch = ft_steps, 1, 10_000
    config.dppo.value_hidden_dim, config.dppo.actor_lr = 16, 1e-3
    learner = DPPOLearner(config, policy, chain_steps=5)
    envs = make_vector_env("pointmass", num_envs=2, seed=5, asynchronous=False, horizon=12)
    actor = ChunkedActor(VectorRollout(envs), policy, chain_steps=5, gamma=0.99)
    actor.reset(seed=5)
    sequences = [[], []]
    for _ in range(15):
        for chunk in actor.step()[1]:
            sequences[chunk.env_index].append(chunk)
    for chunk in actor.cut():
        sequences[chunk.env_index].append(chunk)
    envs.close()
    batch = build_on_policy_batch(learner, sequences)
    assert batch.old_log_prob.shape == (len(batch.obs), ft_steps or 5)
    assert batch.chains.shape[1:] == (6, 4, 2)
    before = [parameter.detach().clone() for parameter in policy.parameters()]
    stats = dppo_update(learner, batch, success=None)
    assert stats["ratio_dev"] < 1e-4          # one minibatch, evaluated before its step: the collecting policy
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    # the cut at the end of the iteration ends each env's sequence with a non-terminal, bootstrapped chunk
    assert all(not sequence[-1].terminated for sequence in sequences)


def test_clip_schedule_rises_from_the_base_to_the_clip_at_the_last_transition():
    settings = DPPOSettings(clip_ratio=0.01, clip_ratio_base=0.001, clip_ratio_rate=3.0)
    clip = clip_schedule(settings, 10)
    assert clip[0].item() == pytest.approx(0.001) and clip[-1].item() == pytest.approx(0.01)
    assert torch.all(clip[1:] > clip[:-1])
    middle = 0.001 + 0.009 * (np.exp(1.5) - 1) / (np.exp(3.0) - 1)
    assert clip_schedule(settings, 3)[1].item() == pytest.approx(middle)
    assert clip_schedule(DPPOSettings(clip_ratio=0.02), 10) == 0.02      # no base: one clip for all


def test_running_reward_scale_divides_by_the_std_of_discounted_returns_and_resets_at_episode_ends():
    from robofinetune.algos.chain_rl import ChunkTransition

    def chunk(env, reward, end=False):
        return ChunkTransition(env, np.zeros(2), np.zeros(2), np.zeros((2, 1, 1)), reward=reward, discount=0.5,
                               terminated=end)

    scale = RunningReturnScale(num_envs=1)
    rewards = scale.scale([[chunk(0, 1.0), chunk(0, 1.0, end=True), chunk(0, 2.0)]])[0]
    returns = np.array([1.0, 1.5, 2.0])      # 1; 0.5 * 1 + 1; reset, then 2
    assert rewards == pytest.approx(np.array([1.0, 1.0, 2.0]) / returns.std())
    assert float(scale.returns[0]) == 2.0    # the running episode's return carries into the next iteration


def test_value_only_warmup_iterations_leave_the_policy_unchanged():
    torch.manual_seed(0)
    policy = make_policy("diffusion", n_obs_steps=2)
    config = OGPOConfig(task="pointmass")
    config.dppo.critic_warmup_iterations, config.dppo.epochs, config.dppo.value_hidden_dim = 1, 1, 16
    learner = DPPOLearner(config, policy, chain_steps=5)

    with torch.no_grad():
        obs = torch.randn(8, 12)
        chains = policy.sample(unflatten_history(obs, policy), steps=5, return_chain=True, stochastic=True).chain
    batch = OnPolicyBatch(obs, chains, torch.zeros(8, 5), torch.randn(8), torch.randn(8))
    before = [parameter.detach().clone() for parameter in policy.parameters()]
    value_before = [parameter.detach().clone() for parameter in learner.value.parameters()]
    stats = dppo_update(learner, batch, success=None)
    assert stats["actor_trained"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(value_before, learner.value.parameters()))


def _on_policy_batch(policy, rows=8, device="cpu"):
    with torch.no_grad():
        obs = torch.randn(rows, 12)
        chains = policy.sample(unflatten_history(obs.to(policy.device), policy), steps=5, return_chain=True,
                               stochastic=True).chain.cpu()
    return OnPolicyBatch(obs, chains, torch.zeros(rows, 5), torch.randn(rows), torch.randn(rows)).to(device)


def test_dppo_learner_lives_on_the_policys_device_and_checkpoints_on_the_cpu():
    torch.manual_seed(0)
    policy = make_policy("diffusion", n_obs_steps=2)
    config = OGPOConfig(task="pointmass", device="cpu")
    config.dppo.epochs, config.dppo.value_hidden_dim, config.dppo.reward_scale_running = 1, 16, True
    learner = DPPOLearner(config, policy, chain_steps=5)
    assert learner.device == policy.device and learner.sampling_generator.device == policy.device
    assert next(learner.value.parameters()).device == policy.device
    assert learner.reward_scale.returns.device.type == "cpu"      # per-transition float64 bookkeeping: CPU
    dppo_update(learner, _on_policy_batch(policy), success=None)
    state = learner.learner_state()
    assert all(value.device.type == "cpu" for value in state["networks"].values())
    assert state["sampling_generator"]["device"] == "cpu"
    resumed = DPPOLearner(config, make_policy("diffusion", n_obs_steps=2), chain_steps=5)
    resumed.load_learner_state(state)
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), learner.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="hardware-bound: needs a CUDA device, and this machine has none (the CPU test above runs "
                           "the same code on the CPU)")
def test_dppo_update_runs_on_cuda_and_its_checkpoint_loads_on_the_cpu():
    torch.manual_seed(0)
    policy = make_policy("diffusion", n_obs_steps=2).to("cuda")
    config = OGPOConfig(task="pointmass", device="cuda")
    config.dppo.epochs, config.dppo.value_hidden_dim, config.dppo.clip_ratio_base = 2, 16, 0.001
    learner = DPPOLearner(config, policy, chain_steps=5)
    assert next(learner.value.parameters()).is_cuda and learner.sampling_generator.device.type == "cuda"
    before = [parameter.detach().clone() for parameter in policy.parameters()]
    stats = dppo_update(learner, _on_policy_batch(policy), success=None)     # a CPU batch is moved in
    assert stats["actor_trained"] == 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    state = learner.learner_state()
    on_cpu = DPPOLearner(OGPOConfig(task="pointmass", device="cpu", dppo=config.dppo),
                         make_policy("diffusion", n_obs_steps=2), chain_steps=5)
    on_cpu.load_learner_state(state)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(learner.parameters(), on_cpu.parameters()))
