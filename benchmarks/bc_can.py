"""BC on can: success of diffusion and flow policies trained on 200 clean scripted demos, training wall time,
inference latency per action chunk (DDPM-100, DDIM-10, flow-10) and env throughput with 1 and 2 processes.

    python benchmarks/bc_can.py                      # collect (if needed), train both, evaluate, measure
    python benchmarks/bc_can.py --diffusion=runs/.../policy --flow=runs/.../policy   # reuse trained policies
Writes benchmarks/results/bc_can.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from common import provenance, write_result


def measure_latency(policy, kind: str, steps: int, sampler: str | None = None, repeats: int = 30) -> float:
    """Median ms per action chunk at batch 1 on the CPU (one thread per core, as deployed)."""
    spec_shapes = policy.config.obs_shapes
    obs = {key: np.zeros((1, policy.config.n_obs_steps, *shape), np.float32) for key, shape in spec_shapes.items()}
    if sampler is not None:
        policy.config.sampler = sampler
    times = []
    with torch.no_grad():
        for index in range(repeats + 3):
            start = time.perf_counter()
            if sampler == "ddpm":
                policy.sample(obs)
            else:
                policy.sample(obs, steps=steps)
            if index >= 3:
                times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def env_throughput(task: str, num_envs: int, steps: int = 600) -> float:
    from robofinetune.envs import make_vector_env

    envs = make_vector_env(task, num_envs=num_envs, seed=0)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps // num_envs):
        envs.step(rng.uniform(-1, 1, (num_envs, envs.single_action_space.shape[0])).astype(np.float32))
    elapsed = time.perf_counter() - start
    envs.close()
    return (steps // num_envs) * num_envs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="can")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--max-steps", type=int, default=0, help="0 = the task preset's")
    parser.add_argument("--diffusion", help="reuse this trained diffusion policy instead of training")
    parser.add_argument("--flow", help="reuse this trained flow policy instead of training")
    args = parser.parse_args()

    from robofinetune.algos.bc import BCConfig, train_bc
    from robofinetune.config import resolve_config
    from robofinetune.eval import EvalResult, evaluate_policy
    from robofinetune.policies import load_policy
    from robofinetune.runs import Run

    result = {"task": args.task, **provenance(args.seed), "policies": {}}
    for kind in ("diffusion", "flow"):
        reuse = getattr(args, kind)
        train_seconds = None
        if reuse:
            policy_path = reuse
            policy = load_policy(policy_path, device="cpu")
            train_seconds = policy.checkpoint_metadata.get("train_seconds")
        else:
            overrides = {"task": args.task, "policy": kind, "seed": args.seed, "eval_episodes": 0}
            if args.max_steps:
                overrides["max_steps"] = args.max_steps
            config = resolve_config(BCConfig, "bc", overrides)  # the task preset, as `train bc` uses
            run = Run.create("bc", args.task, config)
            summary = train_bc(config, run)
            policy_path, train_seconds = summary["policy_path"], summary["train_seconds"]
            policy = load_policy(policy_path, device="cpu")
        cached = Path(policy_path) / f"eval_{args.task}_{args.episodes}_seed100000.json"
        if cached.exists():  # the same policy, episodes and seeds were evaluated before: reuse, don't re-spend CPU
            stored = json.loads(cached.read_text())
            evaluation = EvalResult(**{**stored, "success_ci": tuple(stored["success_ci"])})
        else:
            evaluation = evaluate_policy(policy, args.task, episodes=args.episodes, num_envs=2, seed=100_000)
            cached.write_text(json.dumps(evaluation.to_dict(), indent=2))
        print(f"{kind}: {evaluation.summary()}")
        entry = {"task": args.task, "policy": kind, "policy_path": str(policy_path), "success": evaluation.success_rate,
                 "success_ci": list(evaluation.success_ci), "eval_episodes": evaluation.episodes,
                 "mean_length": evaluation.mean_length, "train_seconds": train_seconds,
                 "train_steps": policy.checkpoint_metadata.get("train_steps"),
                 "demos": policy.checkpoint_metadata.get("demos")}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        if kind == "diffusion":
            entry["latency_ms"] = {"ddim_10": measure_latency(policy, kind, 10),
                                   "ddpm_100": measure_latency(policy, kind, 100, sampler="ddpm", repeats=10)}
        else:
            entry["latency_ms"] = {"flow_10": measure_latency(policy, kind, 10)}
        torch.set_num_threads(threads)
        result["policies"][kind] = entry
        print(f"{kind}: latency {entry['latency_ms']}")
    one, two = env_throughput(args.task, 1), env_throughput(args.task, 2)
    result["env_steps_per_s"] = {"1_process": one, "2_processes": two, "ratio": two / one}
    print(f"env steps/s: 1 process {one:.0f}, 2 processes {two:.0f} (x{two / one:.2f})")
    write_result(f"bc_{args.task}.json", result)


if __name__ == "__main__":
    main()
