"""Run folders: ``runs/<time>_<command>_<task>/`` with the resolved config, metrics (JSONL + TensorBoard),
checkpoints, eval reports and plots. ``Run.open`` reattaches to one for ``--resume``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from robofinetune.config import config_to_dict
from robofinetune.errors import ConfigError
from robofinetune.paths import project_root, runs_dir


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project_root(), capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_description() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, {device}, torch {torch.__version__}"


class Run:
    """One command's output folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self._writer = None

    @classmethod
    def create(cls, command: str, task: str, config: Any, root: str | Path | None = None) -> "Run":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(root) if root is not None else runs_dir()
        path = base / f"{stamp}_{command}_{task}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = base / f"{stamp}_{command}_{task}_{suffix}"
        run = cls(path)
        (run.path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        (run.path / "run.json").write_text(json.dumps({
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "method": command, "task": task,
            "commit": git_commit(), "machine": machine_description(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }, indent=2))
        return run

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        path = Path(path)
        if not (path / "config.yaml").exists():
            raise ConfigError(f"{path}: not a run folder (no config.yaml) — pass the folder a command created")
        return cls(path)

    def save_config(self, config: Any) -> None:
        """Rewrite config.yaml (a resumed run whose length was extended), atomically."""
        temporary = self.path / "config.yaml.tmp"
        temporary.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        temporary.replace(self.path / "config.yaml")

    def saved_config(self) -> dict[str, Any]:
        return yaml.safe_load((self.path / "config.yaml").read_text())

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path / "tensorboard"))
        return self._writer

    def log(self, step: int, **metrics: float) -> None:
        """Append one metrics record (JSONL, flushed at once) and mirror it to TensorBoard."""
        record = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), int(step))

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_json(self, name: str, data: dict[str, Any]) -> Path:
        target = self.path / name
        temporary = target.with_suffix(target.suffix + ".tmp")
        temporary.write_text(json.dumps(data, indent=2, default=float))
        os.replace(temporary, target)
        return target

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
