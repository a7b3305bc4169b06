"""dataset_info / format_info: counts and statistics match what numpy computes over the whole dataset."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from robofinetune.data import dataset_info, format_info, save_dataset
from robofinetune.data.synthetic import synthetic_episodes
from robofinetune.errors import DatasetError


@pytest.mark.parametrize("name", ["d.hdf5", "d.zarr", "d.zarr.zip"])
def test_info_counts_and_statistics(tmp_path, name):
    episodes = synthetic_episodes(n=5, length=(3, 9), image_key="agentview_image", seed=4)
    for e in episodes:
        e.actions[:, 2] *= 0.25  # a dimension with a clearly different spread
    path = save_dataset(episodes, tmp_path / name, env_meta={"env_name": "PickPlaceCan", "env_kwargs": {"a": 1}})
    info = dataset_info(path)

    lengths = [len(e) for e in episodes]
    assert info["format"] in ("robomimic", "zarr")
    assert info["episodes"] == 5 and info["successes"] == 3 and info["success_unknown"] == 0
    assert info["total_steps"] == sum(lengths)
    assert info["length"] == {"min": min(lengths), "mean": pytest.approx(np.mean(lengths)), "max": max(lengths)}
    assert info["state_dim"] == 71
    assert info["env_meta"]["env_name"] == "PickPlaceCan" and info["env_meta"]["env_kwargs"] == {"a": 1}

    obj = np.concatenate([e.observations["object"] for e in episodes]).astype(np.float64)
    stats = info["obs"]["object"]
    assert stats["shape"] == [14] and stats["dtype"] == "float32"
    assert stats["min"] == pytest.approx(obj.min()) and stats["max"] == pytest.approx(obj.max())
    assert stats["mean"] == pytest.approx(obj.mean()) and stats["std"] == pytest.approx(obj.std())
    image = info["obs"]["agentview_image"]
    assert image["shape"] == [8, 8, 3] and image["dtype"] == "uint8"

    actions = np.concatenate([e.actions for e in episodes]).astype(np.float64)
    np.testing.assert_allclose(info["actions"]["mean"], actions.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(info["actions"]["std"], actions.std(axis=0), rtol=1e-9)
    np.testing.assert_allclose(info["actions"]["min"], actions.min(axis=0))
    np.testing.assert_allclose(info["actions"]["max"], actions.max(axis=0))

    text = format_info(info)
    assert f"episodes: 5   successes: 3/5   steps: {sum(lengths)}" in text
    assert "agentview_image" in text and "(8, 8, 3)" in text and "uint8" in text
    assert "env: PickPlaceCan" in text


def test_info_reports_unknown_success_for_plain_zarr(tmp_path):
    path = tmp_path / "plain.zarr"
    root = zarr.open_group(str(path), mode="w")
    root.create_group("data").array("action", np.zeros((7, 2), np.float32))
    root["data"].array("state", np.arange(14, dtype=np.float32).reshape(7, 2))
    root.create_group("meta").array("episode_ends", np.array([3, 7], dtype=np.int64))
    info = dataset_info(path)
    assert info["episodes"] == 2 and info["successes"] == 0 and info["success_unknown"] == 2
    assert info["obs"]["state"]["max"] == 13.0
    assert "successes: 0/2 (2 unknown)" in format_info(info)


def test_info_on_bad_file_names_it(tmp_path):
    bad = tmp_path / "junk.hdf5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(DatasetError, match="junk.hdf5"):
        dataset_info(bad)
