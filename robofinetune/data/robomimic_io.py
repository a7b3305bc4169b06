"""robomimic HDF5: read, write atomically, and append one episode at a time durably.

Layout written (readable by robomimic itself)::

    data                    attrs: total (sum of num_samples, as robomimic defines it),
                                   env_args (JSON: env_name, type, env_type, env_kwargs)
    data/demo_N             attrs: num_samples, success (ours), metadata (ours, JSON)
        actions (T, A)  rewards (T,)  dones (T,)  states (T, S) when known
        obs/<key> (T, ...)  next_obs/<key> (T, ...)
        step_data/<key> (T, ...)   ours: Episode.step_data (is_intervention, policy_action of a run with
                                   interventions); robomimic ignores it
    mask/successful, mask/failed   demo names (bytes), as robomimic filter keys

robomimic's own key for the environment type is ``type`` (1 = robosuite); ``env_type`` is written with the
same value for readers that expect that spelling.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from robofinetune.data._util import (
    SUCCESS_SOURCE_KEY,
    SUCCESS_UNKNOWN,
    atomic_output,
    check_episodes,
    dumps,
    fsync_path,
    loads,
    resolve_obs_keys,
    success_from_rewards,
    tmp_sibling,
)
from robofinetune.data.episode import Episode
from robofinetune.errors import DatasetError

ROBOSUITE_ENV_TYPE = 1
_STAGING = "_staging"  # appender writes a demo here, then moves it into data/ (a metadata-only rename)


# ----------------------------------------------------------------------------------------------- helpers


def open_hdf5(path: str | os.PathLike, mode: str = "r") -> h5py.File:
    """h5py.File with every failure turned into a DatasetError that names the file."""
    path = Path(path)
    if mode == "r" and not path.exists():
        raise DatasetError(f"{path}: file not found")
    if mode == "r" and path.is_dir():
        raise DatasetError(f"{path}: is a folder, not an HDF5 file")
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open as HDF5 (not HDF5, truncated or corrupt): {exc}") from None


def normalize_env_meta(env_meta: dict | None) -> dict:
    """robomimic's env_args: env_name, type (1 = robosuite), env_kwargs; ``env_type`` mirrors ``type``."""
    meta = dict(env_meta or {})
    env_type = meta.get("type", meta.get("env_type", ROBOSUITE_ENV_TYPE))
    meta["type"] = env_type
    meta["env_type"] = env_type
    meta.setdefault("env_name", None)
    meta.setdefault("env_kwargs", {})
    return meta


def _attr_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _attr_str(value.item())
    return str(value)


def read_env_meta(f: h5py.File, path: Path) -> dict:
    data = f["data"]
    if "env_args" not in data.attrs:
        return {}
    meta = loads(data.attrs["env_args"], f"{path}: data.attrs['env_args']")
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: data.attrs['env_args']: expected a JSON object, got {type(meta).__name__}")
    if "type" in meta and "env_type" not in meta:
        meta["env_type"] = meta["type"]
    elif "env_type" in meta and "type" not in meta:
        meta["type"] = meta["env_type"]
    return meta


def demo_sort_key(name: str) -> tuple[int, str]:
    suffix = name[5:] if name.startswith("demo_") else name
    return (int(suffix), name) if suffix.isdigit() else (1 << 62, name)


def demo_names(data: h5py.Group) -> list[str]:
    return sorted((k for k in data.keys() if k.startswith("demo_")), key=demo_sort_key)


IMAGE_CHUNK_FRAMES = 4
# ours: Episode.step_data, per-step arrays beside the actions (e.g. is_intervention, policy_action); robomimic's own
# readers ignore the group
STEP_DATA = "step_data"


