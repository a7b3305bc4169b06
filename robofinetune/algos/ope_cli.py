"""``robofinetune gate``: promote a candidate policy over the incumbent only when logged data shows a confident gain.

    robofinetune gate --candidate=A --incumbent=B --data=DATASET [--margin=0.0 --confidence=0.95]

Prints both value estimates, the gain with its interval and PROMOTE or REJECT with the reason; writes
``gate.json`` (+ ``gate_history.jsonl``) and ``gate.png`` into the candidate's folder (or ``--output``).
Exit status: 0 PROMOTE, 1 REJECT, 2 bad input. Every field of :class:`GateConfig` is a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from robofinetune.algos.ope import GateConfig

# set explicitly in add_gate_parser (with their help text); the rest of GateConfig is generated
_DOCUMENTED = {"margin", "confidence"}


def add_gate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "gate", help="off-policy evaluation: promote a candidate only with a confident gain",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", required=True, help="candidate policy checkpoint folder")
    parser.add_argument("--incumbent", required=True, help="incumbent policy checkpoint folder")
    parser.add_argument("--data", required=True,
                        help="logged episodes with rewards: demos, recorded robot episodes or RL replay "
                             "(robomimic .hdf5, .zarr, .zarr.zip)")
    parser.add_argument("--margin", type=float, default=GateConfig.margin,
                        help="required gain in value units (discounted success); default %(default)s")
    parser.add_argument("--confidence", type=float, default=GateConfig.confidence,
                        help="level of the two-sided intervals; PROMOTE needs the lower end above the margin")
    parser.add_argument("--output", help="folder for gate.json / gate.png (default: the candidate folder)")
    parser.add_argument("--no-plot", action="store_true", help="skip gate.png")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bars of the FQE fits (default on; --no-progress for logs)")
    hints = typing.get_type_hints(GateConfig)
    for item in dataclasses.fields(GateConfig):
        if item.name in _DOCUMENTED:
            continue
        parser.add_argument(f"--{item.name.replace('_', '-')}", dest=item.name, type=hints[item.name],
                            default=item.default, help=f"FQE setting (default %(default)s)")
    parser.set_defaults(handler=command_gate)
    return parser


def command_gate(args: argparse.Namespace) -> int:
    from robofinetune.algos.ope import gate_policies, policy_fingerprint
    from robofinetune.data.io import load_dataset
    from robofinetune.policies import load_policy

    config = GateConfig(**{item.name: getattr(args, item.name) for item in dataclasses.fields(GateConfig)})
    config.check()
    candidate = load_policy(args.candidate, device="cpu")
    incumbent = load_policy(args.incumbent, device="cpu")
    keys = list(dict.fromkeys([*candidate.config.obs_keys, *incumbent.config.obs_keys]))
    episodes, _ = load_dataset(args.data, obs_keys=keys, task=candidate.config.task)
    result = gate_policies(candidate, incumbent, episodes, config, data=str(args.data),
                           candidate_name=str(args.candidate), incumbent_name=str(args.incumbent),
                           progress=args.progress)
    result.candidate_fingerprint = policy_fingerprint(args.candidate)
    result.incumbent_fingerprint = policy_fingerprint(args.incumbent)
    folder = Path(args.output) if args.output else Path(args.candidate)
    path = result.save(folder, plot=not args.no_plot)
    print(result.summary())
    print(f"report: {path}" + ("" if args.no_plot else f"   plot: {path.with_name('gate.png')}"))
    return 0 if result.promoted else 1
