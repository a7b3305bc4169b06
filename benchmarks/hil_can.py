"""Residual RL with vs without the scripted intervener (HIL-SERL-style takeovers), same base, seeds and env-step
budget: success curve (periodic 50-episode evaluations, which never intervene), final success over 100 episodes
with its interval, env steps to 90%, intervention rate over training (first and last window) and operator steps.

    python benchmarks/hil_can.py                     # can, seeds 0 and 1, configs/residual/can.yaml
    python benchmarks/hil_can.py --seeds=0,1,2 --total_env_steps=60000
    python benchmarks/hil_can.py --from-runs runs/A runs/B ...   # assemble finished runs
    python benchmarks/hil_can.py --total_env_steps=300 --output=/tmp/smoke.json   # a smoke test

Extra ``--key=value`` flags override config fields of both arms (the intervener's too: ``--stall_steps=30``).
Operator steps are env steps: they count against the same budget. Writes ``--output`` (default
benchmarks/results/hil_can.json, and a .png of the curves beside it) after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from common import RESULTS, provenance

from robofinetune.config import parse_overrides, resolve_config
from robofinetune.runs import Run

FIELDS = ("seed", "base_success", "final_success", "final_success_ci", "episodes", "env_steps", "env_steps_to_90",
          "intervention_rate_first", "intervention_rate_last", "operator_steps", "takeovers", "wall_clock_s")


def run_record(run_path: Path, wall_clock: float | None = None) -> dict:
    """One run's figures, from its summary.json and metrics.jsonl."""
    summary = json.loads((run_path / "summary.json").read_text())
    saved = Run.open(run_path).saved_config()
    metrics = Run.open(run_path).metrics()
    record = {key: summary.get(key) for key in FIELDS}
    record["interventions"] = saved.get("intervener", "none") != "none"
    if wall_clock is not None:
        record["wall_clock_s"] = round(wall_clock, 1)
    record["success_curve"] = [[m["step"], m["eval/success"]] for m in metrics if "eval/success" in m]
    # at every episode end (the run's last checkpoint keeps them), finer than the metrics' log_every
    record["intervention_curve"] = [[int(point[0]), float(point[1])] for point in intervention_points(run_path)]
    record["run"] = str(run_path)
    return record


def intervention_points(run_path: Path) -> list:
    """(env steps, intervention rate of the recent episodes, takeovers per episode, episodes) at each episode end."""
    import torch

    state_path = run_path / "checkpoints" / "latest" / "state.pt"
    if not state_path.exists():
        return []
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    return list(state["loop"].get("intervention_points", []))


def compare(records: list[dict]) -> dict:
    """Per arm: mean final success, mean env steps to 90% (runs that never got there counted at their budget)."""
    result = {}
    for arm in (False, True):
        runs = [r for r in records if r["interventions"] == arm]
        if not runs:
            continue
        to_90 = [r["env_steps_to_90"] if r["env_steps_to_90"] is not None else r["env_steps"] for r in runs]
        result["with_interventions" if arm else "without"] = {
            "seeds": [r["seed"] for r in runs],
            "final_success_mean": float(np.mean([r["final_success"] for r in runs])),
            "env_steps_to_90_mean": float(np.mean(to_90)),
            "runs_reaching_90": int(sum(r["env_steps_to_90"] is not None for r in runs)),
            "operator_steps_mean": float(np.mean([r["operator_steps"] or 0 for r in runs])),
        }
    return result


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (success_axes, rate_axes) = plt.subplots(1, 2, figsize=(12, 4))
    for record in records:
        style = "-" if record["interventions"] else "--"
        label = f"seed {record['seed']}, {'with' if record['interventions'] else 'without'} intervener"
        if record["success_curve"]:
            steps, values = zip(*record["success_curve"])
            success_axes.plot(steps, values, style, marker="o", label=label)
        if record["intervention_curve"]:
            steps, values = zip(*record["intervention_curve"])
            rate_axes.plot(steps, values, style, label=label)
    success_axes.set(xlabel="env steps", ylabel="eval success (no intervention)", ylim=(-0.02, 1.02))
    rate_axes.set(xlabel="env steps", ylabel="intervention rate (intervened / steps)", ylim=(-0.02, 1.02))
    for axes in (success_axes, rate_axes):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write(records: list[dict], config: dict | None, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    result = {**provenance(records[0]["seed"] if records else 0), "task": (config or {}).get("task"),
              "method": "residual (ResFiT-style TD3) with vs without the scripted intervener (HIL-SERL-style)",
              "runs": records, "comparison": compare(records), "config": config}
    temporary = output.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=2, default=float))
    os.replace(temporary, output)
    plot(records, output.with_suffix(".png"))
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="can")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--runs-dir", default=None)
    parser.add_argument("--from-runs", nargs="+", help="finished run folders to record instead of training")
    parser.add_argument("--output", default=str(RESULTS / "hil_can.json"))
    args, extra = parser.parse_known_args()
    overrides = parse_overrides(extra)
    output = Path(args.output)

    from robofinetune.algos import residual

    records: list[dict] = []
    config_record = None
    if args.from_runs:
        records = [run_record(Path(path)) for path in args.from_runs]
        config_record = Run.open(args.from_runs[0]).saved_config()
    else:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for intervener in ("none", "scripted"):
                config = resolve_config(residual.Config, "residual",
                                        {**overrides, "task": args.task, "seed": seed, "intervener": intervener})
                run = Run.create("residual", args.task, config, root=args.runs_dir)
                print(f"seed {seed}, intervener {intervener}: run folder {run.path}", flush=True)
                start = time.time()
                residual.train(config, run, resume=False)
                run.close()
                records.append(run_record(run.path, time.time() - start))
                config_record = {key: value for key, value in run.saved_config().items() if key != "intervener"}
                write(records, config_record, output)
    records.sort(key=lambda r: (r["seed"], r["interventions"]))
    write(records, config_record, output)
    for record in records:
        print(f"seed {record['seed']} {'with' if record['interventions'] else 'without'} intervener: base "
              f"{record['base_success']:.0%} -> final {record['final_success']:.0%} {record['final_success_ci']}, "
              f"to 90%: {record['env_steps_to_90']}, operator steps {record['operator_steps']}, intervention rate "
              f"{record['intervention_rate_first']} -> {record['intervention_rate_last']}")


if __name__ == "__main__":
    sys.exit(main())