def _dataset_kwargs(array: np.ndarray) -> dict:
    # images and other large per-step arrays: gzip-4 in chunks of a few frames (pointmass 84x84 renders: 4.2% of
    # the raw size vs 5.8% one frame a chunk, and faster to read whole); low-dim arrays stay contiguous
    if array.ndim >= 3 and array.size > 4096:
        return {"compression": "gzip", "compression_opts": 4,
                "chunks": (max(1, min(len(array), IMAGE_CHUNK_FRAMES)),) + array.shape[1:]}
    return {}


def _episode_arrays(episode: Episode, where: str) -> dict[str, np.ndarray]:
    """Everything one demo group holds, computed in memory before the file is touched."""
    length = len(episode)
    arrays: dict[str, np.ndarray] = {
        "actions": episode.actions,
        "rewards": episode.rewards,
        "dones": episode.terminals.astype(np.int64),
    }
    if episode.states is not None:
        states = np.asarray(episode.states)
        if len(states) != length:
            raise DatasetError(f"{where}/states: {len(states)} steps but actions has {length}")
        arrays["states"] = states
    next_obs = episode.next_observations()
    for key, value in episode.observations.items():
        if "/" in key:
            raise DatasetError(f"{where}/obs/{key}: observation keys cannot contain '/'")
        arrays[f"obs/{key}"] = value
        arrays[f"next_obs/{key}"] = next_obs[key]
    for key, value in episode.step_data.items():
        if "/" in key:
            raise DatasetError(f"{where}/{STEP_DATA}/{key}: step_data keys cannot contain '/'")
        arrays[f"{STEP_DATA}/{key}"] = np.asarray(value)
    for name, value in arrays.items():
        if value.dtype == object:
            raise DatasetError(f"{where}/{name}: holds Python objects, not numbers")
    return arrays


def _write_demo(group: h5py.Group, episode: Episode, arrays: dict[str, np.ndarray], where: str) -> None:
    group.attrs["num_samples"] = len(episode)
    group.attrs["success"] = bool(episode.success)
    group.attrs["metadata"] = dumps(episode.metadata, f"{where}.attrs['metadata']")
    if any(name.startswith("obs/") for name in arrays):
        group.create_group("obs", track_order=True)  # keep the episode's key order on reading back
        group.create_group("next_obs", track_order=True)
    if any(name.startswith(f"{STEP_DATA}/") for name in arrays):
        group.create_group(STEP_DATA, track_order=True)
    for name, value in arrays.items():
        group.create_dataset(name, data=value, **_dataset_kwargs(value))


def _write_masks(f: h5py.File) -> None:
    data = f["data"]
    successful, failed = [], []
    for name in demo_names(data):
        (successful if bool(data[name].attrs.get("success", False)) else failed).append(name)
    mask = f.require_group("mask")
    for key, names in (("successful", successful), ("failed", failed)):
        if key in mask:
            del mask[key]
        mask.create_dataset(key, data=np.array(names, dtype="S"))


def _total_samples(data: h5py.Group) -> int:
    return int(sum(int(data[name].attrs.get("num_samples", len(data[name]["actions"]))) for name in demo_names(data)))


# ------------------------------------------------------------------------------------------------ writing


def save_robomimic(
    episodes: list[Episode], path: str | os.PathLike, env_meta: dict | None = None, append: bool = False
) -> Path:
    """Write ``episodes`` as a robomimic HDF5 file and return its path.

    The file is built under a hidden temporary name in the same folder and moved into place with
    ``os.replace``, so a crash or an exception leaves either the old file or none, never a partial one.
    With ``append=True`` an existing file is copied, extended (demo numbering continues) and replaced;
    its env_args are kept unless ``env_meta`` is given.
    """
    path = Path(path)
    episodes = check_episodes(episodes, path)
    with atomic_output(path) as tmp:
        if append and path.exists():
            with open_hdf5(path) as src:  # validates the existing file before copying it
                if "data" not in src:
                    raise DatasetError(f"{path}: data: missing group, cannot append")
            shutil.copyfile(path, tmp)
            f = open_hdf5(tmp, "a")
        else:
            f = h5py.File(tmp, "w")
        with f:
            data = f.require_group("data")
            if env_meta is not None or "env_args" not in data.attrs:
                data.attrs["env_args"] = dumps(normalize_env_meta(env_meta), f"{path}: env_meta")
            existing = demo_names(data)
            start = max((demo_sort_key(n)[0] for n in existing if demo_sort_key(n)[0] < 1 << 62), default=-1) + 1
            for i, episode in enumerate(episodes):
                name = f"demo_{start + i}"
                where = f"{path}: data/{name}"
                episode.validate(where)
                _write_demo(data.create_group(name), episode, _episode_arrays(episode, where), where)
            data.attrs["total"] = _total_samples(data)
            _write_masks(f)
    return path


