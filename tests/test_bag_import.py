"""ROS bags -> episodes (robofinetune.data.bag_import): bags written here with rosbags' own ROS 1 / ROS 2 / MCAP
writers, messages encoded as the MuJoCo twin encodes them (robot.messages.encode_fields), and one bag recorded by
the real `rosbag record` from the twin over a roscore."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from robofinetune.data.bag_import import (BagError, BagOptions, BagWriter, bag_info, is_bag, message_to_dict,
                                          open_bag, read_bag)
from robofinetune.robot.config import load_robot_config
from robofinetune.robot.messages import decode_image, encode_command, encode_fields

REPO = Path(__file__).resolve().parents[1]
REALTIME = REPO / "real_robot" / "pointmass_twin_realtime.yaml"   # 20 Hz, staleness limit 0.5 s
LOCKSTEP = REPO / "real_robot" / "pointmass_twin.yaml"
NS = 1_000_000_000
T0 = 1_700_000_000 * NS   # bag times are wall-clock nanoseconds
PERIOD = NS // 20
SCALE, OFFSET = [2.0, 0.5], [0.1, -0.3]


def robot_yaml(tmp_path: Path, base: Path = REALTIME, name: str = "robot.yaml", **changes) -> Path:
    """A copy of a twin's robot YAML with some fields changed (dotted names for nested ones)."""
    raw = yaml.safe_load(base.read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    raw.pop("incumbent", None)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def scaled_robot(tmp_path: Path) -> Path:
    return robot_yaml(tmp_path, **{"command.scale": SCALE, "command.offset": OFFSET})


class Publisher:
    """Messages as the robot publishes them for a robot YAML (every observation topic, command, success, reset
    request), written into a bag. Times are integer nanoseconds; header stamps equal the publish time."""

    def __init__(self, bag: BagWriter, robot) -> None:
        self.bag, self.robot = bag, robot
        self.by_topic: dict[str, list] = {}
        for source in robot.all_observations.values():
            self.by_topic.setdefault(source.topic, []).append(source)

    def observation(self, t: int, obs: dict[str, np.ndarray], topics=None, stamp: int | None = None) -> None:
        for topic, sources in self.by_topic.items():
            if topics is not None and topic not in topics:
                continue
            parts = [{"value": obs[s.key], "field": s.field, "joints": s.joints, "index": s.index} for s in sources]
            message = encode_fields(sources[0].type, parts, stamp=(stamp if stamp is not None else t) / NS,
                                    encoding=sources[0].encoding)
            self.bag.write(topic, sources[0].type, t, message)

    def command(self, t: int, action: np.ndarray) -> None:
        command = self.robot.command
        values = np.asarray(action, dtype=np.float64)
        if command.scale is not None:   # as RobotEnv._publish sends it
            values = values * np.asarray(command.scale)
        if command.offset is not None:
            values = values + np.asarray(command.offset)
        self.bag.write(command.topic, command.type, t, encode_command(command.type, values, command.field,
                                                                      command.joints, stamp=t / NS))

    def success(self, t: int, value: bool) -> None:
        self.bag.write(self.robot.success.topic, "std_msgs/Bool", t, {"data": bool(value)})

    def reset_request(self, t: int, seed: int) -> None:
        self.bag.write(self.robot.reset.request_topic, "std_msgs/String", t,
                       {"data": json.dumps({"id": f"r{seed}", "seed": seed})})


def make_episode(rng, robot, length: int) -> tuple[list[dict], np.ndarray]:
    """length + 1 observations (the last is the final one) and length actions in [-1, 1]."""
    observations = []
    for _ in range(length + 1):
        obs = {}
        for key, source in robot.all_observations.items():
            obs[key] = (rng.integers(0, 256, source.shape, dtype=np.uint8) if source.is_image
                        else rng.uniform(-0.4, 0.4, source.shape))
        observations.append(obs)
    return observations, rng.uniform(-1, 1, (length, robot.action_dim))


def write_run(bag: BagWriter, robot, episodes, successes, latency=3_000_000, pause=NS // 2, reset_topic=True,
              start=T0) -> list[int]:
    """Realtime robot: observation k (+ success) at each 20 Hz tick, command k ``latency`` later; the outcome of
    the last action at the next tick; a reset request before each episode. Returns each episode's start time."""
    pub = Publisher(bag, robot)
    t = start
    starts = []
    for number, ((observations, actions), success) in enumerate(zip(episodes, successes)):
        if reset_topic:
            pub.reset_request(t, seed=100 + number)
        t += pause // 2
        starts.append(t)
        for k, action in enumerate(actions):
            pub.observation(t, observations[k])
            pub.success(t, False)
            pub.command(t + latency, action)
            t += PERIOD
        pub.observation(t, observations[-1])
        pub.success(t, success)
        t += pause
    return starts


def assert_episode(episode, observations, actions, success) -> None:
    assert len(episode) == len(actions)
    assert episode.success is success
    np.testing.assert_allclose(episode.actions, actions, atol=1e-6)
    for key in episode.observations:
        expected = np.stack([obs[key] for obs in observations[:-1]])
        np.testing.assert_allclose(episode.observations[key], expected, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(episode.final_observation[key], observations[-1][key], atol=1e-6, err_msg=key)


def three_episodes(robot, seed=0):
    rng = np.random.default_rng(seed)
    return [make_episode(rng, robot, n) for n in (12, 7, 9)], [True, False, True]


# --- the converter on bags written with rosbags ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ros1", "ros2_sqlite3", "mcap"])
def test_bag_round_trip_inverts_command_scaling_and_splits_on_the_reset_topic(tmp_path, kind):
    robot_path = scaled_robot(tmp_path)
    robot = load_robot_config(robot_path)
    episodes, successes = three_episodes(robot)
    bag_path = {"ros1": tmp_path / "run.bag", "ros2_sqlite3": tmp_path / "run_ros2",
                "mcap": tmp_path / "run_mcap"}[kind]
    with BagWriter(bag_path, ros_version=1 if kind == "ros1" else 2,
                   storage="mcap" if kind == "mcap" else "sqlite3") as bag:
        write_run(bag, robot, episodes, successes)
    if kind == "mcap":   # a bare .mcap file, as `ros2 bag record -s mcap` leaves inside its folder
        bag_path = next(bag_path.glob("*.mcap"))
    assert is_bag(bag_path)

    found, report = read_bag(bag_path, robot_path)
    assert report.split == "topic" and report.episode_topic == robot.reset.request_topic
    assert report.ticks.startswith("command")
    assert [len(e) for e in found] == [12, 7, 9]
    for episode, (observations, actions), success in zip(found, episodes, successes):
        assert_episode(episode, observations, actions, success)
        assert episode.observations["agent_pos"].dtype == np.float32
    assert [e.metadata["seed"] for e in found] == [100, 101, 102]
    assert report.successes == 2 and report.dropped_stale == 0
    assert report.observation_age_ms["max"] == pytest.approx(3.0)   # the command latency
    # the bag holds the command in robot units (offset + scale * action): the inversion recovered the actions
    with open_bag(bag_path) as reader:
        connection, _, raw = next(reader.messages([c for c in reader.connections if c.topic == robot.command.topic]))
        sent = np.asarray(message_to_dict(reader.deserialize(raw, connection.msgtype))["data"])
    np.testing.assert_allclose(sent, episodes[0][1][0] * np.asarray(SCALE) + np.asarray(OFFSET), atol=1e-12)


def test_without_scale_the_command_is_the_action_and_all_formats_are_written(tmp_path, capsys):
    from robofinetune.cli import main
    from robofinetune.data.io import load_dataset

    robot = load_robot_config(REALTIME)
    episodes, successes = three_episodes(robot, seed=1)
    with BagWriter(tmp_path / "run.bag") as bag:
        write_run(bag, robot, episodes, successes)
    for destination in ("demos.hdf5", "demos.zarr", "demos_lerobot"):
        assert main(["data", "convert", str(tmp_path / "run.bag"), str(tmp_path / destination),
                     f"--robot={REALTIME}"]) == 0
        out = capsys.readouterr().out
        assert "3 episodes (2 successful), 28 steps; ticks: command" in out and "wrote 3 episodes" in out
        loaded, env_meta = load_dataset(tmp_path / destination)
        assert env_meta["task"] == "pointmass" and env_meta["control_rate"] == 20
        assert [e.success for e in loaded] == successes
        for episode, (observations, actions), success in zip(loaded, episodes, successes):
            np.testing.assert_allclose(episode.actions, actions, atol=1e-6)
            np.testing.assert_allclose(episode.observations["goal_pos"],
                                       np.stack([o["goal_pos"] for o in observations[:-1]]), atol=1e-6)


def test_resampling_to_the_control_rate_takes_the_newest_message_at_or_before_each_tick(tmp_path):
    """Teleop streaming commands at ~100 Hz and joint states at ~250 Hz with jitter: ticks on a 20 Hz clock,
    every value the newest at or before its tick (checked against a brute-force search)."""
    robot = load_robot_config(REALTIME)
    rng = np.random.default_rng(2)

    def jittered(rate_hz, start, stop):
        times = np.arange(start, stop, NS // rate_hz)
        return np.unique(times + rng.integers(-NS // rate_hz // 3, NS // rate_hz // 3, len(times)))

    start, stop = T0, T0 + 3 * NS
    joint_times, goal_times, command_times = jittered(250, start, stop), jittered(30, start, stop), \
        jittered(100, start + 40_000_000, stop - NS // 2)
    joints = {int(t): rng.uniform(-0.4, 0.4, 4) for t in joint_times}
    goals = {int(t): rng.uniform(-0.3, 0.3, 2) for t in goal_times}
    commands = {int(t): rng.uniform(-1, 1, 2) for t in command_times}
    with BagWriter(tmp_path / "teleop.bag") as bag:
        pub = Publisher(bag, robot)
        events = sorted([(t, "j") for t in joints] + [(t, "g") for t in goals] + [(t, "c") for t in commands])
        for t, what in events:
            if what == "j":
                pub.observation(t, {"agent_pos": joints[t][:2], "agent_vel": joints[t][2:]},
                                topics=["/pointmass/joint_states"])
            elif what == "g":
                pub.observation(t, {"goal_pos": goals[t]}, topics=["/pointmass/goal"])
            else:
                pub.command(t, commands[t])
    found, report = read_bag(tmp_path / "teleop.bag", REALTIME, BagOptions(split="none"))
    assert report.ticks.startswith("rate") and len(found) == 1
    episode = found[0]
    first, last = min(commands), max(commands)
    ticks = first + PERIOD * np.arange((last - first) // PERIOD + 1)
    assert len(episode) == len(ticks)

    def newest(table, t):
        return table[max(k for k in table if k <= t)]

    for i, tick in enumerate(ticks):
        np.testing.assert_allclose(episode.observations["agent_pos"][i], newest(joints, tick)[:2], atol=1e-6)
        np.testing.assert_allclose(episode.observations["agent_vel"][i], newest(joints, tick)[2:], atol=1e-6)
        np.testing.assert_allclose(episode.observations["goal_pos"][i], newest(goals, tick), atol=1e-6)
        np.testing.assert_allclose(episode.actions[i], newest(commands, tick), atol=1e-6)
    age_max = max(tick - max(k for k in table if k <= tick) for tick in ticks for table in (joints, goals))
    assert report.observation_age_ms["max"] == pytest.approx(age_max / 1e6)

    forced, forced_report = read_bag(tmp_path / "teleop.bag", REALTIME, BagOptions(split="none", ticks="command"))
    assert forced_report.ticks.startswith("command") and len(forced[0]) == len(commands)


def test_ticks_with_a_stale_observation_are_dropped(tmp_path):
    """The goal topic goes silent for 0.8 s (the YAML's staleness limit is 0.5 s): the ticks more than 0.5 s
    after its last message are dropped and counted; the joint states stayed fresh."""
    robot = load_robot_config(REALTIME)
    rng = np.random.default_rng(3)
    observations, actions = make_episode(rng, robot, 40)
    silent = range(10, 26)     # goal messages 10..25 missing: 0.8 s
    with BagWriter(tmp_path / "stale.bag") as bag:
        pub = Publisher(bag, robot)
        t = T0
        for k, action in enumerate(actions):
            topics = ["/pointmass/joint_states"] + ([] if k in silent else ["/pointmass/goal"])
            pub.observation(t, observations[k], topics=topics)
            pub.success(t, False)
            pub.command(t + 1_000_000, action)
            t += PERIOD
        pub.observation(t, observations[-1])
    found, report = read_bag(tmp_path / "stale.bag", REALTIME)
    # goal 9 at tick 9; ticks 10..19 see it at most 0.5 s + 1 ms old... only ticks whose age exceeds 0.5 s drop
    ages = [(k - 9) * PERIOD + 1_000_000 for k in silent]
    stale = [k for k, age in zip(silent, ages) if age > robot.safety.stale_observation_age * NS]
    assert stale and report.dropped_stale == len(stale)
    kept = [k for k in range(40) if k not in stale]
    assert len(found) == 1 and len(found[0]) == len(kept)
    np.testing.assert_allclose(found[0].actions, actions[kept], atol=1e-6)
    np.testing.assert_allclose(found[0].observations["agent_pos"], np.stack([observations[k]["agent_pos"] for k in kept]),
                               atol=1e-6)
    assert report.observation_age_ms["max"] <= 500.0
    assert found[0].metadata["dropped_ticks"] == len(stale)


def test_episodes_split_on_a_gap_or_the_done_topic_or_not_at_all(tmp_path):
    robot = load_robot_config(REALTIME)
    episodes, successes = three_episodes(robot, seed=4)
    with BagWriter(tmp_path / "gaps.bag") as bag:      # no reset topic; 2 s between episodes
        write_run(bag, robot, episodes, [False, False, False], pause=2 * NS, reset_topic=False)
    found, report = read_bag(tmp_path / "gaps.bag", REALTIME)
    assert report.split == "gap" and [len(e) for e in found] == [12, 7, 9]
    for episode, (observations, actions) in zip(found, episodes):
        assert_episode(episode, observations, actions, False)
    # a gap longer than the pauses, or no split: one episode of all 28 commands (the pauses hold no command)
    whole, whole_report = read_bag(tmp_path / "gaps.bag", REALTIME, BagOptions(split="gap", gap=5.0))
    assert len(whole) == 1 and len(whole[0]) == 28 and whole_report.split == "gap"
    one, _ = read_bag(tmp_path / "gaps.bag", REALTIME, BagOptions(split="none"))
    assert len(one) == 1 and len(one[0]) == 28
    np.testing.assert_allclose(one[0].actions, np.concatenate([a for _, a in episodes]), atol=1e-6)

    # the done topic (and an explicitly named episode topic) split just as the request topic does
    with BagWriter(tmp_path / "done.bag") as bag:
        starts = write_run(bag, robot, episodes, successes, pause=NS // 5, reset_topic=False)
        for t in starts:
            # after the first observation, as the twin does: it says reset done once that is out
            bag.write(robot.reset.done_topic, "std_msgs/String", t + 1, {"data": "{}"})
            bag.write("/my/episode", "std_msgs/Bool", t - 1, {"data": True})
    found, report = read_bag(tmp_path / "done.bag", REALTIME)
    assert report.episode_topic == robot.reset.done_topic and [len(e) for e in found] == [12, 7, 9]
    assert [e.success for e in found] == successes
    named, report = read_bag(tmp_path / "done.bag", REALTIME, BagOptions(split="topic", episode_topic="/my/episode"))
    assert report.episode_topic == "/my/episode" and [len(e) for e in named] == [12, 7, 9]
    # 0.2 s pauses are shorter than the default 1 s gap: without a topic, it is one episode up to the first success
    merged, _ = read_bag(tmp_path / "done.bag", REALTIME, BagOptions(split="gap"))
    assert [len(e) for e in merged] == [12] and merged[0].success


def test_camera_images_are_decoded_to_rgb_uint8(tmp_path):
    """A robot YAML with a camera (bgr8 on the wire, as many drivers publish): the episode holds H x W x 3 RGB
    uint8 frames equal to what was published."""
    robot_path = robot_yaml(tmp_path, extra_observations={
        "top_image": {"topic": "/camera/top/image_raw", "type": "sensor_msgs/Image", "shape": [6, 8, 3],
                      "encoding": "bgr8"}})
    robot = load_robot_config(robot_path)
    rng = np.random.default_rng(5)
    episodes = [make_episode(rng, robot, 5)]
    with BagWriter(tmp_path / "camera", ros_version=2) as bag:
        write_run(bag, robot, episodes, [True])
    found, _ = read_bag(tmp_path / "camera", robot_path)
    frames = found[0].observations["top_image"]
    assert frames.dtype == np.uint8 and frames.shape == (5, 6, 8, 3)
    np.testing.assert_array_equal(frames, np.stack([o["top_image"] for o in episodes[0][0][:-1]]))
    np.testing.assert_array_equal(found[0].final_observation["top_image"], episodes[0][0][-1]["top_image"])
    # the bgr8 bytes in the bag really are channel-swapped: decoding them as rgb8 would not give the frame
    with BagWriter(tmp_path / "one.bag") as bag:
        Publisher(bag, robot).observation(T0, episodes[0][0][0], topics=["/camera/top/image_raw"])
    with open_bag(tmp_path / "one.bag") as reader:
        (connection, _, raw), = list(reader.messages())
        message = message_to_dict(reader.deserialize(raw, connection.msgtype))
    assert message["encoding"] == "bgr8"
    np.testing.assert_array_equal(decode_image(message), episodes[0][0][0]["top_image"])
    assert not np.array_equal(decode_image({**message, "encoding": "rgb8"}), episodes[0][0][0]["top_image"])

    wrong = robot_yaml(tmp_path, name="wrong.yaml", extra_observations={
        "top_image": {"topic": "/camera/top/image_raw", "type": "sensor_msgs/Image", "shape": [8, 8, 3]}})
    with pytest.raises(BagError, match=r"topic '/camera/top/image_raw' \(extra_observations.top_image.*6x8x3"):
        read_bag(tmp_path / "camera", wrong)


# --- bad input -------------------------------------------------------------------------------------------------


def one_episode_bag(path, robot, **changes):
    """A good one-episode bag, except for what ``changes`` alters: drop_topic, goal_type, command_values,
    joint_names, stamp_back (header stamp of joint_states message 3 set 1 s back)."""
    rng = np.random.default_rng(6)
    observations, actions = make_episode(rng, robot, 6)
    with BagWriter(path) as bag:
        pub = Publisher(bag, robot)
        t = T0
        for k, action in enumerate(actions):
            for topic, sources in pub.by_topic.items():
                if topic == changes.get("drop_topic"):
                    continue
                if topic == "/pointmass/goal" and changes.get("goal_type"):
                    bag.write(topic, "std_msgs/Float64MultiArray", t, encode_fields(
                        "std_msgs/Float64MultiArray", [{"value": observations[k]["goal_pos"]}]))
                    continue
                stamp = t - NS if (changes.get("stamp_back") and topic == "/pointmass/joint_states" and k == 3) else t
                pub.observation(t, observations[k], topics=[topic], stamp=stamp)
                if changes.get("joint_names") and topic == "/pointmass/joint_states" and k == 4:
                    message = encode_fields("sensor_msgs/JointState", [
                        {"value": observations[k]["agent_pos"], "field": "position", "joints": ["slide_x", "slide_z"]}],
                        stamp=t / NS)
                    bag.write(topic, "sensor_msgs/JointState", t + 1, message)
            values = changes["command_values"] if (changes.get("command_values") is not None and k == 2) else action
            bag.write(robot.command.topic, robot.command.type, t + 1_000_000,
                      encode_command(robot.command.type, np.asarray(values)))
            t += PERIOD
    return path


def refusal(bag, robot_yaml, options=None):
    """The BagError message ``read_bag`` raises for ``bag``; every refusal names the bag."""
    with pytest.raises(BagError) as error:
        read_bag(bag, robot_yaml, *([options] if options is not None else []))
    text = str(error.value)
    assert str(bag) in text
    return text


def test_a_missing_topic_names_the_bag_the_topic_and_the_yaml_field(tmp_path):
    robot = load_robot_config(REALTIME)
    bag = one_episode_bag(tmp_path / "nogoal.bag", robot, drop_topic="/pointmass/goal")
    text = refusal(bag, REALTIME)
    assert "topic '/pointmass/goal'" in text and "observations.goal_pos" in text
    assert "is not in the bag" in text and "/pointmass/joint_states" in text   # lists what the bag has


def test_a_message_type_that_does_not_match_the_yaml_is_refused(tmp_path):
    robot = load_robot_config(REALTIME)
    bag = one_episode_bag(tmp_path / "goaltype.bag", robot, goal_type=True)
    text = refusal(bag, REALTIME)
    assert "topic '/pointmass/goal' is std_msgs/Float64MultiArray in the bag" in text
    assert "field 'observations.goal_pos.type' says geometry_msgs/PoseStamped" in text


def test_messages_of_the_wrong_size_are_refused(tmp_path):
    robot = load_robot_config(REALTIME)
    bag = one_episode_bag(tmp_path / "cmd3.bag", robot, command_values=[0.1, 0.2, 0.3])
    text = refusal(bag, REALTIME)
    assert "topic '/pointmass/command' (command, field 'data'): message 2" in text
    assert "has 3 values, but task 'pointmass' has 2 action dims" in text

    bag = one_episode_bag(tmp_path / "joints.bag", robot, joint_names=True)
    text = refusal(bag, REALTIME)
    assert "topic '/pointmass/joint_states' (observations.agent_pos, field 'position')" in text
    assert "joints ['slide_y'] not in the message" in text

    # an array observation whose messages hold fewer values than the key's shape
    array_goal = {"topic": "/pointmass/goal", "type": "std_msgs/Float64MultiArray"}
    good_yaml = robot_yaml(tmp_path, name="array.yaml", **{"observations.goal_pos": array_goal})
    bag = one_episode_bag(tmp_path / "array.bag", robot, goal_type=True)
    assert read_bag(bag, good_yaml)[0][0].observations["goal_pos"].shape == (6, 2)
    wide = robot_yaml(tmp_path, name="wide.yaml", **{"observations.goal_pos": array_goal},
                      extra_observations={"goal_wide": {**array_goal, "shape": [3]}})
    text = refusal(bag, wide)
    assert "topic '/pointmass/goal' (extra_observations.goal_wide, field 'data'): message 0" in text
    assert "has 2 values, but 'goal_wide' has shape [3]" in text


def test_timestamps_going_backwards_are_refused(tmp_path):
    robot = load_robot_config(REALTIME)
    bag = one_episode_bag(tmp_path / "back.bag", robot, stamp_back=True)
    for clock in ("receive", "header"):
        text = refusal(bag, REALTIME, BagOptions(clock=clock))
        assert "topic '/pointmass/joint_states' field 'header.stamp'" in text
        assert "timestamps go backwards: message 3" in text and "before message 2" in text


def test_header_clock_places_messages_by_their_stamps(tmp_path):
    """Joint states stamped 30 ms before the recorder got them (a driver's transport delay): on the receive
    clock they are too late for the command at +20 ms and the previous one is taken; on the header clock the
    current one is."""
    robot = load_robot_config(REALTIME)
    rng = np.random.default_rng(7)
    observations, actions = make_episode(rng, robot, 8)
    with BagWriter(tmp_path / "delay.bag") as bag:
        pub = Publisher(bag, robot)
        t = T0
        for k, action in enumerate(actions):
            pub.observation(t, observations[k], topics=["/pointmass/goal"])
            pub.observation(t + 30_000_000, observations[k], topics=["/pointmass/joint_states"], stamp=t)
            pub.command(t + 20_000_000, action)
            t += PERIOD
        pub.observation(t, observations[-1])
    header, _ = read_bag(tmp_path / "delay.bag", REALTIME, BagOptions(clock="header"))
    np.testing.assert_allclose(header[0].observations["agent_pos"],
                               np.stack([o["agent_pos"] for o in observations[:-1]]), atol=1e-6)
    receive, report = read_bag(tmp_path / "delay.bag", REALTIME, BagOptions(clock="receive"))
    assert report.dropped_waiting == 1      # the first command came before any joint state arrived
    np.testing.assert_allclose(receive[0].observations["agent_pos"],
                               np.stack([o["agent_pos"] for o in observations[:-2]]), atol=1e-6)


def test_unreadable_bags_and_bad_options_are_errors(tmp_path):
    from robofinetune.cli import main

    (tmp_path / "junk.bag").write_bytes(b"not a bag at all")
    with pytest.raises(BagError, match="junk.bag: cannot read it as a ROS bag"):
        read_bag(tmp_path / "junk.bag", REALTIME)
    with pytest.raises(BagError, match="missing.bag: not found"):
        read_bag(tmp_path / "missing.bag", REALTIME)
    robot = load_robot_config(REALTIME)
    bag = one_episode_bag(tmp_path / "ok.bag", robot)
    with pytest.raises(BagError, match="split by topic, but neither reset.request_topic"):
        read_bag(bag, REALTIME, BagOptions(split="topic"))
    with pytest.raises(BagError, match="gap 0.01 s must be longer than the control period"):
        read_bag(bag, REALTIME, BagOptions(gap=0.01))
    assert main(["data", "convert", str(bag), str(tmp_path / "out.hdf5")]) == 2            # no --robot
    assert not (tmp_path / "out.hdf5").exists()
    zero = robot_yaml(tmp_path, name="zero.yaml", **{"command.scale": [1.0, 0.0]})
    with pytest.raises(BagError, match="field 'command.scale' has a 0 entry"):
        read_bag(bag, zero)


# --- data info on a bag ------------------------------------------------------------------------------------------


def test_data_info_lists_topics_rates_and_what_the_robot_yaml_lacks(tmp_path, capsys):
    from robofinetune.cli import main

    robot = load_robot_config(REALTIME)
    bag = one_episode_bag(tmp_path / "nogoal.bag", robot, drop_topic="/pointmass/goal")
    info = bag_info(bag, robot=REALTIME)
    topics = {item["topic"]: item for item in info["topics"]}
    assert set(topics) == {"/pointmass/joint_states", "/pointmass/command"}
    assert topics["/pointmass/joint_states"]["type"] == "sensor_msgs/JointState"
    assert topics["/pointmass/joint_states"]["count"] == 6 and topics["/pointmass/joint_states"]["rate_hz"] == pytest.approx(20.0)
    assert topics["/pointmass/joint_states"]["serves"] == ["observations.agent_pos", "observations.agent_vel"]
    assert topics["/pointmass/command"]["serves"] == ["command"]
    assert {m["field"] for m in info["robot"]["missing"]} == {"observations.goal_pos", "success"}

    assert main(["data", "info", str(bag), f"--robot={REALTIME}"]) == 0
    out = capsys.readouterr().out
    assert "ROS 1 bag" in out and "/pointmass/joint_states  sensor_msgs/JointState" in out
    assert "missing: observations.goal_pos <- /pointmass/goal (geometry_msgs/PoseStamped)" in out
    mismatch = one_episode_bag(tmp_path / "goaltype.bag", robot, goal_type=True)
    assert main(["data", "info", str(mismatch), f"--robot={REALTIME}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["robot"]["type_mismatch"] == [{"field": "observations.goal_pos", "topic": "/pointmass/goal",
                                                 "expected": "geometry_msgs/PoseStamped",
                                                 "bag": ["std_msgs/Float64MultiArray"]}]
    assert main(["data", "info", str(bag)]) == 0        # without a robot: topics only
    assert "serves" not in capsys.readouterr().out


# --- the real `rosbag record` against the twin ---------------------------------------------------------------------


def _ros_ready() -> bool:
    from robofinetune.robot.transport import ros_available

    return ros_available() and shutil.which("rosbag") is not None


@pytest.mark.ros
@pytest.mark.skipif(not _ros_ready(), reason="ROS 1 (rospy, roscore, rosbag) is not installed; CI installs it")
def test_rosbag_record_of_the_twin_converts_to_the_episodes_the_recorder_wrote(tmp_path, capsys):
    """`rosbag record` listens while `robofinetune record` drives the lockstep pointmass twin with its scripted
    expert: the converted bag holds the same episodes, actions and successes the recorder wrote. (rosbag connects
    to the recorder's new command publisher only after its first messages: the first episode is a warm-up.)"""
    import os
    import signal
    import subprocess
    import time

    from robofinetune.cli import main
    from robofinetune.data.io import load_dataset
    from robofinetune.robot.roscore import session_master
    from test_robot_ros import Twin

    session_master()   # sets ROS_MASTER_URI (and ROS_HOME) in os.environ for this process and its children
    robot = load_robot_config(LOCKSTEP)
    topics = sorted({*robot.topics(), robot.command.topic, robot.success.topic, robot.reset.request_topic,
                     robot.reset.done_topic})
    bag_path = tmp_path / "twin.bag"
    with Twin(LOCKSTEP, "--expert-teleop"):
        recorder = subprocess.Popen(["rosbag", "record", "-O", str(bag_path), "__name:=bag_recorder", *topics],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                    env=os.environ.copy(), start_new_session=True)
        try:
            deadline = time.monotonic() + 20   # rosbag subscribes once it has looked the topics up
            while not any(tmp_path.glob("twin.bag*")) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)
            output = tmp_path / "recorded.hdf5"
            assert main(["record", f"--robot={LOCKSTEP}", "--teleop=ros-topic", f"--output={output}",
                         "--no-status", "--episodes=3"]) == 0
            time.sleep(0.5)
        finally:
            os.killpg(recorder.pid, signal.SIGINT)
            recorder.wait(20)
    capsys.readouterr()
    assert main(["data", "convert", str(bag_path), str(tmp_path / "from_bag.hdf5"), f"--robot={LOCKSTEP}"]) == 0
    out = capsys.readouterr().out
    recorded, _ = load_dataset(tmp_path / "recorded.hdf5")
    converted, env_meta = load_dataset(tmp_path / "from_bag.hdf5")
    assert env_meta["source"] == "rosbag" and len(recorded) == 3 and len(converted) in (3, 4), out
    assert [e.metadata.get("seed") for e in converted[-2:]] == [1, 2]   # from the reset requests
    exact = total = 0
    for bag_episode, direct in zip(converted[-2:], recorded[-2:]):
        assert bag_episode.success and direct.success
        # the success message, stamped like any observation, can also come one step early: the episode then ends
        # one step sooner, never later and never by more
        steps = len(bag_episode)
        assert len(direct) - 1 <= steps <= len(direct)
        np.testing.assert_allclose(bag_episode.actions, direct.actions[:steps], atol=1e-6)
        # rosbag stamps each topic when its own subscriber gets the message: when it gets a command later than
        # the twin's answer to it (a few ms in lockstep), that step shows the answer, one step early. Every
        # observation is the recorder's own at that step or the next one, never anything else.
        states = np.concatenate([direct.observations[key] for key in sorted(direct.observations)], axis=1)[:steps]
        following = np.concatenate([direct.next_observations()[key] for key in sorted(direct.observations)],
                                   axis=1)[:steps]
        from_bag = np.concatenate([bag_episode.observations[key] for key in sorted(direct.observations)], axis=1)
        same = np.all(np.abs(from_bag - states) <= 1e-6, axis=1)
        one_early = np.all(np.abs(from_bag - following) <= 1e-6, axis=1)
        assert np.all(same | one_early), np.nonzero(~(same | one_early))[0]
        exact, total = exact + int(same.sum()), total + len(same)
    # how many are exact depends on the machine's load (rosbag's subscribers' timing), so it is not asserted;
    # that some are shows the rule is not "always one step early"
    assert exact > 0, f"none of {total} bag observations is the recorder's own at its step"
