import numpy as np
import pytest

from robofinetune.data.episode import Episode
from robofinetune.errors import CheckpointError
from robofinetune.rl import ReplayBuffer, sample_symmetric, symmetric_slots

GAMMA = 0.9


def add_episode_rows(buffer, obs_values, rewards, terminal_at_end, stream=0, truncated_at_end=False):
    """Add an episode row by row (as online data arrives); obs are scalars so rows are easy to identify."""
    slots = []
    for t, (value, reward) in enumerate(zip(obs_values, rewards)):
        last = t == len(obs_values) - 1
        slots.append(int(buffer.add_transitions([[value]], [[0.0]], [reward], [[value + 0.5]],
                                                [terminal_at_end and last], [truncated_at_end and last], [stream])[0]))
    return slots


def test_n_step_return_stops_at_a_terminal():
    buffer = ReplayBuffer(1, 1, capacity=10)
    slots = add_episode_rows(buffer, [0, 1, 2, 3], [0, 0, 0, 1], terminal_at_end=True)
    batch = buffer.gather(np.array(slots), n_step=3, gamma=GAMMA)
    # t=0: r0 + g r1 + g^2 r2 = 0, bootstrap from next_obs of t=2 with g^3
    assert batch.reward[0] == pytest.approx(0.0) and batch.discount[0] == pytest.approx(GAMMA ** 3)
    assert batch.next_obs[0, 0] == pytest.approx(2.5)
    # t=1: g^2 * 1 from the terminal step, no bootstrap
    assert batch.reward[1] == pytest.approx(GAMMA ** 2) and batch.discount[1] == 0.0
    assert batch.reward[2] == pytest.approx(GAMMA) and batch.discount[2] == 0.0
    assert batch.reward[3] == pytest.approx(1.0) and batch.discount[3] == 0.0
    one_step = buffer.gather(np.array(slots), n_step=1, gamma=GAMMA)
    assert np.allclose(one_step.discount, [GAMMA, GAMMA, GAMMA, 0.0])
    assert np.allclose(one_step.next_obs[:, 0], [0.5, 1.5, 2.5, 3.5])


def test_truncated_episode_bootstraps_from_its_last_state_and_does_not_run_into_the_next():
    buffer = ReplayBuffer(1, 1, capacity=20)
    first = add_episode_rows(buffer, [0, 1, 2], [0, 0, 0], terminal_at_end=False, truncated_at_end=True)
    add_episode_rows(buffer, [10, 11, 12], [1, 1, 1], terminal_at_end=False)  # same env, next episode
    batch = buffer.gather(np.array(first), n_step=3, gamma=GAMMA)
    assert np.allclose(batch.reward, 0.0)  # the next episode's rewards are not summed in
    assert np.allclose(batch.discount, [GAMMA ** 3, GAMMA ** 2, GAMMA])
    assert np.allclose(batch.next_obs[:, 0], 2.5)


def test_interleaved_envs_chain_their_own_steps_and_open_chains_give_shorter_returns():
    buffer = ReplayBuffer(1, 1, capacity=20)
    # env 0 rewards 1 everywhere, env 1 rewards 0: rows alternate as a vector env delivers them
    for t in range(3):
        buffer.add_transitions([[t], [100 + t]], [[0], [0]], [1.0, 0.0], [[t + 1], [101 + t]], [False, False],
                               [False, False], [0, 1])
    batch = buffer.gather(np.array([0, 1, 4]), n_step=3, gamma=GAMMA)
    assert batch.reward[0] == pytest.approx(1 + GAMMA + GAMMA ** 2) and batch.next_obs[0, 0] == 3
    assert batch.reward[1] == pytest.approx(0.0) and batch.next_obs[1, 0] == 103
    # env 0's step 2 has no successor yet: a 1-step return bootstrapping from its own next state
    assert batch.reward[2] == pytest.approx(1.0) and batch.discount[2] == pytest.approx(GAMMA)
    assert batch.next_obs[2, 0] == 3


def test_ring_buffer_never_links_into_overwritten_rows():
    buffer = ReplayBuffer(1, 1, capacity=4)
    add_episode_rows(buffer, list(range(6)), [0.0] * 6, terminal_at_end=False)
    assert len(buffer) == 4 and buffer.added == 6
    batch = buffer.gather(np.arange(4), n_step=5, gamma=GAMMA)
    # slots hold steps 4, 5, 2, 3; step 3 continues into step 4 (slot 0), step 5 is the newest
    by_step = dict(zip(buffer.obs[:, 0].astype(int), range(4)))
    assert batch.next_obs[by_step[2], 0] == pytest.approx(5.5)   # 2 -> 3 -> 4 -> 5
    assert batch.next_obs[by_step[5], 0] == pytest.approx(5.5)
    # a stream idle for a full buffer does not link to the row that replaced its last one
    buffer.add_transitions([[50]], [[0]], [0], [[50.5]], [False], [False], [7])
    for value in range(4):
        buffer.add_transitions([[60 + value]], [[0]], [0], [[60.5 + value]], [False], [False], [8])
    slot = buffer.add_transitions([[51]], [[0]], [0], [[51.5]], [False], [False], [7])[0]
    assert (buffer.next_index[buffer.next_index >= 0] != slot).all()