class RobomimicAppender:
    """Append finished episodes to a robomimic HDF5 file, one durable write per episode.

    Crash guarantee: the file is open only inside :meth:`append`. Each call builds every array of the
    episode in memory first, then opens the file, writes the demo under ``/_staging``, moves it into
    ``data/`` (a rename), updates ``total`` and the success masks, flushes, closes and fsyncs. So:

    * a ``kill -9`` (or power loss) between ``append`` calls, including while the next episode is being
      recorded, loses nothing already appended and leaves a file that opens cleanly;
    * a kill during the few milliseconds of an ``append`` can, as with any HDF5 writer, damage the file,
      because HDF5 has no journal. Pass ``atomic=True`` to close that window too: each append then copies
      the file, extends the copy and renames it over the original (costs one file copy per episode).

    A leftover ``/_staging`` demo from an interrupted append is discarded on the next open, so a resumed
    session never exposes a half-written demo. Demo numbering continues from the largest existing index.
    """

    def __init__(self, path: str | os.PathLike, env_meta: dict | None = None, atomic: bool = False):
        self.path = Path(path)
        self.atomic = atomic
        if not self.path.exists():
            save_robomimic([], self.path, env_meta=env_meta)
        with open_hdf5(self.path) as f:
            if "data" not in f:
                raise DatasetError(f"{self.path}: data: missing group, cannot append")
            stored = read_env_meta(f, self.path)
            needs_cleanup = _STAGING in f
            self._names = demo_names(f["data"])
        if env_meta is not None and stored and stored.get("env_name") != env_meta.get("env_name"):
            raise DatasetError(
                f"{self.path}: data.attrs['env_args']: env_name is {stored.get('env_name')!r}, "
                f"refusing to append episodes of {env_meta.get('env_name')!r}"
            )
        self.env_meta = stored or normalize_env_meta(env_meta)
        if needs_cleanup:
            self._commit(lambda f: f.__delitem__(_STAGING))

    def __len__(self) -> int:
        return len(self._names)

    @property
    def demo_names(self) -> list[str]:
        return list(self._names)

    def _next_name(self) -> str:
        indices = [demo_sort_key(n)[0] for n in self._names if demo_sort_key(n)[0] < 1 << 62]
        return f"demo_{max(indices, default=-1) + 1}"

    def _commit(self, write) -> None:
        target = self.path
        if self.atomic:
            target = tmp_sibling(self.path)
            shutil.copyfile(self.path, target)
        try:
            with open_hdf5(target, "a") as f:
                write(f)
                f.flush()
            fsync_path(target)
            if self.atomic:
                os.replace(target, self.path)
                fsync_path(self.path.parent)
        except BaseException:
            if self.atomic and target.exists():
                target.unlink()
            raise

    def append(self, episode: Episode) -> str:
        """Write one finished episode durably; return its demo name (``demo_N``)."""
        if not isinstance(episode, Episode):
            raise DatasetError(f"{self.path}: append() needs an Episode, got {type(episode).__name__}")
        name = self._next_name()
        where = f"{self.path}: data/{name}"
        episode.validate(where)
        arrays = _episode_arrays(episode, where)  # all in memory before the file is opened

        def write(f: h5py.File) -> None:
            if _STAGING in f:
                del f[_STAGING]
            staging = f.create_group(_STAGING)
            _write_demo(staging.create_group(name), episode, arrays, where)
            f.move(f"{_STAGING}/{name}", f"data/{name}")
            del f[_STAGING]
            f["data"].attrs["total"] = _total_samples(f["data"])
            _write_masks(f)

        self._commit(write)
        self._names.append(name)
        return name

    # context-manager sugar: nothing stays open between appends, so closing is a no-op
    def close(self) -> None:
        pass

    def __enter__(self) -> RobomimicAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ reading


