"""Robot descriptions: ``real_robot/<robot>.yaml`` -> :class:`RobotConfig`.

A robot YAML says which sim task the robot mirrors (its observation keys, action size and horizon come from
``envs/<task>.yaml``), which ROS topic and message field gives each observation key, which topic takes
commands, how episodes are reset and judged, the control rate, and the safety limits. See
``real_robot/README.md`` for a commented example. Every error names the file and the field.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from robofinetune.envs.spec import TaskSource, TaskSpec, load_task_spec, register_task_source
from robofinetune.errors import TaskError
from robofinetune.robot.errors import RobotConfigError
from robofinetune.robot.messages import (BOOL, DEFAULT_FIELD, FIELDS, IMAGE, IMAGE_CHANNELS, JOINT_STATE,
                                         SUPPORTED_COMMAND_TYPES, SUPPORTED_OBSERVATION_TYPES, canonical_type)
from robofinetune.robot.safety import BoxLimitConfig, SafetyConfig

SYNC_MODES = ("rate", "observation", "lockstep")
RESET_MODES = ("topic", "operator", "none")
TRANSPORTS = ("rospy", "rosbridge")
TWIN_MODES = ("lockstep", "realtime")


@dataclass
class ObservationSource:
    """Where one observation key comes from: ``topic`` (of ``type``), ``field`` of it, optionally ``joints`` /
    ``index`` to pick elements. ``shape`` is the key's shape (from the task spec, or given for extra keys)."""

    key: str
    topic: str
    type: str
    field: str
    shape: tuple[int, ...]
    joints: list[str] | None = None
    index: list[int] | None = None
    encoding: str = "rgb8"  # images only: what the camera (or the twin) publishes; anything else is refused
    flip_rows: bool = False  # images only: reverse the row order (ROS top-first <-> robosuite's bottom-up)

    @property
    def is_image(self) -> bool:
        return self.type == IMAGE


@dataclass
class CommandSpec:
    """The command topic. The action a in [-1, 1] is sent as ``offset + scale * a`` (robot units)."""

    topic: str
    type: str = "std_msgs/Float64MultiArray"
    field: str | None = None
    joints: list[str] | None = None
    scale: list[float] | None = None
    offset: list[float] | None = None


@dataclass
class SuccessSpec:
    """A ``std_msgs/Bool`` topic that is true when the task is done. ``every_step``: the robot publishes it
    with every observation, so the loop waits for it as it waits for observations."""

    topic: str
    type: str = BOOL
    every_step: bool = False


@dataclass
class ResetSpec:
    """How an episode starts. ``topic``: publish a JSON request ``{"id", "seed"}`` (std_msgs/String) on
    ``request_topic`` and wait for the same id on ``done_topic`` (the twin does this; so can a robot-side
    reset script). ``operator``: a person resets the scene and confirms. ``none``: start from wherever it is."""

    mode: str = "operator"
    request_topic: str = "/robofinetune/reset"
    done_topic: str = "/robofinetune/reset_done"
    timeout: float = 30.0


@dataclass
class EStopSpec:
    """An e-stop topic (std_msgs/Bool; true engages, latched until false) and a key for the operator."""

    topic: str | None = "/robofinetune/estop"
    key: str | None = "space"


@dataclass
class TeleopSpec:
    """Topics of the ``ros-topic`` teleop source and device settings of the others."""

    action_topic: str = "/robofinetune/teleop/action"
    event_topic: str = "/robofinetune/teleop/event"
    spacemouse_device: str | None = None      # /dev/hidrawN; found by vendor id when None
    spacemouse_scale: float = 350.0           # raw axis value that maps to 1.0
    keyboard_step: float = 1.0                # action magnitude of a motion key


@dataclass
class TwinSpec:
    """Settings only the MuJoCo twin node reads (``real_robot/mujoco_twin_node.py``)."""

    mode: str = "realtime"                    # realtime: steps at control_rate on its own clock; lockstep: per command
    pause_topic: str = "/robofinetune/twin/pause"  # std_msgs/Bool: true stops publishing (a dead driver)
    command_timeout: float = 0.5              # realtime: hold (zero action) when the last command is older
    expert_noise: float = 0.0                 # --expert-teleop: operator noise of the scripted expert


