"""The camera path over a real roscore: the MuJoCo twin of pointmass_image publishes sensor_msgs/Image, RobotEnv
decodes it to the frames the env renders, `deploy` runs an image policy, and the recorder's image datasets survive
a kill -9 (the same checks without ROS are in tests/test_robot_images.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_robot_images import POINTMASS_IMAGE, image_policy
from test_robot_ros import Twin, record_then_kill9

from robofinetune.robot.transport import ros_available

pytestmark = [pytest.mark.ros,
              pytest.mark.skipif(not ros_available(), reason="ROS 1 is not installed (apt-get install ros-core "
                                 "python3-rospy python3-sensor-msgs python3-geometry-msgs python3-std-msgs); CI "
                                 "installs it")]


@pytest.fixture(scope="module")
def ros_master():
    from robofinetune.robot.roscore import session_master

    return session_master()


@pytest.fixture(scope="module")
def image_policy_path(tmp_path_factory):
    """An untrained pointmass_image policy saved as a checkpoint (the camera path, not skill, is under test)."""
    from robofinetune.policies import save_policy

    return save_policy(image_policy(), tmp_path_factory.mktemp("image_policy") / "policy", {"task": "pointmass_image"})


def test_twin_frames_over_ros_equal_the_rendered_ones_and_drive_an_image_policy(ros_master):
    from robofinetune.envs import make_env
    from robofinetune.robot.env import RobotEnv
    from robofinetune.robot.runner import run_policy

    class Keep(list):
        append = list.append

    sink = Keep()
    with Twin(POINTMASS_IMAGE):
        env = RobotEnv(POINTMASS_IMAGE, overrides={"control_rate": 50, "max_episode_steps": 30})
        try:
            result = run_policy(env, image_policy(), 1, seed=70, sink=sink)
        finally:
            env.close()
    episode, = sink
    assert result.episodes[0].length == len(episode) and result.episodes[0].latency_ms_p50 is not None
    assert episode.observations["top_image"].dtype == np.uint8
    assert episode.observations["top_image"].shape == (len(episode), 32, 32, 3)
    sim = make_env("pointmass_image")
    try:
        obs, _ = sim.reset(seed=70)
        for step in range(len(episode)):
            for key in obs:
                assert np.array_equal(episode.observations[key][step], obs[key]), (key, step)
            obs, *_ = sim.step(episode.actions[step])
    finally:
        sim.close()


def test_deploy_command_runs_an_image_policy_over_ros(ros_master, image_policy_path, tmp_path):
    from robofinetune.data.io import load_dataset
    from robofinetune.robot.cli import main

    with Twin(POINTMASS_IMAGE):
        code = main(["deploy", f"--robot={POINTMASS_IMAGE}", f"--policy={image_policy_path}", "--episodes=2",
                     "--force", f"--runs-dir={tmp_path}", "--no-status", "--set", "control_rate=50",
                     "--set", "max_episode_steps=25"])
    assert code == 0
    run = next(tmp_path.iterdir())
    report = json.loads((run / "deploy.json").read_text())
    assert report["episodes"] == 2 and report["latency_ms"]["p50"] is not None and report["interventions"] == {}
    episodes, env_meta = load_dataset(run / "episodes.hdf5")
    assert env_meta["task"] == "pointmass_image" and [len(e) for e in episodes] == [25, 25]
    assert all(e.observations["top_image"].dtype == np.uint8 and e.observations["top_image"].shape == (25, 32, 32, 3)
               for e in episodes)


# LeRobot encodes each episode's frames as mp4 before it is durable: ~1 min on the loaded 2-core machine
@pytest.mark.parametrize("fmt", ["robomimic", pytest.param("lerobot", marks=pytest.mark.slow)])
def test_image_recorder_kill9_loses_at_most_the_episode_in_progress(ros_master, tmp_path, fmt):
    from robofinetune.data.io import load_dataset

    output = tmp_path / ("demos.hdf5" if fmt == "robomimic" else "demos_lerobot")
    with Twin(POINTMASS_IMAGE, "--expert-teleop"):
        saved = record_then_kill9(output, fmt, robot=POINTMASS_IMAGE, into_next=0.5)   # into the next episode
    episodes, env_meta = load_dataset(output)
    assert len(episodes) == len(saved) == 2 and env_meta["task"] == "pointmass_image"
    for episode in episodes:
        images = episode.observations["top_image"]
        assert episode.success and images.dtype == np.uint8 and images.shape == (len(episode), 32, 32, 3)
