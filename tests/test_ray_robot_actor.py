"""The robot actor (robofinetune.distributed.robot_actor): its loop keeps the control rate while the learner is slow,
published weights reach it and it acts with them, drained rows are never delivered twice and carry their version,
and a new learner attaches by name to the running actor, but not while another learner holds it (unless it takes it
over, or the holder died and its lease ran out); `robofinetune robot-actor status|stop` reach it without attaching.
On a simulated pointmass paced at 10 Hz, and over a real roscore with the realtime MuJoCo twin. Uses the session's
local Ray (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ray = pytest.importorskip("ray", reason="the robot actor needs `pip install 'robofinetune[ray]'`")

from bc_common import train_pointmass_base  # noqa: E402

from robofinetune.algos.residual import ResidualActor  # noqa: E402
from robofinetune.distributed.robot_actor import (RobotActorError, RobotActorLink, RobotActorSpec,  # noqa: E402
                                                  _control_rate)
from robofinetune.errors import ConfigError  # noqa: E402
from robofinetune.robot.transport import ros_available  # noqa: E402

pytestmark = pytest.mark.usefixtures("local_ray")

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "robofinetune-tests"
SIM_NAME = "sim-robot"
# Hz. Modest, so that the test measures the loop and not a loaded CI machine: a step here takes ~1 ms, a base
# sample ~5 ms, and the loop must absorb stalls of a starved process
RATE = 10.0
OUTBOX_ROWS = 10       # one second of rows: a learner that drains 5 rows once a second loses some
LEASE_S = 10.0         # an attached learner not heard from for this long counts as gone
ACTOR_KWARGS = {"obs_dim": 6, "action_dim": 2, "hidden_dim": 16, "depth": 1, "layer_norm": True, "action_scale": 0.1}


@pytest.fixture(scope="module")
def pointmass_base(tmp_path_factory):
    # 2 denoising steps: a cheap base, so the loop's timing is the loop's
    return train_pointmass_base(tmp_path_factory.mktemp("bc"), demos=6, max_steps=10, hidden_dim=16, depth=1,
                                batch_size=32, warmup_steps=2, inference_steps=2)


def random_actor(seed):
    """A residual actor whose corrections are not zero (the zero-initialised last layer replaced)."""
    torch.manual_seed(seed)
    actor = ResidualActor(**ACTOR_KWARGS)
    torch.nn.init.normal_(actor.net[-1].weight, std=1.0)
    return actor.requires_grad_(False)


def acted_by(actor, rl_obs):
    """The executed action of ``actor`` with no exploration noise: base action (the last 2 columns) + residual."""
    rl_obs = torch.as_tensor(rl_obs.copy())
    with torch.no_grad():
        return (rl_obs[:, -2:] + actor(rl_obs)).clamp(-1, 1).numpy()


def wait_for(condition, timeout_s=60.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def drain_for(link, seconds, max_rows=1024, pause_s=0.1):
    """Every batch the learner drains in ``seconds``."""
    batches, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        batch = link.drain(max_rows)
        if batch is not None:
            batches.append(batch)
        time.sleep(pause_s)
    return batches


def joined(batches, part):
    return np.concatenate([batch.rows[part] for batch in batches])


def publish_and_wait(link, version, actor):
    link.publish(version, actor, force=True)
    wait_for(lambda: link.stats().weights_version == version, 30, f"weights version {version} in use")
    link.drain(100_000)   # rows acted before it: not what the caller checks


class Learner:
    """The test's learner: its current link to the sim robot actor (test 4 replaces it) and every row seq it got."""

    def __init__(self, link):
        self.link = link
        self.seen: list[int] = []


@pytest.fixture(scope="module")
def sim_robot(pointmass_base):
    base, _ = pointmass_base
    spec = RobotActorSpec(task="pointmass", base=str(base), actor_kwargs=ACTOR_KWARGS, control_rate=RATE,
                          exploration_noise=0.0, outbox_rows=OUTBOX_ROWS, stats_window=40, learner_lease_s=LEASE_S,
                          overrides={"horizon": 20})   # short episodes: time-limit cuts and resets within the tests
    # a generous start timeout: a loaded test machine can take minutes to import torch in a new worker
    learner = Learner(RobotActorLink.start(spec, name=SIM_NAME, namespace=NAMESPACE, start_timeout_s=600))
    try:
        wait_for(lambda: learner.link.stats().steps >= 5, 120, "the loop's first steps")
        yield learner
    finally:
        learner.link.stop()
    with pytest.raises(RobotActorError, match="no robot actor named"):
        RobotActorLink.attach(SIM_NAME, NAMESPACE)


