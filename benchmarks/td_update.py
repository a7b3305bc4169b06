"""How long one OGPO TD update takes with the next chunks a' sampled inside the update (2 x 256 denoising chains
of K steps) and with them kept per replay row (``next_action_cache``, the default), for critics of two widths.

The TD update's cost decides how many of them OGPO can afford per env step. Both variants are timed in one run,
alternating, on the same policy, critic and batch (a ratio is meaningful even on a busy machine; the absolute
times are not).

    python benchmarks/td_update.py [--base policies/can/weak_diffusion] [--widths 128 256]

-> benchmarks/results/td_update.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch

from common import median_seconds_alternating, provenance, write_result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default=None, help="policy folder (default: policies/can/weak_diffusion)")
    parser.add_argument("--widths", type=int, nargs="*", default=[128, 256], help="critic hidden widths")
    parser.add_argument("--batch", type=int, default=256, help="critic batch (OGPO's default)")
    parser.add_argument("--samples", type=int, default=2, help="next chunks a' per row (next_action_samples)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from robofinetune.algos.ogpo import OGPOConfig, OGPOLearner, critic_update, prepare_policy
    from robofinetune.paths import policies_dir
    from robofinetune.rl import TransitionBatch

    base = args.base or str(policies_dir() / "can" / "weak_diffusion")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    policy, chain_steps = prepare_policy(OGPOConfig(base=base))
    obs_dim = policy.config.n_obs_steps * policy.config.obs_dim
    action_dim = policy.config.n_action_steps * policy.config.action_dim
    batch = TransitionBatch(0.1 * torch.randn(args.batch, obs_dim), torch.rand(args.batch, action_dim) * 2 - 1,
                            torch.zeros(args.batch), torch.full((args.batch,), 0.96),
                            0.1 * torch.randn(args.batch, obs_dim))
    kept = torch.rand(args.batch, args.samples, action_dim) * 2 - 1
    result: dict[str, Any] = {**provenance(args.seed), "base": base, "chain_steps": chain_steps,
                              "batch": args.batch, "next_action_samples": args.samples, "repeats": args.repeats,
                              "threads": args.threads, "widths": {}}
    for width in args.widths:
        config = OGPOConfig(base=base, critic_hidden_dim=width, next_action_samples=args.samples)
        learner = OGPOLearner(config, policy, chain_steps)

        def with_next_actions(next_actions: torch.Tensor | None) -> Callable[[], float]:
            def measure() -> float:
                started = time.perf_counter()
                critic_update(learner, batch, next_actions)
                return time.perf_counter() - started
            return measure

        medians = median_seconds_alternating({"sampled": with_next_actions(None), "kept": with_next_actions(kept)},
                                             args.repeats)
        entry = {"median_s": medians, "sampled_over_kept": medians["sampled"] / medians["kept"]}
        result["widths"][str(width)] = entry
        print(f"critic 10 x 2 x {width}, batch {args.batch}, {args.samples} a' per row, K = {chain_steps}: "
              f"a' sampled {medians['sampled'] * 1000:.0f} ms, a' kept {medians['kept'] * 1000:.0f} ms "
              f"({entry['sampled_over_kept']:.1f}x)", flush=True)
    write_result("td_update.json", result)


if __name__ == "__main__":
    main()
