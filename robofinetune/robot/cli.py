"""``robofinetune deploy`` and ``robofinetune record``.

    robofinetune deploy --robot=real_robot/pointmass_twin.yaml --policy=PATH --episodes=10
    robofinetune record --robot=real_robot/pointmass_twin.yaml --teleop=keyboard --episodes=20 [--format=lerobot]

``robofinetune/cli.py`` hooks these in with ``add_deploy_parser(commands)`` / ``add_record_parser(commands)``;
each parser sets ``handler`` (``args.handler(args)`` runs the command).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from robofinetune.errors import ConfigError


@dataclass
class DeployConfig:
    robot: str
    policy: str
    episodes: int = 10
    seed: int = 100_000
    format: str = "robomimic"
    overrides: dict[str, Any] = field(default_factory=dict)
    incumbent: str | None = None
    force: bool = False


def parse_set_overrides(pairs: list[str] | None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs or []:
        key, equals, raw = pair.partition("=")
        if not equals or not key:
            raise ConfigError(f"--set expects KEY=VALUE (dotted robot YAML field), got '{pair}'")
        values[key] = yaml.safe_load(raw) if raw != "" else ""
    return values


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--robot", required=True, help="robot YAML (real_robot/<robot>.yaml)")
    parser.add_argument("--format", choices=["robomimic", "lerobot"], default="robomimic",
                        help="dataset format written (robomimic HDF5 or a LeRobot v3 folder)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a robot YAML field, e.g. --set sync=rate --set safety.max_delta=0.2")
    parser.add_argument("--no-status", action="store_true", help="no live status line")


def add_deploy_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "deploy", help="run a policy on a robot (or its MuJoCo twin) over ROS, with the safety layer",
        description="Runs --episodes episodes, shows rate / latency / safety / success live, and writes the run's "
                    "episodes as a dataset (runs/<time>_deploy_<robot>/episodes.*). Keys: space = e-stop, "
                    "Esc / q = stop after this episode.")
    _common(parser)
    parser.add_argument("--policy", required=True, help="policy checkpoint folder")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=100_000, help="episode k is reset with seed + k (twin)")
    parser.add_argument("--runs-dir", help="where the run folder goes (default ./runs)")
    parser.add_argument("--any-task", action="store_true", help="skip the checkpoint's task-name check")
    parser.add_argument("--incumbent", help="the policy the robot runs now (default: the robot YAML's 'incumbent'); "
                                            "--policy must have passed `robofinetune gate` against it")
    parser.add_argument("--force", action="store_true",
                        help="deploy even without a passing gate record against the incumbent (says so, and "
                             "records it in deploy.json)")
    parser.set_defaults(handler=command_deploy)
    return parser


def add_record_parser(subparsers: Any) -> argparse.ArgumentParser:
    from robofinetune.robot.teleop import KEY_HELP, TELEOP_KINDS

    parser = subparsers.add_parser(
        "record", help="record teleoperated episodes on a robot (or its twin) into a dataset",
        description=f"Each finished episode is durable at once; --resume appends to an existing dataset. {KEY_HELP}.")
    _common(parser)
    parser.add_argument("--teleop", required=True, choices=list(TELEOP_KINDS))
    parser.add_argument("--output", help="dataset path (default datasets/<robot>_<teleop>.hdf5, or a folder for "
                                         "--format=lerobot)")
    parser.add_argument("--episodes", type=int, default=10, help="episodes to record in this session")
    parser.add_argument("--resume", action="store_true", help="append to an existing dataset")
    parser.add_argument("--task-description", help="language task stored with the episodes (LeRobot tasks)")
    parser.add_argument("--reset-time", type=float, default=0.0,
                        help="seconds of reset phase before recording starts again (0: wait for -> / Enter); "
                             "robots with a reset topic reset themselves")
    parser.add_argument("--seed", type=int, default=0, help="episode k is reset with seed + k (twin)")
    parser.set_defaults(handler=command_record)
    return parser


class _KeyWatcher:
    """Deploy's keys on a background thread: space engages the e-stop, Esc / q stops after the episode."""

    def __init__(self, env: Any) -> None:
        from robofinetune.robot.teleop import ESTOP, STOP, TerminalKeys, events_from_keys

        self.env = env
        self.stop_event = threading.Event()
        self.keys = TerminalKeys()
        self._events = events_from_keys
        self._estop, self._stop_name = ESTOP, STOP
        self._next = threading.Event()
        self._done = threading.Event()
        self._thread = None
        if self.keys.available:
            self.keys.start()
            self._thread = threading.Thread(target=self._run, daemon=True, name="robofinetune-deploy-keys")
            self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                keys = self.keys.poll()
            except KeyboardInterrupt:
                self.env.trigger_estop("ctrl-c")
                self.stop_event.set()
                return
            events = self._events(keys)
            if self._estop in events:
                self.env.trigger_estop("key")
                self.stop_event.set()
            if self._stop_name in events:
                self.stop_event.set()
            if "next" in events:
                self._next.set()
            time.sleep(0.02)

    def wait_for_operator(self) -> None:
        """Operator-reset robots: wait for -> / Enter."""
        print("reset the scene, then press -> or Enter (Esc stops)", flush=True)
        self._next.clear()
        while not self._next.is_set():
            if self.stop_event.is_set():
                from robofinetune.robot.errors import RobotError

                raise RobotError("stopped by the operator during reset")
            time.sleep(0.05)

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        self.keys.close()


