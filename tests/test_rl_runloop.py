from dataclasses import dataclass

import numpy as np
import pytest
import torch

from robofinetune.errors import CheckpointError
from robofinetune.rl import EpisodeOutcome, ReplayBuffer, RunLoop
from robofinetune.runs import Run


@dataclass
class TinyConfig:
    task: str = "pointmass"


@pytest.fixture
def run(tmp_path):
    return Run.create("residual", "pointmass", TinyConfig(), root=tmp_path)


def test_counters_and_due(run):
    loop = RunLoop(run, total_env_steps=10, task="pointmass", progress=False)
    loop.start()
    hits = []
    for _ in range(5):
        loop.record(2, [EpisodeOutcome(0, True, 3, 1.0)] if loop.env_steps == 4 else [])
        hits.append(loop.due(3))
        loop.end_step()
    loop.close()
    assert loop.finished and loop.env_steps == 10 and loop.episodes == 1 and loop.recent_success_rate == 1.0
    # multiples of 3 are crossed at 4 (3), 6 and 10 (9)
    assert hits == [False, True, True, False, True]


def test_an_episode_aborted_by_a_dead_env_worker_is_neither_success_nor_failure(run):
    loop = RunLoop(run, total_env_steps=10, task="pointmass", progress=False)
    loop.record(2, [EpisodeOutcome(0, False, 5, 0.0, aborted=True), EpisodeOutcome(1, True, 4, 1.0)])
    assert loop.env_steps == 2 and loop.episodes == 1 and loop.successes == 1 and loop.recent_success_rate == 1.0


def test_checkpoint_restores_counters_buffers_and_caller_state_exactly(run):
    buffer = ReplayBuffer(3, 2, capacity=50, seed=1)
    rng = np.random.default_rng(0)
    for _ in range(7):
        buffer.add_transitions(rng.normal(size=(2, 3)), rng.normal(size=(2, 2)), rng.random(2), rng.normal(size=(2, 3)),
                               [False, True], [False, False], [0, 1])
    loop = RunLoop(run, total_env_steps=100, task="pointmass", progress=False)
    loop.start()
    loop.record(14, [EpisodeOutcome(1, True, 7, 1.0), EpisodeOutcome(0, False, 7, 0.0)])
    loop.eval_points.append({"env_steps": 14, "label": "eval", "success": 0.5, "ci": [0.1, 0.9], "episodes": 2})
    network = torch.nn.Linear(3, 2)
    loop.save_checkpoint({"net": network.state_dict(), "note": "x"}, {"online": buffer})
    assert loop.write_curve().exists()

    fresh_buffer = ReplayBuffer(3, 2, capacity=50, seed=7)
    fresh = RunLoop(run, total_env_steps=100, task="pointmass", progress=False)
    state = fresh.load_checkpoint({"online": fresh_buffer})
    assert state["note"] == "x" and torch.equal(state["net"]["weight"], network.weight.detach())
    assert (fresh.env_steps, fresh.episodes, fresh.successes) == (14, 2, 1)
    assert list(fresh.recent_success) == [True, False] and fresh.eval_points == loop.eval_points
    for name in ReplayBuffer._ARRAYS:
        assert np.array_equal(getattr(fresh_buffer, name), getattr(buffer, name))
    assert np.array_equal(fresh_buffer.sample(8, 3).obs, buffer.sample(8, 3).obs)
    assert fresh.first_steps_reaching(0.5) == 14 and fresh.first_steps_reaching(0.6) is None


def test_missing_checkpoint_and_missing_buffer(run):
    loop = RunLoop(run, total_env_steps=10, task="pointmass", progress=False)
    assert loop.load_checkpoint({}) is None
    loop.save_checkpoint({}, {})
    with pytest.raises(CheckpointError, match="online.npz"):
        loop.load_checkpoint({"online": ReplayBuffer(1, 1, 4)})
