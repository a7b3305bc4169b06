"""Task definitions as data: ``envs/<task>.yaml`` -> :class:`TaskSpec`.

Other kinds of task file (a robot YAML mirrors a sim task) plug in as task sources (:class:`TaskSource`): the
module that understands them calls :func:`register_task_source`, so this package imports none of them. The
modules named in ``robofinetune.TASK_SOURCE_MODULES`` are imported the first time a YAML path is looked up.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import asdict, dataclass, field, fields
from math import prod
from pathlib import Path
from typing import Any, Callable

import yaml

from robofinetune.errors import TaskError
from robofinetune.images import image_key, image_keys, is_image_key, state_keys
from robofinetune.paths import task_specs_dir

KINDS = ("robosuite", "pointmass")


@dataclass(frozen=True)
class Camera:
    """One simulated camera whose frames are the observation ``<name>_image`` (height x width x 3, uint8)."""

    name: str
    height: int
    width: int

    @property
    def key(self) -> str:
        return image_key(self.name)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)


@dataclass(frozen=True)
class RenderSettings:
    """How the offscreen renderer draws camera observations (and videos) of a task.

    Software OpenGL (Mesa llvmpipe through EGL) pays for every effect per pixel: on the can scene, 84x84,
    multisampling (MuJoCo's ``vis.quality.offsamples``, 4 by default) costs most of a frame, then shadows,
    reflections, skybox and haze. ``None``/``True`` keep the model's own setting.
    """

    shadows: bool = True
    reflections: bool = True
    skybox: bool = True
    haze: bool = True
    multisamples: int | None = None

    @property
    def is_default(self) -> bool:
        return self == RenderSettings()


@dataclass
class TaskSpec:
    """Everything that defines a task, read from ``envs/<task>.yaml``.

    ``obs_shapes`` is ordered: the Dict observation space, datasets and policies all use this key order.
    ``env_kwargs`` are passed through to the simulator (``robosuite.make`` or the pointmass constructor); for
    robosuite, ``controller_configs`` may be a controller name (``OSC_POSE``) that ``make_env`` resolves.
    ``expert`` names the scripted expert in :mod:`robofinetune.envs.experts` (``None`` when there is none).
    ``cameras`` are rendered into the image observations ``<camera>_image`` (each must be an obs key of shape
    [height, width, 3]); ``render_settings`` says how.
    """

    name: str
    kind: str
    obs_shapes: dict[str, tuple[int, ...]]
    action_dim: int
    horizon: int
    control_freq: float
    env_name: str | None = None
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    expert: str | None = None
    source: Path | None = None  # the YAML file this spec came from, if any
    cameras: list[Camera] = field(default_factory=list)
    render_settings: RenderSettings = field(default_factory=RenderSettings)

    @property
    def obs_keys(self) -> list[str]:
        return list(self.obs_shapes)

    @property
    def image_keys(self) -> list[str]:
        """Camera observation keys (uint8 H x W x C), in spec order."""
        return image_keys(self.obs_shapes)

    @property
    def state_keys(self) -> list[str]:
        """Low-dimensional (float) observation keys, in spec order."""
        return state_keys(self.obs_shapes)

    @property
    def state_dim(self) -> int:
        """Sum of the flat sizes of the state keys (equals ``obs_dim`` for a task without cameras)."""
        return int(sum(prod(self.obs_shapes[key]) for key in self.state_keys))


    @property
    def obs_dim(self) -> int:
        """Sum of the flat sizes of all observation keys (23 for can); images count too (see ``state_dim``)."""
        return int(sum(prod(shape) for shape in self.obs_shapes.values()))

    def replace(self, **overrides: Any) -> "TaskSpec":
        """A copy with some fields replaced; unknown names go into ``env_kwargs``."""
        names = {f.name for f in fields(self)}
        spec = copy.deepcopy(self)
        for key, value in overrides.items():
            if key in names:
                setattr(spec, key, value)
            else:
                spec.env_kwargs[key] = value
        _check_spec(spec, spec.source or spec.name)
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (``obs_keys`` as key -> shape list; ``cameras`` and ``render_settings`` when set)."""
        document = {
            "name": self.name,
            "kind": self.kind,
            "env_name": self.env_name,
            "obs_keys": {key: list(shape) for key, shape in self.obs_shapes.items()},
            "action_dim": self.action_dim,
            "horizon": self.horizon,
            "control_freq": self.control_freq,
            "env_kwargs": copy.deepcopy(self.env_kwargs),
            "expert": self.expert,
        }
        if self.cameras:
            document["cameras"] = [asdict(camera) for camera in self.cameras]
        if not self.render_settings.is_default:
            document["render_settings"] = asdict(self.render_settings)
        return document


# --- task sources: other files that stand for a task ---------------------------------------------------------------


@dataclass(frozen=True)
class TaskSource:
    """A kind of YAML file, other than a task spec, that stands for a task (a robot YAML mirrors a sim task).

    ``claims(path)`` says whether a file is one; ``task_spec(path)`` gives the task it stands for (same spaces);
    ``make_env(path, seed=..., **overrides)``, when given, is what ``make_env`` returns for it instead of a
    simulator; ``single_env``: ``make_vector_env`` drives exactly one env of it, in this process (one robot).
    """

    name: str
    claims: Callable[[Path], bool]
    task_spec: Callable[[Path], "TaskSpec"]
    make_env: Callable[..., Any] | None = None
    single_env: bool = False


_TASK_SOURCES: dict[str, TaskSource] = {}
_builtin_sources_loaded = False


def register_task_source(source: TaskSource) -> None:
    """Make ``load_task_spec`` / ``make_env`` accept the files ``source`` claims (a later one of the same name
    replaces it)."""
    _TASK_SOURCES[source.name] = source


def task_source_for(task: Any) -> TaskSource | None:
    """The registered source that claims ``task`` (an existing .yaml/.yml path), else None."""
    if not isinstance(task, (str, Path)) or not str(task).endswith((".yaml", ".yml")) or not Path(task).is_file():
        return None
    _load_builtin_sources()
    path = Path(task)
    for source in list(_TASK_SOURCES.values()):
        if source.claims(path):
            return source
    return None


def _load_builtin_sources() -> None:
    # the package root lists the modules that register sources; importing them here, late, keeps this module
    # free of any import of theirs (they import it)
    global _builtin_sources_loaded
    if _builtin_sources_loaded:
        return
    _builtin_sources_loaded = True
    import robofinetune

    for module in getattr(robofinetune, "TASK_SOURCE_MODULES", ()):
        importlib.import_module(module)


def list_tasks() -> list[str]:
    """Names of the tasks defined in ``robofinetune.paths.task_specs_dir()`` (sorted)."""
    folder = task_specs_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_task_spec(task: str | Path | TaskSpec) -> TaskSpec:
    """A task name (looked up in ``task_specs_dir()``), a path to a YAML file, or a TaskSpec (returned as is)."""
    if isinstance(task, TaskSpec):
        return task
    path = Path(task)
    looks_like_path = isinstance(task, Path) or path.suffix in (".yaml", ".yml") or len(path.parts) > 1
    if looks_like_path:
        if not path.is_file():
            raise TaskError(f"task file '{path}' does not exist")
        source = task_source_for(path)
        if source is not None:  # e.g. a real robot (or its twin) mirrors a sim task: same spaces
            return source.task_spec(path)
    else:
        path = task_specs_dir() / f"{task}.yaml"
        if not path.is_file():
            known = ", ".join(list_tasks()) or "(none)"
            raise TaskError(f"unknown task '{task}'; known tasks: {known} (in {task_specs_dir()})")
    return _spec_from_file(path)


def _spec_from_file(path: Path) -> TaskSpec:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TaskError(f"task file '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise TaskError(f"task file '{path}' must hold a mapping of fields, got {type(raw).__name__}")
    allowed = {"name", "kind", "env_name", "obs_keys", "action_dim", "horizon", "control_freq", "env_kwargs",
               "expert", "description", "cameras", "render_settings"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise TaskError(f"task file '{path}': unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    for required in ("kind", "obs_keys", "action_dim", "horizon"):
        if required not in raw:
            raise TaskError(f"task file '{path}': missing field '{required}'")
    obs_keys = raw["obs_keys"]
    if not isinstance(obs_keys, dict) or not obs_keys:
        raise TaskError(f"task file '{path}': field 'obs_keys' must be a non-empty mapping key -> shape list")
    obs_shapes: dict[str, tuple[int, ...]] = {}
    for key, shape in obs_keys.items():
        if isinstance(shape, int):
            shape = [shape]
        if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s > 0 for s in shape):
            raise TaskError(f"task file '{path}': obs_keys.{key} must be a list of positive ints, got {shape!r}")
        obs_shapes[str(key)] = tuple(shape)
    env_kwargs = raw.get("env_kwargs") or {}
    if not isinstance(env_kwargs, dict):
        raise TaskError(f"task file '{path}': field 'env_kwargs' must be a mapping")
    spec = TaskSpec(
        name=str(raw.get("name", path.stem)),
        kind=str(raw["kind"]),
        env_name=raw.get("env_name"),
        obs_shapes=obs_shapes,
        action_dim=raw["action_dim"],
        horizon=raw["horizon"],
        control_freq=raw.get("control_freq", 20),
        env_kwargs=env_kwargs,
        expert=raw.get("expert"),
        source=path.resolve(),
        cameras=_cameras(raw.get("cameras"), path),
        render_settings=_render_settings(raw.get("render_settings"), path),
    )
    _check_spec(spec, path)
    return spec


def _cameras(raw: Any, path: Path) -> list[Camera]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise TaskError(f"task file '{path}': field 'cameras' must be a list of {{name, height, width}} mappings")
    cameras = []
    for index, entry in enumerate(raw):
        where = f"task file '{path}': cameras[{index}]"
        if not isinstance(entry, dict) or set(entry) != {"name", "height", "width"}:
            raise TaskError(f"{where} must be a mapping with exactly the fields name, height, width; got {entry!r}")
        if not isinstance(entry["name"], str) or not entry["name"]:
            raise TaskError(f"{where}.name must be a camera name, got {entry['name']!r}")
        for size in ("height", "width"):
            value = entry[size]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TaskError(f"{where}.{size} must be a positive int, got {value!r}")
        cameras.append(Camera(entry["name"], entry["height"], entry["width"]))
    return cameras


def _render_settings(raw: Any, path: Path) -> RenderSettings:
    if raw is None:
        return RenderSettings()
    known = {f.name for f in fields(RenderSettings)}
    if not isinstance(raw, dict) or set(raw) - known:
        raise TaskError(f"task file '{path}': field 'render_settings' must be a mapping with fields among "
                        f"{sorted(known)}, got {raw!r}")
    for name, value in raw.items():
        if name == "multisamples":
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise TaskError(f"task file '{path}': render_settings.multisamples must be an int >= 0, got {value!r}")
        elif not isinstance(value, bool):
            raise TaskError(f"task file '{path}': render_settings.{name} must be true or false, got {value!r}")
    return RenderSettings(**raw)


def _check_spec(spec: TaskSpec, where: object) -> None:
    if spec.kind not in KINDS:
        raise TaskError(f"task '{where}': field 'kind' must be one of {list(KINDS)}, got {spec.kind!r}")
    if spec.kind == "robosuite" and not spec.env_name:
        raise TaskError(f"task '{where}': field 'env_name' (the robosuite environment class) is required")
    for name in ("action_dim", "horizon"):
        value = getattr(spec, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise TaskError(f"task '{where}': field '{name}' must be a positive int, got {value!r}")
    if not isinstance(spec.control_freq, (int, float)) or spec.control_freq <= 0:
        raise TaskError(f"task '{where}': field 'control_freq' must be a positive number, got {spec.control_freq!r}")
    cameras = {camera.key: camera for camera in spec.cameras}
    if len(cameras) != len(spec.cameras):
        raise TaskError(f"task '{where}': field 'cameras' names a camera twice: {[c.name for c in spec.cameras]}")
    for key, camera in cameras.items():
        if key not in spec.obs_shapes:
            raise TaskError(f"task '{where}': camera '{camera.name}' is rendered into observation '{key}', which "
                            f"field 'obs_keys' lacks (add {key}: {list(camera.shape)})")
        if tuple(spec.obs_shapes[key]) != camera.shape:
            raise TaskError(f"task '{where}': obs_keys.{key} is {list(spec.obs_shapes[key])} but camera "
                            f"'{camera.name}' renders {list(camera.shape)} (height, width, 3)")
    for key in spec.obs_shapes:
        if is_image_key(key) and key not in cameras:
            raise TaskError(f"task '{where}': observation '{key}' is an image but field 'cameras' has no camera "
                            f"'{key[:-len('_image')]}' (cameras: {[c.name for c in spec.cameras]})")
