"""Interventions during `train residual` on a robot, end to end over a real roscore and the MuJoCo twin (lockstep):
the operator's takeover toggled over ROS (the twin's scripted expert plays the operator and follows a script of
takeover, handback, an over-limit command and bad commands), and success marked by key on a robot without a
success topic (the keyboard read from a pseudo-terminal, the device boundary)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from robofinetune.robot.transport import ros_available

from test_robot_ros import Twin

pytestmark = [pytest.mark.ros,
              pytest.mark.skipif(not ros_available(), reason="ROS 1 is not installed (scripts/ci_ros.sh install)")]

REPO = Path(__file__).resolve().parents[1]
MAX_DELTA = 0.5   # per-step delta limit of the test robot: an operator jump of 1 or more is clipped


@pytest.fixture(scope="module")
def ros_master():
    from robofinetune.robot.roscore import session_master

    return session_master()


def robot_yaml(folder: Path, success_topic: bool = True) -> Path:
    """The pointmass twin (lockstep) at 100 Hz (fast), with a per-step delta limit an operator can exceed and no
    workspace rule (so the delta limit is the only thing that changes a command here)."""
    config = yaml.safe_load((REPO / "real_robot" / "pointmass_twin.yaml").read_text())
    config["control_rate"] = 100
    config["safety"]["max_delta"] = MAX_DELTA
    del config["safety"]["workspace"]
    if not success_topic:
        del config["success"]
    path = folder / ("pointmass_twin_test.yaml" if success_topic else "pointmass_twin_nosuccess.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def pointmass_base(tmp_path_factory):
    """A small BC base and its demos (a few seconds)."""
    from bc_common import train_pointmass_base

    return train_pointmass_base(tmp_path_factory.mktemp("hil_ros_base"), demos=8, max_steps=40, hidden_dim=32,
                                depth=1, batch_size=64, warmup_steps=10)


def residual_config(robot: Path, base, teleop: str, total_env_steps: int):
    from robofinetune.algos.residual import ResidualConfig

    policy, dataset = base
    return ResidualConfig(task=str(robot), base=str(policy), dataset=str(dataset), total_env_steps=total_env_steps,
                          num_envs=1, critic_hidden_dim=32, num_critics=2, actor_hidden_dim=32, batch_size=32,
                          updates_per_step=0.25, warmup_steps=20, eval_every=0, eval_episodes=1,
                          final_eval_episodes=1, eval_envs=1, checkpoint_every=10**9, log_every=20, progress=False,
                          teleop=teleop)


TAKEOVER, HANDBACK, JOLT, NAN, WRONG_SIZE = 5, 16, 8, 10, 12
# ROS orders messages within a topic, not across topics: the event published just before observation 5 can reach
# the learner after observation 5's teleop command on a loaded machine (it did on a CI machine). An operator's
# takeover is not step-synchronous on a real robot either, so the takeover and the handback may land up to
# EVENT_LATENESS steps late; the scripted jolt and bad commands sit inside the window either way.
EVENT_LATENESS = 2
assert TAKEOVER + EVENT_LATENESS < JOLT < NAN < WRONG_SIZE < HANDBACK - 1


def test_takeover_toggled_over_ros_through_the_twin(ros_master, pointmass_base, tmp_path, capsys):
    """The twin's expert plays the operator on the ROS teleop topics: takeover with observation 5, handback with
    observation 16, a full-scale jump against the last command at 8 (over the delta limit), a NaN command at 10 and
    a 3-value one at 12. The run's episodes show one contiguous block of operator steps from 5..7 to 15..17 (the
    event topic is not ordered with the command topic); there the executed command is the expert's for that
    observation after the delta limit (the jump cut to MAX_DELTA, the bad ones refused: hold), and the policy's
    proposal is logged beside it; elsewhere the policy's action ran."""
    from robofinetune.algos.residual import train
    from robofinetune.data.io import load_dataset
    from robofinetune.envs.experts import make_expert
    from robofinetune.runs import Run

    robot = robot_yaml(tmp_path)
    config = residual_config(robot, pointmass_base, "ros-topic", total_env_steps=120)
    run = Run.create("residual", "pointmass", config, root=tmp_path / "runs")
    with Twin(robot, "--expert-teleop", "--takeover", f"{TAKEOVER}:{HANDBACK}", "--teleop-jolt", str(JOLT),
              "--teleop-bad", f"{NAN}:nan", "--teleop-bad", f"{WRONG_SIZE}:size"):
        summary = train(config, run)
    err = capsys.readouterr().err
    assert summary["env_steps"] == 120
    episodes, env_meta = load_dataset(run.path / "episodes.hdf5")
    assert episodes and env_meta["robot"] == "pointmass_twin"
    expert = make_expert("pointmass")   # noise-free, a function of the observation: what the twin published
    for episode in episodes:
        flags = episode.step_data["is_intervention"]
        # the takeover in the right steps (an episode that ended before the handback keeps it to its end): one
        # block, from the takeover's observation or up to EVENT_LATENESS steps later, to the handback's likewise
        steps = np.flatnonzero(flags)
        assert len(steps) and np.all(np.diff(steps) == 1), steps
        assert TAKEOVER <= steps[0] <= TAKEOVER + EVENT_LATENESS, steps
        assert steps[-1] == len(episode) - 1 or HANDBACK - 1 <= steps[-1] <= HANDBACK - 1 + EVENT_LATENESS, steps
        sent = episode.actions.astype(np.float64)
        proposed = episode.step_data["policy_action"].astype(np.float64)
        previous = np.concatenate([[[0.0, 0.0]], sent[:-1]])     # the safety layer starts from the hold action
        for t in range(len(episode)):
            obs = {key: value[t] for key, value in episode.observations.items()}
            if not flags[t]:
                # the policy's own action, through the same delta limit
                wanted = np.clip(proposed[t], previous[t] - MAX_DELTA, previous[t] + MAX_DELTA)
            elif t == JOLT:
                wanted = np.where(previous[t] >= 0, -1.0, 1.0)    # the operator's jump ...
                assert np.all(np.abs(wanted - previous[t]) > MAX_DELTA)
                wanted = previous[t] + np.sign(wanted - previous[t]) * MAX_DELTA   # ... cut to the delta limit
            elif t in (NAN, WRONG_SIZE):
                wanted = np.clip([0.0, 0.0], previous[t] - MAX_DELTA, previous[t] + MAX_DELTA)  # refused: hold
            else:
                wanted = np.clip(expert.act(obs), previous[t] - MAX_DELTA, previous[t] + MAX_DELTA)
            assert np.allclose(sent[t], wanted, atol=1e-5), (t, sent[t], wanted, proposed[t])
        # the jolt really was clipped (sent is not what the operator asked), and the proposal differs from it
        assert not np.allclose(sent[JOLT], np.where(previous[JOLT] >= 0, -1.0, 1.0))
        assert not np.allclose(proposed[flags], sent[flags])
    # both bad commands were refused with a reason that names what was wrong (and the topic, for the dropped one)
    assert "refused: contains NaN" in err and "holding" in err
    assert "refused: a message on /pointmass/teleop/action has 3 values, the robot takes 2" in err
    assert any(len(episode) > HANDBACK for episode in episodes)   # the handback itself was exercised
    assert summary["takeovers"] >= 1 and summary["operator_steps"] >= HANDBACK - TAKEOVER - EVENT_LATENESS


