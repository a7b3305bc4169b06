"""diffusion_policy's zarr replay-buffer layout: read and write (a ``.zarr`` folder or a ``.zarr.zip``).

Layout written (``diffusion_policy.common.replay_buffer.ReplayBuffer`` opens it as is)::

    data/action (T_total, A)       all episodes concatenated
    data/<obs key> (T_total, ...)  one array per observation key, e.g. robot0_eef_pos
    data/reward (T_total,)  data/done (T_total,)  data/sim_state (T_total, S) when every episode has states
    meta/episode_ends (E,) int64   cumulative: episode i is [ends[i-1], ends[i])
    final_obs/<obs key> (E, ...)   the observation after each episode's last action (ours)
    attrs: robofinetune_format, env_meta, obs_keys (order), episodes [{success, metadata}] (ours)

A plain diffusion_policy zarr (no attrs, no reward) still reads: every ``data`` array except
``action``/``reward``/``done``/``sim_state`` is an observation, and success is taken from a reward of 1
when there is one, else it is unknown (``success`` False, ``metadata['success_source'] == 'unknown'``).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr

from robofinetune.data._util import (
    SUCCESS_SOURCE_KEY,
    SUCCESS_UNKNOWN,
    atomic_output,
    check_episodes,
    resolve_obs_keys,
    success_from_rewards,
    to_jsonable,
)
from robofinetune.data.episode import Episode
from robofinetune.errors import DatasetError

FORMAT_VERSION = 1
ACTION, REWARD, DONE, STATE = "action", "reward", "done", "sim_state"
RESERVED_FIELDS = (ACTION, REWARD, DONE, STATE)
FINAL_OBS = "final_obs"
_CHUNK_BYTES = 1 << 20


def is_zip_path(path: Path) -> bool:
    return path.name.endswith(".zip")


def _chunks(array: np.ndarray) -> tuple[int, ...] | bool:
    if array.ndim < 2 or len(array) == 0:
        return True
    frame_bytes = max(1, int(np.prod(array.shape[1:])) * array.dtype.itemsize)
    rows = max(1, min(len(array), _CHUNK_BYTES // frame_bytes))
    return (rows,) + array.shape[1:]


def _concat(parts: list[np.ndarray], where: str) -> np.ndarray:
    shapes = {p.shape[1:] for p in parts}
    dtypes = {p.dtype for p in parts}
    if len(shapes) > 1:
        raise DatasetError(f"{where}: per-step shape differs between episodes: {sorted(map(str, shapes))}")
    if len(dtypes) > 1:
        raise DatasetError(f"{where}: dtype differs between episodes: {sorted(map(str, dtypes))}")
    return np.concatenate(parts, axis=0)


def _collect(episodes: list[Episode], path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """Concatenate episodes into data arrays and stack their final observations, checking consistency."""
    if not episodes:
        return {}, {}, []
    keys = episodes[0].obs_keys
    for i, episode in enumerate(episodes):
        episode.validate(f"{path}: episode {i}")
        if set(episode.obs_keys) != set(keys):
            raise DatasetError(
                f"{path}: episode {i}: observation keys {sorted(episode.obs_keys)} differ from episode 0's {sorted(keys)}"
            )
    for key in keys:
        if key in RESERVED_FIELDS or "/" in key:
            raise DatasetError(f"{path}: data/{key}: observation key clashes with a reserved field name or has '/'")
    with_states = [e.states is not None for e in episodes]
    if any(with_states) and not all(with_states):
        raise DatasetError(
            f"{path}: data/{STATE}: episode {with_states.index(False)} has no states but others do; "
            "drop the states or record them for every episode"
        )
    data: dict[str, np.ndarray] = {
        ACTION: _concat([e.actions for e in episodes], f"{path}: data/{ACTION}"),
        REWARD: np.concatenate([e.rewards for e in episodes]).astype(np.float32),
        DONE: np.concatenate([e.terminals for e in episodes]).astype(bool),
    }
    if all(with_states):
        for i, e in enumerate(episodes):
            if len(e.states) != len(e):
                raise DatasetError(f"{path}: episode {i}: states has {len(e.states)} steps but actions has {len(e)}")
        data[STATE] = _concat([np.asarray(e.states) for e in episodes], f"{path}: data/{STATE}")
    final: dict[str, np.ndarray] = {}
    for key in keys:
        data[key] = _concat([e.observations[key] for e in episodes], f"{path}: data/{key}")
        lasts = []
        for e in episodes:
            value = e.observations[key]
            if e.final_observation is not None and key in e.final_observation:
                lasts.append(np.asarray(e.final_observation[key]).astype(value.dtype))
            elif len(value):
                lasts.append(value[-1])
            else:
                lasts.append(np.zeros(value.shape[1:], dtype=value.dtype))
        final[key] = _concat([x[None] for x in lasts], f"{path}: {FINAL_OBS}/{key}")
    for name, value in data.items():
        if value.dtype == object:
            raise DatasetError(f"{path}: data/{name}: holds Python objects, not numbers")
    return data, final, keys


def _write_root(root: zarr.Group, episodes: list[Episode], env_meta: dict | None, path: Path) -> None:
    data, final, keys = _collect(episodes, path)
    data_group = root.create_group("data")
    meta_group = root.create_group("meta")
    ends = np.cumsum([len(e) for e in episodes], dtype=np.int64)
    meta_group.array("episode_ends", ends, dtype=np.int64, chunks=True)
    for name, value in data.items():
        data_group.array(name, value, chunks=_chunks(value))
    if final:
        final_group = root.create_group(FINAL_OBS)
        for name, value in final.items():
            final_group.array(name, value, chunks=_chunks(value))
    root.attrs.update(
        {
            "robofinetune_format": FORMAT_VERSION,
            "env_meta": to_jsonable(env_meta or {}, f"{path}: env_meta"),
            "obs_keys": list(keys),
            "episodes": [
                {"success": bool(e.success), "metadata": to_jsonable(e.metadata, f"{path}: episode {i} metadata")}
                for i, e in enumerate(episodes)
            ],
        }
    )


def save_zarr(episodes: list[Episode], path: str | os.PathLike, env_meta: dict | None = None) -> Path:
    """Write episodes as a diffusion_policy replay buffer: a ``.zarr`` folder, or a zip when the name
    ends in ``.zip``. Built under a temporary name beside ``path`` and renamed into place, so an error or
    a crash never leaves a partial dataset under ``path``."""
    path = Path(path)
    episodes = check_episodes(episodes, path)
    if is_zip_path(path):
        with atomic_output(path) as tmp:
            store = zarr.ZipStore(str(tmp), mode="w")
            try:
                _write_root(zarr.group(store=store), episodes, env_meta, path)
            finally:
                store.close()
    else:
        with atomic_output(path, is_dir=True) as tmp:
            _write_root(zarr.group(store=zarr.DirectoryStore(str(tmp))), episodes, env_meta, path)
    return path


# ------------------------------------------------------------------------------------------------ reading


class _Opened:
    def __init__(self, path: Path):
        self.path = path
        self.store: Any = None
        if not path.exists():
            raise DatasetError(f"{path}: not found")
        try:
            if path.is_dir():
                self.store = zarr.DirectoryStore(str(path))
            elif zipfile.is_zipfile(path):
                self.store = zarr.ZipStore(str(path), mode="r")
            else:
                raise DatasetError(f"{path}: neither a .zarr folder nor a zip file")
            self.root = zarr.open_group(store=self.store, mode="r")
        except DatasetError:
            self.close()
            raise
        except Exception as exc:  # zarr, zipfile and numcodecs each raise their own types for a bad store
            self.close()
            raise DatasetError(f"{path}: cannot open as zarr (not a zarr group, or corrupt): {exc}") from None

    def close(self) -> None:
        if self.store is not None and hasattr(self.store, "close"):
            self.store.close()
        self.store = None

    def __enter__(self) -> _Opened:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _array(group: Any, name: str, where: str) -> zarr.Array:
    try:
        value = group[name]
    except KeyError:
        raise DatasetError(f"{where}: missing") from None
    if not isinstance(value, zarr.Array):
        raise DatasetError(f"{where}: expected an array, found a group")
    return value


def _read_all(array: zarr.Array, where: str, start: int | None = None, end: int | None = None) -> np.ndarray:
    try:
        return array[start:end]
    except Exception as exc:  # numcodecs/zarr raise assorted types for damaged chunks
        raise DatasetError(f"{where}: unreadable (corrupt chunk?): {exc}") from None


def _iter_open(opened: _Opened, obs_keys: list[str] | None, cache: bool) -> Iterator[Episode]:
    path, root = opened.path, opened.root
    for group in ("data", "meta"):
        if group not in root or not isinstance(root[group], zarr.Group):
            raise DatasetError(f"{path}: {group}: missing group (not a diffusion_policy replay buffer)")
    data, meta = root["data"], root["meta"]
    ends = _read_all(_array(meta, "episode_ends", f"{path}: meta/episode_ends"), f"{path}: meta/episode_ends")
    if ends.ndim != 1 or (len(ends) and not np.issubdtype(ends.dtype, np.integer)):
        raise DatasetError(f"{path}: meta/episode_ends: expected a 1-D integer array, got {ends.dtype} {ends.shape}")
    ends = ends.astype(np.int64)
    if len(ends) and (ends[0] < 0 or np.any(np.diff(ends) < 0)):
        raise DatasetError(f"{path}: meta/episode_ends: must be non-decreasing and non-negative")
    total = int(ends[-1]) if len(ends) else 0

    attrs = dict(root.attrs)
    ours = "robofinetune_format" in attrs
    records = attrs.get("episodes") if ours else None
    if records is not None and len(records) != len(ends):
        raise DatasetError(f"{path}: attrs['episodes']: {len(records)} entries but meta/episode_ends has {len(ends)}")

    names = list(data.array_keys())
    if not len(ends):
        return
    if ACTION not in names:
        raise DatasetError(f"{path}: data/{ACTION}: missing (arrays present: {', '.join(sorted(names)) or 'none'})")
    stored_obs = [n for n in names if n not in RESERVED_FIELDS]
    if obs_keys is None and ours:  # restore the writer's key order
        order = [k for k in attrs.get("obs_keys", []) if k in stored_obs]
        stored_obs = order + [k for k in stored_obs if k not in order]
    mapping = resolve_obs_keys(obs_keys, stored_obs, f"{path}: data")
    fields = {ACTION: ACTION, **{f"obs/{k}": s for k, s in mapping.items()}}
    for optional in (REWARD, DONE, STATE):
        if optional in names:
            fields[optional] = optional
    arrays: dict[str, zarr.Array] = {}
    for field, stored in fields.items():
        array = _array(data, stored, f"{path}: data/{stored}")
        if array.ndim == 0 or array.shape[0] != total:
            raise DatasetError(
                f"{path}: data/{stored}: {array.shape[0] if array.ndim else 'no'} steps but meta/episode_ends "
                f"ends at {total}"
            )
        arrays[field] = array

    read: Callable[[str, int, int], np.ndarray]
    if cache:
        loaded = {f: _read_all(a, f"{path}: data/{fields[f]}") for f, a in arrays.items()}

        def read(field: str, start: int, end: int) -> np.ndarray:
            return loaded[field][start:end]
    else:

        def read(field: str, start: int, end: int) -> np.ndarray:
            return _read_all(arrays[field], f"{path}: data/{fields[field]}", start, end)

    final_arrays: dict[str, zarr.Array] = {}
    if FINAL_OBS in root and isinstance(root[FINAL_OBS], zarr.Group):
        final_group = root[FINAL_OBS]
        if all(s in final_group for s in mapping.values()):
            for key, stored in mapping.items():
                array = _array(final_group, stored, f"{path}: {FINAL_OBS}/{stored}")
                if array.ndim == 0 or array.shape[0] != len(ends):
                    raise DatasetError(f"{path}: {FINAL_OBS}/{stored}: expected {len(ends)} rows, got shape {array.shape}")
                final_arrays[key] = array
    finals = {k: _read_all(a, f"{path}: {FINAL_OBS}/{mapping[k]}") for k, a in final_arrays.items()}

    start = 0
    for i, end in enumerate(ends.tolist()):
        where = f"{path}: episode {i} (steps {start}:{end})"
        rewards = read(REWARD, start, end) if REWARD in arrays else None
        dones = read(DONE, start, end) if DONE in arrays else None
        metadata: dict[str, Any] = {}
        if records is not None:
            record = records[i]
            if not isinstance(record, dict):
                raise DatasetError(f"{path}: attrs['episodes'][{i}]: expected an object")
            metadata = dict(record.get("metadata") or {})
            success = bool(record.get("success", False))
        else:
            inferred = success_from_rewards(rewards)
            success = bool(inferred)
            metadata[SUCCESS_SOURCE_KEY] = "rewards" if inferred is not None else SUCCESS_UNKNOWN
        try:
            episode = Episode(
                observations={k: read(f"obs/{k}", start, end) for k in mapping},
                actions=read(ACTION, start, end),
                rewards=rewards,
                terminals=dones,
                success=success,
                final_observation={k: v[i] for k, v in finals.items()} if finals else None,
                states=read(STATE, start, end) if STATE in arrays else None,
                metadata=metadata,
            )
        except DatasetError as exc:
            raise DatasetError(f"{where}: {exc}") from None
        episode.validate(where)
        yield episode
        start = end


def iter_zarr(path: str | os.PathLike, obs_keys: list[str] | None = None) -> Iterator[Episode]:
    """Yield episodes one at a time, reading only each episode's slice (for stats over large datasets)."""
    with _Opened(Path(path)) as opened:
        yield from _iter_open(opened, obs_keys, cache=False)


def read_zarr_env_meta(path: str | os.PathLike) -> dict:
    with _Opened(Path(path)) as opened:
        return dict(opened.root.attrs.get("env_meta") or {})


def load_zarr(path: str | os.PathLike, obs_keys: list[str] | None = None) -> tuple[list[Episode], dict]:
    """Read a diffusion_policy zarr replay buffer: (episodes, env_meta; ``{}`` when the file has none).

    ``obs_keys`` selects observation arrays (``object``/``object-state`` are interchangeable); None reads
    every ``data`` array that is not action/reward/done/sim_state.
    """
    with _Opened(Path(path)) as opened:
        episodes = list(_iter_open(opened, obs_keys, cache=True))
        env_meta = dict(opened.root.attrs.get("env_meta") or {})
    return episodes, env_meta
