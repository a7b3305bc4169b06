"""Interventions during residual RL (HIL-SERL-style): the scripted intervener's takeover and handback, what is
executed and logged, the flags in both replay buffers, the metrics, the dataset round trip, the operator path on a
robot (safety, bad input, marks), and a short pointmass run."""

import json

import gymnasium
import numpy as np
import pytest
import torch

from bc_common import train_pointmass_base

from robofinetune.algos.residual import ResidualConfig, intervention_bc_loss, train
from robofinetune.data.io import load_dataset
from robofinetune.envs import load_task_spec, make_env
from robofinetune.envs.experts import PointMassExpert
from robofinetune.errors import CheckpointError, ConfigError
from robofinetune.rl import ReplayBuffer, RunLoop, VectorRollout
from robofinetune.rl.interventions import (InterventionWrapper, ScriptedIntervener, ScriptedIntervenerFactory,
                                           ScriptedInterventionConfig, TeleopIntervener, make_intervened_vector_env,
                                           make_training_envs)
from robofinetune.rl.rollout import EpisodeOutcome
from robofinetune.rl.setup import load_demo_episodes
from robofinetune.rl.training_episodes import TrainingEpisodes, open_training_episodes
from robofinetune.robot.safety import SafetyConfig, SafetyLayer
from robofinetune.runs import Run

OBS_KEYS = ["agent_pos", "agent_vel", "goal_pos"]


def stalling_intervener(**overrides):
    values = dict(stall_steps=5, stall_distance=0.01, takeover_steps=7, handback_on_subgoal=True)
    values.update(overrides)
    return ScriptedIntervener("pointmass", ScriptedInterventionConfig(**values), seed=0)


def test_scripted_intervener_takes_over_on_a_stall_and_hands_back():
    env = InterventionWrapper(make_env("pointmass", seed=3), stalling_intervener())
    obs, _ = env.reset(seed=3)
    reference = PointMassExpert()       # the clean expert is a PD law: its action follows from the state alone
    reference.reset(env)
    flags = []
    for _ in range(14):
        expected = reference.act(obs)
        obs, _, terminated, truncated, info = env.step(np.zeros(2, np.float32))   # a policy that never moves
        flags.append(info["is_intervention"])
        assert np.array_equal(info["policy_action"], np.zeros(2))                 # the proposal is logged
        if info["is_intervention"]:
            assert np.allclose(info["executed_action"], expected, atol=1e-6)      # ... the expert's action runs
        else:
            assert np.array_equal(info["executed_action"], np.zeros(2))
        assert not (terminated or truncated)
    # the mass starts at rest: after 5 policy steps without motion (6 positions) the expert drives 7 steps, then
    # hands back, and the policy gets 5 fresh steps before the next stall can be called
    assert flags == [False] * 5 + [True] * 7 + [False] * 2


def test_a_policy_that_moves_is_not_taken_over():
    env = InterventionWrapper(make_env("pointmass", seed=4), stalling_intervener())
    obs, _ = env.reset(seed=4)
    expert = PointMassExpert()
    expert.reset(env)
    for _ in range(8):   # the expert itself as the policy makes progress every step
        obs, _, terminated, _, info = env.step(expert.act(obs))
        assert not info["is_intervention"]
        if terminated:
            break


def test_vector_rollout_executes_the_takeover_and_counts_it_per_episode():
    factory = ScriptedIntervenerFactory("pointmass", ScriptedInterventionConfig(stall_steps=5, takeover_steps=7))
    envs = make_intervened_vector_env("pointmass", 2, seed=10, make_intervener=factory)   # two worker processes
    rollout = VectorRollout(envs)
    rollout.reset(seed=10)
    flags_per_env = [[], []]
    outcomes = []
    try:
        while len(outcomes) < 2:
            proposal = np.zeros((2, 2), np.float32)
            step = rollout.step(proposal)
            assert np.array_equal(step.proposed_action, proposal)
            # executed = proposal exactly where nobody intervened, the expert's (non-zero) action where it did
            assert np.array_equal(step.action[~step.is_intervention], proposal[~step.is_intervention])
            assert np.all(np.abs(step.action[step.is_intervention]).sum(axis=1) > 0)
            for index in range(2):
                flags_per_env[index].append(bool(step.is_intervention[index]))
            for outcome in step.finished:
                flags = flags_per_env[outcome.env_index]
                assert outcome.length == len(flags) and outcome.intervened_steps == sum(flags) > 0
                assert outcome.takeovers == sum(1 for t, f in enumerate(flags) if f and (t == 0 or not flags[t - 1]))
                flags_per_env[outcome.env_index] = []
                outcomes.append(outcome)
    finally:
        rollout.close()


