"""Residual RL from the weak base: base vs final success (Wilson intervals), env steps to 90% / 95%, wall clock,
for one or more seeds, on can (default) or any task with a preset (``--task=lift``).

    python benchmarks/residual_can.py                          # seed 0, configs/residual/can.yaml
    python benchmarks/residual_can.py --seeds=0,1,2            # three seeds, one after the other
    python benchmarks/residual_can.py --task=lift --seeds=0    # -> results/residual_lift.json
    python benchmarks/residual_can.py --from-runs runs/A runs/B runs/C   # assemble finished runs (any order)
    python benchmarks/residual_can.py --resume runs/A          # finish a killed run, then record it
Extra ``--key=value`` flags override config fields (e.g. ``--base=PATH --total_env_steps=50000``).
Writes benchmarks/results/residual_<task>.json after every seed, so a partial sweep is still recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from common import provenance, write_result

from robofinetune.config import config_from_dict, parse_overrides, resolve_config
from robofinetune.runs import Run

FIELDS = ("base_success", "base_success_ci", "final_success", "final_success_ci", "eval_episodes", "env_steps",
          "env_steps_to_90", "env_steps_to_95", "train_steps_to_90", "train_steps_to_95", "wall_clock_s", "seed")


def run_record(run_path: Path, wall_clock: float | None = None) -> dict:
    summary = json.loads((run_path / "summary.json").read_text())
    run_info = json.loads((run_path / "run.json").read_text())
    record = {key: summary.get(key) for key in FIELDS}
    if wall_clock is not None:
        record["wall_clock_s"] = round(wall_clock, 1)  # the whole command: demo relabelling and evals included
    record.update(run=str(run_path), commit=run_info.get("commit"), command=run_info.get("command"),
                  critic_updates=summary.get("critic_updates"))
    return record


def aggregate(records: list[dict]) -> dict:
    finals = np.array([r["final_success"] for r in records], dtype=float)
    bases = np.array([r["base_success"] for r in records if r["base_success"] is not None], dtype=float)
    reached = [r["env_steps_to_95"] for r in records]
    return {
        "seeds": [r["seed"] for r in records],
        "final_success_mean": float(finals.mean()), "final_success_std": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
        "final_success_min": float(finals.min()), "final_success_max": float(finals.max()),
        "base_success_mean": float(bases.mean()) if len(bases) else None,
        "env_steps_to_95": reached, "env_steps_to_90": [r["env_steps_to_90"] for r in records],
        "seeds_reaching_95": int(sum(value is not None for value in reached)),
        "wall_clock_s_mean": float(np.mean([r["wall_clock_s"] for r in records])),
    }


def write(task: str, records: list[dict], config: dict | None, note: str | None = None) -> None:
    best_first = records[0]
    result = {
        **provenance(best_first["seed"]),
        "task": task, "method": "residual (ResFiT-style TD3, frozen base + per-step residual)",
        **{key: best_first[key] for key in FIELDS},
        "commit": best_first.get("commit") or provenance(0)["commit"],
        "target": "final_success >= 0.95 over >= 100 episodes within 100k env steps (can)",
        "seeds": records, "spread": aggregate(records), "config": config,
    }
    if note:
        result["note"] = note
    result["command"] = " ".join(["python", *sys.argv])
    write_result(f"residual_{task}.json", result)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="can")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--runs-dir", default=None)
    parser.add_argument("--from-runs", nargs="+", help="finished run folders to record instead of training")
    parser.add_argument("--resume", help="finish this killed run (from its last checkpoint), then record it")
    parser.add_argument("--note", help="what a reader must know about these runs (stored in the result)")
    args, extra = parser.parse_known_args()
    overrides = parse_overrides(extra)

    from robofinetune.algos import residual

    records: list[dict] = []
    config_record = None
    if args.from_runs:
        for path in args.from_runs:
            records.append(run_record(Path(path)))
        config_record = Run.open(args.from_runs[0]).saved_config()
    elif args.resume:
        run = Run.open(args.resume)
        config = config_from_dict(residual.Config, run.saved_config(), str(run.path / "config.yaml"))
        residual.train(config, run, resume=True)
        run.close()
        records.append(run_record(run.path))
        config_record = run.saved_config()
    else:
        for seed in [int(s) for s in args.seeds.split(",")]:
            config = resolve_config(residual.Config, "residual", {**overrides, "task": args.task, "seed": seed})
            run = Run.create("residual", args.task, config, root=args.runs_dir)
            print(f"seed {seed}: run folder {run.path}")
            start = time.time()
            residual.train(config, run, resume=False)
            run.close()
            records.append(run_record(run.path, time.time() - start))
            config_record = run.saved_config()
            write(args.task, records, config_record)
    records.sort(key=lambda r: r["seed"])
    write(args.task, records, config_record, args.note)
    for record in records:
        print(f"seed {record['seed']}: base {record['base_success']:.0%} -> final {record['final_success']:.0%} "
              f"{record['final_success_ci']} ({record['eval_episodes']} ep), to 95%: {record['env_steps_to_95']}, "
              f"{record['wall_clock_s']:.0f} s")


if __name__ == "__main__":
    main()
