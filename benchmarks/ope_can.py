"""Does the off-policy gate rank policies like simulation does, and does it refuse worse candidates?

    python benchmarks/ope_can.py --task=pointmass      # builds its own policy zoo; results/ope_pointmass.json
    python benchmarks/ope_can.py [--policies DIR ...] [--data FILE ...]   # can; results/ope_can.json

For each policy of a zoo of spread-out quality: true success from simulation (Wilson interval) and FQE
values from one fixed logged dataset that no single policy generated. Reported:
  * Spearman rank correlation between FQE values and true success; regret@1;
  * over every ordered pair (candidate, incumbent) whose true success rates differ beyond simulation noise
    (the Newcombe 95% interval of the difference excludes 0): the false-promotion rate (PROMOTE for a truly
    worse candidate) and the promotion rate of truly better candidates, for the gate (lower end of the gain's
    interval above the margin) and, in the same run, for the bare mean comparison of RL-100 / Uni-O4.

can: the zoo is every policy folder given with --policies, else every checkpoint under policies/can/ and
runs/*/ whose task is can (needs >= 8). pointmass: the zoo is built here in a few minutes: BC flow/diffusion
policies from few demos / few steps, and PD controllers executed in chunks with noise, weak gains, target
offsets (stand-ins for RL and distilled checkpoints, which pointmass does not have yet).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import provenance, write_result  # noqa: E402

from robofinetune.algos.ope import (PROMOTE, GateConfig, decide, estimate_policy_value,  # noqa: E402
                                    mean_comparison)
from robofinetune.eval.stats import success_rate_ci  # noqa: E402
from robofinetune.policies.base import Policy, PolicyConfig  # noqa: E402

POINTMASS_KEYS = ["agent_pos", "agent_vel", "goal_pos"]


# --- pointmass zoo ------------------------------------------------------------------------------------------------


class ChunkedPDPolicy(Policy):
    """A PD controller on the force, executed as a zero-order-hold chunk with Gaussian noise on every action.

    Quality is set by the gain, the damping, the noise, a target offset (a biased policy never stops inside the
    2 cm goal) and the chunk length (long holds overshoot). Noise comes from torch's generator, so the OPE's
    seeded sampling makes its chunks reproducible.
    """

    def __init__(self, name: str, kp: float = 10.0, damping: float = 1.0, noise: float = 0.0,
                 offset: float = 0.0, chunk: int = 4) -> None:
        super().__init__()
        self.name, self.kp, self.noise, self.chunk = name, kp, noise, chunk
        self.kd = damping * (2.0 * np.sqrt(kp) - 1.0)
        self.offset = np.array([offset, offset], dtype=np.float32) / np.sqrt(2.0)
        self.config = PolicyConfig(task="pointmass", obs_keys=list(POINTMASS_KEYS),
                                   obs_shapes={key: [2] for key in POINTMASS_KEYS}, action_dim=2, n_obs_steps=1,
                                   horizon=chunk, n_action_steps=chunk)
        self._queues: list[deque] = []

    def act(self, obs):
        pos, vel = np.asarray(obs["agent_pos"])[:, -1], np.asarray(obs["agent_vel"])[:, -1]
        goal = np.asarray(obs["goal_pos"])[:, -1] + self.offset
        action = self.kp * (goal - pos) - self.kd * vel
        chunk = np.repeat(action[:, None], self.chunk, axis=1)
        if self.noise:
            chunk = chunk + self.noise * torch.randn(chunk.shape).numpy()
        return np.clip(chunk, -1.0, 1.0).astype(np.float32)

    def reset(self, env_index=None):
        if env_index is None:
            self._queues = []
        elif env_index < len(self._queues):
            self._queues[env_index].clear()

    def select_action(self, obs):
        batch = len(obs["agent_pos"])
        while len(self._queues) < batch:
            self._queues.append(deque())
        need = [i for i in range(batch) if not self._queues[i]]
        if need:
            chunks = self.act({key: np.asarray(obs[key])[need][:, None] for key in POINTMASS_KEYS})
            for row, index in enumerate(need):
                self._queues[index].extend(chunks[row])
        return np.stack([self._queues[i].popleft() for i in range(batch)])


def pointmass_logged_data(cache: Path, seed: int):
    """Noisy scripted operators at five noise levels: broad coverage, successes and failures, no zoo policy."""
    from robofinetune.data.collect import collect_episodes
    from robofinetune.data.io import load_dataset, save_dataset

    path = cache / "logged_mixture.hdf5"
    if not path.exists():
        episodes = []
        for index, noise in enumerate([0.3, 0.7, 1.0, 1.5, 2.5]):
            episodes += collect_episodes("pointmass", 50, noise=noise, seed=seed * 100_000 + 10_000 * (index + 1),
                                         progress=False)
        save_dataset(episodes, path, env_meta={"env_name": "pointmass", "task": "pointmass",
                                               "source": "scripted operators, noise 0.3/0.7/1.0/1.5/2.5"})
    return load_dataset(path, obs_keys=POINTMASS_KEYS)[0], path


BC_ZOO = [  # name, policy kind, demos, steps: from barely trained to decent
    ("bc_flow_d3_s150", "flow", 3, 150),
    ("bc_flow_d10_s600", "flow", 10, 600),
    ("bc_diffusion_d30_s1500", "diffusion", 30, 1500),
    ("bc_flow_d100_s3000", "flow", 100, 3000),
]
PD_ZOO = [  # name, kwargs (sim success measured at 60 episodes while choosing them: 1.0 ... 0.1)
    ("pd_clean_c4", dict(kp=10.0)),
    ("pd_noise1.0_c4", dict(kp=10.0, noise=1.0)),
    ("pd_noise1.5_c4", dict(kp=10.0, noise=1.5)),
    ("pd_noise2.0_c4", dict(kp=10.0, noise=2.0)),
    ("pd_noise3.0_c4", dict(kp=10.0, noise=3.0)),
    ("pd_kp1.5_c4", dict(kp=1.5)),
    ("pd_kp0.8_c4", dict(kp=0.8)),
    ("pd_offset2.2cm_c4", dict(kp=10.0, offset=0.022)),
    ("pd_offset2.6cm_c4", dict(kp=10.0, offset=0.026)),
    ("pd_hold12_c12", dict(kp=10.0, chunk=12)),
]


def pointmass_zoo(cache: Path, seed: int) -> dict[str, Policy]:
    from robofinetune.algos.bc import BCConfig, train_bc
    from robofinetune.data.collect import collect_episodes
    from robofinetune.data.io import save_dataset
    from robofinetune.policies import load_policy
    from robofinetune.runs import Run

    zoo: dict[str, Policy] = {name: ChunkedPDPolicy(name, **kwargs) for name, kwargs in PD_ZOO}
    demos = cache / "bc_demos.hdf5"
    if not demos.exists():
        save_dataset(collect_episodes("pointmass", 100, seed=seed * 100_000 + 70_000, progress=False), demos,
                     env_meta={"env_name": "pointmass", "task": "pointmass", "source": "scripted"})
    for name, kind, count, steps in BC_ZOO:
        folder = cache / name
        if not (folder / "policy" / "policy.json").exists():
            config = BCConfig(task="pointmass", policy=kind, dataset=str(demos), num_demos=count, seed=seed,
                              max_steps=steps, warmup_steps=min(100, steps // 5), hidden_dim=256, depth=2,
                              batch_size=128, checkpoint_every=10 ** 9, eval_episodes=0, accelerator="cpu")
            print(f"training {name} ({kind}, {count} demos, {steps} steps)", flush=True)
            run = Run(folder)
            train_bc(config, run, progress=False)
            run.close()
        zoo[name] = load_policy(folder / "policy", device="cpu")
        zoo[name].name = name
    return zoo


# --- can zoo ------------------------------------------------------------------------------------------------------


def can_zoo(paths: list[str]) -> dict[str, Policy]:
    from robofinetune.paths import policies_dir
    from robofinetune.policies import load_policy
    from robofinetune.policies.checkpoint import read_policy_document

    folders = [Path(p) for p in paths]
    if not folders:
        candidates = list((policies_dir() / "can").glob("*/policy.json")) + list(Path("runs").glob("*/policy/policy.json"))
        folders = [p.parent for p in candidates if read_policy_document(p.parent)["config"].get("task") == "can"]
    zoo = {}
    for folder in sorted(folders):
        policy = load_policy(folder, device="cpu")
        policy.name = str(folder)
        zoo[str(folder)] = policy
    return zoo


def can_logged_data(paths: list[str]):
    from robofinetune.data.io import load_dataset
    from robofinetune.envs import load_task_spec
    from robofinetune.paths import datasets_dir

    keys = list(load_task_spec("can").obs_keys)
    files = [Path(p) for p in paths] or sorted(datasets_dir().glob("can_*noise*.hdf5"))
    if not files:
        raise SystemExit("no logged can data: pass --data or collect noisy operators, e.g. "
                         "`robofinetune collect --task=can --episodes=100 --noise=1.0`")
    episodes = []
    for path in files:
        episodes += load_dataset(path, obs_keys=keys)[0]
    return episodes, ", ".join(map(str, files))


# --- figures ------------------------------------------------------------------------------------------------------


def newcombe_interval(s1: int, n1: int, s2: int, n2: int, confidence: float = 0.95) -> tuple[float, float]:
    """Interval of p1 - p2 from the two Wilson intervals (Newcombe's hybrid score method)."""
    p1, p2 = s1 / n1, s2 / n2
    l1, u1 = success_rate_ci(s1, n1, confidence)
    l2, u2 = success_rate_ci(s2, n2, confidence)
    difference = p1 - p2
    return (difference - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
            difference + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def pair_figures(names, successes, episodes, estimates, margin, confidence, method) -> dict:
    """False/true promotion rates of the gate and of the bare mean comparison over resolved ordered pairs."""
    counts = {rule: {"worse_pairs": 0, "worse_promoted": 0, "better_pairs": 0, "better_promoted": 0,
                     "unresolved_pairs": 0, "unresolved_promoted": 0} for rule in ("gate", "mean_comparison")}
    false_promotions = []
    for candidate in names:
        for incumbent in names:
            if candidate == incumbent:
                continue
            low, high = newcombe_interval(successes[candidate], episodes[candidate], successes[incumbent],
                                          episodes[incumbent])
            kind = "better" if low > 0 else "worse" if high < 0 else "unresolved"
            decisions = {"gate": decide(estimates[candidate], estimates[incumbent], margin, confidence, method)[0],
                         "mean_comparison": mean_comparison(estimates[candidate], estimates[incumbent])}
            for rule, decision in decisions.items():
                counts[rule][f"{kind}_pairs"] += 1
                counts[rule][f"{kind}_promoted"] += decision == PROMOTE
            if kind == "worse" and decisions["gate"] == PROMOTE:
                false_promotions.append([candidate, incumbent])
    for rule in counts.values():
        rule["false_promotion_rate"] = rule["worse_promoted"] / max(rule["worse_pairs"], 1)
        rule["better_promotion_rate"] = rule["better_promoted"] / max(rule["better_pairs"], 1)
    counts["gate"]["false_promotions"] = false_promotions
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="can", choices=["can", "pointmass"])
    parser.add_argument("--policies", nargs="*", default=[], help="can: policy folders (default: discover)")
    parser.add_argument("--data", nargs="*", default=[], help="can: logged datasets (default: datasets/can_*noise*)")
    parser.add_argument("--eval-episodes", type=int, default=0, help="sim episodes per policy (default 200 "
                        "pointmass, 100 can)")
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--margin", type=float, default=0.0)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--heads", type=int, default=GateConfig.heads)
    parser.add_argument("--steps-per-iteration", type=int, default=GateConfig.steps_per_iteration)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", help="where the pointmass zoo and data are kept (default runs/ope_bench_<task>)")
    parser.add_argument("--output", help="result file name (default ope_<task>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()

    from robofinetune.eval import evaluate_policy

    cache = Path(args.cache or f"runs/ope_bench_{args.task}_seed{args.seed}")
    cache.mkdir(parents=True, exist_ok=True)
    if args.task == "pointmass":
        zoo = pointmass_zoo(cache, args.seed)
        episodes, data = pointmass_logged_data(cache, args.seed)
        data = str(data)
        eval_episodes = args.eval_episodes or 200
    else:
        zoo = can_zoo(args.policies)
        if len(zoo) < 8:
            print(f"only {len(zoo)} can policies found ({list(zoo)}); the benchmark needs >= 8 of spread-out "
                  f"quality. Train them (robofinetune train bc --task=can --num_demos=... --max_steps=...) or pass "
                  f"--policies.", file=sys.stderr)
            return 2
        episodes, data = can_logged_data(args.data)
        eval_episodes = args.eval_episodes or 100

    # ground truth: simulation (reusing a stored eval of the same size: `robofinetune eval` output for can, this
    # script's cache for the pointmass zoo, whose members are fixed by name)
    truth: dict[str, tuple[int, int]] = {}
    truth_cache = cache / f"sim_truth_{eval_episodes}.json"
    cached = json.loads(truth_cache.read_text()) if truth_cache.exists() and args.task == "pointmass" else {}
    for name, policy in zoo.items():
        stored = Path(name) / f"eval_{args.task}_{eval_episodes}.json"
        if name in cached:
            truth[name] = tuple(cached[name])
        elif args.task == "can" and stored.exists():
            report = json.loads(stored.read_text())
            truth[name] = (int(report["successes"]), int(report["episodes"]))
        else:
            result = evaluate_policy(policy, args.task, episodes=eval_episodes, num_envs=args.num_envs,
                                     seed=500_000 + args.seed, progress=False)
            truth[name] = (result.successes, result.episodes)
            if args.task == "pointmass":
                cached[name] = list(truth[name])
                truth_cache.write_text(json.dumps(cached, indent=1))
        print(f"sim  {name:<28} {truth[name][0] / truth[name][1]:6.1%} ({truth[name][0]}/{truth[name][1]})",
              flush=True)

    config = GateConfig(margin=args.margin, confidence=args.confidence, heads=args.heads,
                        steps_per_iteration=args.steps_per_iteration, seed=args.seed)
    estimates = {}
    for name, policy in zoo.items():
        estimates[name] = estimate_policy_value(policy, episodes, config, name, data)
        low, high = estimates[name].interval(config.confidence)
        print(f"ope  {name:<28} {estimates[name].value:.3f} [{low:.3f}, {high:.3f}]  "
              f"gap {estimates[name].action_gap:.2f}  {estimates[name].seconds:.0f}s", flush=True)

    names = list(zoo)
    success = np.array([truth[n][0] / truth[n][1] for n in names])
    values = np.array([estimates[n].value for n in names])
    spearman = float(stats.spearmanr(values, success).statistic)
    kendall = float(stats.kendalltau(values, success).statistic)
    regret = float(success.max() - success[int(np.argmax(values))])
    successes = {n: truth[n][0] for n in names}
    trials = {n: truth[n][1] for n in names}
    pairs = pair_figures(names, successes, trials, estimates, config.margin, config.confidence, config.interval)
    sweep = {f"{level:g}": {rule: {k: pairs_[rule][k] for k in ("false_promotion_rate", "better_promotion_rate")}
                            for rule in ("gate",)}
             for level in (0.8, 0.9, 0.99)
             for pairs_ in [pair_figures(names, successes, trials, estimates, config.margin, level, config.interval)]}

    result = {
        **provenance(args.seed),
        "task": args.task,
        "estimator": "FQE over action chunks (chunk = each policy's executed chunk), paired episode bootstrap "
                     f"({config.heads} heads), t interval; value = discounted success, gamma {config.gamma}",
        "data": data, "logged_episodes": len(episodes), "logged_steps": int(sum(len(e) for e in episodes)),
        "logged_success_rate": float(np.mean([e.success for e in episodes])),
        "sim_episodes_per_policy": eval_episodes,
        "gate_config": config.to_dict(),
        "policies": {n: {"true_success": truth[n][0] / truth[n][1],
                         "true_success_ci": list(success_rate_ci(truth[n][0], truth[n][1])),
                         "ope": estimates[n].to_dict(config.confidence, config.interval)} for n in names},
        "spearman": spearman, "spearman_target": 0.8, "kendall_tau": kendall,
        "regret_at_1": regret,
        "ope_top": names[int(np.argmax(values))], "true_top": names[int(np.argmax(success))],
        "pairs": {"definition": "ordered (candidate, incumbent) pairs whose Newcombe 95% interval of the true "
                                "success difference excludes 0; 'worse' = candidate truly worse",
                  **pairs},
        "false_promotion_target": 0.05,
        "gate_confidence_sweep": sweep,
        "seconds": time.time() - start,
    }
    print(f"spearman {spearman:.3f} (target >= 0.8)  kendall {kendall:.3f}  regret@1 {regret:.3f}")
    for rule in ("gate", "mean_comparison"):
        r = pairs[rule]
        print(f"{rule:<16} false promotion {r['worse_promoted']}/{r['worse_pairs']} = {r['false_promotion_rate']:.1%}"
              f"   better promoted {r['better_promoted']}/{r['better_pairs']} = {r['better_promotion_rate']:.1%}")
    write_result(args.output or f"ope_{args.task}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
