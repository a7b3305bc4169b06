"""How long one batch of denoising chains takes to sample, with ``nn.Mish`` and with the package's ``Mish``.

OGPO samples such batches on every critic update (the TD target's next chunks) and every actor round, so this is
the figure its env steps per second follow. Both activations are timed in one run, alternating, on the same
policy and inputs (a ratio is meaningful even on a busy machine; the absolute times are not).

    python benchmarks/chain_sampling.py [--policies DIR ...]   (default: policies/can/weak_diffusion and weak_flow)

-> benchmarks/results/chain_sampling.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch
from torch import nn

from common import median_seconds_alternating, provenance, write_result


def swap_activations(module: nn.Module, replacement: type[nn.Module]) -> int:
    """Replace every Mish-like activation in ``module`` by ``replacement()`` in place; returns how many."""
    from robofinetune.policies.networks import Mish

    count = 0
    for name, child in module.named_children():
        if isinstance(child, (nn.Mish, Mish)):
            setattr(module, name, replacement())
            count += 1
        else:
            count += swap_activations(child, replacement)
    return count


def time_sampling(policy: Any, observation: dict[str, torch.Tensor], steps: int) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        policy.sample(observation, steps=steps, return_chain=True, stochastic=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policies", nargs="*", default=None, help="policy folders (default: the shipped can bases)")
    parser.add_argument("--batch", type=int, default=512, help="chains per batch (OGPO's TD target: 2 x 256)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per chain")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from robofinetune.paths import policies_dir
    from robofinetune.policies import load_policy
    from robofinetune.policies.networks import Mish

    paths = args.policies or [str(policies_dir() / "can" / name) for name in ("weak_diffusion", "weak_flow")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    result: dict[str, Any] = {**provenance(args.seed), "batch": args.batch, "steps": args.steps,
                              "repeats": args.repeats, "threads": args.threads, "policies": {}}
    for path in paths:
        policy = load_policy(path).eval()
        config = policy.config
        observation = {key: torch.randn(args.batch, config.n_obs_steps, *config.obs_shapes[key])
                       for key in config.obs_keys}

        def with_activation(activation: type[nn.Module]) -> Callable[[], float]:
            def measure() -> float:
                swap_activations(policy, activation)   # outside the timed sampling
                return time_sampling(policy, observation, args.steps)
            return measure

        medians = median_seconds_alternating({"torch_mish": with_activation(nn.Mish),
                                              "package_mish": with_activation(Mish)}, args.repeats)
        entry = {"kind": type(policy).__name__, "median_s": medians,
                 "torch_over_package": medians["torch_mish"] / medians["package_mish"]}
        result["policies"][path] = entry
        print(f"{path}: {args.batch} chains x {args.steps} steps, median of {args.repeats}: "
              f"nn.Mish {medians['torch_mish'] * 1000:.0f} ms, package Mish {medians['package_mish'] * 1000:.0f} ms "
              f"({entry['torch_over_package']:.2f}x)", flush=True)
    write_result("chain_sampling.json", result)


if __name__ == "__main__":
    main()