class DeployPermission(NamedTuple):
    allowed: bool
    reason: str
    forced: bool = False       # allowed only because of --force (recorded in deploy.json)


def deploy_permission(policy_path: str | Path, incumbent_path: str | Path | None, force: bool) -> DeployPermission:
    """Hardware time is scarce, so a policy other than the robot's incumbent runs only after the OPE gate
    promoted exactly these weights over exactly the incumbent's (``robofinetune gate``), or with --force."""
    from robofinetune.algos.ope import gate_check, policy_fingerprint

    if incumbent_path is None:
        reason = ("no incumbent policy is set for this robot (--incumbent=PATH or 'incumbent:' in the robot YAML), "
                  "so the policy cannot have passed a gate against it")
    elif not (Path(incumbent_path) / "policy.json").is_file():
        return DeployPermission(False, f"incumbent '{incumbent_path}' is not a policy checkpoint (missing policy.json)")
    elif policy_fingerprint(policy_path) == policy_fingerprint(incumbent_path):
        return DeployPermission(True, f"{policy_path} is the incumbent ({incumbent_path})")
    else:
        passed, reason = gate_check(policy_path, incumbent_path)
        if passed:
            return DeployPermission(True, reason)
    if force:
        return DeployPermission(True, f"--force: deploying without a passing gate ({reason})", forced=True)
    return DeployPermission(False, f"refusing to deploy: {reason}. Run `robofinetune gate --candidate={policy_path} "
                                   f"--incumbent={incumbent_path or '<incumbent>'} --data=<logged episodes>`, "
                                   f"or pass --force.")


