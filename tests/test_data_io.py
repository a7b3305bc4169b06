"""robomimic HDF5 and diffusion_policy zarr readers/writers: round trips, atomic writes, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from robofinetune.data import Episode, convert_dataset, detect_format, load_dataset, save_dataset
from robofinetune.data import robomimic_io, zarr_io
from robofinetune.data.robomimic_io import load_robomimic, save_robomimic
from robofinetune.data.synthetic import synthetic_episodes
from robofinetune.data.zarr_io import load_zarr, save_zarr
from robofinetune.errors import DatasetError

ENV_META = {"env_name": "PickPlaceCan", "type": 1, "env_kwargs": {"robots": ["Panda"], "control_freq": 20}}


def assert_same_episode(a: Episode, b: Episode) -> None:
    assert a.obs_keys == b.obs_keys
    for key in a.obs_keys:
        assert a.observations[key].dtype == b.observations[key].dtype, key
        np.testing.assert_array_equal(a.observations[key], b.observations[key], err_msg=key)
    for name in ("actions", "rewards", "terminals", "states"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype, name
            np.testing.assert_array_equal(x, y, err_msg=name)
    nexts_a, nexts_b = a.next_observations(), b.next_observations()
    for key in a.obs_keys:
        np.testing.assert_array_equal(nexts_a[key], nexts_b[key], err_msg=f"next_obs/{key}")
    assert a.success == b.success
    assert a.metadata == b.metadata


@pytest.fixture
def episodes() -> list[Episode]:
    eps = synthetic_episodes(n=4, image_key="agentview_image", seed=1)
    for e in eps:  # a float64 key next to float32 and uint8 ones: dtypes must survive too
        e.observations["robot0_eef_pos"] = e.observations["robot0_eef_pos"].astype(np.float64) + 1e-12
        e.final_observation["robot0_eef_pos"] = e.final_observation["robot0_eef_pos"].astype(np.float64)
    return eps


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("zarr_name", ["data.zarr", "data.zarr.zip"])
def test_robomimic_zarr_round_trip_preserves_everything(tmp_path, episodes, zarr_name):
    h5 = save_robomimic(episodes, tmp_path / "a.hdf5", env_meta=ENV_META)
    from_h5, meta_h5 = load_robomimic(h5)
    assert len(from_h5) == len(episodes)
    for original, loaded in zip(episodes, from_h5):
        assert_same_episode(original, loaded)
    assert meta_h5["env_name"] == "PickPlaceCan" and meta_h5["type"] == 1 and meta_h5["env_type"] == 1
    assert meta_h5["env_kwargs"] == ENV_META["env_kwargs"]

    zpath = save_zarr(from_h5, tmp_path / zarr_name, env_meta=meta_h5)
    from_zarr, meta_zarr = load_zarr(zpath)
    assert meta_zarr == meta_h5
    for original, loaded in zip(episodes, from_zarr):
        assert_same_episode(original, loaded)

    back = save_robomimic(from_zarr, tmp_path / "b.hdf5", env_meta=meta_zarr)
    again, meta_again = load_robomimic(back)
    assert meta_again == meta_h5
    for original, loaded in zip(episodes, again):
        assert_same_episode(original, loaded)


def test_robomimic_layout_is_what_robomimic_reads(tmp_path, episodes):
    path = save_robomimic(episodes, tmp_path / "a.hdf5", env_meta=ENV_META)
    with h5py.File(path, "r") as f:
        data = f["data"]
        assert sorted(data.keys()) == ["demo_0", "demo_1", "demo_2", "demo_3"]
        assert data.attrs["total"] == sum(len(e) for e in episodes)
        env_args = json.loads(data.attrs["env_args"])
        assert env_args["env_name"] == "PickPlaceCan" and env_args["type"] == 1
        demo = data["demo_2"]
        assert demo.attrs["num_samples"] == len(episodes[2])
        for name in ("actions", "rewards", "dones", "states", "obs/object", "next_obs/object"):
            assert demo[name].shape[0] == len(episodes[2]), name
        np.testing.assert_array_equal(demo["next_obs/object"][:-1], episodes[2].observations["object"][1:])
        assert bool(demo.attrs["success"]) is True
        assert json.loads(demo.attrs["metadata"]) == episodes[2].metadata
        assert [n.decode() for n in f["mask/successful"][:]] == ["demo_0", "demo_2"]
        assert [n.decode() for n in f["mask/failed"][:]] == ["demo_1", "demo_3"]


def test_zarr_layout_is_diffusion_policy_replay_buffer(tmp_path, episodes):
    path = save_zarr(episodes, tmp_path / "d.zarr")
    root = zarr.open_group(str(path), mode="r")
    ends = root["meta/episode_ends"][:]
    assert ends.dtype == np.int64
    np.testing.assert_array_equal(ends, np.cumsum([len(e) for e in episodes]))
    for name in ("action", "robot0_eef_pos", "object", "agentview_image", "reward", "done"):
        assert root["data"][name].shape[0] == ends[-1], name
    np.testing.assert_array_equal(root["data/action"][ends[0] : ends[1]], episodes[1].actions)


def test_save_append_continues_numbering(tmp_path, episodes):
    path = save_robomimic(episodes[:2], tmp_path / "a.hdf5", env_meta=ENV_META)
    save_robomimic(episodes[2:], path, append=True)
    loaded, meta = load_robomimic(path)
    assert meta["env_name"] == "PickPlaceCan"
    assert len(loaded) == 4
    for original, got in zip(episodes, loaded):
        assert_same_episode(original, got)
    with h5py.File(path, "r") as f:
        assert f["data"].attrs["total"] == sum(len(e) for e in episodes)


def test_filter_key_and_unknown_filter(tmp_path, episodes):
    path = save_robomimic(episodes, tmp_path / "a.hdf5")
    good, _ = load_robomimic(path, filter_key="successful")
    assert [e.metadata["index"] for e in good] == [0, 2]
    with pytest.raises(DatasetError, match=r"mask/train: missing.*failed, successful"):
        load_robomimic(path, filter_key="train")


def test_object_state_alias(tmp_path, episodes):
    for e in episodes:
        e.observations["object-state"] = e.observations.pop("object")
        e.final_observation["object-state"] = e.final_observation.pop("object")
    for path in (save_robomimic(episodes, tmp_path / "a.hdf5"), save_zarr(episodes, tmp_path / "a.zarr")):
        loaded, _ = load_dataset(path)
        assert "object" in loaded[0].obs_keys and "object-state" not in loaded[0].obs_keys
        picked, _ = load_dataset(path, obs_keys=["robot0_eef_pos", "object"])
        assert picked[0].obs_keys == ["robot0_eef_pos", "object"]
        np.testing.assert_array_equal(picked[0].observations["object"], episodes[0].observations["object-state"])
        asked, _ = load_dataset(path, obs_keys=["object-state"])
        assert asked[0].obs_keys == ["object-state"]


def test_native_robomimic_file_without_our_attrs(tmp_path):
    """A file as robomimic ships it: no success/metadata attrs, float64 arrays, sparse rewards."""
    path = tmp_path / "native.hdf5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {}})
        for i, (steps, solved) in enumerate([(6, True), (4, False)]):
            demo = data.create_group(f"demo_{i}")
            demo.attrs["num_samples"] = steps
            demo.create_dataset("actions", data=rng.uniform(-1, 1, (steps, 7)))
            rewards = np.zeros(steps)
            rewards[-1] = float(solved)
            demo.create_dataset("rewards", data=rewards)
            demo.create_dataset("dones", data=rewards.astype(np.int64))
            demo.create_dataset("obs/object", data=rng.normal(size=(steps, 10)))
        data.attrs["total"] = 10
    loaded, meta = load_robomimic(path)
    assert meta["env_type"] == 1 and meta["env_name"] == "Lift"
    assert [e.success for e in loaded] == [True, False]
    assert loaded[0].metadata["success_source"] == "rewards"
    assert loaded[1].metadata["success_source"] == "unknown"
    assert loaded[0].observations["object"].dtype == np.float64
    assert loaded[0].final_observation is None
    assert detect_format(path) == "robomimic"


def test_plain_diffusion_policy_zarr_without_attrs(tmp_path):
    path = tmp_path / "plain.zarr"
    root = zarr.open_group(str(path), mode="w")
    rng = np.random.default_rng(0)
    root.create_group("data").array("action", rng.normal(size=(9, 2)).astype(np.float32))
    root["data"].array("state", rng.normal(size=(9, 5)).astype(np.float32))
    root["data"].array("img", rng.integers(0, 255, (9, 4, 4, 3), dtype=np.uint8))
    root.create_group("meta").array("episode_ends", np.array([4, 9], dtype=np.int64))
    loaded, meta = load_zarr(path)
    assert meta == {}
    assert [len(e) for e in loaded] == [4, 5]
    assert sorted(loaded[1].obs_keys) == ["img", "state"]
    np.testing.assert_array_equal(loaded[1].observations["state"], root["data/state"][4:9])
    assert all(not e.success and e.metadata["success_source"] == "unknown" for e in loaded)
    # a reward array that reaches 1 tells success
    root["data"].array("reward", np.array([0, 0, 0, 1, 0, 0, 0, 0, 0], dtype=np.float32))
    loaded, _ = load_zarr(path)
    assert [e.success for e in loaded] == [True, False]
    assert loaded[0].metadata["success_source"] == "rewards"


# ------------------------------------------------------------------------------------------------ errors


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_truncated_hdf5_names_the_file(tmp_path, episodes):
    path = save_robomimic(episodes, tmp_path / "full.hdf5")
    blob = path.read_bytes()
    for keep in (len(blob) // 2, len(blob) - 100, 64):
        cut = tmp_path / f"cut_{keep}.hdf5"
        cut.write_bytes(blob[:keep])
        with pytest.raises(DatasetError, match=str(cut.name)):
            load_robomimic(cut)
        with pytest.raises(DatasetError, match=str(cut.name)):
            load_dataset(cut)


def test_not_hdf5_and_missing_file(tmp_path):
    bogus = tmp_path / "notes.hdf5"
    bogus.write_text("hello, not an HDF5 file")
    with pytest.raises(DatasetError, match="notes.hdf5"):
        load_robomimic(bogus)
    with pytest.raises(DatasetError, match="notes.hdf5"):
        load_dataset(bogus)
    with pytest.raises(DatasetError, match="nothere.hdf5: file not found"):
        load_robomimic(tmp_path / "nothere.hdf5")
    with pytest.raises(DatasetError, match="nothere.zarr: not found"):
        load_dataset(tmp_path / "nothere.zarr")
    (tmp_path / "bad.zarr.zip").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(DatasetError, match="bad.zarr.zip"):
        load_zarr(tmp_path / "bad.zarr.zip")


def test_missing_data_group_and_actions(tmp_path, episodes):
    empty = tmp_path / "empty.hdf5"
    with h5py.File(empty, "w") as f:
        f.create_group("other")
    with pytest.raises(DatasetError, match=r"empty.hdf5: data: missing"):
        load_robomimic(empty)
    path = save_robomimic(episodes, tmp_path / "a.hdf5")
    with h5py.File(path, "a") as f:
        del f["data/demo_1/actions"]
    with pytest.raises(DatasetError, match=r"a.hdf5: data/demo_1/actions: missing"):
        load_robomimic(path)


def test_missing_obs_key_lists_available(tmp_path, episodes):
    path = save_robomimic(episodes, tmp_path / "a.hdf5")
    with pytest.raises(DatasetError) as err:
        load_robomimic(path, obs_keys=["robot0_eef_pos", "cube_pos"])
    message = str(err.value)
    assert "a.hdf5" in message and "demo_0/obs/cube_pos: missing" in message
    for key in ("agentview_image", "object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"):
        assert key in message
    zpath = save_zarr(episodes, tmp_path / "a.zarr")
    with pytest.raises(DatasetError, match=r"a.zarr: data/cube_pos: missing \(available observation keys: agentview_image, object"):
        load_zarr(zpath, obs_keys=["cube_pos"])


@pytest.mark.parametrize("field,where", [("obs/object", "observation 'object'"), ("actions", "field 'actions'")])
def test_nan_names_file_demo_and_field(tmp_path, episodes, field, where):
    path = save_robomimic(episodes, tmp_path / "a.hdf5")
    with h5py.File(path, "a") as f:
        f[f"data/demo_2/{field}"][3, 1] = np.nan
    with pytest.raises(DatasetError, match=rf"a.hdf5: data/demo_2: {where} contains NaN"):
        load_robomimic(path)


def test_nan_in_zarr_and_refused_on_save(tmp_path, episodes):
    path = save_zarr(episodes, tmp_path / "a.zarr")
    root = zarr.open_group(str(path), mode="a")
    values = root["data/robot0_gripper_qpos"][:]
    values[len(episodes[0]) + 1, 0] = np.inf  # second episode
    root["data/robot0_gripper_qpos"][:] = values
    with pytest.raises(DatasetError, match=r"a.zarr: episode 1 .*observation 'robot0_gripper_qpos' contains NaN"):
        load_zarr(path)
    episodes[3].actions[0, 0] = np.nan
    with pytest.raises(DatasetError, match=r"b.hdf5: data/demo_3: field 'actions'"):
        save_robomimic(episodes, tmp_path / "b.hdf5")
    assert not (tmp_path / "b.hdf5").exists()


def test_length_mismatch_names_field(tmp_path, episodes):
    path = save_robomimic(episodes, tmp_path / "a.hdf5")
    with h5py.File(path, "a") as f:
        short = f["data/demo_1/obs/robot0_eef_quat"][:-1]
        del f["data/demo_1/obs/robot0_eef_quat"]
        f["data/demo_1/obs/robot0_eef_quat"] = short
    n = len(episodes[1])
    with pytest.raises(DatasetError, match=rf"data/demo_1/obs/robot0_eef_quat: {n - 1} steps but actions has {n}"):
        load_robomimic(path)
    zpath = save_zarr(episodes, tmp_path / "a.zarr")
    root = zarr.open_group(str(zpath), mode="a")
    root["data"].array("robot0_eef_quat", np.zeros((3, 4), np.float32), overwrite=True)
    with pytest.raises(DatasetError, match=r"a.zarr: data/robot0_eef_quat: 3 steps but meta/episode_ends ends at"):
        load_zarr(zpath)


def test_episodes_with_different_keys_refused_by_zarr(tmp_path, episodes):
    del episodes[2].observations["object"]
    with pytest.raises(DatasetError, match=r"x.zarr: episode 2: observation keys"):
        save_zarr(episodes, tmp_path / "x.zarr")
    assert _listing(tmp_path) == []


# ------------------------------------------------------------------------------------------ atomic writes


def test_atomic_robomimic_save_leaves_no_file_on_error(tmp_path, episodes, monkeypatch):
    real = robomimic_io._write_demo
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(robomimic_io, "_write_demo", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_robomimic(episodes, tmp_path / "a.hdf5")
    assert _listing(tmp_path) == []  # neither the file nor a temporary

    # an existing file survives a failed overwrite unchanged
    monkeypatch.setattr(robomimic_io, "_write_demo", real)
    save_robomimic(episodes[:1], tmp_path / "a.hdf5")
    before = (tmp_path / "a.hdf5").read_bytes()
    calls.clear()
    monkeypatch.setattr(robomimic_io, "_write_demo", failing)
    with pytest.raises(RuntimeError):
        save_robomimic(episodes, tmp_path / "a.hdf5")
    assert (tmp_path / "a.hdf5").read_bytes() == before
    assert _listing(tmp_path) == ["a.hdf5"]


@pytest.mark.parametrize("name", ["d.zarr", "d.zarr.zip"])
def test_atomic_zarr_save_leaves_no_dataset_on_error(tmp_path, episodes, monkeypatch, name):
    real = zarr_io._chunks
    calls = []

    def failing(array):
        calls.append(1)
        if len(calls) == 4:  # after some arrays are already written
            raise RuntimeError("killed mid-write")
        return real(array)

    monkeypatch.setattr(zarr_io, "_chunks", failing)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        save_zarr(episodes, tmp_path / name)
    assert _listing(tmp_path) == []

    monkeypatch.setattr(zarr_io, "_chunks", real)
    save_zarr(episodes[:2], tmp_path / name)
    calls.clear()
    monkeypatch.setattr(zarr_io, "_chunks", failing)
    with pytest.raises(RuntimeError):
        save_zarr(episodes, tmp_path / name)
    assert _listing(tmp_path) == [name]
    assert len(load_zarr(tmp_path / name)[0]) == 2  # the old dataset, intact


def test_overwrite_existing_zarr_folder(tmp_path, episodes):
    save_zarr(episodes, tmp_path / "d.zarr")
    save_zarr(episodes[:1], tmp_path / "d.zarr")
    assert len(load_zarr(tmp_path / "d.zarr")[0]) == 1
    assert _listing(tmp_path) == ["d.zarr"]


# ---------------------------------------------------------------------------------------- io dispatching


def test_detect_save_load_convert(tmp_path, episodes):
    h5 = save_dataset(episodes, tmp_path / "a.h5", env_meta=ENV_META)
    zz = save_dataset(episodes, tmp_path / "a.zarr.zip", env_meta=ENV_META)
    zf = save_dataset(episodes, tmp_path / "a.zarr", env_meta=ENV_META)
    assert detect_format(h5) == "robomimic"
    assert detect_format(zz) == "zarr"
    assert detect_format(zf) == "zarr"
    renamed = tmp_path / "folder_without_suffix"
    shutil.copytree(zf, renamed)
    assert detect_format(renamed) == "zarr"

    out = convert_dataset(zz, tmp_path / "c.hdf5")
    loaded, meta = load_dataset(out)
    assert meta["env_name"] == "PickPlaceCan"
    for original, got in zip(episodes, loaded):
        assert_same_episode(original, got)

    with pytest.raises(DatasetError, match=r"a.txt: cannot tell the format"):
        save_dataset(episodes, tmp_path / "a.txt")
    with pytest.raises(DatasetError, match="destination is the source"):
        convert_dataset(h5, h5)


def test_incomplete_lerobot_dataset_is_detected_and_named(tmp_path):
    root = tmp_path / "lerobot_ds"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps({"codebase_version": "v3.0"}))
    assert detect_format(root) == "lerobot"
    with pytest.raises(DatasetError, match="lerobot_ds/meta/info.json: missing field 'fps'"):
        load_dataset(root)


def test_unknown_folder_and_file(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetError, match="stuff: a folder"):
        detect_format(tmp_path / "stuff")
    (tmp_path / "x.bin").write_bytes(b"\x00" * 32)
    with pytest.raises(DatasetError, match="x.bin: unknown dataset format"):
        detect_format(tmp_path / "x.bin")
