"""The real-robot stack measured against the MuJoCo twin over a real roscore.

    python benchmarks/robot_twin.py --robot=real_robot/can_twin.yaml --policy=policies/can/strong_diffusion \
        [--one-step-policy=PATH] --episodes=50                      # -> benchmarks/results/robot_twin.json
    python benchmarks/robot_twin.py --quick                          # pointmass, a policy trained on the spot,
                                                                     # -> benchmarks/results/robot_twin_quick.json

Figures:
1. agreement: the same policy with the same seeds, success in-process (sequential rollouts on ``make_env`` with
   episode k seeded ``seed + k``, and ``evaluate_policy`` as ``robofinetune eval`` runs it) and through
   ``deploy`` over ROS to the twin (realtime: the sim steps on its own 20 Hz clock); Wilson intervals, whether
   they overlap, and a two-proportion z-test;
2. the control loop over ROS: achieved rate vs target, latency from observation receipt to command publish
   (p50, p99; all steps and only the steps that ran the sampler) for the multi-step (DDIM-10) policy and a
   one-step policy (a distilled student when given, else the same network sampled with one DDIM step);
3. watchdog: time from the last observation to the hold command when the twin stops publishing, against the
   configured age + one control period;
4. recorder crash test: ``kill -9`` of ``robofinetune record`` at random moments; episodes reported saved,
   episodes intact afterwards, committed bytes lost.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Twin:
    def __init__(self, robot: Path, *args: str, log: Path | None = None) -> None:
        self.command = [sys.executable, str(REPO / "real_robot" / "mujoco_twin_node.py"), "--robot", str(robot), *args]
        self.ready = threading.Event()
        self.lines: list[str] = []

    def __enter__(self) -> Twin:
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=os.environ.copy())
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(120):
            self.__exit__()
            raise RuntimeError("twin did not start:\n" + "".join(self.lines[-30:]))
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


def two_proportion_p(successes_a: int, n_a: int, successes_b: int, n_b: int) -> float:
    pooled = (successes_a + successes_b) / max(n_a + n_b, 1)
    se = math.sqrt(max(pooled * (1 - pooled) * (1 / n_a + 1 / n_b), 1e-12))
    z = abs(successes_a / n_a - successes_b / n_b) / se
    return float(math.erfc(z / math.sqrt(2)))


def load(policy_path: str):
    from robofinetune.policies import load_policy

    return load_policy(policy_path, device="cpu")


class Counting:
    """Wraps a generative policy: remembers, per step, whether select_action had to sample a new chunk."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.sampled: list[bool] = []

    def reset(self, env_index: int | None = None) -> None:
        self.policy.reset(env_index)

    def select_action(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        queues = getattr(self.policy, "_queues", None)
        self.sampled.append(not queues or not queues[0])
        return self.policy.select_action(obs)


class TopicRate:
    """``rostopic hz`` on each camera topic while the loop runs: the rate a ROS user would see on that topic.

    A window of 20 messages (a few seconds at the twin's rate), one reading per second; the readings taken while
    the twin resets the scene (no frames) are kept out by reporting the median and the 90th percentile."""

    def __init__(self, topics: list[str], window: int = 20) -> None:
        self.topics, self.window = topics, window
        self.readings: dict[str, list[float]] = {topic: [] for topic in topics}
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> TopicRate:
        for topic in self.topics:
            process = subprocess.Popen(["rostopic", "hz", "-w", str(self.window), topic], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
            self.processes.append(process)
            threading.Thread(target=self._read, args=(topic, process), daemon=True).start()
        return self

    def _read(self, topic: str, process: subprocess.Popen) -> None:
        for line in process.stdout:
            if line.strip().startswith("average rate:"):
                self.readings[topic].append(float(line.split(":")[1]))

    def __exit__(self, *exc: Any) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()

    def report(self) -> dict[str, Any]:
        return {topic: {"median_hz": float(np.median(values)), "p90_hz": float(np.percentile(values, 90)),
                        "readings": len(values), "window_messages": self.window} if values else {"readings": 0}
                for topic, values in self.readings.items()}


def deploy(robot: Path, policy: Any, episodes: int, seed: int, log_dir: Path | None = None) -> dict[str, Any]:
    from robofinetune.robot.env import RobotEnv
    from robofinetune.robot.recorder import open_episode_writer
    from robofinetune.robot.runner import run_policy
    from robofinetune.robot.status import StatusLine

    from robofinetune.robot.config import load_robot_config

    counting = Counting(policy)
    cameras = sorted({source.topic for source in load_robot_config(robot).all_observations.values()
                      if source.is_image})
    with Twin(robot), TopicRate(cameras) as camera_rate:
        env = RobotEnv(robot)
        try:
            sink = None
            if log_dir is not None:
                sink = open_episode_writer(log_dir / "episodes.hdf5", "robomimic", env.config.env_meta)
            started = time.time()
            result = run_policy(env, counting, episodes, seed=seed, sink=sink, status=StatusLine(interval=30))
            seconds = time.time() - started
        finally:
            env.close()
    report = result.to_dict()
    report.pop("per_episode")
    # latency exists for steps that published a command: all of them unless the watchdog held the robot
    latency = np.asarray(result.latency_ms)
    sampled = np.asarray(counting.sampled[-len(latency):] if len(latency) else [])  # (drops the warm-up call)
    if len(latency) and len(sampled) == len(latency) and sampled.any():
        report["latency_ms_sampling_steps"] = {"p50": float(np.percentile(latency[sampled], 50)),
                                               "p99": float(np.percentile(latency[sampled], 99)),
                                               "steps": int(sampled.sum())}
    report["seconds"] = seconds
    report["per_episode_success"] = [e.success for e in result.episodes]
    report["target_rate_hz"] = float(1.0 / control_period(robot))
    if cameras:
        report["camera_rate_rostopic_hz"] = camera_rate.report()
    return report


def control_period(robot: Path) -> float:
    from robofinetune.robot.config import load_robot_config

    return 1.0 / load_robot_config(robot).control_rate


def in_process(task: str, policy: Any, episodes: int, seed: int, with_eval: bool) -> dict[str, Any]:
    """The same seeds run sequentially on ``make_env`` (and, ``with_eval``, through ``evaluate_policy`` too)."""
    import torch

    from robofinetune.envs import make_env
    from robofinetune.robot.runner import run_policy

    torch.manual_seed(seed)
    started = time.time()
    env = make_env(task)
    try:
        result = run_policy(env, policy, episodes, seed=seed)
    finally:
        env.close()
    report = {"same_seeds": {"episodes": len(result.episodes), "successes": result.successes,
                             "success_rate": result.success_rate, "success_ci": list(result.success_ci),
                             "per_episode_success": [e.success for e in result.episodes],
                             "seconds": time.time() - started}}
    if with_eval:
        from robofinetune.eval import evaluate_policy

        started = time.time()
        evaluation = evaluate_policy(policy, task, episodes=episodes, num_envs=2, seed=seed, progress=False)
        report["evaluate_policy"] = {"episodes": evaluation.episodes, "successes": evaluation.successes,
                                     "success_rate": evaluation.success_rate,
                                     "success_ci": list(evaluation.success_ci), "seconds": time.time() - started}
    return report


def agreement(sim: dict[str, Any], robot: dict[str, Any]) -> dict[str, Any]:
    low_a, high_a = sim["success_ci"]
    low_b, high_b = robot["success_ci"]
    return {"intervals_overlap": bool(low_a <= high_b and low_b <= high_a),
            "difference": robot["success_rate"] - sim["success_rate"],
            "two_proportion_p": two_proportion_p(sim["successes"], sim["episodes"], robot["successes"],
                                                 robot["episodes"])}


def watchdog(robot: Path, trials: int) -> dict[str, Any]:
    from robofinetune.robot.env import RobotEnv
    from robofinetune.robot.messages import BOOL

    spells = []
    with Twin(robot):
        env = RobotEnv(robot, overrides={"safety.abort_after": 1.0 + 2 * control_period(robot)
                                         + load_stale_age(robot)})
        pause = env.transport.publisher(env.config.twin.pause_topic, BOOL)
        try:
            env.transport.wait_for_subscribers(pause)
            for trial in range(trials):
                env.reset(seed=trial)
                hold = np.zeros(env.config.action_dim, np.float32)
                for _ in range(5):
                    env.step(hold)
                time.sleep(random.uniform(0.0, env.period))  # pause at a random phase of the loop
                pause.publish({"data": True})
                for _ in range(500):
                    *_, terminated, truncated, info = env.step(hold)
                    if terminated or truncated:
                        break
                spells.extend(env.episode_summary()["stale_spells"])
                pause.publish({"data": False})
                time.sleep(0.3)
        finally:
            env.close()
    ages = np.asarray([spell["age"] for spell in spells]) * 1000.0
    stale_age = load_stale_age(robot) * 1000.0
    target = stale_age + control_period(robot) * 1000.0
    return {"trials": trials, "stale_spells": len(spells), "configured_age_ms": stale_age, "target_ms": target,
            "last_observation_to_hold_ms": {"min": float(ages.min()), "mean": float(ages.mean()),
                                            "max": float(ages.max()), "all": ages.round(2).tolist()},
            "within_target": int((ages <= target).sum())}


def load_stale_age(robot: Path) -> float:
    from robofinetune.robot.config import load_robot_config

    return load_robot_config(robot).safety.stale_observation_age


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and ".tmp-" not in f.name)


def crash(robot: Path, fmt: str, trials: int, folder: Path, seed: int) -> dict[str, Any]:
    from robofinetune.data.io import load_dataset

    rng = random.Random(seed)
    results = []
    with Twin(robot, "--expert-teleop"):
        for trial in range(trials):
            output = folder / (f"crash_{fmt}_{trial}.hdf5" if fmt == "robomimic" else f"crash_{fmt}_{trial}_lerobot")
            command = [sys.executable, "-m", "robofinetune.robot.cli", "record", f"--robot={robot}",
                       "--teleop=ros-topic", f"--output={output}", f"--format={fmt}", "--episodes=1000", "--no-status"]
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env=os.environ.copy())
            target = rng.randint(1, 3)
            saved, size_after_save, saved_at = [], 0, 0.0
            for line in process.stdout:
                if line.startswith("saved episode"):
                    saved.append(line.strip())
                    size_after_save = size_of(output)
                    saved_at = time.monotonic()
                    if len(saved) == target:
                        break
            # kill at a random moment of the next episode (which includes its reset and, at the end, its append)
            delay = rng.uniform(0.0, 2.0)
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            killed_after = time.monotonic() - saved_at
            # episodes saved during the delay: their lines are still in the pipe
            for line in process.stdout.read().splitlines():
                if line.startswith("saved episode"):
                    saved.append(line.strip())
                    killed_after = None  # the kill hit a later episode than the one timed from
            try:
                episodes, _ = load_dataset(output)
                opened, intact = True, len(episodes)
                lengths_ok = [len(e) for e in episodes][: len(saved)] == [int(s.split("(")[1].split()[0])
                                                                          for s in saved][: len(episodes)]
            except Exception as exc:  # noqa: BLE001 - a failure to open is the result being measured
                opened, intact, lengths_ok = False, 0, False
                print(f"trial {trial}: dataset does not open: {exc}")
            size_after_kill = size_of(output)
            results.append({"trial": trial, "episodes_reported_saved": len(saved), "episodes_intact": intact,
                            "opens": opened, "lengths_match": bool(lengths_ok),
                            "killed_seconds_after_last_save": None if killed_after is None else round(killed_after, 3),
                            "bytes_after_last_save": size_after_save, "bytes_after_kill": size_after_kill,
                            "committed_bytes_lost": max(0, size_after_save - size_after_kill) if intact < len(saved) else 0})
    return {"format": fmt, "trials": results,
            "episodes_written": sum(r["episodes_reported_saved"] for r in results),
            "episodes_intact": sum(r["episodes_intact"] for r in results),
            "all_open": all(r["opens"] for r in results),
            "committed_bytes_lost": sum(r["committed_bytes_lost"] for r in results)}