def command_deploy(args: argparse.Namespace) -> int:
    from robofinetune.policies import check_policy_matches_env, load_policy
    from robofinetune.robot.config import load_robot_config
    from robofinetune.robot.env import RobotEnv
    from robofinetune.robot.recorder import open_episode_writer
    from robofinetune.robot.runner import run_policy
    from robofinetune.robot.status import StatusLine
    from robofinetune.runs import Run, git_commit, machine_description

    overrides = parse_set_overrides(args.set)
    config = load_robot_config(args.robot, overrides)
    incumbent = args.incumbent or config.incumbent
    allowed, permission, forced = deploy_permission(args.policy, incumbent, args.force)
    print(permission, file=sys.stdout if allowed else sys.stderr)
    if not allowed:
        return 2
    policy = load_policy(args.policy, task=None if args.any_task else config.task.name)
    deploy_config = DeployConfig(robot=str(args.robot), policy=str(args.policy), episodes=args.episodes,
                                 seed=args.seed, format=args.format, overrides=overrides,
                                 incumbent=str(incumbent) if incumbent else None, force=args.force)
    run = Run.create("deploy", config.name, deploy_config, root=args.runs_dir)
    print(f"run folder: {run.path}")
    from robofinetune.logs import LOG_FILE_NAME, set_log_file

    set_log_file(run.path / LOG_FILE_NAME)
    env = RobotEnv(config)
    watcher = None
    try:
        check_policy_matches_env(policy, env, source=str(args.policy))
        output = run.path / ("episodes.hdf5" if args.format == "robomimic" else "episodes_lerobot")
        writer = open_episode_writer(output, args.format, {**config.env_meta, "policy": str(args.policy)},
                                     fps=config.control_rate)
        watcher = _KeyWatcher(env)
        reset_options = {"operator_ready": watcher.wait_for_operator} if watcher.keys.available else None
        result = run_policy(env, policy.cpu() if hasattr(policy, "cpu") else policy, args.episodes, seed=args.seed,
                            sink=writer, status=StatusLine(enabled=not args.no_status),
                            stop_event=watcher.stop_event, reset_options=reset_options,
                            metadata={"robot": config.name, "policy": str(args.policy)})
    finally:
        if watcher is not None:
            watcher.close()
        env.close()
    report = {**result.to_dict(), "robot": config.name, "policy": str(args.policy), "dataset": str(output),
              "incumbent": str(incumbent) if incumbent else None, "promotion": permission, "forced": forced,
              "seed": args.seed, "commit": git_commit(), "machine": machine_description(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (run.path / "deploy.json").write_text(json.dumps(report, indent=2, default=float))
    print(result.summary())
    print(f"episodes: {output}")
    print(f"report: {run.path / 'deploy.json'}")
    return 0


def command_record(args: argparse.Namespace) -> int:
    from robofinetune.paths import datasets_dir
    from robofinetune.robot.config import load_robot_config
    from robofinetune.robot.env import RobotEnv
    from robofinetune.robot.recorder import open_episode_writer, record_session
    from robofinetune.robot.status import StatusLine
    from robofinetune.robot.teleop import KEY_HELP, TerminalKeys, make_teleop

    config = load_robot_config(args.robot, parse_set_overrides(args.set))
    if args.episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {args.episodes}")
    tag = args.teleop.replace("-", "_")
    output = Path(args.output) if args.output else datasets_dir() / (
        f"{config.name}_{tag}.hdf5" if args.format == "robomimic" else f"{config.name}_{tag}_lerobot")
    writer = open_episode_writer(output, args.format, config.env_meta, resume=args.resume, fps=config.control_rate,
                                 task_description=args.task_description)
    env = RobotEnv(config)
    teleop = make_teleop(args.teleop, config)
    keys = TerminalKeys()
    try:
        teleop.start(env)
        if keys.available:
            print(KEY_HELP)
            keys.start()
        print(f"recording {args.episodes} episodes into {output} ({args.format}; {len(writer)} already there)",
              flush=True)
        result = record_session(env, teleop, writer, args.episodes, seed=args.seed,
                                status=StatusLine(enabled=not args.no_status), keys=keys,
                                reset_time=args.reset_time, metadata={"robot": config.name})
    finally:
        keys.close()
        teleop.close()
        env.close()
    print(f"saved {result.saved} episodes ({result.successes} successful, {result.discarded} re-recorded); "
          f"{result.total} in {output}" + (f"; stopped by {result.stopped_by}" if result.stopped_by else ""))
    return 0


COMMANDS = {"deploy": command_deploy, "record": command_record}


def main(argv: list[str] | None = None) -> int:
    """``python -m robofinetune.robot.cli deploy|record ...`` (the same commands as ``robofinetune deploy|record``)."""
    import sys

    from robofinetune.errors import RobofinetuneError

    parser = argparse.ArgumentParser(prog="python -m robofinetune.robot.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    add_deploy_parser(commands)
    add_record_parser(commands)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except RobofinetuneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
