"""LeRobot dataset format v3.0: read, write, and append one durable episode at a time (pyarrow + ffmpeg).

The lerobot package cannot be installed beside this project's torch, so the format is written from its
specification (``meta/info.json`` codebase_version ``v3.0``) and checked by round trips. Layout written::

    meta/info.json                          codebase_version, fps, features {dtype, shape, names}, totals,
                                            chunks_size, data_path, video_path, splits
    meta/stats.json                         per feature: min, max, mean, std, count (images: per channel, 0..1)
    meta/tasks.parquet                      index 'task' (the description) -> task_index (pandas layout)
    meta/episodes/chunk-000/file-000.parquet  one row per episode: episode_index, tasks, length,
                                            data/chunk_index, data/file_index, dataset_from_index,
                                            dataset_to_index, videos/<key>/{chunk_index, file_index,
                                            from_timestamp, to_timestamp}, meta/episodes/*, stats/<feature>/*,
                                            and ours: robofinetune/success, robofinetune/metadata (JSON),
                                            robofinetune/final_observation (JSON, low-dim keys)
    meta/robofinetune.json                  ours: env_meta and how observation keys map to features
    data/chunk-000/file-000.parquet         many episodes per file (rolled over at data_files_size_in_mb):
                                            timestamp, frame_index, episode_index, index, task_index,
                                            observation.state, action, next.reward, next.done, next.success,
                                            complementary_info.<key> for each Episode.step_data key (the
                                            naming LeRobot's HIL-SERL uses for per-frame extras such as
                                            is_intervention)
    videos/observation.images.<cam>/chunk-000/file-NNN.mp4   camera keys ``<cam>_image``, one file per episode

Observation keys: the low-dim keys are concatenated into ``observation.state`` (names ``<key>.<i>``), image keys
``<cam>_image`` (H x W x C uint8) become video features ``observation.images.<cam>``; simulator states, when every
episode has them, go to ``sim_state``. Reading a dataset written elsewhere maps ``observation.state`` to
``state``, ``observation.images.<cam>`` to ``<cam>_image`` and other ``observation.<x>`` to ``<x>``.

Durability: an append writes the episode's video files and the new data file under temporary names, renames
them into place, and then commits by renaming the new episodes-metadata file over the old one; info/stats/
tasks follow. Readers trust ``meta/episodes``, so a ``kill -9`` at any moment leaves a dataset that opens with
every committed episode; rows of an uncommitted episode are ignored and dropped on the next append.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from robofinetune.data._util import (SUCCESS_SOURCE_KEY, SUCCESS_UNKNOWN, check_episodes, fsync_path,
                                     resolve_obs_keys, tmp_sibling, to_jsonable)
from robofinetune.data.episode import Episode
from robofinetune.errors import DatasetError

CODEBASE_VERSION = "v3.0"
FORMAT = "robofinetune-lerobot/1"
DEFAULT_CHUNK_SIZE = 1000
DEFAULT_DATA_FILE_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB = 200
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
STATE = "observation.state"
ACTION = "action"
SIM_STATE = "sim_state"
IMAGE_PREFIX = "observation.images."
STEP_DATA_PREFIX = "complementary_info."
DEFAULT_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
EXTRA_FEATURES = {
    "next.reward": {"dtype": "float32", "shape": [1], "names": None},
    "next.done": {"dtype": "bool", "shape": [1], "names": None},
    "next.success": {"dtype": "bool", "shape": [1], "names": None},
}


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is a dependency
        raise DatasetError(f"LeRobot datasets need pyarrow: {exc}") from None
    return pa, pq


def is_lerobot_dataset(path: str | os.PathLike) -> bool:
    return (Path(path) / "meta" / "info.json").is_file()


def _is_image_key(key: str, value: np.ndarray) -> bool:
    return key.endswith("_image") and value.ndim == 4 and value.dtype == np.uint8


def image_feature(key: str) -> str:
    return IMAGE_PREFIX + (key[: -len("_image")] if key.endswith("_image") else key)


def key_for_feature(feature: str) -> str:
    """The observation key a feature of a dataset written elsewhere is read as."""
    if feature.startswith(IMAGE_PREFIX):
        return feature[len(IMAGE_PREFIX):].replace(".", "_") + "_image"
    if feature == "observation.image":
        return "image"
    if feature == STATE:
        return "state"
    return feature[len("observation."):].replace(".", "_")


# --- small file helpers -----------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        tmp.write_text(json.dumps(value, indent=4))
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_parquet_atomic(path: Path, table: Any) -> None:
    _, pq = _pa()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path, ".parquet")
    try:
        pq.write_table(table, tmp, compression="snappy")
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DatasetError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None


def _read_parquet(path: Path) -> Any:
    _, pq = _pa()
    try:
        return pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for damaged files
        raise DatasetError(f"{path}: unreadable parquet (corrupt or truncated): {exc}") from None


# --- video -----------------------------------------------------------------------------------------------------


def _ffmpeg() -> str | None:
    return shutil.which("ffmpeg")


def _encoders() -> set[str]:
    if not hasattr(_encoders, "cache"):
        found: set[str] = set()
        if _ffmpeg():
            out = subprocess.run([_ffmpeg(), "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
            found = {line.split()[1] for line in out.splitlines() if len(line.split()) > 1 and line.startswith(" V")}
        _encoders.cache = found
    return _encoders.cache


def choose_codec(height: int, width: int, requested: str | None = None) -> str:
    """libx264 when ffmpeg has it (every decoder reads H.264), else libsvtav1 (LeRobot's default, >= 64 px),
    else mpeg4, else OpenCV's mp4v."""
    encoders = _encoders()
    if requested and requested != "auto":
        if requested != "opencv" and requested not in encoders:
            raise DatasetError(f"video codec '{requested}' is not available (ffmpeg encoders: "
                               f"{sorted(e for e in encoders if e in ('libx264', 'libsvtav1', 'mpeg4'))})")
        return requested
    if "libx264" in encoders:
        return "libx264"
    if "libsvtav1" in encoders and min(height, width) >= 64:
        return "libsvtav1"
    if "mpeg4" in encoders:
        return "mpeg4"
    return "opencv"


def encode_video(frames: np.ndarray, path: Path, fps: float, codec: str = "auto") -> dict[str, Any]:
    """Write (T, H, W, C) uint8 RGB frames as an mp4; return the LeRobot ``info`` block of the feature."""
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    if frames.ndim == 3:
        frames = frames[..., None]
    count, height, width, channels = frames.shape
    codec = choose_codec(height, width, codec)
    pixel_format = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
    path.parent.mkdir(parents=True, exist_ok=True)
    if channels not in (1, 3):
        raise DatasetError(f"{path}: cannot encode {channels}-channel images (1 or 3 supported)")
    if channels == 1:
        frames = np.repeat(frames, 3, axis=-1)
    if codec == "opencv":
        import cv2

        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        pixel_format = "yuv420p"
    else:
        options = {"libx264": ["-crf", "18", "-preset", "veryfast"], "libsvtav1": ["-crf", "30", "-preset", "12"],
                   "mpeg4": ["-q:v", "2"]}.get(codec, [])
        command = [_ffmpeg(), "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
                   "-r", str(fps), "-i", "-", "-c:v", codec, "-pix_fmt", pixel_format, "-g", "2", *options,
                   "-f", "mp4", str(path)]
        result = subprocess.run(command, input=frames.tobytes(), capture_output=True)
        if result.returncode != 0:
            raise DatasetError(f"{path}: ffmpeg ({codec}) failed: {result.stderr.decode(errors='replace')[-500:]}")
    return {"video.height": height, "video.width": width, "video.codec": {"libx264": "h264", "libsvtav1": "av1",
            "mpeg4": "mpeg4", "opencv": "mpeg4"}.get(codec, codec), "video.pix_fmt": pixel_format,
            "video.is_depth_map": False, "video.fps": fps, "video.channels": 3, "has_audio": False}


def decode_video(path: Path, start: float, count: int, height: int, width: int, fps: float) -> np.ndarray:
    """``count`` RGB frames from ``start`` seconds on, (count, H, W, 3) uint8."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing video file")
    if _ffmpeg():
        command = [_ffmpeg(), "-v", "error", "-ss", f"{start:.6f}", "-i", str(path), "-frames:v", str(count),
                   "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
        result = subprocess.run(command, capture_output=True)
        if result.returncode != 0:
            raise DatasetError(f"{path}: cannot decode: {result.stderr.decode(errors='replace')[-300:]}")
        data = np.frombuffer(result.stdout, dtype=np.uint8)
        frame_size = height * width * 3
        got = data.size // frame_size
        frames = data[: got * frame_size].reshape(got, height, width, 3)
    else:
        import cv2

        capture = cv2.VideoCapture(str(path))
        capture.set(cv2.CAP_PROP_POS_MSEC, start * 1000.0)
        decoded = []
        while len(decoded) < count:
            ok, frame = capture.read()
            if not ok:
                break
            decoded.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        capture.release()
        frames = np.stack(decoded) if decoded else np.zeros((0, height, width, 3), np.uint8)
    if len(frames) < count:
        raise DatasetError(f"{path}: holds {len(frames)} frames from {start:.3f} s, the episode needs {count}")
    return frames


# --- statistics ---------------------------------------------------------------------------------------------------


def _stats(values: np.ndarray, image: bool = False) -> dict[str, np.ndarray]:
    if image:  # per channel over frames and pixels, in [0, 1], shaped (C, 1, 1) as LeRobot stores them
        flat = values.reshape(-1, values.shape[-1]).astype(np.float64) / 255.0
        reshape = (values.shape[-1], 1, 1)
    else:
        flat = values.reshape(len(values), -1).astype(np.float64)
        reshape = (flat.shape[1],)
    return {"min": flat.min(axis=0).reshape(reshape), "max": flat.max(axis=0).reshape(reshape),
            "mean": flat.mean(axis=0).reshape(reshape), "std": flat.std(axis=0).reshape(reshape),
            "count": np.array([len(values)])}


def aggregate_stats(per_episode: list[dict[str, dict[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """Combine per-episode stats: weighted means, pooled variances (parallel-variance formula)."""
    result: dict[str, dict[str, np.ndarray]] = {}
    features = {feature for stats in per_episode for feature in stats}
    for feature in features:
        parts = [stats[feature] for stats in per_episode if feature in stats]
        counts = np.array([float(part["count"][0]) for part in parts])
        total = counts.sum()
        means = np.stack([np.asarray(part["mean"], dtype=np.float64) for part in parts])
        variances = np.stack([np.asarray(part["std"], dtype=np.float64) ** 2 for part in parts])
        weights = (counts / total).reshape((-1,) + (1,) * (means.ndim - 1))
        mean = (weights * means).sum(axis=0)
        variance = (weights * (variances + (means - mean) ** 2)).sum(axis=0)
        result[feature] = {"min": np.min(np.stack([part["min"] for part in parts]), axis=0),
                           "max": np.max(np.stack([part["max"] for part in parts]), axis=0),
                           "mean": mean, "std": np.sqrt(variance), "count": np.array([int(total)])}
    return result


def _stats_json(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    return {feature: {name: np.asarray(value).tolist() for name, value in values.items()}
            for feature, values in sorted(stats.items())}


# --- tasks.parquet in pandas' layout, without pandas ---------------------------------------------------------------


def _tasks_table(tasks: list[str]) -> Any:
    pa, _ = _pa()
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
                     "metadata": None},
                    {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
                     "metadata": None}],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.0",
    }
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


def _read_tasks(root: Path) -> list[str]:
    path = root / "meta" / "tasks.parquet"
    if not path.is_file():
        return []
    table = _read_parquet(path)
    columns = table.column_names
    names = table.column("task").to_pylist() if "task" in columns else \
        table.column("__index_level_0__").to_pylist() if "__index_level_0__" in columns else []
    indices = table.column("task_index").to_pylist() if "task_index" in columns else list(range(len(names)))
    ordered = [""] * (max(indices, default=-1) + 1)
    for name, index in zip(names, indices):
        ordered[int(index)] = str(name)
    return ordered


# --- the layout of one dataset -----------------------------------------------------------------------------------


def _features_for(episode: Episode, fps: float) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """info.json features and the observation layout, from the first episode."""
    features: dict[str, Any] = {}
    layout: list[dict[str, Any]] = []
    names: list[str] = []
    offset = 0
    for key, value in episode.observations.items():
        value = np.asarray(value)
        if _is_image_key(key, value):
            feature = image_feature(key)
            features[feature] = {"dtype": "video", "shape": list(value.shape[1:]),
                                 "names": ["height", "width", "channels"]}
            layout.append({"key": key, "feature": feature, "shape": list(value.shape[1:]), "dtype": "uint8"})
        else:
            width = int(np.prod(value.shape[1:])) if value.ndim > 1 else 1
            layout.append({"key": key, "feature": STATE, "start": offset, "shape": list(value.shape[1:]),
                           "dtype": str(value.dtype)})
            names.extend(f"{key}.{i}" for i in range(width))
            offset += width
    if offset:
        features[STATE] = {"dtype": "float32", "shape": [offset], "names": names, "fps": fps}
    action_dim = episode.actions.shape[1]
    features[ACTION] = {"dtype": "float32", "shape": [action_dim], "names": [f"action.{i}" for i in range(action_dim)],
                        "fps": fps}
    has_states = episode.states is not None
    if has_states:
        features[SIM_STATE] = {"dtype": "float64", "shape": [int(np.asarray(episode.states).shape[1])], "names": None,
                               "fps": fps}
    for key, value in episode.step_data.items():
        value = np.asarray(value)
        features[STEP_DATA_PREFIX + key] = {"dtype": str(value.dtype), "shape": list(value.shape[1:]) or [1],
                                            "names": None, "fps": fps}
    for name, feature in {**EXTRA_FEATURES, **DEFAULT_FEATURES}.items():
        features[name] = {**feature, "fps": fps}
    return features, layout, has_states


def _episode_table(episode: Episode, layout: list[dict[str, Any]], features: dict[str, Any], episode_index: int,
                   start_index: int, task_index: int, fps: float, has_states: bool, where: str) -> Any:
    pa, _ = _pa()
    length = len(episode)
    columns: dict[str, Any] = {}
    if STATE in features:
        parts = []
        for entry in layout:
            if entry["feature"] != STATE:
                continue
            if entry["key"] not in episode.observations:
                raise DatasetError(f"{where}: observation '{entry['key']}' missing (the dataset stores "
                                   f"{[e['key'] for e in layout]})")
            value = np.asarray(episode.observations[entry["key"]], dtype=np.float32).reshape(length, -1)
            if list(np.asarray(episode.observations[entry["key"]]).shape[1:]) != entry["shape"]:
                raise DatasetError(f"{where}: observation '{entry['key']}' has shape "
                                   f"{np.asarray(episode.observations[entry['key']]).shape[1:]}, the dataset stores "
                                   f"{tuple(entry['shape'])}")
            parts.append(value)
        state = np.concatenate(parts, axis=1)
        columns[STATE] = pa.FixedSizeListArray.from_arrays(pa.array(state.reshape(-1), pa.float32()), state.shape[1])
    actions = np.asarray(episode.actions, dtype=np.float32)
    if actions.shape[1] != features[ACTION]["shape"][0]:
        raise DatasetError(f"{where}: actions have {actions.shape[1]} dims, the dataset stores "
                           f"{features[ACTION]['shape'][0]}")
    columns[ACTION] = pa.FixedSizeListArray.from_arrays(pa.array(actions.reshape(-1), pa.float32()), actions.shape[1])
    if has_states:
        if episode.states is None:
            raise DatasetError(f"{where}: episode has no simulator states but the dataset stores '{SIM_STATE}'")
        states = np.asarray(episode.states, dtype=np.float64)
        columns[SIM_STATE] = pa.FixedSizeListArray.from_arrays(pa.array(states.reshape(-1), pa.float64()),
                                                               states.shape[1])
    for feature, spec in features.items():
        if not feature.startswith(STEP_DATA_PREFIX):
            continue
        key = feature[len(STEP_DATA_PREFIX):]
        if key not in episode.step_data:
            raise DatasetError(f"{where}: step_data '{key}' missing (the dataset stores feature '{feature}')")
        value = np.asarray(episode.step_data[key]).astype(spec["dtype"])
        if (list(value.shape[1:]) or [1]) != list(spec["shape"]):
            raise DatasetError(f"{where}: step_data '{key}' has shape {value.shape[1:]}, the dataset stores "
                               f"{tuple(spec['shape'])}")
        if value.ndim == 1:
            columns[feature] = pa.array(value)
        else:
            flat = value.reshape(length, -1)
            columns[feature] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    extra_keys = sorted(set(episode.step_data) - {f[len(STEP_DATA_PREFIX):] for f in features
                                                   if f.startswith(STEP_DATA_PREFIX)})
    if extra_keys:
        raise DatasetError(f"{where}: step_data {extra_keys} are not features of this dataset (its first episode "
                           f"set them)")
    success_steps = np.zeros(length, dtype=bool)
    if episode.success and length:
        success_steps[-1] = True
    columns["next.reward"] = pa.array(np.asarray(episode.rewards, dtype=np.float32))
    columns["next.done"] = pa.array(np.asarray(episode.terminals, dtype=bool) | (np.arange(length) == length - 1))
    columns["next.success"] = pa.array(success_steps)
    columns["timestamp"] = pa.array((np.arange(length) / fps).astype(np.float32))
    columns["frame_index"] = pa.array(np.arange(length, dtype=np.int64))
    columns["episode_index"] = pa.array(np.full(length, episode_index, dtype=np.int64))
    columns["index"] = pa.array(np.arange(start_index, start_index + length, dtype=np.int64))
    columns["task_index"] = pa.array(np.full(length, task_index, dtype=np.int64))
    return pa.table(columns)


def _episode_stats(episode: Episode, table: Any, layout: list[dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    stats = {}
    for name in table.column_names:
        column = table.column(name)
        if hasattr(column.type, "list_size"):
            width = column.type.list_size
            values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        else:
            values = column.to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, 1)
        stats[name] = _stats(values)
    for entry in layout:
        if entry["feature"] != STATE:
            stats[entry["feature"]] = _stats(np.asarray(episode.observations[entry["key"]]), image=True)
    return stats


def _flat_stats_columns(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    return {f"stats/{feature}/{name}": np.asarray(value).tolist()
            for feature, values in stats.items() for name, value in values.items()}


# --- writing -------------------------------------------------------------------------------------------------


class LeRobotWriter:
    """Append episodes to a LeRobot v3 dataset folder; every :meth:`append` is durable when it returns.

    Opening an existing folder continues it (``--resume``): numbering, data files and statistics carry on,
    rows left by an episode whose commit was interrupted are dropped. ``task_description`` is the language task
    stored in ``meta/tasks.parquet`` (default: the env_meta's task name).
    """

    def __init__(self, root: str | os.PathLike, fps: float | None = None, env_meta: dict | None = None,
                 task_description: str | None = None, robot_type: str | None = None, video_codec: str = "auto",
                 data_files_size_in_mb: float = DEFAULT_DATA_FILE_SIZE_IN_MB, chunks_size: int = DEFAULT_CHUNK_SIZE):
        self.root = Path(root)
        self.video_codec = video_codec
        self.episode_rows: list[dict[str, Any]] = []
        self.episode_stats: list[dict[str, dict[str, np.ndarray]]] = []
        if is_lerobot_dataset(self.root):
            self._open_existing(env_meta)
            if fps is not None and abs(float(fps) - self.fps) > 1e-9:
                raise DatasetError(f"{self.root}/meta/info.json: fps is {self.fps:g}, refusing to append episodes "
                                   f"recorded at {fps:g}")
        else:
            if self.root.exists() and any(self.root.iterdir()):
                raise DatasetError(f"{self.root}: exists, is not empty and is not a LeRobot dataset (no meta/info.json)")
            self.fps = float(fps or 20.0)
            self.fps = int(self.fps) if self.fps.is_integer() else self.fps  # LeRobot stores an int fps
            self.info: dict[str, Any] | None = None
            self.layout: list[dict[str, Any]] = []
            self.has_states = False
            self.env_meta = dict(env_meta or {})
            self.tasks: list[str] = []
            self.robot_type = robot_type
            self.data_files_size_in_mb = data_files_size_in_mb
            self.chunks_size = chunks_size
        self.task_description = task_description or self.env_meta.get("task") or self.env_meta.get("env_name") or "task"

    def _open_existing(self, env_meta: dict | None) -> None:
        meta = read_lerobot_meta(self.root)
        self.info = meta["info"]
        ours = meta["ours"]
        if ours.get("format") != FORMAT:
            raise DatasetError(f"{self.root}/meta/robofinetune.json: missing; appending is only supported to "
                               f"LeRobot datasets written by robofinetune")
        self.fps = float(self.info["fps"])
        self.layout = ours["observation_layout"]
        self.has_states = SIM_STATE in self.info["features"]
        stored_meta = ours.get("env_meta") or {}
        if env_meta and stored_meta and env_meta.get("env_name") != stored_meta.get("env_name"):
            raise DatasetError(f"{self.root}/meta/robofinetune.json: env_name is {stored_meta.get('env_name')!r}, "
                               f"refusing to append episodes of {env_meta.get('env_name')!r}")
        self.env_meta = stored_meta or dict(env_meta or {})
        self.tasks = meta["tasks"]
        self.robot_type = self.info.get("robot_type")
        self.data_files_size_in_mb = float(self.info.get("data_files_size_in_mb", DEFAULT_DATA_FILE_SIZE_IN_MB))
        self.chunks_size = int(self.info.get("chunks_size", DEFAULT_CHUNK_SIZE))
        self.episode_rows = meta["episodes"]
        self.episode_stats = [_stats_from_row(row) for row in self.episode_rows]
        self._drop_uncommitted_rows()

    def _drop_uncommitted_rows(self) -> None:
        """Rows of an episode whose metadata commit never happened (a kill between the two renames)."""
        if not self.episode_rows:
            return
        last = self.episode_rows[-1]
        path = self.root / self.info["data_path"].format(chunk_index=last["data/chunk_index"],
                                                         file_index=last["data/file_index"])
        table = _read_parquet(path)
        committed = {row["episode_index"] for row in self.episode_rows
                     if (row["data/chunk_index"], row["data/file_index"]) ==
                     (last["data/chunk_index"], last["data/file_index"])}
        episode_index = np.asarray(table.column("episode_index").to_numpy())
        keep = np.isin(episode_index, sorted(committed))
        if not keep.all():
            _write_parquet_atomic(path, table.filter(keep))
            fsync_path(path.parent)

    def __len__(self) -> int:
        return len(self.episode_rows)

    @property
    def total_frames(self) -> int:
        return int(self.episode_rows[-1]["dataset_to_index"]) if self.episode_rows else 0

    def append(self, episode: Episode) -> int:
        """Write one finished episode durably; return its episode index."""
        if not isinstance(episode, Episode):
            raise DatasetError(f"{self.root}: append() needs an Episode, got {type(episode).__name__}")
        index = len(self.episode_rows)
        where = f"{self.root}: episode {index}"
        episode.validate(where)
        if len(episode) == 0:
            raise DatasetError(f"{where}: has no steps")
        if self.info is None:
            features, self.layout, self.has_states = _features_for(episode, self.fps)
            self.info = {"codebase_version": CODEBASE_VERSION, "robot_type": self.robot_type, "total_episodes": 0,
                         "total_frames": 0, "total_tasks": 0, "chunks_size": self.chunks_size,
                         "data_files_size_in_mb": self.data_files_size_in_mb,
                         "video_files_size_in_mb": DEFAULT_VIDEO_FILE_SIZE_IN_MB, "fps": self.fps, "splits": {},
                         "data_path": DATA_PATH,
                         "video_path": VIDEO_PATH if any(e["feature"] != STATE for e in self.layout) else None,
                         "features": features}
        expected = {entry["key"] for entry in self.layout}
        if set(episode.observations) != expected:
            raise DatasetError(f"{where}: observation keys {sorted(episode.observations)} differ from the dataset's "
                               f"{sorted(expected)}")
        for entry in self.layout:
            shape = tuple(np.shape(episode.observations[entry["key"]])[1:])
            if entry["feature"] != STATE and shape != tuple(entry["shape"]):
                raise DatasetError(f"{where}: camera observation '{entry['key']}' has image shape {shape}, the "
                                   f"dataset's video feature '{entry['feature']}' is {tuple(entry['shape'])}")
        if self.task_description not in self.tasks:
            self.tasks.append(self.task_description)
        task_index = self.tasks.index(self.task_description)
        start = self.total_frames
        table = _episode_table(episode, self.layout, self.info["features"], index, start, task_index, self.fps,
                               self.has_states, where)
        stats = _episode_stats(episode, table, self.layout)

        # data file: keep filling the last one until it reaches the size limit
        chunk, file = 0, 0
        existing = None
        if self.episode_rows:
            last = self.episode_rows[-1]
            chunk, file = int(last["data/chunk_index"]), int(last["data/file_index"])
            path = self.root / DATA_PATH.format(chunk_index=chunk, file_index=file)
            if path.is_file() and path.stat().st_size / 2**20 < self.data_files_size_in_mb:
                existing = _read_parquet(path)
            else:
                chunk, file = (chunk + 1, 0) if file + 1 >= self.chunks_size else (chunk, file + 1)
        data_path = self.root / DATA_PATH.format(chunk_index=chunk, file_index=file)

        row: dict[str, Any] = {"episode_index": index, "tasks": [self.task_description], "length": len(episode),
                               "data/chunk_index": chunk, "data/file_index": file,
                               "dataset_from_index": start, "dataset_to_index": start + len(episode)}
        # videos: one file per episode and camera (file index = episode index)
        for entry in self.layout:
            if entry["feature"] == STATE:
                continue
            video_chunk, video_file = divmod(index, self.chunks_size)
            video_path = self.root / VIDEO_PATH.format(video_key=entry["feature"], chunk_index=video_chunk,
                                                       file_index=video_file)
            tmp = tmp_sibling(video_path, ".mp4")
            video_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                video_info = encode_video(np.asarray(episode.observations[entry["key"]]), tmp, self.fps,
                                          self.video_codec)
                fsync_path(tmp)
                os.replace(tmp, video_path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            self.info["features"][entry["feature"]]["info"] = video_info
            row.update({f"videos/{entry['feature']}/chunk_index": video_chunk,
                        f"videos/{entry['feature']}/file_index": video_file,
                        f"videos/{entry['feature']}/from_timestamp": 0.0,
                        f"videos/{entry['feature']}/to_timestamp": len(episode) / self.fps})
        row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        row.update(_flat_stats_columns(stats))
        final = None
        if episode.final_observation is not None:
            final = {key: np.asarray(value).tolist() for key, value in episode.final_observation.items()
                     if any(e["key"] == key and e["feature"] == STATE for e in self.layout)}
        row.update({"robofinetune/success": bool(episode.success),
                    "robofinetune/metadata": json.dumps(to_jsonable(episode.metadata, f"{where}: metadata"),
                                                        sort_keys=True),
                    "robofinetune/final_observation": json.dumps(final)})

        import pyarrow as pa

        new_data = table if existing is None else pa.concat_tables([existing.select(table.column_names)
                                                                    .cast(table.schema), table])
        _write_parquet_atomic(data_path, new_data)
        rows = self.episode_rows + [row]
        stats_all = self.episode_stats + [stats]
        # the commit: the episodes metadata names the new episode
        _write_parquet_atomic(self.root / EPISODES_PATH.format(chunk_index=0, file_index=0), _rows_table(rows))
        self.episode_rows, self.episode_stats = rows, stats_all
        self._write_meta()
        fsync_path(self.root)
        return index

    def _write_meta(self) -> None:
        info = self.info
        info["total_episodes"] = len(self.episode_rows)
        info["total_frames"] = self.total_frames
        info["total_tasks"] = len(self.tasks)
        info["splits"] = {"train": f"0:{len(self.episode_rows)}"}
        _write_json_atomic(self.root / "meta" / "stats.json", _stats_json(aggregate_stats(self.episode_stats)))
        _write_parquet_atomic(self.root / "meta" / "tasks.parquet", _tasks_table(self.tasks))
        _write_json_atomic(self.root / "meta" / "robofinetune.json",
                           {"format": FORMAT, "env_meta": to_jsonable(self.env_meta, f"{self.root}: env_meta"),
                            "observation_layout": self.layout})
        _write_json_atomic(self.root / "meta" / "info.json", info)

    def close(self) -> None:
        """Nothing stays open between appends."""

    def __enter__(self) -> LeRobotWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _rows_table(rows: list[dict[str, Any]]) -> Any:
    pa, _ = _pa()
    names: list[str] = []
    for row in rows:
        for name in row:
            if name not in names:
                names.append(name)
    return pa.table({name: [row.get(name) for row in rows] for name in names})


def _stats_from_row(row: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    stats: dict[str, dict[str, np.ndarray]] = {}
    for name, value in row.items():
        if name.startswith("stats/") and value is not None:
            _, rest = name.split("/", 1)
            feature, stat = rest.rsplit("/", 1)
            stats.setdefault(feature, {})[stat] = np.asarray(value, dtype=np.float64)
    return stats


def save_lerobot(episodes: list[Episode], path: str | os.PathLike, env_meta: dict | None = None,
                 fps: float | None = None, task_description: str | None = None, video_codec: str = "auto") -> Path:
    """Write a whole LeRobot v3 dataset folder atomically (built under a temporary name, then renamed)."""
    from robofinetune.data._util import atomic_output

    path = Path(path)
    episodes = check_episodes(episodes, path)
    fps = fps or float((env_meta or {}).get("control_rate") or (env_meta or {}).get("fps") or 0) or _task_fps(env_meta)
    with atomic_output(path, is_dir=True) as tmp:
        writer = LeRobotWriter(tmp, fps=fps, env_meta=env_meta, task_description=task_description,
                               video_codec=video_codec)
        for episode in episodes:
            writer.append(episode)
        if not episodes:
            writer.info = None
            _write_json_atomic(Path(tmp) / "meta" / "robofinetune.json",
                               {"format": FORMAT, "env_meta": to_jsonable(env_meta or {}, f"{path}: env_meta"),
                                "observation_layout": []})
            _write_json_atomic(Path(tmp) / "meta" / "info.json",
                               {"codebase_version": CODEBASE_VERSION, "robot_type": None, "total_episodes": 0,
                                "total_frames": 0, "total_tasks": 0, "chunks_size": DEFAULT_CHUNK_SIZE,
                                "data_files_size_in_mb": DEFAULT_DATA_FILE_SIZE_IN_MB,
                                "video_files_size_in_mb": DEFAULT_VIDEO_FILE_SIZE_IN_MB, "fps": fps, "splits": {},
                                "data_path": DATA_PATH, "video_path": None,
                                "features": {**DEFAULT_FEATURES}})
    return path


def _task_fps(env_meta: dict | None) -> float:
    """The control rate of the dataset's task (20 Hz when unknown)."""
    task = (env_meta or {}).get("task")
    if task:
        try:
            from robofinetune.envs.spec import load_task_spec

            return float(load_task_spec(task).control_freq)
        except Exception:  # noqa: BLE001 - an unknown task name just means the default rate
            pass
    return 20.0


# --- reading -------------------------------------------------------------------------------------------------


def read_lerobot_meta(root: str | os.PathLike) -> dict[str, Any]:
    """info.json, the episode rows (sorted, from every meta/episodes file), tasks, and our own metadata."""
    root = Path(root)
    info = _read_json(root / "meta" / "info.json", "LeRobot info")
    if not isinstance(info, dict):
        raise DatasetError(f"{root}/meta/info.json: expected a JSON object")
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3"):
        raise DatasetError(f"{root}/meta/info.json: codebase_version is {version!r}; only LeRobot v3.x is supported "
                           f"(convert v2.1 datasets with lerobot's convert_dataset_v21_to_v30)")
    for field in ("fps", "features", "data_path"):
        if field not in info:
            raise DatasetError(f"{root}/meta/info.json: missing field '{field}'")
    rows: list[dict[str, Any]] = []
    for path in sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet")):
        rows.extend(_read_parquet(path).to_pylist())
    rows.sort(key=lambda row: int(row["episode_index"]))
    for position, row in enumerate(rows):
        for field in ("episode_index", "length", "data/chunk_index", "data/file_index"):
            if row.get(field) is None:
                raise DatasetError(f"{root}/meta/episodes: episode row {position} lacks '{field}'")
    ours_path = root / "meta" / "robofinetune.json"
    ours = _read_json(ours_path, "robofinetune metadata") if ours_path.is_file() else {}
    return {"info": info, "episodes": rows, "tasks": _read_tasks(root), "ours": ours}


def read_lerobot_env_meta(root: str | os.PathLike) -> dict[str, Any]:
    meta = read_lerobot_meta(root)
    env_meta = dict(meta["ours"].get("env_meta") or {})
    if not env_meta:
        env_meta = {"env_name": meta["info"].get("robot_type"), "source": "lerobot"}
    env_meta.setdefault("fps", meta["info"]["fps"])
    return env_meta


def _layout_for(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Our layout when we wrote the dataset, else one derived from the features (foreign datasets)."""
    ours = meta["ours"].get("observation_layout")
    if ours:
        return ours
    layout = []
    for feature, spec in meta["info"]["features"].items():
        if feature.startswith("observation."):
            layout.append({"key": key_for_feature(feature), "feature": feature, "shape": list(spec["shape"]),
                           "dtype": "uint8" if spec.get("dtype") in ("video", "image") else spec.get("dtype")})
    return layout


def iter_lerobot(root: str | os.PathLike, obs_keys: list[str] | None = None) -> Iterator[Episode]:
    """Yield the committed episodes of a LeRobot v3 dataset one at a time."""
    root = Path(root)
    meta = read_lerobot_meta(root)
    info, rows = meta["info"], meta["episodes"]
    fps = float(info["fps"])
    features = info["features"]
    layout = _layout_for(meta)
    mapping = resolve_obs_keys(obs_keys, [entry["key"] for entry in layout], f"{root}: observations")
    by_key = {entry["key"]: entry for entry in layout}
    cache: dict[Path, Any] = {}
    for row in rows:
        episode_index = int(row["episode_index"])
        where = f"{root}: episode {episode_index}"
        data_path = root / info["data_path"].format(chunk_index=int(row["data/chunk_index"]),
                                                    file_index=int(row["data/file_index"]))
        if data_path not in cache:
            cache.clear()  # one data file in memory at a time (episodes are stored in file order)
            if not data_path.is_file():
                raise DatasetError(f"{data_path}: missing data file ({where})")
            cache[data_path] = _read_parquet(data_path)
        table = cache[data_path]
        import pyarrow.compute as pc

        rows_of = table.filter(pc.equal(table.column("episode_index"), episode_index))
        length = int(row["length"])
        if rows_of.num_rows != length:
            raise DatasetError(f"{data_path}: episode {episode_index} has {rows_of.num_rows} rows, meta/episodes says "
                               f"{length}")
        if "frame_index" in rows_of.column_names:
            order = np.argsort(rows_of.column("frame_index").to_numpy())
            rows_of = rows_of.take(order)

        def vectors(name: str) -> np.ndarray:
            if name not in rows_of.column_names:
                raise DatasetError(f"{data_path}: column '{name}' missing ({where})")
            column = rows_of.column(name).combine_chunks()
            if hasattr(column.type, "list_size") or str(column.type).startswith(("list", "large_list", "fixed_size")):
                values = column.flatten().to_numpy(zero_copy_only=False)
                return values.reshape(length, -1)
            return column.to_numpy(zero_copy_only=False).reshape(length, -1)

        observations: dict[str, np.ndarray] = {}
        state = None
        for name, stored in mapping.items():
            entry = by_key[stored]
            feature = entry["feature"]
            spec = features.get(feature, {})
            if spec.get("dtype") == "video":
                height, width = int(entry["shape"][0]), int(entry["shape"][1])
                video_path = root / info["video_path"].format(
                    video_key=feature, chunk_index=int(row[f"videos/{feature}/chunk_index"]),
                    file_index=int(row[f"videos/{feature}/file_index"]))
                frames = decode_video(video_path, float(row[f"videos/{feature}/from_timestamp"]), length, height,
                                      width, fps)
                channels = int(entry["shape"][2]) if len(entry["shape"]) > 2 else 3
                observations[name] = frames[..., :1] if channels == 1 else frames
            elif spec.get("dtype") == "image":
                raise DatasetError(f"{root}: feature '{feature}' stores images inside parquet, which this reader "
                                   f"does not support yet (only video features)")
            elif feature == STATE and "start" in entry:
                if state is None:
                    state = vectors(STATE)
                width = int(np.prod(entry["shape"])) if entry["shape"] else 1
                value = state[:, entry["start"]: entry["start"] + width]
                observations[name] = value.reshape((length, *entry["shape"])).astype(entry.get("dtype") or np.float32)
            else:
                values = vectors(feature)
                observations[name] = values.reshape((length, *entry["shape"])).astype(np.float32)
        actions = vectors(ACTION).astype(np.float32)
        rewards = vectors("next.reward").reshape(-1).astype(np.float32) if "next.reward" in rows_of.column_names else None
        states = vectors(SIM_STATE).astype(np.float64) if SIM_STATE in rows_of.column_names else None
        metadata: dict[str, Any] = {}
        if row.get("robofinetune/metadata"):
            metadata = json.loads(row["robofinetune/metadata"])
        if row.get("robofinetune/success") is not None:
            success = bool(row["robofinetune/success"])
        elif "next.success" in rows_of.column_names:
            success = bool(np.any(vectors("next.success")))
            metadata.setdefault(SUCCESS_SOURCE_KEY, "next.success")
        elif rewards is not None and len(rewards) and rewards.max() >= 1.0:
            success = True
            metadata.setdefault(SUCCESS_SOURCE_KEY, "rewards")
        else:
            success = False
            metadata.setdefault(SUCCESS_SOURCE_KEY, SUCCESS_UNKNOWN)
        if row.get("tasks"):
            metadata.setdefault("task_description", list(row["tasks"])[0])
        # LeRobot marks every episode's last frame done; for RL only reaching success is terminal
        dones = np.zeros(length, dtype=bool)
        if success:
            dones[-1] = True
        final_observation = None
        if row.get("robofinetune/final_observation"):
            stored_final = json.loads(row["robofinetune/final_observation"]) or {}
            low_dim = [name for name in mapping if by_key[mapping[name]]["feature"] == STATE]
            if all(mapping[name] in stored_final for name in low_dim):
                # camera frames after the last action are not stored: the last frame stands in for them
                final_observation = {name: (np.asarray(stored_final[mapping[name]], dtype=observations[name].dtype)
                                            .reshape(observations[name].shape[1:]) if name in low_dim
                                            else observations[name][-1]) for name in mapping}
        step_data = {}
        for feature, spec in features.items():
            if feature.startswith(STEP_DATA_PREFIX) and feature in rows_of.column_names:
                shape = [int(size) for size in spec.get("shape") or [1]]
                values = vectors(feature).astype(spec.get("dtype") or np.float32)
                step_data[feature[len(STEP_DATA_PREFIX):]] = values.reshape(length) if shape == [1] else \
                    values.reshape((length, *shape))
        try:
            episode = Episode(observations=observations, actions=actions, rewards=rewards, terminals=dones,
                              success=success, final_observation=final_observation, states=states, metadata=metadata,
                              step_data=step_data)
        except DatasetError as exc:
            raise DatasetError(f"{where}: {exc}") from None
        episode.validate(where)
        yield episode


def load_lerobot(root: str | os.PathLike, obs_keys: list[str] | None = None) -> tuple[list[Episode], dict]:
    """Read a LeRobot v3 dataset folder: (episodes, env_meta)."""
    return list(iter_lerobot(root, obs_keys)), read_lerobot_env_meta(root)


def lerobot_summary(root: str | os.PathLike) -> dict[str, Any]:
    """A few facts from the metadata alone (no data read): episodes, frames, fps, features, codec."""
    meta = read_lerobot_meta(root)
    info = meta["info"]
    return {"episodes": len(meta["episodes"]), "frames": int(sum(int(r["length"]) for r in meta["episodes"])),
            "fps": info["fps"], "features": {name: {k: v for k, v in spec.items() if k != "info"}
                                             for name, spec in info["features"].items()},
            "tasks": meta["tasks"], "codebase_version": info["codebase_version"]}

