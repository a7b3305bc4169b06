"""Task definitions as data: ``envs/<task>.yaml`` -> :class:`TaskSpec`."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from math import prod
from pathlib import Path
from typing import Any

import yaml

from robofinetune.errors import TaskError
from robofinetune.paths import task_specs_dir

KINDS = ("robosuite", "pointmass")


@dataclass
class TaskSpec:
    """Everything that defines a task, read from ``envs/<task>.yaml``.

    ``obs_shapes`` is ordered: the Dict observation space, datasets and policies all use this key order.
    ``env_kwargs`` are passed through to the simulator (``robosuite.make`` or the pointmass constructor); for
    robosuite, ``controller_configs`` may be a controller name (``OSC_POSE``) that ``make_env`` resolves.
    ``expert`` names the scripted expert in :mod:`robofinetune.envs.experts` (``None`` when there is none).
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

    @property
    def obs_keys(self) -> list[str]:
        return list(self.obs_shapes)

    @property
    def obs_dim(self) -> int:
        """Sum of the flat sizes of all observation keys (23 for can)."""
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
        """The YAML form (``obs_keys`` as key -> shape list)."""
        return {
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
        from robofinetune.robot.config import is_robot_config, robot_task_spec  # robot imports envs: import late

        if is_robot_config(path):  # a real robot (or its twin) mirrors a sim task: same spaces
            return robot_task_spec(path)
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
               "expert", "description"}
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
    )
    _check_spec(spec, path)
    return spec


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
