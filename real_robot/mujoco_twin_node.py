#!/usr/bin/env python3
"""The MuJoCo twin: a robofinetune sim task behind the same ROS topics a robot driver would use.

    python real_robot/mujoco_twin_node.py --robot real_robot/pointmass_twin.yaml [--expert-teleop]

It reads the robot YAML the runner reads, and speaks its side of it:

* publishes every observation topic (JointState, PoseStamped, Float64MultiArray, Image: the inverse of the
  mapping ``RobotEnv`` decodes), and ``success`` (std_msgs/Bool) with every observation;
* cameras: each camera key of the task (``<camera>_image``, rendered by the task env at every sim step) goes out as
  a ``sensor_msgs/Image`` at the control rate, in the YAML's encoding (rgb8). The rows are the env's array as it
  is: top row first for MuJoCo's renderer (pointmass_image), OpenGL's bottom-up order for robosuite (can_image,
  as robomimic stores images), unless the key sets ``flip_rows``: then the topic carries the rows reversed
  (top row first for robosuite, as a real camera sends them) and ``RobotEnv`` reverses them back. Either way the
  policy sees over ROS exactly the pixels it sees in process;
* takes commands on ``command.topic`` (the action is recovered as ``(value - offset) / scale``);
* resets on a JSON request ``{"id", "seed"}`` (std_msgs/String) on ``reset.request_topic`` and answers
  ``{"id", "seed", "episode"}`` on ``reset.done_topic`` once the new episode's first observation is out;
* ``twin.pause_topic`` (std_msgs/Bool) true stops publishing observations (a driver that died), false resumes;
* ``--expert-teleop``: plays the operator: runs the task's scripted expert on what it observes and publishes
  its action (std_msgs/Float64MultiArray) on ``teleop.action_topic`` after every observation. For tests of
  ``train residual --teleop=ros-topic`` the operator can also follow a script, the same in every episode (steps
  count from the episode's first observation, 0):
  ``--takeover START:END`` publishes ``takeover`` on ``teleop.event_topic`` with observation START and
  ``handback`` with observation END (before the observation, so a lockstep learner has the event when it acts);
  ``--teleop-jolt STEP`` replaces the action for observation STEP by a full-scale command opposite to the last
  command the twin ran (a jump no per-step delta limit below 1 lets through);
  ``--teleop-bad STEP:nan|size`` replaces it by a bad one (a NaN first value, or one value too many);
  ``--operator-stop STEP`` publishes ``stop`` (the operator's stop key) with observation STEP.

``twin.mode``: ``realtime`` steps the sim at ``control_rate`` on its own clock with the newest command (zero-order
hold; the hold action once the command is older than ``twin.command_timeout``), as hardware does;
``lockstep`` steps once per command received (deterministic: deploy reproduces an in-process rollout exactly).
"""

from __future__ import annotations

import argparse
import json
import queue
import signal
import sys
import threading
import time
from typing import Any

import numpy as np

from robofinetune.envs import make_env
from robofinetune.robot.config import RobotConfig, load_robot_config
from robofinetune.robot.messages import (BOOL, FLOAT64_MULTI_ARRAY, STRING, MessageError, decode_command,
                                         encode_command, encode_fields)
from robofinetune.robot.transport import make_transport


