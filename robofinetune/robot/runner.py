"""The deploy loop: run a policy for N episodes on any env (a :class:`~robofinetune.robot.env.RobotEnv`, or a sim
env for comparison), show a live status, and log every episode as a dataset episode.

The log is a real dataset (robomimic HDF5 or LeRobot v3): observations, the actions the robot actually
executed (after the safety layer), sparse rewards and success, so robot rollouts feed the OPE gate and
residual RL like any other data. Per-episode metadata holds the seed, safety interventions, latency and rate.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import gymnasium
import numpy as np

from robofinetune.data.episode import Episode
from robofinetune.robot.status import StatusLine


class EpisodeSink(Protocol):
    def append(self, episode: Episode) -> Any: ...


@dataclass
class EpisodeOutcome:
    index: int
    seed: int | None
    success: bool
    length: int
    aborted: str | None = None
    interventions: dict[str, int] = field(default_factory=dict)
    latency_ms_p50: float | None = None
    latency_ms_p99: float | None = None
    policy_ms_p50: float | None = None
    rate_hz: float | None = None
    overruns: int = 0


@dataclass
class DeployResult:
    episodes: list[EpisodeOutcome]
    latency_ms: list[float]              # every step: observation receipt -> command publish
    policy_ms: list[float]               # every step: select_action wall time
    stopped: str | None = None           # why the session ended early (e-stop, operator), if it did

    @property
    def successes(self) -> int:
        return sum(episode.success for episode in self.episodes)

    @property
    def success_rate(self) -> float:
        return self.successes / max(len(self.episodes), 1)

    @property
    def success_ci(self) -> tuple[float, float]:
        from robofinetune.eval.stats import success_rate_ci  # (robofinetune.eval imports torch: only when asked)

        return success_rate_ci(self.successes, len(self.episodes))

    def interventions(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for episode in self.episodes:
            for kind, count in episode.interventions.items():
                total[kind] = total.get(kind, 0) + count
        return total

    def to_dict(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float | None:
            return float(np.percentile(values, q)) if values else None

        rates = [e.rate_hz for e in self.episodes if e.rate_hz]
        return {
            "episodes": len(self.episodes), "successes": self.successes, "success_rate": self.success_rate,
            "success_ci": list(self.success_ci),
            "latency_ms": {"p50": pct(self.latency_ms, 50), "p99": pct(self.latency_ms, 99), "max": pct(self.latency_ms, 100)},
            "policy_ms": {"p50": pct(self.policy_ms, 50), "p99": pct(self.policy_ms, 99)},
            "rate_hz_mean": float(np.mean(rates)) if rates else None,
            "overruns": int(sum(e.overruns for e in self.episodes)),
            "interventions": self.interventions(), "stopped": self.stopped,
            "per_episode": [asdict(e) for e in self.episodes],
        }

    def summary(self) -> str:
        low, high = self.success_ci
        data = self.to_dict()
        latency = data["latency_ms"]
        text = (f"success {self.success_rate:.1%} ({self.successes}/{len(self.episodes)}), 95% CI [{low:.1%}, {high:.1%}]")
        if latency["p50"] is not None:
            text += f"; latency p50 {latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms"
        if data["rate_hz_mean"]:
            text += f"; rate {data['rate_hz_mean']:.1f} Hz"
        text += f"; safety interventions {sum(data['interventions'].values())}"
        if self.stopped:
            text += f"; stopped: {self.stopped}"
        return text


def stack_observations(frames: list[dict[str, np.ndarray]], keys: list[str]) -> dict[str, np.ndarray]:
    return {key: np.stack([np.asarray(frame[key]) for frame in frames]) for key in keys}


def _batched(obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: np.asarray(value)[None] for key, value in obs.items()}


def warm_up(policy: Any, observation_space: gymnasium.spaces.Dict) -> None:
    """One throw-away inference so the first real step is not slowed by lazy initialisation."""
    zeros = {key: np.zeros(space.shape, dtype=space.dtype) for key, space in observation_space.spaces.items()}
    policy.reset()
    policy.select_action(_batched(zeros))
    policy.reset()


def run_policy(env: gymnasium.Env, policy: Any, episodes: int, seed: int | None = 100_000,
               sink: EpisodeSink | None = None, status: StatusLine | None = None,
               stop_event: threading.Event | None = None, warmup: bool = True,
               metadata: dict[str, Any] | None = None, reset_options: dict[str, Any] | None = None) -> DeployResult:
    """Run ``episodes`` episodes (episode k reset with ``seed + k``) and return what happened.

    Works on any gymnasium env with our observation layout; with a RobotEnv the executed action, safety
    interventions, latency and rate come from the env's step info and episode summary.
    """
    import torch

    status = status or StatusLine(enabled=False)
    keys = list(env.observation_space.spaces)
    if warmup:
        with torch.no_grad():
            warm_up(policy, env.observation_space)
    outcomes: list[EpisodeOutcome] = []
    all_latency: list[float] = []
    all_policy: list[float] = []
    stopped = None
    for index in range(episodes):
        if stop_event is not None and stop_event.is_set():
            stopped = "operator"
            break
        episode_seed = None if seed is None else seed + index
        obs, info = env.reset(seed=episode_seed, options=reset_options)
        policy.reset()
        frames, actions, rewards = [], [], []
        latency, policy_ms = [], []
        success, aborted, estop = False, None, False
        started = time.monotonic()
        while True:
            t0 = time.perf_counter()
            with torch.no_grad():
                action = np.asarray(policy.select_action(_batched(obs))[0], dtype=np.float32)
            policy_ms.append((time.perf_counter() - t0) * 1000.0)
            next_obs, reward, terminated, truncated, info = env.step(action)
            sent = info.get("action_sent", None) if "action_sent" in info else np.clip(action, -1.0, 1.0)
            if sent is None:  # held by the watchdog or the e-stop: the robot executed the hold command
                sent = getattr(getattr(env, "safety", None), "last_sent", np.zeros_like(action))
            if info.get("latency") is not None:
                latency.append(info["latency"] * 1000.0)
            frames.append(obs)
            actions.append(np.asarray(sent, dtype=np.float32))
            rewards.append(float(reward))
            obs = next_obs
            success = bool(info.get("is_success", terminated))
            aborted = info.get("aborted")
            estop = bool(info.get("estop", False))
            summary = env.episode_summary() if hasattr(env, "episode_summary") else None
            text = f"episode {index + 1}/{episodes} step {len(actions)}"
            if summary is not None:
                text += (f" | {summary['rate_hz']:.1f}/{summary['target_rate_hz']:g} Hz"
                         f" | latency {np.median(latency) if latency else float('nan'):.1f} ms"
                         f" | safety {summary['interventions']['total']}")
            text += f" | success so far {sum(o.success for o in outcomes)}/{len(outcomes)}"
            status.update(text)
            if terminated or truncated:
                break
        summary = env.episode_summary() if hasattr(env, "episode_summary") else {}
        counts = summary.get("interventions", {}).get("counts", {}) if summary else {}
        elapsed = time.monotonic() - started
        outcome = EpisodeOutcome(
            index=index, seed=episode_seed, success=success, length=len(actions), aborted=aborted,
            interventions=dict(counts),
            latency_ms_p50=float(np.percentile(latency, 50)) if latency else None,
            latency_ms_p99=float(np.percentile(latency, 99)) if latency else None,
            policy_ms_p50=float(np.percentile(policy_ms, 50)) if policy_ms else None,
            rate_hz=summary.get("rate_hz", len(actions) / elapsed if elapsed > 0 else None),
            overruns=int(summary.get("overruns", 0)))
        outcomes.append(outcome)
        all_latency.extend(latency)
        all_policy.extend(policy_ms)
        if sink is not None and actions:
            episode_metadata = {**(metadata or {}), "seed": episode_seed, "source": "deploy",
                                "outcome": asdict(outcome), "safety": summary.get("interventions") if summary else None,
                                "stale_spells": summary.get("stale_spells") if summary else None}
            episode = Episode(observations=stack_observations(frames, keys), actions=np.stack(actions),
                              rewards=np.asarray(rewards, dtype=np.float32), success=success,
                              final_observation={key: np.asarray(obs[key]) for key in keys},
                              metadata=episode_metadata)
            sink.append(episode)
        status.message(f"episode {index + 1}/{episodes}: {'success' if success else 'failure'} in {len(actions)} steps"
                       + (f" (aborted: {aborted})" if aborted else "")
                       + (f", safety {sum(counts.values())}" if counts else ""))
        if estop:
            stopped = "e-stop"
            break
    status.close()
    return DeployResult(episodes=outcomes, latency_ms=all_latency, policy_ms=all_policy, stopped=stopped)
