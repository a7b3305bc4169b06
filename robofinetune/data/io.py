"""One entry point for every dataset format: detect, load, save, convert."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Literal

import h5py

from robofinetune.data.episode import Episode
from robofinetune.errors import DatasetError

Format = Literal["robomimic", "zarr", "robosuite_demo", "lerobot"]
FORMATS: tuple[str, ...] = ("robomimic", "zarr", "robosuite_demo", "lerobot")
HDF5_SUFFIXES = (".hdf5", ".h5", ".he5")
ZARR_SUFFIXES = (".zarr", ".zarr.zip")
LEROBOT_SUFFIXES = (".lerobot", "_lerobot")  # a folder; detect_format also recognises one by meta/info.json


def _is_zarr_folder(path: Path) -> bool:
    return (path / ".zgroup").is_file() or (path / "zarr.json").is_file()


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _has_hdf5_signature(path: Path) -> bool:
    """HDF5's superblock signature sits at byte 0 or after a user block of 512 * 2**k bytes."""
    try:
        with open(path, "rb") as fh:
            for offset in (0, 512, 1024, 2048, 4096):
                fh.seek(offset)
                if fh.read(8) == _HDF5_SIGNATURE:
                    return True
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from None
    return False


def _hdf5_kind(path: Path) -> str:
    """robomimic when demos carry observations, robosuite_demo when they hold only states to replay."""
    from robofinetune.data.robomimic_io import demo_names, open_hdf5

    with open_hdf5(path) as f:
        if "data" not in f or not isinstance(f["data"], h5py.Group):
            raise DatasetError(f"{path}: data: missing group (an HDF5 file, but not a robomimic or robosuite dataset)")
        data = f["data"]
        names = demo_names(data)
        if not names:
            return "robosuite_demo" if "env" in data.attrs and "env_args" not in data.attrs else "robomimic"
        first = data[names[0]]
        if isinstance(first, h5py.Group) and "obs" not in first and "states" in first:
            return "robosuite_demo"
        return "robomimic"


def detect_format(path: str | os.PathLike) -> Format:
    """``robomimic`` | ``zarr`` | ``robosuite_demo`` | ``lerobot``, from the content (not only the name).

    A folder with ``meta/info.json`` is LeRobot; a folder with zarr metadata, or a zip, is zarr; an HDF5
    file is robomimic when its demos hold ``obs``, robosuite_demo when they hold only ``states``.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: not found")
    if path.is_dir():
        if (path / "meta" / "info.json").is_file():
            return "lerobot"
        if _is_zarr_folder(path) or path.name.endswith(".zarr"):
            return "zarr"
        raise DatasetError(f"{path}: a folder that is neither a zarr store (.zgroup) nor a LeRobot dataset (meta/info.json)")
    if zipfile.is_zipfile(path):
        return "zarr"
    if _has_hdf5_signature(path) or path.name.endswith(HDF5_SUFFIXES):
        # opening reports truncated or corrupt files (and non-HDF5 files named .hdf5) naming the file
        return _hdf5_kind(path)  # type: ignore[return-value]
    raise DatasetError(f"{path}: unknown dataset format (expected robomimic .hdf5, .zarr, .zarr.zip or LeRobot folder)")


def format_from_suffix(path: str | os.PathLike) -> Format:
    name = Path(path).name.lower()
    if name.endswith(HDF5_SUFFIXES):
        return "robomimic"
    if name.endswith(ZARR_SUFFIXES):
        return "zarr"
    if name.endswith(LEROBOT_SUFFIXES) or (Path(path) / "meta" / "info.json").is_file():
        return "lerobot"
    raise DatasetError(
        f"{path}: cannot tell the format from the name; use .hdf5/.h5 (robomimic), .zarr/.zarr.zip (zarr) or a "
        f"folder named *_lerobot / *.lerobot (LeRobot v3)"
    )


def task_from_env_meta(env_meta: dict | None) -> str | None:
    from robofinetune.data.robosuite_import import infer_task

    if not env_meta:
        return None
    return env_meta.get("task") or infer_task(env_meta.get("env_name"))


def load_dataset(
    path: str | os.PathLike, obs_keys: list[str] | None = None, task: str | None = None
) -> tuple[list[Episode], dict]:
    """Load any supported dataset: (episodes, env_meta). ``task`` is used only to replay a robosuite_demo
    file (inferred from its env name when omitted)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "robomimic":
        from robofinetune.data.robomimic_io import load_robomimic

        return load_robomimic(path, obs_keys=obs_keys)
    if fmt == "zarr":
        from robofinetune.data.zarr_io import load_zarr

        return load_zarr(path, obs_keys=obs_keys)
    if fmt == "robosuite_demo":
        from robofinetune.data.robosuite_import import load_robosuite_demo

        return load_robosuite_demo(path, task=task, obs_keys=obs_keys)
    from robofinetune.data.lerobot_io import load_lerobot

    return load_lerobot(path, obs_keys=obs_keys)


