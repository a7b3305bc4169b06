from dataclasses import dataclass, field

import pytest

from robofinetune.config import config_from_dict, parse_overrides, resolve_config
from robofinetune.errors import ConfigError
from robofinetune.eval.stats import success_rate_ci


@dataclass
class Inner:
    width: int = 4


@dataclass
class Example:
    task: str = "toy"
    learning_rate: float = 1e-3
    steps: int = 10
    flag: bool = False
    dims: list[int] = field(default_factory=lambda: [1, 2])
    inner: Inner = field(default_factory=Inner)


def test_overrides_parse_and_apply_with_types():
    overrides = parse_overrides(["--learning-rate=3e-4", "--steps", "20", "--flag", "--dims=[8,16]", "--inner.width=9"])
    config = resolve_config(Example, "nomethod", overrides)
    assert config.learning_rate == pytest.approx(3e-4) and config.steps == 20 and config.flag is True
    assert config.dims == [8, 16] and config.inner.width == 9


def test_unknown_and_mistyped_keys_are_named():
    with pytest.raises(ConfigError, match="unknown config key 'stepz'"):
        resolve_config(Example, "nomethod", {"stepz": 3})
    with pytest.raises(ConfigError, match="'steps' must be an integer"):
        resolve_config(Example, "nomethod", {"steps": "many"})
    with pytest.raises(ConfigError, match="'flag' must be true/false"):
        config_from_dict(Example, {"flag": 3}, "x")


def test_task_preset_is_applied_before_flags(tmp_path, monkeypatch):
    (tmp_path / "configs" / "m").mkdir(parents=True)
    (tmp_path / "configs" / "m" / "toy.yaml").write_text("steps: 77\nlearning_rate: 0.5\n")
    monkeypatch.setenv("ROBOFINETUNE_HOME", str(tmp_path))
    config = resolve_config(Example, "m", {"learning_rate": 0.1})
    assert config.steps == 77 and config.learning_rate == 0.1


def test_wilson_interval_known_values():
    low, high = success_rate_ci(95, 100)
    assert low == pytest.approx(0.8883, abs=1e-3) and high == pytest.approx(0.9785, abs=1e-3)
    low, high = success_rate_ci(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-3)
    assert success_rate_ci(10, 10)[1] == pytest.approx(1.0)
