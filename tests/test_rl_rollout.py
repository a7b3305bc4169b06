import numpy as np

from robofinetune.envs import make_vector_env
from robofinetune.rl import VectorRollout


def test_rollout_gives_the_finished_episode_last_observation_and_resets_per_env_state():
    envs = make_vector_env("pointmass", num_envs=2, seed=0, asynchronous=False, horizon=4)
    hook_calls = []
    rollout = VectorRollout(envs, reset_hooks=[hook_calls.append])
    waited = []
    try:
        first = rollout.reset(seed=0)
        assert hook_calls == [None]
        positions = [first["agent_pos"].copy()]
        steps = []
        for _ in range(5):
            steps.append(rollout.step(np.ones((2, 2), np.float32), while_waiting=lambda: waited.append(1)))
            positions.append(rollout.obs["agent_pos"].copy())
        assert len(waited) == 5
        # step 4 ends both episodes by the time limit
        done_step = steps[3]
        assert done_step.truncated.all() and not done_step.terminated.any()
        assert hook_calls == [None, 0, 1]
        assert [(o.env_index, o.length, o.success) for o in done_step.finished] == [(0, 4, False), (1, 4, False)]
        # the transition's next obs continues the pushed trajectory; the returned obs is a fresh episode
        pushed = done_step.next_obs["agent_pos"]
        assert (pushed > steps[2].next_obs["agent_pos"]).all()
        assert not np.allclose(pushed, positions[4])
        assert np.allclose(steps[4].obs["agent_pos"], positions[4])
        # other steps: next obs of one transition is the obs of the following one
        assert np.allclose(steps[1].next_obs["agent_pos"], steps[2].obs["agent_pos"])
    finally:
        rollout.close()


def test_steps_generator_acts_with_the_action_function():
    envs = make_vector_env("pointmass", num_envs=1, seed=3, asynchronous=False)
    rollout = VectorRollout(envs)
    seen = []

    def act(obs):
        seen.append(obs["agent_pos"].copy())
        return np.zeros((1, 2), np.float32)

    transitions = list(rollout.steps(act, 3))
    rollout.close()
    assert len(transitions) == 3 and len(seen) == 3
    assert np.allclose(transitions[2].obs["agent_pos"], seen[2])
    assert all(np.all(t.action == 0) for t in transitions)
