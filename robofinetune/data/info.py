"""``robofinetune data info PATH``: what a dataset holds, computed one episode at a time."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from robofinetune.data._util import SUCCESS_SOURCE_KEY, SUCCESS_UNKNOWN
from robofinetune.data.episode import Episode
from robofinetune.data.io import detect_format
from robofinetune.errors import DatasetError
from robofinetune.images import is_image_key


class _Moments:
    """Streaming min/max/mean/std (Chan et al. parallel merge), per dimension or over all elements."""

    def __init__(self, per_dim: bool):
        self.per_dim = per_dim
        self.n = 0
        self.mean: Any = 0.0
        self.m2: Any = 0.0
        self.min: Any = None
        self.max: Any = None
        self.shapes: list[tuple[int, ...]] = []
        self.dtypes: list[str] = []

    def add(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        shape, dtype = tuple(array.shape[1:]), str(array.dtype)
        if shape not in self.shapes:
            self.shapes.append(shape)
        if dtype not in self.dtypes:
            self.dtypes.append(dtype)
        if array.size == 0 or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            return
        values = array.reshape(len(array), -1).astype(np.float64) if self.per_dim else array.astype(np.float64).reshape(-1)
        if self.per_dim and len(self.shapes) > 1:
            raise DatasetError(f"per-step shape changes between episodes: {self.shapes}")
        n_b = values.shape[0]
        mean_b = values.mean(axis=0)
        m2_b = ((values - mean_b) ** 2).sum(axis=0)
        lo, hi = values.min(axis=0), values.max(axis=0)
        if self.n == 0:
            self.mean, self.m2, self.min, self.max = mean_b, m2_b, lo, hi
        else:
            total = self.n + n_b
            delta = mean_b - self.mean
            self.mean = self.mean + delta * n_b / total
            self.m2 = self.m2 + m2_b + delta**2 * self.n * n_b / total
            self.min, self.max = np.minimum(self.min, lo), np.maximum(self.max, hi)
        self.n += n_b

    def summary(self) -> dict[str, Any]:
        shape: Any = list(self.shapes[0]) if len(self.shapes) == 1 else [list(s) for s in self.shapes]
        out: dict[str, Any] = {"shape": shape, "dtype": self.dtypes[0] if len(self.dtypes) == 1 else self.dtypes}
        if self.n == 0:
            out.update(min=None, max=None, mean=None, std=None)
            return out
        std = np.sqrt(self.m2 / self.n)

        def plain(value: Any) -> Any:
            return np.asarray(value, dtype=np.float64).tolist()

        out.update(min=plain(self.min), max=plain(self.max), mean=plain(self.mean), std=plain(std))
        return out


def _summarize(episodes: Iterable[Episode], where: str) -> dict[str, Any]:
    lengths: list[int] = []
    successes = unknown = 0
    obs: dict[str, _Moments] = {}
    actions = _Moments(per_dim=True)
    state_dims: set[int] = set()
    for i, episode in enumerate(episodes):
        lengths.append(len(episode))
        if episode.metadata.get(SUCCESS_SOURCE_KEY) == SUCCESS_UNKNOWN:
            unknown += 1
        elif episode.success:
            successes += 1
        try:
            actions.add(episode.actions)
        except DatasetError as exc:
            raise DatasetError(f"{where}: episode {i}: actions: {exc}") from None
        for key, value in episode.observations.items():
            obs.setdefault(key, _Moments(per_dim=False)).add(value)
        if episode.states is not None:
            state_dims.add(int(np.asarray(episode.states).shape[1]))
    info: dict[str, Any] = {
        "episodes": len(lengths),
        "successes": successes,
        "success_unknown": unknown,
        "total_steps": int(sum(lengths)),
        "length": (
            {"min": int(min(lengths)), "mean": float(np.mean(lengths)), "max": int(max(lengths))} if lengths else None
        ),
        "obs": {key: moments.summary() for key, moments in obs.items()},
        "actions": actions.summary() if actions.shapes else None,
    }
    if state_dims:
        info["state_dim"] = sorted(state_dims)[0] if len(state_dims) == 1 else sorted(state_dims)
    images = {}
    for key, moments in obs.items():
        if is_image_key(key) and len(moments.shapes) == 1 and len(moments.shapes[0]) == 3:
            height, width, channels = moments.shapes[0]
            images[key] = {"height": height, "width": width, "channels": channels, "frames": int(sum(lengths)),
                           "megabytes_uint8": round(sum(lengths) * height * width * channels / 2**20, 2)}
    if images:
        info["images"] = images
    return info


def _robosuite_demo_info(path: Path) -> dict[str, Any]:
    """Without replaying (which needs the simulator): counts, lengths, action and state stats."""
    from robofinetune.data.robomimic_io import _read, demo_names, open_hdf5
    from robofinetune.data.robosuite_import import infer_task, read_robosuite_header

    lengths: list[int] = []
    actions = _Moments(per_dim=True)
    state_dims: set[int] = set()
    with open_hdf5(path) as f:
        header = read_robosuite_header(f, path)
        for name in demo_names(f["data"]):
            group = f["data"][name]
            if "actions" not in group:
                raise DatasetError(f"{path}: data/{name}/actions: missing")
            value = _read(group["actions"], f"{path}: data/{name}/actions")
            lengths.append(len(value))
            actions.add(value)
            if "states" in group:
                state_dims.add(int(group["states"].shape[1]))
    return {
        "episodes": len(lengths),
        "successes": None,
        "success_unknown": len(lengths),
        "total_steps": int(sum(lengths)),
        "length": (
            {"min": int(min(lengths)), "mean": float(np.mean(lengths)), "max": int(max(lengths))} if lengths else None
        ),
        "obs": {},
        "actions": actions.summary() if actions.shapes else None,
        "state_dim": sorted(state_dims)[0] if len(state_dims) == 1 else sorted(state_dims),
        "env_meta": {"env_name": header["env_name"], "env_info": header["env_info"]},
        "task": infer_task(header["env_name"]),
        "note": "states only: observations are recovered by replay (robofinetune data convert SRC DST.hdf5)",
    }


def dataset_info(path: str | os.PathLike, obs_keys: list[str] | None = None) -> dict[str, Any]:
    """Summary of a dataset: episodes, successes, steps, lengths, per-key shape/dtype/min/max/mean/std
    (over all elements), per-dimension action stats, env meta. Reads one episode at a time."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "robomimic":
        from robofinetune.data.robomimic_io import _iter_open, open_hdf5, read_env_meta

        with open_hdf5(path) as f:
            info = _summarize(_iter_open(f, path, obs_keys, None), str(path))
            info["env_meta"] = read_env_meta(f, path)
    elif fmt == "zarr":
        from robofinetune.data.zarr_io import iter_zarr, read_zarr_env_meta

        info = _summarize(iter_zarr(path, obs_keys), str(path))
        info["env_meta"] = read_zarr_env_meta(path)
    elif fmt == "robosuite_demo":
        info = _robosuite_demo_info(path)
    else:
        from robofinetune.data.lerobot_io import iter_lerobot, read_lerobot_env_meta

        info = _summarize(iter_lerobot(path, obs_keys), str(path))
        info["env_meta"] = read_lerobot_env_meta(path)
    return {"path": str(path), "format": fmt, **info}


