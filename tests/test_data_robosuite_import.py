"""Importing robosuite's own demo files (states + actions) by replaying states in the task's env."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from robofinetune.data import convert_dataset, dataset_info, detect_format, load_dataset
from robofinetune.data.robosuite_import import load_robosuite_demo
from robofinetune.errors import DatasetError

pytest.importorskip("robosuite")


SUBSTEP_TOL = 3e-3


def expected_eef(observations: list[dict]) -> np.ndarray:
    return np.stack([o["robot0_eef_pos"] for o in observations[:-1]])


def _write_like_robosuite(path: Path, env_name: str, env_info: dict, demos: list[dict]) -> None:
    """The layout of robosuite's gather_demonstrations_as_hdf5 (scripts/collect_human_demonstrations.py)."""
    import robosuite

    with h5py.File(path, "w") as f:
        grp = f.create_group("data")
        for i, demo in enumerate(demos, start=1):
            ep = grp.create_group(f"demo_{i}")
            ep.attrs["model_file"] = demo["model_file"]
            ep.create_dataset("states", data=np.array(demo["states"]))
            ep.create_dataset("actions", data=np.array(demo["actions"]))
        now = datetime.datetime.now()
        grp.attrs["date"] = f"{now.month}-{now.day}-{now.year}"
        grp.attrs["time"] = f"{now.hour}:{now.minute}:{now.second}"
        grp.attrs["repository_version"] = robosuite.__version__
        grp.attrs["env"] = env_name
        grp.attrs["env_info"] = json.dumps(env_info)


def test_import_random_demos_matches_live_observations(tmp_path):
    """Quick: a random policy in the real can env, recorded as robosuite records (state before each action)."""
    from robofinetune.envs import make_env

    env = make_env("can", seed=0)
    keys = list(env.observation_space.spaces)
    rs_env = env.unwrapped.robosuite_env
    rng = np.random.default_rng(0)
    demos, live = [], []
    for episode in range(2):
        obs, _ = env.reset(seed=episode)
        states, actions, observations = [env.unwrapped.get_state()], [], [obs]
        for _ in range(12):
            action = rng.uniform(-1, 1, 7)
            obs, *_ = env.step(action)
            actions.append(action)
            states.append(env.unwrapped.get_state())
            observations.append(obs)
        del states[-1]  # robosuite drops the state after the last action
        demos.append({"states": states, "actions": actions, "model_file": rs_env.sim.model.get_xml()})
        live.append(observations)
    env.close()
    path = tmp_path / "demo.hdf5"
    _write_like_robosuite(path, "PickPlaceCan", {"env_name": "PickPlaceCan", "robots": ["Panda"]}, demos)

    assert detect_format(path) == "robosuite_demo"
    episodes, env_meta = load_robosuite_demo(path)  # task inferred: PickPlaceCan -> can
    assert env_meta["env_name"] == "PickPlaceCan" and env_meta["task"] == "can"
    assert len(episodes) == 2
    for episode, observations, demo in zip(episodes, live, demos):
        assert len(episode) == 12
        assert episode.obs_keys == keys
        for key in keys:
            expected = np.stack([o[key] for o in observations[:-1]])
            # after reset robosuite's observation is exactly the state's
            np.testing.assert_allclose(episode.observations[key][0], expected[0], atol=1e-6, err_msg=key)
            # after a step robosuite reports kinematics from before the last 2 ms physics substep, while a
            # replayed state gives the kinematics of that state (as robomimic's dataset_states_to_obs does):
            # equal within one substep of motion, and far closer than the neighbouring step
            np.testing.assert_allclose(episode.observations[key], expected, atol=SUBSTEP_TOL, err_msg=key)
            # the observation after the last action comes from replaying it from the last state; approximate,
            # since controller history (the Panda gripper's accumulated command) is not in the MuJoCo state
            np.testing.assert_allclose(episode.final_observation[key], observations[-1][key], atol=1e-2, err_msg=key)
        shifted = np.abs(episode.observations["robot0_eef_pos"][1:] - expected_eef(observations)[:-1]).max()
        assert shifted > 5 * SUBSTEP_TOL  # an off-by-one replay would fail the comparison above
        np.testing.assert_array_equal(episode.actions, np.asarray(demo["actions"], dtype=np.float32))
        np.testing.assert_array_equal(episode.states, np.asarray(demo["states"]))
        assert not episode.success  # random actions do not solve the task: success comes from the states
        assert episode.rewards.sum() == 0

    info = dataset_info(path)
    assert info["episodes"] == 2 and info["total_steps"] == 24 and info["state_dim"] == demos[0]["states"][0].size


