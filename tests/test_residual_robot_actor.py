"""``train residual --robot-actor``: the learner drains a robot actor (robofinetune.distributed.robot_actor) instead
of stepping envs, publishes weights to it, runs no evaluation episodes, and a resumed learner reattaches to the
actor that kept acting meanwhile. The actor drives a simulated pointmass paced at a high control rate (so a few
hundred steps take seconds). Uses the session's local Ray (tests/conftest.py)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the robot actor needs `pip install 'robofinetune[ray]'`")

# the cheap pointmass base (2 denoising steps) and the polling helper of the robot actor's own tests
from test_ray_robot_actor import pointmass_base, wait_for  # noqa: E402,F401 - pointmass_base is a fixture

from robofinetune.algos.residual import ResidualConfig, robot_actor_name, train  # noqa: E402
from robofinetune.config import config_from_dict  # noqa: E402
from robofinetune.distributed.robot_actor import DEFAULT_NAMESPACE, RobotActorLink, RobotActorSpec  # noqa: E402
from robofinetune.errors import ConfigError  # noqa: E402
from robofinetune.robot.transport import ros_available  # noqa: E402
from robofinetune.rl import RunLoop  # noqa: E402
from robofinetune.runs import Run  # noqa: E402

pytestmark = pytest.mark.usefixtures("local_ray")

RATE = 200.0   # Hz: pointmass's episodes (horizon 100) take half a second
# the methods a Spy wraps, as they are before any test patches them (a second Spy must not wrap the first)
DRAIN, SAVE_CHECKPOINT, STOP = RobotActorLink.drain, RunLoop.save_checkpoint, RobotActorLink.stop


def robot_config(base, dataset, **overrides):
    values = dict(task="pointmass", base=str(base), dataset=str(dataset), robot_actor=True, robot_control_rate=RATE,
                  num_envs=1, total_env_steps=300, warmup_steps=100, critic_hidden_dim=16, num_critics=2,
                  actor_hidden_dim=16, actor_depth=1, batch_size=16, updates_per_step=0.25, weights_every=2,
                  eval_every=150, eval_episodes=1, final_eval_episodes=1, checkpoint_every=150, log_every=100,
                  progress=False)
    values.update(overrides)
    return ResidualConfig(**values)


class Spy:
    """What the learner drained (every batch's row numbers and weights versions), the checkpoints it saved (env
    steps, online rows) and the actor's stats just before the learner stopped it."""

    def __init__(self, monkeypatch, crash_after_rows=None):
        self.batches, self.checkpoints, self.checkpoint_updates, self.final_stats = [], [], None, None
        self.crash_after_rows = crash_after_rows
        drain, save, stop = DRAIN, SAVE_CHECKPOINT, STOP
        spy = self

        def recording_drain(link, max_rows=1024):
            if spy.crash_after_rows is not None and spy.checkpoints and spy.rows >= spy.crash_after_rows:
                raise Crash("the learner dies (after its first checkpoint)")
            batch = drain(link, max_rows)
            if batch is not None:
                spy.batches.append(batch)
            return batch

        def recording_save(loop, state, buffers):
            spy.checkpoints.append((loop.env_steps, len(buffers["online"])))
            spy.checkpoint_updates = state["learner"]["critic_updates"]
            return save(loop, state, buffers)

        def recording_stop(link):
            spy.final_stats = link.stats()
            return stop(link)

        monkeypatch.setattr(RobotActorLink, "drain", recording_drain)
        monkeypatch.setattr(RunLoop, "save_checkpoint", recording_save)
        monkeypatch.setattr(RobotActorLink, "stop", recording_stop)

    @property
    def rows(self):
        return sum(len(batch.seq) for batch in self.batches)

    def seq(self):
        return np.concatenate([batch.seq for batch in self.batches])


class Crash(RuntimeError):
    pass


def actor_stats(name):
    """The running actor's stats, read without attaching a link (which would take its weights over)."""
    return ray.get(ray.get_actor(name, namespace=DEFAULT_NAMESPACE).stats.remote())


def kill_if_running(name):
    try:
        ray.kill(ray.get_actor(name, namespace=DEFAULT_NAMESPACE))
    except ValueError:
        pass


def train_beside_actor(config, name, root, monkeypatch):
    """A whole ``train`` with the robot actor ``name``, its drained batches spied on; the actor is gone after."""
    run = Run.create("residual", "pointmass", config, root=root)
    spy = Spy(monkeypatch)
    try:
        summary = train(config, run)
    finally:
        kill_if_running(name)
    return run, spy, summary


