"""Teleoperation sources for the recorder, and the operator's keys.

A source gives ``action(obs, since)`` (an action in [-1, 1], or None when the operator gives no input, which the
recorder turns into the hold action) and ``events()`` (operator events since the last call):

* :class:`KeyboardTeleop`: the terminal keyboard (works over SSH, no display needed). A terminal sends no key-up,
  so a motion key drives its axis while its auto-repeat keeps coming (a short latch bridges the repeat delay).
* :class:`SpaceMouseTeleop`: a 3Dconnexion SpaceMouse read from ``/dev/hidraw*`` (6 axes; the left button
  toggles the gripper, the right one means "next episode").
* :class:`RosTopicTeleop`: actions on a ``std_msgs/Float64MultiArray`` topic and events on a ``std_msgs/String``
  topic (a leader arm, a VR rig, a phone app, or the twin's scripted expert in CI).

Operator keys (LeRobot's, plus marking): right arrow or Enter = next episode, left arrow or Backspace = re-record,
Esc or q = stop, y = mark success, n = mark failure, space = e-stop; during ``train residual --teleop=...``
t toggles the takeover (``takeover`` / ``handback`` on the ROS event topic; a SpaceMouse takes over while it is
moved, as in SERL).
"""

from __future__ import annotations

import glob
import os
import queue
import select
import struct
import sys
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from robofinetune.robot.errors import RobotError
from robofinetune.robot.messages import FLOAT64_MULTI_ARRAY, STRING, MessageError, decode_field

NEXT, RERECORD, STOP, SUCCESS, FAILURE, ESTOP = "next", "rerecord", "stop", "success", "failure", "estop"
TAKEOVER, HANDBACK, TOGGLE_TAKEOVER = "takeover", "handback", "toggle_takeover"  # interventions during RL
EVENTS = (NEXT, RERECORD, STOP, SUCCESS, FAILURE, ESTOP, TAKEOVER, HANDBACK, TOGGLE_TAKEOVER)

# key names produced by TerminalKeys
RIGHT, LEFT, UP, DOWN, ESC, ENTER, BACKSPACE, SPACE = "right", "left", "up", "down", "esc", "enter", "backspace", "space"
EVENT_KEYS = {RIGHT: NEXT, ENTER: NEXT, LEFT: RERECORD, BACKSPACE: RERECORD, ESC: STOP, "q": STOP, "y": SUCCESS,
              "n": FAILURE, SPACE: ESTOP, "t": TOGGLE_TAKEOVER}
KEY_HELP = ("keys: -> / Enter next episode, <- / Backspace re-record, Esc / q stop, y mark success, "
            "n mark failure, space e-stop")


def parse_key_bytes(data: bytes) -> list[str]:
    """Terminal input bytes -> key names (arrows and Esc from their escape sequences)."""
    keys: list[str] = []
    i = 0
    while i < len(data):
        byte = data[i:i + 1]
        if byte == b"\x1b":
            sequence = data[i:i + 3]
            arrows = {b"\x1b[C": RIGHT, b"\x1b[D": LEFT, b"\x1b[A": UP, b"\x1b[B": DOWN,
                      b"\x1bOC": RIGHT, b"\x1bOD": LEFT, b"\x1bOA": UP, b"\x1bOB": DOWN}
            if sequence in arrows:
                keys.append(arrows[sequence])
                i += 3
                continue
            keys.append(ESC)
            i += 1
            continue
        if byte in (b"\r", b"\n"):
            keys.append(ENTER)
        elif byte in (b"\x7f", b"\x08"):
            keys.append(BACKSPACE)
        elif byte == b" ":
            keys.append(SPACE)
        elif byte == b"\x03":
            raise KeyboardInterrupt  # Ctrl-C while the terminal is in cbreak mode
        else:
            keys.append(byte.decode("latin-1").lower())
        i += 1
    return keys


