"""ROS messages <-> numpy arrays, one dict form for both transports.

Both transports hand messages to the robot code as plain dicts shaped like rosbridge's JSON (field names as in the
``.msg`` files, nested messages as dicts, ``uint8[]`` as bytes). :func:`rospy_to_dict` / :func:`dict_to_rospy`
convert rospy's message objects to and from that form; :func:`from_rosbridge` / :func:`to_rosbridge` handle
rosbridge's own conventions (base64 ``uint8[]``, ``{secs, nsecs}`` time in ROS 1, ``{sec, nanosec}`` in ROS 2,
``pkg/msg/Type`` names in ROS 2). Everything else (which element of which field is which observation key) is
done once, on dicts, by :func:`decode_field` and :func:`encode_fields`.

Supported observation message types (``SUPPORTED_OBSERVATION_TYPES``):

* ``sensor_msgs/JointState``: field ``position`` | ``velocity`` | ``effort``, optionally only the joints named in
  ``joints`` (in that order);
* ``geometry_msgs/PoseStamped``: field ``position`` (x, y, z) | ``orientation`` (x, y, z, w) | ``pose`` (all 7);
* ``std_msgs/Float64MultiArray``: field ``data``;
* ``sensor_msgs/Image``: the image as H x W x C uint8 (encodings rgb8, bgr8, rgba8, bgra8, mono8).

Any field may be narrowed with ``index`` (a list of element positions).
"""

from __future__ import annotations

import base64
import math
import time
from typing import Any

import numpy as np

JOINT_STATE = "sensor_msgs/JointState"
POSE_STAMPED = "geometry_msgs/PoseStamped"
FLOAT64_MULTI_ARRAY = "std_msgs/Float64MultiArray"
IMAGE = "sensor_msgs/Image"
BOOL = "std_msgs/Bool"
STRING = "std_msgs/String"

SUPPORTED_OBSERVATION_TYPES = (JOINT_STATE, POSE_STAMPED, FLOAT64_MULTI_ARRAY, IMAGE)
SUPPORTED_COMMAND_TYPES = (FLOAT64_MULTI_ARRAY, JOINT_STATE, POSE_STAMPED)
FIELDS = {
    JOINT_STATE: ("position", "velocity", "effort"),
    POSE_STAMPED: ("position", "orientation", "pose"),
    FLOAT64_MULTI_ARRAY: ("data",),
    IMAGE: ("image",),
}
DEFAULT_FIELD = {JOINT_STATE: "position", POSE_STAMPED: "pose", FLOAT64_MULTI_ARRAY: "data", IMAGE: "image"}
IMAGE_CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}


class MessageError(ValueError):
    """A message does not hold what the robot config says it holds (missing joint, wrong size, bad encoding)."""


def canonical_type(msg_type: str) -> str:
    """``pkg/msg/Type`` (ROS 2 spelling) -> ``pkg/Type``."""
    parts = msg_type.split("/")
    if len(parts) == 3 and parts[1] == "msg":
        return f"{parts[0]}/{parts[2]}"
    return msg_type


def ros2_type(msg_type: str) -> str:
    package, name = canonical_type(msg_type).split("/")
    return f"{package}/msg/{name}"


# --- headers and time ----------------------------------------------------------------------------------------


def stamp_dict(seconds: float | None = None) -> dict[str, int]:
    """A ROS 1 time ``{secs, nsecs}`` (wall clock now when ``seconds`` is None)."""
    seconds = time.time() if seconds is None else float(seconds)
    secs = int(math.floor(seconds))
    return {"secs": secs, "nsecs": int(round((seconds - secs) * 1e9)) % 1_000_000_000}


def stamp_seconds(stamp: dict[str, Any] | None) -> float | None:
    """Seconds from either time spelling (ROS 1 ``secs/nsecs``, ROS 2 ``sec/nanosec``)."""
    if not stamp:
        return None
    secs = stamp.get("secs", stamp.get("sec", 0))
    nsecs = stamp.get("nsecs", stamp.get("nanosec", 0))
    return float(secs) + float(nsecs) * 1e-9


def header_dict(frame_id: str = "", seconds: float | None = None, seq: int = 0) -> dict[str, Any]:
    return {"seq": int(seq), "stamp": stamp_dict(seconds), "frame_id": frame_id}