def test_the_loop_keeps_its_control_rate_while_the_learner_is_slow(sim_robot):
    link = sim_robot.link
    before, started = link.stats(), time.monotonic()
    for _ in range(3):   # a learner that drains a few rows once a second and never publishes weights
        time.sleep(1.0)
        batch = link.drain(max_rows=5)
        sim_robot.seen.extend(batch.seq.tolist())
    after, elapsed = link.stats(), time.monotonic() - started
    assert after.running and after.error is None
    assert (after.steps - before.steps) / elapsed >= 0.8 * RATE, (before, after, elapsed)
    assert after.achieved_rate_hz >= 0.8 * RATE and after.window == min(40, after.steps - 1)
    assert 0.8 / RATE * 1e3 <= after.period_ms_p50 <= 1.25 / RATE * 1e3, after
    # the outbox overflowed instead of holding the loop up, and says so
    assert after.rows_dropped > before.rows_dropped and after.rows_waiting <= OUTBOX_ROWS
    assert after.weights_version == -1 and after.seconds_since_weights is None   # still the base with warm-up noise


def test_published_weights_reach_the_actor_and_it_acts_with_them(sim_robot):
    link = sim_robot.link
    first, second = random_actor(1), random_actor(2)
    for version, actor, other in ((5, first, second), (12, second, first)):
        publish_and_wait(link, version, actor)
        batches = drain_for(link, 1.0)
        sim_robot.seen.extend(np.concatenate([batch.seq for batch in batches]).tolist())
        rl_obs, executed = joined(batches, 0), joined(batches, 1)
        assert len(executed) >= 5 and set(np.concatenate([b.version for b in batches]).tolist()) == {version}
        np.testing.assert_allclose(executed, acted_by(actor, rl_obs), atol=1e-6)
        assert not np.allclose(executed, acted_by(other, rl_obs), atol=1e-3)   # the weights made the difference
    stats = link.stats()
    assert stats.weights_version == 12 and stats.seconds_since_weights < 30 and stats.weights_error is None


def test_drained_rows_are_never_delivered_twice_and_carry_their_version(sim_robot):
    link = sim_robot.link
    publish_and_wait(link, 20, random_actor(3))
    before = link.stats()
    batches = drain_for(link, 2.5, max_rows=3, pause_s=0.02)   # many small drains racing the loop
    after = link.stats()
    seq = np.concatenate([batch.seq for batch in batches])
    assert len(seq) >= 15 and np.all(np.diff(seq) > 0) and seq[0] > max(sim_robot.seen, default=-1)
    assert after.rows_delivered - before.rows_delivered == len(seq)   # the actor's count: each row handed out once
    assert all(np.array_equal(batch.version, np.full(len(batch.seq), 20)) for batch in batches)
    rl_obs, next_rl_obs = joined(batches, 0), joined(batches, 3)
    done = joined(batches, 4) | joined(batches, 5)
    steps_compared = 0
    for t in range(len(seq) - 1):
        if seq[t + 1] == seq[t] + 1 and not done[t]:   # consecutive steps of one episode: nothing lost in between
            np.testing.assert_array_equal(rl_obs[t + 1], next_rl_obs[t], err_msg=f"row {seq[t + 1]}")
            steps_compared += 1
    assert steps_compared >= 10
    # a batch says when its first row does not follow the link's last one (a replay chain must end there)
    for previous, batch in zip(batches, batches[1:]):
        assert batch.dropped_envs == ([] if batch.seq[0] == previous.seq[-1] + 1 else [0])
    sim_robot.seen.extend(seq.tolist())


