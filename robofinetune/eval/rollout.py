"""Evaluate a policy: run episodes in parallel env processes, report success with a Wilson interval."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from robofinetune.eval.stats import success_rate_ci
from robofinetune.policies.base import Policy


@dataclass
class EvalResult:
    task: str
    episodes: int
    successes: int
    success_rate: float
    success_ci: tuple[float, float]
    mean_length: float
    seconds: float
    episode_success: list[bool] = field(default_factory=list)
    episode_length: list[int] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["success_ci"] = list(self.success_ci)
        return data

    def summary(self) -> str:
        low, high = self.success_ci
        return (f"{self.task}: success {self.success_rate:.1%} ({self.successes}/{self.episodes}), "
                f"95% CI [{low:.1%}, {high:.1%}], mean length {self.mean_length:.1f} steps")


def evaluate_policy(policy: Policy, task: str, episodes: int = 100, num_envs: int = 2, seed: int = 100_000,
                    video_dir: str | Path | None = None, video_episodes: int = 3, progress: bool = True,
                    env_overrides: dict[str, Any] | None = None) -> EvalResult:
    """Run ``episodes`` episodes split evenly over ``num_envs`` processes (each env gets a fixed quota, so
    short successful episodes do not crowd out long failures) and return the outcome.

    The default seed is far from the training seeds so eval initial states differ from demo ones.
    """
    from robofinetune.envs import make_vector_env
    from robofinetune.policies.checkpoint import check_policy_matches_env

    start = time.time()
    num_envs = max(1, min(num_envs, episodes))
    # the bar shows from the start: env processes take seconds to start (robosuite ~5 s)
    bar = tqdm(total=episodes, desc=f"eval {task}", disable=not progress, unit="ep")
    envs = make_vector_env(task, num_envs=num_envs, seed=seed, **(env_overrides or {}))
    num_envs = envs.num_envs  # a robot YAML gives one env whatever was asked
    quotas = [episodes // num_envs + (1 if index < episodes % num_envs else 0) for index in range(num_envs)]
    try:
        check_policy_matches_env(policy, envs)
        results: list[tuple[bool, int]] = []
        done_counts = [0] * num_envs
        lengths = np.zeros(num_envs, dtype=int)
        # Sampling noise from (seed, env, episode) alone: the same episodes whatever the process did before.
        policy.seed_sampling(seed)
        policy.reset()
        obs, _ = envs.reset(seed=seed)
        while len(results) < episodes:
            with torch.no_grad():
                actions = policy.select_action(obs)
            obs, _, terminated, truncated, info = envs.step(actions)
            lengths += 1
            for index in np.flatnonzero(terminated | truncated):
                if _aborted(info, index):   # its Ray env worker was killed: no outcome, the env's quota runs on
                    lengths[index] = 0
                    policy.reset(int(index))
                    continue
                success = bool(_final_success(info, index))
                if done_counts[index] < quotas[index]:
                    results.append((success, int(lengths[index])))
                    done_counts[index] += 1
                    bar.update(1)
                    bar.set_postfix(success=f"{np.mean([r[0] for r in results]):.0%}")
                lengths[index] = 0
                policy.reset(int(index))
    finally:
        bar.close()
        envs.close()
        policy.seed_sampling(None)
    successes = sum(success for success, _ in results)
    videos = []
    if video_dir is not None and video_episodes > 0:  # one video per evaluated episode, up to video_episodes
        videos = record_videos(policy, task, Path(video_dir), min(video_episodes, len(results)), seed=seed,
                               num_envs=num_envs, progress=progress)
    return EvalResult(task=task, episodes=len(results), successes=int(successes),
                      success_rate=successes / max(len(results), 1),
                      success_ci=success_rate_ci(int(successes), len(results)),
                      mean_length=float(np.mean([length for _, length in results])) if results else 0.0,
                      seconds=time.time() - start, episode_success=[s for s, _ in results],
                      episode_length=[length for _, length in results], videos=[str(v) for v in videos])


def _final_success(info: dict[str, Any], index: int) -> bool:
    """Success of the episode that just ended in env ``index`` (gymnasium SAME_STEP autoreset puts the last
    step's info under ``final_info``; otherwise it is the step info itself)."""
    if "final_info" in info and "is_success" in info["final_info"]:
        return bool(info["final_info"]["is_success"][index])
    return bool(info["is_success"][index])


def _aborted(info: dict[str, Any], index: int) -> bool:
    """Whether the episode that just ended in env ``index`` was cut by a killed env worker
    (``robofinetune.distributed.RayVectorEnv``) rather than finished."""
    final_info = info.get("final_info")
    return isinstance(final_info, dict) and "aborted" in final_info and bool(final_info["aborted"][index])


def record_videos(policy: Policy, task: str, folder: Path, episodes: int, seed: int = 100_000, fps: int = 20,
                  num_envs: int = 1, progress: bool = False) -> list[Path]:
    """Write the first ``episodes`` episodes of ``evaluate_policy(policy, task, num_envs=num_envs, seed=seed)`` as
    mp4s named by their outcome, one each (``episode_000_success.mp4``, ...), taken round-robin over its envs: env
    0's first episode, env 1's first, ..., then env 0's second.

    The evaluation starts env ``i`` from reset seed ``seed + i`` and, through ``policy.seed_sampling(seed)``, draws
    the policy's noise per (env, episode); replaying env ``i`` here in a rendering env, as row ``i`` of the policy's
    batch, gives the same episodes again (to floating-point batch effects).
    """
    import cv2

    from robofinetune.envs import make_env

    if episodes <= 0:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    width = max(1, min(num_envs, episodes))
    quotas = [episodes // width + (1 if index < episodes % width else 0) for index in range(width)]
    envs = []
    seed_sampling = getattr(policy, "seed_sampling", None)
    paths: list[tuple[int, Path]] = []
    bar = tqdm(total=episodes, desc=f"videos {task}", unit="ep", disable=not progress)
    try:
        envs = [make_env(task, seed=seed + index, render=True) for index in range(width)]
        if seed_sampling is not None:
            seed_sampling(seed)
        policy.reset()
        obs = [env.reset(seed=seed + index)[0] for index, env in enumerate(envs)]
        frames = [[env.render()] for env in envs]
        done_counts = [0] * width
        while any(done < quota for done, quota in zip(done_counts, quotas)):
            batched = {key: np.stack([env_obs[key] for env_obs in obs]) for key in obs[0]}
            with torch.no_grad():
                actions = policy.select_action(batched)
            for index, env in enumerate(envs):
                if done_counts[index] >= quotas[index]:
                    continue  # this env's videos are written; its row of the batch is ignored
                obs[index], _, terminated, truncated, info = env.step(actions[index])
                frames[index].append(env.render())
                if not (terminated or truncated):
                    continue
                number = done_counts[index] * width + index
                outcome = "success" if info["is_success"] else "failure"
                paths.append((number, _write_video(cv2, folder / f"episode_{number:03d}_{outcome}.mp4",
                                                   frames[index], fps)))
                bar.update(1)
                done_counts[index] += 1
                policy.reset(index)
                if done_counts[index] < quotas[index]:
                    obs[index], _ = env.reset()  # as the evaluation's autoreset: no new seed, the env's RNG goes on
                    frames[index] = [env.render()]
    finally:
        bar.close()
        for env in envs:
            env.close()
        policy.reset()
        if seed_sampling is not None:
            seed_sampling(None)
    return [path for _, path in sorted(paths)]


def _write_video(cv2: Any, path: Path, frames: list[np.ndarray], fps: int) -> Path:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for frame in frames:
        writer.write(cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR))
    writer.release()
    return path