# --- observations: message dict -> array ---------------------------------------------------------------------


def _select(values: np.ndarray, index: list[int] | None, where: str) -> np.ndarray:
    if index is None:
        return values
    if len(index) and (max(index) >= len(values) or min(index) < -len(values)):
        raise MessageError(f"{where}: index {index} out of range for {len(values)} elements")
    return values[np.asarray(index, dtype=np.int64)]


def _joint_values(message: dict[str, Any], field: str, joints: list[str] | None, where: str) -> np.ndarray:
    values = np.asarray(message.get(field) or [], dtype=np.float64)
    if joints is None:
        return values
    names = list(message.get("name") or [])
    positions = {name: i for i, name in enumerate(names)}
    missing = [joint for joint in joints if joint not in positions]
    if missing:
        raise MessageError(f"{where}: joints {missing} not in the message (it has {names})")
    if len(values) != len(names):
        raise MessageError(f"{where}: field '{field}' has {len(values)} values for {len(names)} joints")
    return values[[positions[joint] for joint in joints]]


def _pose_values(message: dict[str, Any], field: str) -> np.ndarray:
    pose = message.get("pose") or {}
    position = pose.get("position") or {}
    orientation = pose.get("orientation") or {}
    pos = [position.get("x", 0.0), position.get("y", 0.0), position.get("z", 0.0)]
    quat = [orientation.get("x", 0.0), orientation.get("y", 0.0), orientation.get("z", 0.0), orientation.get("w", 1.0)]
    if field == "position":
        return np.asarray(pos, dtype=np.float64)
    if field == "orientation":
        return np.asarray(quat, dtype=np.float64)
    return np.asarray(pos + quat, dtype=np.float64)


def decode_image(message: dict[str, Any], where: str = "image") -> np.ndarray:
    """A ``sensor_msgs/Image`` dict as an H x W x C uint8 array in RGB order (mono stays 1 channel)."""
    given = str(message.get("encoding", "rgb8"))
    encoding = given.lower()
    if encoding not in IMAGE_CHANNELS:
        raise MessageError(f"{where}: unsupported image encoding '{given}' (supported: {sorted(IMAGE_CHANNELS)})")
    height, width = int(message.get("height", 0)), int(message.get("width", 0))
    channels = IMAGE_CHANNELS[encoding]
    data = message.get("data", b"")
    if isinstance(data, str):  # rosbridge sends uint8[] as base64 text
        data = base64.b64decode(data)
    elif isinstance(data, (list, tuple)):
        data = bytes(data)
    step = int(message.get("step") or width * channels)
    buffer = np.frombuffer(data, dtype=np.uint8)
    if step < width * channels or buffer.size < step * height:
        raise MessageError(f"{where}: {buffer.size} bytes cannot hold a {height}x{width} {encoding} image (step {step})")
    image = buffer[: step * height].reshape(height, step)[:, : width * channels].reshape(height, width, channels)
    if encoding.startswith("bgr"):
        image = image[..., [2, 1, 0] + ([3] if channels == 4 else [])]
    return np.ascontiguousarray(image)