def test_intervention_rate_and_takeovers_per_episode(tmp_path):
    run = Run.create("residual", "pointmass", ResidualConfig(task="pointmass"), root=tmp_path)
    loop = RunLoop(run, 1000, "pointmass", success_window=2, progress=False)
    loop.record(40, [EpisodeOutcome(0, True, 10, 1.0, intervened_steps=4, takeovers=2),
                     EpisodeOutcome(1, False, 30, 0.0)])
    assert loop.intervention_rate == pytest.approx(4 / 40) and loop.interventions_per_episode == 1.0
    loop.record(20, [EpisodeOutcome(0, False, 20, 0.0, intervened_steps=20, takeovers=1)])
    # the window keeps the last 2 episodes: (0 of 30) and (20 of 20)
    assert loop.intervention_rate == pytest.approx(20 / 50) and loop.interventions_per_episode == 0.5
    assert (loop.intervened_steps, loop.takeovers) == (24, 3)
    restored = RunLoop(run, 1000, "pointmass", success_window=2, progress=False)
    restored.load_state_dict(loop.state_dict())
    assert (restored.intervention_rate, restored.intervened_steps, restored.intervention_points) == \
        (loop.intervention_rate, 24, loop.intervention_points)
    added = {"recent_interventions", "intervened_steps", "takeovers", "intervention_points"}
    old = {key: value for key, value in loop.state_dict().items() if key not in added}
    restored.load_state_dict(old)   # a checkpoint from before interventions existed
    assert (restored.intervened_steps, restored.intervention_rate) == (0, 0.0)
    assert loop.write_intervention_curve().exists()


def test_replay_rows_carry_the_flag_and_old_buffers_load_without_it(tmp_path):
    buffer = ReplayBuffer(3, 2, capacity=10)
    buffer.add_transitions(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros(2), np.zeros((2, 3)), [False, False],
                           [False, False], [0, 1], is_intervention=[True, False])
    assert buffer.gather(np.array([0, 1])).is_intervention.tolist() == [True, False]
    path = buffer.save(tmp_path / "online.npz")
    with np.load(path) as data:   # what a checkpoint from before the field looks like
        np.savez(tmp_path / "old.npz", **{name: data[name] for name in data.files if name != "is_intervention"})
    old = ReplayBuffer(3, 2, capacity=10)
    old.load(tmp_path / "old.npz")
    assert len(old) == 2 and not old.is_intervention.any()
    with np.load(path) as data:   # a required array missing is still a clear error
        np.savez(tmp_path / "broken.npz", **{name: data[name] for name in data.files if name != "obs"})
    with pytest.raises(CheckpointError, match="broken.npz"):
        ReplayBuffer(3, 2, capacity=10).load(tmp_path / "broken.npz")


@pytest.mark.parametrize("fmt", ["robomimic", "lerobot"])
def test_training_episodes_round_trip_with_flags_and_both_actions(tmp_path, fmt):
    env_meta = {"env_name": "pointmass", "task": "pointmass", "env_kwargs": {}}
    log = open_training_episodes(tmp_path, fmt, 1, OBS_KEYS, env_meta, fps=20, resume=False)
    rng = np.random.default_rng(0)
    written = []
    for length, success in ((6, True), (4, False)):
        flags = np.arange(length) % 3 == 1
        for t in range(length):
            obs = {key: rng.uniform(-0.3, 0.3, (1, 2)).astype(np.float32) for key in OBS_KEYS}
            log.add(obs, rng.uniform(-1, 1, (1, 2)), rng.uniform(-1, 1, (1, 2)), flags[t:t + 1],
                    np.array([float(success and t == length - 1)]))
        final = {key: rng.uniform(-0.3, 0.3, (1, 2)).astype(np.float32) for key in OBS_KEYS}
        written.append(log.finish(0, final, success, terminated=success))
    episodes, _ = load_dataset(tmp_path / ("episodes.hdf5" if fmt == "robomimic" else "episodes_lerobot"))
    assert len(episodes) == 2
    for before, after in zip(written, episodes):
        assert after.step_data["is_intervention"].dtype == bool
        assert np.array_equal(after.step_data["is_intervention"], before.step_data["is_intervention"])
        assert np.allclose(after.step_data["policy_action"], before.step_data["policy_action"])
        assert np.allclose(after.actions, before.actions) and after.success == before.success
    # another residual run reads it as demos (only the successful one) and its rows keep the flags
    path, demos = load_demo_episodes("pointmass", str(tmp_path / ("episodes.hdf5" if fmt == "robomimic"
                                                                   else "episodes_lerobot")), OBS_KEYS)
    buffer = ReplayBuffer(6, 2, capacity=20)
    buffer.add_episode(demos[0], OBS_KEYS)
    assert buffer.is_intervention[:6].tolist() == written[0].step_data["is_intervention"].tolist()


