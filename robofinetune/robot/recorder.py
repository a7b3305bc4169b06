"""The teleop recorder: record demonstrations on a robot (or its twin), one durable episode at a time.

    session: [reset phase] -> [record phase] -> save -> [reset phase] -> ...

* reset phase: with a reset topic (the twin, a robot-side reset script) the robot resets itself; otherwise the
  operator resets the scene with teleop live and nothing recorded, and presses "next" (or ``reset_time`` passes);
* record phase: the teleop action goes through the safety layer to the robot every control step and is recorded
  with the observation; it ends on "next", success, the horizon, or "stop"; "re-record" discards it;
  "mark success / failure" overrides the robot's own success signal;
* save: the finished episode is appended to the dataset and is durable when ``append`` returns (robomimic
  HDF5 through :class:`~robofinetune.data.robomimic_io.RobomimicAppender`, LeRobot v3 through
  :class:`~robofinetune.data.lerobot_io.LeRobotWriter`); a ``kill -9`` loses at most the episode in progress.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robofinetune.data.episode import Episode
from robofinetune.errors import DatasetError
from robofinetune.robot.errors import EStopError
from robofinetune.robot.runner import stack_observations
from robofinetune.robot.status import StatusLine
from robofinetune.robot.teleop import (ESTOP, FAILURE, KEY_HELP, NEXT, RERECORD, STOP, SUCCESS, TeleopSource,
                                       TerminalKeys, events_from_keys)

FORMATS = ("robomimic", "lerobot")


def open_episode_writer(path: str | Path, format: str, env_meta: dict[str, Any], resume: bool = False,
                        fps: float | None = None, task_description: str | None = None) -> Any:
    """An appender with ``append(episode)`` and ``len()``. Refuses to touch an existing dataset unless ``resume``."""
    path = Path(path)
    if format not in FORMATS:
        raise DatasetError(f"{path}: unknown format {format!r}; choose one of {list(FORMATS)}")
    exists = path.exists() and (path.is_file() or any(path.iterdir()))
    if exists and not resume:
        raise DatasetError(f"{path}: already exists; pass --resume to append to it, or choose another --output")
    if format == "robomimic":
        from robofinetune.data.robomimic_io import RobomimicAppender

        if path.is_dir():
            raise DatasetError(f"{path}: is a folder; robomimic output is one .hdf5 file")
        path.parent.mkdir(parents=True, exist_ok=True)
        return RobomimicAppender(path, env_meta=env_meta)
    from robofinetune.data.lerobot_io import LeRobotWriter

    return LeRobotWriter(path, fps=fps, env_meta=env_meta, task_description=task_description,
                         robot_type=env_meta.get("robot"))


@dataclass
class RecordResult:
    saved: int = 0                  # episodes written this session
    discarded: int = 0              # re-recorded
    total: int = 0                  # episodes in the dataset afterwards
    successes: int = 0
    stopped_by: str | None = None   # "stop", "e-stop" or None (the requested number was reached)
    episodes: list[dict[str, Any]] = field(default_factory=list)


def record_session(env: Any, teleop: TeleopSource, writer: Any, episodes: int, seed: int | None = 0,
                   status: StatusLine | None = None, keys: TerminalKeys | None = None, reset_time: float = 0.0,
                   metadata: dict[str, Any] | None = None, printer: Any = print) -> RecordResult:
    """Record ``episodes`` more episodes into ``writer`` (already holding ``len(writer)``)."""
    status = status or StatusLine(enabled=False)
    keys = keys or TerminalKeys(stream=None)
    result = RecordResult(total=len(writer))
    config = env.config
    observation_keys = list(env.observation_space.spaces)
    lockstep = config.sync == "lockstep"
    self_resetting = config.reset.mode == "topic"
    pending: list[str] = []

    def poll_events() -> list[str]:
        pressed = keys.poll() if keys.available else []
        teleop.feed_keys(pressed)
        found = pending + events_from_keys(pressed) + teleop.events()
        pending.clear()
        return found

    def teleop_action(obs: dict[str, np.ndarray]) -> np.ndarray:
        action = teleop.action(obs, since=env.last_command_time if lockstep else None)
        return env.safety.hold_action(env.safety.last_sent) if action is None else action

    while result.saved < episodes:
        index = len(writer)
        episode_seed = None if seed is None else seed + index
        # --- reset phase ---
        if self_resetting:
            obs, _ = env.reset(seed=episode_seed)
        else:
            obs, _ = env.reset(seed=episode_seed, options={"operator_ready": lambda: None})
            started = time.monotonic()
            stop_now = False
            while True:  # teleop live, nothing recorded
                events = poll_events()
                if STOP in events or ESTOP in events:
                    stop_now = True
                    if ESTOP in events:
                        env.trigger_estop("key")
                    break
                if NEXT in events or (reset_time > 0 and time.monotonic() - started >= reset_time):
                    break
                obs, _, terminated, truncated, _ = env.step(teleop_action(obs))
                status.update(f"RESET phase (episode {index} next) | move the scene into place, then -> / Enter")
                if terminated or truncated:
                    obs, _ = env.reset(seed=episode_seed, options={"operator_ready": lambda: None})
            if stop_now:
                result.stopped_by = "e-stop" if env.estop_engaged else "stop"
                break
            obs, _ = env.reset(seed=episode_seed, options={"operator_ready": lambda: None})
        # --- record phase ---
        frames, actions, rewards = [], [], []
        marked: bool | None = None
        outcome = None
        info: dict[str, Any] = {}
        while True:
            events = poll_events()
            if ESTOP in events:
                env.trigger_estop("key")
                outcome = "estop"
                break
            if SUCCESS in events:
                marked = True
            if FAILURE in events:
                marked = False
            if RERECORD in events:
                outcome = "rerecord"
                break
            if STOP in events:
                outcome = "stop"
                break
            if NEXT in events:
                outcome = "next"
                break
            action = teleop_action(obs)
            next_obs, reward, terminated, truncated, info = env.step(action)
            sent = info.get("action_sent")
            if sent is None:
                sent = env.safety.last_sent
            frames.append(obs)
            actions.append(np.asarray(sent, dtype=np.float32))
            rewards.append(float(reward))
            obs = next_obs
            summary = env.episode_summary()
            status.update(f"RECORDING episode {index} step {len(actions)}/{env.horizon} | "
                          f"{summary['rate_hz']:.1f} Hz | safety {summary['interventions']['total']} | "
                          f"mark: {'-' if marked is None else 'success' if marked else 'failure'} | saved {result.saved}")
            if info.get("estop"):
                outcome = "estop"
                break
            if terminated or truncated:
                outcome = "success" if terminated else ("aborted" if info.get("aborted") else "horizon")
                break
        if outcome == "rerecord":
            result.discarded += 1
            status.message(f"episode {index}: discarded, re-recording")
            continue
        if outcome == "estop":
            result.stopped_by = "e-stop"
            status.message(f"episode {index}: e-stop, not saved")
            break
        if not actions:
            if outcome == "stop":
                result.stopped_by = "stop"
                break
            continue
        robot_success = bool(info.get("is_success", False))
        success = robot_success if marked is None else marked
        source = "operator" if marked is not None else ("robot" if config.success is not None else "unknown")
        summary = env.episode_summary()
        rewards_array = np.zeros(len(actions), dtype=np.float32)
        if success:
            rewards_array[-1] = 1.0
        episode = Episode(
            observations=stack_observations(frames, observation_keys), actions=np.stack(actions),
            rewards=rewards_array, success=success,
            final_observation={key: np.asarray(obs[key]) for key in observation_keys},
            metadata={**(metadata or {}), "seed": episode_seed, "source": "teleop", "teleop": teleop.name,
                      "success_source": source, "robot_success": robot_success, "end": outcome,
                      "safety": summary["interventions"], "rate_hz": summary["rate_hz"]})
        writer.append(episode)
        result.saved += 1
        result.total = len(writer)
        result.successes += int(success)
        result.episodes.append({"index": index, "steps": len(actions), "success": success, "end": outcome})
        # a plain line on stdout per durable episode: scripts (and the crash test) count on it
        printer(f"saved episode {index} ({len(actions)} steps, {'success' if success else 'failure'}, {outcome})",
                flush=True)
        if outcome == "stop":
            result.stopped_by = "stop"
            break
    status.close()
    return result


__all__ = ["FORMATS", "RecordResult", "open_episode_writer", "record_session", "KEY_HELP", "EStopError"]
