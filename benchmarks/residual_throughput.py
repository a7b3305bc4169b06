"""Env steps per second of `robofinetune train residual` on can, this commit against an earlier one.

Each variant runs the real command (``robofinetune train residual --task=can``) from its own checkout (the
earlier commit in a temporary ``git worktree``) with the same base, demos, seed and settings, one after the
other on an otherwise idle machine. The figure is the rate over a steady window after the warm-up, when the
actor learns (UTD 2, an actor update every second critic update): env steps in the window / wall seconds, read
from the run's ``metrics.jsonl``. While the window runs, the CPU time of the learner process and of each env
process is sampled from ``/proc``, so the JSON says how much of the machine each used.

    python benchmarks/residual_throughput.py [--before=e1de6ac] [--window=5000] [--warmup=1000] [--settle=1000]

The warm-up is shortened to 1k env steps (the default run has 5k): what it changes is when the window starts,
not what a step costs after it. Evaluations and checkpoints are off inside the measured span.
Writes benchmarks/results/residual_throughput.json (``train_env_steps_per_s`` {before, after, ratio}).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import provenance, write_result

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> dict[int, str]:
    """pid -> command name of ``root`` and all its descendants."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        parents[int(entry.name)], names[int(entry.name)] = int(fields[1]), name
    tree, frontier = {root: names.get(root, "?")}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree[pid] = names[pid]
                frontier.append(pid)
    return tree


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS   # utime + stime


def metric_rows(run_root: Path) -> list[dict]:
    files = list(run_root.glob("*/metrics.jsonl"))
    if not files:
        return []
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


def run_variant(name: str, checkout: Path, args: argparse.Namespace, base: Path, dataset: Path) -> dict:
    """Run ``train residual`` from ``checkout``; return the window's rate and each process's CPU share."""
    runs_dir = Path(tempfile.mkdtemp(prefix=f"throughput_{name}_"))
    warmup, window_start = args.warmup, args.warmup + args.settle
    window_end = window_start + args.window
    flags = [f"--base={base}", f"--dataset={dataset}", f"--seed={args.seed}", f"--warmup_steps={warmup}",
             f"--total_env_steps={window_end}", "--eval_every=0", "--checkpoint_every=0", "--log_every=1000",
             "--final_eval_episodes=2", "--progress=false", "--gate=false"]
    command = [sys.executable, "-c", "import sys; from robofinetune.cli import main; sys.exit(main())",
               "train", "residual", "--task=can", f"--runs-dir={runs_dir}", *flags]
    environment = {**os.environ, "PYTHONPATH": str(checkout)}
    print(f"[{name}] {checkout}: train residual to {window_end} env steps (window {window_start}-{window_end})",
          flush=True)
    log = open(runs_dir / "stdout.log", "w")
    process = subprocess.Popen(command, cwd=checkout, env=environment, stdout=log, stderr=subprocess.STDOUT)
    snapshots: dict[str, tuple[float, dict[int, tuple[str, float]]]] = {}
    try:
        while process.poll() is None:
            time.sleep(0.5)
            steps = max((row["step"] for row in metric_rows(runs_dir) if "perf/env_steps_per_s" in row), default=0)
            for label, edge in (("start", window_start), ("end", window_end)):
                if label not in snapshots and steps >= edge:
                    tree = process_tree(process.pid)
                    snapshots[label] = (time.time(), {pid: (command_name, cpu_seconds(pid) or 0.0)
                                                      for pid, command_name in tree.items()})
        if process.returncode != 0:
            raise SystemExit(f"[{name}] train residual failed, see {runs_dir / 'stdout.log'}")
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    rows = [row for row in metric_rows(runs_dir) if "perf/env_steps_per_s" in row]
    # each row covers the log_every steps before it; its timestamp closes that span
    times = {row["step"]: row["time"] for row in rows}
    if window_start not in times or window_end not in times:
        raise SystemExit(f"[{name}] metrics lack steps {window_start}/{window_end}: {sorted(times)}")
    rate = args.window / (times[window_end] - times[window_start])
    updates = [row["perf/updates_per_s"] for row in rows if window_start < row["step"] <= window_end]
    processes = {}
    if "start" in snapshots and "end" in snapshots:
        (wall_start, start), (wall_end, end) = snapshots["start"], snapshots["end"]
        for pid, (command_name, seconds) in end.items():
            if pid in start:
                role = "learner" if pid == process.pid else f"env {pid}"
                processes[role] = round(100.0 * (seconds - start[pid][1]) / (wall_end - wall_start), 1)
    print(f"[{name}] {rate:.2f} env steps/s over steps {window_start}-{window_end}; CPU % {processes}", flush=True)
    shutil.rmtree(runs_dir, ignore_errors=True)
    return {"env_steps_per_s": rate, "critic_updates_per_s_while_updating": sum(updates) / max(len(updates), 1),
            "cpu_percent": processes, "window": [window_start, window_end]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="e1de6ac", help="the commit to compare against")
    parser.add_argument("--window", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--settle", type=int, default=1000, help="env steps after the warm-up before the window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default=str(REPO / "policies/can/weak_diffusion"))
    parser.add_argument("--dataset", default=str(REPO / "datasets/can_scripted_200.hdf5"))
    args = parser.parse_args()
    dataset, base = Path(args.dataset).resolve(), Path(args.base).resolve()
    if not dataset.exists():
        raise SystemExit(f"{dataset} not found: run `robofinetune collect --task=can --source=scripted --episodes=200`")
    worktree = Path(tempfile.mkdtemp(prefix="rft_before_"))
    subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.before], cwd=REPO, check=True,
                   capture_output=True)
    try:
        before = run_variant("before", worktree, args, base, dataset)
        after = run_variant("after", REPO, args, base, dataset)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, check=False)
    ratio = after["env_steps_per_s"] / before["env_steps_per_s"]
    print(f"train residual on can: {before['env_steps_per_s']:.2f} -> {after['env_steps_per_s']:.2f} env steps/s "
          f"({ratio:.2f}x)")
    write_result("residual_throughput.json", {
        **provenance(args.seed), "before_commit": args.before, "task": "can", "num_envs": 2,
        "settings": {"warmup_steps": args.warmup, "window_env_steps": args.window, "settle_env_steps": args.settle,
                     "updates_per_step": 2.0, "critic": "10 heads x 2 x 128, LayerNorm", "batch_size": 256},
        "train_env_steps_per_s": {"before": before["env_steps_per_s"], "after": after["env_steps_per_s"],
                                  "ratio": ratio},
        "before": before, "after": after,
        "note": "the two runs ran one after the other in this invocation; CPU % is per process over the window "
                "(100 = one core)"})


if __name__ == "__main__":
    main()
