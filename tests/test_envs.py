"""Env interface: task specs, spaces, seeding, success/termination, errors, vector envs, robosuite wrapper."""

from __future__ import annotations

import json
import time

import gymnasium
import numpy as np
import pytest
import yaml

from robofinetune.envs import list_tasks, load_task_spec, make_env, make_vector_env
from robofinetune.errors import TaskError
from robofinetune.paths import task_specs_dir

# --- task specs ------------------------------------------------------------------------------------------------


def test_list_tasks_has_the_shipped_tasks():
    assert {"pointmass", "lift", "can", "square"} <= set(list_tasks())


@pytest.mark.parametrize(
    "task, obs_dim, object_dim, horizon",
    [("can", 23, 14, 400), ("lift", 19, 10, 200), ("square", 23, 14, 400)],
)
def test_robosuite_specs_follow_robomimic_keys(task, obs_dim, object_dim, horizon):
    spec = load_task_spec(task)
    assert spec.kind == "robosuite"
    assert spec.obs_keys == ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"]
    assert spec.obs_shapes["object"] == (object_dim,)
    assert spec.obs_dim == obs_dim
    assert spec.action_dim == 7
    assert spec.horizon == horizon
    assert spec.control_freq == 20
    assert spec.env_kwargs["hard_reset"] is False
    assert spec.env_kwargs["use_camera_obs"] is False
    assert spec.env_kwargs["controller_configs"] == "OSC_POSE"


def test_pointmass_spec():
    spec = load_task_spec("pointmass")
    assert spec.obs_keys == ["agent_pos", "agent_vel", "goal_pos"]
    assert spec.obs_dim == 6 and spec.action_dim == 2
    assert load_task_spec(spec) is spec


def test_unknown_task_lists_known_tasks():
    with pytest.raises(TaskError) as err:
        load_task_spec("no_such_task")
    message = str(err.value)
    assert "no_such_task" in message and "can" in message and "pointmass" in message
    with pytest.raises(TaskError):
        make_env("no_such_task")


def test_task_spec_from_yaml_path(tmp_path):
    raw = yaml.safe_load((task_specs_dir() / "pointmass.yaml").read_text())
    raw["name"] = "short_pointmass"
    raw["horizon"] = 7
    raw["env_kwargs"]["model_path"] = str(task_specs_dir() / "assets" / "pointmass.xml")
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_task_spec(path)
    assert spec.name == "short_pointmass" and spec.horizon == 7
    env = make_env(str(path), seed=0)
    env.reset()
    steps = 0
    while True:
        _, _, terminated, truncated, _ = env.step(np.zeros(2))
        steps += 1
        if terminated or truncated:
            break
    assert truncated and steps == 7


def test_bad_task_file_names_the_field(tmp_path):
    raw = yaml.safe_load((task_specs_dir() / "pointmass.yaml").read_text())
    raw["horizon"] = -3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(TaskError, match="horizon"):
        load_task_spec(path)
    raw["horizon"] = 10
    raw["obs_keys"] = {"agent_pos": ["two"]}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(TaskError, match="agent_pos"):
        load_task_spec(path)
    with pytest.raises(TaskError, match="does not exist"):
        load_task_spec(tmp_path / "missing.yaml")


def test_bad_env_kwargs_is_a_task_error():
    with pytest.raises(TaskError, match="env_kwargs"):
        make_env("pointmass", not_a_real_option=1)


# --- pointmass: the generic Env contract -----------------------------------------------------------------------


def test_pointmass_spaces_and_key_order():
    env = make_env("pointmass", seed=0)
    spec = env.task_spec
    assert isinstance(env.observation_space, gymnasium.spaces.Dict)
    assert list(env.observation_space.spaces) == spec.obs_keys
    for key, space in env.observation_space.spaces.items():
        assert space.dtype == np.float32 and space.shape == spec.obs_shapes[key]
    assert env.action_space.shape == (2,) and env.action_space.dtype == np.float32
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    obs, info = env.reset()
    assert list(obs) == spec.obs_keys
    assert env.observation_space.contains(obs)
    assert info["is_success"] is False