def test_a_new_learner_attaches_by_name_and_gets_only_new_rows(sim_robot):
    old = sim_robot.link
    weights = random_actor(4)
    publish_and_wait(old, 30, weights)
    sim_robot.seen.extend(np.concatenate([b.seq for b in drain_for(old, 0.3)]).tolist())
    before = old.stats()
    with pytest.raises(RobotActorError, match="already runs"):
        RobotActorLink.start(RobotActorSpec(task="pointmass", base="unused", actor_kwargs=ACTOR_KWARGS),
                             name=SIM_NAME, namespace=NAMESPACE)
    old.detach()   # the learner is gone: its weight store with it
    del old
    time.sleep(1.5)
    new = sim_robot.link = RobotActorLink.attach(SIM_NAME, NAMESPACE)
    stats = new.stats()
    assert stats.running and stats.incarnation == before.incarnation
    assert stats.steps - before.steps >= 0.8 * RATE * 1.5   # it kept going without a learner ...
    assert stats.weights_version == 30 and stats.weights_error is not None   # ... with the last weights it had
    batches = drain_for(new, 0.6)
    seq = np.concatenate([batch.seq for batch in batches])
    # nothing an earlier learner drained, nothing twice
    assert seq.min() > max(sim_robot.seen, default=-1) and np.all(np.diff(seq) > 0)
    assert batches[0].dropped_envs == [0]   # a new learner's replay has no chain to continue
    assert set(np.concatenate([b.version for b in batches]).tolist()) == {30}
    np.testing.assert_allclose(joined(batches, 1), acted_by(weights, joined(batches, 0)), atol=1e-6)
    publish_and_wait(new, 31, random_actor(5))   # the new learner's weights reach it too


def test_a_second_learner_is_refused_while_the_first_holds_the_actor_unless_it_takes_it_over(sim_robot):
    first = sim_robot.link
    assert first.stats().learner == first.learner_label
    with pytest.raises(RobotActorError, match=rf"robot actor '{SIM_NAME}' .* is in use by another learner "
                                              rf"\({re.escape(first.learner_label)}, heard from .* s ago\)") as refused:
        RobotActorLink.attach(SIM_NAME, NAMESPACE)
    assert f"{LEASE_S:g} s" in str(refused.value) and "--robot_actor_takeover" in str(refused.value)
    # the refused learner took nothing over: the first one's weights still reach the actor and it still drains
    publish_and_wait(first, 40, random_actor(7))
    assert first.stats().learner == first.learner_label
    # a takeover on purpose: the second learner gets the actor, the first is told so on its next drain
    second = RobotActorLink.attach(SIM_NAME, NAMESPACE, takeover=True)
    with pytest.raises(RobotActorError, match="was taken over by another learner"):
        first.drain()
    first.detach()   # lets go of nothing: the second learner holds the actor now
    sim_robot.link = second
    assert second.stats().learner == second.learner_label
    publish_and_wait(second, 41, random_actor(8))


