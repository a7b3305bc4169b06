"""End to end over a real roscore: the MuJoCo twin node, RobotEnv, deploy, the watchdog, the e-stop, the recorder
(fed by the twin's scripted expert on a ROS topic), its crash safety and resume, and BC on what it recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from robofinetune.robot.transport import ros_available

pytestmark = [pytest.mark.ros,
              pytest.mark.skipif(not ros_available(), reason="ROS 1 is not installed (apt-get install ros-core "
                                 "python3-rospy python3-sensor-msgs python3-geometry-msgs python3-std-msgs); CI "
                                 "installs it")]

REPO = Path(__file__).resolve().parents[1]
LOCKSTEP = REPO / "real_robot" / "pointmass_twin.yaml"
REALTIME = REPO / "real_robot" / "pointmass_twin_realtime.yaml"


@pytest.fixture(scope="module")
def ros_master():
    from robofinetune.robot.roscore import session_master

    return session_master()


class Twin:
    """The twin node as a subprocess; ``with Twin(...)`` waits for it to be ready and stops it afterwards."""

    def __init__(self, robot: Path, *args: str) -> None:
        self.command = [sys.executable, str(REPO / "real_robot" / "mujoco_twin_node.py"), "--robot", str(robot), *args]
        self.lines: list[str] = []
        self.ready = threading.Event()

    def __enter__(self) -> Twin:
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=os.environ.copy())
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(60):
            self.__exit__()
            raise RuntimeError("twin did not start:\n" + "".join(self.lines[-20:]))
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if "ready" in line:
                self.ready.set()

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


class ExpertPolicy:
    """The pointmass scripted expert driving ``env``, behind the Policy interface (select_action on a batch,
    reset)."""

    def __init__(self, env) -> None:
        from robofinetune.envs.experts import make_expert

        self.expert = make_expert("pointmass")
        self.env = env

    def reset(self, env_index=None) -> None:
        self.expert.reset(self.env)

    def select_action(self, obs):
        return self.expert.act({key: value[0] for key, value in obs.items()})[None]


@pytest.fixture(scope="module")
def pointmass_policy(tmp_path_factory):
    """A small diffusion BC policy for pointmass, trained here in ~20 s (it succeeds nearly always)."""
    from robofinetune.algos.bc import BCConfig, train_bc
    from robofinetune.data.collect import collect_episodes
    from robofinetune.data.io import save_dataset
    from robofinetune.runs import Run

    folder = tmp_path_factory.mktemp("policy")
    demos = save_dataset(collect_episodes("pointmass", 30, seed=1, progress=False), folder / "demos.hdf5",
                         env_meta={"env_name": "pointmass", "task": "pointmass"})
    config = BCConfig(task="pointmass", dataset=str(demos), max_steps=600, batch_size=128, hidden_dim=128, depth=2,
                      n_obs_steps=1, horizon=4, n_action_steps=2, eval_episodes=0, warmup_steps=50,
                      checkpoint_every=100_000, learning_rate=1e-3, log_every=100)
    run = Run.create("bc", "pointmass", config, root=folder / "runs")
    train_bc(config, run, progress=False)
    run.close()
    return run.path / "policy"


def rollout_actions(env, policy, seeds):
    """Run one episode per seed; return the actions the env executed and the success flags."""
    from robofinetune.robot.runner import run_policy

    class Recorder:
        def __init__(self):
            self.episodes = []

        def append(self, episode):
            self.episodes.append(episode)

    sink = Recorder()
    torch.manual_seed(0)
    result = run_policy(env, policy, len(seeds), seed=seeds[0], sink=sink)
    return sink.episodes, result


def test_lockstep_deploy_over_ros_reproduces_the_in_process_rollout(ros_master, pointmass_policy):
    from robofinetune.envs import make_env
    from robofinetune.policies import load_policy
    from robofinetune.robot.env import RobotEnv

    policy = load_policy(pointmass_policy, device="cpu")
    seeds = [500, 501, 502]
    sim_episodes, sim_result = rollout_actions(make_env("pointmass"), policy, seeds)
    with Twin(LOCKSTEP):
        env = RobotEnv(LOCKSTEP)
        try:
            robot_episodes, robot_result = rollout_actions(env, policy, seeds)
        finally:
            env.close()
    assert [e.success for e in robot_episodes] == [e.success for e in sim_episodes]
    for sim, robot in zip(sim_episodes, robot_episodes):
        # float32 observations travel as float64 and back, actions as float64: nothing is lost on the way
        assert len(sim) == len(robot)
        assert np.array_equal(sim.actions, robot.actions), (robot_result.to_dict(), robot.metadata,
                                                            np.flatnonzero(np.any(sim.actions != robot.actions, 1)))
        for key in sim.observations:
            assert np.array_equal(sim.observations[key], robot.observations[key]), key
    assert robot_result.interventions() == {}
    assert all(outcome.latency_ms_p50 is not None for outcome in robot_result.episodes)


def test_deploy_command_writes_the_episode_log_as_a_dataset(ros_master, pointmass_policy, tmp_path, capsys):
    import json

    from robofinetune.cli import main
    from robofinetune.data.io import load_dataset

    with Twin(LOCKSTEP):
        code = main(["deploy", f"--robot={LOCKSTEP}", f"--policy={pointmass_policy}", "--episodes=3", "--force",
                     f"--runs-dir={tmp_path}", "--no-status", "--set", "control_rate=50"])
    assert code == 0
    run = next(tmp_path.iterdir())
    report = json.loads((run / "deploy.json").read_text())
    assert report["episodes"] == 3 and report["successes"] >= 2
    assert report["latency_ms"]["p50"] is not None and report["rate_hz_mean"] > 0
    assert report["forced"] is True   # the twin has no incumbent, so only --force let it run
    episodes, env_meta = load_dataset(run / "episodes.hdf5")
    assert len(episodes) == 3 and env_meta["task"] == "pointmass" and env_meta["robot"] == "pointmass_twin"
    assert [e.success for e in episodes] == [o["success"] for o in report["per_episode"]]
    assert episodes[0].metadata["seed"] == 100_000 and "safety" in episodes[0].metadata
    assert "success" in capsys.readouterr().out


def _broken_copy(policy_path: Path, folder: Path) -> Path:
    """The same checkpoint with its networks back at their untrained initialisation (a poor incumbent)."""
    from robofinetune.policies import load_policy, save_policy

    broken = load_policy(policy_path, device="cpu")
    torch.manual_seed(1)
    for module in broken.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    return save_policy(broken, folder, {"task": "pointmass"})


def test_deploy_runs_a_promoted_policy_over_its_incumbent_and_refuses_a_mismatched_layout(
        ros_master, pointmass_policy, tmp_path, capsys):
    """`robofinetune deploy` through the CLI: refused before `gate` promoted the policy over --incumbent, run
    after (no --force); a checkpoint whose observations the robot does not provide stops before any command."""
    import json
    import shutil

    from robofinetune.cli import main
    from robofinetune.policies import load_policy

    candidate = tmp_path / "candidate"
    shutil.copytree(pointmass_policy, candidate)
    incumbent = _broken_copy(pointmass_policy, tmp_path / "incumbent")
    deploy = ["deploy", f"--robot={LOCKSTEP}", f"--policy={candidate}", f"--incumbent={incumbent}", "--episodes=2",
              f"--runs-dir={tmp_path / 'runs'}", "--no-status"]
    assert main(deploy) == 2
    assert "refusing to deploy" in capsys.readouterr().err and not (tmp_path / "runs").exists()

    data = load_policy(pointmass_policy, device="cpu").checkpoint_metadata["dataset"]
    assert main(["gate", f"--candidate={candidate}", f"--incumbent={incumbent}", f"--data={data}", "--margin=-10",
                 "--heads=3", "--hidden-dim=16", "--depth=1", "--iterations=2", "--steps-per-iteration=3",
                 "--batch-size=16", "--action-samples=1", "--no-plot"]) == 0
    with Twin(LOCKSTEP):
        assert main(deploy) == 0
    out = capsys.readouterr().out
    assert "passed the gate" in out
    report = json.loads((next((tmp_path / "runs").iterdir()) / "deploy.json").read_text())
    assert report["episodes"] == 2 and report["forced"] is False and report["incumbent"] == str(incumbent)
    assert "passed the gate" in report["promotion"]

    # a can checkpoint on the pointmass robot (--any-task skips the name check; the layout check remains)
    can_policy = REPO / "policies" / "can" / "weak_flow"
    assert main(["deploy", f"--robot={LOCKSTEP}", f"--policy={can_policy}", "--any-task", "--force", "--episodes=1",
                 f"--runs-dir={tmp_path / 'runs_can'}", "--no-status"]) == 2
    err = capsys.readouterr().err
    assert f"{can_policy}: needs observation 'robot0_eef_pos' which the env does not provide" in err, err


def test_record_command_through_the_cli_writes_resumes_and_never_overwrites(ros_master, tmp_path, capsys):
    from robofinetune.cli import main
    from robofinetune.data.io import load_dataset

    output = tmp_path / "teleop.hdf5"
    record = ["record", f"--robot={LOCKSTEP}", "--teleop=ros-topic", f"--output={output}", "--no-status"]
    with Twin(LOCKSTEP, "--expert-teleop"):
        assert main([*record, "--episodes=2"]) == 0
        assert "saved 2 episodes (2 successful, 0 re-recorded); 2 in" in capsys.readouterr().out
        assert main([*record, "--episodes=1"]) == 2                # an existing dataset is never overwritten
        assert "pass --resume" in capsys.readouterr().err
        assert main([*record, "--episodes=1", "--resume"]) == 0
        assert "3 in" in capsys.readouterr().out
    episodes, env_meta = load_dataset(output)
    assert len(episodes) == 3 and all(e.success for e in episodes)
    assert env_meta["task"] == "pointmass" and env_meta["robot"] == "pointmass_twin"
    assert [e.metadata["seed"] for e in episodes] == [0, 1, 2]
    assert all(np.all(np.abs(e.actions) <= 1.0) for e in episodes)


def test_nan_and_out_of_workspace_actions_reach_the_robot_only_as_safe_commands(ros_master):
    """What the robot receives, read off the command topic: the hold command for a NaN action, and a push towards
    the wall cut to zero once the mass (with its velocity look-ahead) reaches the workspace edge."""
    from robofinetune.robot.env import RobotEnv
    from robofinetune.robot.messages import FLOAT64_MULTI_ARRAY
    from robofinetune.robot.safety import NONFINITE_ACTION, WORKSPACE

    with Twin(LOCKSTEP):
        env = RobotEnv(LOCKSTEP)
        commands = []
        env.transport.subscribe("/pointmass/command", FLOAT64_MULTI_ARRAY,
                                lambda message, received: commands.append(list(message["data"])))
        try:
            assert env.transport.wait_for_subscribers(env._command_pub, timeout=10, count=2)  # the twin and us
            obs, _ = env.reset(seed=3)
            sent, steps = [], []
            for action in ([np.nan, 0.3], [0.2, np.inf]):
                obs, _, _, _, info = env.step(np.array(action, np.float32))
                assert info["interventions"] == [NONFINITE_ACTION]
                sent.append(info["action_sent"])
            for _ in range(80):
                before = obs
                obs, _, terminated, truncated, info = env.step(np.array([1.0, 0.0], np.float32))
                sent.append(info["action_sent"])
                steps.append((before, info))
                if terminated or truncated:
                    break
            deadline = time.monotonic() + 10
            while len(commands) < len(sent) and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            env.close()
    assert len(commands) == len(sent), (len(commands), len(sent))
    assert np.allclose(commands, np.asarray(sent, np.float64), atol=1e-6)   # the topic carries what the env reports
    assert np.all(np.isfinite(commands))
    assert commands[0] == [0.0, 0.0] and commands[1] == [0.0, 0.0]        # NaN / inf: the hold action
    cut = [(before, info) for before, info in steps if WORKSPACE in info["interventions"]]
    assert cut, "the push never reached the workspace edge"
    for before, info in cut:
        predicted = float(before["agent_pos"][0]) + 0.05 * float(before["agent_vel"][0])
        assert predicted >= 0.45 and info["action_sent"][0] == 0.0 and info["action_sent"][1] == 0.0
    assert all(float(before["agent_pos"][0]) + 0.05 * float(before["agent_vel"][0]) < 0.45 for before, info in steps
               if WORKSPACE not in info["interventions"])
    assert max(abs(before["agent_pos"][0]) for before, _ in steps) < 0.5


def test_realtime_twin_paced_by_its_observations(ros_master):
    """sync: observation — each step returns only once the twin (stepping on its own 20 Hz clock) has published a
    new state: the steps taken never outnumber the twin's joint_states messages (an unpaced loop would run its
    steps on one cached observation within milliseconds)."""
    from robofinetune.robot.env import RobotEnv
    from robofinetune.robot.messages import JOINT_STATE
    from robofinetune.robot.runner import run_policy

    with Twin(REALTIME):
        env = RobotEnv(REALTIME)
        received = []
        env.transport.subscribe("/pointmass/joint_states", JOINT_STATE, lambda message, at: received.append(at))
        policy = ExpertPolicy(env)
        try:
            obs, _ = env.reset(seed=7)
            policy.reset()
            first = len(received)
            steps = 0
            for steps in range(1, 21):
                obs, _, terminated, truncated, _ = env.step(policy.select_action({k: v[None] for k, v in obs.items()})[0])
                if terminated or truncated:
                    break
            published = len(received) - first
            result = run_policy(env, ExpertPolicy(env), 3, seed=7, warmup=False)
        finally:
            env.close()
    # our own subscriber may lag the env's by the message in flight
    assert steps >= 5 and published >= steps - 1, (steps, published)
    assert result.successes >= 2, result.to_dict()
    for outcome in result.episodes:
        assert outcome.rate_hz > 0 and outcome.latency_ms_p50 is not None


def test_watchdog_holds_the_robot_when_the_twin_goes_silent(ros_master):
    from robofinetune.robot.env import RobotEnv
    from robofinetune.robot.messages import BOOL, FLOAT64_MULTI_ARRAY
    from robofinetune.robot.safety import STALE_HOLD

    with Twin(REALTIME):
        env = RobotEnv(REALTIME, overrides={"safety.abort_after": 1.5})
        commands = []
        env.transport.subscribe("/pointmass/command", FLOAT64_MULTI_ARRAY,
                                lambda message, received: commands.append((received, list(message["data"]))))
        pause = env.transport.publisher("/pointmass/twin/pause", BOOL)
        try:
            env.transport.wait_for_subscribers(pause)
            obs, _ = env.reset(seed=3)
            for _ in range(5):
                obs, *_ = env.step(np.array([0.6, -0.6], np.float32))
            paused_at = time.monotonic()
            pause.publish({"data": True})
            info = {}
            for _ in range(100):
                obs, reward, terminated, truncated, info = env.step(np.array([0.6, -0.6], np.float32))
                if terminated or truncated:
                    break
            summary = env.episode_summary()
        finally:
            pause.publish({"data": False})
            env.close()
    assert info["aborted"] and "no fresh observations" in info["aborted"]
    assert summary["interventions"]["counts"].get(STALE_HOLD) == 1
    spell = summary["stale_spells"][0]
    assert spell["age"] >= env.config.safety.stale_observation_age
    # the robot was told to hold: zero commands after the twin went silent
    holds = [data for received, data in commands if received > paused_at and data == [0.0, 0.0]]
    assert holds, commands[-5:]


def test_estop_topic_stops_the_episode_and_blocks_reset_until_released(ros_master):
    from robofinetune.robot.env import RobotEnv
    from robofinetune.robot.errors import EStopError
    from robofinetune.robot.messages import BOOL

    with Twin(LOCKSTEP):
        env = RobotEnv(LOCKSTEP)
        estop = env.transport.publisher("/robofinetune/estop", BOOL)
        try:
            env.transport.wait_for_subscribers(estop)
            env.reset(seed=1)
            env.step(np.array([0.2, 0.2], np.float32))
            estop.publish({"data": True})
            deadline = time.monotonic() + 10
            while not env.estop_engaged and time.monotonic() < deadline:
                time.sleep(0.01)
            _, _, terminated, truncated, info = env.step(np.array([0.2, 0.2], np.float32))
            assert truncated and not terminated and info["estop"]
            with pytest.raises(EStopError, match="e-stop engaged"):
                env.reset(seed=2)
            estop.publish({"data": False})
            deadline = time.monotonic() + 10
            while env.estop_engaged and time.monotonic() < deadline:
                time.sleep(0.01)
            obs, _ = env.reset(seed=2)
            assert set(obs) == {"agent_pos", "agent_vel", "goal_pos"}
            env.trigger_estop("key")  # the operator's key latches until released in code
            assert env.step(np.zeros(2, np.float32))[4]["estop"]
            with pytest.raises(EStopError):
                env.reset(seed=3)
            env.release_estop()
            env.reset(seed=3)
        finally:
            env.close()


class ScriptedOperator:
    """Wraps a teleop source and presses operator keys at given (episode attempt, step) points."""

    def __init__(self, teleop, presses):
        self.teleop, self.presses = teleop, dict(presses)
        self.name = teleop.name
        self.attempt, self.step = 0, 0

    def start(self, env):
        self.teleop.start(env)

    def action(self, obs, since=None):
        self.step += 1
        return self.teleop.action(obs, since)

    def events(self):
        found = self.teleop.events()
        event = self.presses.pop((self.attempt, self.step), None)
        if event:
            found.append(event)
            if event in ("rerecord", "next", "stop"):
                self.attempt, self.step = self.attempt + 1, 0
        return found

    def feed_keys(self, keys):
        pass

    def close(self):
        self.teleop.close()


def test_recorder_with_ros_topic_teleop_events_and_bc_on_the_result(ros_master, tmp_path):
    from robofinetune.algos.bc import BCConfig, train_bc
    from robofinetune.data.io import load_dataset
    from robofinetune.robot.config import load_robot_config
    from robofinetune.robot.env import RobotEnv
    from robofinetune.robot.recorder import open_episode_writer, record_session
    from robofinetune.robot.teleop import make_teleop
    from robofinetune.runs import Run

    config = load_robot_config(LOCKSTEP, {"control_rate": 50})
    output = tmp_path / "teleop.hdf5"
    printed = []
    with Twin(LOCKSTEP, "--expert-teleop"):
        env = RobotEnv(config)
        # attempt 0: re-recorded after 5 steps; attempt 1: marked failure by the operator, ended with "next"
        # at step 8; attempts 2 and 3 run to success (the twin's success signal)
        operator = ScriptedOperator(make_teleop("ros-topic", config),
                                    {(0, 5): "rerecord", (1, 3): "failure", (1, 8): "next"})
        try:
            operator.start(env)
            writer = open_episode_writer(output, "robomimic", config.env_meta)
            result = record_session(env, operator, writer, episodes=3, seed=0,
                                    printer=lambda text, flush=False: printed.append(text))
        finally:
            env.close()
    assert result.saved == 3 and result.discarded == 1
    episodes, env_meta = load_dataset(output)
    assert env_meta["task"] == "pointmass"
    assert [len(e) for e in episodes][0] == 8
    assert [e.success for e in episodes] == [False, True, True]
    assert episodes[0].metadata["success_source"] == "operator" and episodes[1].metadata["success_source"] == "robot"
    assert [e.metadata["seed"] for e in episodes] == [0, 1, 2]
    assert printed[0].startswith("saved episode 0")
    # recorded actions are what the robot executed; the expert drives the mass to the goal
    final_distance = np.linalg.norm(episodes[1].final_observation["agent_pos"] - episodes[1].final_observation["goal_pos"])
    assert final_distance < 0.02
    # the recorded dataset trains a BC policy
    bc = BCConfig(task="pointmass", dataset=str(output), max_steps=30, batch_size=32, hidden_dim=32, depth=1,
                  n_obs_steps=1, horizon=4, n_action_steps=2, eval_episodes=0, warmup_steps=5,
                  checkpoint_every=100_000, only_success=True, log_every=10)
    run = Run.create("bc", "pointmass", bc, root=tmp_path / "runs")
    summary = train_bc(bc, run, progress=False)
    run.close()
    assert summary["demos"] == 2 and (run.path / "policy" / "policy.json").exists()


def _record(output: Path, fmt: str, episodes: int, resume: bool = False, robot: Path = LOCKSTEP) -> subprocess.Popen:
    # `robofinetune record` without the top-level CLI's start-up (it imports every training method)
    command = [sys.executable, "-m", "robofinetune.robot.cli", "record", f"--robot={robot}", "--teleop=ros-topic",
               f"--output={output}", f"--format={fmt}", f"--episodes={episodes}", "--no-status"]
    return subprocess.Popen(command + (["--resume"] if resume else []), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ.copy())


def record_then_kill9(output: Path, fmt: str, robot: Path = LOCKSTEP, saved_before_kill: int = 2,
                      into_next: float = 0.6) -> list[str]:
    """Record from a running twin until ``saved_before_kill`` episodes are reported saved, let the next episode run
    ``into_next`` seconds, then SIGKILL the recorder; returns its "saved episode" lines."""
    recorder = _record(output, fmt, episodes=50, robot=robot)
    saved, deadline = [], time.monotonic() + 120
    for line in recorder.stdout:
        if line.startswith("saved episode"):
            saved.append(line)
            if len(saved) == saved_before_kill:
                break
        assert time.monotonic() < deadline, "the recorder saved nothing"
    time.sleep(into_next)
    recorder.send_signal(signal.SIGKILL)
    recorder.wait(10)
    return saved


@pytest.mark.parametrize("fmt", ["robomimic", "lerobot"])
def test_recorder_kill9_loses_at_most_the_episode_in_progress_and_resumes(ros_master, tmp_path, fmt):
    from robofinetune.data.io import load_dataset

    output = tmp_path / ("demos.hdf5" if fmt == "robomimic" else "demos_lerobot")
    with Twin(LOCKSTEP, "--expert-teleop"):
        saved = record_then_kill9(output, fmt, into_next=0.6)   # well into the next episode (~1.5 s at 20 Hz)
        episodes, _ = load_dataset(output)  # opens cleanly, with every episode reported saved
        assert len(episodes) == len(saved) == 2
        assert all(e.success for e in episodes)

        resumed = _record(output, fmt, episodes=2, resume=True)
        out, _ = resumed.communicate(timeout=120)
        assert resumed.returncode == 0, out
        assert "saved 2 episodes" in out and "4 in" in out
    episodes, _ = load_dataset(output)
    assert len(episodes) == 4
    assert [e.metadata["seed"] for e in episodes] == [0, 1, 2, 3]

    refused = _record(output, fmt, episodes=1)  # no --resume: an existing dataset is never overwritten
    out, _ = refused.communicate(timeout=60)
    assert refused.returncode == 2 and "pass --resume" in out


def test_robot_env_works_inside_a_gymnasium_vector_env(ros_master):
    """What eval and the RL rollout loop do with any env: SAME_STEP autoreset resets the robot in step()."""
    import gymnasium

    from robofinetune.robot.env import RobotEnv

    with Twin(LOCKSTEP):
        env = RobotEnv(LOCKSTEP, overrides={"control_rate": 100})
        policy = ExpertPolicy(env)
        vector = gymnasium.vector.SyncVectorEnv([lambda: env], autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP)
        try:
            obs, _ = vector.reset(seed=5)
            policy.reset()
            finished = []
            for _ in range(400):
                obs, reward, terminated, truncated, info = vector.step(policy.select_action(obs))
                if terminated[0] or truncated[0]:
                    finished.append(bool(info["final_info"]["is_success"][0]))
                    policy.reset()
                    if len(finished) == 2:
                        break
        finally:
            vector.close()
    assert finished == [True, True]


@pytest.mark.slow
def test_can_twin_realtime_records_expert_demos_in_lerobot_format(ros_master, tmp_path):
    """The robosuite can twin in realtime (driver-like topics, 20 Hz on its own clock), recorded as LeRobot v3."""
    from robofinetune.data.io import load_dataset
    from robofinetune.envs import load_task_spec

    robot = REPO / "real_robot" / "can_twin.yaml"
    output = tmp_path / "can_lerobot"
    with Twin(robot, "--expert-teleop"):
        recorder = subprocess.run([sys.executable, "-m", "robofinetune.robot.cli", "record", f"--robot={robot}",
                                   "--teleop=ros-topic", f"--output={output}", "--format=lerobot", "--episodes=2",
                                   "--no-status"], capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert recorder.returncode == 0, recorder.stdout + recorder.stderr
    episodes, env_meta = load_dataset(output)
    spec = load_task_spec("can")
    assert env_meta["task"] == "can" and len(episodes) == 2
    assert sum(e.success for e in episodes) >= 1
    for episode in episodes:
        assert {key: value.shape[1:] for key, value in episode.observations.items()} == spec.obs_shapes
        assert episode.actions.shape[1] == 7 and np.all(np.abs(episode.actions) <= 1.0)
