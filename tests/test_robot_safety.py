"""The safety layer (each limit, NaN/inf, hold action), the watchdog, the rate loop, and robot YAML checking."""

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from robofinetune.robot.config import load_robot_config
from robofinetune.robot.errors import RobotConfigError
from robofinetune.robot.safety import (ACTION_BOX, JOINT_LIMIT, MAX_DELTA, NONFINITE_ACTION, NONFINITE_OBSERVATION,
                                       WORKSPACE, BoxLimitConfig, InterventionLog, RateLoop, SafetyConfig, SafetyLayer,
                                       Watchdog)

REPO = Path(__file__).resolve().parents[1]


def obs(pos=(0.0, 0.0), vel=(0.0, 0.0)):
    return {"agent_pos": np.asarray(pos, np.float32), "agent_vel": np.asarray(vel, np.float32)}


def kinds(events):
    return [event.kind for event in events]


def test_nan_and_inf_actions_are_replaced_by_the_hold_action():
    layer = SafetyLayer(SafetyConfig(hold_action=[0.0, 0.0]), 2, 0.05)
    for bad in ([np.nan, 0.1], [0.2, np.inf], [-np.inf, np.nan]):
        sent, events = layer.filter(bad, obs())
        assert np.array_equal(sent, [0.0, 0.0])
        assert kinds(events) == [NONFINITE_ACTION]
    # even with every limit switched off, non-finite numbers never reach the robot
    off = SafetyLayer(SafetyConfig(enabled=False), 2, 0.05)
    sent, events = off.filter([np.nan, 1.0], obs())
    assert np.all(np.isfinite(sent)) and kinds(events) == [NONFINITE_ACTION]


def test_nonfinite_observation_holds():
    layer = SafetyLayer(SafetyConfig(), 2, 0.05)
    sent, events = layer.filter([0.5, 0.5], obs(pos=(np.nan, 0.0)))
    assert np.array_equal(sent, [0.0, 0.0])
    assert kinds(events) == [NONFINITE_OBSERVATION] and events[0].detail["key"] == "agent_pos"


def test_action_box_clips_to_unit_range_and_to_configured_bounds():
    layer = SafetyLayer(SafetyConfig(action_low=[-0.5, -1.0], action_high=[0.5, 0.2]), 2, 0.05)
    sent, events = layer.filter([0.9, 3.0], obs())
    assert np.allclose(sent, [0.5, 0.2])
    assert kinds(events) == [ACTION_BOX]
    sent, events = layer.filter([0.1, -0.3], obs())
    assert np.allclose(sent, [0.1, -0.3]) and events == []


def test_max_delta_caps_the_change_per_step_per_dim():
    layer = SafetyLayer(SafetyConfig(max_delta=[0.25, 1.0]), 2, 0.05)
    sent, events = layer.filter([1.0, 1.0], obs())  # from the hold action (0, 0)
    assert np.allclose(sent, [0.25, 1.0]) and kinds(events) == [MAX_DELTA]
    sent, _ = layer.filter([1.0, 1.0], obs())
    assert np.allclose(sent, [0.5, 1.0])
    sent, _ = layer.filter([-1.0, -1.0], obs())
    assert np.allclose(sent, [0.25, 0.0])
    layer.reset()  # a new episode starts from the hold action again
    sent, _ = layer.filter([1.0, 0.0], obs())
    assert np.allclose(sent, [0.25, 0.0])


def test_workspace_with_gain_shrinks_the_step_to_stay_inside():
    # position-like action: x_next = x + 0.05 * a; box [-0.3, 0.3]
    box = BoxLimitConfig(key="agent_pos", low=[-0.3, -0.3], high=[0.3, 0.3], action_dims=[0, 1], gain=0.05)
    layer = SafetyLayer(SafetyConfig(workspace=box), 2, 0.05)
    sent, events = layer.filter([1.0, -1.0], obs(pos=(0.28, -0.29)))
    assert np.allclose(sent, [0.4, -0.2], atol=1e-6)  # lands exactly on the boundary
    assert kinds(events) == [WORKSPACE] and events[0].detail["dims"] == [0, 1]
    # moving back inside is never limited, even from outside the box
    sent, events = layer.filter([-1.0, 1.0], obs(pos=(0.35, -0.35)))
    assert np.allclose(sent, [-1.0, 1.0]) and events == []
    # outside and pushing further out: no outward motion at all
    sent, events = layer.filter([0.7, 0.0], obs(pos=(0.35, 0.0)))
    assert np.allclose(sent, [0.0, 0.0]) and kinds(events) == [WORKSPACE]


