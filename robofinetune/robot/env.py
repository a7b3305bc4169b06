"""``RobotEnv``: a real robot (or its MuJoCo twin) behind ROS, as a ``gymnasium.Env`` with the same observation
and action spaces as the sim task it mirrors. A policy cannot tell which one it drives.

    env = RobotEnv("real_robot/pointmass_twin.yaml")
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(policy_action)

``step(a)``: the safety layer filters ``a`` (:mod:`robofinetune.robot.safety`), the command is published, and the
next observation is awaited according to ``sync``:

* ``rate``: a fixed-rate loop on the local clock; the newest observation at the tick is returned (robots that
  publish state faster than the control rate);
* ``observation``: the robot's own publishing paces the loop; step returns as soon as every observation topic
  has a new message (robots and cameras publishing at the control rate, the twin in realtime mode);
* ``lockstep``: the robot steps once per command (the twin in lockstep mode); paced by a fixed-rate loop.

``info`` carries ``is_success``, ``action_sent`` (what the robot got, None when it was held), ``interventions``
(kinds, this step), ``latency`` (seconds from receipt of the observation the action was computed from to the
command's publication), ``late`` (seconds past the tick), ``estop``, ``aborted``. ``episode_summary()`` gives
the episode's interventions, latencies and rate. Receipt is stamped by the transport before the message is
converted and decoded, so ``latency`` includes image decoding.

Camera topics (``sensor_msgs/Image``) give uint8 H x W x C observation keys, checked against the robot YAML by
:func:`~robofinetune.robot.messages.decode_camera_image` (size, encoding, channels, row order). A refused message
counts as no message: the watchdog holds the robot as for any stale topic, ``reset`` fails at once naming the
topic and the key, and an aborted step says why in ``info["aborted"]``.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from robofinetune.envs.base import action_space, observation_space
from robofinetune.robot.config import RobotConfig, load_robot_config
from robofinetune.robot.errors import EStopError, RobotConnectionError, RobotError
from robofinetune.robot.messages import (BOOL, STRING, MessageError, decode_camera_image, decode_field,
                                         encode_command)
from robofinetune.robot.safety import (ESTOP, STALE_HOLD, Intervention, InterventionLog, RateLoop,
                                       SafetyLayer, Watchdog)
from robofinetune.robot.transport import Transport, make_transport

_REQUEST_IDS = itertools.count()


def _percentile_ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if values else None


class _ObservationCache:
    """The newest decoded value of every observation key, receipt time and count per topic."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.RLock())
        self.values: dict[str, np.ndarray] = {}
        self.topic_time: dict[str, float] = {}
        self.topic_count: dict[str, int] = {}
        self.bad_messages: dict[str, str] = {}    # topic -> why its newest refused message was refused
        self.bad_time: dict[str, float] = {}      # topic -> receipt time of that message
        self.bad_count = 0


