"""Cameras on the robot path without ROS: sensor_msgs/Image round trips and refusals (naming topic and key), robot
YAML camera keys, and the MuJoCo twin -> RobotEnv -> image policy -> command loop, the watchdog on a stalled camera,
latency with image decoding, and the recorder writing image episodes, over an in-memory transport that stands in
for ROS (the same message dicts, delivered at once). tests/test_robot_images_ros.py repeats the loop over roscore."""

from __future__ import annotations

import importlib.util
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml

from robofinetune.robot.config import load_robot_config
from robofinetune.robot.errors import RobotConfigError, RobotError
from robofinetune.robot.messages import (IMAGE, MessageError, decode_camera_image, encode_camera_image,
                                         encode_fields, encode_image)
from robofinetune.robot.transport import Publisher, Subscription, Transport

REPO = Path(__file__).resolve().parents[1]
POINTMASS_IMAGE = REPO / "real_robot" / "pointmass_image_twin.yaml"
CAN_IMAGE = REPO / "real_robot" / "can_image_twin.yaml"
CAMERA_TOPIC = "/pointmass/camera/top/image_raw"


# --- messages --------------------------------------------------------------------------------------------------


def frame(height=6, width=8, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8"])
@pytest.mark.parametrize("flip_rows", [False, True])
def test_camera_image_round_trip(encoding, flip_rows):
    image = frame()
    message = encode_fields(IMAGE, [{"value": image, "flip_rows": flip_rows}], encoding=encoding)  # the twin's way
    assert message["data"] == encode_camera_image(image, encoding, flip_rows)["data"]
    assert (message["height"], message["width"], message["encoding"]) == (6, 8, encoding)
    # flip_rows: the wire carries the rows reversed (a real camera's top-first order for a bottom-up sim image)
    sent_rows = np.frombuffer(message["data"], np.uint8).reshape(6, 8, 3)
    first_row = image[-1] if flip_rows else image[0]
    assert np.array_equal(sent_rows[0], first_row[:, ::-1] if encoding == "bgr8" else first_row)
    decoded = decode_camera_image(message, CAMERA_TOPIC, "top_image", (6, 8, 3), encoding, flip_rows)
    assert decoded.dtype == np.uint8 and decoded.flags.c_contiguous
    assert np.array_equal(decoded, image)


def test_camera_image_with_padded_rows_and_base64_data():
    import base64

    image = frame()
    padded = np.zeros((6, 32), np.uint8)
    padded[:, :24] = image.reshape(6, 24)
    message = {"height": 6, "width": 8, "encoding": "rgb8", "step": 32,
               "data": base64.b64encode(padded.tobytes()).decode()}
    assert np.array_equal(decode_camera_image(message, CAMERA_TOPIC, "top_image", (6, 8, 3)), image)


@pytest.mark.parametrize("change, expected", [
    (lambda m: encode_image(frame(8, 8), "rgb8"), "the image is 8x8 (H x W), but 'top_image' is 6x8"),
    (lambda m: encode_image(frame(6, 6), "rgb8"), "the image is 6x6 (H x W), but 'top_image' is 6x8"),
    (lambda m: {**m, "encoding": "bgr8"}, "image encoding 'bgr8', but the robot YAML says this topic carries rgb8"),
    (lambda m: encode_image(frame(channels=1), "mono8"), "a 1-channel image (encoding mono8), but 'top_image' has 3"),
    (lambda m: encode_image(frame(channels=4), "rgba8"), "a 4-channel image (encoding rgba8), but 'top_image' has 3"),
    (lambda m: {**m, "encoding": "16UC1"}, "unsupported image encoding '16UC1'"),
    (lambda m: {**m, "data": m["data"][:-8]}, "136 bytes of data, but a 6x8 rgb8 image with step 24 has 144"),
    (lambda m: {**m, "step": 32}, "144 bytes of data, but a 6x8 rgb8 image with step 32 has 192"),
])
def test_wrong_camera_images_are_refused_naming_topic_and_key(change, expected):
    message = change(encode_image(frame(), "rgb8"))
    with pytest.raises(MessageError) as error:
        decode_camera_image(message, CAMERA_TOPIC, "top_image", (6, 8, 3), "rgb8")
    assert f"topic {CAMERA_TOPIC} -> observation 'top_image'" in str(error.value)
    assert expected in str(error.value)


# --- robot YAML --------------------------------------------------------------------------------------------------


def test_image_robot_yamls_map_camera_topics_to_the_task_image_keys():
    config = load_robot_config(POINTMASS_IMAGE)
    camera = config.observations["top_image"]
    assert (camera.topic, camera.type, camera.shape, camera.encoding, camera.flip_rows) == \
        (CAMERA_TOPIC, IMAGE, (32, 32, 3), "rgb8", False)
    can = load_robot_config(CAN_IMAGE)
    assert set(can.observations) == set(can.task.obs_keys)
    assert {key: (source.shape, source.flip_rows) for key, source in can.observations.items() if source.is_image} == \
        {"agentview_image": ((84, 84, 3), True), "robot0_eye_in_hand_image": ((84, 84, 3), True)}


def write_variant(tmp_path, section: str, value: dict[str, Any]) -> Path:
    raw = yaml.safe_load(POINTMASS_IMAGE.read_text())
    raw["task"] = "pointmass_image"
    raw["observations"][section] = value
    path = tmp_path / "robot.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("key, value, expected", [
    ("top_image", {"topic": "/cam", "type": "std_msgs/Float64MultiArray"},
     "field 'observations.top_image.type' must be sensor_msgs/Image: 'top_image' is a camera image"),
    ("top_image", {"topic": "/cam", "type": "sensor_msgs/Image", "encoding": "mono8"},
     "an Image key needs shape (H, W, 1), got (32, 32, 3)"),
    ("top_image", {"topic": "/cam", "type": "sensor_msgs/Image", "index": [0]},
     "field 'observations.top_image.index' does not apply to sensor_msgs/Image"),
    ("agent_pos", {"topic": "/js", "type": "sensor_msgs/JointState", "joints": ["slide_x", "slide_y"],
                   "flip_rows": True}, "field 'observations.agent_pos.flip_rows' only applies to sensor_msgs/Image"),
])
def test_bad_camera_entries_in_a_robot_yaml_name_the_file_and_field(tmp_path, key, value, expected):
    path = write_variant(tmp_path, key, value)
    with pytest.raises(RobotConfigError) as error:
        load_robot_config(path)
    assert str(path) in str(error.value) and expected in str(error.value)


