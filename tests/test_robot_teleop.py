"""Teleop sources at their hardware boundary (terminal bytes, SpaceMouse HID reports) and the recorder's writers."""

import struct

import numpy as np
import pytest

from robofinetune.errors import DatasetError
from robofinetune.robot.recorder import open_episode_writer
from robofinetune.robot.teleop import (ENTER, ESC, ESTOP, FAILURE, LEFT, NEXT, RERECORD, RIGHT, SPACE, STOP, SUCCESS,
                                       KeyboardTeleop, SpaceMouseState, SpaceMouseTeleop, events_from_keys,
                                       parse_key_bytes)


def test_terminal_bytes_become_keys_and_operator_events():
    keys = parse_key_bytes(b"\x1b[C\x1b[Dw\x1b\r y\x7fnq")
    assert keys == [RIGHT, LEFT, "w", ESC, ENTER, SPACE, "y", "backspace", "n", "q"]
    assert events_from_keys(keys) == [NEXT, RERECORD, STOP, NEXT, ESTOP, SUCCESS, RERECORD, FAILURE, STOP]
    with pytest.raises(KeyboardInterrupt):
        parse_key_bytes(b"\x03")


def test_keyboard_motion_latches_across_the_autorepeat_delay_and_stops_after_release():
    teleop = KeyboardTeleop(action_dim=2, step=0.8)
    assert teleop.action({}, now=0.0) is None  # no input yet: the recorder holds the robot
    teleop.feed_keys(["d"], now=0.0)
    assert np.allclose(teleop.action({}, now=0.3), [0.8, 0.0])  # inside the first-press latch
    teleop.feed_keys(["d", "w"], now=0.5)  # auto-repeat of d, first press of w
    assert np.allclose(teleop.action({}, now=0.55), [0.8, 0.8])
    assert np.allclose(teleop.action({}, now=0.7), [0.0, 0.8])  # d released (no repeat), w still latched
    assert np.allclose(teleop.action({}, now=2.0), [0.0, 0.0])
    teleop.feed_keys(["a"], now=3.0)
    assert np.allclose(teleop.action({}, now=3.1), [-0.8, 0.0])


def test_keyboard_gripper_toggle_on_a_seven_dim_arm():
    teleop = KeyboardTeleop(action_dim=7)
    teleop.feed_keys(["r", "g"], now=0.0)
    action = teleop.action({}, now=0.1)
    assert action[2] == 1.0 and action[6] == 1.0  # z up, gripper closed
    teleop.feed_keys(["g"], now=0.2)
    assert teleop.action({}, now=0.3)[6] == -1.0


def spacemouse_report(kind, *values):
    return bytes([kind]) + struct.pack(f"<{len(values)}h", *values)


def test_spacemouse_reports_old_and_new_devices_and_buttons():
    state = SpaceMouseState(scale=350.0)
    state.feed(spacemouse_report(1, 350, -175, 0))          # older devices: translation in report 1
    state.feed(spacemouse_report(2, 0, 700, -35))           # and rotation in report 2 (clipped to 1)
    assert np.allclose(state.axes, [1.0, -0.5, 0.0, 0.0, 1.0, -0.1])
    state.feed(spacemouse_report(1, 35, 0, 0, 0, 0, 70))    # newer devices: all six axes in report 1
    assert np.allclose(state.axes, [0.1, 0, 0, 0, 0, 0.2])
    assert state.feed(bytes([3, 0b01, 0])) == ["press:0"]
    assert state.feed(bytes([3, 0b11, 0])) == ["press:1"]   # only new presses count
    assert state.feed(bytes([3, 0b00, 0])) == []

    teleop = SpaceMouseTeleop(action_dim=7, scale=350.0)
    assert teleop.action({}) is None
    teleop.feed(spacemouse_report(1, 10, 175, -350, 0, 0, 0))
    teleop.feed(bytes([3, 0b01, 0]))                         # left button: close the gripper
    teleop.feed(bytes([3, 0b10, 0]))                         # right button: next episode
    action = teleop.action({})
    assert np.allclose(action, [0.0, 0.5, -1.0, 0.0, 0.0, 0.0, 1.0])  # 10/350 is inside the dead zone
    assert teleop.events() == [NEXT]


def test_spacemouse_without_a_device_is_a_clear_error(monkeypatch):
    from robofinetune.robot.errors import RobotError

    monkeypatch.setattr("robofinetune.robot.teleop.find_spacemouse", lambda: None)
    with pytest.raises(RobotError, match="no SpaceMouse found"):
        SpaceMouseTeleop(action_dim=7).start()


def test_writers_never_overwrite_without_resume(tmp_path):
    meta = {"env_name": "pointmass", "task": "pointmass"}
    path = tmp_path / "demos.hdf5"
    writer = open_episode_writer(path, "robomimic", meta)
    assert len(writer) == 0 and path.exists()
    with pytest.raises(DatasetError, match="pass --resume"):
        open_episode_writer(path, "robomimic", meta)
    assert len(open_episode_writer(path, "robomimic", meta, resume=True)) == 0
    with pytest.raises(DatasetError, match="unknown format"):
        open_episode_writer(tmp_path / "x", "parquet", meta)
    folder = tmp_path / "demos_lerobot"
    assert len(open_episode_writer(folder, "lerobot", meta, fps=20)) == 0