def train_quick_policy(folder: Path) -> Path:
    from robofinetune.algos.bc import BCConfig, train_bc
    from robofinetune.data.collect import collect_episodes
    from robofinetune.data.io import save_dataset
    from robofinetune.runs import Run

    demos = save_dataset(collect_episodes("pointmass", 30, seed=1, progress=False), folder / "demos.hdf5",
                         env_meta={"env_name": "pointmass", "task": "pointmass"})
    config = BCConfig(task="pointmass", dataset=str(demos), max_steps=600, batch_size=128, hidden_dim=128, depth=2,
                      n_obs_steps=1, horizon=8, n_action_steps=4, eval_episodes=0, warmup_steps=50,
                      checkpoint_every=100_000, learning_rate=1e-3, log_every=100, inference_steps=10)
    run = Run.create("bc", "pointmass", config, root=folder / "runs")
    train_bc(config, run, progress=False)
    run.close()
    return run.path / "policy"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pointmass, a policy trained on the spot, few episodes")
    parser.add_argument("--robot", default=str(REPO / "real_robot" / "can_twin.yaml"))
    parser.add_argument("--policy", default=str(REPO / "policies" / "can" / "strong_diffusion"))
    parser.add_argument("--one-step-policy", help="a distilled one-step policy (default: the policy with 1 DDIM step)")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--latency-episodes", type=int, default=10, help="episodes of the one-step policy")
    parser.add_argument("--watchdog-robot", default=str(REPO / "real_robot" / "pointmass_twin_realtime.yaml"))
    parser.add_argument("--watchdog-trials", type=int, default=10)
    parser.add_argument("--crash-robot", default=str(REPO / "real_robot" / "pointmass_twin.yaml"))
    parser.add_argument("--crash-trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=100_000)
    parser.add_argument("--skip", nargs="*", default=[], choices=["agreement", "latency", "watchdog", "crash"])
    parser.add_argument("--output", help="result file name under benchmarks/results")
    parser.add_argument("--no-eval-policy", action="store_true",
                        help="agreement: only the same-seed sequential rollouts in process, not evaluate_policy too "
                             "(saves an evaluation where rendering is the cost)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from robofinetune.robot.roscore import session_master

    master = session_master()
    work = Path(tempfile.mkdtemp(prefix="robot_twin_bench_"))
    if args.quick:
        args.robot = str(REPO / "real_robot" / "pointmass_twin_realtime.yaml")
        args.policy = str(train_quick_policy(work))
        args.episodes = min(args.episodes, 20)
        args.latency_episodes = min(args.latency_episodes, 5)
        args.watchdog_trials = min(args.watchdog_trials, 3)
        args.crash_trials = min(args.crash_trials, 2)
    robot = Path(args.robot)
    from robofinetune.robot.config import load_robot_config

    config = load_robot_config(robot)
    result: dict[str, Any] = {"robot": str(robot.relative_to(REPO) if robot.is_relative_to(REPO) else robot),
                              "task": config.task.name, "policy": args.policy, "episodes": args.episodes,
                              "ros_master": master, "quick": args.quick, **provenance(args.seed)}
    print(f"robot {config.name} (task {config.task.name}), policy {args.policy}, work dir {work}", flush=True)

    if "agreement" not in args.skip or "latency" not in args.skip:
        policy = load(args.policy)
        steps = policy.config.inference_steps
        if "agreement" not in args.skip:
            print(f"[agreement] in-process: {args.episodes} episodes", flush=True)
            sim = in_process(config.task.name, policy, args.episodes, args.seed, with_eval=not args.no_eval_policy)
            print(f"[agreement] deploy over ROS: {args.episodes} episodes", flush=True)
            robot_report = deploy(robot, policy, args.episodes, args.seed, log_dir=work / "deploy_multi")
            result["agreement"] = {"in_process": sim, "deploy_over_ros": robot_report,
                                   "same_seeds_vs_deploy": agreement(sim["same_seeds"], robot_report)}
            if "evaluate_policy" in sim:
                result["agreement"]["eval_vs_deploy"] = agreement(sim["evaluate_policy"], robot_report)
            print(json.dumps(result["agreement"]["same_seeds_vs_deploy"]), flush=True)
        if "latency" not in args.skip:
            loop: dict[str, Any] = {}
            if "agreement" in result:
                loop[f"multi_step_ddim{steps}"] = result["agreement"]["deploy_over_ros"]
            else:
                loop[f"multi_step_ddim{steps}"] = deploy(robot, policy, args.latency_episodes, args.seed)
            if args.one_step_policy:
                one_step, label = load(args.one_step_policy), "one_step_distilled"
            else:
                one_step, label = load(args.policy), "one_step_ddim1_same_network"
                one_step.config.inference_steps = 1
            print(f"[latency] {label}: {args.latency_episodes} episodes", flush=True)
            loop[label] = deploy(robot, one_step, args.latency_episodes, args.seed)
            result["control_loop"] = {name: {key: report.get(key) for key in
                                             ("latency_ms", "latency_ms_sampling_steps", "policy_ms", "rate_hz_mean",
                                              "target_rate_hz", "overruns", "episodes", "success_rate",
                                              "interventions", "camera_rate_rostopic_hz")}
                                      for name, report in loop.items()}
            result["control_loop"]["sync"] = config.sync
            print(json.dumps(result["control_loop"], default=float)[:2000], flush=True)
    if "watchdog" not in args.skip:
        print(f"[watchdog] {args.watchdog_trials} trials", flush=True)
        result["watchdog"] = {"robot": args.watchdog_robot, **watchdog(Path(args.watchdog_robot), args.watchdog_trials)}
        print(json.dumps(result["watchdog"]), flush=True)
    if "crash" not in args.skip:
        result["recorder_crash"] = {"robot": args.crash_robot}
        for fmt in ("robomimic", "lerobot"):
            print(f"[crash] {fmt}: {args.crash_trials} kill -9 trials", flush=True)
            result["recorder_crash"][fmt] = crash(Path(args.crash_robot), fmt, args.crash_trials, work, args.seed)
            print(json.dumps({k: v for k, v in result["recorder_crash"][fmt].items() if k != "trials"}), flush=True)
    write_result(args.output or ("robot_twin_quick.json" if args.quick else "robot_twin.json"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