class TwinNode:
    def __init__(self, config: RobotConfig, mode: str | None = None, expert_teleop: bool = False,
                 expert_noise: float | None = None, seed: int = 0, verbose: bool = True,
                 operator_script: dict[int, list[str]] | None = None) -> None:
        self.config = config
        self.mode = mode or config.twin.mode
        self.period = 1.0 / config.control_rate
        self.verbose = verbose
        images = [s for s in config.all_observations.values() if s.is_image and s.key not in config.task.obs_shapes]
        self.render_keys = {s.key: s for s in images}
        render_size = tuple(images[0].shape[:2]) if images else None
        kwargs: dict[str, Any] = {"render_size": render_size} if render_size else {}
        self.env = make_env(config.task, seed=seed, render=bool(images), **kwargs)
        self.expert = None
        if expert_teleop:
            from robofinetune.envs.experts import make_expert

            noise = config.twin.expert_noise if expert_noise is None else expert_noise
            self.expert = make_expert(config.task.name if config.task.expert is None else config.task.expert,
                                      noise=noise, seed=seed)
        self.hold = np.zeros(config.action_dim)
        # episode step -> what the scripted operator does there: takeover, handback, stop, jolt, bad:nan, bad:size
        self.operator_script = operator_script or {}
        self.last_command = np.zeros(config.action_dim)   # the command the sim last stepped with
        self.transport = make_transport(config)
        self.events: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.paused = False
        self._command: np.ndarray | None = None
        self._command_time = -1.0
        self._reset_time = 0.0
        self.episode = -1
        self.seed = seed
        self.last_request: str | None = None
        self.steps = 0
        self.obs: dict[str, np.ndarray] = {}
        self.success = False

    # --- ROS side ----------------------------------------------------------------------------------------------

    def connect(self) -> None:
        config = self.config
        self.transport.connect(f"{config.node_name}_twin")
        self.publishers = {topic: self.transport.publisher(topic, msg_type, queue_size=10)
                           for topic, msg_type in config.topics().items()}
        self.success_pub = self.transport.publisher(config.success.topic, BOOL) if config.success else None
        self.done_pub = self.transport.publisher(config.reset.done_topic, STRING)
        self.teleop_pub = self.transport.publisher(config.teleop.action_topic, FLOAT64_MULTI_ARRAY) \
            if self.expert is not None else None
        self.event_pub = self.transport.publisher(config.teleop.event_topic, STRING) \
            if self.expert is not None and self.operator_script else None
        self.transport.subscribe(config.command.topic, config.command.type, self._on_command)
        self.transport.subscribe(config.reset.request_topic, STRING, self._on_reset_request)
        self.transport.subscribe(config.twin.pause_topic, BOOL, self._on_pause)

    def _on_command(self, message: dict[str, Any], received: float) -> None:
        command = self.config.command
        try:
            values = decode_command(command.type, message, command.field, command.joints)
        except MessageError as exc:
            self._say(f"bad command: {exc}")
            return
        if values.shape != (self.config.action_dim,):
            self._say(f"bad command: {values.size} values, expected {self.config.action_dim}")
            return
        if command.offset is not None:
            values = values - np.asarray(command.offset)
        if command.scale is not None:
            values = values / np.asarray(command.scale)
        if self.mode == "lockstep":
            self.events.put(("command", values))
        else:
            self._command, self._command_time = values, received

    def _on_reset_request(self, message: dict[str, Any], received: float) -> None:
        try:
            request = json.loads(message.get("data", "{}"))
            request_id = str(request["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            self._say(f"bad reset request: {message.get('data')!r}")
            return
        self.events.put(("reset", request_id, request.get("seed")))

    def _on_pause(self, message: dict[str, Any], received: float) -> None:
        self.paused = bool(message.get("data", False))
        self._say("paused: not publishing observations" if self.paused else "resumed publishing")

    def _say(self, text: str) -> None:
        if self.verbose:
            print(f"[twin {self.config.name}] {text}", flush=True)

    # --- sim side ----------------------------------------------------------------------------------------------

    def _observation(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = dict(obs)
        for key, source in self.render_keys.items():
            values[key] = np.asarray(self.env.render(), dtype=np.uint8)
        return values

    def publish(self, with_teleop: bool = True) -> None:
        if self.paused:
            return
        script = self.operator_script.get(self.steps, []) if with_teleop else []
        if self.event_pub is not None:
            for event in script:
                if event in ("takeover", "handback", "stop"):
                    self.event_pub.publish({"data": event})
        stamp = time.time()
        by_topic: dict[str, list[dict[str, Any]]] = {}
        encodings: dict[str, str] = {}
        for source in self.config.all_observations.values():
            by_topic.setdefault(source.topic, []).append({"value": self.obs[source.key], "field": source.field,
                                                          "joints": source.joints, "index": source.index,
                                                          "flip_rows": source.flip_rows})
            encodings[source.topic] = source.encoding
        types = self.config.topics()
        for topic, parts in by_topic.items():
            message = encode_fields(types[topic], parts, stamp=stamp, frame_id=self.config.name,
                                    encoding=encodings[topic])
            self.publishers[topic].publish(message)
        if self.success_pub is not None:
            self.success_pub.publish({"data": bool(self.success)})
        if self.teleop_pub is not None and with_teleop:
            action = np.asarray(self.expert.act({key: self.obs[key] for key in self.config.task.obs_shapes}),
                                dtype=np.float64)
            if "jolt" in script:
                action = np.where(self.last_command >= 0, -1.0, 1.0)
            if "bad:nan" in script:
                action = action.copy()
                action[0] = np.nan
            if "bad:size" in script:
                action = np.append(action, 0.0)
            self.teleop_pub.publish(encode_command(FLOAT64_MULTI_ARRAY, action))

    def reset(self, request_id: str | None, seed: Any) -> None:
        if request_id is not None and request_id == self.last_request:
            # a repeated request: a reply or an observation was lost (a subscriber that was still connecting);
            # publish the same state again, without resetting or stepping
            self.publish(with_teleop=False)
            self._reply(request_id, seed)
            return
        obs, _ = self.env.reset(seed=None if seed is None else int(seed))
        if self.expert is not None:
            self.expert.reset(self.env)
        self.episode += 1
        self.steps = 0
        self.success = False
        self._command = None
        self._reset_time = time.monotonic()
        self.obs = self._observation(obs)
        self.publish()
        if request_id is not None:
            self.last_request = request_id
            self._reply(request_id, seed)

    def _reply(self, request_id: str, seed: Any) -> None:
        self.done_pub.publish({"data": json.dumps({"id": request_id, "seed": seed, "episode": self.episode})})

    def step(self, action: np.ndarray) -> None:
        self.last_command = np.clip(action, -1.0, 1.0)
        obs, _, _, _, info = self.env.step(self.last_command)
        self.steps += 1
        self.success = bool(info.get("is_success", False))
        self.obs = self._observation(obs)
        self.publish()

    def run(self) -> None:
        self.connect()
        self.reset(None, self.seed)
        self._say(f"ready ({self.mode}, {self.config.control_rate:g} Hz, task {self.config.task.name})")
        if self.mode == "lockstep":
            self._run_lockstep()
        else:
            self._run_realtime()
        self.transport.close()

    def _handle(self, event: tuple) -> None:
        if event[0] == "reset":
            self.reset(event[1], event[2])
        elif event[0] == "command":
            self.step(event[1])

    def _run_lockstep(self) -> None:
        while not self.stop.is_set():
            try:
                event = self.events.get(timeout=0.1)
            except queue.Empty:
                continue
            self._handle(event)

    def _run_realtime(self) -> None:
        next_tick = time.monotonic()
        while not self.stop.is_set():
            while True:
                try:
                    self._handle(self.events.get_nowait())
                except queue.Empty:
                    break
            now = time.monotonic()
            fresh = self._command is not None and self._command_time > self._reset_time and \
                now - self._command_time <= self.config.twin.command_timeout
            self.step(self._command if fresh else self.hold)
            next_tick += self.period
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_tick = time.monotonic()  # fell behind: do not burst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--robot", required=True, help="robot YAML (real_robot/<robot>.yaml)")
    parser.add_argument("--mode", choices=["realtime", "lockstep"], help="override twin.mode")
    parser.add_argument("--expert-teleop", action="store_true", help="publish the scripted expert's actions")
    parser.add_argument("--expert-noise", type=float, help="override twin.expert_noise")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode")
    parser.add_argument("--takeover", metavar="START:END", help="with --expert-teleop: take over at episode step "
                        "START, hand back at END (every episode)")
    parser.add_argument("--teleop-jolt", type=int, metavar="STEP", help="with --expert-teleop: a full-scale command "
                        "opposite to the last one at episode step STEP")
    parser.add_argument("--teleop-bad", action="append", default=[], metavar="STEP:nan|size",
                        help="with --expert-teleop: a bad command at episode step STEP")
    parser.add_argument("--operator-stop", type=int, metavar="STEP", help="with --expert-teleop: the operator's "
                        "stop event at episode step STEP")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a robot YAML field")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from robofinetune.robot.cli import parse_set_overrides

    # ROS parameters such as __name:=... arrive when started by roslaunch; argparse must not see them
    script: dict[int, list[str]] = {}
    try:
        if args.takeover:
            start, end = (int(part) for part in args.takeover.split(":"))
            script.setdefault(start, []).append("takeover")
            script.setdefault(end, []).append("handback")
        if args.teleop_jolt is not None:
            script.setdefault(args.teleop_jolt, []).append("jolt")
        if args.operator_stop is not None:
            script.setdefault(args.operator_stop, []).append("stop")
        for item in args.teleop_bad:
            step, kind = item.split(":")
            if kind not in ("nan", "size"):
                raise ValueError(kind)
            script.setdefault(int(step), []).append(f"bad:{kind}")
    except ValueError:
        parser.error("--takeover is START:END, --teleop-jolt STEP, --teleop-bad STEP:nan|size (steps: integers)")
    if script and not args.expert_teleop:
        parser.error("--takeover, --teleop-jolt, --teleop-bad and --operator-stop script the operator: they need "
                     "--expert-teleop")
    node = TwinNode(load_robot_config(args.robot, parse_set_overrides(args.set)), mode=args.mode, expert_teleop=args.expert_teleop,
                    expert_noise=args.expert_noise, seed=args.seed, verbose=not args.quiet, operator_script=script)

    def stop(*_: Any) -> None:
        node.stop.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    node.run()
    return 0


if __name__ == "__main__":
    sys.exit(main([arg for arg in sys.argv[1:] if ":=" not in arg]))
