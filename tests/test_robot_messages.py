"""Message conversion for both transports: dict form <-> arrays, rospy wire format, rosbridge JSON (ROS 1 and 2)."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest

from robofinetune.robot.config import load_robot_config
from robofinetune.robot.messages import (FLOAT64_MULTI_ARRAY, IMAGE, JOINT_STATE, POSE_STAMPED, MessageError,
                                         decode_command, decode_field, decode_image, dict_to_rospy, encode_command,
                                         encode_fields, encode_image, from_rosbridge, rosbridge_type, rospy_to_dict,
                                         stamp_dict, stamp_seconds, to_rosbridge)
from robofinetune.robot.transport import ros_available

REPO = Path(__file__).resolve().parents[1]


def joint_state():
    return {"header": {"seq": 3, "stamp": {"secs": 10, "nsecs": 5}, "frame_id": "base"},
            "name": ["elbow", "slide_x", "slide_y"], "position": [0.5, -0.1, 0.2], "velocity": [0.0, 1.5, -2.5],
            "effort": []}


def test_joint_state_fields_by_joint_name_and_index():
    message = joint_state()
    assert np.allclose(decode_field(JOINT_STATE, message, "position", joints=["slide_x", "slide_y"]), [-0.1, 0.2])
    assert np.allclose(decode_field(JOINT_STATE, message, "velocity", joints=["slide_y", "slide_x"]), [-2.5, 1.5])
    assert np.allclose(decode_field(JOINT_STATE, message, "position", index=[2, 0]), [0.2, 0.5])
    with pytest.raises(MessageError, match=r"joints \['wrist'\] not in the message"):
        decode_field(JOINT_STATE, message, "position", joints=["wrist"])
    with pytest.raises(MessageError, match="field 'effort' has 0 values for 3 joints"):
        decode_field(JOINT_STATE, message, "effort", joints=["elbow"])


def test_pose_fields():
    message = {"header": {}, "pose": {"position": {"x": 1.0, "y": 2.0, "z": 3.0},
                                      "orientation": {"x": 0.0, "y": 0.0, "z": 0.6, "w": 0.8}}}
    assert np.allclose(decode_field(POSE_STAMPED, message, "position"), [1, 2, 3])
    assert np.allclose(decode_field(POSE_STAMPED, message, "orientation"), [0, 0, 0.6, 0.8])
    assert np.allclose(decode_field(POSE_STAMPED, message, "pose"), [1, 2, 3, 0, 0, 0.6, 0.8])
    assert np.allclose(decode_field(POSE_STAMPED, message, "position", index=[0, 1]), [1, 2])
    with pytest.raises(MessageError, match="out of range"):
        decode_field(POSE_STAMPED, message, "position", index=[3])


def test_images_in_every_encoding_with_row_padding_and_base64():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(encode_image(rgb, "rgb8")), rgb)
    bgr_message = encode_image(rgb, "bgr8")
    assert bytes(bgr_message["data"])[:3] == bytes(rgb[0, 0, ::-1])
    assert np.array_equal(decode_image(bgr_message), rgb)
    mono = rng.integers(0, 256, (4, 6, 1), dtype=np.uint8)
    assert np.array_equal(decode_image(encode_image(mono, "mono8")), mono)
    # rows padded to a 32-byte step (as many camera drivers do), sent as base64 text (as rosbridge does)
    padded = np.zeros((5, 32), dtype=np.uint8)
    padded[:, :21] = rgb.reshape(5, 21)
    message = {"height": 5, "width": 7, "encoding": "rgb8", "step": 32,
               "data": base64.b64encode(padded.tobytes()).decode()}
    assert np.array_equal(decode_image(message), rgb)
    with pytest.raises(MessageError, match="unsupported image encoding '16UC1'"):
        decode_image({**message, "encoding": "16UC1"})
    with pytest.raises(MessageError, match="cannot hold"):
        decode_image({**message, "data": b"\x00" * 10})


def test_encode_fields_is_the_inverse_of_decode_field():
    parts = [{"value": np.array([0.1, 0.2]), "field": "position", "joints": ["x", "y"], "index": None},
             {"value": np.array([1.0, 2.0]), "field": "velocity", "joints": ["x", "y"], "index": None}]
    message = encode_fields(JOINT_STATE, parts)
    assert message["name"] == ["x", "y"]
    assert np.allclose(decode_field(JOINT_STATE, message, "velocity", joints=["y"]), [2.0])
    pose = encode_fields(POSE_STAMPED, [{"value": np.array([0.3, -0.4]), "field": "position", "index": [0, 1]},
                                        {"value": np.array([0, 0, 0, 1.0]), "field": "orientation"}])
    assert np.allclose(decode_field(POSE_STAMPED, pose, "pose"), [0.3, -0.4, 0, 0, 0, 0, 1])
    packed = encode_fields(FLOAT64_MULTI_ARRAY, [{"value": np.arange(3.0), "index": [0, 1, 2]},
                                                 {"value": np.array([7.0, 8.0]), "index": [3, 4]}])
    assert packed["data"] == [0.0, 1.0, 2.0, 7.0, 8.0]
    command = encode_command(JOINT_STATE, np.array([0.5, -0.5]), field="velocity", joints=["a", "b"])
    assert np.allclose(decode_command(JOINT_STATE, command, field="velocity", joints=["b", "a"]), [-0.5, 0.5])


@pytest.mark.parametrize("robot", ["pointmass_twin.yaml", "can_twin.yaml"])
def test_twin_encoding_and_env_decoding_agree_for_the_shipped_robots(robot):
    """What the twin publishes for a robot YAML decodes back to the same observation on the runner's side."""
    config = load_robot_config(REPO / "real_robot" / robot)
    rng = np.random.default_rng(1)
    obs = {key: rng.normal(size=source.shape).astype(np.float32) for key, source in config.observations.items()}
    by_topic = {}
    for source in config.observations.values():
        by_topic.setdefault(source.topic, []).append({"value": obs[source.key], "field": source.field,
                                                      "joints": source.joints, "index": source.index})
    messages = {topic: encode_fields(config.topics()[topic], parts) for topic, parts in by_topic.items()}
    for key, source in config.observations.items():
        value = decode_field(source.type, messages[source.topic], source.field, source.joints, source.index)
        assert np.array_equal(value.astype(np.float32).reshape(source.shape), obs[key]), key


