"""The ``robofinetune`` command.

    robofinetune collect --task=can --source=scripted --episodes=200 [--num-envs=2 | --num-env-workers=N]
    robofinetune data info PATH | data convert SRC DST
    robofinetune data convert RUN.bag|RUN.mcap|ROS2_BAG_DIR [...] DST --robot=real_robot/<robot>.yaml
    robofinetune train bc|residual|ogpo --task=can [--key=value ...] [--resume=RUN_DIR]
    robofinetune eval --task=can --policy=PATH --episodes=100 [--video] [--out=DIR]
    robofinetune distill --teacher=PATH --task=can
    robofinetune gate --candidate=A --incumbent=B --data=DATASET
    robofinetune ogpo-probe --task=can [--critic NAME=PRESET.yaml ...] [--episodes=120 --train-episodes=80]
    robofinetune deploy --robot=real_robot/can_twin.yaml --policy=PATH --episodes=N
    robofinetune record --robot=real_robot/can_twin.yaml --teleop=keyboard
    robofinetune robot-actor status|stop --name=residual-<robot> [--ray-address=auto]

Any command takes --verbose: the simulator's own start-up warnings and info lines on the terminal too (by
default they go only to robosuite.log in the run folder).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robofinetune.errors import RobofinetuneError
from robofinetune.logs import LOG_FILE_NAME, restore, set_log_file, set_verbose, snapshot

# Each training method is a module under robofinetune/algos exposing `Config` (a dataclass) and
# `train(config, run, resume) -> dict`. Methods from later stages add themselves here.
TRAIN_METHODS = {
    "bc": "robofinetune.algos.bc",
    "residual": "robofinetune.algos.residual",
    "ogpo": "robofinetune.algos.ogpo",
}


VERBOSE_FLAG = "--verbose"

EXTRA_COMMANDS = {
    "distill": ("robofinetune.algos.distill", "add_distill_parser", "one-step consistency student of a policy"),
    "gate": ("robofinetune.algos.ope_cli", "add_gate_parser", "off-policy evaluation gate: promote only with a confident gain"),
    "deploy": ("robofinetune.robot.cli", "add_deploy_parser", "run a policy on a robot (or its MuJoCo twin) over ROS"),
    "record": ("robofinetune.robot.cli", "add_record_parser", "record teleoperated episodes into a dataset"),
    "ogpo-probe": ("robofinetune.algos.critic_probe", "add_probe_parser",
                   "does a critic rank a policy's chains? (OGPO critic probe)"),
    "robot-actor": ("robofinetune.distributed.robot_actor_cli", "add_robot_actor_parser",
                    "status / stop a robot actor (train residual --robot-actor)"),
}


def _command_collect(args: argparse.Namespace) -> int:
    from robofinetune.data.collect import collect_episodes
    from robofinetune.data.io import save_dataset
    from robofinetune.paths import datasets_dir

    from robofinetune.data.collect import default_collect_envs

    if args.num_envs is None:
        args.num_envs = default_collect_envs()
    noise_tag = f"_noise{args.noise:g}" if args.noise else ""
    output = Path(args.output) if args.output else datasets_dir() / f"{args.task}_{args.source}_{args.episodes}{noise_tag}.hdf5"
    episodes = collect_episodes(args.task, args.episodes, source=args.source, noise=args.noise, seed=args.seed,
                                only_success=args.only_success, num_envs=args.num_envs,
                                num_env_workers=args.num_env_workers, ray_address=args.ray_address)
    save_dataset(episodes, output, env_meta={"env_name": args.task, "task": args.task, "source": args.source,
                                              "noise": args.noise, "seed": args.seed})
    successes = sum(episode.success for episode in episodes)
    print(f"wrote {len(episodes)} episodes ({successes} successful, {sum(len(e) for e in episodes)} steps) to {output}")
    return 0


def _command_data(args: argparse.Namespace) -> int:
    from robofinetune.data.bag_import import is_bag

    if args.data_command == "info" and is_bag(args.path):
        from robofinetune.data.bag_import import bag_info, format_bag_info

        info = bag_info(args.path, robot=args.robot)
        print(json.dumps(info, indent=2, default=str) if args.json else format_bag_info(info))
    elif args.data_command == "info":
        from robofinetune.data.info import dataset_info, format_info

        info = dataset_info(args.path)
        print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    elif args.data_command == "convert" and any(is_bag(source) for source in args.source):
        return _convert_bags(args)
    elif args.data_command == "convert":
        from robofinetune.data.io import convert_dataset
        from robofinetune.errors import ConfigError

        if len(args.source) != 1:
            raise ConfigError(f"data convert: one source dataset at a time (several sources only for ROS bags), "
                              f"got {args.source}")
        cameras = [name for name in (args.cameras or "").split(",") if name]
        output = convert_dataset(args.source[0], args.destination, task=args.task, cameras=cameras or None,
                                 progress=True)
        print(f"wrote {output or args.destination}")
    return 0


def _convert_bags(args: argparse.Namespace) -> int:
    from robofinetune.data.bag_import import BagOptions, convert_bags, is_bag
    from robofinetune.errors import ConfigError

    not_bags = [source for source in args.source if not is_bag(source)]
    if not_bags:
        raise ConfigError(f"data convert: {not_bags} are not ROS bags (.bag, .mcap, .db3 or a folder with "
                          f"metadata.yaml); convert bags and datasets separately")
    if not args.robot:
        raise ConfigError("data convert: a ROS bag needs --robot=real_robot/<robot>.yaml (its topics, command "
                          "scaling and control rate say how the bag becomes episodes)")
    options = BagOptions(ticks=args.ticks, clock=args.clock, split=args.split, episode_topic=args.episode_topic,
                         gap=args.gap)
    output, reports = convert_bags(args.source, args.destination, args.robot, options)
    for report in reports:
        print(report.summary())
    episodes = sum(report.episodes for report in reports)
    print(f"wrote {episodes} episode{'s' * (episodes != 1)} ({sum(report.steps for report in reports)} steps) "
          f"to {output}")
    return 0


# What a resumed run may change: its length and how it is watched, never what it learns with.
# device: a run started on a GPU machine may go on on a CPU one (checkpoints are device-independent)
RESUME_OVERRIDABLE = ("total_env_steps", "eval_every", "eval_episodes", "final_eval_episodes", "checkpoint_every",
                      "log_every", "progress", "device")


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
    set_log_file(run.path / LOG_FILE_NAME)
    summary = module.train(config, run, resume=bool(args.resume))
    run.close()
    for key, value in summary.items():
        print(f"  {key}: {value}")
    print(f"run folder: {run.path}")
    print("\n".join(next_steps(args.method, config, run.path)))
    return 0


def _shown(path: str | Path) -> str:
    """``path`` as a user would type it: relative to the working folder when it lies inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def next_steps(method: str, config: Any, run_path: Path) -> list[str]:
    """The commands to run on what ``train <method>`` produced: watch it, gate it, distil it, deploy it to the twin.

    Printed at the end of a training run; every line is a real command line of this CLI.
    """
    import shutil

    from robofinetune.paths import project_root

    task = str(getattr(config, "task", ""))
    best = run_path / "best"
    gated = bool(getattr(config, "gate", False)) and (best / "policy.json").is_file()
    policy = _shown(best if gated else run_path / "policy")
    lines = [f"result: {policy}" + ("  (promoted by the gate over the base: it carries the record deploy needs)"
                                    if gated else ""), "next:"]
    found, invoked = shutil.which("robofinetune"), Path(sys.argv[0])
    if invoked.name == "robofinetune" and (found is None or Path(found).resolve() != invoked.resolve()):
        lines.append(f"  source {_shown(invoked.parent / 'activate')}      # puts robofinetune on PATH")
    lines += [f"  # watch it (report and videos go to runs/<time>_eval_{Path(task).stem}/)",
              f"  robofinetune eval --task={task} --policy={policy} --episodes=20 --video"]
    base = None
    if method in ("residual", "ogpo"):
        from robofinetune.algos.bc import default_dataset
        from robofinetune.rl.setup import base_path

        base = _shown(base_path(config.base, task))
        data = _shown(getattr(config, "gate_data", "") or config.dataset or default_dataset(task))
        if not gated:
            lines += [f"  # promote it over its base only with a confident gain on logged data (deploy asks for this)",
                      f"  robofinetune gate --candidate={policy} --incumbent={base} --data={data}"]
    elif method == "bc":
        lines += ["  # make it better with residual RL",
                  f"  robofinetune train residual --task={task} --base={policy}"]
    lines += ["  # a one-step student for real-time control",
              f"  robofinetune distill --teacher={policy} --task={task}"]
    twin = project_root() / "real_robot" / f"{Path(task).stem}_twin.yaml"
    if base is not None and twin.is_file():
        lines += ["  # run it on the MuJoCo twin of the robot, over ROS (after the gate has promoted it)",
                  f'  eval "$({_shown(project_root() / "scripts" / "ci_ros.sh")} start)"      # a roscore',
                  f"  python {_shown(project_root() / 'real_robot' / 'mujoco_twin_node.py')} --robot {_shown(twin)} &",
                  f"  robofinetune deploy --robot={_shown(twin)} --policy={policy} --incumbent={base} --episodes=10"]
    return lines