def decode_camera_image(message: dict[str, Any], topic: str, key: str, shape: tuple[int, ...],
                        encoding: str = "rgb8", flip_rows: bool = False) -> np.ndarray:
    """One camera frame for observation ``key``, checked against what the robot YAML says ``topic`` carries.

    The message must have exactly the YAML's ``encoding`` (a driver switched from rgb8 to bgr8, or to a depth
    or Bayer format, would otherwise feed the policy swapped or meaningless colours), ``shape`` = (H, W, C) and
    ``step * height`` bytes; anything else raises :class:`MessageError` naming the topic and the key. Returns an
    H x W x C uint8 array. Rows stay in the order sent, unless ``flip_rows``: ROS cameras send the top row first,
    robosuite (and robomimic datasets) keep OpenGL's bottom-up order, so a policy trained on robosuite images
    needs ``flip_rows`` on a real camera (:func:`encode_camera_image` is the inverse, used by the twin).
    """
    where = f"topic {topic} -> observation '{key}'"
    height, width, channels = (int(n) for n in shape)
    given = str(message.get("encoding", ""))
    given_channels = IMAGE_CHANNELS.get(given.lower())
    if given_channels is None:
        raise MessageError(f"{where}: unsupported image encoding '{given}' (supported: {sorted(IMAGE_CHANNELS)}); "
                           f"the robot YAML expects {encoding}")
    if given_channels != channels:
        raise MessageError(f"{where}: a {given_channels}-channel image (encoding {given}), but '{key}' has "
                           f"{channels} channels (encoding {encoding} in the robot YAML)")
    if given.lower() != encoding:
        raise MessageError(f"{where}: image encoding '{given}', but the robot YAML says this topic carries "
                           f"{encoding} (set its 'encoding' to what the camera publishes)")
    got = (int(message.get("height", 0)), int(message.get("width", 0)))
    if got != (height, width):
        raise MessageError(f"{where}: the image is {got[0]}x{got[1]} (H x W), but '{key}' is {height}x{width}")
    data = message.get("data", b"")
    data = base64.b64decode(data) if isinstance(data, str) else bytes(data)  # rosbridge: base64 text
    step = int(message.get("step") or width * channels)
    if len(data) != step * height:
        raise MessageError(f"{where}: {len(data)} bytes of data, but a {height}x{width} {given} image with step "
                           f"{step} has {step * height}")
    image = decode_image({**message, "data": data}, where)
    return np.ascontiguousarray(image[::-1]) if flip_rows else image


def encode_camera_image(image: np.ndarray, encoding: str = "rgb8", flip_rows: bool = False,
                        stamp: float | None = None, frame_id: str = "") -> dict[str, Any]:
    """The ``sensor_msgs/Image`` dict that :func:`decode_camera_image` turns back into ``image`` exactly."""
    image = np.asarray(image, dtype=np.uint8)
    return encode_image(image[::-1] if flip_rows else image, encoding=encoding, stamp=stamp, frame_id=frame_id)


def decode_field(msg_type: str, message: dict[str, Any], field: str | None = None, joints: list[str] | None = None,
                 index: list[int] | None = None, where: str = "message") -> np.ndarray:
    """The array one observation key takes from a message dict (float64, or uint8 for images)."""
    msg_type = canonical_type(msg_type)
    field = field or DEFAULT_FIELD.get(msg_type)
    if msg_type == JOINT_STATE:
        values = _joint_values(message, field, joints, where)
    elif msg_type == POSE_STAMPED:
        values = _pose_values(message, field)
    elif msg_type == FLOAT64_MULTI_ARRAY:
        values = np.asarray(message.get("data") or [], dtype=np.float64)
    elif msg_type == IMAGE:
        return decode_image(message, where)
    else:
        raise MessageError(f"{where}: unsupported message type '{msg_type}' "
                           f"(supported: {', '.join(SUPPORTED_OBSERVATION_TYPES)})")
    return _select(values, index, where)


# --- array(s) -> message dict (the twin's side, and commands) ---------------------------------------------------


def _place(target: list[float], values: np.ndarray, index: list[int] | None) -> list[float]:
    positions = range(len(values)) if index is None else index
    needed = (max(positions) + 1) if len(values) else 0
    if len(target) < needed:
        target = target + [0.0] * (needed - len(target))
    for position, value in zip(positions, values):
        target[position] = float(value)
    return target


