"""Consistency distillation on can: does a one-step student keep its teacher's success at a tenth of its latency?

For every teacher (default: policies/<task>/strong_diffusion and every fine-tuned policy found there, i.e. a
folder whose name contains "residual" or "ogpo"):
  - distil it with the task preset (configs/distill/<task>.yaml) and time the whole distillation (teacher
    rollouts + training) on this CPU;
  - evaluate teacher and 1-step student on the same eval seeds (>= 100 episodes each, Wilson intervals, and a
    Newcombe interval for the difference); optionally the 2- and 4-step student too;
  - measure latency per action chunk (act(), batch 1, one thread, steady state, interleaved rounds so that every
    variant sees the same machine load): teacher DDIM-10 and DDPM-100 (flow: Euler-10 / Euler-100), student 1/2/4 steps;
    and throughput in chunks/s at batch 64.

    python benchmarks/distill_can.py                                   # can, default teachers
    python benchmarks/distill_can.py --teachers strong=policies/can/strong_diffusion residual=runs/.../policy
    python benchmarks/distill_can.py --task=pointmass                  # trains its own diffusion + flow teachers
    python benchmarks/distill_can.py --students strong=runs/.../policy # reuse a distilled student (no training)
Writes benchmarks/results/distill_<task>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import cached_evaluation, provenance, write_result
from robofinetune.images import is_image_key


# --- latency ---------------------------------------------------------------------------------------------------------

def _configure(policy, variant: dict[str, Any]) -> None:
    """Point the policy (or a composite's generative base) at one sampler setting."""
    from robofinetune.algos.distill import generative_base

    target = policy if variant.get("on") == "self" else generative_base(policy)
    for name, value in variant["config"].items():
        setattr(target.config, name, value)


def history_length(policy) -> int:
    from robofinetune.algos.distill import generative_base

    steps = getattr(policy.config, "n_obs_steps", None)
    return int(steps if steps is not None else generative_base(policy).config.n_obs_steps)


def measure_latency(variants: dict[str, tuple[Any, dict[str, Any]]], batch: int, rounds: int,
                    calls_per_block: int = 3) -> tuple[dict[str, float], dict[str, float]]:
    """Median (and 10th percentile, the least disturbed by other jobs) of the steady-state ms per act() call (one
    chunk per env of the batch), one thread, each call timed alone so that a preemption spoils one sample only.

    Every round runs each variant as a block: one untimed call (so its weights are in cache, as for a policy
    deployed alone; right after another model the first call of a 1-call student costs ~2x), then
    ``calls_per_block`` timed calls. Variants alternate within each round, so they share the machine's load."""
    timings: dict[str, list[float]] = {name: [] for name in variants}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for round_index in range(rounds + 1):
                for name, (policy, variant) in variants.items():
                    _configure(policy, variant)
                    obs = {key: np.zeros((batch, history_length(policy), *shape),
                                         np.uint8 if is_image_key(key) else np.float32)   # cameras arrive as uint8
                           for key, shape in policy.config.obs_shapes.items()}
                    policy.act(obs)
                    for _ in range(calls_per_block):
                        start = time.perf_counter()
                        policy.act(obs)
                        if round_index >= 1:  # the first round warms up allocators and caches
                            timings[name].append((time.perf_counter() - start) * 1000)
    finally:
        torch.set_num_threads(previous_threads)
    return ({name: float(np.median(values)) for name, values in timings.items()},
            {name: float(np.percentile(values, 10)) for name, values in timings.items()})


def latency_variants(teacher, student, base) -> dict[str, tuple[Any, dict[str, Any]]]:
    if base.kind == "diffusion":
        fast = ("teacher_ddim_10", {"config": {"sampler": "ddim", "inference_steps": 10}})
        slow = (f"teacher_ddpm_{base.config.num_train_timesteps}", {"config": {"sampler": "ddpm", "inference_steps": 10}})
    else:
        fast = ("teacher_euler_10", {"config": {"inference_steps": 10}})
        slow = ("teacher_euler_100", {"config": {"inference_steps": 100}})
    variants = {fast[0]: (teacher, fast[1]), slow[0]: (teacher, slow[1])}
    for steps in (1, 2, 4):
        if steps <= len(student.config.grid):
            variants[f"student_{steps}"] = (student, {"on": "self", "config": {"inference_steps": steps}})
    return variants


# --- success -----------------------------------------------------------------------------------------------------

def difference_interval(first: tuple[int, int], second: tuple[int, int]) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10) for p1 - p2 from two Wilson intervals."""
    from robofinetune.eval.stats import success_rate_ci

    (s1, n1), (s2, n2) = first, second
    p1, p2 = s1 / n1, s2 / n2
    (l1, u1), (l2, u2) = success_rate_ci(s1, n1), success_rate_ci(s2, n2)
    difference = p1 - p2
    return (difference - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
            difference + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def reused_evaluation(path: str, task: str, episodes: int) -> dict[str, Any]:
    """A stored evaluation of the teacher on the same eval seeds: checked for task and episode count."""
    stored = json.loads(open(path).read())
    if stored.get("task") != task or stored.get("episodes") != episodes:
        raise SystemExit(f"--teacher-eval {path}: it evaluated task {stored.get('task')!r} over "
                         f"{stored.get('episodes')} episodes, not {task!r} over {episodes}")
    print(f"  teacher: reusing {path}: {stored['successes']}/{stored['episodes']}")
    return {"success": stored["success_rate"], "success_ci": list(stored["success_ci"]),
            "successes": stored["successes"], "episodes": stored["episodes"], "mean_length": stored["mean_length"],
            "eval_seconds": stored.get("seconds"), "reused_from": path}


def evaluate(policy, task: str, episodes: int, seed: int, cache: Path | None = None) -> dict[str, Any]:
    """``evaluate_policy`` on 2 env processes; with ``cache`` see :func:`common.cached_evaluation`."""
    result = cached_evaluation(policy, task, episodes, seed, cache)
    print(f"  {result.summary()}")
    return {"success": result.success_rate, "success_ci": list(result.success_ci), "successes": result.successes,
            "episodes": result.episodes, "mean_length": result.mean_length, "eval_seconds": result.seconds}


# --- teachers ----------------------------------------------------------------------------------------------------

def default_teachers(task: str) -> dict[str, str]:
    from robofinetune.paths import policies_dir

    folder = policies_dir() / task
    teachers = {}
    if (folder / "strong_diffusion" / "policy.json").exists():
        teachers["strong_diffusion"] = str(folder / "strong_diffusion")
    for candidate in sorted(folder.glob("*/policy.json")) if folder.exists() else []:
        name = candidate.parent.name
        if "residual" in name or "ogpo" in name:
            teachers[name] = str(candidate.parent)
    return teachers


def train_pointmass_teachers(seed: int) -> dict[str, str]:
    """BC diffusion and flow teachers on the default 200 scripted pointmass demos (collected when absent)."""
    from robofinetune.algos.bc import BCConfig, train_bc
    from robofinetune.runs import Run

    teachers = {}
    for kind in ("diffusion", "flow"):
        config = BCConfig(task="pointmass", policy=kind, seed=seed, max_steps=1500, batch_size=128, hidden_dim=128,
                          depth=2, learning_rate=1e-3, warmup_steps=100, eval_episodes=0, checkpoint_every=10**9)
        run = Run.create("bc", "pointmass", config)
        teachers[f"bc_{kind}"] = train_bc(config, run)["policy_path"]
    return teachers


def latency_figures(teacher, student, rounds: int) -> dict[str, Any]:
    """Latency at batch 1 and throughput at batch 64 of the teacher's 10- and 100-step samplers and the student at
    1, 2 and 4 steps; the teacher and student configs are restored afterwards."""
    from robofinetune.algos.distill import generative_base

    base = generative_base(teacher)
    saved = {"teacher": dict(vars(base.config)), "student": dict(vars(student.config))}
    try:
        latency, latency_p10 = measure_latency(latency_variants(teacher, student, base), batch=1, rounds=rounds)
        throughput_ms, _ = measure_latency(latency_variants(teacher, student, base), batch=64, rounds=max(5, rounds // 5))
    finally:
        vars(base.config).update(saved["teacher"])
        vars(student.config).update(saved["student"])
    fast_name = "teacher_ddim_10" if base.kind == "diffusion" else "teacher_euler_10"
    note = ("act() per chunk, torch.set_num_threads(1), steady state (warm cache), median of interleaved rounds; "
            "the machine was shared with other jobs")
    if teacher is not base:
        note += "; composite teacher: its base's sampler set as named, residual included"
    figures = {"latency_ms_batch1": latency,
               "latency_ratio_teacher10_over_student1": latency[fast_name] / latency["student_1"],
               "latency_ms_batch1_p10": latency_p10,
               "latency_ratio_p10": latency_p10[fast_name] / latency_p10["student_1"],
               "throughput_chunks_per_s_batch64": {name: 64_000.0 / ms for name, ms in throughput_ms.items()},
               "latency_note": note}
    print(f"  latency ms (batch 1): {', '.join(f'{k} {v:.2f}' for k, v in latency.items())}; "
          f"ratio {figures['latency_ratio_teacher10_over_student1']:.1f}x (10th percentiles: "
          f"{figures['latency_ratio_p10']:.1f}x)")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="can")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seed", type=int, default=100_000)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--teachers", nargs="*", help="name=path pairs (default: see the module docstring)")
    parser.add_argument("--students", nargs="*", default=[], help="name=path: reuse this student for that teacher")
    parser.add_argument("--multistep", action="store_true", help="also evaluate the 2- and 4-step student")
    parser.add_argument("--latency-rounds", type=int, default=50)
    parser.add_argument("--set", nargs="*", default=[], help="distill config overrides, key=value")
    parser.add_argument("--teacher-eval", nargs="*", default=[], metavar="NAME=JSON",
                        help="reuse this evaluation of that teacher (an evaluate_policy JSON with the same task, "
                             "episodes, 2 envs and --eval-seed, e.g. <policy>/eval_can_image_100_seed100000.json) "
                             "instead of spending the CPU again; the JSON must say the same task and episodes")
    parser.add_argument("--latency-only", action="store_true",
                        help="re-measure only the latency figures of an existing results file (same teachers/students)")
    args = parser.parse_args()

    from robofinetune.algos.distill import DistillConfig, generative_base, train_distill
    from robofinetune.config import parse_overrides, resolve_config
    from robofinetune.policies import load_policy
    from robofinetune.runs import Run

    if args.latency_only:
        from common import RESULTS

        path = RESULTS / f"distill_{args.task}.json"
        result = json.loads(path.read_text())
        for name, entry in result["teachers"].items():
            print(f"== {name}: latency only")
            entry.update(latency_figures(load_policy(entry["teacher_path"], device="cpu"),
                                         load_policy(entry["student_path"], device="cpu"), args.latency_rounds))
        result["latency_measured_by"] = provenance(args.seed)
        write_result(path.name, result)
        return

    if args.teachers:
        teachers = dict(item.split("=", 1) for item in args.teachers)
    elif args.task == "pointmass":
        teachers = train_pointmass_teachers(args.seed)
    else:
        teachers = default_teachers(args.task)
    if not teachers:
        raise SystemExit(f"no teachers: nothing under policies/{args.task}; pass --teachers name=path")
    students = dict(item.split("=", 1) for item in args.students)
    overrides = parse_overrides([f"--{item}" for item in args.set])

    result: dict[str, Any] = {"task": args.task, **provenance(args.seed), "episodes": args.episodes,
                              "eval_seed": args.eval_seed, "training_torch_threads": torch.get_num_threads(),
                              "distill_overrides": overrides, "teachers": {}}
    for name, teacher_path in teachers.items():
        print(f"== {name}: {teacher_path}")
        entry: dict[str, Any] = {"teacher_path": str(teacher_path)}
        if name in students:
            student_path = students[name]
            entry["distill"] = {"reused": True, **{key: load_policy(student_path, device="cpu").checkpoint_metadata.get(key)
                                                   for key in ("train_seconds", "train_steps", "training_states", "run",
                                                                "made_by", "rollout_episodes")}}
        else:
            config = resolve_config(DistillConfig, "distill", {**overrides, "task": args.task, "teacher": str(teacher_path),
                                                               "seed": args.seed, "eval_episodes": 0})
            run = Run.create("distill", args.task, config)
            start = time.time()
            summary = train_distill(config, run)
            wall = time.time() - start
            run.close()
            rollouts = run.path / "rollouts.json"
            rollout_info = json.loads(rollouts.read_text()) if rollouts.exists() else {}
            student_path = summary["policy_path"]
            entry["distill"] = {"run": str(run.path), "wall_seconds": wall, "train_seconds": summary["train_seconds"],
                                "rollout_seconds": rollout_info.get("seconds"), "train_steps": summary["train_steps"],
                                "batch_size": config.batch_size, "training_states": summary["training_states"],
                                "demo_fraction": config.demo_fraction, "rollout_episodes": config.rollout_episodes,
                                "teacher_rollout_success": summary["teacher_rollout_success"],
                                "config": {key: getattr(config, key) for key in ("max_steps", "learning_rate", "target",
                                                                                 "teacher_steps", "points_per_chain")}}
            print(f"  distilled in {wall:.0f} s ({summary['train_steps']} steps)")
        entry["student_path"] = str(student_path)
        teacher = load_policy(teacher_path, device="cpu")
        student = load_policy(student_path, device="cpu")
        base = generative_base(teacher)
        entry["teacher_kind"], entry["teacher_base_kind"] = teacher.kind, base.kind
        # the teacher as it ships (its own sampler), and the student's one-step act()
        teacher_evals = dict(item.split("=", 1) for item in args.teacher_eval)
        success = {"teacher": (reused_evaluation(teacher_evals[name], args.task, args.episodes) if name in teacher_evals
                               else evaluate(teacher, args.task, args.episodes, args.eval_seed))}
        student.config.inference_steps = 1
        success["student_1"] = evaluate(student, args.task, args.episodes, args.eval_seed,
                                        cache=Path(student_path) / f"eval_{args.task}_{args.episodes}_seed{args.eval_seed}_1step.json")
        if args.multistep or args.task == "pointmass":
            for steps in (2, 4):
                student.config.inference_steps = steps
                success[f"student_{steps}"] = evaluate(student, args.task, args.episodes, args.eval_seed)
        teacher_counts = (success["teacher"]["successes"], success["teacher"]["episodes"])
        student_counts = (success["student_1"]["successes"], success["student_1"]["episodes"])
        gap = success["teacher"]["success"] - success["student_1"]["success"]
        entry["success"] = success
        entry["teacher_minus_student_1"] = {"points": 100 * gap,
                                            "ci_points": [100 * x for x in difference_interval(teacher_counts, student_counts)],
                                            "within_3_points": gap <= 0.03}
        print(f"  teacher - student(1 step) = {100 * gap:+.1f} points")

        entry.update(latency_figures(teacher, student, args.latency_rounds))
        result["teachers"][name] = entry
        write_result(f"distill_{args.task}.json", result)   # after every teacher, so a crash keeps the rest


if __name__ == "__main__":
    main()
