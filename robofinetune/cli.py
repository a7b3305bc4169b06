"""The ``robofinetune`` command.

    robofinetune collect --task=can --source=scripted --episodes=200
    robofinetune data info PATH | data convert SRC DST
    robofinetune train bc|residual|ogpo --task=can [--key=value ...] [--resume=RUN_DIR]
    robofinetune eval --task=can --policy=PATH --episodes=100 [--video]
    robofinetune distill --teacher=PATH --task=can
    robofinetune gate --candidate=A --incumbent=B --data=DATASET
    robofinetune deploy --robot=real_robot/can_twin.yaml --policy=PATH --episodes=N
    robofinetune record --robot=real_robot/can_twin.yaml --teleop=keyboard
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from robofinetune.errors import RobofinetuneError

# Each training method is a module under robofinetune/algos exposing `Config` (a dataclass) and
# `train(config, run, resume) -> dict`. Methods from later stages add themselves here.
TRAIN_METHODS = {
    "bc": "robofinetune.algos.bc",
    "residual": "robofinetune.algos.residual",
    "ogpo": "robofinetune.algos.ogpo",
}


EXTRA_COMMANDS = {
    "distill": ("robofinetune.algos.distill", "add_distill_parser", "one-step consistency student of a policy"),
    "gate": ("robofinetune.algos.ope_cli", "add_gate_parser", "off-policy evaluation gate: promote only with a confident gain"),
    "deploy": ("robofinetune.robot.cli", "add_deploy_parser", "run a policy on a robot (or its MuJoCo twin) over ROS"),
    "record": ("robofinetune.robot.cli", "add_record_parser", "record teleoperated episodes into a dataset"),
}


def _command_collect(args: argparse.Namespace) -> int:
    from robofinetune.data.collect import collect_episodes
    from robofinetune.data.io import save_dataset
    from robofinetune.paths import datasets_dir

    noise_tag = f"_noise{args.noise:g}" if args.noise else ""
    output = Path(args.output) if args.output else datasets_dir() / f"{args.task}_{args.source}_{args.episodes}{noise_tag}.hdf5"
    episodes = collect_episodes(args.task, args.episodes, source=args.source, noise=args.noise, seed=args.seed,
                                only_success=args.only_success)
    save_dataset(episodes, output, env_meta={"env_name": args.task, "task": args.task, "source": args.source,
                                              "noise": args.noise, "seed": args.seed})
    successes = sum(episode.success for episode in episodes)
    print(f"wrote {len(episodes)} episodes ({successes} successful, {sum(len(e) for e in episodes)} steps) to {output}")
    return 0


def _command_data(args: argparse.Namespace) -> int:
    if args.data_command == "info":
        from robofinetune.data.info import dataset_info, format_info

        info = dataset_info(args.path)
        print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    elif args.data_command == "convert":
        from robofinetune.data.io import convert_dataset

        output = convert_dataset(args.source, args.destination, task=args.task)
        print(f"wrote {output or args.destination}")
    return 0


# What a resumed run may change: its length and how it is watched, never what it learns with.
RESUME_OVERRIDABLE = ("total_env_steps", "eval_every", "eval_episodes", "final_eval_episodes", "checkpoint_every",
                      "log_every", "progress")


def _resume_overrides(overrides: dict, saved: dict, run_path) -> dict:
    """The overrides a ``--resume`` may apply (e.g. ``--total_env_steps`` to extend a finished run); any other
    field is an error, not silently ignored: a run's learning settings are fixed by its config.yaml."""
    from robofinetune.errors import ConfigError

    refused = sorted(key for key in overrides if key not in RESUME_OVERRIDABLE or key not in saved)
    if refused:
        raise ConfigError(f"{run_path}: --resume keeps the run's config.yaml; it can change only "
                          f"{[key for key in RESUME_OVERRIDABLE if key in saved]}, not {refused}")
    return dict(overrides)


def _command_train(args: argparse.Namespace, extra: list[str]) -> int:
    from robofinetune.config import config_from_dict, parse_overrides, resolve_config
    from robofinetune.runs import Run

    module = importlib.import_module(TRAIN_METHODS[args.method])
    overrides = parse_overrides(extra)
    if args.resume:
        run = Run.open(args.resume)
        saved = run.saved_config()
        extended = _resume_overrides(overrides, saved, run.path)
        config = config_from_dict(module.Config, {**saved, **extended}, str(run.path / "config.yaml"))
        if extended:
            run.save_config(config)
            print(f"resuming with {extended} (config.yaml updated)")
        print(f"resuming {run.path}")
    else:
        config = resolve_config(module.Config, args.method, overrides, extra_preset=args.config)
        run = Run.create(args.method, getattr(config, "task", "task"), config, root=args.runs_dir)
        print(f"run folder: {run.path}")
    summary = module.train(config, run, resume=bool(args.resume))
    run.close()
    for key, value in summary.items():
        print(f"  {key}: {value}")
    print(f"run folder: {run.path}")
    return 0