def test_intervention_bc_loss_pulls_the_residual_toward_the_clipped_operator_action():
    base = torch.zeros(3, 2)
    executed = torch.tensor([[0.5, -0.05], [0.5, -0.05], [0.0, 0.0]])
    flags = torch.tensor([True, False, True])
    at_target = torch.tensor([[0.1, -0.05], [0.3, 0.3], [0.0, 0.0]])   # row 0 at clip(0.5) = 0.1; row 1 unflagged
    assert intervention_bc_loss(at_target, base, executed, flags, 0.1).item() == pytest.approx(0.0)
    residual = torch.zeros(3, 2, requires_grad=True)
    intervention_bc_loss(residual, base, executed, flags, 0.1).backward()
    assert residual.grad[0, 0] < 0 and residual.grad[0, 1] > 0 and torch.all(residual.grad[1:] == 0)


class FakeSource:
    """A teleop source whose command and events the test sets."""

    name = "fake"

    def __init__(self):
        self.command, self.queued = None, []

    def action(self, obs, since=None):
        return self.command

    def events(self):
        events, self.queued = self.queued, []
        return events

    def feed_keys(self, keys):
        pass

    def close(self):
        pass


class FakeRobot(gymnasium.Env):
    """Stands in for RobotEnv: the same SafetyLayer filters every command, ``action_sent`` says what went out."""

    observation_space = gymnasium.spaces.Dict({"agent_pos": gymnasium.spaces.Box(-1, 1, (2,))})
    action_space = gymnasium.spaces.Box(-1, 1, (2,))

    def __init__(self, max_delta):
        self.safety = SafetyLayer(SafetyConfig(max_delta=[max_delta, max_delta]), 2, 0.05)

    def reset(self, seed=None, options=None):
        self.safety.reset()
        return {"agent_pos": np.zeros(2, np.float32)}, {}

    def step(self, action):
        sent, _ = self.safety.filter(action, None)
        return {"agent_pos": np.zeros(2, np.float32)}, 0.0, False, False, {"action_sent": sent}


def robot_with_operator(max_delta=0.2):
    source, messages = FakeSource(), []
    operator = TeleopIntervener(source, 2, printer=messages.append)
    env = InterventionWrapper(FakeRobot(max_delta), operator)
    env.reset()
    return env, operator, source, messages


def test_operator_takeover_passes_the_safety_layer_and_bad_input_holds():
    env, operator, source, messages = robot_with_operator(max_delta=0.2)
    source.command = np.array([1.0, -1.0], np.float32)
    info = env.step(np.array([0.05, 0.05]))[4]
    assert not info["is_intervention"]                                   # no takeover yet: the policy drives
    source.queued = ["toggle_takeover"]
    info = env.step(np.array([0.05, 0.05]))[4]
    assert info["is_intervention"] and np.allclose(info["policy_action"], [0.05, 0.05])
    # the operator asked for (1, -1); the per-step delta limit lets (0.25, -0.15) through, like a policy's command
    assert np.allclose(info["executed_action"], [0.25, -0.15])
    # refused commands: the hold action (zero here) is sent instead, itself through the delta limit (0.2 a step)
    for bad, reason, sent in ((np.array([0.1, 0.2, 0.3]), "3 values", [0.05, 0.0]),
                              (np.array([np.nan, 0.0]), "NaN", [0.0, 0.0])):
        source.command = bad
        info = env.step(np.zeros(2))[4]
        assert info["is_intervention"] and np.allclose(info["executed_action"], sent)
        assert reason in messages[-1] and "refused" in messages[-1]
    assert operator.refusals == 2
    source.queued = ["handback", "success"]
    source.command = np.array([0.3, 0.3])
    assert not env.step(np.zeros(2))[4]["is_intervention"]
    assert operator.wait_for_mark() is True and operator.take_mark() is None


def test_a_mark_mid_episode_ends_it_only_on_a_robot_without_a_success_topic():
    env, operator, source, _ = robot_with_operator()
    source.queued = ["success"]
    _, reward, terminated, truncated, _ = env.step(np.zeros(2))
    assert (terminated, truncated, reward) == (False, False, 0.0)      # a success topic decides: the mark waits
    assert operator.take_mark() is True
    operator.mark_ends_episode = True                                  # no success topic: the mark is the outcome
    source.queued = ["failure"]
    _, reward, terminated, truncated, info = env.step(np.zeros(2))
    assert (terminated, truncated, reward, info["is_success"], info["ended_by_mark"]) == (False, True, 0.0, False, True)
    env.reset()                                                        # the vector env's autoreset ...
    assert operator.take_mark() is False                               # ... keeps the mark for the training loop
    source.queued = ["success"]
    _, reward, terminated, truncated, info = env.step(np.zeros(2))
    assert (terminated, truncated, reward, info["is_success"]) == (True, False, 1.0, True)


