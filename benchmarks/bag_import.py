"""ROS bag import on can (issue 21): conversion speed, resampling error, and BC on a converted bag vs BC on the same
episodes recorded directly.

    python benchmarks/bag_import.py                  # 50 episodes, BC on each dataset, 100 eval episodes each
    python benchmarks/bag_import.py --episodes=50 --eval-episodes=100 --bc-steps=10000 --policy=flow --seed=0 \\
        --ticks=auto --keep=runs/bag_import          # the same, keeping the bag, both datasets and both policies

What it does, over a roscore (ROS_MASTER_URI when one answers, else a private one on a free loopback port):

1. record: the MuJoCo can twin (``real_robot/mujoco_twin_node.py --robot real_robot/can_twin.yaml
   --expert-teleop``, realtime at 20 Hz) is driven by ``robofinetune record --teleop=ros-topic`` (its scripted
   expert over ROS), which writes every episode straight to HDF5 ("direct"), while the real ``rosbag record``
   records the topics the robot YAML names ("from bag"). One session records ``--episodes`` + 1 episodes, reset
   with seeds ``seed``, ``seed+1``, ...: the first is a warm-up (rosbag connects to the recorder's command and
   reset publishers only after they appear, so the bag misses that episode's first messages) and is dropped from
   both datasets; the benchmark episodes are matched by their reset seed (the converter reads it from the reset
   request in the bag);
2. convert: ``convert_bags`` (what ``robofinetune data convert RUN.bag DEST --robot=real_robot/can_twin.yaml``
   runs), timed on its own: messages per second (the messages of the topics the YAML uses), bag MB per second
   (MB = 10^6 bytes of bag on disk / conversion wall seconds, HDF5 writing included), and the observation age at
   each resampling tick (the age of the oldest observation key at the tick; median and max over the benchmark
   episodes' ticks). ``--ticks`` is ``data convert --ticks`` (default auto: one step per command when the commands
   came at the control rate, as on an idle machine; a recorder slowed by load makes auto resample at 20 Hz);
3. train: ``train bc`` (task ``can``, state observations, the ``configs/bc/can.yaml`` preset with ``--policy`` and
   ``--bc-steps``) on each dataset, same settings and seed;
4. evaluate: each policy over ``--eval-episodes`` episodes in sim (2 env processes, eval seeds from 100000 for
   both), success with a Wilson 95 % interval.

Writes benchmarks/results/bag_import.json (or ``--output``): ``messages_per_s``, ``mb_per_s``,
``observation_age_ms`` {``median``, ``max``}, ``bc_from_bag`` / ``bc_direct`` {``success``, ``success_ci``,
``episodes``, ...}, ``recording_seconds``, ``conversion_seconds``, ``bag_mb``, ``messages``, ``episodes_in_bag``,
``episodes_direct``, ``bc_settings``, ``note``, and the provenance every benchmark records.

Needs ROS 1 (``scripts/ci_ros.sh install``: roscore, rospy, rosbag) and robosuite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import RESULTS, provenance, write_result

REPO = Path(__file__).resolve().parents[1]
ROBOT = REPO / "real_robot" / "can_twin.yaml"
TASK = "can"
EVAL_SEED = 100_000


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class Twin:
    """The twin node as a subprocess (as tests/test_robot_ros.py runs it): ``with Twin(...)`` waits for it to say
    it is ready and stops it afterwards."""

    def __init__(self, robot: Path, *args: str, start_timeout: float = 300.0) -> None:
        self.command = [sys.executable, str(REPO / "real_robot" / "mujoco_twin_node.py"), "--robot", str(robot), *args]
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.start_timeout = start_timeout

    def __enter__(self) -> Twin:
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        stdin=subprocess.DEVNULL, env=os.environ.copy())
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        while not self.ready.wait(1.0):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("the can twin did not start:\n" + "".join(self.lines[-30:]))
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if "ready" in line:
                self.ready.set()

    def __exit__(self, *exc: Any) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def check_ros() -> str:
    """The master URI to use; a clear error when ROS 1 or rosbag is missing."""
    from robofinetune.robot.transport import ros_available

    missing = []
    if not ros_available():
        missing.append("rospy (the ROS 1 Python client)")
    for tool in ("roscore", "rosbag"):
        if shutil.which(tool) is None:
            missing.append(f"`{tool}`")
    if missing:
        raise SystemExit(f"bag_import: needs ROS 1, but {', '.join(missing)} not found. Install it with "
                         f"`sudo scripts/ci_ros.sh install` (Debian/Ubuntu: ros-core python3-rospy ...), then run "
                         f"this again (a roscore is started on a free loopback port unless ROS_MASTER_URI answers).")
    from robofinetune.robot.roscore import session_master

    return session_master()   # sets ROS_MASTER_URI (and ROS_IP) for this process and its children


def record(work: Path, robot: Any, episodes: int, seed: int) -> dict[str, Any]:
    """Twin + `robofinetune record` (HDF5) + `rosbag record` (bag), ``episodes`` + 1 (the warm-up) episodes."""
    topics = sorted({*robot.topics(), robot.command.topic, robot.success.topic, robot.reset.request_topic,
                     robot.reset.done_topic})
    bag_path = work / "run.bag"
    direct_path = work / "direct_all.hdf5"
    total = episodes + 1
    say(f"recording: starting the can twin ({ROBOT.relative_to(REPO)}, --expert-teleop)")
    with Twin(ROBOT, "--expert-teleop") as twin:
        say(f"recording: twin ready; `rosbag record` of {len(topics)} topics: {' '.join(topics)}")
        bagger = subprocess.Popen(["rosbag", "record", "-O", str(bag_path), "__name:=bag_import_recorder", *topics],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env=os.environ.copy(), start_new_session=True)
        try:
            deadline = time.monotonic() + 60   # rosbag opens the bag once it has looked the topics up
            while not any(work.glob("run.bag*")):
                if bagger.poll() is not None:
                    raise RuntimeError(f"`rosbag record` exited with code {bagger.returncode} before recording")
                if time.monotonic() > deadline:
                    raise RuntimeError("`rosbag record` did not open its bag within 60 s")
                time.sleep(0.1)
            time.sleep(1.0)
            command = [sys.executable, "-m", "robofinetune.robot.cli", "record", f"--robot={ROBOT}",
                       "--teleop=ros-topic", f"--output={direct_path}", f"--episodes={total}", f"--seed={seed}",
                       "--no-status"]
            say(f"recording: {episodes} episodes + 1 warm-up (seeds {seed}..{seed + episodes}; "
                f"{' '.join(command[1:])})")
            started = time.perf_counter()
            recorder = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        stdin=subprocess.DEVNULL, env=os.environ.copy())
            output: list[str] = []
            saved = 0
            warmup_seconds = None
            for line in recorder.stdout:
                output.append(line)
                if line.startswith("saved episode "):
                    saved += 1
                    elapsed = time.perf_counter() - started
                    if saved == 1:
                        warmup_seconds = elapsed
                        say(f"recording: warm-up episode done ({line.strip()[len('saved '):]}), {elapsed:.0f} s")
                    else:
                        say(f"recording {saved - 1}/{episodes}: {line.strip()[len('saved '):]}, "
                            f"{elapsed - warmup_seconds:.0f} s")
            code = recorder.wait()
            seconds = time.perf_counter() - started
            if code != 0 or saved != total:
                raise RuntimeError(f"`robofinetune record` exited with code {code} after {saved} of {total} "
                                   f"episodes:\n" + "".join(output[-30:]) + "\ntwin:\n" + "".join(twin.lines[-20:]))
            time.sleep(1.0)   # the last episode's outcome reaches the bag
        finally:
            if bagger.poll() is None:
                os.killpg(bagger.pid, signal.SIGINT)
                try:
                    bagger.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(bagger.pid, signal.SIGKILL)
                    bagger.wait(10)
    if not bag_path.is_file():
        raise RuntimeError(f"`rosbag record` left no {bag_path} (found {[p.name for p in work.glob('run.bag*')]})")
    return {"bag": bag_path, "direct": direct_path, "seconds": seconds,
            "warmup_seconds": warmup_seconds, "topics": topics}


def convert(bag: Path, work: Path, ticks: str) -> tuple[Path, Any, float, int]:
    """(converted dataset, BagReport, wall seconds, every message in the bag), the conversion timed on its own."""
    import rosbags.highlevel  # noqa: F401  (imports are not conversion time)

    from robofinetune.data.bag_import import BagOptions, convert_bags, open_bag
    from robofinetune.robot.config import load_robot_config

    robot = load_robot_config(ROBOT)
    destination = work / "from_bag_all.hdf5"
    say(f"converting {bag.name} ({bag.stat().st_size / 1e6:.2f} MB, --ticks={ticks})")
    started = time.perf_counter()
    output, reports = convert_bags([bag], destination, robot, BagOptions(ticks=ticks))
    seconds = time.perf_counter() - started
    with open_bag(bag) as reader:
        bag_messages = int(reader.message_count)
    print(reports[0].summary(), flush=True)
    return Path(output), reports[0], seconds, bag_messages


def benchmark_episodes(path: Path, seeds: list[int]) -> tuple[list[Any], dict[str, Any], list[Any], list[int]]:
    """(the episodes whose reset seed is one of ``seeds``, in seed order; env_meta; every episode; the chosen
    episodes' indices among every episode)."""
    from robofinetune.data.io import load_dataset

    episodes, env_meta = load_dataset(path)
    by_seed: dict[int, int] = {}
    for index, episode in enumerate(episodes):
        seed = episode.metadata.get("seed")
        if seed is not None and int(seed) in seeds and int(seed) not in by_seed:
            by_seed[int(seed)] = index
    chosen = [by_seed[s] for s in seeds if s in by_seed]
    return [episodes[i] for i in chosen], env_meta, episodes, chosen


def age_figures(ages: list[np.ndarray]) -> dict[str, float | None]:
    if not ages or not sum(len(a) for a in ages):
        return {"median": None, "max": None}
    every = np.concatenate(ages)
    return {"median": float(np.median(every)), "max": float(np.max(every))}


def compare(from_bag: list[Any], direct: list[Any]) -> dict[str, Any]:
    """How the converted episodes line up with the recorder's, matched by seed."""
    direct_by_seed = {int(e.metadata["seed"]): e for e in direct}
    same_actions = steps_equal = 0
    length_diffs = []
    for episode in from_bag:
        other = direct_by_seed.get(int(episode.metadata["seed"]))
        if other is None:
            continue
        length_diffs.append(len(episode) - len(other))
        steps = min(len(episode), len(other))
        if np.allclose(episode.actions[:steps], other.actions[:steps], atol=1e-6):
            same_actions += 1
        states = np.concatenate([other.observations[k][:steps] for k in sorted(other.observations)], axis=1)
        mine = np.concatenate([episode.observations[k][:steps] for k in sorted(other.observations)], axis=1)
        steps_equal += int(np.sum(np.all(np.abs(mine - states) <= 1e-6, axis=1)))
    matched = len(length_diffs)
    total_steps = sum(len(e) for e in from_bag)
    return {"episodes_matched": matched, "episodes_same_actions": same_actions,
            "steps_bag": total_steps, "steps_direct": sum(len(e) for e in direct),
            "steps_observation_equal_to_direct": steps_equal,
            "length_difference_bag_minus_direct": {"min": min(length_diffs, default=0),
                                                   "max": max(length_diffs, default=0)}}


def train(dataset: Path, name: str, args: argparse.Namespace, runs: Path) -> tuple[str, dict[str, Any], Any]:
    from robofinetune.algos.bc import BCConfig, train_bc
    from robofinetune.config import resolve_config
    from robofinetune.runs import Run

    overrides = {"task": TASK, "policy": args.policy, "seed": args.seed, "dataset": str(dataset),
                 "max_steps": args.bc_steps, "eval_episodes": 0}
    config = resolve_config(BCConfig, "bc", overrides)   # configs/bc/can.yaml <- these, as `train bc` resolves them
    if config.warmup_steps >= config.max_steps:           # only at smoke-test scale
        config.warmup_steps = max(1, config.max_steps // 10)
    run = Run.create("bc", TASK, config, root=runs)
    say(f"training BC ({name}): {args.policy}, {config.max_steps} steps on {dataset.name} -> {run.path}")
    try:
        summary = train_bc(config, run, progress=False)
    finally:
        run.close()
    seconds = float(summary["train_seconds"])
    say(f"training BC ({name}): {seconds:.0f} s ({config.max_steps / seconds:.1f} steps/s)")
    return str(summary["policy_path"]), summary, config


def evaluate(policy_path: str, name: str, episodes: int) -> Any:
    import torch

    from robofinetune.eval import evaluate_policy
    from robofinetune.policies import load_policy

    say(f"evaluating BC ({name}): {episodes} episodes on {TASK}, 2 env processes, seeds from {EVAL_SEED}")
    policy = load_policy(policy_path, device="cpu")
    torch.manual_seed(0)
    started = time.perf_counter()
    result = evaluate_policy(policy, TASK, episodes=episodes, num_envs=2, seed=EVAL_SEED)
    say(f"evaluating BC ({name}): {result.summary()} ({time.perf_counter() - started:.0f} s)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=50, help="episodes recorded (plus one warm-up)")
    parser.add_argument("--eval-episodes", type=int, default=100, help="sim episodes per policy")
    parser.add_argument("--bc-steps", type=int, default=10_000, help="BC training steps (each dataset)")
    parser.add_argument("--policy", default="flow", choices=["flow", "diffusion"])
    parser.add_argument("--ticks", default="auto", choices=["auto", "command", "rate"],
                        help="`data convert --ticks`: auto (the default there) takes one step per command when the "
                             "commands came at the control rate, else resamples at the control rate")
    parser.add_argument("--seed", type=int, default=0, help="BC seed and the first reset seed (the warm-up's)")
    parser.add_argument("--output", type=Path, default=RESULTS / "bag_import.json")
    parser.add_argument("--keep", type=Path, help="keep the bag, datasets and BC runs in this folder")
    args = parser.parse_args()
    if args.episodes < 1 or args.eval_episodes < 1 or args.bc_steps < 1:
        parser.error("--episodes, --eval-episodes and --bc-steps must be >= 1")

    uri = check_ros()
    from robofinetune.data.io import save_dataset
    from robofinetune.robot.config import load_robot_config

    say(f"ROS master {uri}")
    robot = load_robot_config(ROBOT)
    if args.keep:
        work = args.keep.resolve()
        work.mkdir(parents=True, exist_ok=True)
        if any(work.iterdir()):
            raise SystemExit(f"bag_import: --keep={args.keep} is not empty; choose a new folder")
    else:
        work = Path(tempfile.mkdtemp(prefix="bag_import_"))
    result: dict[str, Any] = {"task": TASK, "robot": str(ROBOT.relative_to(REPO)), **provenance(args.seed)}
    try:
        # 1. record
        recorded = record(work, robot, args.episodes, args.seed)
        say(f"recording: {args.episodes + 1} episodes in {recorded['seconds']:.0f} s")
        # 2. convert
        converted, report, conversion_seconds, bag_messages = convert(recorded["bag"], work, args.ticks)
        seeds = list(range(args.seed + 1, args.seed + 1 + args.episodes))   # the warm-up (seed) is dropped
        from_bag, bag_meta, bag_all, chosen = benchmark_episodes(converted, seeds)
        direct, direct_meta, direct_all, _ = benchmark_episodes(recorded["direct"], seeds)
        if len(report.tick_ages_ms) != len(bag_all):
            raise RuntimeError(f"{len(report.tick_ages_ms)} tick-age arrays for {len(bag_all)} converted episodes")
        ages = age_figures([report.tick_ages_ms[i] for i in chosen])
        rates = [float(e.metadata["rate_hz"]) for e in direct if e.metadata.get("rate_hz")]
        recorder_rate = float(np.median(rates)) if rates else None
        if recorder_rate is not None and recorder_rate < 0.9 * robot.control_rate:
            resampled = report.ticks.startswith("rate")
            say(f"WARNING: the recorder stepped at {recorder_rate:.1f} Hz, not the robot's {robot.control_rate:g} Hz "
                f"(a busy machine?): the realtime twin held some commands for more than one tick"
                + (f"; the bag was resampled at {robot.control_rate:g} Hz (ticks: {report.ticks}), so the two "
                   f"datasets differ in step count (--ticks=command keeps one step per command)" if resampled else ""))
        if not from_bag or not direct:
            raise RuntimeError(f"no benchmark episodes: {len(from_bag)} from the bag, {len(direct)} recorded "
                               f"directly (seeds {seeds[0]}..{seeds[-1]})")
        bag_dataset = save_dataset(from_bag, work / "from_bag.hdf5", env_meta=bag_meta)
        direct_dataset = save_dataset(direct, work / "direct.hdf5", env_meta=direct_meta)
        agreement = compare(from_bag, direct)
        bag_bytes = report.bytes
        say(f"converted in {conversion_seconds:.2f} s: {report.messages / conversion_seconds:.0f} messages/s, "
            f"{bag_bytes / 1e6 / conversion_seconds:.2f} MB/s; {len(from_bag)} of {args.episodes} benchmark "
            f"episodes in the bag, {len(direct)} recorded directly")
        # 3. train, 4. evaluate
        entries = {}
        settings = None
        for name, dataset, episodes in (("from_bag", bag_dataset, from_bag), ("direct", direct_dataset, direct)):
            policy_path, summary, config = train(Path(dataset), name, args, work / "runs")
            settings = settings or {key: getattr(config, key) for key in (
                "policy", "seed", "max_steps", "batch_size", "learning_rate", "warmup_steps", "n_obs_steps",
                "horizon", "n_action_steps", "network", "hidden_dim", "depth", "inference_steps", "only_success")}
            evaluation = evaluate(policy_path, name, args.eval_episodes)
            entries[name] = {"success": evaluation.success_rate, "success_ci": list(evaluation.success_ci),
                             "episodes": evaluation.episodes, "mean_length": evaluation.mean_length,
                             "demos": int(sum(e.success for e in episodes)), "dataset_episodes": len(episodes),
                             "train_seconds": float(summary["train_seconds"]),
                             "train_steps_per_s": config.max_steps / float(summary["train_seconds"]),
                             "policy_path": policy_path if args.keep else None}
        low = max(entries["from_bag"]["success_ci"][0], entries["direct"]["success_ci"][0])
        high = min(entries["from_bag"]["success_ci"][1], entries["direct"]["success_ci"][1])
        whole = report.observation_age_ms
        result.update({
            "messages_per_s": report.messages / conversion_seconds,
            "mb_per_s": bag_bytes / 1e6 / conversion_seconds,
            "observation_age_ms": ages,
            "observation_age_ms_whole_bag": {"median": whole.get("median"), "max": whole.get("max")},
            "bc_from_bag": entries["from_bag"],
            "bc_direct": entries["direct"],
            "intervals_overlap": bool(low <= high),
            "recording_seconds": recorded["seconds"],
            "recording_seconds_per_episode": recorded["seconds"] / (args.episodes + 1),
            "conversion_seconds": conversion_seconds,
            "bag_mb": bag_bytes / 1e6,
            "messages": report.messages,
            "bag_messages": bag_messages,
            "episodes_in_bag": len(from_bag),
            "episodes_direct": len(direct),
            "episodes_requested": args.episodes,
            "bag_episodes_total": report.episodes,          # warm-up included
            "direct_episodes_total": len(direct_all),       # warm-up included
            "successes_in_bag": int(sum(e.success for e in from_bag)),
            "successes_direct": int(sum(e.success for e in direct)),
            "dropped_ticks": {"stale": report.dropped_stale, "waiting": report.dropped_waiting},
            "conversion_ticks": report.ticks,
            "recorder_rate_hz": recorder_rate,
            "control_rate_hz": robot.control_rate,
            "conversion_split": report.split + (f" on {report.episode_topic}" if report.episode_topic else ""),
            "agreement": agreement,
            "topics_recorded": recorded["topics"],
            "bc_settings": {**settings, "preset": "configs/bc/can.yaml", "task": TASK, "observations": "state",
                            "eval_envs": 2, "eval_seed": EVAL_SEED},
            "kept_in": str(work) if args.keep else None,
            "note": (f"One recording session of {args.episodes + 1} episodes (reset seeds {args.seed}.."
                     f"{args.seed + args.episodes}) of the realtime can twin driven by its scripted expert over ROS: "
                     f"`robofinetune record` wrote each episode to HDF5 (bc_direct) while `rosbag record` recorded "
                     f"the robot YAML's topics (bc_from_bag, after `data convert`). The first episode is a warm-up "
                     f"dropped from both (rosbag connects to the recorder's publishers only after they appear); the "
                     f"rest are matched by reset seed. messages: messages of the topics the YAML uses (bag_messages: "
                     f"all); mb_per_s: bag size (10^6 bytes) / conversion wall seconds, writing the HDF5 included; "
                     f"observation_age_ms: age of the oldest observation key at each resampling tick, over the "
                     f"benchmark episodes' ticks (observation_age_ms_whole_bag: every tick kept, warm-up "
                     f"included). recorder_rate_hz: the median rate the recorder stepped at (control_rate_hz "
                     f"unless the machine was too busy; then --ticks=auto resamples the bag at the control rate "
                     f"and the bag's episodes have more steps than the direct ones). BC trains on the successful "
                     f"episodes of each dataset, same settings and seed; both policies are evaluated on the same "
                     f"eval seeds."),
        })
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    output = args.output.resolve()
    if output.parent == RESULTS.resolve():
        write_result(output.name, result)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2, default=float))
        print(f"wrote {output}")
    for name in ("bc_from_bag", "bc_direct"):
        entry = result[name]
        print(f"{name}: success {entry['success']:.1%} [{entry['success_ci'][0]:.2f}, {entry['success_ci'][1]:.2f}] "
              f"over {entry['episodes']} episodes ({entry['demos']} demos)")


if __name__ == "__main__":
    main()
