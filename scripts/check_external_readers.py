#!/usr/bin/env python
"""Prove that other tools read what robofinetune writes: robomimic's own SequenceDataset opens our robomimic
HDF5 and LeRobot's own LeRobotDataset opens our LeRobot v3 folder (videos included), and both hand back the
actions and observations we wrote.

    python scripts/check_external_readers.py          # (make check-readers) builds the side env when needed

robomimic 0.3.0 and lerobot 0.4.4 pin torch versions older than the project's, so they live in a side venv
(``.venv-readers``, created here from scratch when missing) installed ``--no-deps`` with the few small packages
they need; the side venv reuses the project venv's packages (torch, numpy, h5py, pyarrow, pandas) through a
``.pth`` file and never modifies the project venv. The script:

1. writes, with robofinetune (``save_dataset``), a can-shaped dataset (synthetic, 23-dim can observation
   layout, 7-dim actions, simulator states, and a camera whose frames step 12 grey levels a frame so a frame
   decoded off by one fails the bound) and a pointmass_image dataset (the scripted expert, state keys and
   the ``top_image`` camera) as robomimic HDF5 and as LeRobot v3 folders;
2. runs itself inside the side venv (``--read``), where robomimic's ``SequenceDataset`` (seq_length 3,
   obs normalisation off) and lerobot's ``LeRobotDataset(repo_id, root)`` (video backend pyav, delta timestamps
   on the action and the camera) read every sample, compared with what was written;
3. prints a table (reader, file, episodes, frames, field, max abs diff, bound) and exits 1 on any mismatch.

lerobot 0.4.4's pyav backend decodes through ``torchvision.io.VideoReader``, which no torchvision that loads
beside torch 2.13 still has (torchvision removed its video API; its wheel for 2.13 does not load here). The
reader therefore provides a ``torchvision`` stand-in with exactly that piece, a VideoReader over PyAV (what
torchvision's pyav backend was), so lerobot's own decode function, timestamp queries and tolerance check run
unchanged. Everything else is the packages' own code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / ".venv-readers"
# installed --no-deps: their own pins (torch<2.11 and friends) do not fit the project's torch
NO_DEPS = ["lerobot==0.4.4", "robomimic==0.3.0"]
# what they import at run time, pinned to versions measured to work here (pip resolves their own deps against the
# project venv's packages, which the side venv sees)
DEPS = ["datasets==4.1.1", "huggingface-hub==0.35.3", "accelerate==1.16.0", "av==18.1.0", "jsonlines==4.0.0",
        "deepdiff==9.1.0", "draccus==0.11.6", "termcolor==3.3.0", "einops==0.8.2"]
SEQ_LENGTH = 3
# the project's own LeRobot reader test (tests/test_lerobot_io.py): decoded frames are close, not equal, to
# what was encoded: mean absolute pixel error below 6 (0..255)
VIDEO_MEAN_ABS_BOUND = 6.0
STATS_BOUND = 1e-5  # float32 statistics
FPS = 20


# ------------------------------------------------------------------------------------------- the side venv


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_side_env(venv: Path, quiet: bool = True) -> Path:
    """Create (or reuse) the side venv: our interpreter, the project venv's packages visible behind its own."""
    base = sysconfig.get_paths()["purelib"]  # the project venv's site-packages (this script runs in it)
    spec = {"base": base, "no_deps": NO_DEPS, "deps": DEPS, "python": sys.version.split()[0]}
    marker = venv / ".robofinetune-readers.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec and venv_python(venv).exists():
        return venv_python(venv)
    print(f"building the side environment {venv} (robomimic 0.3.0 and lerobot 0.4.4, --no-deps) ...", flush=True)
    started = time.time()
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True)
    python = venv_python(venv)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # addsitedir also runs the project venv's own .pth files (the editable robofinetune install); the side venv's
    # site-packages stay first on sys.path, so its datasets/huggingface-hub shadow the project's newer ones
    Path(purelib, "_robofinetune_project.pth").write_text(f"import site; site.addsitedir({base!r})\n")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-warn-conflicts"]
    if quiet:
        pip.append("--quiet")
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    subprocess.run(pip + DEPS, check=True, env=env)
    subprocess.run(pip + ["--no-deps"] + NO_DEPS, check=True, env=env)
    marker.write_text(json.dumps(spec))
    print(f"side environment ready in {time.time() - started:.0f} s", flush=True)
    return python


