"""The safety layer between a policy (or a teleoperator) and the robot. On by default.

Per command, in this order (every change is an :class:`Intervention`, counted and logged with the episode):

1. NaN/inf in the action or in a low-dim observation -> the hold action is sent instead (always on, even with
   ``enabled: false``);
2. the action is clipped to [-1, 1] and to ``action_low``/``action_high``;
3. per-step change ``|a_t - a_{t-1}|`` is capped at ``max_delta`` (per action dim);
4. workspace box and joint limits (:class:`BoxLimitConfig`): the next value of an observed quantity is predicted
   as ``x + lookahead * v + gain * a`` (``v`` from ``velocity_key``); an action component that would carry it
   out of ``[low, high]`` is reduced to the largest value that keeps it inside (``gain > 0``, position-like
   actions) or to zero (``gain = 0``, force- or velocity-like actions). A limit without ``action_dims`` only
   watches: when the observed value is outside, the hold action is sent.

Outside this per-command filter, :class:`Watchdog` holds the robot when observations go stale and
:class:`RateLoop` keeps the loop at a fixed rate and counts overruns; the e-stop lives in
:class:`robofinetune.robot.env.RobotEnv`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

# Intervention kinds, as they appear in logs and counts.
NONFINITE_ACTION = "nonfinite_action"
NONFINITE_OBSERVATION = "nonfinite_observation"
ACTION_BOX = "action_box"
MAX_DELTA = "max_delta"
WORKSPACE = "workspace"
JOINT_LIMIT = "joint_limit"
STALE_HOLD = "stale_hold"
ESTOP = "estop"
OVERRUN = "overrun"
KINDS = (NONFINITE_ACTION, NONFINITE_OBSERVATION, ACTION_BOX, MAX_DELTA, WORKSPACE, JOINT_LIMIT, STALE_HOLD,
         ESTOP, OVERRUN)


@dataclass
class BoxLimitConfig:
    """Keep observation ``key`` (its elements ``index``, or all) inside ``[low, high]``."""

    key: str
    low: list[float]
    high: list[float]
    action_dims: list[int] | None = None  # the action dim that moves each limited element; None = watch only
    gain: float = 0.0                     # displacement per unit action per step (0: force/velocity-like action)
    velocity_key: str | None = None       # observation giving the element's velocity (same index)
    lookahead: float = 0.0                # seconds of velocity extrapolation
    index: list[int] | None = None


@dataclass
class SafetyConfig:
    enabled: bool = True
    max_delta: list[float] | None = None       # per action dim, action units per step
    action_low: list[float] | None = None
    action_high: list[float] | None = None
    workspace: BoxLimitConfig | None = None
    joint_limits: list[BoxLimitConfig] = field(default_factory=list)
    stale_observation_age: float = 0.5         # seconds without a fresh observation before the watchdog holds
    abort_after: float = 5.0                   # seconds of continuous staleness before the episode is aborted
    hold_action: list[float | None] | None = None  # sent to hold the robot; None entries keep the last value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Intervention:
    kind: str
    step: int
    time: float                    # time.monotonic() when it happened
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def short(value: Any) -> Any:  # episode metadata is stored as an HDF5 attribute: keep it compact
            if isinstance(value, float):
                return round(value, 4)
            if isinstance(value, (list, tuple)):
                return [short(item) for item in value]
            return value

        return {"kind": self.kind, "step": self.step, "time": round(self.time, 4),
                **{key: short(value) for key, value in self.detail.items()}}


class InterventionLog:
    """All interventions of one episode (the first ``max_events`` in full, all of them counted)."""

    def __init__(self, max_events: int = 50) -> None:
        self.counts: Counter[str] = Counter()
        self.events: list[Intervention] = []
        self.max_events = max_events
        self._lock = threading.Lock()

    def add(self, event: Intervention) -> None:
        with self._lock:
            self.counts[event.kind] += 1
            if len(self.events) < self.max_events:
                self.events.append(event)

    def extend(self, events: list[Intervention]) -> None:
        for event in events:
            self.add(event)

    @property
    def total(self) -> int:
        return int(sum(self.counts.values()))

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {"total": self.total, "counts": dict(self.counts),
                    "events": [event.to_dict() for event in self.events]}


def _finite_observation(obs: dict[str, np.ndarray]) -> str | None:
    for key, value in obs.items():
        array = np.asarray(value)
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            return key
    return None


class SafetyLayer:
    """Filters each command. Keeps the last sent command (for ``max_delta`` and the hold action)."""

    def __init__(self, config: SafetyConfig, action_dim: int, period: float) -> None:
        self.config = config
        self.action_dim = action_dim
        self.period = period
        self.max_delta = None if config.max_delta is None else np.asarray(config.max_delta, dtype=np.float64)
        low = np.full(action_dim, -1.0) if config.action_low is None else np.asarray(config.action_low, dtype=np.float64)
        high = np.full(action_dim, 1.0) if config.action_high is None else np.asarray(config.action_high, dtype=np.float64)
        self.low, self.high = np.maximum(low, -1.0), np.minimum(high, 1.0)
        self.last_sent = self.hold_action(None)

    def reset(self) -> None:
        """At the start of an episode the robot is held, so per-step deltas are measured from the hold action."""
        self.last_sent = self.hold_action(None)

    def hold_action(self, last: np.ndarray | None) -> np.ndarray:
        """The hold command; entries configured as None repeat ``last`` (0 when unknown)."""
        if self.config.hold_action is None:
            return np.zeros(self.action_dim)
        hold = np.zeros(self.action_dim)
        for i, value in enumerate(self.config.hold_action):
            hold[i] = (last[i] if last is not None else 0.0) if value is None else value
        return hold

    def filter(self, action: Any, obs: dict[str, np.ndarray] | None, step: int = 0) -> tuple[np.ndarray, list[Intervention]]:
        """The command to send for ``action`` given the latest observation, and what was changed."""
        now = time.monotonic()
        events: list[Intervention] = []
        raw = np.asarray(action, dtype=np.float64).reshape(-1)
        if raw.shape != (self.action_dim,):
            raise ValueError(f"action must have {self.action_dim} values, got shape {np.shape(action)}")
        if not np.all(np.isfinite(raw)):
            events.append(Intervention(NONFINITE_ACTION, step, now, {"action": [repr(x) for x in raw.tolist()]}))
            return self._hold(events)
        if obs is not None:
            bad_key = _finite_observation(obs)
            if bad_key is not None:
                events.append(Intervention(NONFINITE_OBSERVATION, step, now, {"key": bad_key}))
                return self._hold(events)
        safe = np.clip(raw, -1.0, 1.0)
        if self.config.enabled:
            safe = np.clip(safe, self.low, self.high)
        if np.any(np.abs(safe - raw) > 1e-9):
            events.append(Intervention(ACTION_BOX, step, now, {"requested": raw.tolist(), "sent": safe.tolist()}))
        if not self.config.enabled:
            self.last_sent = safe
            return safe, events
        if self.max_delta is not None:
            limited = np.clip(safe, self.last_sent - self.max_delta, self.last_sent + self.max_delta)
            if np.any(np.abs(limited - safe) > 1e-9):
                events.append(Intervention(MAX_DELTA, step, now, {"requested": safe.tolist(), "sent": limited.tolist()}))
            safe = limited
        limits = ([(WORKSPACE, self.config.workspace)] if self.config.workspace else []) + \
                 [(JOINT_LIMIT, limit) for limit in self.config.joint_limits]
        for kind, limit in limits:
            if obs is None or limit.key not in obs:
                continue
            safe, event = self._apply_box(kind, limit, safe, obs, step, now)
            if event is not None:
                events.append(event)
                if event.detail.get("hold"):
                    return self._hold(events)
        self.last_sent = safe
        return safe, events

    def _hold(self, events: list[Intervention]) -> tuple[np.ndarray, list[Intervention]]:
        hold = self.hold_action(self.last_sent)
        self.last_sent = hold
        return hold, events

    def _apply_box(self, kind: str, limit: BoxLimitConfig, action: np.ndarray, obs: dict[str, np.ndarray],
                   step: int, now: float) -> tuple[np.ndarray, Intervention | None]:
        value = np.asarray(obs[limit.key], dtype=np.float64).reshape(-1)
        index = limit.index if limit.index is not None else list(range(len(value)))
        position = value[index]
        low, high = np.asarray(limit.low), np.asarray(limit.high)
        if limit.action_dims is None:
            outside = (position < low) | (position > high)
            if np.any(outside):
                return action, Intervention(kind, step, now, {"key": limit.key, "value": position.tolist(), "hold": True})
            return action, None
        predicted = position.copy()
        if limit.velocity_key is not None and limit.velocity_key in obs and limit.lookahead > 0:
            velocity = np.asarray(obs[limit.velocity_key], dtype=np.float64).reshape(-1)[index]
            predicted = predicted + limit.lookahead * velocity
        result = action.copy()
        changed = []
        for element, dim in enumerate(limit.action_dims):
            a = result[dim]
            nxt = predicted[element] + limit.gain * a
            if limit.gain > 0:
                # largest |a| in its direction that keeps the prediction inside the box
                if nxt > high[element] and a > 0:
                    result[dim] = max(0.0, (high[element] - predicted[element]) / limit.gain)
                elif nxt < low[element] and a < 0:
                    result[dim] = min(0.0, (low[element] - predicted[element]) / limit.gain)
            else:
                if (predicted[element] >= high[element] and a > 0) or (predicted[element] <= low[element] and a < 0):
                    result[dim] = 0.0
            if result[dim] != a:
                changed.append(dim)
        if changed:
            return result, Intervention(kind, step, now, {"key": limit.key, "value": position.tolist(),
                                                          "dims": changed, "requested": action.tolist(),
                                                          "sent": result.tolist()})
        return result, None


class RateLoop:
    """Holds a loop at ``rate`` Hz on the monotonic clock. ``sleep()`` waits for the next tick; when the work
    already took longer than a period it does not wait, counts an overrun and restarts the schedule from now
    (no burst of catch-up ticks)."""

    def __init__(self, rate: float) -> None:
        self.period = 1.0 / float(rate)
        self.reset()

    def reset(self) -> None:
        self._next = time.monotonic() + self.period
        self.ticks = 0
        self.overruns = 0
        self.started = time.monotonic()
        self.intervals: list[float] = []
        self._last_tick = self.started

    def sleep(self) -> float:
        """Wait for the next tick; return by how many seconds this tick was late (0 when on time)."""
        now = time.monotonic()
        late = 0.0
        if now < self._next:
            time.sleep(self._next - now)
            self._next += self.period
        else:
            late = now - self._next
            if late > 0.1 * self.period:
                self.overruns += 1
            self._next = now + self.period
        self.mark()
        return late

    def mark(self) -> None:
        """Count a tick that happened now (loops paced by the robot's own clock call this instead of sleep)."""
        now = time.monotonic()
        self.intervals.append(now - self._last_tick)
        self._last_tick = now
        self.ticks += 1

    @property
    def achieved_rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.ticks / elapsed if elapsed > 0 else 0.0


class Watchdog:
    """Holds the robot when observations go stale.

    A background thread wakes when the oldest of the latest observation receipts becomes older than
    ``max_age``; it then calls ``send_hold()`` (which publishes the hold command and returns the publish time),
    repeats it every ``period`` while the observations stay stale, and reports each stale spell to
    ``on_event(t_last_observation, t_hold)``. ``holding`` tells the control loop not to send policy commands.
    """

    def __init__(self, max_age: float, period: float, last_observation_time: Callable[[], float | None],
                 send_hold: Callable[[], float], on_event: Callable[[float, float], None]) -> None:
        self.max_age = max_age
        self.period = period
        self._last_observation_time = last_observation_time
        self._send_hold = send_hold
        self._on_event = on_event
        self._armed = False
        self._stop = False
        self._holding = False
        self._last_hold = 0.0
        self._wake = threading.Condition()
        self.hold_times: list[tuple[float, float]] = []  # (t_last_observation, t_hold) per stale spell
        self._thread = threading.Thread(target=self._run, name="robofinetune-watchdog", daemon=True)
        self._thread.start()

    @property
    def holding(self) -> bool:
        return self._holding

    def arm(self) -> None:
        with self._wake:
            self._armed = True
            self._holding = False
            self._wake.notify_all()

    def disarm(self) -> None:
        with self._wake:
            self._armed = False
            self._holding = False
            self._wake.notify_all()

    def poke(self) -> None:
        """Fresh observation: re-evaluate now (clears ``holding`` promptly)."""
        with self._wake:
            self._wake.notify_all()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while True:
            with self._wake:
                if self._stop:
                    return
                if not self._armed:
                    self._wake.wait()
                    continue
                last = self._last_observation_time()
                now = time.monotonic()
                if last is None or now - last <= self.max_age:
                    self._holding = False
                    timeout = self.max_age if last is None else last + self.max_age - now
                    self._wake.wait(timeout=max(timeout, 1e-4) + 1e-4)
                    continue
                first = not self._holding
                due = first or now - self._last_hold >= self.period
                if not due:
                    self._wake.wait(timeout=self.period - (now - self._last_hold))
                    continue
                self._holding = True
            # publish outside the lock: a transport call must not block arm/disarm/poke
            t_hold = self._send_hold()
            self._last_hold = t_hold
            if first:
                self.hold_times.append((last, t_hold))
                self._on_event(last, t_hold)
