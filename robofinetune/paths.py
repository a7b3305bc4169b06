"""Where the project's folders are. A source checkout is the default home; ROBOFINETUNE_HOME overrides it."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The folder holding configs/, envs/, datasets/, policies/ (the repo root for an editable install)."""
    if os.environ.get("ROBOFINETUNE_HOME"):
        return Path(os.environ["ROBOFINETUNE_HOME"]).resolve()
    return Path(__file__).resolve().parents[1]


def configs_dir() -> Path:
    return project_root() / "configs"


def task_specs_dir() -> Path:
    return project_root() / "envs"


def datasets_dir() -> Path:
    return project_root() / "datasets"


def policies_dir() -> Path:
    return project_root() / "policies"


def runs_dir() -> Path:
    return Path(os.environ.get("ROBOFINETUNE_RUNS", Path.cwd() / "runs"))
