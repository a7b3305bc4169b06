"""ROS bags (ROS 1 ``.bag``, ROS 2 folders, ``.mcap`` / ``.db3`` files) -> episodes, through a robot YAML.

    robofinetune data convert RUN.bag DEST.hdf5 --robot=real_robot/can_twin.yaml
    robofinetune data info RUN.bag --robot=real_robot/can_twin.yaml

The robot YAML (``robofinetune.robot.config``) already says which topic and field gives each observation key
and how an action becomes a command; the same map reads a bag. Bags are read with the ``rosbags`` package (no
ROS install needed). The rules:

* **clock**: every message is placed at the time the recorder received it (the bag's own timestamp: one clock
  for all topics, the one the live robot loop measures staleness with); ``clock="header"`` uses
  ``header.stamp`` instead for message types that carry a header (needs synchronised clocks). A recorder
  stamps each topic when its own subscriber gets the message, so an answer that comes within a few ms of the
  command it answers (a lockstep twin) can land before that command: the step then shows the next observation
  (measured on the pointmass twin under load: a few steps in a hundred, never more than one step off).
* **ticks** (one per step): the command messages' times (``ticks="command"``: one command is one control step,
  as ``deploy`` and ``record`` send them), or a fixed clock at the YAML's ``control_rate`` from an episode's
  first to its last command (``ticks="rate"``: for commands streamed at another rate, e.g. 100 Hz teleop).
  ``auto`` takes the commands when the robot runs in lockstep or their median interval is within 25 % of the
  control period, else the fixed clock.
* **sampling**: at each tick every observation key, the action and the success flag take the newest message at
  or before the tick (zero-order hold). A tick where an observation (or, on the fixed clock, the command) is
  older than ``safety.stale_observation_age``, or has not arrived yet, is dropped and counted.
* **action**: the command's values in robot units, back in the policy's [-1, 1] units:
  ``action = (command - offset) / scale`` (the inverse of ``RobotEnv._publish``: ``command = offset + scale *
  action``).
* **episodes**: split at each message of the episode topic (``--episode-topic``, else the YAML's
  ``reset.request_topic`` or ``reset.done_topic`` when the bag holds one), at a gap of more than ``gap``
  seconds between commands, or not at all (one episode per bag). A step's outcome is read at the next tick
  (the last tick + one control period for an episode's last step): an episode ends at the first step after
  which the success topic said true (at the next tick, or in a message between the two ticks); its final
  observation is the one at that next tick.

Errors are :class:`BagError` (a :class:`~robofinetune.errors.DatasetError`) naming the bag, the topic and the
field: a topic the YAML needs that the bag lacks, a message type that does not match the YAML, a message of the
wrong size, timestamps going backwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robofinetune.data._util import SUCCESS_SOURCE_KEY, SUCCESS_UNKNOWN
from robofinetune.data.episode import Episode
from robofinetune.errors import DatasetError

BAG_SUFFIXES = (".bag", ".mcap", ".db3")
TICK_MODES = ("auto", "command", "rate")
CLOCKS = ("receive", "header")
SPLIT_MODES = ("auto", "topic", "gap", "none")
NS = 1_000_000_000


class BagError(DatasetError):
    """A bag does not hold what the robot YAML says (missing topic, wrong type or size, time going backwards)."""


@dataclass
class BagOptions:
    """How a bag becomes episodes (see the module docstring for each rule)."""

    ticks: str = "auto"                 # auto | command | rate
    clock: str = "receive"              # receive | header
    split: str = "auto"                 # auto | topic | gap | none
    episode_topic: str | None = None    # a message on it starts an episode; default: the YAML's reset topics
    gap: float = 1.0                    # seconds without a command that end an episode (split auto/gap)

    def check(self) -> None:
        for name, value, choices in (("ticks", self.ticks, TICK_MODES), ("clock", self.clock, CLOCKS),
                                     ("split", self.split, SPLIT_MODES)):
            if value not in choices:
                raise DatasetError(f"bag import option '{name}' must be one of {list(choices)}, got {value!r}")
        if not (self.gap > 0):
            raise DatasetError(f"bag import option 'gap' must be > 0 seconds, got {self.gap!r}")


@dataclass
class BagReport:
    """What one bag gave: episodes, steps, how they were found, what was dropped, observation ages."""

    bag: str
    episodes: int = 0
    successes: int = 0
    steps: int = 0
    ticks: str = ""
    split: str = ""
    episode_topic: str | None = None
    dropped_stale: int = 0              # ticks dropped: an observation older than the staleness limit
    dropped_waiting: int = 0            # ticks dropped: a topic had not delivered its first message yet
    messages: int = 0                   # messages read (the topics the robot YAML uses)
    bytes: int = 0                      # size of the bag on disk
    actions_out_of_range: int = 0       # steps with an action outside [-1, 1] (kept, reported)
    observation_age_ms: dict[str, float | None] = field(default_factory=dict)
    success_known: bool = True
    notes: list[str] = field(default_factory=list)
    # per episode (in the order returned), the age in ms of the oldest observation key at each step's tick: what
    # observation_age_ms summarises, for figures over a subset of the episodes
    tick_ages_ms: list[np.ndarray] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        success = f"{self.successes} successful" if self.success_known else "success unknown"
        text = (f"{self.bag}: {self.episodes} episode{'s' * (self.episodes != 1)} ({success}), {self.steps} steps; "
                f"ticks: {self.ticks}; "
                f"split: {self.split}" + (f" on {self.episode_topic}" if self.episode_topic else ""))
        dropped = self.dropped_stale + self.dropped_waiting
        if dropped:
            text += f"; {dropped} ticks dropped ({self.dropped_stale} stale, {self.dropped_waiting} before a topic's first message)"
        age = self.observation_age_ms
        if age.get("median") is not None:
            text += f"; observation age median {age['median']:.1f} ms, max {age['max']:.1f} ms"
        lines = [text]
        if self.actions_out_of_range:
            lines.append(f"  warning: {self.actions_out_of_range} steps have actions outside [-1, 1] after inverting "
                         f"command.scale/offset (kept as they are)")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


# --- opening bags ----------------------------------------------------------------------------------------------


def is_bag(path: str | os.PathLike) -> bool:
    """A ROS 1 ``.bag``, a ROS 2 storage file (``.mcap``, ``.db3``) or a ROS 2 bag folder (``metadata.yaml``)."""
    path = Path(path)
    if path.is_dir():
        return (path / "metadata.yaml").is_file()
    return path.suffix.lower() in BAG_SUFFIXES or path.name.endswith(".bag.active")


def bag_kind(path: str | os.PathLike) -> str:
    path = Path(path)
    if path.is_dir():
        storages = sorted({p.suffix for p in path.iterdir() if p.suffix in (".mcap", ".db3")})
        return "ROS 2 bag (" + (", ".join(s.lstrip(".") for s in storages) or "folder") + ")"
    return {".bag": "ROS 1 bag", ".mcap": "ROS 2 bag (mcap)", ".db3": "ROS 2 bag (sqlite3)"}.get(
        path.suffix.lower(), "bag")


def _size_on_disk(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


@contextlib.contextmanager
def open_bag(path: str | os.PathLike) -> Iterator[Any]:
    """An open ``rosbags`` AnyReader; any failure to read is a :class:`BagError` naming the bag."""
    from rosbags.highlevel import AnyReader, AnyReaderError

    path = Path(path)
    if not path.exists():
        raise BagError(f"{path}: not found")
    if path.name.endswith(".active"):
        raise BagError(f"{path}: an unfinished recording (the recorder was killed); run `rosbag reindex {path}` "
                       f"and rename it to .bag")
    try:
        reader = AnyReader([path])
        reader.open()
    except (AnyReaderError, FileNotFoundError, ValueError, KeyError, OSError) as exc:
        raise BagError(f"{path}: cannot read it as a ROS bag: {exc}") from None
    try:
        yield reader
    finally:
        reader.close()


def canonical(msgtype: str | None) -> str | None:
    from robofinetune.robot.messages import canonical_type

    return canonical_type(msgtype) if msgtype else None


def _topic_table(reader: Any) -> dict[str, dict[str, Any]]:
    """topic -> {type (canonical; None when publishers disagree), count, connections}."""
    table = {}
    for topic, info in reader.topics.items():
        table[topic] = {"type": canonical(info.msgtype), "count": int(info.msgcount),
                        "connections": list(info.connections),
                        "types": sorted({canonical(c.msgtype) for c in info.connections})}
    return table


# --- rosbags message objects <-> the dict form of robofinetune.robot.messages ------------------------------------


def message_to_dict(message: Any) -> Any:
    """A deserialised ``rosbags`` message as the dict form ``decode_field`` reads (``uint8[]`` stays an array)."""
    if dataclasses.is_dataclass(message):
        return {f.name: message_to_dict(getattr(message, f.name)) for f in dataclasses.fields(message)
                if not f.name.startswith("__")}
    if isinstance(message, np.ndarray):
        return message if message.dtype == np.uint8 else message.tolist()
    if isinstance(message, list):
        return [message_to_dict(item) for item in message]
    return message


_NUMPY_TYPES = {"bool": np.bool_, "byte": np.uint8, "char": np.uint8, "int8": np.int8, "uint8": np.uint8,
                "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32, "int64": np.int64,
                "uint64": np.uint64, "float32": np.float32, "float64": np.float64}
_TIME_TYPES = ("builtin_interfaces/msg/Time", "builtin_interfaces/msg/Duration")


def message_from_dict(typestore: Any, msgtype: str, values: dict[str, Any] | None) -> Any:
    """A ``rosbags`` message of ``msgtype`` from the dict form (``encode_fields``' output): missing fields
    default, ``{secs, nsecs}`` times become ``{sec, nanosec}``, ROS 1 ``header.seq`` is dropped for ROS 2."""
    from rosbags.interfaces import Nodetype

    from robofinetune.robot.messages import ros2_type

    msgtype = ros2_type(msgtype) if "/msg/" not in msgtype else msgtype
    values = dict(values or {})
    if msgtype in _TIME_TYPES:
        values = {"sec": values.get("sec", values.get("secs", 0)),
                  "nanosec": values.get("nanosec", values.get("nsecs", 0))}
    _, fields = typestore.fielddefs[msgtype]

    def convert(nodetype: int, desc: Any, value: Any) -> Any:
        if nodetype == Nodetype.BASE:
            name = desc[0]
            if name == "string":
                return "" if value is None else str(value)
            if value is None:
                return False if name == "bool" else 0.0 if name.startswith("float") else 0
            return bool(value) if name == "bool" else float(value) if name.startswith("float") else int(value)
        if nodetype == Nodetype.NAME:
            return message_from_dict(typestore, desc, value)
        (sub_nodetype, sub_desc), count = desc
        if sub_nodetype == Nodetype.BASE and sub_desc[0] != "string":
            dtype = _NUMPY_TYPES[sub_desc[0]]
            if isinstance(value, (bytes, bytearray, memoryview)):
                array = np.frombuffer(bytes(value), dtype=dtype).copy()
            else:
                array = np.asarray([] if value is None else value, dtype=dtype).reshape(-1)
            if count and len(array) != count:
                array = np.resize(array, count) if len(array) else np.zeros(count, dtype=dtype)
            return array
        items = list(value or [])
        return [convert(sub_nodetype, sub_desc, item) for item in items]

    kwargs = {name: convert(nodetype, desc, values.get(name)) for name, (nodetype, desc) in fields}
    return typestore.types[msgtype](**kwargs)


class BagWriter:
    """Write messages given in the dict form into a ROS 1 ``.bag`` or a ROS 2 bag (sqlite3 folder or mcap).

    ``with BagWriter(path, ros_version=2, storage="mcap") as bag: bag.write(topic, msgtype, t_ns, values)``.
    Used by the tests and benchmarks to make bags exactly as a robot would publish them.
    """

    def __init__(self, path: str | os.PathLike, ros_version: int = 1, storage: str = "sqlite3") -> None:
        from rosbags.typesys import Stores, get_typestore

        self.path, self.ros_version = Path(path), ros_version
        if ros_version == 1:
            from rosbags.rosbag1 import Writer

            self.typestore = get_typestore(Stores.ROS1_NOETIC)
            self.writer = Writer(self.path)
        else:
            from rosbags.rosbag2 import StoragePlugin, Writer

            self.typestore = get_typestore(Stores.ROS2_HUMBLE)
            plugin = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}[storage]
            self.writer = Writer(self.path, version=9, storage_plugin=plugin)
        self.connections: dict[str, Any] = {}

    def __enter__(self) -> BagWriter:
        self.writer.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.writer.close()

    def write(self, topic: str, msgtype: str, time_ns: int, values: dict[str, Any]) -> None:
        from robofinetune.robot.messages import ros2_type

        msgtype = ros2_type(msgtype)
        if topic not in self.connections:
            self.connections[topic] = self.writer.add_connection(topic, msgtype, typestore=self.typestore)
        message = message_from_dict(self.typestore, msgtype, values)
        data = (self.typestore.serialize_ros1(message, msgtype) if self.ros_version == 1
                else self.typestore.serialize_cdr(message, msgtype))
        self.writer.write(self.connections[topic], int(time_ns), data)


# --- what the robot YAML needs from a bag ------------------------------------------------------------------------


def _yaml_roles(robot: Any) -> list[tuple[str, str, str | None]]:
    """(topic, role, expected type) for every topic the converter reads, in YAML order."""
    from robofinetune.robot.messages import BOOL

    roles = []
    for section, sources in (("observations", robot.observations), ("extra_observations", robot.extra_observations)):
        for key, source in sources.items():
            roles.append((source.topic, f"{section}.{key}", source.type))
    roles.append((robot.command.topic, "command", robot.command.type))
    if robot.success is not None:
        roles.append((robot.success.topic, "success", BOOL))
    roles.append((robot.reset.request_topic, "reset.request_topic", None))
    roles.append((robot.reset.done_topic, "reset.done_topic", None))
    return roles


def _robot(robot: Any) -> Any:
    from robofinetune.robot.config import RobotConfig, load_robot_config

    return robot if isinstance(robot, RobotConfig) else load_robot_config(robot)


def _yaml_name(robot: Any) -> str:
    return str(robot.source) if robot.source else robot.name


def _check_topic(bag: Path, robot: Any, table: dict[str, dict[str, Any]], topic: str, role: str,
                 expected: str | None) -> None:
    """The bag holds ``topic`` with messages of the type the YAML gives it."""
    where = f"{_yaml_name(robot)} field '{role}'"
    info = table.get(topic)
    if info is None or info["count"] == 0:
        have = sorted(t for t, i in table.items() if i["count"])
        state = "is not in the bag" if info is None else "has no messages in the bag"
        raise BagError(f"{bag}: topic '{topic}' ({where}) {state}; the bag has topics {have}")
    if expected is not None and info["types"] != [expected]:
        raise BagError(f"{bag}: topic '{topic}' is {' and '.join(t or '?' for t in info['types'])} in the bag, but "
                       f"{_yaml_name(robot)} field '{role}.type' says {expected}")


# --- reading the streams ---------------------------------------------------------------------------------------


@dataclass
class _Stream:
    """One topic's messages in time order: times (ns, on the chosen clock) and what each gave."""

    topic: str
    times: list[int] = field(default_factory=list)
    values: dict[str, list[np.ndarray]] = field(default_factory=dict)   # observation key -> one array per message
    flags: list[bool] = field(default_factory=list)                      # success
    payloads: list[Any] = field(default_factory=list)                    # episode topic: the message's data field
    last_stamp: int | None = None
    last_stamp_index: int = -1

    def array_times(self) -> np.ndarray:
        return np.asarray(self.times, dtype=np.int64)


def _stamp_ns(message: Any) -> int | None:
    header = getattr(message, "header", None)
    stamp = getattr(header, "stamp", None)
    if stamp is None:
        return None
    return int(stamp.sec) * NS + int(stamp.nanosec)


def _seconds(bag_start: int, t: int) -> str:
    return f"{(t - bag_start) / NS:.3f} s"


def _read_streams(bag: Path, reader: Any, robot: Any, topics: dict[str, str], options: BagOptions,
                  table: dict[str, dict[str, Any]]) -> tuple[dict[str, _Stream], int, int]:
    """Deserialise and decode every message of ``topics`` (topic -> role kind: obs | command | success |
    episode); returns the streams, the bag's start time and the number of messages read."""
    from robofinetune.robot.messages import MessageError, decode_command, decode_field

    sources_by_topic: dict[str, list[Any]] = {}
    for source in robot.all_observations.values():
        sources_by_topic.setdefault(source.topic, []).append(source)
    sections = {key: "observations" for key in robot.observations}
    sections.update({key: "extra_observations" for key in robot.extra_observations})
    command = robot.command
    dims = robot.action_dim
    scale = np.asarray(command.scale if command.scale is not None else [1.0] * dims, dtype=np.float64)
    offset = np.asarray(command.offset if command.offset is not None else [0.0] * dims, dtype=np.float64)
    if np.any(scale == 0):
        raise BagError(f"{_yaml_name(robot)}: field 'command.scale' has a 0 entry ({scale.tolist()}): the command "
                       f"cannot be turned back into an action")

    streams = {topic: _Stream(topic) for topic in topics}
    connections = [c for topic in topics for c in table[topic]["connections"]]
    start = reader.start_time
    count = 0
    for connection, received, raw in reader.messages(connections=connections):
        topic = connection.topic
        kind = topics[topic]
        stream = streams[topic]
        index = len(stream.times)
        at = f"message {index} (t={_seconds(start, received)})"
        try:
            message = reader.deserialize(raw, connection.msgtype)
        except Exception as exc:  # rosbags raises its own error types for corrupt data
            raise BagError(f"{bag}: topic '{topic}': {at} cannot be deserialised as {connection.msgtype}: {exc}") from None
        count += 1
        stamp = _stamp_ns(message)
        if stamp:
            # a clock that jumps back (a replayed or merged bag, an NTP step) makes "newest at or before" meaningless
            if stream.last_stamp is not None and stamp < stream.last_stamp:
                raise BagError(f"{bag}: topic '{topic}' field 'header.stamp': timestamps go backwards: {at} is "
                               f"stamped {(stream.last_stamp - stamp) / NS:.6f} s before message "
                               f"{stream.last_stamp_index}")
            stream.last_stamp, stream.last_stamp_index = stamp, index
        t = stamp if (options.clock == "header" and stamp) else int(received)
        if stream.times and t < stream.times[-1]:
            raise BagError(f"{bag}: topic '{topic}' field '{'header.stamp' if t == stamp else 'receive time'}': "
                           f"timestamps go backwards at {at}")
        values = message_to_dict(message)
        if kind == "obs":
            for source in sources_by_topic[topic]:
                role = f"{sections[source.key]}.{source.key}"
                where = f"{bag}: topic '{topic}' ({role}, field '{source.field}'): {at}"
                try:
                    value = decode_field(source.type, values, field=source.field, joints=source.joints,
                                         index=source.index, where=where)
                except MessageError as exc:
                    raise BagError(str(exc)) from None
                if source.is_image:
                    if value.shape != tuple(source.shape):
                        raise BagError(f"{where}: the image is {'x'.join(map(str, value.shape))} (H x W x C), "
                                       f"but {_yaml_name(robot)} gives '{source.key}' shape {list(source.shape)}")
                    if source.flip_rows:  # the robot YAML's row order, as RobotEnv applies it live
                        value = np.ascontiguousarray(value[::-1])
                else:
                    size = int(math.prod(source.shape))
                    if value.size != size:
                        raise BagError(f"{where}: has {value.size} values, but '{source.key}' has shape "
                                       f"{list(source.shape)} ({size} values)")
                    if not np.all(np.isfinite(value)):
                        raise BagError(f"{where}: contains NaN or inf")
                    value = value.reshape(source.shape)
                stream.values.setdefault(source.key, []).append(value)
        elif kind == "command":
            where = f"{bag}: topic '{topic}' (command, field '{command.field or 'data'}'): {at}"
            try:
                value = decode_command(command.type, values, field=command.field, joints=command.joints)
            except MessageError as exc:
                raise BagError(f"{where}: {exc}") from None
            if value.size != dims:
                raise BagError(f"{where}: has {value.size} values, but task '{robot.task.name}' has {dims} action "
                               f"dims")
            if not np.all(np.isfinite(value)):
                raise BagError(f"{where}: contains NaN or inf")
            stream.values.setdefault("action", []).append((value - offset) / scale)
        elif kind == "success":
            stream.flags.append(bool(values.get("data")))
        else:
            stream.payloads.append(values.get("data") if isinstance(values, dict) else None)
        stream.times.append(t)
    return streams, start, count


# --- ticks, sampling, episodes ---------------------------------------------------------------------------------


def _newest_at_or_before(times: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Index of the newest message at or before each time in ``t`` (-1: none yet)."""
    return np.searchsorted(times, t, side="right") - 1


def _segments(command_times: np.ndarray, split: str, episode_times: np.ndarray, gap_ns: int, period_ns: int,
              start: int, end: int) -> list[tuple[int, int]]:
    """[lo, hi) time spans, one per episode candidate. A topic split cuts at each episode message; a gap split
    one control period after the last command before the gap (so that command's outcome still belongs to it)."""
    if split == "topic":
        cuts = [int(t) for t in episode_times]
    elif split == "gap":
        cuts = [int(command_times[i]) + period_ns + 1 for i in np.nonzero(np.diff(command_times) > gap_ns)[0]]
    else:
        cuts = []
    bounds = sorted({start, end + 1, *(c for c in cuts if start < c <= end)})
    return list(zip(bounds[:-1], bounds[1:]))


def _choose_ticks(options: BagOptions, robot: Any, command_times: np.ndarray, gap_ns: int) -> tuple[str, str]:
    """(mode, why)."""
    period = 1.0 / robot.control_rate
    intervals = np.diff(command_times)
    intervals = intervals[(intervals > 0) & (intervals <= gap_ns)] / NS
    median = float(np.median(intervals)) if len(intervals) else None
    rate_text = f"commands at {1 / median:.1f} Hz" if median else "fewer than 2 commands"
    if options.ticks != "auto":
        return options.ticks, f"{options.ticks} (asked; {rate_text}, control_rate {robot.control_rate:g} Hz)"
    if robot.sync == "lockstep":
        return "command", f"command (lockstep robot: one step per command; {rate_text})"
    if median is None or abs(median - period) <= 0.25 * period:
        return "command", f"command ({rate_text}, control_rate {robot.control_rate:g} Hz)"
    return "rate", f"rate ({rate_text}, resampled to control_rate {robot.control_rate:g} Hz)"


def _seed_of(payload: Any) -> Any:
    """The seed a reset request carries (``{"id", "seed"}`` JSON, as RobotEnv publishes it), else None."""
    if isinstance(payload, str):
        with contextlib.suppress(ValueError, TypeError):
            value = json.loads(payload)
            if isinstance(value, dict):
                return value.get("seed")
    return None


def read_bag(bag: str | os.PathLike, robot: Any, options: BagOptions | None = None) -> tuple[list[Episode], BagReport]:
    """The episodes in one bag, read through the robot YAML (a path or a loaded ``RobotConfig``)."""
    options = options or BagOptions()
    options.check()
    robot = _robot(robot)
    bag = Path(bag)
    report = BagReport(bag=str(bag))
    with open_bag(bag) as reader:
        report.bytes = _size_on_disk(bag)
        table = _topic_table(reader)
        topics: dict[str, str] = {}
        for key, source in robot.all_observations.items():
            section = "observations" if key in robot.observations else "extra_observations"
            _check_topic(bag, robot, table, source.topic, f"{section}.{key}", source.type)
            topics[source.topic] = "obs"
        _check_topic(bag, robot, table, robot.command.topic, "command", robot.command.type)
        if robot.command.topic in topics:
            raise BagError(f"{bag}: topic '{robot.command.topic}' is both an observation and the command in "
                           f"{_yaml_name(robot)}")
        topics[robot.command.topic] = "command"
        success_topic = None
        if robot.success is not None:
            if table.get(robot.success.topic, {}).get("count"):
                _check_topic(bag, robot, table, robot.success.topic, "success", robot.success.type)
                success_topic = robot.success.topic
                topics.setdefault(success_topic, "success")
            else:
                report.notes.append(f"success topic '{robot.success.topic}' is not in the bag: success unknown")
        else:
            report.notes.append(f"{_yaml_name(robot)} has no success topic: success unknown")
        report.success_known = success_topic is not None

        split = options.split
        episode_topic = None
        if split in ("auto", "topic"):
            if options.episode_topic:
                _check_topic(bag, robot, table, options.episode_topic, "--episode-topic", None)
                episode_topic = options.episode_topic
            else:
                episode_topic = next((t for t in (robot.reset.request_topic, robot.reset.done_topic)
                                      if table.get(t, {}).get("count")), None)
            if episode_topic is None and split == "topic":
                raise BagError(f"{bag}: split by topic, but neither reset.request_topic '{robot.reset.request_topic}' "
                               f"nor reset.done_topic '{robot.reset.done_topic}' of {_yaml_name(robot)} is in the "
                               f"bag; name one with --episode-topic")
            split = "topic" if episode_topic is not None else "gap"
            if episode_topic is not None and episode_topic in topics:
                raise BagError(f"{bag}: episode topic '{episode_topic}' is also read as {topics[episode_topic]}")
            if episode_topic is not None:
                topics[episode_topic] = "episode"
        report.split, report.episode_topic = split, episode_topic
        streams, bag_start, report.messages = _read_streams(bag, reader, robot, topics, options, table)
        bag_end = max(max(s.times) for s in streams.values() if s.times)
        # header stamps may precede the bag's first receive time
        bag_start = min([bag_start] + [s.times[0] for s in streams.values() if s.times])

    period_ns = int(round(NS / robot.control_rate))
    stale_ns = int(round(robot.safety.stale_observation_age * NS))
    gap_ns = int(round(options.gap * NS))
    if gap_ns <= period_ns:
        raise BagError(f"{bag}: gap {options.gap:g} s must be longer than the control period "
                       f"({1 / robot.control_rate:g} s of {_yaml_name(robot)} field 'control_rate')")
    command = streams[robot.command.topic]
    command_times = command.array_times()
    actions_all = np.asarray(command.values["action"], dtype=np.float64)
    ticks_mode, report.ticks = _choose_ticks(options, robot, command_times, gap_ns)
    obs_topics = [topic for topic, kind in topics.items() if kind == "obs"]
    obs_times = {topic: streams[topic].array_times() for topic in obs_topics}
    success_times = streams[success_topic].array_times() if success_topic else None
    success_flags = np.asarray(streams[success_topic].flags, dtype=bool) if success_topic else None
    # success_true_count[i + 1]: true success messages among the first i + 1 (index -1 -> 0)
    success_true_count = np.r_[0, np.cumsum(success_flags)] if success_topic else None
    episode_stream = streams.get(episode_topic) if episode_topic else None
    episode_times = episode_stream.array_times() if episode_stream else np.array([], dtype=np.int64)
    keys = list(robot.all_observations)
    key_topic = {key: source.topic for key, source in robot.all_observations.items()}

    episodes: list[Episode] = []
    ages_all: list[np.ndarray] = []
    for lo, hi in _segments(command_times, split, episode_times, gap_ns, period_ns, bag_start, bag_end):
        in_span = (command_times >= lo) & (command_times < hi)
        if not np.any(in_span):
            continue
        first, last = command_times[in_span][0], command_times[in_span][-1]
        if ticks_mode == "command":
            ticks = command_times[in_span]
            ticks = ticks[np.r_[ticks[1:] != ticks[:-1], True]]  # two commands at one instant: one step, the newer
        else:
            ticks = first + (np.arange(int((last - first) // period_ns) + 1, dtype=np.int64) * period_ns)
        # the tick after each one: where its outcome (next observation, success) is read
        next_ticks = np.r_[ticks[1:], min(int(ticks[-1]) + period_ns, hi - 1)]
        keep = np.ones(len(ticks), dtype=bool)
        waiting = np.zeros(len(ticks), dtype=bool)
        oldest = np.zeros(len(ticks), dtype=np.int64)
        obs_index = {}
        for topic in obs_topics:
            idx = _newest_at_or_before(obs_times[topic], ticks)
            obs_index[topic] = idx
            # no guard against the previous episode's messages: a robot publishes the reset state before it says
            # reset done (the twin does), and an older message is caught by the staleness limit
            have = idx >= 0
            age = np.where(have, ticks - obs_times[topic][np.maximum(idx, 0)], 0)
            waiting |= ~have
            keep &= have & (age <= stale_ns)
            oldest = np.maximum(oldest, age)
        cmd_index = _newest_at_or_before(command_times, ticks)
        cmd_ok = (cmd_index >= 0) & (command_times[np.maximum(cmd_index, 0)] >= lo)
        cmd_ok &= ticks - command_times[np.maximum(cmd_index, 0)] <= stale_ns
        keep &= cmd_ok
        steps = np.nonzero(keep)[0]
        if len(steps) == 0:
            report.dropped_waiting += int(np.sum(waiting))
            report.dropped_stale += int(np.sum(~keep & ~waiting))
            continue
        success = False
        if success_times is not None:
            # a step succeeded when the success topic reads true at the next tick, or said true at any moment
            # since the step's own tick (a success published once, or followed by a reset before the next tick)
            s_next = _newest_at_or_before(success_times, next_ticks[steps])
            s_here = _newest_at_or_before(success_times, ticks[steps])
            valid = (s_next >= 0) & (success_times[np.maximum(s_next, 0)] >= lo)
            done = valid & success_flags[np.maximum(s_next, 0)]
            done |= success_true_count[s_next + 1] > success_true_count[s_here + 1]
            if np.any(done):
                steps = steps[: int(np.argmax(done)) + 1]
                success = True
        used = slice(0, int(steps[-1]) + 1)   # the ticks up to the episode's end: what was dropped among them
        dropped = int(np.sum(~keep[used]))
        report.dropped_waiting += int(np.sum(waiting[used]))
        report.dropped_stale += int(np.sum(~keep[used] & ~waiting[used]))
        observations = {}
        for key in keys:
            topic = key_topic[key]
            values = streams[topic].values[key]
            dtype = np.uint8 if robot.all_observations[key].is_image else np.float32
            observations[key] = np.stack([values[i] for i in obs_index[topic][steps]]).astype(dtype, copy=False)
        final = {}
        final_time = np.asarray([next_ticks[steps[-1]]], dtype=np.int64)
        for key in keys:
            topic = key_topic[key]
            i = int(_newest_at_or_before(obs_times[topic], final_time)[0])
            dtype = np.uint8 if robot.all_observations[key].is_image else np.float32
            final[key] = np.asarray(streams[topic].values[key][i]).astype(dtype, copy=False)
        actions = actions_all[cmd_index[steps]].astype(np.float32)
        report.actions_out_of_range += int(np.sum(np.any(np.abs(actions) > 1.0 + 1e-6, axis=1)))
        ages = oldest[steps]
        ages_all.append(ages)
        report.tick_ages_ms.append(ages / 1e6)
        metadata: dict[str, Any] = {
            "source": "rosbag", "bag": str(bag), "start_time_s": (int(ticks[steps[0]]) - bag_start) / NS,
            "ticks": ticks_mode, "dropped_ticks": dropped,
            "observation_age_ms": {"median": float(np.median(ages)) / 1e6, "max": float(np.max(ages)) / 1e6},
            SUCCESS_SOURCE_KEY: "robot" if success_topic else SUCCESS_UNKNOWN,
        }
        if episode_stream is not None:
            j = int(_newest_at_or_before(episode_times, np.asarray([lo]))[0])
            if j >= 0 and episode_times[j] == lo:
                seed = _seed_of(episode_stream.payloads[j])
                if seed is not None:
                    metadata["seed"] = seed
        episode = Episode(observations=observations, actions=actions, success=success, final_observation=final,
                          metadata=metadata)
        episode.validate(f"{bag}: episode {len(episodes)}")
        episodes.append(episode)
    report.episodes = len(episodes)
    report.successes = sum(e.success for e in episodes)
    report.steps = sum(len(e) for e in episodes)
    if ages_all:
        ages = np.concatenate(ages_all)
        report.observation_age_ms = {"median": float(np.median(ages)) / 1e6, "max": float(np.max(ages)) / 1e6}
    if not episodes:
        raise BagError(f"{bag}: no episode: no tick of topic '{robot.command.topic}' had fresh observations on "
                       f"{obs_topics} (staleness limit safety.stale_observation_age = "
                       f"{robot.safety.stale_observation_age:g} s)")
    return episodes, report


def convert_bags(bags: Sequence[str | os.PathLike], destination: str | os.PathLike, robot: Any,
                 options: BagOptions | None = None, format: str | None = None) -> tuple[Path, list[BagReport]]:
    """Read every bag (in the order given) and write their episodes to ``destination`` (format from its suffix:
    .hdf5 robomimic, .zarr zarr, *_lerobot LeRobot v3)."""
    from robofinetune.data.io import format_from_suffix, save_dataset

    robot = _robot(robot)
    fmt = format or format_from_suffix(destination)  # a bad destination fails before reading
    episodes: list[Episode] = []
    reports = []
    for bag in bags:
        found, report = read_bag(bag, robot, options)
        episodes.extend(found)
        reports.append(report)
    env_meta = {**robot.env_meta, "source": "rosbag", "bags": [str(b) for b in bags]}
    return save_dataset(episodes, destination, env_meta=env_meta, format=fmt), reports


# --- data info on a bag ----------------------------------------------------------------------------------------


def bag_info(path: str | os.PathLike, robot: Any = None) -> dict[str, Any]:
    """Topics, types, message counts and rates; with a robot YAML, which YAML fields each topic serves and which
    the bag lacks (or holds with another type)."""
    path = Path(path)
    robot = _robot(robot) if robot is not None else None
    with open_bag(path) as reader:
        table = _topic_table(reader)
        times: dict[str, list[int]] = {topic: [] for topic in table}
        for connection, received, _ in reader.messages():
            times[connection.topic].append(received)
        start, end = reader.start_time, reader.end_time
        total = reader.message_count
    roles: dict[str, list[str]] = {}
    missing, mismatched = [], []
    if robot is not None:
        for topic, role, expected in _yaml_roles(robot):
            info = table.get(topic)
            if info is None or info["count"] == 0:
                if not role.startswith("reset."):  # reset topics are optional for the converter
                    missing.append({"field": role, "topic": topic, "type": expected})
                continue
            roles.setdefault(topic, []).append(role)
            if expected is not None and info["types"] != [expected]:
                mismatched.append({"field": role, "topic": topic, "expected": expected, "bag": info["types"]})
    topics = []
    for topic, info in sorted(table.items()):
        intervals = np.diff(np.asarray(times[topic], dtype=np.int64))
        intervals = intervals[intervals > 0]
        # the median interval: the rate while the topic publishes (pauses between episodes do not count)
        rate = NS / float(np.median(intervals)) if len(intervals) else None
        topics.append({"topic": topic, "type": info["type"] or " | ".join(t or "?" for t in info["types"]),
                       "count": info["count"], "rate_hz": rate, "serves": roles.get(topic, [])})
    result: dict[str, Any] = {"path": str(path), "format": bag_kind(path), "bytes": _size_on_disk(path),
                              "duration_s": (end - start) / NS if total else 0.0, "messages": total, "topics": topics}
    if robot is not None:
        result["robot"] = {"name": robot.name, "file": _yaml_name(robot), "control_rate": robot.control_rate,
                           "missing": missing, "type_mismatch": mismatched}
    return result


def format_bag_info(info: dict[str, Any]) -> str:
    lines = [f"{info['path']}  ({info['format']}, {info['bytes'] / 2**20:.2f} MB, {info['duration_s']:.1f} s, "
             f"{len(info['topics'])} topics, {info['messages']} messages)"]
    with_robot = "robot" in info
    rows = [("topic", "type", "count", "rate Hz") + (("serves",) if with_robot else ())]
    for item in info["topics"]:
        rate = "-" if item["rate_hz"] is None else f"{item['rate_hz']:.1f}"
        row = (item["topic"], item["type"], str(item["count"]), rate)
        rows.append(row + ((", ".join(item["serves"]) or "-",) if with_robot else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines.extend("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
    if with_robot:
        robot = info["robot"]
        lines.append(f"robot {robot['name']} ({robot['file']}), control rate {robot['control_rate']:g} Hz")
        if not robot["missing"] and not robot["type_mismatch"]:
            lines.append("  every topic the robot YAML needs is in the bag")
        for item in robot["missing"]:
            lines.append(f"  missing: {item['field']} <- {item['topic']} ({item['type']})")
        for item in robot["type_mismatch"]:
            lines.append(f"  type mismatch: {item['field']} <- {item['topic']}: the YAML says {item['expected']}, "
                         f"the bag has {' | '.join(t or '?' for t in item['bag'])}")
    return "\n".join(lines)


__all__ = ["BagError", "BagOptions", "BagReport", "BagWriter", "bag_info", "convert_bags", "format_bag_info",
           "is_bag", "message_from_dict", "message_to_dict", "open_bag", "read_bag"]