LEARNER_THAT_DIES = """
import sys, time
import ray
from robofinetune.distributed.robot_actor import RobotActorLink
ray.init(address=sys.argv[1], log_to_driver=False)
link = RobotActorLink.attach(sys.argv[2], sys.argv[3])
print("attached", link.learner_label, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_learner_that_died_without_detaching_counts_as_gone_once_its_lease_runs_out(sim_robot):
    sim_robot.link.detach()
    # a learner in a process of its own, killed (SIGKILL): it never detaches, its heartbeats just stop
    learner = subprocess.Popen([sys.executable, "-c", LEARNER_THAT_DIES, ray.get_runtime_context().gcs_address,
                                SIM_NAME, NAMESPACE], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = learner.stdout.readline()
        assert line.startswith("attached "), line
        label = line.split(" ", 1)[1].strip()
    finally:
        learner.kill()
        learner.wait(30)
    assert sim_robot.link.stats().learner == label   # the dead learner still holds the actor ...
    with pytest.raises(RobotActorError, match="is in use by another learner"):
        RobotActorLink.attach(SIM_NAME, NAMESPACE)
    # ... until it has not been heard from for the lease
    wait_for(lambda: sim_robot.link.stats().learner_heard_s > LEASE_S, 2 * LEASE_S, "the dead learner's lease")
    new = sim_robot.link = RobotActorLink.attach(SIM_NAME, NAMESPACE)
    assert new.stats().learner == new.learner_label and new.stats().running
    publish_and_wait(new, 42, random_actor(9))


def test_the_robot_actor_command_shows_its_stats_and_stops_it(sim_robot, capsys):
    from robofinetune.cli import main

    where = [f"--name={SIM_NAME}", f"--namespace={NAMESPACE}"]
    assert main(["robot-actor", "status", *where, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["running"] and shown["steps"] > 0 and shown["target_rate_hz"] == RATE
    assert shown["learner"] == sim_robot.link.learner_label and not shown["stop_requested"]
    assert main(["robot-actor", "status", *where]) == 0
    text = capsys.readouterr().out
    assert f"robot actor '{SIM_NAME}': running" in text and sim_robot.link.learner_label in text
    # status attached nothing: the learner still holds the actor, its weights still reach it
    publish_and_wait(sim_robot.link, 50, random_actor(10))
    assert main(["robot-actor", "stop", *where]) == 0
    assert f"stopped the robot actor '{SIM_NAME}'" in capsys.readouterr().out
    with pytest.raises(RobotActorError, match="no robot actor named"):
        RobotActorLink.attach(SIM_NAME, NAMESPACE)
    with pytest.raises(RobotActorError, match="is gone"):
        sim_robot.link.drain()   # the learner that was attached is told, not left waiting
    assert main(["robot-actor", "status", *where]) == 2
    assert "no robot actor named" in capsys.readouterr().err


def test_a_robot_yaml_without_a_control_rate_is_refused(tmp_path):
    config = yaml.safe_load((REPO / "real_robot" / "pointmass_twin_realtime.yaml").read_text())
    del config["control_rate"]
    robot = tmp_path / "no_rate.yaml"
    robot.write_text(yaml.safe_dump(config))
    spec = RobotActorSpec(task=str(robot), base="unused", actor_kwargs=ACTOR_KWARGS)
    with pytest.raises(ConfigError, match="has no 'control_rate'"):
        _control_rate(spec)
    assert _control_rate(RobotActorSpec(task=str(robot), base="", actor_kwargs={}, control_rate=50.0))[1] == 50.0
    with pytest.raises(RobotActorError, match="no robot actor named 'nobody'"):
        RobotActorLink.attach("nobody", NAMESPACE)


@pytest.mark.ros
@pytest.mark.skipif(not ros_available(), reason="ROS 1 is not installed (scripts/ci_ros.sh install)")
def test_on_the_realtime_twin_over_ros(pointmass_base):
    """A RobotEnv on the realtime twin (stepping on its own clock, here at RATE) inside the robot actor: the rate
    holds while the learner is slow, then its weights take over."""
    from robofinetune.robot.roscore import session_master

    from test_robot_ros import REALTIME, Twin

    session_master()
    # the Ray workers started before this test's roscore: hand them its address
    ros_environment = {key: os.environ[key] for key in ("ROS_MASTER_URI", "ROS_IP", "ROS_HOME", "ROS_LOG_DIR")
                       if key in os.environ}
    base, _ = pointmass_base
    spec = RobotActorSpec(task=str(REALTIME), base=str(base), actor_kwargs=ACTOR_KWARGS, control_rate=RATE,
                          exploration_noise=0.0, environment=ros_environment)
    with Twin(REALTIME, "--set", f"control_rate={RATE:g}"):
        link = RobotActorLink.start(spec, name="twin-robot", namespace=NAMESPACE, start_timeout_s=600)
        try:
            wait_for(lambda: link.stats().steps >= 10, 120, "the loop's first steps on the twin")
            before, started = link.stats(), time.monotonic()
            time.sleep(3.0)   # the learner is busy elsewhere
            after, elapsed = link.stats(), time.monotonic() - started
            assert after.target_rate_hz == RATE and after.robot_error is None and after.running, after
            assert (after.steps - before.steps) / elapsed >= 0.8 * RATE, (before, after, elapsed)
            assert after.achieved_rate_hz >= 0.8 * RATE
            weights = random_actor(6)
            publish_and_wait(link, 7, weights)
            batches = drain_for(link, 0.6)
            assert set(np.concatenate([b.version for b in batches]).tolist()) == {7}
            # no exploration noise: the row's action is base + this residual (safety changes are in the env's log)
            np.testing.assert_allclose(joined(batches, 1), acted_by(weights, joined(batches, 0)), atol=1e-5)
        finally:
            link.stop()
