"""Critic-update throughput of the residual learner: the batched critic ensemble vs a Python loop over heads.

Runs the real update step (:func:`robofinetune.algos.residual.td3_update`: critic update, every second step an
actor update, Polyak averaging) on can-sized inputs (23-dim state + 7-dim base action, 7-dim action) from a
replay buffer, first with the batched ``CriticEnsemble``, then with the same weights as per-head modules,
alternating rounds so both see the same machine load. Also times a few updates at ResFiT's published critic
size (10 heads of 2 x 1024) to show why the CPU preset is smaller.

    python benchmarks/residual_throughput.py [--updates=300] [--rounds=3] [--threads=1]
Writes benchmarks/results/residual_throughput.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import provenance, write_result

from robofinetune.algos.residual import ResidualActor, ResidualConfig, ResidualLearner, td3_update
from robofinetune.rl import ReplayBuffer, sample_symmetric

OBS_DIM, ACTION_DIM = 23, 7


def make_learner(config: ResidualConfig, loop: bool) -> ResidualLearner:
    torch.manual_seed(config.seed)
    actor = ResidualActor(OBS_DIM, ACTION_DIM, config.actor_hidden_dim, config.actor_depth, config.layer_norm,
                          config.action_scale)
    learner = ResidualLearner(config, actor)
    if loop:
        learner.critic = learner.critic.head_modules()
        learner.critic_target = learner.critic_target.head_modules().requires_grad_(False)
        learner.critic_optimizer = torch.optim.Adam(learner.critic.parameters(), lr=config.critic_lr)
    return learner


def filled_buffers(seed: int) -> tuple[ReplayBuffer, ReplayBuffer]:
    rng = np.random.default_rng(seed)
    buffers = []
    for index in range(2):
        buffer = ReplayBuffer(OBS_DIM + ACTION_DIM, ACTION_DIM, capacity=20_000, seed=seed + index)
        rows = 20_000
        buffer.add_transitions(rng.normal(size=(rows, OBS_DIM + ACTION_DIM)), rng.uniform(-1, 1, (rows, ACTION_DIM)),
                               (rng.random(rows) < 0.01).astype(np.float32), rng.normal(size=(rows, OBS_DIM + ACTION_DIM)),
                               rng.random(rows) < 0.01, np.zeros(rows, bool), np.arange(rows) % 2)
        buffers.append(buffer)
    return buffers[0], buffers[1]


def time_updates(learner: ResidualLearner, buffers, updates: int, config: ResidualConfig) -> dict[str, float]:
    offline, online = buffers
    batches = [sample_symmetric(offline, online, config.batch_size, config.n_step, config.gamma).to_torch()
               for _ in range(updates)]
    td3_update(learner, batches[0], True)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    for index, batch in enumerate(batches):
        td3_update(learner, batch, update_actor=index % config.actor_update_every == 0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"updates_per_s": updates / wall, "updates_per_cpu_s": updates / cpu}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--published-updates", type=int, default=5, help="updates timed at 10 x 2 x 1024 (0 = skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = ResidualConfig(seed=args.seed)
    buffers = filled_buffers(args.seed)
    results: dict[str, list[dict[str, float]]] = {"batched": [], "loop": []}
    for round_index in range(args.rounds):
        for name in ("batched", "loop"):
            figures = time_updates(make_learner(config, loop=name == "loop"), buffers, args.updates, config)
            results[name].append(figures)
            print(f"round {round_index}: {name:8s} {figures['updates_per_s']:7.1f} updates/s "
                  f"({figures['updates_per_cpu_s']:.1f} per CPU-second)")
    summary = {name: {key: float(np.median([r[key] for r in rows])) for key in rows[0]} for name, rows in results.items()}
    speedup = summary["batched"]["updates_per_cpu_s"] / summary["loop"]["updates_per_cpu_s"]
    print(f"median: batched {summary['batched']['updates_per_s']:.1f}/s, loop {summary['loop']['updates_per_s']:.1f}/s, "
          f"batched/loop (CPU time) {speedup:.2f}x")
    published = None
    if args.published_updates:
        big = ResidualConfig(seed=args.seed, critic_hidden_dim=1024)
        figures = time_updates(make_learner(big, loop=False), buffers, args.published_updates, big)
        published = {"critic": "10 heads x 2 x 1024", **figures,
                     "hours_for_400k_updates": 400_000 / figures["updates_per_s"] / 3600,
                     "cpu_hours_for_400k_updates": 400_000 / figures["updates_per_cpu_s"] / 3600}
        print(f"published size (10 x 2 x 1024): {figures['updates_per_s']:.2f} updates/s "
              f"({figures['updates_per_cpu_s']:.2f} per CPU-second) -> {published['cpu_hours_for_400k_updates']:.0f} "
              f"CPU-hours for ResFiT's 100k env steps x UTD 4")
    write_result("residual_throughput.json", {
        **provenance(args.seed), "threads": args.threads, "updates_per_round": args.updates, "rounds": args.rounds,
        "critic": f"{config.num_critics} heads x {config.critic_depth} x {config.critic_hidden_dim}, LayerNorm",
        "batch_size": config.batch_size, "obs_dim": OBS_DIM + ACTION_DIM, "action_dim": ACTION_DIM,
        "batched": summary["batched"], "loop": summary["loop"], "batched_over_loop_cpu": speedup,
        "rounds_detail": results, "published_size": published,
        "note": "updates = one critic step (+ an actor step every second one) incl. targets and Polyak; "
                "the machine is shared, so the per-CPU-second figure is the fairer comparison",
    })


if __name__ == "__main__":
    main()
