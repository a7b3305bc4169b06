import pytest
import torch

from robofinetune.rl import CriticEnsemble, ensemble_min_target, polyak_update


def test_batched_ensemble_matches_a_loop_over_heads_in_values_and_gradients():
    critic = CriticEnsemble(obs_dim=5, action_dim=2, num_heads=4, hidden_dim=16, depth=2)
    loop = critic.head_modules()
    obs, action = torch.randn(7, 5), torch.randn(7, 2)
    batched_q, loop_q = critic(obs, action), loop(obs, action)
    assert batched_q.shape == (4, 7)
    assert torch.allclose(batched_q, loop_q, atol=1e-5)
    # heads are initialised independently, so they disagree (an ensemble, not 4 copies)
    assert (batched_q.std(dim=0) > 1e-3).all()
    batched_q.square().sum().backward()
    loop_q.square().sum().backward()
    first_linear = loop.heads[2][0]
    assert torch.allclose(critic.weights[0].grad[2].T, first_linear.weight.grad, atol=1e-4)


def test_ensemble_accepts_a_separate_batch_per_head():
    critic = CriticEnsemble(obs_dim=3, action_dim=1, num_heads=2, hidden_dim=8, depth=1, layer_norm=False)
    obs, action = torch.randn(2, 5, 3), torch.randn(2, 5, 1)
    q = critic(obs, action)
    assert q.shape == (2, 5)
    assert torch.allclose(q[1], critic(obs[1], action[1])[1], atol=1e-6)


def test_min_target_is_the_minimum_over_a_random_subset_of_heads():
    q = torch.tensor([[1.0, 5.0], [2.0, 0.0], [3.0, 4.0], [0.5, 9.0]])
    generator = torch.Generator().manual_seed(3)
    chosen = torch.randperm(4, generator=torch.Generator().manual_seed(3))[:2]
    assert torch.equal(ensemble_min_target(q, 2, generator), q[chosen].min(dim=0).values)
    assert torch.equal(ensemble_min_target(q, 4), torch.tensor([0.5, 0.0]))
    # over many draws every pair shows up, not one fixed pair
    draws = {tuple(ensemble_min_target(q, 2, generator).tolist()) for _ in range(200)}
    assert len(draws) >= 5


def test_polyak_update_moves_target_by_tau():
    source, target = CriticEnsemble(2, 1, 2, 4, 1), CriticEnsemble(2, 1, 2, 4, 1)
    before = [p.clone() for p in target.parameters()]
    polyak_update(target, source, 0.25)
    for old, new, src in zip(before, target.parameters(), source.parameters()):
        assert torch.allclose(new, 0.75 * old + 0.25 * src)


@pytest.mark.parametrize("depth", [1, 3])
def test_ensemble_depth(depth):
    critic = CriticEnsemble(4, 2, num_heads=3, hidden_dim=8, depth=depth)
    assert len(critic.weights) == depth + 1
    assert torch.allclose(critic(torch.ones(2, 4), torch.ones(2, 2)), critic.head_modules()(torch.ones(2, 4), torch.ones(2, 2)), atol=1e-5)
