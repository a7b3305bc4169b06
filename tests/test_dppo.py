"""DPPO mode: GAE over chunk transitions (semi-MDP discounts, terminal vs time-limit ends) and PPO over the last
K' denoising steps."""

import numpy as np
import pytest
import torch

from robofinetune.algos.ogpo import (ChunkedActor, DPPOLearner, OGPOConfig, build_on_policy_batch, dppo_update,
                                     generalized_advantage)
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