def _read(dataset: Any, where: str) -> np.ndarray:
    if not isinstance(dataset, h5py.Dataset):
        raise DatasetError(f"{where}: expected an array, found a group")
    try:
        return dataset[()]
    except (OSError, ValueError, RuntimeError) as exc:
        raise DatasetError(f"{where}: unreadable (corrupt or truncated file): {exc}") from None


def _mask_names(f: h5py.File, key: str, path: Path) -> list[str]:
    masks = f["mask"] if "mask" in f else None
    if masks is None or key not in masks:
        available = ", ".join(sorted(masks.keys())) if masks is not None else "none"
        raise DatasetError(f"{path}: mask/{key}: missing (available filter keys: {available})")
    return [_attr_str(n) for n in _read(masks[key], f"{path}: mask/{key}")]


def _read_episode(
    f: h5py.File, name: str, path: Path, obs_keys: list[str] | None, masks: dict[str, set[str]]
) -> Episode:
    where = f"{path}: data/{name}"
    group = f["data"][name]
    if not isinstance(group, h5py.Group):
        raise DatasetError(f"{where}: expected a group")
    if "actions" not in group:
        raise DatasetError(f"{where}/actions: missing")
    actions = _read(group["actions"], f"{where}/actions")
    if actions.ndim != 2:
        raise DatasetError(f"{where}/actions: expected shape (T, action_dim), got {actions.shape}")
    length = len(actions)
    if "num_samples" in group.attrs and int(group.attrs["num_samples"]) != length:
        raise DatasetError(
            f"{where}.attrs['num_samples']: says {int(group.attrs['num_samples'])} but actions has {length} steps"
        )

    def optional(field: str) -> np.ndarray | None:
        if field not in group:
            return None
        value = _read(group[field], f"{where}/{field}")
        if len(value) != length:
            raise DatasetError(f"{where}/{field}: {len(value)} steps but actions has {length}")
        return value

    rewards, dones, states = optional("rewards"), optional("dones"), optional("states")

    if "obs" not in group:
        hint = " (the file holds states only: import it by replaying them, format 'robosuite_demo')"
        raise DatasetError(f"{where}/obs: missing{hint if states is not None else ''}")
    mapping = resolve_obs_keys(obs_keys, list(group["obs"].keys()), f"{where}/obs")
    observations: dict[str, np.ndarray] = {}
    for key, stored in mapping.items():
        value = _read(group["obs"][stored], f"{where}/obs/{stored}")
        if len(value) != length:
            raise DatasetError(f"{where}/obs/{stored}: {len(value)} steps but actions has {length}")
        observations[key] = value

    final_observation = None
    if "next_obs" in group and length:
        next_group = group["next_obs"]
        if all(stored in next_group for stored in mapping.values()):
            final_observation = {}
            for key, stored in mapping.items():
                dataset = next_group[stored]
                if not isinstance(dataset, h5py.Dataset) or dataset.shape[:1] != (length,):
                    raise DatasetError(
                        f"{where}/next_obs/{stored}: shape {getattr(dataset, 'shape', None)}, expected {length} steps"
                    )
                try:
                    final_observation[key] = dataset[length - 1]
                except (OSError, ValueError) as exc:
                    raise DatasetError(f"{where}/next_obs/{stored}: unreadable: {exc}") from None

    step_data: dict[str, np.ndarray] = {}
    if STEP_DATA in group:
        for key in group[STEP_DATA].keys():
            value = _read(group[STEP_DATA][key], f"{where}/{STEP_DATA}/{key}")
            if len(value) != length:
                raise DatasetError(f"{where}/{STEP_DATA}/{key}: {len(value)} steps but actions has {length}")
            step_data[key] = value

    metadata: dict[str, Any] = {}
    if "metadata" in group.attrs:
        metadata = loads(group.attrs["metadata"], f"{where}.attrs['metadata']")
        if not isinstance(metadata, dict):
            raise DatasetError(f"{where}.attrs['metadata']: expected a JSON object")
    if "success" in group.attrs:
        success = bool(group.attrs["success"])
    elif name in masks.get("successful", ()) or name in masks.get("failed", ()):
        success = name in masks.get("successful", ())
        metadata.setdefault(SUCCESS_SOURCE_KEY, "mask")
    else:
        inferred = success_from_rewards(rewards)
        success = bool(inferred)
        metadata.setdefault(SUCCESS_SOURCE_KEY, "rewards" if inferred is not None else SUCCESS_UNKNOWN)

    try:
        episode = Episode(
            observations=observations,
            actions=actions,
            rewards=rewards,
            terminals=dones,
            success=success,
            final_observation=final_observation,
            states=states,
            metadata=metadata,
            step_data=step_data,
        )
    except DatasetError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    episode.validate(where)
    return episode