@dataclass
class RobotConfig:
    name: str
    task: TaskSpec
    observations: dict[str, ObservationSource]
    command: CommandSpec
    extra_observations: dict[str, ObservationSource] = field(default_factory=dict)
    transport: str = "rospy"
    rosbridge_host: str = "127.0.0.1"
    rosbridge_port: int = 9090
    ros_version: int = 1
    node_name: str = "robofinetune"
    control_rate: float = 20.0
    sync: str = "rate"
    max_episode_steps: int = 0                # 0 = the task's horizon
    success: SuccessSpec | None = None
    reset: ResetSpec = field(default_factory=ResetSpec)
    estop: EStopSpec = field(default_factory=EStopSpec)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    teleop: TeleopSpec = field(default_factory=TeleopSpec)
    twin: TwinSpec = field(default_factory=TwinSpec)
    description: str = ""
    # the policy this robot runs now; `deploy` runs another only if it passed the OPE gate against this one
    incumbent: Path | None = None
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def horizon(self) -> int:
        return self.max_episode_steps or self.task.horizon

    @property
    def action_dim(self) -> int:
        return self.task.action_dim

    @property
    def all_observations(self) -> dict[str, ObservationSource]:
        return {**self.observations, **self.extra_observations}

    def topics(self) -> dict[str, str]:
        """Observation topic -> message type (each topic once, in first-use order)."""
        result: dict[str, str] = {}
        for source in self.all_observations.values():
            result.setdefault(source.topic, source.type)
        return result

    @property
    def env_meta(self) -> dict[str, Any]:
        """What datasets recorded on this robot store as env metadata (the task name makes them trainable)."""
        return {"env_name": self.task.name, "task": self.task.name, "env_type": 3, "robot": self.name,
                "robot_config": str(self.source) if self.source else None, "control_rate": self.control_rate,
                "env_kwargs": {}}


# --- parsing ---------------------------------------------------------------------------------------------------


class _Reader:
    """Typed access to one mapping of the YAML, raising errors that name the file and the dotted field."""

    def __init__(self, values: Any, where: str, prefix: str = "") -> None:
        self.where, self.prefix = where, prefix
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise RobotConfigError(f"{where}: field '{prefix.rstrip('.') or '(top)'}' must be a mapping, "
                                   f"got {type(values).__name__}")
        self.values = values
        self.used: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def error(self, key: str, message: str) -> RobotConfigError:
        return RobotConfigError(f"{self.where}: field '{self.name(key)}' {message}")

    def has(self, key: str) -> bool:
        return key in self.values and self.values[key] is not None

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.values.get(key, default)

    def required(self, key: str) -> Any:
        self.used.add(key)
        if key not in self.values or self.values[key] is None:
            raise self.error(key, "is required")
        return self.values[key]

    def string(self, key: str, default: str | None = None, choices: tuple[str, ...] | None = None,
               required: bool = False) -> str | None:
        value = self.required(key) if required else self.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {value!r}")
        if choices and value not in choices:
            raise self.error(key, f"must be one of {list(choices)}, got {value!r}")
        return value

    def number(self, key: str, default: float | None = None, positive: bool = False,
               non_negative: bool = False) -> float | None:
        value = self.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, got {value!r}")
        if positive and value <= 0:
            raise self.error(key, f"must be > 0, got {value!r}")
        if non_negative and value < 0:
            raise self.error(key, f"must be >= 0, got {value!r}")
        return float(value)

    def integer(self, key: str, default: int | None = None) -> int | None:
        value = self.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def numbers(self, key: str, length: int | None = None, allow_none_items: bool = False,
                scalar_ok: bool = False) -> list[Any] | None:
        value = self.get(key)
        if value is None:
            return None
        if scalar_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * (length or 1)
        if not isinstance(value, (list, tuple)):
            raise self.error(key, f"must be a list of numbers, got {value!r}")
        for item in value:
            ok = (item is None and allow_none_items) or (isinstance(item, (int, float)) and not isinstance(item, bool))
            if not ok:
                raise self.error(key, f"must be a list of numbers, got item {item!r}")
        if length is not None and len(value) != length:
            raise self.error(key, f"must have {length} entries, got {len(value)}")
        return [None if item is None else float(item) for item in value]

    def ints(self, key: str) -> list[int] | None:
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise self.error(key, f"must be a list of integers, got {value!r}")
        return list(value)

    def strings(self, key: str) -> list[str] | None:
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not all(isinstance(i, str) for i in value):
            raise self.error(key, f"must be a list of strings, got {value!r}")
        return list(value)

    def section(self, key: str) -> _Reader:
        self.used.add(key)
        return _Reader(self.values.get(key), self.where, f"{self.prefix}{key}.")

    def check_unknown(self) -> None:
        unknown = sorted(set(self.values) - self.used)
        if unknown:
            raise RobotConfigError(f"{self.where}: unknown field(s) {[self.name(k) for k in unknown]}; "
                                   f"known here: {sorted(self.used)}")


