"""Typed configs: dataclass defaults, then a YAML preset, then ``--key=value`` flags; the result is saved with
every run so the run can be reproduced or resumed."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from robofinetune.errors import ConfigError
from robofinetune.paths import configs_dir

ConfigT = TypeVar("ConfigT")


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Check/convert a parsed YAML value to the field's annotated type, naming the field on failure."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(annotation) if option is not type(None)]
        if value is None:
            return None
        errors = []
        for option in options:
            try:
                return _coerce(value, option, name)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"config field '{name}': {value!r} fits none of {options}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = typing.get_args(annotation)
        return [_coerce(item, inner[0], name) for item in value] if inner else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{name}' must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config field '{name}' must be true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config field '{name}' must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field '{name}' must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        return str(value)
    return value


def _apply(config: Any, values: dict[str, Any], source: str) -> Any:
    hints = typing.get_type_hints(type(config))
    names = {field.name for field in dataclasses.fields(config)}
    for key, value in values.items():
        head, _, rest = key.partition(".")
        head = head.replace("-", "_")
        if head not in names:
            raise ConfigError(f"{source}: unknown config key '{key}'. Known keys: {', '.join(sorted(names))}")
        current = getattr(config, head)
        if dataclasses.is_dataclass(current):
            nested = {rest: value} if rest else value
            if not isinstance(nested, dict):
                raise ConfigError(f"{source}: '{key}' is a section; set its fields as {key}.<field>=...")
            setattr(config, head, _apply(current, nested, source))
        else:
            setattr(config, head, _coerce(value, hints[head], key))
    return config


def parse_overrides(arguments: list[str]) -> dict[str, Any]:
    """``["--lr=1e-4", "--network", "unet"]`` -> {"lr": 1e-4, "network": "unet"}; values are parsed as YAML."""
    values: dict[str, Any] = {}
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if not argument.startswith("--"):
            raise ConfigError(f"unexpected argument '{argument}': options look like --key=value")
        key, equals, raw = argument[2:].partition("=")
        if not equals:
            if index + 1 < len(arguments) and not arguments[index + 1].startswith("--"):
                raw = arguments[index + 1]
                index += 1
            else:
                raw = "true"
        values[key.replace("-", "_")] = yaml.safe_load(raw) if raw != "" else ""
        index += 1
    return values


def preset_path(method: str, task: str) -> Path | None:
    path = configs_dir() / method / f"{task}.yaml"
    return path if path.exists() else None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: config file not found") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML ({error})") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys")
    return values


def resolve_config(config_class: type[ConfigT], method: str, overrides: dict[str, Any],
                   extra_preset: str | Path | None = None) -> ConfigT:
    """Defaults <- ``configs/<method>/<task>.yaml`` <- ``extra_preset`` <- flags."""
    config = config_class()
    task = overrides.get("task", getattr(config, "task", None))
    if task is not None:
        preset = preset_path(method, str(task))
        if preset is not None:
            config = _apply(config, load_yaml(preset), str(preset))
    if extra_preset is not None:
        config = _apply(config, load_yaml(extra_preset), str(extra_preset))
    return _apply(config, overrides, "command line")


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(config_class: type[ConfigT], values: dict[str, Any], source: str) -> ConfigT:
    return _apply(config_class(), values, source)
