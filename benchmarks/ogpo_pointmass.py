"""OGPO vs DPPO on pointmass, where whole learning curves fit: env steps to 90% success, 3 seeds each.

Both methods start from the same weak flow base (BC for 180 steps on 10 scripted demos, ~30% success; made once
by ``ogpo_can.make_poor_bases`` and shared by every run, or ``--base``). OGPO runs the reference-style actor update
(``configs/ogpo/pointmass_reference.yaml``: EMA target actor, one ratio per chain, tapered flow noise, BC on online
successes, conservative advantage from the target critic); DPPO runs DPPO's recipe scaled to the task
(``configs/ogpo/pointmass_dppo.yaml``: 20k-env-step iterations, 10 epochs, lr 1e-5, clip 0.001-0.01). Every
evaluation is ``--eval-episodes`` (>= 100) deterministic episodes. Per run: the first evaluation at >= 90%
(``env_steps_to_90``, null if not within its budget), the final success with its 95% interval, the curve and the
wall clock; per method the median over seeds; and the paper's claim as ``ogpo_over_dppo_env_steps_ratio`` =
median DPPO env steps / median OGPO env steps (~10x claimed, >= 5x the target). A median that rests on runs
that never reached 90% uses their budget and makes the ratio a bound (``ratio_bound``).

DPPO's policy changes only at the end of an iteration, and its evaluation at a multiple of
``dppo.steps_per_iteration`` runs before that iteration's update: the policy it scores was trained on one
iteration fewer. ``env_steps_to_90`` is the step the evaluation was logged at; for DPPO the ratio uses
``env_steps_to_90_trained``, the env steps the evaluated policy had learned from (the smaller, DPPO's favour).

    python benchmarks/ogpo_pointmass.py                       # 3 seeds x {ogpo, dppo} -> results/ogpo_pointmass.json
    python benchmarks/ogpo_pointmass.py --seeds 0 --methods ogpo --budget-ogpo 20000
    python benchmarks/ogpo_pointmass.py --reuse ogpo:0=benchmarks/runs/ogpo_pointmass_seeds/ogpo_seed0/<run>
    python benchmarks/ogpo_pointmass.py --set dppo:dppo.actor_lr=1e-4       # a config override for one method

Resumable: the JSON is rewritten after every run; run again with the same arguments and the (method, seed)
pairs already recorded with their run folder present are skipped, an unfinished run folder is resumed from its
last checkpoint (``train(resume=True)``, what ``robofinetune train ogpo --resume`` does), the rest are trained.
Run folders: ``<runs-dir>/<method>_seed<seed>/<time>_ogpo_pointmass``; the base under ``<runs-dir>/bases``.

Wall clock, measured on the 2-core VM at nice 19 beside another training job (tiny runs, so rough): OGPO trains at
~40-75 s per 1k env steps (one actor step per chunk, one TD step + one success TD step per chunk transition),
up to ~4 min per 1k when the machine is loaded further; DPPO at ~3-9 s per 1k (iterations of 1-2k env steps);
one 100-episode evaluation takes ~20-55 s. At the defaults (OGPO 30k env steps, an evaluation every 1k; DPPO
300k, one per 20k) that is ~45 min (OGPO) and ~1 h (DPPO) per seed, ~5 h for 3 seeds x 2 methods with the CPU
shared as measured. Every run records ``train_seconds_per_1k_env_steps`` and ``eval_seconds_each``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from common import RESULTS, provenance, write_result
from ogpo_can import make_poor_bases, record_from_run, run_method

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs" / "ogpo"
PRESETS = {"ogpo": CONFIGS / "pointmass_reference.yaml", "dppo": CONFIGS / "pointmass_dppo.yaml"}
TASK = "pointmass"
THRESHOLD = 0.9


def run_folder(runs: Path, method: str, seed: int) -> Path | None:
    """The newest run folder of (method, seed), or None."""
    folder = runs / f"{method}_seed{seed}"
    if not folder.exists():
        return None
    found = sorted(path for path in folder.glob("*_ogpo_*") if (path / "config.yaml").exists())
    return found[-1] if found else None


def resume_run(run_path: Path, budget: int) -> dict[str, Any]:
    """Continue an unfinished run folder from its last checkpoint (the CLI's ``--resume``), to ``budget``."""
    from robofinetune.algos import ogpo
    from robofinetune.config import config_from_dict
    from robofinetune.runs import Run

    run = Run.open(run_path)
    config = config_from_dict(ogpo.Config, {**run.saved_config(), "total_env_steps": budget, "progress": False},
                              str(run_path / "config.yaml"))
    run.save_config(config)
    print(f"--- resuming {run_path}", flush=True)
    ogpo.train(config, run, resume=True)
    run.close()
    return record_from_run(run_path)


def trained_steps(steps: int | None, iteration: int | None, budget: int) -> int | None:
    """DPPO: env steps the policy scored at an evaluation logged at ``steps`` had learned from (an evaluation at a
    multiple of the iteration runs before that iteration's update; the final one after the last update)."""
    if steps is None or not iteration or steps >= budget:
        return steps
    return (steps - 1) // iteration * iteration


def seed_record(method: str, seed: int, summary: dict[str, Any], budget: int) -> dict[str, Any]:
    record = {"method": method, "seed": seed, "run": summary["run"], "env_steps_to_90": summary["env_steps_to_90"],
              "budget": budget, "env_steps": summary["env_steps"], "base_success": summary["base_success"],
              "final_success": summary["final_success"], "final_success_ci": summary["final_success_ci"],
              "eval_episodes": summary["eval_episodes"], "wall_clock_s": summary["wall_clock_s"],
              "curve": summary["curve"]}
    points = json.loads((Path(summary["run"]) / "summary.json").read_text()).get("eval_points", [])
    # periodic evaluations run inside the run's wall clock (the base and final ones outside it)
    record["eval_seconds"] = round(sum(point.get("seconds", 0.0) for point in points if point["label"] == "eval"), 1)
    record["eval_seconds_each"] = [round(point.get("seconds", 0.0), 1) for point in points]
    record["train_seconds_per_1k_env_steps"] = round(
        1000 * (summary["wall_clock_s"] - record["eval_seconds"]) / max(summary["env_steps"], 1), 1)
    if method == "dppo":
        config = _saved_config(Path(summary["run"]))
        iteration = config.get("dppo", {}).get("steps_per_iteration")
        record["steps_per_iteration"] = iteration
        record["env_steps_to_90_trained"] = trained_steps(summary["env_steps_to_90"], iteration, summary["env_steps"])
    return record


def _saved_config(run_path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((run_path / "config.yaml").read_text()) or {}


def censored_median(values: list[int | None], budget: int) -> tuple[float | None, bool]:
    """Median of env steps with runs that never reached 90% counted at their budget, and whether that median
    is only a lower bound (half or more of the runs never reached it)."""
    if not values:
        return None, False
    missing = sum(value is None for value in values)
    median = statistics.median([budget if value is None else value for value in values])
    return float(median), 2 * missing >= len(values)


def aggregate(result: dict[str, Any], budgets: dict[str, int]) -> None:
    per_method: dict[str, Any] = {}
    for method in ("ogpo", "dppo"):
        rows = [row for row in result["seeds"] if row["method"] == method]
        if not rows:
            continue
        key = "env_steps_to_90_trained" if method == "dppo" else "env_steps_to_90"
        budget = max([row["env_steps"] for row in rows] + [budgets[method]])
        median, censored = censored_median([row.get(key, row["env_steps_to_90"]) for row in rows], budget)
        per_method[method] = {
            "seeds": len(rows), "reached_90": sum(row["env_steps_to_90"] is not None for row in rows),
            "median_env_steps_to_90": median, "median_is_lower_bound": censored, "median_of": key,
            "median_final_success": statistics.median(row["final_success"] for row in rows),
            "median_wall_clock_s": statistics.median(row["wall_clock_s"] for row in rows)}
    result["methods"] = per_method
    result["ogpo_over_dppo_env_steps_ratio"] = None
    result.pop("ratio_bound", None)
    if "ogpo" in per_method and "dppo" in per_method:
        ogpo, dppo = per_method["ogpo"], per_method["dppo"]
        if ogpo["median_is_lower_bound"] and dppo["median_is_lower_bound"]:
            result["ratio_bound"] = "none: neither method's median seed reached 90% within its budget"
        elif ogpo["median_env_steps_to_90"]:
            result["ogpo_over_dppo_env_steps_ratio"] = dppo["median_env_steps_to_90"] / ogpo["median_env_steps_to_90"]
            if dppo["median_is_lower_bound"]:
                result["ratio_bound"] = "lower bound: DPPO's median seed did not reach 90%; its budget stands in"
            elif ogpo["median_is_lower_bound"]:
                result["ratio_bound"] = "upper bound: OGPO's median seed did not reach 90%; its budget stands in"
            else:
                missed = {m: e["seeds"] - e["reached_90"] for m, e in per_method.items() if e["seeds"] > e["reached_90"]}
                result["ratio_bound"] = "exact" + (f": the median seeds reached 90%; seeds that did not (counted at "
                                                   f"their budget): {missed}" if missed else "")


def plot_curves(result: dict[str, Any], path: Path) -> None:
    """Success vs env steps of every run, one colour per method, one line style per seed; 90% dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ogpo": "C0", "dppo": "C1"}
    styles = ["-", "--", ":", "-."]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    for axis, log_x in zip(axes, (False, True)):
        for index, row in enumerate(result["seeds"]):
            if not row.get("curve"):
                continue
            points = [point for point in row["curve"] if point[0] > 0 or not log_x]   # log axis: no base point
            if not points:
                continue
            steps, _, success = zip(*points)
            axis.plot(steps, success, marker="o", markersize=3,
                      color=colours.get(row["method"], f"C{index}"), linestyle=styles[row["seed"] % len(styles)],
                      label=f"{row['method']} seed {row['seed']}")
        axis.axhline(THRESHOLD, color="grey", linestyle=":", linewidth=1)
        axis.set(title=f"pointmass, flow base{' (log env steps, no base point)' if log_x else ''}", xlabel="env steps",
                 ylabel=f"success ({result['eval_episodes']} episodes)", ylim=(0, 1.02))
        if log_x:
            axis.set_xscale("log")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"wrote {path}")


def write(result: dict[str, Any], output: Path) -> None:
    if output.parent.resolve() == RESULTS.resolve():
        write_result(output.name, result)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=2, default=float))
    os.replace(temporary, output)
    print(f"wrote {output}")


def shared_base(runs: Path, seed: int) -> str:
    """The weak flow base every run starts from: made once under ``<runs>/bases`` and reused after."""
    marker = runs / "bases" / "flow_base.json"
    if marker.exists():
        path = json.loads(marker.read_text())["flow"]
        if (Path(path) / "policy.json").exists():
            return path
    bases, _ = make_poor_bases(TASK, seed, runs / "bases")
    marker.write_text(json.dumps({"flow": str(bases["flow"]), "diffusion": str(bases["diffusion"])}, indent=2))
    return str(bases["flow"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", default="ogpo,dppo")
    parser.add_argument("--budget-ogpo", type=int, default=30_000, help="env steps per OGPO run")
    parser.add_argument("--budget-dppo", type=int, default=300_000, help="env steps per DPPO run")
    parser.add_argument("--eval-episodes", type=int, default=100, help="episodes of every evaluation (>= 100)")
    parser.add_argument("--eval-every", type=int, default=None, help="OGPO's env steps between evaluations "
                        "(default: the preset's, 1000)")
    parser.add_argument("--eval-every-dppo", type=int, default=None, help="DPPO's (default: the preset's, one "
                        "iteration; the policy changes only between iterations)")
    parser.add_argument("--base", default=None, help="the flow base (default: made once by make_poor_bases)")
    parser.add_argument("--base-seed", type=int, default=0, help="seed of the BC run that makes the default base")
    parser.add_argument("--reuse", nargs="*", default=[], help="method:seed=RUN_DIR, a finished run to record as is")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, key=value (both methods) or "
                        "method:key=value")
    parser.add_argument("--runs-dir", default=str(HERE / "runs" / "ogpo_pointmass_seeds"))
    parser.add_argument("--output", default=str(RESULTS / "ogpo_pointmass.json"))
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    if args.eval_episodes < 100:
        print(f"warning: {args.eval_episodes} episodes per evaluation; the benchmark's figure needs >= 100")

    import yaml

    runs, output = Path(args.runs_dir).resolve(), Path(args.output).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    methods = [method for method in args.methods.split(",") if method]
    unknown = set(methods) - set(PRESETS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {sorted(PRESETS)}")
    budgets = {"ogpo": args.budget_ogpo, "dppo": args.budget_dppo}
    overrides: dict[str, dict[str, Any]] = {method: {"eval_episodes": args.eval_episodes} for method in PRESETS}
    for method, every in (("ogpo", args.eval_every), ("dppo", args.eval_every_dppo)):
        if every:
            overrides[method]["eval_every"] = every
    for item in args.set:
        key, value = item.split("=", 1)
        scope, _, key = key.rpartition(":")
        for method in ([scope] if scope else PRESETS):
            overrides[method][key] = yaml.safe_load(value)
    reuse = {}
    for item in args.reuse:
        key, path = item.split("=", 1)
        method, seed = key.split(":", 1)
        reuse[(method, int(seed))] = Path(path)

    previous = json.loads(output.read_text()) if output.exists() else {}
    base = args.base or shared_base(runs, args.base_seed)
    result: dict[str, Any] = {
        "task": TASK, **provenance(args.seeds[0]), "seeds_run": args.seeds, "base": base,
        "base_made_here": args.base is None, "presets": {m: str(PRESETS[m].relative_to(HERE.parent)) for m in methods},
        "budget_env_steps": {m: budgets[m] for m in methods}, "eval_episodes": args.eval_episodes,
        "overrides": {m: overrides[m] for m in methods}, "threshold": THRESHOLD, "runs_dir": str(runs), "seeds": []}
    if args.note:
        result["note"] = args.note
    # rows already recorded (run folder still there) are kept: a rerun only adds what is missing
    kept = {(row["method"], row["seed"]): row for row in previous.get("seeds", [])
            if previous.get("base") == base and Path(row["run"]).exists()}
    # a recorded run with a smaller budget than asked is extended (resumed to the new budget), not kept as is
    skip = {key for key, row in kept.items() if key[0] not in budgets or row["env_steps"] >= budgets[key[0]]}
    for seed in args.seeds:
        for method in methods:
            key = (method, seed)
            started = time.time()
            if key in reuse:
                row = seed_record(method, seed, record_from_run(reuse[key]), budgets[method])
                row["reused"] = True
            elif key in skip:
                row = kept[key]
                print(f"{method} seed {seed}: recorded in {output.name} ({row['run']}), skipped")
            else:
                folder = run_folder(runs, method, seed)
                finished = folder is not None and (folder / "summary.json").exists() and \
                    json.loads((folder / "summary.json").read_text())["env_steps"] >= budgets[method]
                if finished:
                    summary = record_from_run(folder)
                elif folder is not None:   # unfinished, or finished with a smaller budget: go on to this one
                    summary = resume_run(folder, budgets[method])
                else:
                    summary = run_method(method, TASK, base, budgets[method], seed, args.eval_episodes,
                                         runs / f"{method}_seed{seed}", overrides[method], preset=PRESETS[method])
                row = seed_record(method, seed, summary, budgets[method])
                row["benchmark_wall_clock_s"] = round(time.time() - started, 1)
            result["seeds"] = [r for r in result["seeds"] if (r["method"], r["seed"]) != key] + [row]
            aggregate(result, budgets)
            write(result, output)
            low, high = row["final_success_ci"]
            print(f"{method} seed {seed}: to 90% {row['env_steps_to_90']} env steps, final {row['final_success']:.0%} "
                  f"[{low:.0%}, {high:.0%}], {row['wall_clock_s']:.0f} s", flush=True)
    # rows of seeds this invocation did not ask for stay in the file
    asked = {(method, seed) for seed in args.seeds for method in methods}
    result["seeds"] += [row for key, row in kept.items() if key not in asked]
    aggregate(result, budgets)
    write(result, output)
    for method, entry in result.get("methods", {}).items():
        print(f"{method}: median env steps to 90% {entry['median_env_steps_to_90']} "
              f"({'lower bound, ' if entry['median_is_lower_bound'] else ''}{entry['reached_90']}/{entry['seeds']} "
              f"seeds reached 90%)")
    print(f"ogpo_over_dppo_env_steps_ratio: {result['ogpo_over_dppo_env_steps_ratio']} ({result.get('ratio_bound')})")
    plot_curves(result, output.with_suffix(".png"))


if __name__ == "__main__":
    main()
