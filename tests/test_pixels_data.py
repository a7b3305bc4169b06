"""Image datasets: robomimic HDF5, zarr and LeRobot video round trips on rendered frames, uint8 all the way into
training batches, and bad image data stopped with the key and the file named."""

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
import zarr
from pixels_common import expert_image_demos

from robofinetune.algos.bc import BCConfig, load_demos
from robofinetune.data.chunks import ActionChunkWindows
from robofinetune.data.episode import Episode
from robofinetune.data.info import dataset_info, format_info
from robofinetune.data.io import convert_dataset, load_dataset, save_dataset
from robofinetune.data.lerobot_io import LeRobotWriter
from robofinetune.errors import DatasetError

ENV_META = {"env_name": "pointmass_image", "task": "pointmass_image"}
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed (make system-deps)")


@pytest.fixture(scope="module")
def demos():
    return expert_image_demos(3, seed=5, max_steps=25)


def assert_same_episodes(back, episodes):
    assert len(back) == len(episodes)
    for original, loaded in zip(back, episodes):
        assert list(loaded.observations) == list(original.observations)
        for key, value in original.observations.items():
            assert loaded.observations[key].dtype == value.dtype
            assert np.array_equal(loaded.observations[key], value), key
        assert np.array_equal(loaded.final_observation["top_image"], original.final_observation["top_image"])
        assert np.array_equal(loaded.actions, original.actions) and loaded.success == original.success


def test_hdf5_stores_images_as_compressed_uint8_chunks_of_frames(tmp_path, demos):
    path = save_dataset(demos, tmp_path / "demos.hdf5", env_meta=ENV_META)
    with h5py.File(path) as f:
        images = f["data/demo_0/obs/top_image"]
        assert images.dtype == np.uint8 and images.shape == (len(demos[0]), 32, 32, 3)
        assert images.compression == "gzip" and images.chunks == (4, 32, 32, 3)
        assert f["data/demo_0/next_obs/top_image"].dtype == np.uint8
        assert f["data/demo_0/obs/agent_pos"].dtype == np.float32 and f["data/demo_0/obs/agent_pos"].chunks is None
    back, meta = load_dataset(path)
    assert meta["task"] == "pointmass_image"
    assert_same_episodes(demos, back)
    raw = sum(e.observations["top_image"].nbytes for e in demos) * 2  # obs and next_obs
    assert path.stat().st_size < raw / 3  # rendered frames compress well


def test_zarr_round_trip_keeps_uint8_images(tmp_path, demos):
    path = save_dataset(demos, tmp_path / "demos.zarr", env_meta=ENV_META)
    root = zarr.open_group(str(path), mode="r")
    assert root["data/top_image"].dtype == np.uint8
    assert root["data/top_image"].shape == (sum(len(e) for e in demos), 32, 32, 3)
    assert root["data/top_image"].chunks[1:] == (32, 32, 3)
    back, _ = load_dataset(path)
    assert_same_episodes(demos, back)


@needs_ffmpeg
def test_lerobot_stores_cameras_as_mp4_and_reads_them_back_close(tmp_path, demos):
    root = convert_dataset(save_dataset(demos, tmp_path / "demos.hdf5", env_meta=ENV_META), tmp_path / "demos_lerobot")
    info = json.loads((root / "meta" / "info.json").read_text())
    feature = info["features"]["observation.images.top"]
    assert feature["dtype"] == "video" and feature["shape"] == [32, 32, 3]
    assert info["features"]["observation.state"]["shape"] == [4]
    videos = sorted((root / "videos" / "observation.images.top").glob("chunk-*/file-*.mp4"))
    assert [v.relative_to(root).as_posix() for v in videos] == [
        f"videos/observation.images.top/chunk-000/file-{i:03d}.mp4" for i in range(len(demos))]
    back, _ = load_dataset(root)
    for original, loaded in zip(demos, back):
        frames, decoded = original.observations["top_image"], loaded.observations["top_image"]
        assert decoded.dtype == np.uint8 and decoded.shape == frames.shape  # every frame, no more
        error = np.abs(decoded.astype(np.int16) - frames.astype(np.int16))
        assert error.mean() < 4.0, error.mean()  # lossy, but close enough to train on
        assert np.array_equal(loaded.observations["agent_pos"], original.observations["agent_pos"])
    # and on to zarr: data convert keeps the (decoded) images
    again = convert_dataset(root, tmp_path / "again.zarr")
    episodes, _ = load_dataset(again)
    assert episodes[0].observations["top_image"].dtype == np.uint8
    assert np.array_equal(episodes[0].observations["top_image"], back[0].observations["top_image"])


