"""The bookkeeping every online RL method shares: step and episode counters, a live progress bar, periodic
evaluation with :func:`robofinetune.eval.evaluate_policy`, the success-vs-env-steps plot, and checkpoints that
include the replay buffers so ``--resume`` continues exactly where the last checkpoint left off.

    loop = RunLoop(run, total_env_steps=100_000, task="can", eval_every=10_000, checkpoint_every=5_000)
    state = loop.load_checkpoint({"online": online}) if resume else None   # restores counters and buffers
    loop.start()
    while not loop.finished:
        ...                                     # act, step envs, update
        loop.record(env_steps=num_envs, outcomes=transitions.finished)
        loop.show(critic_loss=..., q=...)
        if loop.due(eval_every): loop.evaluate(policy)
        if loop.due(checkpoint_every): loop.save_checkpoint(my_state, {"online": online})
        loop.end_step()
    loop.close()

Episodes whose outcomes count intervened steps (``rl.interventions``) feed the intervention metrics: the rate
(intervened steps / episode steps) and takeovers per episode over the last ``success_window`` episodes, in the
progress bar and in ``intervention_curve.png`` beside the success curve once any episode was intervened.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from robofinetune.errors import CheckpointError
from robofinetune.rl.replay import ReplayBuffer
from robofinetune.runs import Run

CHECKPOINT_DIR = "latest"
STATE_FILE = "state.pt"


class RunLoop:
    def __init__(self, run: Run, total_env_steps: int, task: str, eval_every: int = 10_000, eval_episodes: int = 50,
                 eval_envs: int = 2, eval_seed: int = 100_000, checkpoint_every: int = 5_000,
                 success_window: int = 50, progress: bool = True, description: str = "train") -> None:
        self.run, self.task = run, task
        self.total_env_steps = int(total_env_steps)
        self.eval_every, self.eval_episodes, self.eval_envs, self.eval_seed = eval_every, eval_episodes, eval_envs, eval_seed
        self.checkpoint_every = checkpoint_every
        self.progress, self.description = progress, description
        self.env_steps = 0
        self.episodes = 0
        self.successes = 0
        self.recent_success: deque[bool] = deque(maxlen=success_window)
        self.eval_points: list[dict[str, Any]] = []    # every periodic evaluation
        # (env steps, success rate of the recent training episodes, episodes so far), at each episode end
        self.train_points: list[tuple[int, float, int]] = []
        # interventions: (intervened steps, steps, takeovers) of the recent episodes; totals; and at each episode
        # end (env steps, recent intervention rate, recent takeovers per episode, episodes so far)
        self.recent_interventions: deque[tuple[int, int, int]] = deque(maxlen=success_window)
        self.intervened_steps = 0
        self.takeovers = 0
        self.intervention_points: list[tuple[int, float, float, int]] = []
        self.seconds = 0.0                               # training wall time accumulated over resumes
        self._previous_steps = 0
        self._started_at: float | None = None
        self._bar: tqdm | None = None

    # --- counters -------------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.env_steps >= self.total_env_steps

    @property
    def recent_success_rate(self) -> float:
        return float(np.mean(self.recent_success)) if self.recent_success else float("nan")

    @property
    def intervention_rate(self) -> float:
        """Intervened steps / steps over the recent episodes (0 before any episode finished)."""
        steps = sum(length for _, length, _ in self.recent_interventions)
        return sum(intervened for intervened, _, _ in self.recent_interventions) / steps if steps else 0.0

    @property
    def interventions_per_episode(self) -> float:
        """Takeovers per episode over the recent episodes."""
        if not self.recent_interventions:
            return 0.0
        return float(np.mean([takeovers for _, _, takeovers in self.recent_interventions]))

    def start(self) -> None:
        self._started_at = time.time()
        self._previous_steps = self.env_steps
        self._bar = tqdm(total=self.total_env_steps, initial=self.env_steps, desc=self.description, unit="step",
                         disable=not self.progress, dynamic_ncols=True)

    def record(self, env_steps: int, outcomes: list[Any] = ()) -> None:
        """Count ``env_steps`` new env steps and the episodes (``EpisodeOutcome``) that finished in them;
        episodes cut by a crashed env worker (``aborted``) are neither successes nor failures: not counted."""
        self.env_steps += int(env_steps)
        outcomes = [outcome for outcome in outcomes if not getattr(outcome, "aborted", False)]
        for outcome in outcomes:
            self.episodes += 1
            self.successes += int(outcome.success)
            self.recent_success.append(bool(outcome.success))
            intervened, takeovers = int(getattr(outcome, "intervened_steps", 0)), int(getattr(outcome, "takeovers", 0))
            self.recent_interventions.append((intervened, int(outcome.length), takeovers))
            self.intervened_steps += intervened
            self.takeovers += takeovers
        if outcomes:
            self.train_points.append((self.env_steps, self.recent_success_rate, self.episodes))
            if self.intervened_steps:
                self.intervention_points.append((self.env_steps, self.intervention_rate,
                                                 self.interventions_per_episode, self.episodes))
        if self._bar is not None:
            self._bar.update(int(env_steps))

    def due(self, every: int) -> bool:
        """True once each time the env-step counter crosses a multiple of ``every`` during the current step."""
        return every > 0 and self.env_steps // every > self._previous_steps // every

    def end_step(self) -> None:
        self._previous_steps = self.env_steps

    def show(self, **stats: float) -> None:
        """Progress-bar postfix: episodes, recent success, and any ``stats`` (critic loss, Q, ...)."""
        if self._bar is None:
            return
        postfix = {"ep": self.episodes, "succ": f"{self.recent_success_rate:.0%}" if self.recent_success else "-"}
        if self.intervened_steps:
            postfix.update({"int": f"{self.intervention_rate:.0%}", "int/ep": f"{self.interventions_per_episode:.2g}"})
        postfix.update({key: f"{value:.3g}" for key, value in stats.items()})
        self._bar.set_postfix(postfix, refresh=False)

    def elapsed(self) -> float:
        return self.seconds + (time.time() - self._started_at if self._started_at is not None else 0.0)

    # --- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, policy: Any, episodes: int | None = None, label: str = "eval", seed: int | None = None):
        """Evaluate ``policy`` (deterministic, in fresh env processes), log ``<label>/success`` and its Wilson
        interval at the current env step, add the point to the curve and redraw the PNG."""
        from robofinetune.eval import evaluate_policy

        episodes = episodes or self.eval_episodes
        if self._bar is not None:
            self._bar.set_description(f"{self.description} [{label} {episodes} ep]")
        was_training = policy.training
        policy.eval()
        try:
            # its own bar (under the training bar once that runs): a 100-episode evaluation takes minutes
            result = evaluate_policy(policy, self.task, episodes=episodes, num_envs=self.eval_envs,
                                     seed=self.eval_seed if seed is None else seed, progress=self.progress)
        finally:
            policy.train(was_training)
            policy.reset()
        if self._bar is not None:
            self._bar.set_description(self.description)
        point = {"env_steps": self.env_steps, "label": label, "success": result.success_rate,
                 "ci": list(result.success_ci), "episodes": result.episodes, "mean_length": result.mean_length,
                 "seconds": result.seconds}
        self.eval_points.append(point)
        self.run.log(self.env_steps, **{f"{label}/success": result.success_rate, f"{label}/ci_low": result.success_ci[0],
                                        f"{label}/ci_high": result.success_ci[1], f"{label}/mean_length": result.mean_length})
        self.write_curve()
        message = f"[{self.env_steps} env steps] {label}: {result.summary()}"
        (self._bar.write if self._bar is not None else print)(message)
        return result

    def first_steps_reaching(self, threshold: float, labels: tuple[str, ...] = ("eval", "final")) -> int | None:
        """Env steps at the first periodic (or final) evaluation whose success rate is >= ``threshold``."""
        for point in self.eval_points:
            if point["label"] in labels and point["success"] >= threshold:
                return int(point["env_steps"])
        return None

    def train_steps_reaching(self, threshold: float) -> int | None:
        """Env steps at which the success rate of the last (full window of) training episodes, exploration noise
        included, first reached ``threshold``: a finer-grained, noisier companion of the evaluations."""
        window = self.recent_success.maxlen or 0
        for steps, rate, episodes in self.train_points:
            if episodes >= window and rate >= threshold:
                return int(steps)
        return None

    def write_curve(self, name: str = "success_curve.png") -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(7, 4))
        if self.train_points:
            steps, rates = [point[0] for point in self.train_points], [point[1] for point in self.train_points]
            axes.plot(steps, rates, color="tab:blue", alpha=0.6, label=f"training episodes (last {self.recent_success.maxlen})")
        labels = sorted({point["label"] for point in self.eval_points})
        for color, label in zip(["tab:red", "tab:green", "tab:purple"], labels):
            points = [point for point in self.eval_points if point["label"] == label]
            x = [point["env_steps"] for point in points]
            y = [point["success"] for point in points]
            error = np.array([[point["success"] - point["ci"][0], point["ci"][1] - point["success"]] for point in points]).T
            axes.errorbar(x, y, yerr=error, fmt="o-", color=color, capsize=3, label=f"{label} (95% Wilson CI)")
        axes.set_xlabel("env steps")
        axes.set_ylabel("success rate")
        axes.set_ylim(-0.02, 1.02)
        axes.set_title(f"{self.run.path.name}")
        axes.grid(alpha=0.3)
        axes.legend(loc="lower right")
        figure.tight_layout()
        path = self.run.path / name
        figure.savefig(path, dpi=100)
        plt.close(figure)
        if self.intervention_points:
            self.write_intervention_curve()
        return path

    def write_intervention_curve(self, name: str = "intervention_curve.png") -> Path:
        """Intervention rate and takeovers per episode (recent training episodes) against env steps."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, rate_axes = plt.subplots(figsize=(7, 4))
        steps = [point[0] for point in self.intervention_points]
        rate_axes.plot(steps, [point[1] for point in self.intervention_points], color="tab:orange",
                       label=f"intervention rate (intervened / steps, last {self.recent_interventions.maxlen} episodes)")
        rate_axes.set_xlabel("env steps")
        rate_axes.set_ylabel("intervention rate")
        rate_axes.set_ylim(-0.02, 1.02)
        count_axes = rate_axes.twinx()
        count_axes.plot(steps, [point[2] for point in self.intervention_points], color="tab:gray", linestyle="--",
                        label="takeovers per episode")
        count_axes.set_ylabel("takeovers per episode")
        count_axes.set_ylim(bottom=0)
        rate_axes.set_title(f"{self.run.path.name}: {self.intervened_steps} intervened steps in {self.episodes} episodes")
        rate_axes.grid(alpha=0.3)
        lines = rate_axes.get_legend_handles_labels()[0] + count_axes.get_legend_handles_labels()[0]
        labels = rate_axes.get_legend_handles_labels()[1] + count_axes.get_legend_handles_labels()[1]
        rate_axes.legend(lines, labels, loc="upper right", fontsize=8)
        figure.tight_layout()
        path = self.run.path / name
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path

    # --- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"env_steps": self.env_steps, "episodes": self.episodes, "successes": self.successes,
                "recent_success": list(self.recent_success), "eval_points": self.eval_points,
                "train_points": self.train_points, "seconds": self.elapsed(),
                "recent_interventions": list(self.recent_interventions), "intervened_steps": self.intervened_steps,
                "takeovers": self.takeovers, "intervention_points": self.intervention_points}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.env_steps, self.episodes, self.successes = state["env_steps"], state["episodes"], state["successes"]
        self.recent_success.clear()
        self.recent_success.extend(state["recent_success"])
        self.eval_points = list(state["eval_points"])
        self.train_points = [tuple(point) for point in state["train_points"]]
        self.seconds = float(state["seconds"])
        # checkpoints from before interventions existed: none happened
        self.recent_interventions.clear()
        self.recent_interventions.extend(tuple(item) for item in state.get("recent_interventions", []))
        self.intervened_steps = int(state.get("intervened_steps", 0))
        self.takeovers = int(state.get("takeovers", 0))
        self.intervention_points = [tuple(point) for point in state.get("intervention_points", [])]
        self._previous_steps = self.env_steps

    def save_checkpoint(self, state: dict[str, Any], buffers: dict[str, ReplayBuffer]) -> Path:
        """Write ``checkpoints/latest/`` atomically: ``state.pt`` (the caller's ``state`` — networks,
        optimisers, RNGs — plus this loop's counters) and one ``<name>.npz`` per replay buffer."""
        folder = self.run.checkpoints / CHECKPOINT_DIR
        temporary = self.run.checkpoints / f".{CHECKPOINT_DIR}.tmp"
        old = self.run.checkpoints / f".{CHECKPOINT_DIR}.old"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        torch.save({"loop": self.state_dict(), **state}, temporary / STATE_FILE)
        for name, buffer in buffers.items():
            buffer.save(temporary / f"{name}.npz")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(temporary, folder)
        shutil.rmtree(old, ignore_errors=True)
        return folder

    def load_checkpoint(self, buffers: dict[str, ReplayBuffer]) -> dict[str, Any] | None:
        """Restore counters and ``buffers`` from the last checkpoint and return the caller's state (None when
        the run has no checkpoint yet)."""
        folder = self.run.checkpoints / CHECKPOINT_DIR
        if not (folder / STATE_FILE).exists():
            old = self.run.checkpoints / f".{CHECKPOINT_DIR}.old"  # a crash between the two renames
            if not (old / STATE_FILE).exists():
                return None
            folder = old
        try:
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
        except Exception as error:  # torch raises several types for truncated files
            raise CheckpointError(f"{folder / STATE_FILE}: unreadable checkpoint ({error})") from error
        for name, buffer in buffers.items():
            path = folder / f"{name}.npz"
            if not path.exists():
                raise CheckpointError(f"{folder}: checkpoint lacks the replay buffer '{name}.npz'")
            buffer.load(path)
        self.load_state_dict(state.pop("loop"))
        return state

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.seconds = self.elapsed()
        self._started_at = None
