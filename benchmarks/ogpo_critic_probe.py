"""Critic quality, measured (issue 18): does OGPO's critic rank a state's chains well enough to steer the policy?

Logs ``--episodes`` episodes of the base's stochastic chain (the first critic's preset: chain and base), trains
each critic recipe offline as OGPO does on the first ``--train-episodes`` (+ demos when the recipe samples them),
and reports on the held-out episodes the AUC of Q(s, a_logged) for the episode's success, the partial
correlation of the logged chunk's advantage over fresh chains with success given V(s), group Q std against head
disagreement, and the conservative rule's active fraction (``robofinetune.algos.critic_probe``; the same as
``robofinetune ogpo-probe``). Target: AUC >= 0.75 for the recipe ``configs/ogpo/can_cpu.yaml`` uses.

    python benchmarks/ogpo_critic_probe.py                       # full scale: 120 episodes, 80 for training
    python benchmarks/ogpo_critic_probe.py --episodes 6 --train-episodes 4 --td-steps 20 --out /tmp/probe.json

-> benchmarks/results/ogpo_critic_probe.json (only from a run of at least 120 episodes; smaller runs need --out)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import provenance, write_result

RESULT = "ogpo_critic_probe.json"


def main() -> None:
    from robofinetune.algos.critic_probe import format_probe, run_probe
    from robofinetune.cli import limit_cpu_threads
    from robofinetune.paths import configs_dir

    # as every robofinetune command does: beside another job, two intra-op threads on 2 cores made each TD step
    # ~1.3 s instead of tens of milliseconds (measured, the full-scale probe next to a training run)
    limit_cpu_threads()

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="can")
    parser.add_argument("--base", default="", help="policy folder (default: the first preset's base)")
    parser.add_argument("--critic", nargs=2, action="append", metavar=("NAME", "PRESET"),
                        help="a critic recipe to probe (repeatable); default: can_cpu.yaml and can.yaml")
    parser.add_argument("--episodes", type=int, default=120)
    parser.add_argument("--train-episodes", type=int, default=80)
    parser.add_argument("--td-steps", type=int, default=20_000, help="TD steps per critic")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--probe-states", type=int, default=400)
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help=f"result path (default benchmarks/results/{RESULT}, full-scale runs only)")
    args = parser.parse_args()
    if args.out is None and args.episodes < 120:
        parser.error(f"a run of {args.episodes} episodes does not replace benchmarks/results/{RESULT}; "
                     f"give --out for a small run")
    critics = ({name: path for name, path in args.critic} if args.critic else
               {"reference_cpu": str(configs_dir() / "ogpo" / "can_cpu.yaml"),
                "current": str(configs_dir() / "ogpo" / "can.yaml")})
    result = run_probe(args.task, critics, base=args.base, episodes=args.episodes, train_episodes=args.train_episodes,
                       td_steps=args.td_steps, group_size=args.group_size, max_states=args.probe_states,
                       num_envs=args.num_envs, seed=args.seed)
    result["provenance"] = provenance(args.seed)
    print(format_probe(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=float))
        print(f"wrote {args.out}")
    else:
        write_result(RESULT, result)


if __name__ == "__main__":
    main()