def test_is_success_on_every_step():
    env = make_env("pointmass", seed=1)
    env.reset()
    for _ in range(30):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert isinstance(info["is_success"], bool)
        assert reward == (1.0 if info["is_success"] else 0.0)
        assert terminated == info["is_success"]
        if terminated or truncated:
            env.reset()


def test_success_terminates_with_reward_one():
    env = make_env("pointmass", seed=0)
    goal = np.array([0.1, -0.2])
    env.reset(options={"start": goal + [0.005, 0.0], "goal": goal})
    obs, reward, terminated, truncated, info = env.step(np.zeros(2))
    assert terminated and not truncated and reward == 1.0 and info["is_success"]
    # far from the goal, or at the goal but moving fast, is not a success
    env.reset(options={"start": goal + [0.2, 0.0], "goal": goal})
    _, reward, terminated, _, info = env.step(np.zeros(2))
    assert not terminated and reward == 0.0 and not info["is_success"]
    env.reset(options={"start": goal - [0.01, 0.0], "goal": goal})
    _, _, terminated, _, info = env.step(np.array([1.0, 0.0]))
    _, _, terminated, _, info = env.step(np.array([1.0, 0.0]))
    assert not info["is_success"]


def test_truncated_exactly_at_horizon_override():
    env = make_env("pointmass", seed=0, horizon=5)
    assert env.task_spec.horizon == 5
    env.reset(options={"start": np.array([0.3, 0.3]), "goal": np.array([-0.3, -0.3])})
    flags = [env.step(np.zeros(2))[3] for _ in range(5)]
    assert flags == [False, False, False, False, True]


def test_seeding_is_reproducible():
    first = make_env("pointmass", seed=123).reset()[0]
    second = make_env("pointmass", seed=123).reset()[0]
    other = make_env("pointmass", seed=124).reset()[0]
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    assert not np.array_equal(first["goal_pos"], other["goal_pos"])
    # reset(seed=...) reseeds; the same actions then give the same trajectory
    env_a, env_b = make_env("pointmass"), make_env("pointmass")
    obs_a, obs_b = env_a.reset(seed=7)[0], env_b.reset(seed=7)[0]
    actions = np.random.default_rng(0).uniform(-1, 1, size=(20, 2))
    for action in actions:
        obs_a = env_a.step(action)[0]
        obs_b = env_b.step(action)[0]
    for key in obs_a:
        np.testing.assert_array_equal(obs_a[key], obs_b[key])
    # unseeded resets differ from episode to episode
    goals = {tuple(env_a.reset()[0]["goal_pos"]) for _ in range(5)}
    assert len(goals) == 5


@pytest.mark.parametrize("bad", [[np.nan, 0.0], [0.0, np.inf], [-np.inf, 1.0]])
def test_non_finite_action_raises(bad):
    env = make_env("pointmass", seed=0)
    env.reset()
    with pytest.raises(ValueError, match="action"):
        env.step(np.array(bad))


def test_wrong_action_shape_raises():
    env = make_env("pointmass", seed=0)
    env.reset()
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3))


def test_actions_are_clipped():
    env_a, env_b = make_env("pointmass"), make_env("pointmass")
    env_a.reset(seed=5)
    env_b.reset(seed=5)
    obs_a = env_a.step(np.array([100.0, -7.0]))[0]
    obs_b = env_b.step(np.array([1.0, -1.0]))[0]
    np.testing.assert_array_equal(obs_a["agent_vel"], obs_b["agent_vel"])


def test_pointmass_long_run_stays_in_the_arena():
    """Throughput run (the rate is printed, not asserted): many random steps; the walls hold the mass although
    random forces drive it into them, and episodes end only by success or exactly at the horizon."""
    env = make_env("pointmass", seed=0)
    env.reset()
    n, lengths, successes, steps, reach = 5000, [], 0, 0, 0.0
    start = time.perf_counter()
    for _ in range(n):
        obs, _, terminated, truncated, info = env.step(env.action_space.sample())
        steps += 1
        reach = max(reach, float(np.abs(obs["agent_pos"]).max()))
        assert np.all(np.abs(obs["agent_pos"]) <= 0.5)
        assert not (terminated and truncated) and terminated == info["is_success"]
        if terminated or truncated:
            lengths.append(steps)
            successes += int(terminated)
            assert terminated or steps == env.task_spec.horizon, steps
            steps = 0
            env.reset()
    rate = n / (time.perf_counter() - start)
    print(f"pointmass: {rate:.0f} steps/s single process")
    assert reach > 0.45, reach   # the random walk does reach the walls: the bound above was tested
    assert len(lengths) >= 40 and successes <= 0.1 * len(lengths), (successes, len(lengths))  # noise seldom stops at a goal


