"""RobomimicAppender: every appended episode is durable; a kill while recording the next loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from robofinetune.data import robomimic_io
from robofinetune.data.robomimic_io import RobomimicAppender, load_robomimic
from robofinetune.data.synthetic import synthetic_episodes
from robofinetune.errors import DatasetError

REPO = Path(__file__).resolve().parents[1]

RECORDER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from robofinetune.data.robomimic_io import RobomimicAppender
    from robofinetune.data.synthetic import synthetic_episodes

    path = sys.argv[1]
    episodes = synthetic_episodes(n=4, length=(20, 40), image_key="agentview_image", seed=7)
    appender = RobomimicAppender(path, env_meta={"env_name": "PickPlaceCan", "env_kwargs": {}})
    for episode in episodes[:3]:
        appender.append(episode)
    print("appended", len(appender), flush=True)
    # "recording" the 4th episode: steps accumulate in memory until the parent kills us
    frames = []
    while True:
        frames.append(np.random.normal(size=(23,)))
        if len(frames) == 5:
            print("recording", flush=True)
        time.sleep(0.01)
    """
)


def _spawn(script: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def test_sigkill_while_recording_keeps_appended_episodes(tmp_path):
    path = tmp_path / "teleop.hdf5"
    proc = _spawn(RECORDER, str(path))
    try:
        lines = []
        deadline = time.time() + 60
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.strip() == "recording":
                break
        assert lines[-2:] == ["appended 3", "recording"], (lines, proc.stderr.read() if proc.poll() is not None else "")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    loaded, meta = load_robomimic(path)
    expected = synthetic_episodes(n=4, length=(20, 40), image_key="agentview_image", seed=7)[:3]
    assert len(loaded) == 3
    assert meta["env_name"] == "PickPlaceCan"
    for original, got in zip(expected, loaded):
        np.testing.assert_array_equal(original.actions, got.actions)
        np.testing.assert_array_equal(original.observations["agentview_image"], got.observations["agentview_image"])
        assert got.success == original.success
    with h5py.File(path, "r") as f:
        assert f["data"].attrs["total"] == sum(len(e) for e in expected)

    # an interrupted session resumes: numbering continues after the last durable demo
    appender = RobomimicAppender(path)
    assert len(appender) == 3
    assert appender.append(synthetic_episodes(n=1, seed=3)[0]) == "demo_3"
    assert len(load_robomimic(path)[0]) == 4


@pytest.mark.parametrize("atomic", [False, True])
def test_failure_inside_append_never_exposes_a_partial_demo(tmp_path, monkeypatch, atomic):
    path = tmp_path / "rec.hdf5"
    episodes = synthetic_episodes(n=3, seed=2)
    appender = RobomimicAppender(path, atomic=atomic)
    appender.append(episodes[0])
    appender.append(episodes[1])

    real = robomimic_io._write_demo

    def dies_midway(group, episode, arrays, where):
        group.create_dataset("actions", data=episode.actions)  # part of the demo is on disk...
        raise KeyboardInterrupt  # ...when the writer is interrupted

    monkeypatch.setattr(robomimic_io, "_write_demo", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        appender.append(episodes[2])
    monkeypatch.setattr(robomimic_io, "_write_demo", real)

    loaded, _ = load_robomimic(path)
    assert len(loaded) == 2
    np.testing.assert_array_equal(loaded[1].actions, episodes[1].actions)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.hdf5"]  # no temporary left behind
    with h5py.File(path, "r") as f:
        assert ("_staging" in f) is (not atomic)  # non-atomic: the half demo sits outside data/

    resumed = RobomimicAppender(path)  # opening cleans the staging area
    with h5py.File(path, "r") as f:
        assert "_staging" not in f
    assert resumed.append(episodes[2]) == "demo_2"
    with h5py.File(path, "r") as f:
        assert "_staging" not in f
        assert sorted(f["data"].keys()) == ["demo_0", "demo_1", "demo_2"]
        assert [n.decode() for n in f["mask/successful"][:]] == ["demo_0", "demo_2"]


def test_invalid_episode_is_rejected_before_touching_the_file(tmp_path):
    path = tmp_path / "rec.hdf5"
    appender = RobomimicAppender(path)
    appender.append(synthetic_episodes(n=1, seed=0)[0])
    before = path.read_bytes()
    bad = synthetic_episodes(n=1, seed=1)[0]
    bad.observations["object"][2, 3] = np.nan
    with pytest.raises(DatasetError, match=r"rec.hdf5: data/demo_1: observation 'object' contains NaN"):
        appender.append(bad)
    assert path.read_bytes() == before
    assert len(appender) == 1


def test_appender_refuses_other_task_and_corrupt_file(tmp_path):
    path = tmp_path / "rec.hdf5"
    RobomimicAppender(path, env_meta={"env_name": "PickPlaceCan"}).append(synthetic_episodes(n=1)[0])
    with pytest.raises(DatasetError, match="refusing to append episodes of 'Lift'"):
        RobomimicAppender(path, env_meta={"env_name": "Lift"})
    broken = tmp_path / "broken.hdf5"
    broken.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match="broken.hdf5"):
        RobomimicAppender(broken)
