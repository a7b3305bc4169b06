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


def test_train_with_the_robot_actor_learns_from_its_rows_without_evaluations(pointmass_base, tmp_path, monkeypatch):
    base, demos = pointmass_base
    name = "residual-test-train"
    config = robot_config(base, demos, robot_actor_name=name)
    run = Run.create("residual", "pointmass", config, root=tmp_path)
    spy = Spy(monkeypatch)
    try:
        summary = train(config, run)
    finally:
        kill_if_running(name)
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
    (dict(intervener="scripted"), "'robot_actor' cannot be combined with 'intervener' or 'teleop'"),
    (dict(teleop="keyboard"), "'robot_actor' cannot be combined with 'intervener' or 'teleop'"),
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