def iter_robomimic(
    path: str | os.PathLike, obs_keys: list[str] | None = None, filter_key: str | None = None
) -> Iterator[Episode]:
    """Yield the episodes of a robomimic file one at a time (the file stays open while iterating)."""
    path = Path(path)
    with open_hdf5(path) as f:
        yield from _iter_open(f, path, obs_keys, filter_key)


def _iter_open(f: h5py.File, path: Path, obs_keys: list[str] | None, filter_key: str | None) -> Iterator[Episode]:
    if "data" not in f or not isinstance(f["data"], h5py.Group):
        raise DatasetError(f"{path}: data: missing group (not a robomimic dataset)")
    names = demo_names(f["data"])
    masks: dict[str, set[str]] = {}
    if "mask" in f:
        for key in ("successful", "failed"):
            if key in f["mask"]:
                masks[key] = set(_mask_names(f, key, path))
    if filter_key is not None:
        selected = _mask_names(f, filter_key, path)
        missing = [n for n in selected if n not in f["data"]]
        if missing:
            raise DatasetError(f"{path}: mask/{filter_key}: names demos not in data/: {', '.join(missing[:5])}")
        names = sorted(selected, key=demo_sort_key)
    for name in names:
        try:
            episode = _read_episode(f, name, path, obs_keys, masks)
        except (OSError, KeyError, RuntimeError) as exc:  # h5py's messages for damaged objects
            raise DatasetError(f"{path}: data/{name}: unreadable (corrupt or truncated file): {exc}") from None
        yield episode


def load_robomimic(
    path: str | os.PathLike, obs_keys: list[str] | None = None, filter_key: str | None = None
) -> tuple[list[Episode], dict]:
    """Read a robomimic HDF5 file: (episodes in demo order, env_meta from ``data.attrs['env_args']``).

    ``obs_keys`` selects observations (``object`` and robosuite's ``object-state`` are interchangeable; a
    key comes back under the name asked for); None reads all, with ``object-state`` renamed ``object``.
    ``filter_key`` restricts to the demos listed in ``mask/<filter_key>``. Success comes from our
    ``success`` attr, else from ``mask/successful``/``mask/failed``, else from a reward of 1; when none
    says, ``success`` is False and ``metadata['success_source']`` is ``'unknown'``.
    """
    path = Path(path)
    with open_hdf5(path) as f:
        episodes = list(_iter_open(f, path, obs_keys, filter_key))
        env_meta = read_env_meta(f, path)
    return episodes, env_meta
