"""Shared by the RL and robot tests: a small pointmass BC base trained from scripted demos in seconds."""

from __future__ import annotations

from pathlib import Path

from robofinetune.algos.bc import BCConfig, train_bc
from robofinetune.data.collect import collect_episodes
from robofinetune.data.io import save_dataset
from robofinetune.runs import Run


def train_pointmass_base(folder: Path, demos: int, seed: int = 0, **config: object) -> tuple[Path, Path]:
    """(policy folder, demos file): ``demos`` scripted pointmass episodes and a diffusion BC policy on them, with
    the ``BCConfig`` fields in ``config`` (no evaluation, no checkpoints, CPU)."""
    dataset = save_dataset(collect_episodes("pointmass", demos, seed=seed, progress=False), folder / "demos.hdf5",
                           env_meta={"env_name": "pointmass", "task": "pointmass"})
    bc = BCConfig(task="pointmass", dataset=str(dataset), eval_episodes=0, checkpoint_every=10**9, accelerator="cpu",
                  **config)
    run = Run.create("bc", "pointmass", bc, root=folder / "runs")
    train_bc(bc, run, progress=False)
    return run.path / "policy", dataset