def _rendering_available() -> bool:
    try:
        env = make_env("pointmass", render=True)
        env.close()
        return True
    except Exception:  # noqa: BLE001 - no GL on this machine
        return False


@pytest.mark.skipif(not _rendering_available(), reason="no offscreen OpenGL (set MUJOCO_GL=egl or osmesa)")
def test_pointmass_render():
    env = make_env("pointmass", seed=0, render=True, render_size=(96, 128))
    env.reset()
    frame = env.render()
    assert frame.shape == (96, 128, 3) and frame.dtype == np.uint8
    assert frame.std() > 0  # not a blank image
    env.step(np.array([1.0, 1.0]))
    for _ in range(10):
        env.step(np.array([1.0, 1.0]))
    assert not np.array_equal(frame, env.render())  # the agent moved
    env.close()
    with pytest.raises(RuntimeError, match="render"):
        make_env("pointmass").render()


# --- vector envs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("asynchronous", [False, True])
def test_vector_env_batches_dict_obs_and_seeds_each_env(asynchronous):
    venv = make_vector_env("pointmass", num_envs=3, seed=10, asynchronous=asynchronous)
    try:
        assert isinstance(venv, gymnasium.vector.AsyncVectorEnv if asynchronous else gymnasium.vector.SyncVectorEnv)
        obs, info = venv.reset()
        assert list(obs) == ["agent_pos", "agent_vel", "goal_pos"]
        assert all(value.shape == (3, 2) and value.dtype == np.float32 for value in obs.values())
        for i in range(3):
            single = make_env("pointmass", seed=10 + i).reset()[0]
            np.testing.assert_array_equal(obs["goal_pos"][i], single["goal_pos"])
        obs, reward, terminated, truncated, info = venv.step(np.zeros((3, 2), dtype=np.float32))
        assert reward.shape == (3,) and terminated.shape == (3,) and info["is_success"].shape == (3,)
    finally:
        venv.close()


def test_vector_env_autoresets_in_the_same_step():
    venv = make_vector_env("pointmass", num_envs=2, seed=0, asynchronous=False, horizon=3)
    obs, _ = venv.reset()
    first_goals = obs["goal_pos"].copy()
    for _ in range(3):
        obs, _, terminated, truncated, info = venv.step(np.zeros((2, 2), dtype=np.float32))
    assert truncated.all() and not terminated.any()
    assert info["_final_obs"].all()
    # the returned obs already belong to the next episode; the last obs of the old one is in final_obs
    assert not np.allclose(obs["goal_pos"], first_goals)
    np.testing.assert_array_equal(info["final_obs"][0]["goal_pos"], first_goals[0])
    venv.close()


@pytest.mark.skipif(not _rendering_available(), reason="no offscreen OpenGL (set MUJOCO_GL=egl or osmesa)")
def test_async_vector_env_renders_even_after_the_parent_rendered():
    """A GL context in the parent must not hang the workers (EGL does in forked children)."""
    parent = make_env("pointmass", render=True, render_size=(32, 32))
    parent.reset()
    parent.render()
    venv = make_vector_env("pointmass", num_envs=2, seed=0, render=True, render_size=(48, 40))
    try:
        venv.reset()
        frames = venv.call("render")
        assert [frame.shape for frame in frames] == [(48, 40, 3), (48, 40, 3)]
        assert parent.render().shape == (32, 32, 3)
    finally:
        venv.close()
        parent.close()


def test_vector_env_rejects_zero_envs():
    with pytest.raises(ValueError):
        make_vector_env("pointmass", num_envs=0)


