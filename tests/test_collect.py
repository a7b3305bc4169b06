"""collect_episodes: scripted demos as valid Episode objects."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from robofinetune.data.collect import collect_episodes
from robofinetune.data.episode import Episode
from robofinetune.envs import load_task_spec, make_env
from robofinetune.errors import ConfigError, TaskError
from robofinetune.paths import task_specs_dir


def check_episode(episode: Episode, task: str) -> None:
    spec = load_task_spec(task)
    assert isinstance(episode, Episode)
    episode.validate(task)
    length = len(episode)
    assert 0 < length <= spec.horizon
    assert episode.obs_keys == spec.obs_keys
    for key, shape in spec.obs_shapes.items():
        assert episode.observations[key].shape == (length, *shape)
        assert episode.observations[key].dtype == np.float32
        assert episode.final_observation[key].shape == shape
    assert episode.actions.shape == (length, spec.action_dim)
    assert np.all(np.abs(episode.actions) <= 1.0)
    assert episode.rewards.shape == (length,) and episode.terminals.shape == (length,)
    if episode.success:
        assert episode.rewards[-1] == 1.0 and episode.terminals[-1]
        assert episode.rewards[:-1].sum() == 0 and not episode.terminals[:-1].any()
    else:
        assert episode.rewards.sum() == 0 and not episode.terminals.any()
        assert length == spec.horizon  # a failed episode ran out of time
    meta = episode.metadata
    assert meta["task"] == spec.name and meta["source"] == "scripted"
    assert {"noise", "seed", "expert", "expert_style", "env_meta"} <= set(meta)


def test_collect_pointmass_returns_valid_episodes():
    episodes = collect_episodes("pointmass", 6, seed=0, progress=False)
    assert len(episodes) == 6
    for episode in episodes:
        check_episode(episode, "pointmass")
        assert episode.success  # the clean expert
        assert episode.states is None
    assert [e.metadata["seed"] for e in episodes] == list(range(6))
    # consecutive observations are consistent: next obs of step t is obs t+1, and the last is final_observation
    episode = episodes[0]
    nxt = episode.next_observations()
    np.testing.assert_array_equal(nxt["agent_pos"][:-1], episode.observations["agent_pos"][1:])
    np.testing.assert_array_equal(nxt["agent_pos"][-1], episode.final_observation["agent_pos"])


def test_collect_replays_in_the_env():
    """Replaying an episode's actions from its seed reproduces its observations exactly."""
    episode = collect_episodes("pointmass", 1, noise=0.7, seed=5, progress=False)[0]
    env = make_env("pointmass")
    obs, _ = env.reset(seed=episode.metadata["seed"])
    for t, action in enumerate(episode.actions):
        for key in obs:
            np.testing.assert_array_equal(obs[key], episode.observations[key][t])
        obs = env.step(action)[0]
    np.testing.assert_array_equal(obs["agent_pos"], episode.final_observation["agent_pos"])


def test_collect_is_reproducible():
    first = collect_episodes("pointmass", 3, noise=1.0, seed=11, progress=False)
    second = collect_episodes("pointmass", 3, noise=1.0, seed=11, progress=False)
    other = collect_episodes("pointmass", 3, noise=1.0, seed=12, progress=False)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.actions, b.actions)
    assert not np.array_equal(first[0].observations["goal_pos"], other[0].observations["goal_pos"])


def test_collect_only_success_with_noise():
    episodes = collect_episodes("pointmass", 8, noise=1.5, seed=0, only_success=True, progress=False)
    assert len(episodes) == 8
    assert all(e.success for e in episodes)
    for e in episodes:
        check_episode(e, "pointmass")
    # some attempts failed at this noise level and were skipped
    attempts = [e.metadata["attempt"] for e in episodes]
    assert attempts[-1] > 7
    assert all(e.metadata["noise"] == 1.5 for e in episodes)


def test_collect_keeps_failures_by_default():
    episodes = collect_episodes("pointmass", 20, noise=2.5, seed=0, progress=False)
    assert len(episodes) == 20
    assert not all(e.success for e in episodes)
    for e in episodes:
        check_episode(e, "pointmass")


def test_collect_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="source"):
        collect_episodes("pointmass", 1, source="teleop", progress=False)
    with pytest.raises(ConfigError, match="noise"):
        collect_episodes("pointmass", 1, noise=-0.1, progress=False)
    raw = yaml.safe_load((task_specs_dir() / "pointmass.yaml").read_text())
    raw["expert"] = None
    path = tmp_path / "no_expert.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(TaskError, match="expert"):
        collect_episodes(path, 1, progress=False)


@pytest.mark.slow
def test_collect_can_records_replayable_states():
    episodes = collect_episodes("can", 1, seed=0, progress=False)
    episode = episodes[0]
    check_episode(episode, "can")
    assert episode.success
    assert episode.states is not None and episode.states.shape[0] == len(episode)
    env = make_env("can")
    env.reset(seed=0)
    for t in (0, len(episode) // 2, len(episode) - 1):
        obs = env.set_state(episode.states[t])
        for key in obs:
            np.testing.assert_allclose(obs[key], episode.observations[key][t], atol=1e-6)
    assert episode.metadata["env_meta"]["env_name"] == "PickPlaceCan"
    env.close()