def _observation_source(key: str, reader: _Reader, shape: tuple[int, ...] | None) -> ObservationSource:
    msg_type = canonical_type(reader.string("type", required=True))
    if msg_type not in SUPPORTED_OBSERVATION_TYPES:
        raise reader.error("type", f"must be one of {list(SUPPORTED_OBSERVATION_TYPES)}, got {msg_type!r}")
    field_name = reader.string("field", DEFAULT_FIELD[msg_type])
    if field_name not in FIELDS[msg_type]:
        raise reader.error("field", f"for {msg_type} must be one of {list(FIELDS[msg_type])}, got {field_name!r}")
    if shape is None:
        shape_list = reader.ints("shape")
        if not shape_list:
            raise reader.error("shape", "is required for an observation key the task does not define")
        shape = tuple(shape_list)
    else:
        reader.get("shape")
    joints = reader.strings("joints")
    if joints is not None and msg_type != JOINT_STATE:
        raise reader.error("joints", f"only applies to {JOINT_STATE}")
    index = reader.ints("index")
    encoding = reader.string("encoding", "rgb8", choices=tuple(IMAGE_CHANNELS))
    flip_rows = reader.boolean("flip_rows", False)
    if msg_type != IMAGE:
        for name in ("encoding", "flip_rows"):
            if reader.has(name):
                raise reader.error(name, f"only applies to {IMAGE}")
    elif index is not None:
        raise reader.error("index", f"does not apply to {IMAGE} (an image key takes the whole frame)")
    source = ObservationSource(key=key, topic=reader.string("topic", required=True), type=msg_type,
                               field=field_name, shape=tuple(shape), joints=joints, index=index, encoding=encoding,
                               flip_rows=flip_rows)
    if msg_type == IMAGE:
        if len(shape) != 3 or shape[2] != IMAGE_CHANNELS[encoding]:
            raise reader.error("type", f"an Image key needs shape (H, W, {IMAGE_CHANNELS[encoding]}), got {shape}")
    else:
        size = int(math.prod(shape))
        width = len(index) if index is not None else len(joints) if joints is not None else \
            {"position": 3, "orientation": 4, "pose": 7}.get(field_name) if msg_type == "geometry_msgs/PoseStamped" else None
        if width is not None and width != size:
            raise reader.error("index" if index is not None else "joints" if joints is not None else "field",
                               f"selects {width} values but observation '{key}' has shape {shape}")
    reader.check_unknown()
    return source


def _box_limit(reader: _Reader, dims: int) -> BoxLimitConfig:
    low = reader.numbers("low")
    high = reader.numbers("high")
    if low is None or high is None:
        raise reader.error("low" if low is None else "high", "is required")
    if len(low) != len(high):
        raise reader.error("high", f"has {len(high)} entries but 'low' has {len(low)}")
    if any(lo > hi for lo, hi in zip(low, high)):
        raise reader.error("low", "must be <= high in every entry")
    action_dims = reader.ints("action_dims")
    if action_dims is not None:
        if len(action_dims) != len(low):
            raise reader.error("action_dims", f"needs one action dim per limited element ({len(low)}), got {action_dims}")
        if any(d < 0 or d >= dims for d in action_dims):
            raise reader.error("action_dims", f"entries must be in [0, {dims}), got {action_dims}")
    limit = BoxLimitConfig(key=reader.string("key", required=True), low=low, high=high, action_dims=action_dims,
                           gain=reader.number("gain", 0.0, non_negative=True),
                           velocity_key=reader.string("velocity_key"),
                           lookahead=reader.number("lookahead", 0.0, non_negative=True),
                           index=reader.ints("index"))
    reader.check_unknown()
    return limit