def _command_eval(args: argparse.Namespace) -> int:
    from robofinetune.eval import evaluate_policy
    from robofinetune.policies import load_policy

    from robofinetune.envs import load_task_spec

    task_name = load_task_spec(args.task).name  # a robot YAML names the sim task it mirrors
    policy = load_policy(args.policy, task=task_name if not args.any_task else None)
    video_dir = Path(args.output).with_suffix("") if args.output else Path(args.policy) / "videos"
    result = evaluate_policy(policy, args.task, episodes=args.episodes, num_envs=args.num_envs, seed=args.seed,
                             video_dir=video_dir if args.video else None, video_episodes=args.video_episodes)
    report = {**result.to_dict(), "policy": str(args.policy), "seed": args.seed}
    output = Path(args.output) if args.output else Path(args.policy) / f"eval_{args.task}_{args.episodes}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(result.summary())
    if result.videos:
        print(f"videos: {', '.join(result.videos)}")
    print(f"report: {output}")
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robofinetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    collect = commands.add_parser("collect", help="record demos with a scripted expert")
    collect.add_argument("--task", required=True)
    collect.add_argument("--source", default="scripted", choices=["scripted"])
    collect.add_argument("--episodes", type=int, default=200)
    collect.add_argument("--noise", type=float, default=0.0,
                         help="operator variability: 0 = clean expert, 0.5-1 = imperfect multi-operator demos")
    collect.add_argument("--seed", type=int, default=0)
    collect.add_argument("--only-success", action="store_true", help="keep only successful episodes")
    collect.add_argument("--output", help="dataset path (.hdf5 robomimic or .zarr / .zarr.zip)")

    data = commands.add_parser("data", help="inspect and convert datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    info = data_commands.add_parser("info", help="episodes, lengths, keys, shapes, statistics")
    info.add_argument("path")
    info.add_argument("--json", action="store_true")
    convert = data_commands.add_parser("convert", help="robomimic HDF5 <-> zarr; import robosuite demos")
    convert.add_argument("source")
    convert.add_argument("destination")
    convert.add_argument("--task", help="task for replaying robosuite demos (inferred when possible)")

    train = commands.add_parser("train", help="train a policy: bc, residual, ogpo",
                                description="Any config field can be set as --field=value.")
    train.add_argument("method", choices=sorted(TRAIN_METHODS))
    train.add_argument("--resume", help="continue the run in this folder from its last checkpoint")
    train.add_argument("--config", help="a YAML of config fields applied after the task preset")
    train.add_argument("--runs-dir", help="where run folders go (default ./runs)")

    evaluate = commands.add_parser("eval", help="success rate in simulation, with a 95%% interval")
    evaluate.add_argument("--task", required=True)
    evaluate.add_argument("--policy", required=True, help="policy checkpoint folder")
    evaluate.add_argument("--episodes", type=int, default=100)
    evaluate.add_argument("--num-envs", type=int, default=2, help="parallel env processes")
    evaluate.add_argument("--seed", type=int, default=100_000)
    evaluate.add_argument("--video", action="store_true", help="write mp4s of a few episodes")
    evaluate.add_argument("--video-episodes", type=int, default=3)
    evaluate.add_argument("--output", help="JSON report path (default: inside the policy folder)")
    evaluate.add_argument("--any-task", action="store_true", help="skip the checkpoint's task-name check")

    # Later stages bring their own sub-commands; each sets `handler` on its parser. Their modules import
    # Lightning and friends, so only the one being run is imported (the others get a one-line stub for --help).
    for name, (module_name, function_name, summary) in EXTRA_COMMANDS.items():
        if command in (None, name):
            getattr(importlib.import_module(module_name), function_name)(commands)
        else:
            commands.add_parser(name, help=summary)
    return parser


def limit_cpu_threads() -> None:
    """On a CPU-only machine, give torch half the cores unless OMP_NUM_THREADS says otherwise.

    Env worker processes need the other half; with every core claimed by torch's intra-op pool as well, the
    pool's threads wait on each other and training ran 10x slower on the 2-core dev machine (measured).
    """
    import os

    import torch

    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    command = next((argument for argument in arguments if not argument.startswith("-")), None)
    parser = build_parser(command if command in EXTRA_COMMANDS else "")
    args, extra = parser.parse_known_args(arguments)
    limit_cpu_threads()
    try:
        if args.command == "train":
            return _command_train(args, extra)
        if hasattr(args, "handler"):
            return args.handler(args) if not extra else parser.error(f"unrecognised arguments: {' '.join(extra)}")
        if extra:
            parser.error(f"unrecognised arguments: {' '.join(extra)}")
        handler = {"collect": _command_collect, "data": _command_data, "eval": _command_eval}[args.command]
        return handler(args)
    except RobofinetuneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
