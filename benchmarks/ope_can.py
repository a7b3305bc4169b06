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


BC_ZOO = [  # name, policy kind, demos, steps, demo source, keep failed demos: from untrained to perfect
    ("bc_flow_d3_s150", "flow", 3, 150, "clean", False),
    ("bc_flow_d10_s600", "flow", 10, 600, "clean", False),
    ("bc_diffusion_d30_s1500", "diffusion", 30, 1500, "clean", False),
    ("bc_flow_d100_s3000", "flow", 100, 3000, "clean", False),
    ("bc_flow_d5_s300", "flow", 5, 300, "clean", False),
    ("bc_diffusion_d10_s400", "diffusion", 10, 400, "clean", False),
    ("bc_flow_noisy1.0_d60_s800", "flow", 60, 800, "noise1.0", False),
    ("bc_flow_noisy1.5all_d100_s800", "flow", 100, 800, "noise1.5", True),
    ("bc_diffusion_noisy2.0all_d100_s800", "diffusion", 100, 800, "noise2.0", True),
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


def pointmass_zoo(cache: Path, seed: int, members: str = "all") -> dict[str, Policy]:
    """``members``: all | pd | bc. BC policies are trained once and kept in ``cache``."""
    from robofinetune.algos.bc import BCConfig, train_bc
    from robofinetune.data.collect import collect_episodes
    from robofinetune.data.io import save_dataset
    from robofinetune.policies import load_policy
    from robofinetune.runs import Run

    zoo: dict[str, Policy] = {}
    if members in ("all", "pd"):
        zoo.update({name: ChunkedPDPolicy(name, **kwargs) for name, kwargs in PD_ZOO})
    if members not in ("all", "bc"):
        return zoo
    # demo sets for BC (seeds disjoint from the logged mixture's): clean expert, and noisy operators
    sources = {"clean": 0.0, "noise1.0": 1.0, "noise1.5": 1.5, "noise2.0": 2.0}
    for name, kind, count, steps, source, keep_failures in BC_ZOO:
        demos = cache / ("bc_demos.hdf5" if source == "clean" else f"bc_demos_{source}.hdf5")
        if not demos.exists():
            offset = 70_000 + 1_000 * list(sources).index(source)
            save_dataset(collect_episodes("pointmass", 100, noise=sources[source], seed=seed * 100_000 + offset,
                                          progress=False), demos,
                         env_meta={"env_name": "pointmass", "task": "pointmass", "source": f"scripted {source}"})
        folder = cache / name
        if not (folder / "policy" / "policy.json").exists():
            config = BCConfig(task="pointmass", policy=kind, dataset=str(demos), num_demos=count, seed=seed,
                              only_success=not keep_failures, max_steps=steps, warmup_steps=min(100, steps // 5),
                              hidden_dim=256, depth=2, batch_size=128, checkpoint_every=10 ** 9, eval_episodes=0,
                              accelerator="cpu")
            print(f"training {name} ({kind}, {count} {source} demos, {steps} steps)", flush=True)
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


def success_lengths(episode_success, episode_length) -> list[int]:
    """Lengths of the successful episodes: with the episode count, enough for discounted success at any gamma."""
    return [int(length) for ok, length in zip(episode_success, episode_length) if ok]


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


def figures(names, truth, estimates, config: GateConfig) -> dict:
    """Rank agreement and pair decisions of the gate vs the bare mean comparison, over the policies ``names``."""
    success = np.array([truth[n]["successes"] / truth[n]["episodes"] for n in names])
    values = np.array([estimates[n].value for n in names])
    result = {"policy_count": len(names),
              "spearman": float(stats.spearmanr(values, success).statistic),
              "kendall_tau": float(stats.kendalltau(values, success).statistic),
              "regret_at_1": float(success.max() - success[int(np.argmax(values))]),
              "ope_top": names[int(np.argmax(values))], "true_top": names[int(np.argmax(success))]}
    discounted = [truth[n].get("discounted") for n in names]
    if all(d is not None for d in discounted):
        # FQE estimates discounted success; this separates its own error from the metric's difference
        result["spearman_vs_true_discounted_value"] = float(stats.spearmanr(values, discounted).statistic)
        result["mean_abs_error_vs_true_discounted_value"] = float(np.mean(np.abs(values - np.array(discounted))))
    successes = {n: truth[n]["successes"] for n in names}
    trials = {n: truth[n]["episodes"] for n in names}
    result["pairs"] = pair_figures(names, successes, trials, estimates, config.margin, config.confidence,
                                   config.interval)
    result["gate_confidence_sweep"] = {
        f"{level:g}": {key: sweep["gate"][key] for key in ("false_promotion_rate", "better_promotion_rate")}
        for level in (0.8, 0.9, 0.99)
        for sweep in [pair_figures(names, successes, trials, estimates, config.margin, level, config.interval)]}
    return result


def print_figures(label: str, figures_: dict) -> None:
    print(f"[{label}] {figures_['policy_count']} policies: spearman {figures_['spearman']:.3f} (target >= 0.8)  "
          f"regret@1 {figures_['regret_at_1']:.3f}"
          + (f"  spearman vs true discounted value {figures_['spearman_vs_true_discounted_value']:.3f}"
             if "spearman_vs_true_discounted_value" in figures_ else ""))
    for rule in ("gate", "mean_comparison"):
        r = figures_["pairs"][rule]
        print(f"    {rule:<16} false promotion {r['worse_promoted']}/{r['worse_pairs']} = "
              f"{r['false_promotion_rate']:.1%}   better promoted {r['better_promoted']}/{r['better_pairs']} = "
              f"{r['better_promotion_rate']:.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="can", choices=["can", "pointmass"])
    parser.add_argument("--zoo", default="all", choices=["all", "pd", "bc"], help="pointmass: which policies")
    parser.add_argument("--policies", nargs="*", default=[], help="can: policy folders (default: discover)")
    parser.add_argument("--data", nargs="*", default=[], help="can: logged datasets (default: datasets/can_*noise*)")
    parser.add_argument("--eval-episodes", type=int, default=0, help="sim episodes per policy (default 200 "
                        "pointmass, 100 can)")
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--margin", type=float, default=0.0)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--heads", type=int, default=GateConfig.heads)
    parser.add_argument("--gamma", type=float, default=GateConfig.gamma, help="FQE discount: the estimate is the "
                        "gamma-discounted success; closer to 1 ranks by success alone, further from 1 rewards speed")
    parser.add_argument("--steps-per-iteration", type=int, default=GateConfig.steps_per_iteration)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", help="where the pointmass zoo, data, sim results and FQE estimates are kept "
                        "(default runs/ope_bench_<task>_seed<seed>)")
    parser.add_argument("--output", help="result file name (default ope_<task>.json)")
    parser.add_argument("--cache-only", action="store_true", help="only fill the cache with sim truths and FQE "
                        "estimates of these policies (split a zoo over processes with separate --cache folders, "
                        "merge the JSON files, then run once more for the figures)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()

    from robofinetune.eval import evaluate_policy

    cache = Path(args.cache or f"runs/ope_bench_{args.task}_seed{args.seed}")
    cache.mkdir(parents=True, exist_ok=True)
    if args.task == "pointmass":
        zoo = pointmass_zoo(cache, args.seed, args.zoo)
        episodes, data = pointmass_logged_data(cache, args.seed)
        data = str(data)
        eval_episodes = args.eval_episodes or 200
    else:
        zoo = can_zoo(args.policies)
        if len(zoo) < 8 and not args.cache_only:
            print(f"only {len(zoo)} can policies found ({list(zoo)}); the benchmark needs >= 8 of spread-out "
                  f"quality. Train them (robofinetune train bc --task=can --num_demos=... --max_steps=...) or pass "
                  f"--policies.", file=sys.stderr)
            return 2
        episodes, data = can_logged_data(args.data)
        eval_episodes = args.eval_episodes or 100
    config = GateConfig(margin=args.margin, confidence=args.confidence, heads=args.heads, gamma=args.gamma,
                        steps_per_iteration=args.steps_per_iteration, seed=args.seed)

    # ground truth from simulation: success (and discounted success, FQE's own target) per policy; cached by
    # name in the cache folder (the pointmass zoo is fixed by name; can reuses `robofinetune eval` reports too)
    truth_cache = cache / f"sim_truth_{eval_episodes}_seed{500_000 + args.seed}.json"
    truth: dict[str, dict] = json.loads(truth_cache.read_text()) if truth_cache.exists() else {}
    for name, policy in zoo.items():
        # `robofinetune eval` reports kept with the policy (eval_can_100.json, eval_can_100_seed100000.json, ...)
        stored = next(iter(sorted(Path(name).glob(f"eval_{args.task}_{eval_episodes}*.json"))), Path("-"))
        if name not in truth and args.task == "can" and stored.exists():
            report = json.loads(stored.read_text())
            truth[name] = {"successes": int(report["successes"]), "episodes": int(report["episodes"]),
                           "success_lengths": success_lengths(report.get("episode_success", []),
                                                              report.get("episode_length", [])),
                           "source": str(stored)}
        if name not in truth:
            result = evaluate_policy(policy, args.task, episodes=eval_episodes, num_envs=args.num_envs,
                                     seed=500_000 + args.seed, progress=False)
            truth[name] = {"successes": result.successes, "episodes": result.episodes,
                           "success_lengths": success_lengths(result.episode_success, result.episode_length),
                           "mean_length": result.mean_length, "source": f"sim, seeds {500_000 + args.seed}+"}
            truth_cache.write_text(json.dumps(truth, indent=1))
        t = truth[name]
        # discounted success (FQE's own target) from the successful episodes' lengths, for this run's gamma
        if len(t.get("success_lengths", [])) == t["successes"]:
            t["discounted"] = float(sum(config.gamma ** (length - 1) for length in t["success_lengths"]) / t["episodes"])
        print(f"sim  {name:<36} {t['successes'] / t['episodes']:6.1%} ({t['successes']}/{t['episodes']})"
              + (f"  discounted {t['discounted']:.3f}" if t.get("discounted") is not None else ""), flush=True)

    # FQE estimates, cached by the estimate key (same data, same fitting config)
    from robofinetune.algos.ope import PolicyEstimate, estimate_key

    key = estimate_key(config, episodes)
    estimate_cache = cache / f"ope_estimates_{key}.json"
    stored_estimates = json.loads(estimate_cache.read_text()) if estimate_cache.exists() else {}
    estimates = {}
    for name, policy in zoo.items():
        if name in stored_estimates:
            estimates[name] = PolicyEstimate.from_dict({**stored_estimates[name], "config_key": key})
        else:
            estimates[name] = estimate_policy_value(policy, episodes, config, name, data)
            stored_estimates[name] = estimates[name].to_dict(config.confidence, config.interval)
            estimate_cache.write_text(json.dumps(stored_estimates, indent=1))
        low, high = estimates[name].interval(config.confidence)
        print(f"ope  {name:<36} {estimates[name].value:.3f} [{low:.3f}, {high:.3f}]  "
              f"gap {estimates[name].action_gap:.2f}  {estimates[name].seconds:.0f}s", flush=True)

    if args.cache_only:
        return 0
    names = list(zoo)
    subsets = {"all": names}
    if args.task == "pointmass" and args.zoo == "all":
        subsets["bc"] = [n for n in names if n.startswith("bc_")]
        subsets["pd"] = [n for n in names if n.startswith("pd_")]
    results = {label: figures(members, truth, estimates, config) for label, members in subsets.items()}
    result = {
        **provenance(args.seed),
        "task": args.task,
        "zoo": args.zoo if args.task == "pointmass" else "can checkpoints",
        "estimator": "FQE over action chunks (chunk = each policy's executed chunk), paired episode bootstrap "
                     f"({config.heads} heads), t interval; value = discounted success, gamma {config.gamma}",
        "data": data, "logged_episodes": len(episodes), "logged_steps": int(sum(len(e) for e in episodes)),
        "logged_success_rate": float(np.mean([e.success for e in episodes])),
        "sim_episodes_per_policy": eval_episodes,
        "gate_config": config.to_dict(),
        "policies": {n: {"true_success": truth[n]["successes"] / truth[n]["episodes"],
                         "true_success_ci": list(success_rate_ci(truth[n]["successes"], truth[n]["episodes"])),
                         "true_discounted_success": truth[n].get("discounted"),
                         "ope": estimates[n].to_dict(config.confidence, config.interval)} for n in names},
        "pairs_definition": "ordered (candidate, incumbent) pairs whose Newcombe 95% interval of the true success "
                            "difference excludes 0; false promotion = PROMOTE for a truly worse candidate",
        "targets": {"spearman": 0.8, "false_promotion_rate": 0.05},
        **results["all"],
        "subsets": {label: value for label, value in results.items() if label != "all"},
        "seconds": time.time() - start,
    }
    for label, value in results.items():
        print_figures(label, value)
    write_result(args.output or f"ope_{args.task}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