# ---------------------------------------------------------------------------------- writing (project venv)


def write_datasets(folder: Path) -> list[dict]:
    """The datasets robofinetune writes, and what was written (expected.npz beside each)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pixels_common import expert_image_demos

    from robofinetune.data.io import save_dataset
    from robofinetune.data.synthetic import synthetic_episodes

    can_meta = {"env_name": "PickPlaceCan", "type": 1, "task": "can",
                "env_kwargs": {"robots": ["Panda"], "control_freq": FPS}}
    pointmass_meta = {"env_name": "pointmass_image", "type": 1, "task": "pointmass_image", "env_kwargs": {}}
    can = synthetic_episodes(n=5, length=(8, 16), seed=3)  # can layout: 23-dim obs, 7-dim actions, states
    for episode in can:  # a camera whose frames differ by 12 grey levels a step, so a frame off by one is caught
        ramp = (16 + 12 * np.arange(len(episode) + 1, dtype=np.uint8))[:, None, None, None]
        frames = np.broadcast_to(ramp, (len(episode) + 1, 24, 32, 3)).copy()
        episode.observations["agentview_image"] = frames[:-1]
        episode.final_observation["agentview_image"] = frames[-1]
    pixels = expert_image_demos(3, seed=0) + expert_image_demos(1, seed=10, max_steps=12)  # the last one fails
    written = []
    for name, episodes, meta in (("can_state", can, can_meta), ("pointmass_image", pixels, pointmass_meta)):
        expected = {}
        for i, episode in enumerate(episodes):
            expected[f"{i}/actions"] = episode.actions
            expected[f"{i}/rewards"] = episode.rewards
            expected[f"{i}/dones"] = episode.terminals
            for key, value in episode.observations.items():
                expected[f"{i}/obs/{key}"] = value
            for key, value in episode.next_observations().items():
                expected[f"{i}/next_obs/{key}"] = value
        np.savez(folder / f"{name}_expected.npz", **expected)
        keys = {key: ("rgb" if value.dtype == np.uint8 and value.ndim == 4 else "low_dim")
                for key, value in episodes[0].observations.items()}
        hdf5 = save_dataset(episodes, folder / f"{name}.hdf5", env_meta=meta)
        lerobot = save_dataset(episodes, folder / f"{name}_lerobot", env_meta=meta)
        written.append({"name": name, "episodes": len(episodes), "frames": int(sum(len(e) for e in episodes)),
                        "successful": int(sum(e.success for e in episodes)), "task": meta["task"],
                        "obs_keys": keys, "hdf5": str(hdf5), "lerobot": str(lerobot),
                        "expected": str(folder / f"{name}_expected.npz")})
    return written


# -------------------------------------------------------------------------------------- reading (side venv)


def _expected(path: str) -> dict[int, dict[str, np.ndarray]]:
    data = np.load(path)
    episodes: dict[int, dict[str, np.ndarray]] = {}
    for name in data.files:
        index, field = name.split("/", 1)
        episodes.setdefault(int(index), {})[field] = data[name]
    return episodes


class Tally:
    """The largest absolute difference seen per field (None: nothing compared)."""

    def __init__(self):
        self.max: dict[str, float] = {}
        self.mean: dict[str, list[float]] = {}

    def add(self, field: str, got, want, pixels: bool = False) -> None:
        got = np.asarray(got, dtype=np.float64)
        want = np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            raise AssertionError(f"{field}: shape {got.shape}, expected {want.shape}")
        diff = np.abs(got - want)
        self.max[field] = max(self.max.get(field, 0.0), float(diff.max()) if diff.size else 0.0)
        if pixels:
            self.mean.setdefault(field, []).extend(diff.reshape(len(diff), -1).mean(axis=1).tolist())


def read_robomimic(item: dict) -> list[dict]:
    import robomimic
    import robomimic.utils.obs_utils as ObsUtils
    from robomimic.utils.dataset import SequenceDataset

    keys = item["obs_keys"]
    ObsUtils.initialize_obs_utils_with_obs_specs({"obs": {
        "low_dim": [k for k, m in keys.items() if m == "low_dim"], "rgb": [k for k, m in keys.items() if m == "rgb"]}})
    dataset = SequenceDataset(hdf5_path=item["hdf5"], obs_keys=list(keys), dataset_keys=("actions", "rewards", "dones"),
                              frame_stack=1, seq_length=SEQ_LENGTH, pad_frame_stack=True, pad_seq_length=True,
                              get_pad_mask=False, goal_mode=None, hdf5_cache_mode="low_dim", hdf5_use_swmr=True,
                              hdf5_normalize_obs=False, filter_by_attribute=None, load_next_obs=True)
    expected = _expected(item["expected"])
    tally = Tally()
    for index in range(len(dataset)):
        sample = dataset[index]
        demo = dataset._index_to_demo_id[index]
        episode = int(demo.split("_")[1])
        want = expected[episode]
        t = index - dataset._demo_id_to_start_indices[demo]
        length = len(want["actions"])
        steps = np.minimum(np.arange(t, t + SEQ_LENGTH), length - 1)  # robomimic pads the end with the last step
        for field in ("actions", "rewards", "dones"):
            tally.add(field, sample[field], want[field][steps].astype(np.float32))
        for prefix in ("obs", "next_obs"):
            for key, modality in keys.items():
                # SequenceDataset hands observations as stored (images HWC); its algorithms process them later
                field = f"{prefix} {key}" if modality == "rgb" else f"{prefix} low-dim"
                tally.add(field, sample[prefix][key], want[f"{prefix}/{key}"][steps])
    assert dataset.n_demos == item["episodes"], f"robomimic sees {dataset.n_demos} demos, we wrote {item['episodes']}"
    assert len(dataset) == item["frames"], f"robomimic sees {len(dataset)} sequences, we wrote {item['frames']} steps"
    # robomimic's filter keys: mask/successful names the successful demos
    successful = SequenceDataset(hdf5_path=item["hdf5"], obs_keys=list(keys), dataset_keys=("actions",),
                                 seq_length=SEQ_LENGTH, hdf5_cache_mode=None, filter_by_attribute="successful")
    tally.max["filter_by_attribute='successful' (demos)"] = float(abs(successful.n_demos - item["successful"]))
    reader = f"robomimic {robomimic.__version__} SequenceDataset"
    return [{"reader": reader, "file": Path(item["hdf5"]).name, "episodes": dataset.n_demos, "frames": len(dataset),
             "field": field, "max_abs_diff": value, "bound": 0.0} for field, value in tally.max.items()]


def _torchvision_video_stand_in() -> str:
    """lerobot 0.4.4 imports torchvision and decodes ``pyav`` through ``torchvision.io.VideoReader``; provide that
    (a VideoReader over PyAV, as torchvision's pyav backend was) when no working torchvision has it."""
    import importlib.util
    import types

    if importlib.util.find_spec("torchvision") is not None:
        try:
            import torchvision
            if hasattr(torchvision.io, "VideoReader"):
                return f"torchvision {torchvision.__version__}"
        except Exception:  # noqa: BLE001 - e.g. 'operator torchvision::nms does not exist' beside torch 2.13
            pass
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    import av
    import torch

    class VideoReader:
        def __init__(self, path: str, stream: str = "video"):
            self.container = av.open(str(path))
            self._stream = self.container.streams.video[0]
            self._frames = self.container.decode(video=0)

        def seek(self, seconds: float, keyframes_only: bool = False):
            offset = int(round(seconds / float(self._stream.time_base)))
            self.container.seek(offset, any_frame=not keyframes_only, backward=True, stream=self._stream)
            self._frames = self.container.decode(video=0)
            return self

        def __iter__(self):
            return self

        def __next__(self):
            frame = next(self._frames)
            data = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
            return {"data": data, "pts": float(frame.pts * frame.time_base)}

    class ToTensor:  # used by lerobot only for images stored inside parquet (not written by robofinetune)
        def __call__(self, picture):
            array = np.asarray(picture, dtype=np.float32) / 255.0
            return torch.from_numpy(array).permute(2, 0, 1) if array.ndim == 3 else torch.from_numpy(array)[None]

    import importlib.machinery

    module = types.ModuleType("torchvision")
    module.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    module.__version__ = "stand-in"
    module.set_video_backend = lambda backend: None
    module.io = types.ModuleType("torchvision.io")
    module.io.__spec__ = importlib.machinery.ModuleSpec("torchvision.io", None)
    module.io.VideoReader = VideoReader
    module.transforms = types.ModuleType("torchvision.transforms")
    module.transforms.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)
    module.transforms.ToTensor = ToTensor
    sys.modules.update({"torchvision": module, "torchvision.io": module.io,
                        "torchvision.transforms": module.transforms})
    return f"PyAV {av.__version__} VideoReader stand-in"