def encode_fields(msg_type: str, parts: list[dict[str, Any]], stamp: float | None = None,
                  frame_id: str = "", encoding: str = "rgb8") -> dict[str, Any]:
    """Build one message dict from several observation keys that share its topic.

    ``parts`` holds dicts ``{"value": array, "field": ..., "joints": ..., "index": ...}``, the inverse of
    :func:`decode_field`: each key's values land where ``decode_field`` would read them from. An image part may
    add ``"flip_rows": True`` (see :func:`decode_camera_image`).
    """
    msg_type = canonical_type(msg_type)
    if msg_type == JOINT_STATE:
        names: list[str] = []
        for part in parts:
            for joint in part.get("joints") or []:
                if joint not in names:
                    names.append(joint)
        columns: dict[str, list[float]] = {}
        for part in parts:
            field = part.get("field") or "position"
            value = np.asarray(part["value"], dtype=np.float64).reshape(-1)
            joints = part.get("joints")
            column = columns.get(field, [0.0] * len(names))
            if joints is None:
                column = _place(column, value, part.get("index"))
            else:
                selected = [names.index(joint) for joint in joints]
                if part.get("index") is not None:
                    selected = [selected[i] for i in part["index"]]
                for position, item in zip(selected, value):
                    column[position] = float(item)
            columns[field] = column
        if not names:
            width = max((len(column) for column in columns.values()), default=0)
            names = [f"joint_{i}" for i in range(width)]
        return {"header": header_dict(frame_id, stamp), "name": names,
                "position": columns.get("position", []), "velocity": columns.get("velocity", []),
                "effort": columns.get("effort", [])}
    if msg_type == POSE_STAMPED:
        pose = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        for part in parts:
            field = part.get("field") or "pose"
            value = np.asarray(part["value"], dtype=np.float64).reshape(-1)
            offset = {"position": 0, "orientation": 3, "pose": 0}[field]
            width = {"position": 3, "orientation": 4, "pose": 7}[field]
            sub = pose[offset:offset + width]
            sub = _place(sub, value, part.get("index"))[:width]
            pose[offset:offset + width] = sub
        x, y, z, qx, qy, qz, qw = pose
        return {"header": header_dict(frame_id, stamp),
                "pose": {"position": {"x": x, "y": y, "z": z}, "orientation": {"x": qx, "y": qy, "z": qz, "w": qw}}}
    if msg_type == FLOAT64_MULTI_ARRAY:
        data: list[float] = []
        for part in parts:
            data = _place(data, np.asarray(part["value"], dtype=np.float64).reshape(-1), part.get("index"))
        return {"layout": {"dim": [{"label": "data", "size": len(data), "stride": len(data)}], "data_offset": 0},
                "data": data}
    if msg_type == IMAGE:
        if len(parts) != 1:
            raise MessageError("an Image topic carries exactly one observation key")
        return encode_camera_image(parts[0]["value"], encoding=encoding, flip_rows=bool(parts[0].get("flip_rows")),
                                   stamp=stamp, frame_id=frame_id)
    raise MessageError(f"unsupported message type '{msg_type}'")


def encode_image(image: np.ndarray, encoding: str = "rgb8", stamp: float | None = None,
                 frame_id: str = "") -> dict[str, Any]:
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    height, width, channels = image.shape
    if IMAGE_CHANNELS.get(encoding) != channels:
        raise MessageError(f"image with {channels} channels cannot be sent as '{encoding}'")
    if encoding.startswith("bgr"):
        image = image[..., [2, 1, 0] + ([3] if channels == 4 else [])]
    return {"header": header_dict(frame_id, stamp), "height": height, "width": width, "encoding": encoding,
            "is_bigendian": 0, "step": width * channels, "data": np.ascontiguousarray(image).tobytes()}


def encode_command(msg_type: str, values: np.ndarray, field: str | None = None, joints: list[str] | None = None,
                   stamp: float | None = None, frame_id: str = "") -> dict[str, Any]:
    """A command message carrying ``values`` (already scaled to the robot's units)."""
    msg_type = canonical_type(msg_type)
    if msg_type not in SUPPORTED_COMMAND_TYPES:
        raise MessageError(f"unsupported command type '{msg_type}' (supported: {', '.join(SUPPORTED_COMMAND_TYPES)})")
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if msg_type == JOINT_STATE and joints is not None and len(joints) != len(values):
        raise MessageError(f"command has {len(values)} values for {len(joints)} joints")
    part = {"value": values, "field": field or DEFAULT_FIELD[msg_type], "joints": joints, "index": None}
    return encode_fields(msg_type, [part], stamp=stamp, frame_id=frame_id)


def decode_command(msg_type: str, message: dict[str, Any], field: str | None = None,
                   joints: list[str] | None = None) -> np.ndarray:
    return decode_field(msg_type, message, field=field, joints=joints, where=f"command {msg_type}")


# --- rospy objects <-> dicts ---------------------------------------------------------------------------------