def test_workspace_for_force_actions_blocks_outward_push_using_velocity_lookahead():
    box = BoxLimitConfig(key="agent_pos", low=[-0.45, -0.45], high=[0.45, 0.45], action_dims=[0, 1],
                         velocity_key="agent_vel", lookahead=0.1)
    layer = SafetyLayer(SafetyConfig(workspace=box), 2, 0.05)
    # 0.40 + 0.1 * 0.6 = 0.46 beyond 0.45: pushing +x is cut, pushing -x and the y axis are free
    sent, events = layer.filter([0.8, 0.8], obs(pos=(0.40, 0.0), vel=(0.6, 0.0)))
    assert np.allclose(sent, [0.0, 0.8]) and kinds(events) == [WORKSPACE]
    sent, events = layer.filter([-0.8, 0.8], obs(pos=(0.40, 0.0), vel=(0.6, 0.0)))
    assert np.allclose(sent, [-0.8, 0.8]) and events == []
    # well inside: untouched
    sent, events = layer.filter([0.8, 0.8], obs(pos=(0.0, 0.0), vel=(0.6, 0.0)))
    assert np.allclose(sent, [0.8, 0.8]) and events == []


def test_joint_limits_clamp_driven_joints_and_watched_joints_hold():
    driven = BoxLimitConfig(key="q", low=[-1.0, -2.0], high=[1.0, 2.0], action_dims=[1, 0], gain=0.5, index=[2, 0])
    watched = BoxLimitConfig(key="fingers", low=[0.0, 0.0], high=[0.04, 0.04])
    layer = SafetyLayer(SafetyConfig(joint_limits=[driven, watched], hold_action=[0.0, 0.0, None]), 3, 0.05)
    state = {"q": np.array([1.9, 0.0, 0.9]), "fingers": np.array([0.02, 0.02])}
    # element 0 of the limit is q[2] = 0.9 driven by action dim 1: 0.9 + 0.5 a <= 1 -> a <= 0.2
    # element 1 is q[0] = 1.9 driven by dim 0: 1.9 + 0.5 a <= 2 -> a <= 0.2
    sent, events = layer.filter([1.0, 1.0, 0.7], state)
    assert np.allclose(sent, [0.2, 0.2, 0.7], atol=1e-6) and kinds(events) == [JOINT_LIMIT]
    # a finger reading outside its travel: hold (motion dims 0, the None dim keeps the last command 0.7)
    state["fingers"] = np.array([0.02, 0.09])
    sent, events = layer.filter([0.1, 0.1, -1.0], state)
    assert np.allclose(sent, [0.0, 0.0, 0.7]) and kinds(events) == [JOINT_LIMIT]
    assert events[0].detail["hold"] is True


def test_disabled_layer_only_clips_to_the_unit_range():
    box = BoxLimitConfig(key="agent_pos", low=[-0.1, -0.1], high=[0.1, 0.1], action_dims=[0, 1], gain=0.05)
    layer = SafetyLayer(SafetyConfig(enabled=False, workspace=box, max_delta=[0.1, 0.1]), 2, 0.05)
    sent, events = layer.filter([1.0, 2.0], obs(pos=(0.5, 0.5)))
    assert np.allclose(sent, [1.0, 1.0]) and kinds(events) == [ACTION_BOX]


def test_intervention_log_counts_everything_and_keeps_the_first_events():
    log = InterventionLog(max_events=3)
    layer = SafetyLayer(SafetyConfig(max_delta=[0.1, 0.1]), 2, 0.05)
    for step in range(5):
        _, events = layer.filter([1.0, -1.0] if step % 2 == 0 else [-1.0, 1.0], obs(), step)
        log.extend(events)
    summary = log.summary()
    assert summary["total"] == 5 and summary["counts"] == {MAX_DELTA: 5}
    assert [event["step"] for event in summary["events"]] == [0, 1, 2]