class OperatorAtTerminal:
    """Stands in for sys.stdout / sys.stderr and plays the operator at a keyboard: presses ``y`` shortly after the
    run shows its key help (mid-episode), and ``n`` at the first prompt to mark a finished episode, noting how many
    episodes were stored at that moment. Keys go into a pseudo-terminal, the device the keyboard is read from."""

    def __init__(self, stream, terminal: int, dataset: Path) -> None:
        self.stream, self.terminal, self.dataset = stream, terminal, dataset
        self.stored_at_prompt: list[int] = []

    def write(self, text: str) -> int:
        import threading

        from robofinetune.data.io import load_dataset

        if "t take over / hand back" in text:
            threading.Timer(0.3, os.write, (self.terminal, b"y")).start()
        if "episode over: mark it" in text:
            # the training thread prints this and then waits: the dataset is closed between appends
            self.stored_at_prompt.append(len(load_dataset(self.dataset)[0]) if self.dataset.exists() else 0)
            os.write(self.terminal, b"n")
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def test_success_marked_by_key_on_a_robot_without_a_success_topic(ros_master, pointmass_base, tmp_path,
                                                                  monkeypatch):
    """No success topic: ``y`` pressed mid-episode ends the episode there as a success (reward 1, terminal);
    the next episode runs to the horizon, the run asks for a mark and stores it only once ``n`` is pressed (a
    failure: reward 0, not terminal, so the critic still bootstraps from its last state)."""
    import robofinetune.robot.teleop as teleop
    from robofinetune.algos.residual import train
    from robofinetune.data.io import load_dataset
    from robofinetune.runs import Run

    robot = robot_yaml(tmp_path, success_topic=False)
    config = residual_config(robot, pointmass_base, "keyboard", total_env_steps=200)
    run = Run.create("residual", "pointmass", config, root=tmp_path / "runs")
    master, follower = os.openpty()
    terminal_keys = teleop.TerminalKeys
    monkeypatch.setattr(teleop, "TerminalKeys", lambda: terminal_keys(os.fdopen(follower, "rb", buffering=0)))
    operator = OperatorAtTerminal(sys.stderr, master, run.path / "episodes.hdf5")
    monkeypatch.setattr(sys, "stderr", operator)
    monkeypatch.setattr(sys, "stdout", OperatorAtTerminal(sys.stdout, master, run.path / "episodes.hdf5"))
    try:
        with Twin(robot, "--expert-teleop"):
            train(config, run)
    finally:
        os.close(master)
    episodes, _ = load_dataset(run.path / "episodes.hdf5")
    horizon = 100
    assert [episode.success for episode in episodes] == [True, False]
    early, marked = episodes
    assert 1 <= len(early) < horizon                                  # ended by the y, not by the horizon
    assert early.rewards[-1] == 1.0 and early.terminals[-1] and not early.rewards[:-1].any()
    assert len(marked) == horizon and not marked.rewards.any() and not marked.terminals.any()
    assert not np.concatenate([e.step_data["is_intervention"] for e in episodes]).any()   # t never pressed
    # the second episode was not stored while the run waited for its mark
    assert operator.stored_at_prompt == [1]
