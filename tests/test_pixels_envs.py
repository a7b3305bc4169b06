"""Tasks with cameras: specs, rendered image observations, render settings, vector envs, task sources."""

import inspect
from pathlib import Path

import numpy as np
import pytest
import yaml
from gymnasium import spaces

import robofinetune.envs
import robofinetune.envs.spec
from robofinetune.envs import load_task_spec, make_env, make_vector_env
from robofinetune.envs.experts import make_expert
from robofinetune.envs.spec import Camera, RenderSettings, TaskSource, register_task_source
from robofinetune.errors import TaskError
from robofinetune.paths import task_specs_dir

REPO = Path(__file__).resolve().parents[1]


def test_image_task_specs():
    spec = load_task_spec("pointmass_image")
    assert spec.cameras == [Camera("top", 32, 32)]
    assert spec.image_keys == ["top_image"] and spec.state_keys == ["agent_pos", "agent_vel"]
    assert spec.state_dim == 4 and spec.obs_dim == 4 + 32 * 32 * 3
    assert spec.render_settings.multisamples == 0
    can = load_task_spec("can_image")
    assert can.image_keys == ["agentview_image", "robot0_eye_in_hand_image"]
    assert "object" not in can.obs_shapes  # no simulator state of the can: it is seen through the cameras
    assert can.state_keys == ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
    assert all(c.height == c.width == 84 for c in can.cameras)
    assert can.render_settings == RenderSettings(shadows=False, reflections=False, skybox=False, haze=False,
                                                 multisamples=0)
    assert can.to_dict()["cameras"][0] == {"name": "agentview", "height": 84, "width": 84}
    # a task without cameras is as before
    plain = load_task_spec("can")
    assert plain.cameras == [] and plain.image_keys == [] and plain.state_dim == plain.obs_dim == 23
    assert "cameras" not in plain.to_dict() and "render_settings" not in plain.to_dict()


def _write_variant(tmp_path, change):
    raw = yaml.safe_load((task_specs_dir() / "pointmass_image.yaml").read_text())
    raw["env_kwargs"]["model_path"] = str(task_specs_dir() / "assets" / "pointmass.xml")
    change(raw)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw["obs_keys"].pop("top_image"), r"camera 'top' is rendered into observation 'top_image', which "
                                                   r"field 'obs_keys' lacks"),
    (lambda raw: raw["obs_keys"].update(top_image=[32, 48, 3]), r"obs_keys.top_image is \[32, 48, 3\] but camera "
                                                                r"'top' renders \[32, 32, 3\]"),
    (lambda raw: raw.pop("cameras"), r"observation 'top_image' is an image but field 'cameras' has no camera 'top'"),
    (lambda raw: raw.update(cameras=[{"name": "top", "height": 0, "width": 32}]), r"cameras\[0\].height must be a "
                                                                                  r"positive int"),
    (lambda raw: raw.update(render_settings={"shadow": False}), r"field 'render_settings' must be a mapping with "
                                                                r"fields among"),
])
def test_bad_camera_specs_name_the_field(tmp_path, change, message):
    path = _write_variant(tmp_path, change)
    with pytest.raises(TaskError, match=message) as err:
        load_task_spec(path)
    assert str(path) in str(err.value)


def test_unknown_camera_names_the_model(tmp_path):
    def change(raw):
        raw["cameras"] = [{"name": "side", "height": 32, "width": 32}]
        raw["obs_keys"] = {"agent_pos": [2], "side_image": [32, 32, 3]}

    with pytest.raises(TaskError, match=r"camera 'side' is not in pointmass.xml \(cameras: \['top'\]\)"):
        make_env(_write_variant(tmp_path, change))


def test_pointmass_image_renders_the_goal_the_state_does_not_show():
    env = make_env("pointmass_image", seed=0)
    try:
        assert env.observation_space["top_image"] == spaces.Box(0, 255, (32, 32, 3), np.uint8)
        assert list(env.observation_space) == ["agent_pos", "agent_vel", "top_image"]
        assert env.unwrapped.model.vis.quality.offsamples == 0  # the spec's render settings
        obs, _ = env.reset(seed=0, options={"start": [0.0, 0.0], "goal": [0.25, 0.25]})
        assert obs["top_image"].dtype == np.uint8 and obs["top_image"].shape == (32, 32, 3)
        assert env.observation_space.contains(obs)
        other, _ = env.reset(seed=0, options={"start": [0.0, 0.0], "goal": [-0.25, -0.25]})
        assert np.array_equal(obs["agent_pos"], other["agent_pos"])
        changed = np.any(obs["top_image"] != other["top_image"], axis=-1)
        assert 2 <= changed.sum() <= 40  # the goal marker moved; nothing else did
        # the marker is green: where it appears, green dominates
        green = other["top_image"][changed & (other["top_image"][..., 1] > other["top_image"][..., 0] + 40)]
        assert len(green) >= 1
        # steps render too (the 1.5 cm agent is about half a pixel here: the image is for the goal)
        stepped, *_ = env.step(np.array([1.0, 0.0]))
        assert stepped["top_image"].dtype == np.uint8 and stepped["top_image"].shape == (32, 32, 3)
    finally:
        env.close()