def read_lerobot(item: dict) -> list[dict]:
    _torchvision_video_stand_in()
    import lerobot
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    keys = item["obs_keys"]
    low_dim = [k for k, m in keys.items() if m == "low_dim"]
    cameras = {f"observation.images.{k[: -len('_image')]}": k for k, m in keys.items() if m == "rgb"}
    action_deltas = [0.0, 1 / FPS, 2 / FPS]
    camera_deltas = [-1 / FPS, 0.0]
    delta_timestamps = {"action": action_deltas, **{feature: camera_deltas for feature in cameras}}
    dataset = LeRobotDataset(repo_id=f"robofinetune/{item['name']}", root=item["lerobot"],
                             delta_timestamps=delta_timestamps, video_backend="pyav")
    expected = _expected(item["expected"])
    assert dataset.fps == FPS, f"lerobot reads fps {dataset.fps}, we wrote {FPS}"
    assert dataset.num_episodes == item["episodes"], f"lerobot sees {dataset.num_episodes} episodes"
    assert dataset.num_frames == item["frames"] == len(dataset), f"lerobot sees {dataset.num_frames} frames"
    tally = Tally()
    for index in range(len(dataset)):
        sample = dataset[index]
        episode = int(sample["episode_index"])
        t = int(sample["frame_index"])
        want = expected[episode]
        length = len(want["actions"])
        steps = np.clip(t + np.rint(np.array(action_deltas) * FPS).astype(int), 0, length - 1)
        tally.add("action", sample["action"].numpy(), want["actions"][steps])
        state = np.concatenate([want[f"obs/{k}"][t].reshape(-1) for k in low_dim]).astype(np.float32)
        tally.add("observation.state", sample["observation.state"].numpy(), state)
        tally.add("next.reward", sample["next.reward"].numpy().reshape(-1), want["rewards"][t:t + 1])
        if sample["task"] != item["task"]:
            raise AssertionError(f"lerobot reads task {sample['task']!r} at frame {index}, we wrote {item['task']!r}")
        for feature, key in cameras.items():
            frames = np.clip(t + np.rint(np.array(camera_deltas) * FPS).astype(int), 0, length - 1)
            decoded = sample[feature].numpy() * 255.0  # (2, C, H, W) float in [0, 1]
            tally.add(f"{feature} (video)", decoded, np.moveaxis(want[f"obs/{key}"][frames], -1, -3), pixels=True)
    # the normalisation statistics LeRobot policies use
    actions = np.concatenate([want["actions"] for want in expected.values()]).astype(np.float64)
    tally.add("meta/stats action mean, std", np.concatenate([dataset.meta.stats["action"]["mean"],
                                                            dataset.meta.stats["action"]["std"]]),
              np.concatenate([actions.mean(axis=0), actions.std(axis=0)]))
    reader = f"lerobot {getattr(lerobot, '__version__', '0.4.4')} LeRobotDataset"
    rows = []
    for field, value in tally.max.items():
        row = {"reader": reader, "file": Path(item["lerobot"]).name, "episodes": dataset.num_episodes,
               "frames": dataset.num_frames, "field": field, "max_abs_diff": value, "bound": 0.0}
        if field in tally.mean:
            row["mean_abs_diff"] = float(np.max(tally.mean[field]))  # the worst frame's mean pixel error
            row["bound"] = VIDEO_MEAN_ABS_BOUND
        elif field.startswith("meta/stats"):
            row["bound"] = STATS_BOUND
        rows.append(row)
    return rows