def test_add_episode_appends_extra_features_and_ends_the_chain():
    episode = Episode({"pos": np.arange(3, dtype=np.float32)[:, None], "vel": np.ones((3, 2), np.float32)},
                      actions=np.zeros((3, 1)), success=True, final_observation={"pos": np.array([3.0]), "vel": np.ones(2)})
    buffer = ReplayBuffer(obs_dim=4, action_dim=1, capacity=10)
    extra = np.arange(4, dtype=np.float32)[:, None] * 10
    buffer.add_episode(episode, ["pos", "vel"], extra=extra)
    assert np.allclose(buffer.obs[:3], [[0, 1, 1, 0], [1, 1, 1, 10], [2, 1, 1, 20]])
    assert np.allclose(buffer.next_obs[2], [3, 1, 1, 30])
    batch = buffer.gather(np.array([0]), n_step=5, gamma=GAMMA)
    assert batch.reward[0] == pytest.approx(GAMMA ** 2) and batch.discount[0] == 0.0
    buffer.add_episode(episode, ["pos", "vel"], extra=extra)
    assert buffer.gather(np.array([2]), n_step=3, gamma=GAMMA).reward[0] == pytest.approx(1.0)


def test_symmetric_sampling_takes_half_from_each_buffer():
    offline, online = ReplayBuffer(1, 1, 100, seed=0), ReplayBuffer(1, 1, 100, seed=1)
    with pytest.raises(ValueError):
        sample_symmetric(offline, online, 4)  # both empty
    offline.add_transitions(-np.ones((50, 1)), np.zeros((50, 1)), np.zeros(50), np.zeros((50, 1)), np.zeros(50),
                            np.ones(50), np.arange(50))
    only_offline = sample_symmetric(offline, online, 64)
    assert len(only_offline) == 64 and (only_offline.obs == -1).all()
    online.add_transitions(np.ones((5, 1)), np.zeros((5, 1)), np.zeros(5), np.zeros((5, 1)), np.zeros(5),
                           np.ones(5), np.arange(5))
    batch = sample_symmetric(offline, online, 64, n_step=3, gamma=GAMMA)
    assert (batch.obs == -1).sum() == 32 and (batch.obs == 1).sum() == 32
    assert (sample_symmetric(offline, online, 10, offline_fraction=0.2).obs == -1).sum() == 2
    # the rows it takes, for data kept beside the buffers: same draws for the same sampler state
    state = offline.rng.bit_generator.state, online.rng.bit_generator.state
    parts = symmetric_slots(offline, online, 10, offline_fraction=0.2)
    assert [(buffer, len(slots)) for buffer, slots in parts] == [(offline, 2), (online, 8)]
    offline.rng.bit_generator.state, online.rng.bit_generator.state = state
    again = sample_symmetric(offline, online, 10, offline_fraction=0.2)
    assert np.array_equal(again.obs[:2], offline.obs[parts[0][1]]) and np.array_equal(again.obs[2:], online.obs[parts[1][1]])


def test_state_dict_and_file_round_trip_restore_contents_and_sampling(tmp_path):
    buffer = ReplayBuffer(2, 1, capacity=8, seed=5)
    rng = np.random.default_rng(0)
    for t in range(11):  # wraps around; env 1's episode is still open at the end
        buffer.add_transitions(rng.normal(size=(2, 2)), rng.normal(size=(2, 1)), rng.random(2), rng.normal(size=(2, 2)),
                               [t == 4, False], [False, False], [0, 1])
    buffer.sample(3, 3, GAMMA)
    buffer.save(tmp_path / "buffer.npz")
    restored = ReplayBuffer(2, 1, capacity=8, seed=99)
    restored.load(tmp_path / "buffer.npz")
    for name in ReplayBuffer._ARRAYS:
        assert np.array_equal(getattr(restored, name), getattr(buffer, name)), name
    assert restored._open_streams == buffer._open_streams and restored.added == buffer.added
    a, b = buffer.sample(16, 3, GAMMA), restored.sample(16, 3, GAMMA)
    assert np.array_equal(a.obs, b.obs) and np.array_equal(a.reward, b.reward) and np.array_equal(a.next_obs, b.next_obs)
    # the open episode keeps linking after the restore, exactly as in the original
    for target in (buffer, restored):
        target.add_transitions([[0, 0]], [[0]], [0], [[0, 0]], [False], [False], [1])
    assert np.array_equal(buffer.next_index, restored.next_index)
    # a buffer of another layout, and a file cut short (a crash mid-copy, a full disk), name the file
    with pytest.raises(CheckpointError, match="buffer.npz.*does not fit"):
        ReplayBuffer(3, 1, capacity=8).load(tmp_path / "buffer.npz")
    data = (tmp_path / "buffer.npz").read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        (tmp_path / "cut.npz").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="cut.npz: unreadable replay buffer"):
            ReplayBuffer(2, 1, capacity=8).load(tmp_path / "cut.npz")


def test_a_buffer_that_never_wrapped_restores_into_a_different_capacity():
    """Resuming a run whose total_env_steps (and so the default capacity) changed keeps its transitions."""
    small = ReplayBuffer(3, 1, capacity=50, seed=0)
    for t in range(10):
        small.add_transitions(np.full((1, 3), t, np.float32), np.zeros((1, 1)), np.zeros(1), np.full((1, 3), t + 1),
                              np.array([t == 9]), np.array([False]), [0])
    larger = ReplayBuffer(3, 1, capacity=80, seed=0)
    larger.load_state_dict(small.state_dict())
    assert len(larger) == 10 and np.array_equal(larger.obs[:10], small.obs[:10])
    too_small = ReplayBuffer(3, 1, capacity=5, seed=0)
    with pytest.raises(ValueError, match="buffer_capacity"):
        too_small.load_state_dict(small.state_dict())