def test_the_expert_reads_the_hidden_goal_from_the_simulator():
    env = make_env("pointmass_image", seed=0)
    try:
        successes = 0
        for seed in range(3):
            obs, _ = env.reset(seed=seed)
            assert "goal_pos" not in obs
            expert = make_expert("pointmass_image", seed=seed)
            expert.reset(env)
            for _ in range(100):
                obs, _, terminated, truncated, _ = env.step(expert.act(obs))
                if terminated or truncated:
                    break
            successes += int(terminated)
        assert successes == 3
    finally:
        env.close()


def test_vector_env_with_cameras_renders_in_its_workers():
    envs = make_vector_env("pointmass_image", num_envs=2, seed=3)
    try:
        obs, _ = envs.reset(seed=3)
        assert obs["top_image"].shape == (2, 32, 32, 3) and obs["top_image"].dtype == np.uint8
        assert not np.array_equal(obs["top_image"][0], obs["top_image"][1])  # different goals
        obs, *_ = envs.step(np.zeros((2, 2), np.float32))
        assert obs["top_image"].shape == (2, 32, 32, 3)
    finally:
        envs.close()


def test_envs_do_not_import_the_robot_stack():
    # robot YAMLs are a task source the robot package registers; envs names no robot module
    for module in (robofinetune.envs, robofinetune.envs.spec):
        assert "robofinetune.robot" not in inspect.getsource(module)
    spec = load_task_spec(REPO / "real_robot" / "can_twin.yaml")
    assert spec.name == "can" and spec.obs_shapes == load_task_spec("can").obs_shapes
    spec = load_task_spec(str(REPO / "real_robot" / "pointmass_twin.yaml"))
    assert spec.name == "pointmass"


def test_a_registered_task_source_stands_for_a_task(tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text("alias_of: pointmass\n")
    made = []

    def claims(candidate):
        return yaml.safe_load(Path(candidate).read_text()).get("alias_of") is not None

    def task_spec(candidate):
        return load_task_spec(yaml.safe_load(Path(candidate).read_text())["alias_of"])

    def make(candidate, seed=None, **overrides):
        made.append(candidate)
        return make_env(task_spec(candidate), seed=seed, **overrides)

    register_task_source(TaskSource("test-alias", claims, task_spec, make_env=make, single_env=True))
    try:
        assert load_task_spec(path).name == "pointmass"
        env = make_env(path, seed=0)
        assert made == [path] and env.reset()[0].keys() == {"agent_pos", "agent_vel", "goal_pos"}
        env.close()
        vector = make_vector_env(path, num_envs=4)
        assert vector.num_envs == 1  # a single_env source: one env, in this process
        vector.close()
    finally:
        robofinetune.envs.spec._TASK_SOURCES.pop("test-alias")


@pytest.mark.slow
def test_can_image_renders_its_cameras_at_the_state_it_reports():
    # ~10 frames of the can scene (robosuite renders it at ~25-70 ms a frame under software OpenGL)
    env = make_env("can_image", seed=0)
    try:
        sim = env.unwrapped.robosuite_env.sim
        assert sim.model.vis.quality.offsamples == 0
        flags = sim._render_context_offscreen.scn.flags
        assert not any(flags[f] for f in (0, 2, 4, 6))  # shadow, reflection, skybox, haze (mjtRndFlag order)
        obs, _ = env.reset(seed=0)
        assert set(obs) == {"robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "agentview_image",
                            "robot0_eye_in_hand_image"}
        obs, *_ = env.step(np.array([0.5, 0.5, 0.5, 0, 0, 0, -1.0]))
        assert obs["agentview_image"].shape == (84, 84, 3) and obs["agentview_image"].dtype == np.uint8
        # frames rendered at the state the step ends in, as replaying the state renders them
        again = env.unwrapped.set_state(env.unwrapped.get_state())
        for key in obs:
            assert np.array_equal(again[key], obs[key]), key
        assert set(env.unwrapped.expert_observation()) == {"robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos",
                                                         "object"}
    finally:
        env.close()