def events_from_keys(keys: list[str]) -> list[str]:
    return [EVENT_KEYS[key] for key in keys if key in EVENT_KEYS]


class TerminalKeys:
    """Reads single key presses from a terminal in cbreak mode on a background thread (restored on close)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdin
        self._queue: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._saved = None
        self.available = bool(getattr(self.stream, "isatty", lambda: False)())
        self._thread: threading.Thread | None = None

    def start(self) -> TerminalKeys:
        if not self.available or self._thread is not None:
            return self
        import termios
        import tty

        fd = self.stream.fileno()
        self._saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
        self._thread = threading.Thread(target=self._run, name="robofinetune-keys", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        fd = self.stream.fileno()
        while not self._stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.05)
            if not ready:
                continue
            data = os.read(fd, 64)
            try:
                for key in parse_key_bytes(data):
                    self._queue.put(key)
            except KeyboardInterrupt:
                self._queue.put("ctrl-c")

    def poll(self) -> list[str]:
        keys = []
        while True:
            try:
                keys.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if "ctrl-c" in keys:
            raise KeyboardInterrupt
        return keys

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self._saved)
            self._saved = None


class TeleopSource(ABC):
    name = "teleop"

    def start(self, env: Any) -> None:
        """Connect (``env`` is the RobotEnv; its transport and config are available)."""

    @abstractmethod
    def action(self, obs: dict[str, np.ndarray], since: float | None = None) -> np.ndarray | None: ...

    def events(self) -> list[str]:
        return []

    def feed_keys(self, keys: list[str]) -> None:
        """Key presses from the terminal (sources that use the keyboard act on them)."""

    def close(self) -> None:
        pass


# --- keyboard ------------------------------------------------------------------------------------------------

# motion keys -> (action dim, sign); dims beyond the action size are ignored
MOTION_KEYS = {"d": (0, 1), "a": (0, -1), "w": (1, 1), "s": (1, -1), "r": (2, 1), "f": (2, -1),
               "i": (3, 1), "k": (3, -1), "j": (4, 1), "l": (4, -1), "u": (5, 1), "o": (5, -1)}
GRIPPER_KEY = "g"


class KeyboardTeleop(TeleopSource):
    """wasd = x/y, r/f = z, i/k j/l u/o = rotations, g = toggle gripper (the last dim of a 7-D action)."""

    name = "keyboard"
    FIRST_LATCH = 0.6   # seconds a first press drives its axis (covers the terminal's auto-repeat delay)
    REPEAT_LATCH = 0.12  # seconds each auto-repeat extends it

    def __init__(self, action_dim: int, step: float = 1.0) -> None:
        self.action_dim = action_dim
        self.step = step
        self._until = np.zeros(action_dim)
        self._sign = np.zeros(action_dim)
        self._last_press = np.full(action_dim, -1e9)
        self._gripper = -1.0
        self._touched = False

    def feed_keys(self, keys: list[str], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for key in keys:
            if key == GRIPPER_KEY and self.action_dim == 7:
                self._gripper = -self._gripper
                self._touched = True
            elif key in MOTION_KEYS:
                dim, sign = MOTION_KEYS[key]
                if dim >= self.action_dim or (self.action_dim == 7 and dim == 6):
                    continue
                repeat = now - self._last_press[dim] < self.FIRST_LATCH and self._sign[dim] == sign
                self._sign[dim] = sign
                self._until[dim] = now + (self.REPEAT_LATCH if repeat else self.FIRST_LATCH)
                self._last_press[dim] = now
                self._touched = True

    def action(self, obs: dict[str, np.ndarray], since: float | None = None, now: float | None = None):
        now = time.monotonic() if now is None else now
        if not self._touched:
            return None
        action = np.where(self._until > now, self._sign * self.step, 0.0)
        if self.action_dim == 7:
            action[6] = self._gripper
        return np.clip(action, -1.0, 1.0).astype(np.float32)


# --- SpaceMouse -------------------------------------------------------------------------------------------------

SPACEMOUSE_VENDORS = ("0000046D", "0000256F")  # Logitech (older 3Dconnexion devices), 3Dconnexion


def find_spacemouse() -> str | None:
    """The /dev/hidrawN of the first 3Dconnexion device, from sysfs."""
    for uevent in sorted(glob.glob("/sys/class/hidraw/hidraw*/device/uevent")):
        try:
            text = Path(uevent).read_text()
        except OSError:
            continue
        hid_id = next((line.split("=", 1)[1] for line in text.splitlines() if line.startswith("HID_ID=")), "")
        name = next((line.split("=", 1)[1] for line in text.splitlines() if line.startswith("HID_NAME=")), "")
        parts = hid_id.split(":")
        if len(parts) == 3 and parts[1].upper() in SPACEMOUSE_VENDORS and ("3D" in name.upper() or "SPACE" in name.upper()
                                                                          or parts[1].upper() == "0000256F"):
            return "/dev/" + Path(uevent).parent.parent.name
    return None


class SpaceMouseState:
    """Axes and buttons from raw HID reports (report 1: translation, or all 6 axes on newer devices; report 2:
    rotation; report 3: buttons)."""

    def __init__(self, scale: float = 350.0) -> None:
        self.scale = scale
        self.axes = np.zeros(6)
        self.buttons = 0
        self.updated = False

    def feed(self, report: bytes) -> list[str]:
        """Apply one report; return button events (``press:<n>``) it caused."""
        if not report:
            return []
        kind = report[0]
        events = []
        if kind == 1 and len(report) >= 7:
            self.axes[:3] = np.asarray(struct.unpack("<3h", report[1:7]), dtype=np.float64) / self.scale
            if len(report) >= 13:
                self.axes[3:] = np.asarray(struct.unpack("<3h", report[7:13]), dtype=np.float64) / self.scale
            self.updated = True
        elif kind == 2 and len(report) >= 7:
            self.axes[3:] = np.asarray(struct.unpack("<3h", report[1:7]), dtype=np.float64) / self.scale
            self.updated = True
        elif kind == 3 and len(report) >= 2:
            buttons = int.from_bytes(report[1:3] if len(report) >= 3 else report[1:2], "little")
            pressed = buttons & ~self.buttons
            events = [f"press:{bit}" for bit in range(16) if pressed >> bit & 1]
            self.buttons = buttons
        np.clip(self.axes, -1.0, 1.0, out=self.axes)
        return events


class SpaceMouseTeleop(TeleopSource):
    """Axes (x, y, z, roll, pitch, yaw) drive action dims 0..5; left button toggles the gripper (dim 6 of a 7-D
    action); right button = next episode."""

    name = "spacemouse"

    def __init__(self, action_dim: int, device: str | None = None, scale: float = 350.0, deadzone: float = 0.05):
        self.action_dim = action_dim
        self.device = device
        self.state = SpaceMouseState(scale)
        self.deadzone = deadzone
        self._gripper = -1.0
        self._events: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, env: Any = None) -> None:
        device = self.device or find_spacemouse()
        if device is None:
            raise RobotError("no SpaceMouse found under /dev/hidraw* (is it plugged in, and readable by this user? "
                             "set teleop.spacemouse_device in the robot YAML)")
        try:
            handle = open(device, "rb", buffering=0)
        except OSError as exc:
            raise RobotError(f"cannot open SpaceMouse at {device}: {exc} (add a udev rule or run with access to it)"
                             ) from None
        self._thread = threading.Thread(target=self._run, args=(handle,), daemon=True, name="robofinetune-spacemouse")
        self._thread.start()

    def _run(self, handle: Any) -> None:
        with handle:
            while not self._stop.is_set():
                ready, _, _ = select.select([handle], [], [], 0.05)
                if ready:
                    self.feed(handle.read(64))

    def feed(self, report: bytes) -> None:
        with self._lock:
            for event in self.state.feed(report):
                if event == "press:0":
                    self._gripper = -self._gripper
                elif event == "press:1":
                    self._events.put(NEXT)

    def action(self, obs: dict[str, np.ndarray], since: float | None = None) -> np.ndarray | None:
        with self._lock:
            if not self.state.updated:
                return None
            axes = np.where(np.abs(self.state.axes) < self.deadzone, 0.0, self.state.axes)
        action = np.zeros(self.action_dim)
        motion = min(6, self.action_dim if self.action_dim != 7 else 6)
        action[:motion] = axes[:motion]
        if self.action_dim == 7:
            action[6] = self._gripper
        return action.astype(np.float32)

    def events(self) -> list[str]:
        found = []
        while True:
            try:
                found.append(self._events.get_nowait())
            except queue.Empty:
                return found

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


# --- ROS topic ----------------------------------------------------------------------------------------------------


class RosTopicTeleop(TeleopSource):
    """Actions from ``teleop.action_topic`` (Float64MultiArray), events from ``teleop.event_topic`` (String with
    one of next, rerecord, stop, success, failure, estop)."""

    name = "ros-topic"

    def __init__(self, action_dim: int, action_topic: str, event_topic: str, wait: float = 0.5) -> None:
        self.action_dim = action_dim
        self.action_topic, self.event_topic = action_topic, event_topic
        self.wait = wait
        self._cond = threading.Condition()
        self._latest: np.ndarray | None = None
        self._received = -1.0
        self._events: queue.Queue[str] = queue.Queue()
        self.bad_messages = 0
        self.last_bad: str | None = None   # why the newest dropped message was dropped (names the topic)

    def start(self, env: Any) -> None:
        env.transport.subscribe(self.action_topic, FLOAT64_MULTI_ARRAY, self._on_action)
        env.transport.subscribe(self.event_topic, STRING, self._on_event)

    def _on_action(self, message: dict[str, Any], received: float) -> None:
        try:
            values = decode_field(FLOAT64_MULTI_ARRAY, message, where=f"teleop {self.action_topic}")
        except MessageError as exc:
            self.last_bad, self.bad_messages = str(exc), self.bad_messages + 1
            return
        if values.shape != (self.action_dim,):
            self.last_bad = f"a message on {self.action_topic} has {values.size} values, the robot takes {self.action_dim}"
            self.bad_messages += 1
            return
        with self._cond:
            self._latest, self._received = values.astype(np.float32), received
            self._cond.notify_all()

    def _on_event(self, message: dict[str, Any], received: float) -> None:
        event = str(message.get("data", "")).strip().lower()
        if event in EVENTS:
            self._events.put(event)

    def action(self, obs: dict[str, np.ndarray], since: float | None = None) -> np.ndarray | None:
        """The newest action; with ``since``, first wait (up to ``wait`` s) for one received after it."""
        with self._cond:
            if since is not None:
                deadline = time.monotonic() + self.wait
                while self._received <= since and time.monotonic() < deadline:
                    self._cond.wait(timeout=0.01)
            return None if self._latest is None else self._latest.copy()

    def events(self) -> list[str]:
        found = []
        while True:
            try:
                found.append(self._events.get_nowait())
            except queue.Empty:
                return found


TELEOP_KINDS = ("keyboard", "spacemouse", "ros-topic")


def make_teleop(kind: str, config: Any) -> TeleopSource:
    """The teleop source ``kind`` for a RobotConfig."""
    dims = config.action_dim
    if kind == "keyboard":
        return KeyboardTeleop(dims, config.teleop.keyboard_step)
    if kind == "spacemouse":
        return SpaceMouseTeleop(dims, config.teleop.spacemouse_device, config.teleop.spacemouse_scale)
    if kind == "ros-topic":
        return RosTopicTeleop(dims, config.teleop.action_topic, config.teleop.event_topic)
    raise RobotError(f"unknown teleop source '{kind}'; choose one of {list(TELEOP_KINDS)}")