# --- robosuite (one env for the module: the first robosuite.make takes ~5 s) -------------------------------------


@pytest.fixture(scope="module")
def can_env():
    env = make_env("can", seed=0, render=_rendering_available(), render_size=(64, 80))
    yield env
    env.close()


def test_can_env_spaces_steps_and_success_flag(can_env):
    spec = can_env.task_spec
    assert list(can_env.observation_space.spaces) == spec.obs_keys
    assert can_env.action_space.shape == (7,)
    obs, info = can_env.reset(seed=0)
    assert list(obs) == spec.obs_keys and can_env.observation_space.contains(obs)
    assert sum(value.size for value in obs.values()) == 23
    for _ in range(5):
        obs, reward, terminated, truncated, info = can_env.step(can_env.action_space.sample())
        assert info["is_success"] is False and reward == 0.0 and not terminated and not truncated
    with pytest.raises(ValueError, match="action"):
        can_env.step(np.full(7, np.nan))


def test_can_object_uses_robomimic_layout(can_env):
    obs, _ = can_env.reset(seed=3)
    rs = can_env.robosuite_env
    can_pos = rs.sim.data.body_xpos[rs.obj_body_id["Can"]]
    np.testing.assert_allclose(obs["object"][:3], can_pos, atol=1e-6)  # Can_pos first (robomimic order)
    assert abs(np.linalg.norm(obs["object"][3:7]) - 1.0) < 1e-4  # Can_quat
    # Can_to_robot0_eef_pos: the can in the gripper frame, so its norm is the can-eef distance; never the
    # zeros robosuite 1.5 reports right after reset
    distance = np.linalg.norm(can_pos - obs["robot0_eef_pos"])
    assert distance > 0.05
    assert abs(np.linalg.norm(obs["object"][7:10]) - distance) < 1e-4


def test_can_reset_seed_reproduces_placement(can_env):
    first = can_env.reset(seed=11)[0]["object"].copy()
    can_env.reset(seed=12)
    again = can_env.reset(seed=11)[0]["object"]
    other = can_env.reset(seed=12)[0]["object"]
    np.testing.assert_allclose(first, again, atol=1e-6)
    assert np.linalg.norm(first[:2] - other[:2]) > 1e-3


def test_can_get_and_set_state_replays(can_env):
    can_env.reset(seed=1)
    rng = np.random.default_rng(0)
    for _ in range(3):
        obs_at_state = can_env.step(rng.uniform(-1, 1, 7))[0]
    state = can_env.get_state()
    sim = can_env.robosuite_env.sim
    assert state.shape == (1 + sim.model.nq + sim.model.nv,)
    obs_next = can_env.step(np.zeros(7))[0]
    for _ in range(5):
        can_env.step(rng.uniform(-1, 1, 7))
    assert not np.allclose(can_env.get_state(), state)
    # the observation at a restored state is exactly the one seen at that state
    obs_back = can_env.set_state(state)
    np.testing.assert_allclose(can_env.get_state(), state)
    for key in obs_at_state:
        np.testing.assert_allclose(obs_back[key], obs_at_state[key], atol=1e-6)
    # (stepping on is close, not exact: the gripper controller keeps its own rate-limited command)
    obs_again = can_env.step(np.zeros(7))[0]
    for key in obs_next:
        np.testing.assert_allclose(obs_again[key], obs_next[key], atol=5e-3)
    with pytest.raises(ValueError, match="state"):
        can_env.set_state(state[:-1])


def test_can_env_meta_is_json(can_env):
    meta = can_env.env_meta
    assert meta["env_name"] == "PickPlaceCan" and meta["env_type"] == 1
    assert meta["env_kwargs"]["controller_configs"]["body_parts"]["right"]["type"] == "OSC_POSE"
    json.dumps(meta)


def test_can_render(can_env):
    if can_env.render_mode is None:
        pytest.skip("no offscreen OpenGL")
    can_env.reset(seed=0)
    frame = can_env.render()
    assert frame.shape == (64, 80, 3) and frame.dtype == np.uint8 and frame.std() > 0