class RobotEnv(gymnasium.Env):
    metadata = {"render_modes": []}

    def __init__(self, config: RobotConfig | str | Path, transport: Transport | None = None,
                 overrides: dict[str, Any] | None = None, connect: bool = True, seed: int | None = None) -> None:
        self.config = config if isinstance(config, RobotConfig) else load_robot_config(config, overrides)
        self.task_spec = self.config.task
        spec = self.task_spec
        space = observation_space(spec)
        extra = [(key, spaces.Box(0, 255, source.shape, np.uint8) if source.is_image
                  else spaces.Box(-np.inf, np.inf, source.shape, np.float32))
                 for key, source in self.config.extra_observations.items()]
        self.observation_space = spaces.Dict(list(space.spaces.items()) + extra) if extra else space
        self.action_space = action_space(spec)
        self.horizon = self.config.horizon
        self.period = 1.0 / self.config.control_rate
        self.safety = SafetyLayer(self.config.safety, spec.action_dim, self.period)
        self.log = InterventionLog()
        self.rate = RateLoop(self.config.control_rate)
        self._cache = _ObservationCache()
        self._topics = self.config.topics()
        self._sync_topics = list(self._topics)
        if self.config.success is not None and self.config.success.every_step:
            self._sync_topics.append(self.config.success.topic)
        self._success_value = False
        self._success_time = -1.0
        self._reset_replies: dict[str, tuple[dict[str, Any], float]] = {}
        self._estop_topic_engaged = False
        self._estop_key_engaged = False
        self._command_lock = threading.Lock()
        self._episode_active = False
        self._episode_start = 0.0
        self._steps = 0
        self._last_obs: dict[str, np.ndarray] | None = None
        self._last_obs_time = 0.0
        self._last_counts: dict[str, int] = {}
        self.last_command_time = 0.0  # monotonic time of the last command (or reset request) sent
        self.latencies: list[float] = []
        self.late: list[float] = []
        self.stale_spells: list[dict[str, float]] = []
        self.overrun_events: list[dict[str, float]] = []  # reported, not interventions: nothing was changed
        self.transport = transport or make_transport(self.config)
        self._connected = False
        self._pending_seed = seed  # make_env's convention: the first reset() uses it
        self.watchdog = Watchdog(self.config.safety.stale_observation_age, self.period, self._oldest_receipt,
                                 self._send_hold, self._on_stale)
        if connect:
            self.connect()

    # --- connection --------------------------------------------------------------------------------------------

    def connect(self) -> None:
        if self._connected:
            return
        config = self.config
        self.transport.connect(config.node_name)
        for topic, msg_type in self._topics.items():
            sources = [s for s in config.all_observations.values() if s.topic == topic]
            self.transport.subscribe(topic, msg_type, self._observation_callback(topic, msg_type, sources))
        if config.success is not None:
            self.transport.subscribe(config.success.topic, BOOL, self._on_success)
        if config.estop.topic:
            self.transport.subscribe(config.estop.topic, BOOL, self._on_estop_message)
        self._command_pub = self.transport.publisher(config.command.topic, config.command.type)
        self._reset_pub = None
        if config.reset.mode == "topic":
            self._reset_pub = self.transport.publisher(config.reset.request_topic, STRING)
            self.transport.subscribe(config.reset.done_topic, STRING, self._on_reset_done)
        self._connected = True

    def _observation_callback(self, topic: str, msg_type: str, sources: list[Any]):
        cache = self._cache

        def receive(message: dict[str, Any], received: float) -> None:
            # runs after the transport stamped `received`, so the step latency (receipt -> command) includes it
            decoded = {}
            try:
                for source in sources:
                    if source.is_image:
                        decoded[source.key] = decode_camera_image(message, topic, source.key, source.shape,
                                                                  source.encoding, source.flip_rows)
                        continue
                    value = decode_field(msg_type, message, source.field, source.joints, source.index,
                                         where=f"topic {topic} -> observation '{source.key}'")
                    if value.size != int(np.prod(source.shape)):
                        raise MessageError(f"topic {topic} -> observation '{source.key}': {value.size} values, "
                                           f"expected shape {source.shape}")
                    decoded[source.key] = value.reshape(source.shape).astype(np.float32, copy=False)
            except MessageError as exc:
                # refused: the topic stays as stale as if nothing had arrived (the watchdog holds the robot);
                # the reason is kept for reset's and the abort's error message
                with cache.cond:
                    cache.bad_count += 1
                    cache.bad_messages[topic] = str(exc)
                    cache.bad_time[topic] = received
                    cache.cond.notify_all()
                return
            with cache.cond:
                cache.values.update(decoded)
                cache.topic_time[topic] = received
                cache.topic_count[topic] = cache.topic_count.get(topic, 0) + 1
                cache.cond.notify_all()
            self.watchdog.poke()

        return receive

    def _on_success(self, message: dict[str, Any], received: float) -> None:
        with self._cache.cond:
            self._success_value = bool(message.get("data", False))
            self._success_time = received
            topic = self.config.success.topic
            self._cache.topic_time[topic] = received
            self._cache.topic_count[topic] = self._cache.topic_count.get(topic, 0) + 1
            self._cache.cond.notify_all()

    def _on_reset_done(self, message: dict[str, Any], received: float) -> None:
        try:
            reply = json.loads(message.get("data", "{}"))
        except json.JSONDecodeError:
            return
        if isinstance(reply, dict) and "id" in reply:
            with self._cache.cond:
                self._reset_replies[str(reply["id"])] = (reply, received)
                self._cache.cond.notify_all()

    # --- e-stop -----------------------------------------------------------------------------------------------------

    @property
    def estop_engaged(self) -> bool:
        return self._estop_topic_engaged or self._estop_key_engaged

    def _on_estop_message(self, message: dict[str, Any], received: float) -> None:
        engaged = bool(message.get("data", False))
        if engaged and not self._estop_topic_engaged:
            self._estop_topic_engaged = True
            self._engage_estop("topic")
        elif not engaged:
            self._estop_topic_engaged = False
            with self._cache.cond:
                self._cache.cond.notify_all()

    def trigger_estop(self, source: str = "key") -> None:
        """Engage the e-stop (the operator's key): hold now; latched until :meth:`release_estop`."""
        self._estop_key_engaged = True
        self._engage_estop(source)

    def release_estop(self) -> None:
        self._estop_key_engaged = False

    def _engage_estop(self, source: str) -> None:
        t_hold = self._send_hold()
        self.log.add(Intervention(ESTOP, self._steps, t_hold, {"source": source}))
        with self._cache.cond:
            self._cache.cond.notify_all()

    # --- commands -------------------------------------------------------------------------------------------------

    def _publish(self, action: np.ndarray) -> float:
        command = self.config.command
        values = np.asarray(action, dtype=np.float64)
        if command.scale is not None:
            values = values * np.asarray(command.scale)
        if command.offset is not None:
            values = values + np.asarray(command.offset)
        message = encode_command(command.type, values, command.field, command.joints, stamp=time.time())
        return self._command_pub.publish(message)

    def _send_hold(self) -> float:
        with self._command_lock:
            hold = self.safety.hold_action(self.safety.last_sent)
            self.safety.last_sent = hold
            if not self._connected:
                return time.monotonic()
            return self._publish(hold)

    def _oldest_receipt(self) -> float | None:
        with self._cache.cond:
            if not self._topics or any(topic not in self._cache.topic_time for topic in self._topics):
                return self._episode_start if self._episode_active else None
            return min(self._cache.topic_time[topic] for topic in self._topics)

    def _on_stale(self, last_observation: float, t_hold: float) -> None:
        spell = {"last_observation": last_observation, "hold": t_hold, "age": t_hold - last_observation}
        self.stale_spells.append(spell)
        self.log.add(Intervention(STALE_HOLD, self._steps, t_hold, {"age": t_hold - last_observation}))

    # --- waiting for observations -----------------------------------------------------------------------------------

    def _snapshot(self) -> tuple[dict[str, np.ndarray], float]:
        with self._cache.cond:
            obs = {key: self._cache.values[key] for key in self.observation_space.spaces}
            newest = max(self._cache.topic_time[topic] for topic in self._topics) if self._topics else time.monotonic()
            self._last_counts = {topic: self._cache.topic_count.get(topic, 0) for topic in self._sync_topics}
        return obs, newest

    def _fresh_since_time(self, since: float) -> list[str]:
        """Sync topics without a message received after ``since`` (call with the cache lock held)."""
        return [topic for topic in self._sync_topics if self._cache.topic_time.get(topic, -1.0) <= since]

    def _refusals(self, topics: list[str], since: float) -> dict[str, str]:
        """Why the newest message of each of ``topics`` received after ``since`` was refused (topics with one)."""
        with self._cache.cond:
            return {topic: self._cache.bad_messages[topic] for topic in topics
                    if self._cache.bad_time.get(topic, -1.0) > since}

    def _fresh_since_counts(self, counts: dict[str, int]) -> list[str]:
        return [topic for topic in self._sync_topics if self._cache.topic_count.get(topic, 0) <= counts.get(topic, 0)]

    def _wait(self, missing_fn, timeout: float, stop_on_estop: bool = True) -> list[str]:
        """Wait until ``missing_fn()`` (called under the lock) is empty; return what is still missing."""
        deadline = time.monotonic() + timeout
        with self._cache.cond:
            while True:
                missing = missing_fn()
                if not missing or (stop_on_estop and self.estop_engaged):
                    return missing
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return missing
                self._cache.cond.wait(timeout=min(remaining, 0.05))

    # --- gymnasium API ----------------------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is None and self._pending_seed is not None:
            seed = self._pending_seed
        self._pending_seed = None
        super().reset(seed=seed)
        if not self._connected:
            self.connect()
        if self.estop_engaged:
            where = f"publish false on {self.config.estop.topic}" if self._estop_topic_engaged else "release_estop()"
            raise EStopError(f"robot '{self.config.name}': e-stop engaged; release it ({where}) before reset")
        if self._episode_active:
            self._end_episode()
        self.log = InterventionLog()
        self.latencies, self.late, self.stale_spells, self.overrun_events = [], [], [], []
        options = options or {}
        mode = self.config.reset.mode
        requested = time.monotonic()
        reply: dict[str, Any] = {}
        if mode == "topic":
            reply, fresh_after = self._request_reset(seed)
        elif mode == "operator":
            ready = options.get("operator_ready")
            if ready is not None:
                ready()
            else:
                self._prompt_operator()
            fresh_after = time.monotonic()
        else:
            fresh_after = requested
        with self._cache.cond:
            if self._success_time <= fresh_after:
                self._success_value = False
        deadline = time.monotonic() + self.config.reset.timeout
        while True:
            missing = self._wait(lambda: self._fresh_since_time(fresh_after), 1.0, stop_on_estop=False)
            if not missing or time.monotonic() > deadline:
                break
            refused = self._refusals(missing, fresh_after)
            if refused:
                # a topic that delivers only messages we refuse (a camera of another size or encoding) will not
                # mend itself: say so now instead of after the reset timeout
                raise RobotError(f"robot '{self.config.name}': no usable observations on {list(refused)} after "
                                 f"reset; refused: {'; '.join(refused.values())}")
            if mode == "topic":
                # a message published while our subscriber was still connecting is lost: ask again (the same
                # request id makes the robot republish its state without resetting twice)
                self._reset_pub.publish({"data": reply["_request"]})
        if missing:
            bad = self._refusals(missing, -1.0)
            raise RobotConnectionError(
                f"robot '{self.config.name}': no observations on {missing} within {self.config.reset.timeout:g} s "
                f"after reset" + (f"; undecodable messages: {bad}" if bad else ""))
        self._last_obs, self._last_obs_time = self._snapshot()
        self.last_command_time = fresh_after  # lockstep: the robot's replies to this reset come after it
        self.safety.reset()
        self._steps = 0
        self._episode_start = time.monotonic()
        self._episode_active = True
        self.rate.reset()
        self.watchdog.arm()
        info = {"is_success": False, "seed": seed, "reset_reply": reply}
        return dict(self._last_obs), info

    def _prompt_operator(self) -> None:
        import sys

        if not sys.stdin or not sys.stdin.isatty():
            raise RobotError(f"robot '{self.config.name}': reset.mode is 'operator' but there is no terminal to "
                             f"confirm on; pass options={{'operator_ready': callback}} or use reset.mode topic")
        input(f"[{self.config.name}] reset the scene, then press Enter to start the episode ")

    def _request_reset(self, seed: int | None) -> tuple[dict[str, Any], float]:
        request_id = f"{os.getpid()}-{next(_REQUEST_IDS)}-{time.monotonic_ns()}"
        payload = json.dumps({"id": request_id, "seed": None if seed is None else int(seed)})
        timeout = self.config.reset.timeout
        started = time.monotonic()
        self.transport.wait_for_subscribers(self._reset_pub, timeout=min(timeout, 5.0))
        sent_at = time.monotonic()
        while True:
            self._reset_pub.publish({"data": payload})
            with self._cache.cond:
                deadline = time.monotonic() + 1.0
                while request_id not in self._reset_replies and time.monotonic() < deadline:
                    self._cache.cond.wait(timeout=0.05)
                found = self._reset_replies.pop(request_id, None)
            if found is not None:
                reply, received = found
                break
            if time.monotonic() - started > timeout:
                raise RobotConnectionError(
                    f"robot '{self.config.name}': no reply on {self.config.reset.done_topic} to a reset request on "
                    f"{self.config.reset.request_topic} within {timeout:g} s (is the twin / reset node running?)")
        reply["_request"] = payload
        if reply.get("error"):
            raise RobotError(f"robot '{self.config.name}': reset failed: {reply['error']}")
        # lockstep: the robot publishes only in response to requests, so anything after the request is new;
        # otherwise observations keep streaming and only those after the reply belong to the new episode
        return reply, (sent_at if self.config.sync == "lockstep" else received)

    def step(self, action):
        if not self._episode_active:
            raise RobotError("step() outside an episode: call reset() first")
        obs_seen, t_seen = self._last_obs, self._last_obs_time
        safe, events = self.safety.filter(action, obs_seen, self._steps)
        self.log.extend(events)
        info: dict[str, Any] = {"interventions": [event.kind for event in events], "action_sent": None,
                                "latency": None, "late": 0.0, "estop": False, "aborted": None, "held": False}
        if self.estop_engaged:
            return self._finish_aborted(obs_seen, info, estop=True)
        t_pub = None
        if self.watchdog.holding:
            info["held"] = True
        else:
            with self._command_lock:
                t_pub = self._publish(safe)
                self.safety.last_sent = safe
            self.last_command_time = t_pub
            info["action_sent"] = safe.astype(np.float32)
            info["latency"] = t_pub - t_seen
            self.latencies.append(t_pub - t_seen)

        sync = self.config.sync
        stale_age = self.config.safety.stale_observation_age
        if sync == "rate":
            info["late"] = self.rate.sleep()
            oldest = self._oldest_receipt()
            missing = [] if oldest is not None and time.monotonic() - oldest <= stale_age else list(self._topics)
        elif sync == "lockstep":
            since = t_pub if t_pub is not None else t_seen
            missing = self._wait(lambda: self._fresh_since_time(since), stale_age)
            info["late"] = self.rate.sleep()
        else:  # observation
            counts = dict(self._last_counts)
            missing = self._wait(lambda: self._fresh_since_counts(counts), stale_age)
            self.rate.mark()
            interval = self.rate.intervals[-1] if self.rate.intervals else self.period
            info["late"] = max(0.0, interval - self.period)
        # an overrun: our own loop missed its tick (rate, lockstep), or a robot tick was missed (observation:
        # the robot's clock jitters by itself, so only a step longer than 1.5 periods counts)
        threshold = (0.5 if sync == "observation" else 0.1) * self.period
        if info["late"] > threshold:
            if sync == "observation":
                self.rate.overruns += 1
            self.overrun_events.append({"step": self._steps, "late_ms": info["late"] * 1000.0})
        self.late.append(info["late"])

        if self.estop_engaged:
            return self._finish_aborted(obs_seen, info, estop=True)
        if missing:
            # the watchdog holds the robot meanwhile; wait for the stream to come back, up to abort_after
            waited_from = self._oldest_receipt() or time.monotonic()
            remaining = self.config.safety.abort_after - (time.monotonic() - waited_from)
            missing = self._wait(lambda: [t for t in self._topics
                                          if time.monotonic() - self._cache.topic_time.get(t, -1e9) > stale_age],
                                 max(remaining, 0.0))
            if self.estop_engaged:
                return self._finish_aborted(obs_seen, info, estop=True)
            if missing:
                info["aborted"] = f"no fresh observations on {missing} for {self.config.safety.abort_after:g} s"
                refused = self._refusals(missing, self._episode_start)
                if refused:
                    info["aborted"] += f"; refused: {'; '.join(refused.values())}"
                return self._finish_aborted(obs_seen, info)
            info["stale_recovered"] = True

        obs, t_obs = self._snapshot()
        self._last_obs, self._last_obs_time = obs, t_obs
        with self._cache.cond:
            success = self._success_value and self._success_time > self._episode_start
        self._steps += 1
        terminated = bool(success)
        truncated = (not terminated) and self._steps >= self.horizon
        info["is_success"] = terminated
        info["step"] = self._steps
        if terminated or truncated:
            self._end_episode()
        return dict(obs), (1.0 if terminated else 0.0), terminated, truncated, info

    def _finish_aborted(self, obs: dict[str, np.ndarray], info: dict[str, Any], estop: bool = False):
        info["estop"] = estop
        info["is_success"] = False
        if estop and info["aborted"] is None:
            info["aborted"] = "e-stop"
        self._end_episode()
        return dict(obs), 0.0, False, True, info

    def end_episode(self) -> None:
        """End the current episode from outside (an operator's success / failure mark on a robot without a success
        topic): disarm the watchdog and, on a realtime robot, hold until the next reset."""
        self._end_episode()

    def _end_episode(self) -> None:
        self.watchdog.disarm()
        if self._episode_active and self.config.sync != "lockstep":
            # a realtime robot keeps applying the last command otherwise; a lockstep robot only moves on
            # command (and a hold would step it once more, its reply racing the next reset)
            self._send_hold()
        self._episode_active = False

    # --- reporting --------------------------------------------------------------------------------------------------

    def episode_summary(self) -> dict[str, Any]:
        """Safety interventions, latency and rate of the current (or just finished) episode."""
        return {
            "steps": self._steps,
            "interventions": self.log.summary(),
            "latency_ms": {"p50": _percentile_ms(self.latencies, 50), "p99": _percentile_ms(self.latencies, 99),
                           "max": _percentile_ms(self.latencies, 100)},
            "rate_hz": self.rate.achieved_rate, "target_rate_hz": self.config.control_rate,
            "overruns": len(self.overrun_events), "overrun_events": self.overrun_events[:100],
            "stale_spells": [dict(spell) for spell in self.stale_spells],
            "bad_messages": self._cache.bad_count,
            "refused": self._refusals(list(self._topics), self._episode_start),   # topic -> why (this episode)
        }

    @property
    def env_meta(self) -> dict[str, Any]:
        return self.config.env_meta

    def close(self) -> None:
        if self._connected:
            if self._episode_active:
                self._end_episode()
            self.transport.close()
            self._connected = False
        self.watchdog.stop()


def make_robot_env(path: str | Path, seed: int | None = None, **overrides: Any) -> RobotEnv:
    """``make_env`` for a robot YAML: a connected :class:`RobotEnv` (``seed`` seeds the first reset)."""
    return RobotEnv(path, overrides=overrides or None, seed=seed)