def test_rosbridge_json_for_ros1_and_ros2():
    image = encode_image(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3), stamp=12.5)
    ros1 = to_rosbridge(IMAGE, image, ros_version=1)
    text = json.dumps(ros1)  # JSON-safe: bytes became base64
    assert json.loads(text)["data"] == base64.b64encode(bytes(range(18))).decode()
    assert ros1["header"]["stamp"] == {"secs": 12, "nsecs": 500000000}
    ros2 = to_rosbridge(IMAGE, image, ros_version=2)
    assert ros2["header"]["stamp"] == {"sec": 12, "nanosec": 500000000} and "seq" not in ros2["header"]
    assert rosbridge_type(IMAGE, 2) == "sensor_msgs/msg/Image" and rosbridge_type("sensor_msgs/msg/Image", 1) == IMAGE
    # what rosbridge hands back (ROS 2 time spelling, base64 data) decodes to the same image
    back = from_rosbridge(IMAGE, json.loads(json.dumps(ros2)))
    assert back["header"]["stamp"] == {"secs": 12, "nsecs": 500000000}
    assert np.array_equal(decode_image(back), decode_image(image))
    state = from_rosbridge(JOINT_STATE, json.loads(json.dumps(to_rosbridge(JOINT_STATE, joint_state(), 2))))
    assert np.allclose(decode_field(JOINT_STATE, state, "velocity", joints=["slide_x"]), [1.5])


def test_roslibpy_message_wraps_the_rosbridge_dict():
    roslibpy = pytest.importorskip("roslibpy")
    command = encode_command(FLOAT64_MULTI_ARRAY, np.array([0.25, -1.0]))
    message = roslibpy.Message(to_rosbridge(FLOAT64_MULTI_ARRAY, command))
    # roslibpy serialises the message dict with json for the websocket
    wire = json.loads(json.dumps({"op": "publish", "topic": "/cmd", "msg": dict(message)}))
    assert np.allclose(decode_command(FLOAT64_MULTI_ARRAY, from_rosbridge(FLOAT64_MULTI_ARRAY, wire["msg"])),
                       [0.25, -1.0])


def test_stamps():
    assert stamp_seconds(stamp_dict(1234.25)) == pytest.approx(1234.25)
    assert stamp_seconds({"sec": 3, "nanosec": 500}) == pytest.approx(3.0000005)


@pytest.mark.ros
@pytest.mark.skipif(not ros_available(), reason="ROS 1 (python3-rospy) is not installed; CI installs it")
@pytest.mark.parametrize("msg_type, message", [
    (JOINT_STATE, joint_state()),
    (POSE_STAMPED, encode_fields(POSE_STAMPED, [{"value": np.array([1.0, 2, 3, 0, 0, 0, 1]), "field": "pose"}], 5.0)),
    (FLOAT64_MULTI_ARRAY, encode_command(FLOAT64_MULTI_ARRAY, np.array([0.1, -0.2, 0.3]))),
    (IMAGE, encode_image(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3), "bgr8", 7.25)),
    ("std_msgs/Bool", {"data": True}),
    ("std_msgs/String", {"data": json.dumps({"id": "a", "seed": 3})}),
])
def test_rospy_wire_round_trip(msg_type, message):
    """dict -> rospy message -> serialised bytes (the TCPROS payload) -> rospy message -> dict."""
    from robofinetune.robot.transport import _message_class

    message_class = _message_class(msg_type)
    buffer = io.BytesIO()
    dict_to_rospy(message_class, message).serialize(buffer)
    decoded = message_class().deserialize(buffer.getvalue())
    back = rospy_to_dict(decoded)
    if msg_type == IMAGE:
        assert np.array_equal(decode_image(back), decode_image(message))
    elif msg_type in (JOINT_STATE, POSE_STAMPED, FLOAT64_MULTI_ARRAY):
        field = {JOINT_STATE: "velocity", POSE_STAMPED: "pose", FLOAT64_MULTI_ARRAY: "data"}[msg_type]
        assert np.allclose(decode_field(msg_type, back, field), decode_field(msg_type, message, field))
        if "header" in message:
            assert back["header"]["stamp"] == message["header"]["stamp"]
    else:
        assert back == message