def test_data_info_shows_the_cameras(tmp_path, demos):
    path = save_dataset(demos, tmp_path / "demos.hdf5", env_meta=ENV_META)
    info = dataset_info(path)
    steps = sum(len(e) for e in demos)
    assert info["images"] == {"top_image": {"height": 32, "width": 32, "channels": 3, "frames": steps,
                                            "megabytes_uint8": round(steps * 32 * 32 * 3 / 2**20, 2)}}
    assert info["obs"]["top_image"]["dtype"] == "uint8" and info["obs"]["top_image"]["shape"] == [32, 32, 3]
    assert f"camera top_image: 32x32x3 uint8, {steps} frames" in format_info(info)


def test_training_windows_keep_images_uint8(demos):
    windows = ActionChunkWindows(demos, ["agent_pos", "agent_vel", "top_image"], n_obs_steps=2, horizon=4)
    assert windows.observations["top_image"].dtype == np.uint8
    assert windows.observations["agent_pos"].dtype == np.float32
    assert windows.flat_observations().shape == (len(windows), 4)  # state keys only
    obs, actions = windows.batch(np.array([0, 5, 7]))
    assert obs["top_image"].dtype == torch.uint8 and obs["top_image"].shape == (3, 2, 32, 32, 3)
    assert torch.equal(obs["top_image"][1, 1], torch.from_numpy(demos[0].observations["top_image"][5]))


def _with_image(episode, image):
    observations = dict(episode.observations, top_image=image)
    return Episode(observations=observations, actions=episode.actions, success=episode.success)


@pytest.mark.parametrize("change, message", [
    (lambda image: image.astype(np.float32) / 255, r"observation 'top_image' is float32; images must be uint8"),
    (lambda image: image[..., :2], r"observation 'top_image' has 2 channels"),
    (lambda image: image[..., 0], r"observation 'top_image' has shape \(\d+, 32, 32\); images must be \(T, H, W, C\)"),
])
def test_bad_image_data_names_the_key_and_the_file(tmp_path, demos, change, message):
    bad = _with_image(demos[1], change(demos[1].observations["top_image"]))
    for name in ("bad.hdf5", "bad.zarr"):
        with pytest.raises(DatasetError, match=message) as err:
            save_dataset([demos[0], bad], tmp_path / name, env_meta=ENV_META)
        assert name in str(err.value)
        assert not (tmp_path / name).exists()  # nothing half-written
    # a file written elsewhere with float images is refused on reading, naming the file and the demo
    path = save_dataset(demos[:1], tmp_path / "float.hdf5", env_meta=ENV_META)
    with h5py.File(path, "a") as f:
        frames = f["data/demo_0/obs/top_image"][()]
        del f["data/demo_0/obs/top_image"]
        f["data/demo_0/obs/top_image"] = frames.astype(np.float32)
    with pytest.raises(DatasetError, match=r"float.hdf5: data/demo_0: observation 'top_image' is float32"):
        load_dataset(path)


def test_images_of_another_size_are_refused_where_they_meet(tmp_path, demos):
    small = _with_image(demos[1], demos[1].observations["top_image"][:, :24, :24])
    # a dataset whose camera differs from the task's: bc stops before training, naming file, key and shapes
    path = save_dataset([small], tmp_path / "small.hdf5", env_meta=ENV_META)
    with pytest.raises(DatasetError, match=r"small.hdf5: episode 0: observation 'top_image' has shape \(24, 24, 3\) "
                                           r"per step, task 'pointmass_image' expects \(32, 32, 3\)"):
        load_demos(BCConfig(task="pointmass_image", dataset=str(path)))
    # within one dataset: zarr stores one array per key, LeRobot one video feature per camera
    with pytest.raises(DatasetError, match=r"mixed.zarr: data/top_image: per-step shape differs between episodes"):
        save_dataset([demos[0], small], tmp_path / "mixed.zarr")
    if shutil.which("ffmpeg"):
        writer = LeRobotWriter(tmp_path / "mixed_lerobot", fps=20, env_meta=ENV_META)
        writer.append(demos[0])
        with pytest.raises(DatasetError, match=r"mixed_lerobot: episode 1: camera observation 'top_image' has image "
                                               r"shape \(24, 24, 3\), the dataset's video feature "
                                               r"'observation.images.top' is \(32, 32, 3\)"):
            writer.append(small)