def save_dataset(
    episodes: list[Episode], path: str | os.PathLike, env_meta: dict | None = None, format: str | None = None
) -> Path:
    """Write episodes atomically; the format comes from ``format`` or the suffix (.hdf5/.h5 -> robomimic,
    .zarr/.zarr.zip -> zarr, a folder named *_lerobot / *.lerobot -> LeRobot v3)."""
    path = Path(path)
    fmt = format or format_from_suffix(path)
    if fmt == "robomimic":
        from robofinetune.data.robomimic_io import save_robomimic

        return save_robomimic(episodes, path, env_meta=env_meta)
    if fmt == "zarr":
        from robofinetune.data.zarr_io import save_zarr

        return save_zarr(episodes, path, env_meta=env_meta)
    if fmt == "lerobot":
        from robofinetune.data.lerobot_io import save_lerobot

        return save_lerobot(episodes, path, env_meta=env_meta)
    raise DatasetError(f"{path}: cannot write format {fmt!r}; writable formats: robomimic, zarr, lerobot")


def convert_dataset(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    task: str | None = None,
    obs_keys: list[str] | None = None,
    format: str | None = None,
    cameras: list[str] | None = None,
    progress: bool = False,
) -> Path:
    """Read ``src`` in any supported format and write it to ``dst`` (format from its suffix).

    ``task`` names the robosuite_demo source's task, whose observations are recovered by replaying
    states (inferred from the file's env name when possible: PickPlaceCan -> can, Lift -> lift,
    NutAssemblySquare -> square). A ``task`` with cameras whose images the source lacks (``can_image`` for
    the state demos of ``can``) renders them by replaying the recorded states
    (:mod:`robofinetune.data.render_states`); ``cameras`` keeps only those of the task's cameras.
    """
    src, dst = Path(src), Path(dst)
    fmt = format or format_from_suffix(dst)  # fail on a bad destination before a long replay
    if src.resolve() == dst.resolve():
        raise DatasetError(f"{dst}: destination is the source file")
    spec = _camera_task_spec(task, cameras)
    if spec is not None and detect_format(src) != "robosuite_demo":
        episodes, env_meta = load_dataset(src)
        if needs_rendering := _missing_images(episodes, spec):
            from robofinetune.data.render_states import render_episodes

            bar = _progress_bar(len(episodes), f"rendering {', '.join(needs_rendering)}") if progress else None
            episodes = render_episodes(episodes, spec.name, str(src),
                                       progress=(lambda done, total: bar.update(done - bar.n)) if bar else None)
            if bar is not None:
                bar.close()
            env_meta = {**env_meta, "task": spec.name}
        episodes = _keep_cameras(episodes, spec, cameras)
        return save_dataset(episodes, dst, env_meta=env_meta, format=fmt)
    episodes, env_meta = load_dataset(src, obs_keys=obs_keys, task=task)
    if spec is not None:
        episodes = _keep_cameras(episodes, spec, cameras)
    if task and env_meta.get("task") is None:
        env_meta = {**env_meta, "task": task}
    return save_dataset(episodes, dst, env_meta=env_meta, format=fmt)


def _camera_task_spec(task: str | None, cameras: list[str] | None):
    """The task spec when ``task`` has cameras (None otherwise); ``cameras`` must name some of them."""
    if task is None:
        if cameras:
            raise DatasetError("data convert --cameras: also pass --task, the task whose cameras to render "
                               "(e.g. --task=can_image)")
        return None
    from robofinetune.envs.spec import load_task_spec

    spec = load_task_spec(task)
    names = [camera.name for camera in getattr(spec, "cameras", None) or []]
    if cameras:
        unknown = [name for name in cameras if name not in names]
        if unknown:
            raise DatasetError(f"data convert --cameras: {unknown} are not cameras of task {spec.name!r} "
                               f"(it has {names or 'none'})")
    return spec if names else None


def _missing_images(episodes: list[Episode], spec) -> list[str]:
    from robofinetune.data.render_states import needs_rendering

    return needs_rendering(episodes, spec) if episodes else []


def _keep_cameras(episodes: list[Episode], spec, cameras: list[str] | None) -> list[Episode]:
    """Drop the image keys of the task's cameras not in ``cameras`` (all kept when ``cameras`` is empty)."""
    if not cameras:
        return episodes
    from robofinetune.images import is_image_key

    dropped = {f"{camera.name}_image" for camera in spec.cameras if camera.name not in cameras}
    for episode in episodes:
        for key in [k for k in episode.observations if k in dropped and is_image_key(k)]:
            del episode.observations[key]
            if episode.final_observation:
                episode.final_observation.pop(key, None)
    return episodes


def _progress_bar(total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="episode")
