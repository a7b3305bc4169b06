"""Small pieces shared by the dataset readers and writers: atomic files, JSON attrs, key aliases."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from robofinetune.errors import DatasetError

# robosuite names the object observation ``object-state``; robomimic (and this project) call it ``object``.
OBS_KEY_ALIASES: dict[str, tuple[str, ...]] = {
    "object": ("object-state",),
    "object-state": ("object",),
}
CANONICAL_OBS_KEY = {"object-state": "object"}

# Set in Episode.metadata by readers when the file does not record whether an episode succeeded.
SUCCESS_SOURCE_KEY = "success_source"
SUCCESS_UNKNOWN = "unknown"

TMP_MARKER = ".tmp-"


def canonical_key(key: str) -> str:
    return CANONICAL_OBS_KEY.get(key, key)


def resolve_obs_keys(
    requested: list[str] | None, available: list[str], where: str
) -> dict[str, str]:
    """Map the caller's key names to the names stored in the file.

    With ``requested=None`` every stored key is returned under its canonical (robomimic) name. A requested
    key may use either spelling of an aliased pair (``object`` / ``object-state``); it is returned under
    the name the caller asked for. Raises a DatasetError naming ``where`` and listing the stored keys.
    """
    if requested is None:
        mapping: dict[str, str] = {}
        for stored in available:
            name = canonical_key(stored)
            if name in mapping:  # both spellings stored: keep the one already named canonically
                if stored == name:
                    mapping[name] = stored
                continue
            mapping[name] = stored
        return mapping
    mapping = {}
    for key in requested:
        if key in available:
            mapping[key] = key
            continue
        alias = next((a for a in OBS_KEY_ALIASES.get(key, ()) if a in available), None)
        if alias is None:
            raise DatasetError(
                f"{where}/{key}: missing (available observation keys: {', '.join(sorted(available)) or 'none'})"
            )
        mapping[key] = alias
    return mapping


def to_jsonable(value: Any, where: str) -> Any:
    """Convert numpy scalars/arrays and paths to plain JSON values; raise a DatasetError otherwise."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, where) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise DatasetError(f"{where}: value of type {type(value).__name__} cannot be stored as JSON")


def dumps(value: Any, where: str) -> str:
    return json.dumps(to_jsonable(value, where), sort_keys=True)


def loads(text: Any, where: str) -> Any:
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        return json.loads(str(text))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc})") from None


def tmp_sibling(path: Path, suffix: str = "") -> Path:
    """A hidden temporary name in the same folder as ``path`` (so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder's entry table, by path."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders; the data itself was synced
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            for name in files:
                fsync_path(Path(root) / name)
            fsync_path(Path(root))
    else:
        fsync_path(path)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_output(path: Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write into; on success it replaces ``path`` atomically.

    If the body raises, the temporary is removed and ``path`` is left as it was (absent or the old
    version). A folder that already exists is moved aside first (POSIX cannot rename over a non-empty
    folder), so there is a moment where a replaced folder does not exist; it never looks half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists() and (path.is_dir() or tmp.is_dir()) and not path.is_symlink():
            old = tmp_sibling(path, ".old")
            os.replace(path, old)
            os.replace(tmp, path)
            remove(old)
        else:
            os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        remove(tmp)
        raise


def check_episodes(episodes: Any, path: Path) -> list:
    from robofinetune.data.episode import Episode

    episodes = list(episodes)
    for i, episode in enumerate(episodes):
        if not isinstance(episode, Episode):
            raise DatasetError(f"{path}: episode {i} is a {type(episode).__name__}, not an Episode")
    return episodes


def success_from_rewards(rewards: np.ndarray | None) -> bool | None:
    """True when a sparse 0/1 task reward reached 1; None when the data cannot tell (no reward, or all 0:
    a file that never recorded rewards looks the same as a failed episode)."""
    if rewards is not None and len(rewards) and np.nanmax(rewards) >= 1.0:
        return True
    return None