def rospy_to_dict(message: Any) -> Any:
    """Any genpy message (recursively) as the dict form; times as ``{secs, nsecs}``; ``uint8[]`` stays bytes."""
    slots = getattr(message, "__slots__", None)
    if slots is None:
        return message
    if hasattr(message, "secs") and hasattr(message, "nsecs") and not hasattr(message, "_type"):
        return {"secs": int(message.secs), "nsecs": int(message.nsecs)}
    result = {}
    for name in slots:
        value = getattr(message, name)
        if isinstance(value, (list, tuple)):
            result[name] = [rospy_to_dict(item) for item in value] if value and hasattr(value[0], "__slots__") \
                else list(value)
        elif hasattr(value, "__slots__"):
            result[name] = rospy_to_dict(value)
        else:
            result[name] = value
    return result


def dict_to_rospy(message_class: type, values: dict[str, Any]) -> Any:
    """Fill a genpy message class from the dict form (unknown fields are an error, missing ones default)."""
    import genpy

    message = message_class()
    slot_types = dict(zip(message_class.__slots__, message_class._slot_types))
    for name, value in values.items():
        if name not in slot_types:
            raise MessageError(f"{message_class._type} has no field '{name}' (fields: {list(slot_types)})")
        slot_type = slot_types[name]
        current = getattr(message, name)
        if isinstance(current, genpy.Time) or slot_type in ("time", "duration"):
            kind = genpy.Duration if slot_type == "duration" else genpy.Time
            seconds = value if isinstance(value, (int, float)) else None
            if seconds is not None:
                setattr(message, name, kind.from_sec(float(seconds)))
            else:
                setattr(message, name, kind(int(value.get("secs", value.get("sec", 0))),
                                            int(value.get("nsecs", value.get("nanosec", 0)))))
        elif isinstance(current, genpy.Message):
            setattr(message, name, dict_to_rospy(type(current), value))
        elif slot_type.endswith("]") and "/" in slot_type:  # arrays of messages
            import roslib.message

            item_class = roslib.message.get_message_class(slot_type.split("[")[0])
            setattr(message, name, [dict_to_rospy(item_class, item) for item in value])
        elif slot_type in ("uint8[]", "char[]") or (slot_type.startswith("uint8[") and slot_type.endswith("]")):
            setattr(message, name, base64.b64decode(value) if isinstance(value, str) else bytes(value))
        elif slot_type.endswith("]"):
            setattr(message, name, list(value))
        else:
            setattr(message, name, value)
    return message


# --- rosbridge JSON <-> dicts --------------------------------------------------------------------------------


def _rename_time(value: Any, ros_version: int) -> Any:
    if isinstance(value, dict):
        keys = set(value)
        if ros_version == 2 and keys == {"secs", "nsecs"}:
            return {"sec": value["secs"], "nanosec": value["nsecs"]}
        if ros_version == 1 and keys == {"sec", "nanosec"}:
            return {"secs": value["sec"], "nsecs": value["nanosec"]}
        return {key: _rename_time(item, ros_version) for key, item in value.items()}
    if isinstance(value, list):
        return [_rename_time(item, ros_version) for item in value]
    return value


def to_rosbridge(msg_type: str, message: dict[str, Any], ros_version: int = 1) -> dict[str, Any]:
    """The dict form as rosbridge expects it in a ``publish`` op (JSON-safe)."""
    def convert(value: Any) -> Any:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return base64.b64encode(bytes(value)).decode("ascii")
        if isinstance(value, dict):
            return {key: convert(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(item) for item in value]
        if isinstance(value, np.generic):
            return value.item()
        return value

    result = convert(message)
    if ros_version == 2:
        result = _rename_time(result, 2)
        if isinstance(result.get("header"), dict):
            result["header"].pop("seq", None)  # ROS 2 headers have no sequence number
    return result


def from_rosbridge(msg_type: str, message: dict[str, Any]) -> dict[str, Any]:
    """A message received from rosbridge (ROS 1 or 2) in the dict form (times as ``{secs, nsecs}``).

    ``uint8[]`` fields stay base64 text; :func:`decode_image` accepts both.
    """
    return _rename_time(dict(message), 1)


def rosbridge_type(msg_type: str, ros_version: int = 1) -> str:
    return ros2_type(msg_type) if ros_version == 2 else canonical_type(msg_type)