def test_train_with_the_robot_actor_learns_from_its_rows_without_evaluations(pointmass_base, tmp_path, monkeypatch):
    base, demos = pointmass_base
    name = "residual-test-train"
    config = robot_config(base, demos, robot_actor_name=name)
    run, spy, summary = train_beside_actor(config, name, tmp_path, monkeypatch)
    # every row counted as an env step went into replay once, in the actor's order, none twice
    assert summary["env_steps"] == spy.rows == 300 and spy.checkpoints[-1] == (300, 300)
    assert np.all(np.diff(spy.seq()) > 0) and spy.batches[0].dropped_envs == [0]
    # the learner's weights reached the actor: later rows acted with newer versions; stopped at the end
    versions = np.concatenate([batch.version for batch in spy.batches])
    assert versions[0] <= 0 and versions.max() > 0 and summary["weights_publications"] >= 2
    assert spy.final_stats.weights_version >= versions.max() > 0 and spy.final_stats.running
    with pytest.raises(ValueError):
        ray.get_actor(name, namespace=DEFAULT_NAMESPACE)
    # no evaluation episodes: nulls and the reason; the actor's training episodes instead
    assert summary["base_success"] is None and summary["final_success"] is None and summary["eval_episodes"] == 0
    assert "not run" in summary["evaluations"] and "robofinetune deploy" in summary["evaluations"]
    assert summary == json.loads((run.path / "summary.json").read_text())
    # a drain hands over every waiting row, so the window's end is the first count past 150 env steps
    success_steps = [row["step"] for row in Run.open(run.path).metrics() if "train/episode_success" in row]
    assert len(success_steps) == 2 and 150 <= success_steps[0] < 300 and success_steps[1] == 300
    assert summary["train_episode_success_episodes"] >= 1
    assert summary["train_episode_success_env_steps"] == success_steps
    metrics = Run.open(run.path).metrics()
    assert not any(key.startswith(("eval/", "final/", "base/")) for row in metrics for key in row)
    assert any("train/staleness_mean" in row and "robot/achieved_rate_hz" in row for row in metrics)
    assert not (run.path / "eval.json").exists() and (run.path / "success_curve.png").exists()


@pytest.mark.slow
def test_a_resumed_learner_reattaches_to_the_actor_that_kept_acting(pointmass_base, tmp_path, monkeypatch):
    base, demos = pointmass_base
    config = robot_config(base, demos)   # the default name, which the run keeps for --resume
    name = robot_actor_name(config)
    run = Run.create("residual", "pointmass", config, root=tmp_path)
    first = Spy(monkeypatch, crash_after_rows=200)
    try:
        with pytest.raises(Crash):
            train(config, run)
        (checkpoint_steps, checkpoint_rows), = first.checkpoints
        assert 150 <= checkpoint_steps == checkpoint_rows < 300
        assert Run.open(run.path).saved_config()["robot_actor_name"] == name == "residual-pointmass"
        # no learner: the actor keeps acting with the last weights it got
        before = actor_stats(name)
        time.sleep(1.0)
        after = actor_stats(name)
        assert after.running and after.steps - before.steps >= 0.1 * RATE and after.weights_version > 0
        saved = Run.open(run.path)
        resumed_config = config_from_dict(ResidualConfig, saved.saved_config(), "config.yaml")
        second = Spy(monkeypatch)
        summary = train(resumed_config, saved, resume=True)
    finally:
        kill_if_running(name)
    assert summary["env_steps"] == 300 and second.checkpoints[-1] == (300, 300)
    assert second.final_stats.incarnation == before.incarnation   # the same actor, not a new one
    # at most once, in order, across both learners; the rows acted while no learner was attached were kept for
    # the resumed one (which starts a new replay chain), none lost
    together = np.concatenate([first.seq(), second.seq()])
    assert np.all(np.diff(together) > 0) and second.seq()[0] == first.seq()[-1] + 1
    assert second.batches[0].dropped_envs == [0]
    # the resumed learner restarted from its checkpoint's update count, below the version of the weights the actor
    # acted with meanwhile (the dead learner's last): those rows were taken as 0 updates stale, not refused
    assert second.batches[0].version.max() == after.weights_version > first.checkpoint_updates
    assert summary["staleness_max"] >= summary["staleness_mean"] >= 0


@pytest.mark.parametrize("overrides, message", [
    (dict(rollout_in_workers=True, num_env_workers=1), "'robot_actor' cannot be combined with 'rollout_in_workers'"),
    (dict(num_env_workers=1), "'num_env_workers' > 0"),
    (dict(num_envs=2), "'robot_actor' drives one robot: set 'num_envs' to 1"),
])
def test_what_the_robot_actor_cannot_be_combined_with_is_refused(tmp_path, overrides, message):
    config = robot_config("unused", "unused", **overrides)
    with pytest.raises(ConfigError, match=message):
        train(config, Run.create("residual", "pointmass", config, root=tmp_path))


