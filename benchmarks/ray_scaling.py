"""Env steps per second of rollouts through Ray env workers against the local vector env, and how long a killed
worker takes to come back.

Each variant rolls out ``--task`` (can) with the frozen base policy acting (``--actions=random`` measures the
envs alone): the local path ``make_vector_env(task, n)`` (n = 1: one env in this process, n > 1: one subprocess
each) and ``make_vector_env(task, n, backend="ray", num_workers=n)`` (one Ray actor each), for each n in
``--workers``. All vector envs are built first and then measured in alternating rounds, so a busy machine slows
every variant alike; the figure is the median round. Then one Ray worker is killed with SIGKILL in the middle of
a rollout and the time until its envs run again is recorded (Ray restarts the actor, which rebuilds its envs).

``overhead_ms_per_transition`` is what a Ray worker adds to one env step: measured on pointmass, whose step costs
microseconds, as (Ray seconds per env step - local seconds per env step) with one worker, one env.

    python benchmarks/ray_scaling.py [--task=can] [--workers=1,2] [--steps=300] [--rounds=3] [--ray-address=auto]
    python benchmarks/ray_scaling.py --task=pointmass --steps=20 --rounds=1 --output=/tmp/ray_smoke.json  # smoke

``--two-node`` then starts a two-node cluster on loopback (``ray start --head`` and ``ray start --address``: two
raylets, one CPU each), measures 2 workers with one on each node, and stops it with ``ray stop --force``.
``--residual-steps=N`` then runs ``train residual`` twice at that budget and seed, with local env processes and
with ``--num-env-workers=2``, and records both final success rates (sample efficiency through Ray).

    python benchmarks/ray_scaling.py --two-node --residual-steps=20000    # everything the JSON holds

Writes benchmarks/results/ray_scaling.json (``in_process`` and ``ray`` {workers: env_steps_per_s},
``overhead_ms_per_transition``, ``restart_recovery_s``, ``two_node`` {env_steps_per_s, workers} and
``residual_through_ray`` {final_success, in_process_final_success, episodes, env_steps}; null when not run).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common import provenance, write_result

REPO = Path(__file__).resolve().parent.parent


class Roller:
    """A vector env and its own copy of the acting policy; ``run(steps)`` returns seconds for ``steps`` vector
    steps, continuing the episodes where the last call left them."""

    def __init__(self, envs: Any, act: Callable[[dict], np.ndarray], reset_policy: Callable[[int | None], None],
                 seed: int) -> None:
        self.envs, self.act, self.reset_policy = envs, act, reset_policy
        self.obs, _ = envs.reset(seed=seed)
        reset_policy(None)
        self.episodes = 0

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.obs, _, terminated, truncated, _ = self.envs.step(self.act(self.obs))
            for index in np.flatnonzero(terminated | truncated):
                self.reset_policy(int(index))
                self.episodes += 1
        return time.perf_counter() - start


def acting(kind: str, base_path: str, action_dim: int, seed: int) -> tuple[Callable, Callable[[int | None], None]]:
    """(act, reset) for one roller: the frozen base (each roller its own copy: it queues action chunks per env)
    or uniform random actions."""
    if kind == "random":
        rng = np.random.default_rng(seed)
        return (lambda obs: rng.uniform(-1, 1, (len(next(iter(obs.values()))), action_dim)).astype(np.float32),
                lambda index: None)
    from robofinetune.policies import load_policy

    policy = copy.deepcopy(load_policy(base_path, device="cpu"))
    policy.seed_sampling(seed)

    def act(obs: dict) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(policy.select_action(obs), np.float32)

    return act, policy.reset


def measure_rates(rollers: dict[str, Roller], widths: dict[str, int], steps: int, warmup: int,
                  rounds: int) -> dict[str, float]:
    """Median env steps per second of each roller over ``rounds`` alternating rounds of ``steps`` vector steps."""
    for roller in rollers.values():
        roller.run(warmup)
    seconds: dict[str, list[float]] = {name: [] for name in rollers}
    for round_index in range(rounds):
        for name, roller in rollers.items():
            seconds[name].append(roller.run(steps))
        print(f"round {round_index + 1}/{rounds}: " + ", ".join(
            f"{name} {widths[name] * steps / seconds[name][-1]:.1f}" for name in rollers) + " env steps/s", flush=True)
    return {name: widths[name] * steps / statistics.median(values) for name, values in seconds.items()}


def measure_recovery(task: str, workers: int, act: Callable, reset_policy: Callable, seed: int,
                     ray_address: str | None, steps_before: int = 10, max_steps: int = 50) -> dict[str, float]:
    """SIGKILL the last Ray worker mid-rollout; seconds until its envs step again (from RayVectorEnv) and the wall
    time of the step that waited for it."""
    from robofinetune.envs import make_vector_env

    envs = make_vector_env(task, num_envs=workers, seed=seed, backend="ray", num_workers=workers,
                           ray_address=ray_address)
    try:
        roller = Roller(envs, act, reset_policy, seed)
        roller.run(steps_before)
        os.kill(envs.pids[-1], signal.SIGKILL)
        slowest = 0.0
        for _ in range(max_steps):
            slowest = max(slowest, roller.run(1))
            if envs.restarts:
                break
        if not envs.restarts:
            raise RuntimeError(f"the killed worker was not noticed within {max_steps} steps")
        roller.run(steps_before)   # and it carries on
        return {"restart_recovery_s": envs.recovery_seconds[0], "slowest_step_s": slowest,
                "aborted_episodes": envs.aborted_episodes}
    finally:
        envs.close()


def start_two_node_cluster(cpus_per_node: int) -> str:
    """A head and a second node on loopback (two raylets on this machine), as two machines would be started;
    returns the head's address. Token authentication (Ray's default for ``ray start``) needs RAY_AUTH_MODE=token
    in every process that joins, this one included."""
    os.environ["RAY_AUTH_MODE"] = "token"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray_cli = str(Path(sys.executable).parent / "ray")
    common = [f"--num-cpus={cpus_per_node}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--include-dashboard=false", *common], check=True)
    subprocess.run([ray_cli, "start", f"--address=127.0.0.1:{port}", *common], check=True)
    return f"127.0.0.1:{port}"


def stop_ray_cluster() -> None:
    """``ray stop --force``: ends every Ray process of this machine (so the two-node phase runs last)."""
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], check=False,
                   stdout=subprocess.DEVNULL)


def measure_two_node(args: argparse.Namespace, make_roller: Callable[..., "Roller"]) -> dict[str, Any]:
    """Env steps per second with one Ray worker on each of two nodes (two raylets on loopback)."""
    from robofinetune.distributed.cluster import import_ray
    from robofinetune.envs import make_vector_env

    ray = import_ray()
    address = start_two_node_cluster(cpus_per_node=1)
    try:
        ray.init(address=address)
        envs = make_vector_env(args.task, num_envs=2, seed=args.seed, backend="ray", num_workers=2)
        nodes = ray.get([worker.node_id.remote() for worker in envs.workers])
        if len(set(nodes)) != 2:
            raise RuntimeError(f"the two workers were placed on nodes {nodes}, not one on each")
        rate = measure_rates({"two_node": make_roller(envs, 2)}, {"two_node": 2}, args.steps, args.warmup,
                             args.rounds)["two_node"]
        envs.close()
        return {"env_steps_per_s": rate, "workers": 2, "nodes": 2}
    finally:
        ray.shutdown()
        stop_ray_cluster()


def residual_flags(args: argparse.Namespace) -> list[str]:
    """--base / --dataset when given here, then --residual-args (e.g. a shorter evaluation for a smoke run)."""
    flags = [f"--base={args.base}"] if args.base else []
    flags += [f"--dataset={args.dataset}"] if args.dataset else []
    return flags + shlex.split(args.residual_args)


def residual_through_ray(args: argparse.Namespace) -> dict[str, Any]:
    """``train residual`` twice at the same budget and seed, local env processes and 2 Ray workers; the final
    success of each (from its summary.json)."""
    summaries = {}
    for name, extra in (("in_process", []), ("ray", ["--num-env-workers=2"])):
        with tempfile.TemporaryDirectory() as runs:
            command = [str(Path(sys.executable).parent / "robofinetune"), "train", "residual", f"--task={args.task}",
                       f"--total_env_steps={args.residual_steps}", "--num_envs=2", f"--seed={args.seed}",
                       f"--runs-dir={runs}", "--progress=false", *residual_flags(args), *extra]
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True)
            summaries[name] = json.loads(next(Path(runs).iterdir()).joinpath("summary.json").read_text())
    ray_summary = summaries["ray"]
    return {"final_success": ray_summary["final_success"], "final_success_ci": ray_summary["final_success_ci"],
            "in_process_final_success": summaries["in_process"]["final_success"],
            "in_process_final_success_ci": summaries["in_process"]["final_success_ci"],
            "episodes": ray_summary["episodes"], "env_steps": ray_summary["env_steps"],
            "eval_episodes": ray_summary["eval_episodes"],
            "wall_clock_s": {name: summary["wall_clock_s"] for name, summary in summaries.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="can")
    parser.add_argument("--workers", default="1,2", help="comma-separated numbers of envs (= Ray workers)")
    parser.add_argument("--steps", type=int, default=300, help="vector steps per measured round")
    parser.add_argument("--warmup", type=int, default=20, help="vector steps before the first round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--actions", default="base", choices=["base", "random"])
    parser.add_argument("--base", default="", help="base policy folder (default policies/<task>/weak_diffusion)")
    parser.add_argument("--ray-address", default="", help="empty: a local Ray started here; auto / ray://host:port")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--two-node", action="store_true",
                        help="also measure 2 workers on a two-node cluster on loopback (ends with `ray stop --force`, "
                             "which stops every Ray process of this machine)")
    parser.add_argument("--residual-steps", type=int, default=0,
                        help="also run train residual with this budget in-process and through 2 Ray workers (0: skip)")
    parser.add_argument("--dataset", default="", help="--residual-steps: the demos (default: train residual's)")
    parser.add_argument("--residual-args", default="", help="--residual-steps: more train residual flags")
    parser.add_argument("--output", default="", help="write here instead of benchmarks/results/ray_scaling.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from robofinetune.distributed.cluster import import_ray, init_ray
    from robofinetune.envs import load_task_spec, make_vector_env

    widths = [int(width) for width in args.workers.split(",") if width]
    action_dim = load_task_spec(args.task).action_dim
    base = args.base or str(REPO / "policies" / args.task / "weak_diffusion")
    ray_address = args.ray_address or None

    def roller(envs: Any, index: int, actions: str = args.actions) -> Roller:
        act, reset_policy = acting(actions, base, action_dim if actions == args.actions else 2, args.seed + index)
        return Roller(envs, act, reset_policy, args.seed)

    # local vector envs first: their subprocesses fork from a process without Ray's threads
    rollers: dict[str, Roller] = {}
    names: dict[str, int] = {}
    for width in widths:
        rollers[f"in_process/{width}"] = roller(make_vector_env(args.task, num_envs=width, seed=args.seed), width)
        names[f"in_process/{width}"] = width
    # the pointmass pair measures Ray's cost per step: random 2-D forces, a step of microseconds
    rollers["overhead/in_process"] = roller(make_vector_env("pointmass", num_envs=1, seed=args.seed), 0, "random")
    names["overhead/in_process"] = 1
    ray = import_ray()
    # every variant's workers exist at once (alternating rounds) and each reserves one CPU: a local Ray is told it
    # has as many as they need (a scheduling label only; the OS shares the cores among them as for subprocesses)
    started = init_ray(ray_address, num_cpus=max(os.cpu_count() or 1, sum(widths) + 1))
    try:
        for width in widths:
            envs = make_vector_env(args.task, num_envs=width, seed=args.seed, backend="ray", num_workers=width)
            rollers[f"ray/{width}"], names[f"ray/{width}"] = roller(envs, width), width
        rollers["overhead/ray"] = roller(make_vector_env("pointmass", num_envs=1, seed=args.seed, backend="ray"), 0,
                                         "random")
        names["overhead/ray"] = 1
        rates = measure_rates(rollers, names, args.steps, args.warmup, args.rounds)
        for roller_ in rollers.values():
            roller_.envs.close()
        act, reset_policy = acting(args.actions, base, action_dim, args.seed)
        recovery = measure_recovery(args.task, max(widths), act, reset_policy, args.seed, ray_address)
        cluster = {"nodes": len(ray.nodes()), "cpus": ray.cluster_resources().get("CPU", 0.0)}
    finally:
        if started:
            ray.shutdown()
    two_node = measure_two_node(args, roller) if args.two_node else None
    residual = residual_through_ray(args) if args.residual_steps else None
    result = {
        "task": args.task, "actions": args.actions, "base": base if args.actions == "base" else None,
        "steps_per_round": args.steps, "rounds": args.rounds,
        "in_process": {str(width): rates[f"in_process/{width}"] for width in widths},
        "ray": {str(width): rates[f"ray/{width}"] for width in widths},
        "overhead_ms_per_transition": 1000.0 * (1.0 / rates["overhead/ray"] - 1.0 / rates["overhead/in_process"]),
        "pointmass_env_steps_per_s": {"in_process": rates["overhead/in_process"], "ray": rates["overhead/ray"]},
        **recovery,
        "two_node": two_node,
        "residual_through_ray": residual,
        "ray_cluster": cluster,
        "ray_version": ray.__version__,
        **provenance(args.seed),
    }
    print(json.dumps({key: result[key] for key in ("in_process", "ray", "overhead_ms_per_transition",
                                                    "restart_recovery_s")}, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2, default=float))
        print(f"wrote {args.output}")
    else:
        write_result("ray_scaling.json", result)


if __name__ == "__main__":
    main()
