"""OGPO vs DPPO vs residual RL from the same weak base, at the same env-step budget.

For every base (diffusion and, when shipped, flow) it runs ``train ogpo``, ``train ogpo --mode=dppo`` and
(unless ``--methods`` leaves it out) ``train residual`` with the task's presets, then reports per method the
final success over ``--eval-episodes`` episodes with its 95% Wilson interval, ``env_steps_to_90``,
``wall_clock_s`` and the eval curve; and per base the ratio of env steps DPPO and OGPO need to reach the
same success (the best success both reach, DPPO's success at the budget, and 90%).

    python benchmarks/ogpo_can.py                                   # can, 300k env steps each (hours on 2 cores)
    python benchmarks/ogpo_can.py --task=pointmass --make-bases     # the fast task, poor bases trained here
    python benchmarks/ogpo_can.py --bases diffusion=policies/can/weak_diffusion flow=runs/.../policy
    python benchmarks/ogpo_can.py --reuse ogpo:diffusion=runs/A dppo:diffusion=runs/B residual:diffusion=runs/C
        # assemble finished runs (e.g. `robofinetune train ogpo --task=can` continued with --resume) instead of
        # training those method/base pairs here
Writes benchmarks/results/ogpo_can.json, other tasks ogpo_methods_<task>.json (rewritten after every run, so a long
benchmark keeps its progress).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import eval_curve, provenance, write_result

METHODS = ("ogpo", "dppo", "residual")
# also available: "bc_only" (OGPO with pg_coef=0: the success-buffer BC term alone, to see what PPO adds)


def steps_to(curve: list[tuple[int, str, float]], threshold: float) -> int | None:
    for steps, label, success in curve:
        if label != "base" and success >= threshold - 1e-9:
            return steps
    return None


def make_poor_bases(task: str, seed: int, root: Path) -> tuple[dict[str, str], Path]:
    """Under-trained diffusion and flow policies from 10 scripted demos (the pointmass stand-in for the shipped
    weak can bases), and those demos: the fine-tuning runs get the same data the bases saw, no more."""
    from robofinetune.algos.bc import BCConfig, train_bc
    from robofinetune.data.collect import collect_episodes
    from robofinetune.data.io import save_dataset
    from robofinetune.runs import Run

    demos = root / f"{task}_scripted_10.hdf5"
    if not demos.exists():
        save_dataset(collect_episodes(task, 10, source="scripted", seed=1), demos, env_meta={"env_name": task, "task": task})
    bases = {}
    # BC steps per kind chosen so both start poor on pointmass (diffusion ~40%, flow ~30%; flow learns this task
    # faster: 300 steps already give it 97%).
    for kind, steps in (("diffusion", 300), ("flow", 180)):
        config = BCConfig(task=task, policy=kind, dataset=str(demos), max_steps=steps, batch_size=128, hidden_dim=128,
                          depth=2, n_obs_steps=1, horizon=4, n_action_steps=2, eval_episodes=0,
                          warmup_steps=min(100, steps // 2), checkpoint_every=10_000, learning_rate=1e-3, seed=seed)
        bases[kind] = train_bc(config, Run.create("bc", task, config, root=root / "runs"), progress=False)["policy_path"]
    return bases, demos


def record_from_run(run_path: Path) -> dict[str, Any]:
    """The figures of a finished ``train ogpo`` / ``train residual`` run folder."""
    summary = json.loads((run_path / "summary.json").read_text())
    curve = eval_curve(run_path)
    return {"run": str(run_path), "final_success": summary["final_success"],
            "final_success_ci": summary["final_success_ci"], "eval_episodes": summary["eval_episodes"],
            "base_success": summary.get("base_success"), "base_success_ci": summary.get("base_success_ci"),
            "env_steps": summary["env_steps"], "env_steps_to_90": steps_to(curve, 0.9),
            "wall_clock_s": summary["wall_clock_s"], "curve": curve}


def record_from_residual_result(path: Path, seed: int, base: str) -> dict[str, Any] | None:
    """The residual row from ``benchmarks/residual_can.py``'s result for ``seed`` (same base, same eval seeds),
    or None when its runs started from another base; its run folder may be gone, so there is no curve, only
    the first env steps at 90% and 95% it logged."""
    result = json.loads(path.read_text())
    if Path(result.get("config", {}).get("base") or "weak_diffusion").name != Path(base).name:
        return None
    entry = next((entry for entry in result["seeds"] if entry["seed"] == seed), None)
    if entry is None:
        raise SystemExit(f"{path}: no entry for seed {seed}")
    keys = ("final_success", "final_success_ci", "eval_episodes", "base_success", "base_success_ci", "env_steps",
            "env_steps_to_90", "env_steps_to_95", "wall_clock_s", "run", "commit")
    return {**{key: entry.get(key) for key in keys}, "curve": None, "source": str(path)}


def run_method(method: str, task: str, base: str, budget: int, seed: int, eval_episodes: int, runs: Path,
               extra: dict[str, Any], preset: str | Path | None = None) -> dict[str, Any]:
    """Train ``method`` from ``base`` in a new run folder under ``runs`` and return its record; ``preset``: a
    YAML of config fields applied after the task preset and before the overrides (``--config`` of the CLI)."""
    import importlib

    from robofinetune.config import resolve_config
    from robofinetune.runs import Run

    module_name = "residual" if method == "residual" else "ogpo"
    module = importlib.import_module(f"robofinetune.algos.{module_name}")
    overrides = {"task": task, "base": base, "seed": seed, "total_env_steps": budget,
                 "final_eval_episodes": eval_episodes, "progress": False, **extra}
    if method == "dppo":
        overrides["mode"] = "dppo"
    if method == "bc_only":
        overrides["pg_coef"] = 0.0
    config = resolve_config(module.Config, module_name, overrides, extra_preset=preset)
    run = Run.create(module_name, task, config, root=runs)
    print(f"--- {method} from {base}: {run.path}", flush=True)
    module.train(config, run, resume=False)
    run.close()
    return record_from_run(run.path)


def compare(ogpo: dict[str, Any], dppo: dict[str, Any], budget: int) -> dict[str, Any]:
    """Env steps OGPO and DPPO need to reach the same success: the best success both reach (the lower of the
    two curves' maxima), DPPO's success at the budget when it is above the base, and 90%. A method that never
    reaches a level is reported as '> budget', and the ratio as a lower bound."""
    def best(curve: list[tuple[int, str, float]]) -> float:
        return max((success for _, label, success in curve if label != "base"), default=0.0)

    levels = {"at_common_best": min(best(ogpo["curve"]), best(dppo["curve"])), "at_90": 0.9}
    base = ogpo.get("base_success") if ogpo.get("base_success") is not None else dppo.get("base_success")
    notes = {}
    if base is not None and levels["at_common_best"] <= base + 1e-9:
        # a level at or below the base is a decline both share, not a speed of improvement: no ratio from it
        notes["at_common_best"] = (f"one method never rose above the base ({base:.0%}): best {best(ogpo['curve']):.0%} "
                                   f"(ogpo), {best(dppo['curve']):.0%} (dppo); no ratio")
        del levels["at_common_best"]
    if dppo["base_success"] is None or dppo["final_success"] > dppo["base_success"]:
        levels["at_dppo_final_success"] = dppo["final_success"]
    out = {}
    for name, threshold in levels.items():
        ogpo_steps, dppo_steps = steps_to(ogpo["curve"], threshold), steps_to(dppo["curve"], threshold)
        entry: dict[str, Any] = {"success": threshold, "ogpo_env_steps": ogpo_steps, "dppo_env_steps": dppo_steps}
        if ogpo_steps and dppo_steps:
            entry["dppo_over_ogpo"] = dppo_steps / ogpo_steps
        elif ogpo_steps and not dppo_steps:
            entry["dppo_over_ogpo_at_least"] = budget / ogpo_steps
            entry["dppo_env_steps"] = f"> {budget}"
        out[name] = entry
    return {**out, **notes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="can")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=None, help="env steps per method (default: can 300k, else the preset)")
    parser.add_argument("--eval-episodes", type=int, default=100, help="final evaluation episodes")
    parser.add_argument("--bases", nargs="*", default=None, help="kind=path pairs (default: policies/<task>/weak_*)")
    parser.add_argument("--make-bases", action="store_true", help="train poor diffusion and flow bases here first")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for all methods, key=value")
    parser.add_argument("--reuse", nargs="*", default=[], help="method:kind=RUN_DIR, a finished run to record as is")
    parser.add_argument("--residual-results", default=None,
                        help="take the residual row from a residual_can.py result (its --seed entry) instead of a run")
    parser.add_argument("--only-reuse", action="store_true",
                        help="train nothing: the table holds only the --reuse runs and --residual-results")
    parser.add_argument("--carry", default=None,
                        help="an earlier ogpo_<task>.json whose rows this run does not re-record are kept (their "
                             "run folders may be gone); a row whose method is re-recorded is kept as <method>_previous")
    parser.add_argument("--note", default="", help="free text stored with the result (how the runs were made)")
    parser.add_argument("--runs-dir", default=str(Path(__file__).resolve().parent / "runs"))
    args = parser.parse_args()

    import yaml

    from robofinetune.paths import policies_dir

    runs = Path(args.runs_dir) / f"ogpo_{args.task}"
    runs.mkdir(parents=True, exist_ok=True)
    extra = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    if args.make_bases:
        bases, demos = make_poor_bases(args.task, args.seed, runs)
        extra.setdefault("dataset", str(demos))
    elif args.bases:
        bases = dict(pair.split("=", 1) for pair in args.bases)
    else:
        bases = {kind: str(policies_dir() / args.task / f"weak_{kind}") for kind in ("diffusion", "flow")
                 if (policies_dir() / args.task / f"weak_{kind}" / "policy.json").exists()}
    if not bases:
        raise SystemExit(f"no base policies: none under {policies_dir() / args.task}; pass --bases or --make-bases")
    budget = args.budget or (300_000 if args.task == "can" else _preset_budget(args.task))
    methods = [method for method in args.methods.split(",") if method]
    reuse = {tuple(key.split(":", 1)): Path(value) for key, value in (item.split("=", 1) for item in args.reuse)}

    result: dict[str, Any] = {"task": args.task, **provenance(args.seed), "budget_env_steps": budget,
                              "eval_episodes": args.eval_episodes, "overrides": extra, "bases": {}}
    if args.note:
        result["note"] = args.note
    # ogpo_pointmass.json belongs to benchmarks/ogpo_pointmass.py (seeds to 90%): other tasks get their own stem
    stem = "ogpo_can" if args.task == "can" else f"ogpo_methods_{args.task}"
    name = f"{stem}.json"
    carried = json.loads(Path(args.carry).read_text()) if args.carry else None
    if carried:
        result["carried_from"] = {"file": args.carry, "commit": carried["commit"], "date": carried["date"],
                                  "note": carried.get("note", "")}
    for kind, base in bases.items():
        entry: dict[str, Any] = {"path": base, "methods": {}}
        result["bases"][kind] = entry
        if carried and kind in carried["bases"]:
            recorded_now = {method for method in methods if (method, kind) in reuse}
            for method, summary in carried["bases"][kind]["methods"].items():
                name_here = f"{method}_previous" if method in recorded_now else method
                entry["methods"][name_here] = {**summary, "carried": True}
        for method in methods:
            summary = None
            if (method, kind) in reuse:
                summary = record_from_run(reuse[(method, kind)])
            elif method == "residual" and args.residual_results:
                summary = record_from_residual_result(Path(args.residual_results), args.seed, base)
            if summary is None:
                if args.only_reuse or method not in (*METHODS, "bc_only"):
                    continue   # a variant (or, with --only-reuse, any method) is only recorded from a given run
                summary = run_method(method, args.task, base, budget, args.seed, args.eval_episodes, runs, extra)
            entry["methods"][method] = summary
            low, high = summary["final_success_ci"]
            print(f"{kind} base, {method}: success {summary['final_success']:.1%} [{low:.1%}, {high:.1%}] after "
                  f"{summary['env_steps']} env steps, to 90%: {summary['env_steps_to_90']}, "
                  f"{summary['wall_clock_s']:.0f} s", flush=True)
            if "ogpo" in entry["methods"] and "dppo" in entry["methods"]:
                ogpo, dppo = entry["methods"]["ogpo"], entry["methods"]["dppo"]
                # reused runs may have had a smaller budget than --budget: compare at the budget both ran
                entry["ogpo_vs_dppo"] = compare(ogpo, dppo, min(budget, ogpo["env_steps"], dppo["env_steps"]))
            result["table"] = _table(result)
            write_result(name, result)
    for row in result["table"]:
        print(row)
    plot_curves(result, Path(__file__).resolve().parent / "results" / f"{stem}.png")


def plot_curves(result: dict[str, Any], path: Path) -> None:
    """Success vs env steps, one panel per base: every evaluation of each method (periodic ones are 50
    episodes, base and final 100), residual as its final point when only its summary is known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = result["bases"]
    methods = sorted({method for entry in bases.values() for method in entry["methods"]})
    colours = {method: f"C{index}" for index, method in enumerate(methods)}   # one colour per method in all panels
    figure, axes = plt.subplots(1, len(bases), figsize=(6 * len(bases), 4), squeeze=False)
    for axis, (kind, entry) in zip(axes[0], bases.items()):
        for method, summary in entry["methods"].items():
            colour = colours[method]
            if summary.get("curve"):
                steps, _, success = zip(*summary["curve"])
                axis.plot(steps, success, marker="o", color=colour, label=method)
            else:
                axis.errorbar([summary["env_steps"]], [summary["final_success"]], fmt="s", color=colour,
                              label=f"{method} (final)",
                              yerr=[[summary["final_success"] - summary["final_success_ci"][0]],
                                    [summary["final_success_ci"][1] - summary["final_success"]]])
                if summary.get("env_steps_to_90"):
                    axis.plot([summary["env_steps_to_90"]], [0.9], marker="x", markersize=9, color=colour,
                              linestyle="none", label=f"{method} first >= 90%")
        axis.axhline(0.9, color="grey", linestyle=":", linewidth=1)
        axis.set(title=f"{result['task']}, {kind} base", xlabel="env steps", ylabel="success", ylim=(0, 1.02))
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"wrote {path}")


def _preset_budget(task: str) -> int:
    from robofinetune.algos.ogpo import OGPOConfig
    from robofinetune.config import resolve_config

    return resolve_config(OGPOConfig, "ogpo", {"task": task}).total_env_steps


def _table(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for kind, entry in result["bases"].items():
        for method, summary in entry["methods"].items():
            rows.append({"base": kind, "method": method, "base_success": summary["base_success"],
                         "final_success": summary["final_success"], "final_success_ci": summary["final_success_ci"],
                         "env_steps": summary["env_steps"], "env_steps_to_90": summary["env_steps_to_90"],
                         "wall_clock_s": summary["wall_clock_s"]})
    return rows


if __name__ == "__main__":
    main()