def test_a_running_actor_of_another_policy_is_named_not_attached():
    spec = RobotActorSpec(task="pointmass", base="policies/a", actor_kwargs={"obs_dim": 6, "hidden_dim": 16})
    assert spec.policy_differences(RobotActorSpec(**{**spec.__dict__, "seed": 3, "warmup_steps": 7})) == []
    other = RobotActorSpec(**{**spec.__dict__, "base": "policies/b", "actor_kwargs": {"obs_dim": 6, "hidden_dim": 32}})
    assert spec.policy_differences(other) == ["base", "actor_kwargs"]


def test_the_robot_actor_runs_the_scripted_intervener_and_the_learner_stores_its_takeovers(pointmass_base, tmp_path,
                                                                                          monkeypatch):
    """intervener='scripted' with robot_actor: the expert takes over in the actor's loop; the drained rows carry the
    flag and the expert's action as the executed one, and the learner stores and counts them as in process."""
    from robofinetune.envs.experts import PointMassExpert
    from robofinetune.rl import ReplayBuffer

    base, demos = pointmass_base
    name = "residual-test-intervener"
    # stall_distance 1 m: every 5 policy steps count as a stall, so the expert takes over at once and again
    config = robot_config(base, demos, robot_actor_name=name, intervener="scripted", stall_steps=5,
                          stall_distance=1.0, takeover_steps=10)
    run, spy, summary = train_beside_actor(config, name, tmp_path, monkeypatch)
    assert summary["env_steps"] == spy.rows == 300 and summary["intervener"] == "scripted"
    rows = [np.concatenate([batch.rows[part] for batch in spy.batches]) for part in range(7)]
    rl_obs, executed, done, flagged = rows[0], rows[1], rows[4] | rows[5], rows[6]
    assert flagged.dtype == bool and 0 < flagged.sum() < len(flagged)
    # on the flagged steps the expert drove: its PD law on the step's observation (the state features are the
    # task's obs keys agent_pos, agent_vel, goal_pos), not base + residual
    expert = PointMassExpert()
    expert_actions = np.array([expert.act({"agent_pos": x[0:2], "agent_vel": x[2:4], "goal_pos": x[4:6]})
                               for x in rl_obs.astype(np.float64)])
    np.testing.assert_allclose(executed[flagged], expert_actions[flagged], atol=1e-4)
    assert not np.allclose(executed[~flagged], expert_actions[~flagged], atol=1e-3)
    # the counters the in-process loop keeps: over the finished episodes, operator steps and takeovers (runs of
    # flagged steps within an episode)
    ended = int(np.flatnonzero(done).max()) + 1
    follows_takeover = np.concatenate([[False], flagged[:-1] & ~done[:-1]])
    assert summary["operator_steps"] == flagged[:ended].sum() > 0
    assert summary["takeovers"] == (flagged & ~follows_takeover)[:ended].sum() > 0
    assert summary["intervention_rate_last"] > 0
    logged = [row for row in Run.open(run.path).metrics() if "train/intervention_rate" in row]
    assert logged and logged[-1]["train/intervention_rate"] > 0 and logged[-1]["train/intervened_steps"] > 0
    assert (run.path / "intervention_curve.png").exists() and summary["episodes_dataset"] is None
    # the replay: every row in the online buffer with its flag and executed action, the intervened ones copied
    # into the demo buffer
    online, offline = ReplayBuffer(8, 2, 300), ReplayBuffer(8, 2, 10_000)
    online.load(run.checkpoints / "latest" / "online.npz")
    offline.load(run.checkpoints / "latest" / "offline.npz")
    assert len(online) == 300
    np.testing.assert_array_equal(online.is_intervention[:300], flagged)
    np.testing.assert_array_equal(online.action[:300], executed)
    copied = offline.is_intervention[: len(offline)]
    assert copied.sum() == flagged.sum()
    np.testing.assert_array_equal(offline.action[: len(offline)][copied], executed[flagged])