# --- an in-memory stand-in for ROS -------------------------------------------------------------------------------


class Bus:
    """Topics shared by the loopback transports of one test: publish calls every subscriber at once.

    ``drop`` holds topics whose messages vanish (a stalled camera); ``tamper`` maps a topic to a function that
    alters each message on it (a camera of another size or encoding)."""

    def __init__(self) -> None:
        self.subscribers: dict[str, list[Callable]] = defaultdict(list)
        self.drop: set[str] = set()
        self.tamper: dict[str, Callable[[dict], dict]] = {}
        self.lock = threading.Lock()

    def deliver(self, topic: str, message: dict[str, Any]) -> None:
        if topic in self.drop:
            return
        message = self.tamper.get(topic, lambda m: m)(message)
        with self.lock:
            callbacks = list(self.subscribers[topic])
        for callback in callbacks:
            callback(message, time.monotonic())  # stamped at receipt, before the receiver decodes (as rospy's)


class LoopbackTransport(Transport):
    name = "loopback"

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def connect(self, node_name: str) -> None:
        pass

    def subscribe(self, topic, msg_type, callback, queue_size=10) -> Subscription:
        bus = self.bus
        with bus.lock:
            bus.subscribers[topic].append(callback)

        class _Subscription(Subscription):
            def close(self) -> None:
                with bus.lock:
                    if callback in bus.subscribers[topic]:
                        bus.subscribers[topic].remove(callback)

        return _Subscription()

    def publisher(self, topic, msg_type, latch=False, queue_size=10) -> Publisher:
        bus = self.bus

        class _Publisher(Publisher):
            def publish(self, message):
                sent = time.monotonic()
                bus.deliver(topic, message)
                return sent

            def subscriber_count(self):
                return len(bus.subscribers[topic])

            def close(self):
                pass

        return _Publisher()

    def close(self) -> None:
        pass