def _safety(reader: _Reader, dims: int, obs_shapes: dict[str, tuple[int, ...]]) -> SafetyConfig:
    def check_key(limit: BoxLimitConfig, name: str) -> None:
        for key in (limit.key, limit.velocity_key):
            if key is not None and key not in obs_shapes:
                raise reader.error(name, f"names observation '{key}', which this robot does not have "
                                         f"(keys: {list(obs_shapes)})")
        width = len(limit.index) if limit.index is not None else int(math.prod(obs_shapes[limit.key]))
        if width != len(limit.low):
            raise reader.error(name, f"limits {len(limit.low)} values but observation '{limit.key}' gives {width}")

    max_delta = reader.numbers("max_delta", length=dims, scalar_ok=True)
    workspace = None
    if reader.has("workspace"):
        workspace = _box_limit(reader.section("workspace"), dims)
        check_key(workspace, "workspace")
    joint_limits = []
    raw_joint_limits = reader.get("joint_limits")
    if raw_joint_limits is not None:
        items = raw_joint_limits if isinstance(raw_joint_limits, list) else [raw_joint_limits]
        for i, item in enumerate(items):
            limit = _box_limit(_Reader(item, reader.where, f"{reader.prefix}joint_limits[{i}]."), dims)
            check_key(limit, f"joint_limits[{i}]")
            joint_limits.append(limit)
    config = SafetyConfig(
        enabled=reader.boolean("enabled", True),
        max_delta=max_delta,
        action_low=reader.numbers("action_low", length=dims),
        action_high=reader.numbers("action_high", length=dims),
        workspace=workspace,
        joint_limits=joint_limits,
        stale_observation_age=reader.number("stale_observation_age", 0.5, positive=True),
        abort_after=reader.number("abort_after", 5.0, positive=True),
        hold_action=reader.numbers("hold_action", length=dims, allow_none_items=True),
    )
    reader.check_unknown()
    return config


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = raw
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RobotConfigError(f"override '{dotted}': '{part}' is not a section")
        node[parts[-1]] = value
    return raw