def test_the_robot_actor_spec_carries_and_checks_who_may_take_over():
    spec = RobotActorSpec(task="pointmass", base="policies/a", actor_kwargs={"obs_dim": 8, "hidden_dim": 16},
                          intervener="scripted", scripted={"stall_steps": 5, "stall_distance": 1.0})
    assert spec.check() is spec
    # a running actor with another intervener (or other stall settings) is not attached to
    assert spec.policy_differences(RobotActorSpec(**{**spec.__dict__, "intervener": "none", "scripted": {}})) == [
        "intervener", "scripted"]
    assert spec.policy_differences(RobotActorSpec(**{**spec.__dict__, "seed": 4})) == []
    with pytest.raises(ConfigError, match="intervener is 'human'"):
        RobotActorSpec(**{**spec.__dict__, "intervener": "human"}).check()
    with pytest.raises(ConfigError, match="teleop and intervener both set"):
        RobotActorSpec(**{**spec.__dict__, "teleop": "keyboard"}).check()
    with pytest.raises(ConfigError, match="stall_steps"):
        RobotActorSpec(**{**spec.__dict__, "scripted": {"stall_steps": 0}}).check()


def start_actors_beside_this_tests_roscore(monkeypatch) -> None:
    """Start the session's roscore and hand its address to every robot actor this test starts: the Ray workers
    started before the roscore, and a robot PC's Ray node would have it in its environment."""
    import dataclasses
    import os

    from robofinetune.robot.roscore import session_master

    session_master()
    ros_environment = {key: os.environ[key] for key in ("ROS_MASTER_URI", "ROS_IP", "ROS_HOME", "ROS_LOG_DIR")
                       if key in os.environ}
    start = RobotActorLink.start.__func__
    monkeypatch.setattr(RobotActorLink, "start", classmethod(
        lambda cls, spec, **kwargs: start(cls, dataclasses.replace(spec, environment=ros_environment), **kwargs)))


@pytest.mark.ros
@pytest.mark.skipif(not ros_available(), reason="ROS 1 is not installed (scripts/ci_ros.sh install)")
def test_the_robot_actor_takes_the_operators_teleop_over_ros_and_the_learner_stores_it(pointmass_base, tmp_path,
                                                                                      monkeypatch):
    """teleop='ros-topic' with robot_actor, on the lockstep MuJoCo twin over a real roscore: the twin's expert plays
    the operator on the ROS teleop topics (takeover at episode step 5, handback at 16); the robot actor's loop takes
    the operator's commands, and the learner stores its rows flagged with the command the safety layer sent."""
    from robofinetune.envs.experts import make_expert
    from robofinetune.rl import ReplayBuffer
    from test_interventions_ros import EVENT_LATENESS, HANDBACK, MAX_DELTA, TAKEOVER, robot_yaml
    from test_robot_ros import Twin

    start_actors_beside_this_tests_roscore(monkeypatch)
    base, demos = pointmass_base
    robot = robot_yaml(tmp_path)   # the lockstep twin at 100 Hz, a per-step delta limit of MAX_DELTA
    name = "residual-test-teleop"
    # robot_control_rate 0: the YAML's rate (an override would be refused with teleop)
    config = robot_config(base, demos, task=str(robot), robot_actor_name=name, teleop="ros-topic",
                          robot_control_rate=0.0, total_env_steps=120, warmup_steps=20, log_every=40)
    run = Run.create("residual", "pointmass", config, root=tmp_path / "runs")
    spy = Spy(monkeypatch)
    try:
        with Twin(robot, "--expert-teleop", "--takeover", f"{TAKEOVER}:{HANDBACK}"):
            summary = train(config, run)
    finally:
        kill_if_running(name)
    assert summary["env_steps"] == spy.rows == 120 and summary["intervener"] == "ros-topic"
    rows = [np.concatenate([batch.rows[part] for batch in spy.batches]) for part in range(7)]
    rl_obs, executed, done, flagged = rows[0], rows[1].astype(np.float64), rows[4] | rows[5], rows[6]
    assert spy.batches[0].seq[0] == 0   # the actor's first episode from its first step
    expert = make_expert("pointmass")   # noise-free, a function of the observation: what the twin published
    starts = np.concatenate([[0], np.flatnonzero(done) + 1])
    episodes = [(start, end) for start, end in zip(starts, np.append(starts[1:], len(flagged))) if end > start]
    for start, end in episodes:
        steps = np.flatnonzero(flagged[start:end])
        if end - start <= TAKEOVER + EVENT_LATENESS:
            continue   # the budget ended this (last, unfinished) episode before the takeover could land
        # one block: from the takeover's observation (or up to EVENT_LATENESS steps later) to the handback's
        assert len(steps) and np.all(np.diff(steps) == 1), steps
        assert TAKEOVER <= steps[0] <= TAKEOVER + EVENT_LATENESS, steps
        assert steps[-1] == end - start - 1 or HANDBACK - 1 <= steps[-1] <= HANDBACK - 1 + EVENT_LATENESS, steps
        previous = np.concatenate([[[0.0, 0.0]], executed[start:end - 1]])   # the safety layer starts from hold
        for t in steps:
            x = rl_obs[start + t].astype(np.float64)
            wanted = expert.act({"agent_pos": x[0:2], "agent_vel": x[2:4], "goal_pos": x[4:6]})
            wanted = np.clip(wanted, previous[t] - MAX_DELTA, previous[t] + MAX_DELTA)
            np.testing.assert_allclose(executed[start + t], wanted, atol=1e-4, err_msg=f"episode step {t}")
    ended = int(np.flatnonzero(done).max()) + 1
    assert summary["operator_steps"] == flagged[:ended].sum() >= HANDBACK - TAKEOVER - EVENT_LATENESS
    assert summary["takeovers"] >= 1
    online = ReplayBuffer(8, 2, 120)
    online.load(run.checkpoints / "latest" / "online.npz")
    np.testing.assert_array_equal(online.is_intervention[:120], flagged)
    np.testing.assert_array_equal(online.action[:120], rows[1])