@dataclass
class EvalConfig:
    """What ``eval`` was asked (the run folder's config.yaml)."""

    task: str
    policy: str
    episodes: int
    num_envs: int
    seed: int
    video: bool
    video_episodes: int
    num_env_workers: int = 0
    ray_address: str = ""


def _ray_env_options(args: argparse.Namespace) -> dict[str, Any]:
    """make_vector_env's options for --num-env-workers / --ray-address: {} keeps the local env processes."""
    if not args.num_env_workers:
        return {}
    return {"backend": "ray", "num_workers": args.num_env_workers, "ray_address": args.ray_address or None}


def _command_eval(args: argparse.Namespace) -> int:
    from robofinetune.envs import load_task_spec
    from robofinetune.eval import evaluate_policy
    from robofinetune.policies import load_policy
    from robofinetune.runs import Run

    task_name = load_task_spec(args.task).name  # a robot YAML names the sim task it mirrors
    policy = load_policy(args.policy, task=task_name if not args.any_task else None)
    # Output never goes into the policy folder (a shipped policy lives in the repository): --output is the report
    # file, with videos in a folder of the same name; --out a folder; by default a run folder runs/<time>_eval_<task>/.
    if args.output:
        report = Path(args.output)
        video_dir = report.with_suffix("")
    else:
        if args.out:
            folder = Path(args.out)
            folder.mkdir(parents=True, exist_ok=True)
        else:
            config = EvalConfig(task=str(args.task), policy=str(args.policy), episodes=args.episodes,
                                num_envs=args.num_envs, seed=args.seed, video=args.video,
                                video_episodes=args.video_episodes, num_env_workers=args.num_env_workers,
                                ray_address=args.ray_address)
            folder = Run.create("eval", task_name, config, root=args.runs_dir).path
        set_log_file(folder / LOG_FILE_NAME)
        report, video_dir = folder / "eval.json", folder / "videos"
    result = evaluate_policy(policy, args.task, episodes=args.episodes, num_envs=args.num_envs, seed=args.seed,
                             video_dir=video_dir if args.video else None, video_episodes=args.video_episodes,
                             env_overrides=_ray_env_options(args))
    output = {**result.to_dict(), "policy": str(args.policy), "seed": args.seed}
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(output, indent=2))
    print(result.summary())
    if result.videos:
        print(f"videos: {', '.join(result.videos)}")
    print(f"report: {report}")
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robofinetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(VERBOSE_FLAG, action="store_true",
                        help="also show the simulator's own start-up warnings and info lines (by default they go "
                             "to robosuite.log in the run folder); accepted anywhere on the command line")
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
    collect.add_argument("--num-envs", type=int, default=None,
                         help="parallel env processes (default: 2, or 1 on a one-core machine); the episodes and "
                              "the file are the same for any number")
    collect.add_argument("--num-env-workers", type=int, default=0,
                         help="run the episodes in this many Ray actors (one env each) instead of --num-envs local "
                              "processes (default 0); the file is the same")
    collect.add_argument("--ray-address", default="",
                         help="with --num-env-workers: empty starts a local Ray; 'auto' or ray://host:port joins a "
                              "cluster (README: Scaling out on Ray)")

    data = commands.add_parser("data", help="inspect and convert datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    info = data_commands.add_parser("info", help="episodes, lengths, keys, shapes, statistics")
    info.add_argument("path", help="a dataset, or a ROS bag (.bag, .mcap, .db3, ROS 2 bag folder)")
    info.add_argument("--json", action="store_true")
    info.add_argument("--robot", help="a bag: robot YAML whose topics to look for (which keys each topic serves, "
                                      "which are missing)")
    convert = data_commands.add_parser("convert", help="robomimic HDF5 <-> zarr; import robosuite demos; import "
                                                       "ROS bags (with --robot)")
    convert.add_argument("source", nargs="+", help="a dataset, or one or more ROS bags")
    convert.add_argument("destination")
    convert.add_argument("--task", help="task for replaying robosuite demos (inferred when possible)")
    convert.add_argument("--cameras", help="with --task=<a task with cameras>: render these of its cameras "
                         "(comma-separated; default all) for a dataset that has MuJoCo states but no images")
    convert.add_argument("--robot", help="ROS bags: the robot YAML that maps topics to observation keys and the "
                                         "command to the action")
    convert.add_argument("--ticks", default="auto", choices=["auto", "command", "rate"],
                         help="ROS bags: one step per command message, or a fixed clock at the robot's "
                              "control_rate (auto: commands when they come at the control rate)")
    convert.add_argument("--clock", default="receive", choices=["receive", "header"],
                         help="ROS bags: time messages by when the recorder got them, or by header.stamp")
    convert.add_argument("--split", default="auto", choices=["auto", "topic", "gap", "none"],
                         help="ROS bags: episodes start at each message of the episode topic (auto when the bag "
                              "has one), after a gap in commands, or one episode per bag")
    convert.add_argument("--episode-topic", help="ROS bags: topic whose messages start episodes (default: the "
                                                 "robot YAML's reset.request_topic, then reset.done_topic)")
    convert.add_argument("--gap", type=float, default=1.0,
                         help="ROS bags: seconds without a command that end an episode (--split gap / auto)")

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
    evaluate.add_argument("--video", action="store_true",
                          help="an mp4 of each evaluated episode, up to --video-episodes")
    evaluate.add_argument("--video-episodes", type=int, default=3)
    evaluate.add_argument("--out",
                          help="folder for eval.json and videos/ (default: a run folder runs/<time>_eval_<task>/)")
    evaluate.add_argument("--output", help="JSON report path instead (videos in the folder of the same name)")
    evaluate.add_argument("--runs-dir", help="where run folders go (default ./runs)")
    evaluate.add_argument("--any-task", action="store_true", help="skip the checkpoint's task-name check")
    evaluate.add_argument("--num-env-workers", type=int, default=0,
                          help="run the --num-envs envs in this many Ray actors (default 0: local env processes)")
    evaluate.add_argument("--ray-address", default="",
                          help="with --num-env-workers: empty starts a local Ray; 'auto' or ray://host:port joins a "
                               "cluster (README: Scaling out on Ray)")

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
    # --verbose may go anywhere on the line (every sub-command takes it), so it is taken out before parsing
    verbose = VERBOSE_FLAG in arguments
    arguments = [argument for argument in arguments if argument != VERBOSE_FLAG]
    command = next((argument for argument in arguments if not argument.startswith("-")), None)
    parser = build_parser(command if command in EXTRA_COMMANDS else "")
    args, extra = parser.parse_known_args(arguments)
    limit_cpu_threads()
    saved_logging = snapshot()
    if verbose:
        set_verbose(True)
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
    finally:
        restore(saved_logging)


if __name__ == "__main__":
    sys.exit(main())