def load_twin_module():
    spec = importlib.util.spec_from_file_location("mujoco_twin_node", REPO / "real_robot" / "mujoco_twin_node.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class InProcessTwin:
    """``real_robot/mujoco_twin_node.py``'s TwinNode on a thread, speaking over ``bus`` instead of ROS. It is built
    on its thread, where it renders (an EGL context belongs to the thread that made it current)."""

    def __init__(self, config, bus: Bus, **kwargs: Any) -> None:
        self.config, self.bus, self.kwargs = config, bus, kwargs
        self.node = None
        self.error: BaseException | None = None
        self.ready = threading.Event()

    def _run(self) -> None:
        try:
            self.node = load_twin_module().TwinNode(self.config, verbose=False, **self.kwargs)
            self.node.transport = LoopbackTransport(self.bus)
            self.ready.set()
            self.node.run()
        except BaseException as exc:  # noqa: BLE001 - reported by __enter__ / the test
            self.error = exc
            self.ready.set()

    def __enter__(self) -> InProcessTwin:
        self.thread = threading.Thread(target=self._run, daemon=True, name="twin")
        self.thread.start()
        assert self.ready.wait(60) and self.error is None, self.error
        deadline = time.monotonic() + 30
        while self.node.episode < 0 and self.error is None and time.monotonic() < deadline:
            time.sleep(0.01)  # run() has connected and published its first episode
        assert self.error is None, self.error
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.node is not None:
            self.node.stop.set()
        self.thread.join(10)


def image_policy(n_obs_steps: int = 1, seed: int = 0):
    """An untrained diffusion policy for pointmass_image (conv encoder on the 32x32 top camera, 2 DDIM steps)."""
    from robofinetune.envs import load_task_spec
    from robofinetune.policies import POLICY_TYPES

    spec = load_task_spec("pointmass_image")
    policy_class, config_class = POLICY_TYPES["diffusion"]
    config = config_class(task="pointmass_image", obs_keys=spec.obs_keys,
                          obs_shapes={key: list(shape) for key, shape in spec.obs_shapes.items()}, action_dim=2,
                          n_obs_steps=n_obs_steps, horizon=4, n_action_steps=2, hidden_dim=32, depth=1,
                          image_feature_dim=16, inference_steps=2)
    torch.manual_seed(seed)
    policy = policy_class(config)
    generator = np.random.default_rng(seed)
    policy.set_normalizers(generator.uniform(-0.4, 0.4, (100, 4)), generator.uniform(-1, 1, (100, 2)))
    return policy.eval()


@pytest.fixture
def bus():
    return Bus()


@pytest.fixture
def config():
    # 100 Hz: lockstep answers each command at once, the rate only spaces the steps
    return load_robot_config(POINTMASS_IMAGE, {"control_rate": 100})


def test_robot_env_receives_the_frames_the_env_renders_and_an_image_policy_drives_it(bus):
    """Twin -> RobotEnv -> policy -> command: every observation over the wire (the camera included) equals what
    make_env('pointmass_image') gives when replaying the commands the robot executed."""
    from robofinetune.envs import make_env
    from robofinetune.robot.env import RobotEnv
    from robofinetune.robot.runner import run_policy
    from robofinetune.robot.safety import STALE_HOLD

    class Keep:
        def __init__(self):
            self.episodes = []

        def append(self, episode):
            self.episodes.append(episode)

    sink = Keep()
    config = load_robot_config(POINTMASS_IMAGE, {"control_rate": 100, "max_episode_steps": 40})
    with InProcessTwin(config, bus):
        env = RobotEnv(config, transport=LoopbackTransport(bus))
        try:
            assert env.observation_space["top_image"].dtype == np.uint8
            result = run_policy(env, image_policy(), 2, seed=40, sink=sink)
        finally:
            env.close()
    assert result.stopped is None and [o.length for o in result.episodes] == [len(e) for e in sink.episodes]
    assert all(STALE_HOLD not in o.interventions for o in result.episodes)
    sim = make_env("pointmass_image")
    try:
        for episode in sink.episodes:
            images = episode.observations["top_image"]
            assert images.dtype == np.uint8 and images.shape == (len(episode), 32, 32, 3)
            assert len(np.unique(images.reshape(len(episode), -1), axis=0)) > 1   # the camera follows the mass
            obs, _ = sim.reset(seed=episode.metadata["seed"])
            for step in range(len(episode)):
                for key in obs:
                    assert np.array_equal(episode.observations[key][step], obs[key]), (key, step)
                obs, *_ = sim.step(episode.actions[step])
            assert np.array_equal(episode.final_observation["top_image"], obs["top_image"])
    finally:
        sim.close()


def test_latency_counts_image_decoding(bus, config, monkeypatch):
    """Receipt -> command latency starts before the frame is decoded: a decoder slowed by 30 ms shows in it."""
    import robofinetune.robot.env as robot_env
    from robofinetune.robot.env import RobotEnv

    decode = robot_env.decode_camera_image

    def slow_decode(*args, **kwargs):
        time.sleep(0.03)
        return decode(*args, **kwargs)

    monkeypatch.setattr(robot_env, "decode_camera_image", slow_decode)
    with InProcessTwin(config, bus):
        env = RobotEnv(config, transport=LoopbackTransport(bus))
        try:
            env.reset(seed=1)
            latencies = [env.step(np.zeros(2, np.float32))[4]["latency"] for _ in range(4)]
        finally:
            env.close()
    assert min(latencies) >= 0.03, latencies


@pytest.mark.parametrize("tamper, expected", [
    (lambda m: encode_image(frame(24, 32), "rgb8"), "the image is 24x32 (H x W), but 'top_image' is 32x32"),
    (lambda m: {**m, "encoding": "bgr8"}, "image encoding 'bgr8', but the robot YAML says this topic carries rgb8"),
    (lambda m: encode_image(frame(32, 32, 1), "mono8"), "a 1-channel image (encoding mono8), but 'top_image' has 3"),
])
def test_reset_refuses_a_camera_of_another_size_encoding_or_channel_count(bus, config, tamper, expected):
    from robofinetune.robot.env import RobotEnv

    bus.tamper[CAMERA_TOPIC] = tamper
    with InProcessTwin(config, bus):
        env = RobotEnv(config, transport=LoopbackTransport(bus))
        started = time.monotonic()
        try:
            with pytest.raises(RobotError) as error:
                env.reset(seed=0)
        finally:
            env.close()
    message = str(error.value)
    assert f"topic {CAMERA_TOPIC} -> observation 'top_image'" in message and expected in message
    assert time.monotonic() - started < config.reset.timeout / 2   # at once, not after the reset timeout


def test_watchdog_holds_the_robot_when_only_the_camera_stalls(bus):
    """Joint states keep coming, the camera goes silent: the watchdog holds and the episode aborts naming the
    camera topic, as for any stale observation."""
    from robofinetune.robot.env import RobotEnv
    from robofinetune.robot.safety import STALE_HOLD

    config = load_robot_config(POINTMASS_IMAGE, {"control_rate": 100, "safety.stale_observation_age": 0.3,
                                                 "safety.abort_after": 1.0})
    commands = []
    with InProcessTwin(config, bus):
        env = RobotEnv(config, transport=LoopbackTransport(bus))
        LoopbackTransport(bus).subscribe(config.command.topic, "std_msgs/Float64MultiArray",
                                         lambda message, at: commands.append((at, list(message["data"]))))
        try:
            env.reset(seed=2)
            for _ in range(3):
                env.step(np.array([0.5, 0.5], np.float32))
            stalled_at = time.monotonic()
            bus.drop.add(CAMERA_TOPIC)
            info = {}
            for _ in range(20):
                _, _, terminated, truncated, info = env.step(np.array([0.5, 0.5], np.float32))
                if terminated or truncated:
                    break
            summary = env.episode_summary()
        finally:
            env.close()
    assert info["aborted"] == f"no fresh observations on ['{CAMERA_TOPIC}'] for 1 s"
    assert summary["interventions"]["counts"].get(STALE_HOLD) == 1
    assert summary["stale_spells"][0]["age"] >= 0.3
    assert any(at > stalled_at and data == [0.0, 0.0] for at, data in commands)   # the robot was told to hold


def test_recorder_writes_image_episodes_durably_in_both_formats(bus, config, tmp_path):
    """record_session fed by the twin's scripted expert: robomimic HDF5 keeps the frames exactly, LeRobot keeps
    them as mp4 within a small pixel error; each episode is readable from disk as soon as it is reported saved."""
    from robofinetune.data.io import load_dataset
    from robofinetune.robot.env import RobotEnv
    from robofinetune.robot.recorder import open_episode_writer, record_session
    from robofinetune.robot.teleop import make_teleop

    class Capture:
        """The writer, keeping what it was given."""

        def __init__(self, writer):
            self.writer, self.episodes = writer, []

        def __len__(self):
            return len(self.writer)

        def append(self, episode):
            self.episodes.append(episode)
            return self.writer.append(episode)

    outputs = {"robomimic": tmp_path / "demos.hdf5", "lerobot": tmp_path / "demos_lerobot"}
    recorded = {}
    with InProcessTwin(config, bus, expert_teleop=True):
        for fmt, output in outputs.items():
            env = RobotEnv(config, transport=LoopbackTransport(bus))
            teleop = make_teleop("ros-topic", config)
            on_disk = []
            try:
                teleop.start(env)
                writer = Capture(open_episode_writer(output, fmt, config.env_meta, fps=config.control_rate))
                result = record_session(env, teleop, writer, episodes=2, seed=0,
                                        printer=lambda text, flush=False: on_disk.append(len(load_dataset(output)[0])))
            finally:
                teleop.close()
                env.close()
            assert result.saved == 2 and on_disk == [1, 2]
            recorded[fmt] = writer.episodes
    for fmt, output in outputs.items():
        episodes, env_meta = load_dataset(output)
        assert env_meta["task"] == "pointmass_image" and len(episodes) == 2
        for stored, given in zip(episodes, recorded[fmt]):
            assert stored.success and stored.observations["top_image"].dtype == np.uint8
            assert stored.observations["top_image"].shape == given.observations["top_image"].shape
            assert stored.observations["top_image"].shape[1:] == (32, 32, 3)
            error = np.abs(stored.observations["top_image"].astype(int) - given.observations["top_image"]).mean()
            if fmt == "robomimic":
                assert error == 0
                assert np.array_equal(stored.observations["agent_pos"], given.observations["agent_pos"])
            else:
                assert error < 8, error   # lossy video


def test_bag_import_reverses_rows_as_the_live_robot_does(tmp_path):
    """A camera key with flip_rows: frames read from a bag get the same row order RobotEnv gives them live."""
    from test_bag_import import make_episode, robot_yaml, write_run

    from robofinetune.data.bag_import import BagWriter, read_bag

    robot_path = robot_yaml(tmp_path, extra_observations={
        "top_image": {"topic": "/camera/top/image_raw", "type": "sensor_msgs/Image", "shape": [6, 8, 3],
                      "flip_rows": True}})
    robot = load_robot_config(robot_path)
    observations, actions = make_episode(np.random.default_rng(3), robot, 4)
    with BagWriter(tmp_path / "camera.bag") as bag:
        write_run(bag, robot, [(observations, actions)], [True])   # the wire carries each frame's rows as given
    (episode,), _ = read_bag(tmp_path / "camera.bag", robot_path)
    sent = [obs["top_image"] for obs in observations[:-1]]
    assert np.array_equal(episode.observations["top_image"], np.stack([frame[::-1] for frame in sent]))
    live = [decode_camera_image(encode_image(frame), "/camera/top/image_raw", "top_image", (6, 8, 3), flip_rows=True)
            for frame in sent]
    assert np.array_equal(episode.observations["top_image"], np.stack(live))