@pytest.mark.ros
@pytest.mark.skipif(not ros_available(), reason="ROS 1 is not installed (scripts/ci_ros.sh install)")
@pytest.mark.parametrize("keep_running", [False, True], ids=["actor-stopped", "actor-kept"])
def test_the_operators_stop_at_the_robot_ends_the_run_as_in_process(pointmass_base, tmp_path, monkeypatch, capsys,
                                                                      keep_running):
    """teleop='ros-topic' with robot_actor, on the lockstep MuJoCo twin over a real roscore: the operator's stop (the
    twin plays the operator and sends `stop` on the ROS teleop event topic, the device boundary, with observation
    STOP_AT of the first episode) ends the actor's loop after that step; the learner stores every row acted before it,
    checkpoints, writes its summary and stops the actor, or with robot_actor_keep_running leaves it (its loop ended)
    for `robofinetune robot-actor stop`, and a new learner is not attached to it."""
    from robofinetune.cli import main
    from robofinetune.distributed.robot_actor import RobotActorError
    from test_interventions_ros import EVENT_LATENESS, robot_yaml
    from test_robot_ros import Twin

    stop_at = 30
    start_actors_beside_this_tests_roscore(monkeypatch)
    base, demos = pointmass_base
    robot = robot_yaml(tmp_path)   # the lockstep twin at 100 Hz
    name = "residual-test-operator-stop"
    config = robot_config(base, demos, task=str(robot), robot_actor_name=name, teleop="ros-topic",
                          robot_control_rate=0.0, total_env_steps=300, warmup_steps=20, log_every=40,
                          eval_every=10**6, checkpoint_every=10**6, robot_actor_keep_running=keep_running)
    run = Run.create("residual", "pointmass", config, root=tmp_path / "runs")
    spy = Spy(monkeypatch)
    try:
        with Twin(robot, "--expert-teleop", "--operator-stop", str(stop_at)):
            summary = train(config, run)
            if keep_running:
                left = actor_stats(name)
                # a new learner is refused: the loop the operator stopped does not restart
                again = Run.create("residual", "pointmass", config, root=tmp_path / "again")
                with pytest.raises(RobotActorError, match="stopped by its operator at the robot"):
                    train(config, again)
    finally:
        if not keep_running:
            kill_if_running(name)
    # every row the actor acted, from its first step to the one the stop came with (or up to EVENT_LATENESS later)
    steps = summary["env_steps"]
    assert summary["stopped_by_operator"] and stop_at + 1 <= steps <= stop_at + 1 + EVENT_LATENESS < 300
    np.testing.assert_array_equal(spy.seq(), np.arange(steps))
    # checkpointed at the stop (checkpoint_every is out of reach), summary and policy written as at the end
    assert spy.checkpoints[0] == (steps, steps)
    assert summary == json.loads((run.path / "summary.json").read_text()) and (run.path / "policy").is_dir()
    if not keep_running:
        assert spy.final_stats.stop_requested and not spy.final_stats.running and spy.final_stats.steps == steps
        with pytest.raises(ValueError):
            ray.get_actor(name, namespace=DEFAULT_NAMESPACE)
        return
    assert spy.final_stats is None and summary["robot_actor_left_running"]
    assert left.stop_requested and not left.running and left.error is None and left.learner is None
    capsys.readouterr()
    assert main(["robot-actor", "status", f"--name={name}"]) == 0
    assert "stopped by its operator at the robot" in capsys.readouterr().out
    assert main(["robot-actor", "stop", f"--name={name}"]) == 0
    with pytest.raises(ValueError):
        ray.get_actor(name, namespace=DEFAULT_NAMESPACE)