def test_import_rejects_states_of_another_model(tmp_path):
    path = tmp_path / "bad.hdf5"
    _write_like_robosuite(
        path, "PickPlaceCan", {}, [{"states": np.zeros((3, 40)), "actions": np.zeros((3, 7)), "model_file": ""}]
    )
    with pytest.raises(DatasetError, match=r"bad.hdf5: data/demo_1/states: step 0: state has 40 values"):
        load_robosuite_demo(path)
    other = tmp_path / "other.hdf5"
    _write_like_robosuite(other, "Door", {}, [{"states": np.zeros((3, 40)), "actions": np.zeros((3, 7)), "model_file": ""}])
    with pytest.raises(DatasetError, match=r"other.hdf5: data.attrs\['env'\]: cannot tell the task for env 'Door'"):
        load_robosuite_demo(other)
    with pytest.raises(DatasetError, match=r"demos are from 'Door' but task 'can' runs 'PickPlaceCan'"):
        load_robosuite_demo(other, task="can")


@pytest.mark.slow
def test_import_file_written_by_robosuites_own_collector(tmp_path):
    """The real DataCollectionWrapper + gather_demonstrations_as_hdf5, driven by the scripted can expert."""
    from robosuite.scripts.collect_human_demonstrations import gather_demonstrations_as_hdf5
    from robosuite.wrappers import DataCollectionWrapper

    from robofinetune.envs import make_env
    from robofinetune.envs.experts import make_expert

    env = make_env("can", seed=0)
    keys = list(env.observation_space.spaces)
    env.reset(seed=0)
    raw_dir = tmp_path / "raw"
    collector = DataCollectionWrapper(env.unwrapped.robosuite_env, str(raw_dir))
    expert = make_expert("can", noise=0.0, seed=0)
    # robosuite's raw 'object-state' is stale after the collector reloads the model from XML, so the live
    # observation is read through the env's state API (the state is the ground truth the file records)
    def observe() -> dict[str, np.ndarray]:
        return env.unwrapped.set_state(env.unwrapped.get_state())

    live_runs = []
    for _ in range(2):
        collector.reset()
        expert.reset(env)
        obs = observe()
        live = [obs]
        for _ in range(400):
            collector.step(np.clip(expert.act(obs), -1, 1))
            obs = observe()
            live.append(obs)
            if collector.env._check_success():
                break
        live_runs.append(live)
    collector.close()  # flushes the last episode
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    gather_demonstrations_as_hdf5(str(raw_dir), str(out_dir), json.dumps({"env_name": "PickPlaceCan"}))
    path = out_dir / "demo.hdf5"

    episodes, env_meta = load_dataset(path)
    assert env_meta["task"] == "can"
    assert len(episodes) == 2  # robosuite kept both: the expert solved the task
    # gather reads episode folders in os.listdir order; match runs by length and first observation
    for episode in episodes:
        live = next(r for r in live_runs if len(r) - 1 == len(episode)
                    and np.allclose(r[0]["object"], episode.observations["object"][0], atol=1e-6))
        for key in keys:
            expected = np.stack([o[key] for o in live[:-1]])
            np.testing.assert_allclose(episode.observations[key], expected, atol=1e-6, err_msg=key)
        assert episode.success and episode.rewards[-1] == 1.0 and episode.terminals[-1]

    converted = convert_dataset(path, tmp_path / "can.hdf5")  # task inferred from data.attrs['env']
    again, meta = load_dataset(converted)
    assert meta["task"] == "can" and meta["env_name"] == "PickPlaceCan"
    for a, b in zip(episodes, again):
        for key in keys:
            np.testing.assert_array_equal(a.observations[key], b.observations[key])