def test_teleop_and_scripted_settings_are_checked():
    with pytest.raises(ConfigError, match="teleop.*robot task"):
        make_training_envs("pointmass", 1, 0, teleop="keyboard")
    with pytest.raises(ConfigError, match="intervener"):
        make_training_envs("pointmass", 1, 0, intervener="human")
    with pytest.raises(ConfigError, match="stall_steps"):
        ScriptedInterventionConfig(stall_steps=0).check()


@pytest.fixture(scope="module")
def pointmass_base(tmp_path_factory):
    return train_pointmass_base(tmp_path_factory.mktemp("hil_base"), demos=8, max_steps=40, hidden_dim=32, depth=1,
                                batch_size=64, warmup_steps=10)


def test_short_residual_run_with_the_scripted_intervener(pointmass_base, tmp_path):
    base, dataset = pointmass_base
    # stall_distance 1 m: every 5 policy steps count as a stall, so takeovers are certain in a short run
    config = ResidualConfig(task="pointmass", base=str(base), dataset=str(dataset), total_env_steps=240, num_envs=2,
                            critic_hidden_dim=32, num_critics=3, actor_hidden_dim=32, batch_size=32,
                            updates_per_step=0.25, warmup_steps=40, eval_every=0, eval_episodes=2,
                            final_eval_episodes=2, eval_envs=1, checkpoint_every=10**9, log_every=40,
                            progress=False, intervener="scripted", stall_steps=5, stall_distance=1.0,
                            takeover_steps=10, intervention_bc_weight=0.5)
    run = Run.create("residual", "pointmass", config, root=tmp_path)
    summary = train(config, run)
    assert summary["env_steps"] == 240 and summary["operator_steps"] > 0 and summary["takeovers"] > 0
    logged = [m for m in run.metrics() if "train/intervention_rate" in m]
    # over finished episodes: 0 until the first one ends (100 steps x 2 envs), then the takeovers show
    assert logged and all(0 <= m["train/intervention_rate"] <= 1 for m in logged)
    assert logged[-1]["train/intervention_rate"] > 0 and logged[-1]["train/interventions_per_episode"] >= 1
    assert any("train/intervention_bc_loss" in m for m in run.metrics())
    assert (run.path / "intervention_curve.png").exists()
    # flags in both buffers: every intervened online row was copied into the demo buffer
    online, offline = ReplayBuffer(8, 2, 240), ReplayBuffer(8, 2, 10_000)
    online.load(run.checkpoints / "latest" / "online.npz")
    offline.load(run.checkpoints / "latest" / "offline.npz")
    intervened = online.is_intervention[: len(online)]
    assert intervened.any() and not intervened.all()
    copied = offline.is_intervention[: len(offline)]
    assert copied.sum() == intervened.sum()
    assert np.allclose(np.sort(offline.action[: len(offline)][copied], axis=0),
                       np.sort(online.action[: len(online)][intervened], axis=0))
    # the run's episodes: flags and both actions, readable as a dataset
    episodes, _ = load_dataset(run.path / "episodes.hdf5")
    assert len(episodes) == summary["episodes"]
    flagged = np.concatenate([e.step_data["is_intervention"] for e in episodes])
    assert flagged.sum() == summary["operator_steps"]
    executed = np.concatenate([e.actions for e in episodes])[flagged]
    proposed = np.concatenate([e.step_data["policy_action"] for e in episodes])[flagged]
    assert not np.allclose(executed, proposed)
    # evaluation never intervenes: the base's evaluation equals the same evaluation without any intervener
    from robofinetune.algos.residual import ResidualPolicy, ResidualPolicyConfig
    from robofinetune.eval import evaluate_policy
    from robofinetune.policies import load_policy

    spec = load_task_spec("pointmass")
    plain = ResidualPolicy(ResidualPolicyConfig(task="pointmass", obs_keys=spec.obs_keys,
                                                obs_shapes={k: list(v) for k, v in spec.obs_shapes.items()},
                                                action_dim=2, hidden_dim=32), base=load_policy(base, device="cpu"))
    result = evaluate_policy(plain.eval(), "pointmass", episodes=2, num_envs=1, seed=config.eval_seed, progress=False)
    point = json.loads((run.path / "eval.json").read_text())["base"]
    assert (point["success"], point["mean_length"]) == (result.success_rate, result.mean_length)
    # --resume (here: longer) keeps the buffers' flags and the intervention counters, and appends to the dataset
    longer = ResidualConfig(**{**config.__dict__, "total_env_steps": 440})
    resumed = train(longer, Run.open(run.path), resume=True)
    assert resumed["env_steps"] == 440 and resumed["operator_steps"] > summary["operator_steps"]
    assert resumed["takeovers"] > summary["takeovers"]
    assert len(load_dataset(run.path / "episodes.hdf5")[0]) == resumed["episodes"]