def test_watchdog_holds_when_observations_stop_and_releases_when_they_return():
    last = {"t": time.monotonic()}
    holds, spells = [], []
    sent = threading.Event()

    def send_hold():
        holds.append(time.monotonic())
        sent.set()
        return holds[-1]

    dog = Watchdog(max_age=0.05, period=0.02, last_observation_time=lambda: last["t"], send_hold=send_hold,
                   on_event=lambda t_obs, t_hold: spells.append((t_obs, t_hold)))
    try:
        assert not sent.wait(0.2)  # disarmed: never holds
        dog.arm()
        assert sent.wait(5.0)
        assert dog.holding
        deadline = time.monotonic() + 5.0
        while len(holds) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(holds) >= 3, "the hold command is repeated while observations stay stale"
        assert len(spells) == 1 and spells[0][1] - spells[0][0] >= 0.05
        last["t"] = time.monotonic() + 10.0  # observations flow again
        dog.poke()
        deadline = time.monotonic() + 5.0
        while dog.holding and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not dog.holding
        dog.disarm()
    finally:
        dog.stop()


class FakeClock:
    """``time.monotonic`` / ``time.sleep`` as the rate loop sees them: time moves only when someone sleeps or works,
    so the schedule is checked exactly (the clock is the loop's hardware boundary)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def work(self, seconds: float) -> None:
        self.now += seconds


def test_rate_loop_counts_overruns_and_does_not_burst(monkeypatch):
    import robofinetune.robot.safety as safety

    clock = FakeClock()
    monkeypatch.setattr(safety, "time", clock)
    loop = RateLoop(100.0)   # a 10 ms period
    for _ in range(3):
        clock.work(0.004)    # work shorter than a period: each tick waits for the rest of it
        assert loop.sleep() == 0.0
    assert clock.sleeps == pytest.approx([0.006] * 3) and loop.overruns == 0
    clock.work(0.05)         # work that took five periods: 40 ms past the tick due at 40 ms
    assert loop.sleep() == pytest.approx(0.04) and loop.overruns == 1
    assert len(clock.sleeps) == 3   # a late tick does not wait
    # the schedule restarts from now: the next tick waits a full period instead of firing at once to catch up
    assert loop.sleep() == 0.0
    assert clock.sleeps[3:] == [pytest.approx(0.01)]
    clock.work(0.0105)       # 0.5 ms late, within a tenth of a period: late, but not an overrun
    assert loop.sleep() == pytest.approx(0.0005) and loop.overruns == 1
    assert loop.ticks == 6 and loop.intervals == pytest.approx([0.01, 0.01, 0.01, 0.05, 0.01, 0.0105])


# --- robot YAML checking -------------------------------------------------------------------------------------------


def write_robot(tmp_path, **changes):
    raw = yaml.safe_load((REPO / "real_robot" / "pointmass_twin.yaml").read_text())
    for dotted, value in changes.items():
        node = raw
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    path = tmp_path / "robot.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_robot_yamls_load():
    for path in sorted((REPO / "real_robot").glob("*.yaml")):
        config = load_robot_config(path)
        assert set(config.task.obs_keys) <= set(config.observations)
        assert config.safety.enabled


@pytest.mark.parametrize("changes, message", [
    ({"observations.goal_pos": None}, "field 'observations' lacks 'goal_pos'"),
    ({"observations.agent_pos.type": "sensor_msgs/Imu"}, "field 'observations.agent_pos.type' must be one of"),
    ({"observations.agent_pos.field": "pose"}, "field 'observations.agent_pos.field'"),
    ({"observations.goal_pos.index": [0, 1, 2]}, "field 'observations.goal_pos.index' selects 3 values"),
    ({"command.topic": None}, "field 'command.topic' is required"),
    ({"safety.max_delta": [0.1, 0.2, 0.3]}, "field 'safety.max_delta' must have 2 entries"),
    ({"safety.workspace.key": "elbow"}, "names observation 'elbow'"),
    ({"safety.workspace.action_dims": [0, 5]}, "field 'safety.workspace.action_dims' entries must be in [0, 2)"),
    ({"safety.stale_observation_age": -1}, "field 'safety.stale_observation_age' must be > 0"),
    ({"sync": "sometimes"}, "field 'sync' must be one of"),
    ({"task": "no_such_task"}, "field 'task': unknown task 'no_such_task'"),
    ({"controll_rate": 10}, "unknown field(s) ['controll_rate']"),
])
def test_bad_robot_yaml_names_the_file_and_the_field(tmp_path, changes, message):
    path = write_robot(tmp_path, **changes)
    with pytest.raises(RobotConfigError) as error:
        load_robot_config(path)
    assert str(path) in str(error.value)
    assert message in str(error.value)
