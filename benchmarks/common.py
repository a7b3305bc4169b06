"""Shared by the benchmark scripts: where results go and what each result records beside its figures."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def provenance(seed: int) -> dict[str, Any]:
    from robofinetune.runs import git_commit, machine_description

    return {"command": " ".join(["python", *sys.argv]), "seed": seed, "commit": git_commit(),
            "machine": machine_description(), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=2, default=float))
    os.replace(temporary, path)
    print(f"wrote {path}")
    return path


def median_seconds_alternating(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of the seconds each variant's callable reports: one warm-up call each, then ``repeats`` rounds that
    call every variant in turn, so that a busy machine slows them alike and their ratio stays meaningful."""
    for measure in variants.values():
        measure()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, measure in variants.items():
            times[name].append(measure())
    return {name: statistics.median(values) for name, values in times.items()}


def cached_evaluation(policy: Any, task: str, episodes: int, seed: int, cache: Path | None) -> Any:
    """``evaluate_policy`` on 2 env processes, its result stored in ``cache`` (a file in the policy folder) and
    reused by the next run with the same policy, task, episodes and seeds: an image evaluation costs ~15 CPU
    minutes, and a crash later in a script should not cost it again."""
    from robofinetune.eval import EvalResult, evaluate_policy

    if cache is not None and cache.exists():
        stored = json.loads(cache.read_text())
        print(f"  reusing {cache}")
        return EvalResult(**{**stored, "success_ci": tuple(stored["success_ci"])})
    result = evaluate_policy(policy, task, episodes=episodes, num_envs=2, seed=seed)
    if cache is not None:
        cache.write_text(json.dumps(result.to_dict(), indent=2))
    return result


def eval_curve(run_path: Path) -> list[tuple[int, str, float]]:
    """(env steps, label, success) of every evaluation a run logged in its metrics.jsonl (base, periodic, final)."""
    points = []
    for line in (run_path / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for label in ("base", "eval", "final"):
            if f"{label}/success" in record:
                points.append((int(record["step"]), label, float(record[f"{label}/success"])))
    return points
