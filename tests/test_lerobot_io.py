"""LeRobot v3: the layout the spec describes, round trips, durable appends, resume, and reading foreign datasets."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import robofinetune.data.lerobot_io as lerobot_io
from robofinetune.data.episode import Episode
from robofinetune.data.io import convert_dataset, detect_format, load_dataset, save_dataset
from robofinetune.data.lerobot_io import (LeRobotWriter, encode_video, load_lerobot, read_lerobot_meta,
                                          save_lerobot)
from robofinetune.errors import DatasetError

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed (make system-deps)")


def make_episode(rng, length, images=False, success=True, states=False):
    obs = {"robot0_eef_pos": rng.normal(size=(length, 3)).astype(np.float32),
           "object": rng.normal(size=(length, 14)).astype(np.float32)}
    if images:
        y, x = np.mgrid[0:24, 0:32]
        obs["agentview_image"] = np.stack([np.stack([(x * 8 + t * 5) % 256, (y * 10) % 256,
                                                     np.full_like(x, 40 + t)], axis=-1).astype(np.uint8)
                                           for t in range(length)])
    return Episode(observations=obs, actions=rng.uniform(-1, 1, (length, 7)).astype(np.float32), success=success,
                   final_observation={key: value[-1] + 1 if value.dtype != np.uint8 else value[-1]
                                      for key, value in obs.items()},
                   states=rng.normal(size=(length, 9)) if states else None, metadata={"seed": int(length)})


def test_layout_follows_the_v3_spec(tmp_path, rng):
    root = tmp_path / "demo_lerobot"
    episodes = [make_episode(rng, n, success=n != 6) for n in (5, 6, 7)]
    save_lerobot(episodes, root, env_meta={"env_name": "PickPlaceCan", "task": "can"}, fps=20)
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 20
    assert info["total_episodes"] == 3 and info["total_frames"] == 18 and info["total_tasks"] == 1
    assert info["splits"] == {"train": "0:3"} and info["chunks_size"] == 1000
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    features = info["features"]
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index", "action", "observation.state"):
        assert {"dtype", "shape", "names"} <= set(features[name]), name
    assert features["observation.state"]["shape"] == [17]
    assert features["observation.state"]["names"][:4] == ["robot0_eef_pos.0", "robot0_eef_pos.1",
                                                          "robot0_eef_pos.2", "object.0"]
    # many episodes in one data file, with the default columns
    data = pq.read_table(root / "data" / "chunk-000" / "file-000.parquet")
    assert data.num_rows == 18
    assert data.column("index").to_pylist() == list(range(18))
    assert data.column("episode_index").to_pylist() == [0] * 5 + [1] * 6 + [2] * 7
    assert data.column("frame_index").to_pylist()[5:11] == list(range(6))
    assert data.schema.field("observation.state").type == pa.list_(pa.float32(), 17)
    # one row per episode, with the indices LeRobot seeks by
    rows = pq.read_table(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    assert [(r["dataset_from_index"], r["dataset_to_index"], r["length"]) for r in rows] == [(0, 5, 5), (5, 11, 6),
                                                                                             (11, 18, 7)]
    assert rows[0]["tasks"] == ["can"] and rows[0]["data/file_index"] == 0
    assert rows[0]["stats/action/count"] == [5]
    # tasks.parquet in pandas' layout: the task string is the index
    tasks = pq.read_table(root / "meta" / "tasks.parquet")
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]
    assert tasks.column("task").to_pylist() == ["can"] and tasks.column("task_index").to_pylist() == [0]
    # stats.json aggregates all frames
    stats = json.loads((root / "meta" / "stats.json").read_text())
    actions = np.concatenate([e.actions for e in episodes])
    assert np.allclose(stats["action"]["mean"], actions.mean(axis=0), atol=1e-6)
    assert np.allclose(stats["action"]["std"], actions.std(axis=0), atol=1e-6)
    assert np.allclose(stats["action"]["min"], actions.min(axis=0)) and stats["action"]["count"] == [18]
    assert detect_format(root) == "lerobot"


def test_round_trip_keeps_everything_that_matters(tmp_path, rng):
    root = tmp_path / "rt_lerobot"
    episodes = [make_episode(rng, 8, success=True, states=True), make_episode(rng, 4, success=False, states=True)]
    save_lerobot(episodes, root, env_meta={"env_name": "PickPlaceCan", "task": "can"}, fps=20)
    back, env_meta = load_lerobot(root)
    assert env_meta["env_name"] == "PickPlaceCan" and env_meta["task"] == "can"
    for original, loaded in zip(episodes, back):
        assert list(loaded.observations) == list(original.observations)
        for key in original.observations:
            assert np.array_equal(loaded.observations[key], original.observations[key]), key
            assert np.array_equal(loaded.final_observation[key], original.final_observation[key]), key
        assert np.array_equal(loaded.actions, original.actions)
        assert np.array_equal(loaded.rewards, original.rewards)
        assert np.array_equal(loaded.terminals, original.terminals)
        assert np.array_equal(loaded.states, original.states)
        assert loaded.success == original.success
        assert loaded.metadata["seed"] == original.metadata["seed"]
    # the same through the generic entry points, asking for robosuite's spelling of the object key
    loaded, _ = load_dataset(root, obs_keys=["object-state", "robot0_eef_pos"])
    assert np.array_equal(loaded[0].observations["object-state"], episodes[0].observations["object"])


@needs_ffmpeg
def test_camera_keys_become_mp4_video_features(tmp_path, rng):
    root = tmp_path / "cam_lerobot"
    episodes = [make_episode(rng, 6, images=True), make_episode(rng, 9, images=True, success=False)]
    save_lerobot(episodes, root, env_meta={"env_name": "can", "task": "can"}, fps=20)
    info = json.loads((root / "meta" / "info.json").read_text())
    feature = info["features"]["observation.images.agentview"]
    assert feature["dtype"] == "video" and feature["shape"] == [24, 32, 3]
    assert feature["names"] == ["height", "width", "channels"] and feature["info"]["video.fps"] == 20
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    rows = read_lerobot_meta(root)["episodes"]
    video = root / info["video_path"].format(video_key="observation.images.agentview",
                                             chunk_index=rows[1]["videos/observation.images.agentview/chunk_index"],
                                             file_index=rows[1]["videos/observation.images.agentview/file_index"])
    assert video.is_file() and video.read_bytes()[4:8] == b"ftyp"  # an mp4 container
    assert rows[1]["videos/observation.images.agentview/to_timestamp"] == pytest.approx(9 / 20)
    stats = json.loads((root / "meta" / "stats.json").read_text())
    assert np.asarray(stats["observation.images.agentview"]["mean"]).shape == (3, 1, 1)
    back, _ = load_lerobot(root)
    for original, loaded in zip(episodes, back):
        frames, decoded = original.observations["agentview_image"], loaded.observations["agentview_image"]
        assert decoded.shape == frames.shape and decoded.dtype == np.uint8
        # lossy codec: close, not equal
        assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 6.0


def test_appends_are_durable_and_an_interrupted_commit_loses_only_that_episode(tmp_path, rng, monkeypatch):
    root = tmp_path / "rec_lerobot"
    env_meta = {"env_name": "pointmass", "task": "pointmass"}
    writer = LeRobotWriter(root, fps=20, env_meta=env_meta)
    first = [make_episode(rng, n) for n in (3, 4)]
    for episode in first:
        writer.append(episode)
    assert len(load_lerobot(root)[0]) == 2  # readable after every append, no close needed

    # a crash after the new data file is in place but before the episodes metadata names the episode
    real = lerobot_io._write_parquet_atomic

    def crash_on_commit(path, table):
        if "meta/episodes" in str(path):
            raise KeyboardInterrupt("killed")
        real(path, table)

    monkeypatch.setattr(lerobot_io, "_write_parquet_atomic", crash_on_commit)
    with pytest.raises(KeyboardInterrupt):
        writer.append(make_episode(rng, 5))
    monkeypatch.setattr(lerobot_io, "_write_parquet_atomic", real)
    assert pq.read_table(root / "data" / "chunk-000" / "file-000.parquet").num_rows == 12  # orphan rows present
    episodes, _ = load_lerobot(root)
    assert [len(e) for e in episodes] == [3, 4]  # ...but never read

    resumed = LeRobotWriter(root, fps=20, env_meta=env_meta)  # --resume
    assert len(resumed) == 2
    assert pq.read_table(root / "data" / "chunk-000" / "file-000.parquet").num_rows == 7  # orphans dropped
    resumed.append(make_episode(rng, 6))
    episodes, _ = load_lerobot(root)
    assert [len(e) for e in episodes] == [3, 4, 6]
    data = pq.read_table(root / "data" / "chunk-000" / "file-000.parquet")
    assert data.column("index").to_pylist() == list(range(13))
    assert json.loads((root / "meta" / "info.json").read_text())["total_frames"] == 13


def test_resume_refuses_another_task_and_other_fps(tmp_path, rng):
    root = tmp_path / "a_lerobot"
    LeRobotWriter(root, fps=20, env_meta={"env_name": "pointmass"}).append(make_episode(rng, 3))
    with pytest.raises(DatasetError, match="refusing to append episodes of 'can'"):
        LeRobotWriter(root, fps=20, env_meta={"env_name": "can"})
    with pytest.raises(DatasetError, match="fps is 20, refusing to append episodes recorded at 10"):
        LeRobotWriter(root, fps=10, env_meta={"env_name": "pointmass"})
    writer = LeRobotWriter(root, fps=20)
    bad = Episode(observations={"robot0_eef_pos": np.zeros((2, 3), np.float32)}, actions=np.zeros((2, 7)))
    with pytest.raises(DatasetError, match="observation keys"):
        writer.append(bad)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a LeRobot dataset"):
        LeRobotWriter(tmp_path / "junk", fps=20)


def test_damaged_datasets_report_the_file(tmp_path, rng):
    root = tmp_path / "bad_lerobot"
    save_lerobot([make_episode(rng, 4)], root, env_meta={"env_name": "can"}, fps=20)
    info_path = root / "meta" / "info.json"
    good = info_path.read_text()
    info_path.write_text("{not json")
    with pytest.raises(DatasetError, match="meta/info.json: not valid JSON"):
        load_dataset(root)
    info_path.write_text(json.dumps({**json.loads(good), "codebase_version": "v2.1"}))
    with pytest.raises(DatasetError, match="only LeRobot v3.x is supported"):
        load_dataset(root)
    info_path.write_text(good)
    data = root / "data" / "chunk-000" / "file-000.parquet"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(DatasetError, match="file-000.parquet: unreadable parquet"):
        load_dataset(root)
    data.unlink()
    with pytest.raises(DatasetError, match="missing data file"):
        load_dataset(root)


@needs_ffmpeg
def test_reads_a_dataset_written_by_lerobot_itself(tmp_path):
    """A pusht-like dataset with LeRobot's own feature names (no robofinetune metadata)."""
    root = tmp_path / "pusht"
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    (root / "data" / "chunk-000").mkdir(parents=True)
    frames = np.stack([np.full((16, 16, 3), 20 * t, np.uint8) for t in range(7)])
    # two episodes packed into one video file, as LeRobot v3 does
    encode_video(frames, root / "videos" / "observation.image" / "chunk-000" / "file-000.mp4", fps=10)
    state = np.arange(14, dtype=np.float32).reshape(7, 2)
    table = pa.table({
        "observation.state": pa.FixedSizeListArray.from_arrays(pa.array(state.reshape(-1)), 2),
        "action": pa.FixedSizeListArray.from_arrays(pa.array(-state.reshape(-1)), 2),
        "next.reward": pa.array([0, 0, 1.0, 0, 0, 0, 0], pa.float32()),
        "next.done": pa.array([False, False, True, False, False, False, True]),
        "next.success": pa.array([False, False, True, False, False, False, False]),
        "timestamp": pa.array([0, 0.1, 0.2, 0, 0.1, 0.2, 0.3], pa.float32()),
        "frame_index": pa.array([0, 1, 2, 0, 1, 2, 3], pa.int64()),
        "episode_index": pa.array([0, 0, 0, 1, 1, 1, 1], pa.int64()),
        "index": pa.array(range(7), pa.int64()),
        "task_index": pa.array([0] * 7, pa.int64())})
    pq.write_table(table, root / "data" / "chunk-000" / "file-000.parquet")
    pq.write_table(pa.table({
        "episode_index": [0, 1], "tasks": [["push"], ["push"]], "length": [3, 4], "data/chunk_index": [0, 0],
        "data/file_index": [0, 0], "dataset_from_index": [0, 3], "dataset_to_index": [3, 7],
        "videos/observation.image/chunk_index": [0, 0], "videos/observation.image/file_index": [0, 0],
        "videos/observation.image/from_timestamp": [0.0, 0.3], "videos/observation.image/to_timestamp": [0.3, 0.7]}),
        root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    features = {"observation.image": {"dtype": "video", "shape": [16, 16, 3], "names": ["height", "width", "channel"]},
                "observation.state": {"dtype": "float32", "shape": [2], "names": ["x", "y"]},
                "action": {"dtype": "float32", "shape": [2], "names": ["x", "y"]}}
    (root / "meta" / "info.json").write_text(json.dumps({
        "codebase_version": "v3.0", "fps": 10, "features": features, "total_episodes": 2, "total_frames": 7,
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"}))
    episodes, _ = load_dataset(root)
    assert [len(e) for e in episodes] == [3, 4]
    assert set(episodes[0].observations) == {"state", "image"}
    assert np.array_equal(episodes[1].observations["state"], state[3:])
    assert np.array_equal(episodes[1].actions, -state[3:])
    assert [e.success for e in episodes] == [True, False]
    assert episodes[0].terminals.tolist() == [False, False, True] and not episodes[1].terminals.any()
    # the second episode starts 0.3 s into the shared video: frames 3..6
    brightness = episodes[1].observations["image"].reshape(4, -1).mean(axis=1)
    assert np.allclose(brightness, [60, 80, 100, 120], atol=4)


def test_convert_robomimic_to_lerobot_and_back(tmp_path, rng):
    episodes = [make_episode(rng, 5, states=True), make_episode(rng, 3, success=False, states=True)]
    h5 = save_dataset(episodes, tmp_path / "demo.hdf5", env_meta={"env_name": "PickPlaceCan", "task": "can"})
    folder = convert_dataset(h5, tmp_path / "demo_lerobot")
    assert detect_format(folder) == "lerobot"
    again = convert_dataset(folder, tmp_path / "again.hdf5")
    back, meta = load_dataset(again)
    assert meta["env_name"] == "PickPlaceCan"
    for original, loaded in zip(episodes, back):
        assert np.array_equal(loaded.actions, original.actions)
        assert np.array_equal(loaded.observations["object"], original.observations["object"])
        assert np.array_equal(loaded.states, original.states)
        assert loaded.success == original.success


def test_tasks_parquet_reads_with_pandas_as_lerobot_does(tmp_path, rng):
    pandas = pytest.importorskip("pandas")
    root = tmp_path / "t_lerobot"
    save_lerobot([make_episode(rng, 3)], root, env_meta={"env_name": "can"}, fps=20, task_description="pick the can")
    tasks = pandas.read_parquet(root / "meta" / "tasks.parquet")
    assert int(tasks.loc["pick the can"].task_index) == 0