def load_robot_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RobotConfig:
    """Read and check a robot YAML. ``overrides`` maps dotted field names to values (``{"sync": "lockstep"}``)."""
    path = Path(path)
    if not path.is_file():
        raise RobotConfigError(f"robot file '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RobotConfigError(f"robot file '{path}' is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RobotConfigError(f"robot file '{path}' must hold a mapping of fields")
    if overrides:
        raw = _apply_overrides(raw, overrides)
    where = str(path)
    top = _Reader(raw, where)
    task_name = top.string("task", required=True)
    task_path = (path.parent / task_name) if task_name.endswith((".yaml", ".yml")) else task_name
    try:
        task = load_task_spec(task_path)
    except TaskError as exc:
        raise RobotConfigError(f"{where}: field 'task': {exc}") from None
    dims = task.action_dim

    obs_reader = top.section("observations")
    observations = {}
    for key, shape in task.obs_shapes.items():
        if key not in obs_reader.values:
            raise RobotConfigError(f"{where}: field 'observations' lacks '{key}', which task '{task.name}' needs "
                                   f"(task keys: {task.obs_keys})")
        observations[key] = _observation_source(key, obs_reader.section(key), shape)
        if key in task.image_keys and observations[key].type != IMAGE:
            raise obs_reader.section(key).error("type", f"must be {IMAGE}: '{key}' is a camera image of task "
                                                        f"'{task.name}' (shape {list(shape)})")
    extra_in_obs = sorted(set(obs_reader.values) - set(task.obs_shapes))
    if extra_in_obs:
        raise RobotConfigError(f"{where}: field 'observations' has keys {extra_in_obs} that task '{task.name}' does "
                               f"not use; list them under 'extra_observations' (with a shape) to record them")
    extra_reader = top.section("extra_observations")
    extra = {key: _observation_source(key, extra_reader.section(key), None) for key in list(extra_reader.values)}
    clash = sorted(set(extra) & set(observations))
    if clash:
        raise RobotConfigError(f"{where}: field 'extra_observations' repeats task keys {clash}")
    types_by_topic: dict[str, str] = {}
    for source in {**observations, **extra}.values():
        known = types_by_topic.setdefault(source.topic, source.type)
        if known != source.type:
            raise RobotConfigError(f"{where}: topic '{source.topic}' is given types {known} and {source.type}")

    cmd = top.section("command")
    cmd_type = canonical_type(cmd.string("type", "std_msgs/Float64MultiArray"))
    if cmd_type not in SUPPORTED_COMMAND_TYPES:
        raise cmd.error("type", f"must be one of {list(SUPPORTED_COMMAND_TYPES)}, got {cmd_type!r}")
    command = CommandSpec(topic=cmd.string("topic", required=True), type=cmd_type, field=cmd.string("field"),
                          joints=cmd.strings("joints"), scale=cmd.numbers("scale", length=dims, scalar_ok=True),
                          offset=cmd.numbers("offset", length=dims, scalar_ok=True))
    if command.joints is not None and len(command.joints) != dims:
        raise cmd.error("joints", f"needs {dims} names (one per action dim), got {len(command.joints)}")
    if command.field is not None and command.field not in FIELDS[cmd_type]:
        raise cmd.error("field", f"for {cmd_type} must be one of {list(FIELDS[cmd_type])}")
    cmd.check_unknown()

    success = None
    if top.has("success"):
        reader = top.section("success")
        success = SuccessSpec(topic=reader.string("topic", required=True), type=canonical_type(reader.string("type", BOOL)),
                              every_step=reader.boolean("every_step", False))
        if success.type != BOOL:
            raise reader.error("type", f"must be {BOOL}")
        reader.check_unknown()

    reader = top.section("reset")
    defaults = ResetSpec()
    reset = ResetSpec(mode=reader.string("mode", defaults.mode, choices=RESET_MODES),
                      request_topic=reader.string("request_topic", defaults.request_topic),
                      done_topic=reader.string("done_topic", defaults.done_topic),
                      timeout=reader.number("timeout", defaults.timeout, positive=True))
    reader.check_unknown()

    reader = top.section("estop")
    # an explicit null disables the topic or the key; a missing field takes the default
    estop = EStopSpec(topic=reader.string("topic", EStopSpec.topic), key=reader.string("key", EStopSpec.key))
    reader.check_unknown()

    obs_shapes = {key: source.shape for key, source in {**observations, **extra}.items()}
    safety = _safety(top.section("safety"), dims, obs_shapes)

    reader = top.section("teleop")
    defaults_teleop = TeleopSpec()
    teleop = TeleopSpec(action_topic=reader.string("action_topic", defaults_teleop.action_topic),
                        event_topic=reader.string("event_topic", defaults_teleop.event_topic),
                        spacemouse_device=reader.string("spacemouse_device"),
                        spacemouse_scale=reader.number("spacemouse_scale", defaults_teleop.spacemouse_scale, positive=True),
                        keyboard_step=reader.number("keyboard_step", defaults_teleop.keyboard_step, positive=True))
    reader.check_unknown()

    reader = top.section("twin")
    defaults_twin = TwinSpec()
    twin = TwinSpec(mode=reader.string("mode", defaults_twin.mode, choices=TWIN_MODES),
                    pause_topic=reader.string("pause_topic", defaults_twin.pause_topic),
                    command_timeout=reader.number("command_timeout", defaults_twin.command_timeout, positive=True),
                    expert_noise=reader.number("expert_noise", defaults_twin.expert_noise, non_negative=True))
    reader.check_unknown()

    reader = top.section("rosbridge")
    rosbridge_host = reader.string("host", "127.0.0.1")
    rosbridge_port = reader.integer("port", 9090)
    ros_version = reader.integer("ros_version", 1)
    if ros_version not in (1, 2):
        raise reader.error("ros_version", f"must be 1 or 2, got {ros_version}")
    reader.check_unknown()

    incumbent = top.string("incumbent")
    config = RobotConfig(
        name=top.string("name", path.stem),
        incumbent=(path.parent / incumbent).resolve() if incumbent else None,
        description=top.string("description", ""),
        task=task,
        observations=observations,
        extra_observations=extra,
        command=command,
        transport=top.string("transport", "rospy", choices=TRANSPORTS),
        rosbridge_host=rosbridge_host,
        rosbridge_port=rosbridge_port,
        ros_version=ros_version,
        node_name=top.string("node_name", "robofinetune"),
        control_rate=top.number("control_rate", float(task.control_freq), positive=True),
        sync=top.string("sync", "rate", choices=SYNC_MODES),
        max_episode_steps=top.integer("max_episode_steps", 0),
        success=success,
        reset=reset,
        estop=estop,
        safety=safety,
        teleop=teleop,
        twin=twin,
        source=path.resolve(),
        raw=raw,
    )
    top.check_unknown()
    if config.max_episode_steps < 0:
        raise top.error("max_episode_steps", "must be >= 0")
    if config.sync == "lockstep" and config.reset.mode == "operator":
        raise top.error("sync", "lockstep needs a robot that steps on command (a twin); it cannot be used with "
                                "reset.mode operator")
    return config


def is_robot_config(path: str | Path) -> bool:
    """True for a YAML file that describes a robot (it has a ``task`` and ``observations`` with topics)."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return False
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "task" in raw and "observations" in raw and "command" in raw


def robot_task_spec(path: str | Path) -> TaskSpec:
    """The sim task a robot YAML mirrors (observation keys, action dim, horizon)."""
    return load_robot_config(path).task


def _make_robot_env(path: str | Path, seed: int | None = None, **overrides: Any):
    from robofinetune.robot.env import make_robot_env  # robot.env imports this module

    return make_robot_env(path, seed=seed, **overrides)


# A robot YAML stands for the sim task it mirrors: load_task_spec gives that task, make_env a connected RobotEnv,
# make_vector_env exactly one of it (one robot).
register_task_source(TaskSource(name="robot", claims=is_robot_config, task_spec=robot_task_spec,
                                make_env=_make_robot_env, single_env=True))