def _shape(shape: Any) -> str:
    if isinstance(shape, list) and all(isinstance(s, int) for s in shape):
        return str(tuple(shape))
    return " | ".join(_shape(s) for s in shape) if isinstance(shape, list) else str(shape)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "[" + ", ".join(_num(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_info(info: dict[str, Any]) -> str:
    """The dict from :func:`dataset_info` as a short human-readable report."""
    lines = [f"{info.get('path', '?')}  ({info.get('format', '?')})"]
    episodes = info.get("episodes", 0)
    successes = info.get("successes")
    unknown = info.get("success_unknown", 0)
    success_text = "unknown" if successes is None else f"{successes}/{episodes}"
    if successes is not None and unknown:
        success_text += f" ({unknown} unknown)"
    lines.append(f"episodes: {episodes}   successes: {success_text}   steps: {info.get('total_steps', 0)}")
    length = info.get("length")
    if length:
        lines.append(f"length: min {length['min']}  mean {length['mean']:.1f}  max {length['max']}")
    if info.get("state_dim") is not None:
        lines.append(f"states: {info['state_dim']} dims per step")
    rows = [("key", "shape", "dtype", "min", "max", "mean", "std")]
    for key, stats in (info.get("obs") or {}).items():
        rows.append(
            (key, _shape(stats["shape"]), str(stats["dtype"]),
             _num(stats["min"]), _num(stats["max"]), _num(stats["mean"]), _num(stats["std"]))
        )
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines.append("observations:")
        lines.extend("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
    for key, image in (info.get("images") or {}).items():
        lines.append(f"camera {key}: {image['height']}x{image['width']}x{image['channels']} uint8, {image['frames']} "
                     f"frames ({image['megabytes_uint8']:g} MB in memory)")
    actions = info.get("actions")
    if actions:
        lines.append(f"actions: shape {_shape(actions['shape'])} {actions['dtype']}")
        for name in ("min", "max", "mean", "std"):
            lines.append(f"  {name:<4} {_num(actions[name])}")
    if info.get("note"):
        lines.append(f"note: {info['note']}")
    env_meta = info.get("env_meta")
    if env_meta:
        head = f"env: {env_meta.get('env_name')}"
        if env_meta.get("task") or info.get("task"):
            head += f"  task: {env_meta.get('task') or info.get('task')}"
        lines.append(head)
        rest = {k: v for k, v in env_meta.items() if k not in ("env_name", "task", "type", "env_type")}
        if rest:
            text = json.dumps(rest, sort_keys=True, default=str)
            lines.append("  " + (text if len(text) <= 400 else text[:400] + " ..."))
    return "\n".join(lines)