def read_all(written: list[dict]) -> list[dict]:
    rows = []
    for item in written:
        for reader, function in (("robomimic", read_robomimic), ("lerobot", read_lerobot)):
            try:
                rows.extend(function(item))
            except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
                import traceback

                traceback.print_exc()
                rows.append({"reader": reader, "file": Path(item["hdf5" if reader == "robomimic" else
                                                               "lerobot"]).name, "episodes": "-", "frames": "-",
                             "field": f"FAILED: {type(exc).__name__}: {exc}"[:200], "max_abs_diff": None,
                             "bound": 0.0})
    return rows


# ---------------------------------------------------------------------------------------------------- report


def passed(row: dict) -> bool:
    if row["max_abs_diff"] is None:
        return False
    if "mean_abs_diff" in row:
        return row["mean_abs_diff"] < row["bound"]
    return row["max_abs_diff"] <= row["bound"]


def print_table(rows: list[dict]) -> None:
    header = ("reader", "file", "episodes", "frames", "field", "max abs diff", "bound", "ok")
    lines = []
    for row in rows:
        diff = "-" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.3g}"
        bound = "exact" if row["bound"] == 0.0 else f"mean < {row['bound']:g} px" if "mean_abs_diff" in row \
            else f"<= {row['bound']:g}"
        if "mean_abs_diff" in row:
            diff += f" (mean {row['mean_abs_diff']:.2f})"
        lines.append((row["reader"], row["file"], str(row["episodes"]), str(row["frames"]), row["field"], diff, bound,
                      "ok" if passed(row) else "MISMATCH"))
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]
    for line in [header, tuple("-" * w for w in widths), *lines]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the side venv (created when missing)")
    parser.add_argument("--keep", type=Path, help="write the datasets here and keep them (default: a temp folder)")
    parser.add_argument("--read", type=Path, help=argparse.SUPPRESS)  # internal: the side-venv half
    args = parser.parse_args()
    if args.read:
        written = json.loads((args.read / "written.json").read_text())
        rows = read_all(written)
        (args.read / "rows.json").write_text(json.dumps(rows))
        return 0
    started = time.time()
    python = ensure_side_env(args.venv.resolve())
    with tempfile.TemporaryDirectory(prefix="robofinetune-readers-") as tmp:
        folder = args.keep.resolve() if args.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        written = write_datasets(folder)
        (folder / "written.json").write_text(json.dumps(written))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(folder / "hf_home"),
               "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
        result = subprocess.run([str(python), str(Path(__file__).resolve()), "--read", str(folder)], env=env)
        rows_path = folder / "rows.json"
        if result.returncode != 0 or not rows_path.is_file():
            print(f"check-readers: the side-venv reader exited {result.returncode}", file=sys.stderr)
            return 1
        rows = json.loads(rows_path.read_text())
    print()
    print_table(rows)
    failed = [row for row in rows if not passed(row)]
    # worded so CI does not take it for a test runner's closing line
    verdict = f"all {len(rows)} checks match" if not failed else f"{len(failed)} of {len(rows)} checks MISMATCH"
    print(f"\ncheck-readers: {verdict} ({time.time() - started:.0f} s)")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
