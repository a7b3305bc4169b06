"""Takeovers during online RL (HIL-SERL, arXiv 2410.21845): someone else may drive an env for a while; the
learner is told which actions were theirs.

    Intervener            reset(env) at each episode start; action(obs, proposed) -> takeover action or None
    InterventionWrapper   a gymnasium wrapper that asks its Intervener before every step, executes the takeover
                          action instead of the policy's, and reports in the step info:
                          is_intervention (bool), policy_action (the proposal), executed_action (what ran:
                          on a robot what its safety layer sent)
    ScriptedIntervener    the task's scripted expert takes over when the policy stalls (sim, tests, benchmarks)
    TeleopIntervener      an operator with a robot teleop source (keyboard, SpaceMouse, ROS topic)
    make_intervened_vector_env(task, num_envs, seed, intervener)   make_vector_env with every env wrapped

Why a wrapper inside the env: the simulator runs in subprocess workers, and the scripted expert needs the
simulator's state (``env.expert_observation()``: the object pose an image policy never sees), so the decision is
made where the state is, and only flags and actions cross the process boundary through the step info. On a robot
the single env runs in the learner's process and the wrapper sits in front of ``RobotEnv``, so the operator's
command goes through the same safety layer as the policy's.

The scripted stall rule (``ScriptedInterventionConfig``): the expert takes over when the tracked position (the
end effector, ``robot0_eef_pos``, or the point mass, ``agent_pos``) has moved less than ``stall_distance`` in
net over the last ``stall_steps`` steps the policy drove (hovering, or oscillating in place, without success). It
hands back after ``takeover_steps`` steps, or earlier when ``handback_on_subgoal`` and its phase machine finishes
a phase (above the object, grasped, lifted, over the bin: a sub-goal) once it has driven ``min_takeover_steps``
(a takeover that starts where its first phase is already done would otherwise hand back at once, again and
again). After a handback the policy again gets ``stall_steps`` steps before the next takeover. Evaluation envs are never wrapped: evaluations never intervene.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import gymnasium
import numpy as np

from robofinetune.errors import ConfigError

INTERVENERS = ("none", "scripted")
POSITION_KEYS = ("robot0_eef_pos", "agent_pos")   # what the stall rule watches, first one the env has


class Intervener(ABC):
    """Who may take over one env. ``action`` is asked before every step with the observation the policy acted on
    and its proposal; it returns the action to execute instead, or None to let the proposal run."""

    name = "intervener"

    @abstractmethod
    def reset(self, env: gymnasium.Env) -> None:
        """A new episode started in ``env`` (after its ``reset``)."""

    @abstractmethod
    def action(self, obs: dict[str, np.ndarray], proposed: np.ndarray) -> np.ndarray | None:
        """The takeover action for this step, or None."""

    def close(self) -> None:
        """Release devices."""


class InterventionWrapper(gymnasium.Wrapper):
    """Executes the intervener's action instead of the policy's when it gives one; see the module docstring for
    the info keys."""

    def __init__(self, env: gymnasium.Env, intervener: Intervener) -> None:
        super().__init__(env)
        self.intervener = intervener
        self._obs: dict[str, np.ndarray] | None = None

    def reset(self, **kwargs: Any):
        obs, info = self.env.reset(**kwargs)
        self.intervener.reset(self.env)
        self._obs = obs
        return obs, info

    def step(self, action: Any):
        proposed = np.asarray(action, np.float32).reshape(-1)
        takeover = self.intervener.action(self._obs, proposed) if self._obs is not None else None
        executed = proposed if takeover is None else np.asarray(takeover, np.float32).reshape(-1)
        obs, reward, terminated, truncated, info = self.env.step(executed)
        sent = info.get("action_sent")   # a RobotEnv: what its safety layer let through (None: held)
        info = dict(info)
        mark = getattr(self.intervener, "mark", None) if getattr(self.intervener, "mark_ends_episode", False) else None
        if mark is not None and not (terminated or truncated):
            # a robot without a success topic: the operator's mark is the episode's outcome, so it ends the episode
            # at once, as a success topic would. Success is a terminal state (reward 1); a failure mark means "give
            # up here": a cut (truncated), so the critic still bootstraps from the last state.
            terminated, truncated = bool(mark), not mark
            reward = 1.0 if mark else 0.0
            info["is_success"] = bool(mark)
            info["ended_by_mark"] = True
            end = getattr(self.env.unwrapped, "end_episode", None)
            if end is not None:
                end()    # a realtime robot must not keep applying the last command until the reset
        info["is_intervention"] = takeover is not None
        info["policy_action"] = proposed
        info["executed_action"] = np.asarray(executed if sent is None else sent, np.float32)
        self._obs = obs
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        self.intervener.close()
        super().close()


# --- the scripted intervener -----------------------------------------------------------------------------------

@dataclass
class ScriptedInterventionConfig:
    """The stall rule and the handback of :class:`ScriptedIntervener` (module docstring)."""

    stall_steps: int = 20             # K: policy steps over which progress is measured
    stall_distance: float = 0.01      # net motion (m) below which K steps count as a stall
    takeover_steps: int = 40          # the expert drives at most this many steps, then hands back
    handback_on_subgoal: bool = True  # ... or as soon as it finishes a phase (experts with phases) ...
    min_takeover_steps: int = 10      # ... after driving at least this many steps
    expert_noise: float = 0.0         # imperfect operator (envs.experts noise); 0 = the clean expert

    def check(self) -> "ScriptedInterventionConfig":
        if self.stall_steps < 1 or self.takeover_steps < 1 or self.min_takeover_steps < 0:
            raise ConfigError(f"config fields 'stall_steps' and 'takeover_steps' must be >= 1 and "
                              f"'min_takeover_steps' >= 0, got {self.stall_steps}, {self.takeover_steps} and "
                              f"{self.min_takeover_steps}")
        if self.stall_distance < 0 or self.expert_noise < 0:
            raise ConfigError("config fields 'stall_distance' and 'intervener_noise' must be >= 0")
        return self


class ScriptedIntervener(Intervener):
    """The task's scripted expert (``envs.experts``) as the operator, taking over on a stall."""

    name = "scripted"

    def __init__(self, task: str, config: ScriptedInterventionConfig, seed: int | None = None) -> None:
        from robofinetune.envs.experts import make_expert

        self.config = config.check()
        self.expert = make_expert(task, noise=config.expert_noise, seed=seed)
        self.env: Any = None
        self.positions: deque[np.ndarray] = deque(maxlen=config.stall_steps + 1)
        self.takeover_left = 0           # steps the expert still drives; 0 = the policy drives
        self.takeover_done = 0           # steps the expert drove in the current takeover

    @property
    def intervening(self) -> bool:
        return self.takeover_left > 0

    def reset(self, env: gymnasium.Env) -> None:
        self.env = env.unwrapped
        self.expert.reset(self.env)
        self.positions.clear()
        self.takeover_left = 0

    def _position(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        source = getattr(self.env, "expert_observation", None)
        full = {**(source() if source is not None else {}), **obs}
        for key in POSITION_KEYS:
            if key in full:
                return np.asarray(full[key], np.float64).reshape(-1)
        raise ConfigError(f"the scripted intervener watches one of {list(POSITION_KEYS)}; this env observes "
                          f"{sorted(full)}")

    def stalled(self) -> bool:
        """No net progress over the last ``stall_steps`` policy steps."""
        if len(self.positions) <= self.config.stall_steps:
            return False
        return float(np.linalg.norm(self.positions[-1] - self.positions[0])) < self.config.stall_distance

    def action(self, obs: dict[str, np.ndarray], proposed: np.ndarray) -> np.ndarray | None:
        if not self.intervening:
            self.positions.append(self._position(obs))
            if not self.stalled():
                return None
            self.expert.take_over(self.env, obs)
            self.takeover_left, self.takeover_done = self.config.takeover_steps, 0
        phase = getattr(self.expert, "phase", None)
        action = np.asarray(self.expert.act(obs), np.float32)
        self.takeover_left -= 1
        self.takeover_done += 1
        finished_phase = phase is not None and getattr(self.expert, "phase", None) != phase
        if self.config.handback_on_subgoal and finished_phase and self.takeover_done >= self.config.min_takeover_steps:
            self.takeover_left = 0       # a sub-goal reached: this was the last step of the takeover
        if not self.intervening:
            self.positions.clear()       # the policy gets stall_steps fresh steps
        return action


@dataclass
class ScriptedIntervenerFactory:
    """Picklable recipe for one env worker's :class:`ScriptedIntervener`."""

    task: str
    config: ScriptedInterventionConfig
    seed: int = 0

    def __call__(self, env_index: int) -> Intervener:
        return ScriptedIntervener(self.task, self.config, seed=self.seed + env_index)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "seed": self.seed, **asdict(self.config)}


# --- the operator on a robot -----------------------------------------------------------------------------------

class TeleopIntervener(Intervener):
    """An operator with a teleop source (``robot.teleop``) in front of a ``RobotEnv``.

    Takeover: ``t`` (keyboard) or the ``toggle_takeover`` / ``takeover`` / ``handback`` events (ROS event topic)
    switch it on and off; a SpaceMouse takes over while its puck is moved (SERL's rule). While taken over the
    source's action is executed; no input yet means the hold action. A command that is not ``action_dim`` finite
    numbers is refused: the robot holds, ``refusals`` counts it and ``last_refusal`` says why. Every command then
    passes the env's safety layer like the policy's. Success / failure keys and stop are kept for the training
    loop (``take_mark``, ``stop_requested``); with ``mark_ends_episode`` (a robot without a success topic) a mark
    pressed mid-episode also ends the episode at that step (``InterventionWrapper``).

    On a lockstep robot the command used for a step is the operator's answer to that step's observation: the
    source is asked for one received after the last command went out (as the recorder does), so a ROS operator
    that replies to every observation is never a step behind. A ROS message the source dropped (wrong size,
    undecodable) is refused like a bad command: the robot holds.
    """

    name = "teleop"

    def __init__(self, source: Any, action_dim: int, keys: Any = None, printer: Callable[[str], None] | None = None):
        self.source = source
        self.action_dim = int(action_dim)
        self.keys = keys
        self.printer = printer or (lambda message: print(message, file=sys.stderr, flush=True))
        self.env: Any = None
        self.taken_over = False
        self.mark: bool | None = None    # the operator's success (True) / failure (False) mark this episode
        self.stop_requested = False
        self.refusals = 0
        self.last_refusal: str | None = None
        self.mark_ends_episode = False
        self._heard = False              # the source has given a command: waiting for a fresh one is worth it
        self._bad_seen = 0               # the source's dropped messages already refused

    def reset(self, env: gymnasium.Env) -> None:
        self.env = env.unwrapped
        self.taken_over = False
        # the mark is kept: the vector env resets in the step that ends an episode, before the training loop
        # takes the mark pressed in that episode (take_mark clears it)

    def poll(self) -> list[str]:
        """Operator events since the last call (keys and the source's own), takeover and marks applied."""
        from robofinetune.robot.teleop import (ESTOP, FAILURE, HANDBACK, STOP, SUCCESS, TAKEOVER, TOGGLE_TAKEOVER,
                                               events_from_keys)

        pressed = self.keys.poll() if self.keys is not None and getattr(self.keys, "available", False) else []
        self.source.feed_keys(pressed)
        events = events_from_keys(pressed) + list(self.source.events())
        for event in events:
            if event == TOGGLE_TAKEOVER:
                self.taken_over = not self.taken_over
            elif event in (TAKEOVER, HANDBACK):
                self.taken_over = event == TAKEOVER
            elif event in (SUCCESS, FAILURE):
                self.mark = event == SUCCESS
            elif event in (STOP, ESTOP):
                self.stop_requested = True
                if event == ESTOP and self.env is not None and hasattr(self.env, "trigger_estop"):
                    self.env.trigger_estop("key")
        return events

    def take_mark(self) -> bool | None:
        """The operator's mark for the episode that just ended, and forget it (None: not marked)."""
        mark, self.mark = self.mark, None
        return mark

    def wait_for_mark(self, poll_seconds: float = 0.05) -> bool | None:
        """Block until the operator marks the finished episode (y success / n failure, or the success / failure
        events); None when they stop instead. The robot holds meanwhile (the episode is over)."""
        import time

        from robofinetune.robot.teleop import KEY_HELP

        if self.mark is None:
            self.printer(f"episode over: mark it (y success, n failure) to store it; {KEY_HELP}")
        while self.mark is None and not self.stop_requested:
            self.poll()
            time.sleep(poll_seconds)
        return self.take_mark()

    def _hold(self) -> np.ndarray:
        safety = getattr(self.env, "safety", None)
        if safety is None:
            return np.zeros(self.action_dim, np.float32)
        return np.asarray(safety.hold_action(safety.last_sent), np.float32)

    def _since(self) -> float | None:
        """On a lockstep robot, the time of the last command sent: the operator's reply to the current observation
        comes after it. None elsewhere (a realtime operator's newest command is the one to use)."""
        config = getattr(self.env, "config", None)
        if not self._heard or getattr(config, "sync", None) != "lockstep":
            return None
        return getattr(self.env, "last_command_time", None)

    def _refuse(self, problem: str) -> np.ndarray:
        self.refusals += 1
        self.last_refusal = f"teleop command from {getattr(self.source, 'name', 'teleop')} refused: {problem}; holding"
        self.printer(self.last_refusal)
        return self._hold()

    def action(self, obs: dict[str, np.ndarray], proposed: np.ndarray) -> np.ndarray | None:
        from robofinetune.robot.teleop import SpaceMouseTeleop

        # the command first: on a lockstep robot this waits for the operator's reply to this observation, and events
        # the operator sent with it (before it) are then in too
        command = self.source.action(obs, since=self._since())
        self._heard = self._heard or command is not None
        self.poll()
        bad = int(getattr(self.source, "bad_messages", 0))
        dropped, self._bad_seen = bad > self._bad_seen, bad
        moving = command is not None and isinstance(self.source, SpaceMouseTeleop) and \
            bool(np.any(np.abs(np.asarray(command, np.float64)[:min(6, self.action_dim)]) > 0))
        if not (self.taken_over or moving):
            return None
        if dropped:
            # the operator's newest message was unusable: do not keep driving with the one before it
            return self._refuse(getattr(self.source, "last_bad", None) or "a malformed message")
        if command is None:
            return self._hold()
        values = np.asarray(command, np.float64).reshape(-1) if np.ndim(command) else np.asarray([command], np.float64)
        problem = None
        if values.shape != (self.action_dim,):
            problem = f"has {values.size} values, the robot takes {self.action_dim}"
        elif not np.all(np.isfinite(values)):
            problem = f"contains NaN or inf ({values.tolist()})"
        if problem is not None:
            return self._refuse(problem)
        return values.astype(np.float32)

    def close(self) -> None:
        self.source.close()
        if self.keys is not None and hasattr(self.keys, "close"):
            self.keys.close()


# --- vector envs -----------------------------------------------------------------------------------------------

class _InterveningWorkerFactory:
    """One AsyncVectorEnv worker: the task's env (``envs._WorkerEnvFactory``) wrapped with its intervener. In the
    parent process, which only reads spaces, the stand-in env is wrapped too (the wrapper changes no space)."""

    def __init__(self, env_factory: Any, make_intervener: Callable[[int], Intervener], env_index: int) -> None:
        self.env_factory, self.make_intervener, self.env_index = env_factory, make_intervener, env_index

    def __call__(self) -> gymnasium.Env:
        return InterventionWrapper(self.env_factory(), self.make_intervener(self.env_index))


def make_training_envs(task: str, num_envs: int, seed: int, intervener: str = "none", teleop: str = "",
                       scripted: ScriptedInterventionConfig | None = None
                       ) -> tuple[gymnasium.vector.VectorEnv, TeleopIntervener | None]:
    """The vector env an online RL run trains in, and the operator when one may take over.

    ``teleop`` (keyboard | spacemouse | ros-topic) needs a robot task; ``intervener='scripted'`` a simulated task
    with a scripted expert; neither gives the plain ``make_vector_env``."""
    from robofinetune.envs import make_vector_env
    from robofinetune.envs.spec import task_source_for

    if intervener not in INTERVENERS:
        raise ConfigError(f"config field 'intervener' is {intervener!r}; choose one of {list(INTERVENERS)}")
    source = task_source_for(task)
    is_robot = source is not None and source.single_env
    if teleop and intervener != "none":
        raise ConfigError("config fields 'teleop' and 'intervener' both set: the operator (teleop) or the scripted "
                          "expert (intervener) takes over, not both")
    if teleop:
        from robofinetune.robot.teleop import TELEOP_KINDS, TerminalKeys, make_teleop

        if not is_robot:
            raise ConfigError(f"config field 'teleop' ({teleop!r}) needs a robot task (--task=real_robot/<robot>.yaml); "
                              f"in simulation use --intervener=scripted")
        if teleop not in TELEOP_KINDS:
            raise ConfigError(f"config field 'teleop' is {teleop!r}; choose one of {list(TELEOP_KINDS)}")
        from robofinetune.robot.config import load_robot_config

        robot = load_robot_config(task)
        operator = TeleopIntervener(make_teleop(teleop, robot), robot.action_dim, TerminalKeys())
        operator.mark_ends_episode = robot.success is None   # the mark is the outcome: nothing left to wait for
        envs = make_intervened_vector_env(task, 1, seed, lambda index: operator)
        operator.source.start(envs.envs[0].unwrapped)
        if operator.keys.available:
            from robofinetune.robot.teleop import KEY_HELP

            print(f"{KEY_HELP}, t take over / hand back", flush=True)
            operator.keys.start()
        return envs, operator
    if intervener == "scripted":
        if is_robot:
            raise ConfigError("config field 'intervener' is 'scripted', which needs the simulator's state; on a robot "
                              "use --teleop=ros-topic (the twin's --expert-teleop can play the operator)")
        factory = ScriptedIntervenerFactory(str(task), scripted or ScriptedInterventionConfig(), seed=seed)
        return make_intervened_vector_env(task, num_envs, seed, factory), None
    return make_vector_env(task, num_envs=num_envs, seed=seed), None


def make_intervened_vector_env(task: str | Path, num_envs: int, seed: int,
                               make_intervener: Callable[[int], Intervener]) -> gymnasium.vector.VectorEnv:
    """``make_vector_env(task, num_envs, seed)`` with env ``i`` wrapped in ``InterventionWrapper(env,
    make_intervener(i))``: in each worker process for a simulated task (``make_intervener`` must pickle), in this
    process for a robot (one env)."""
    import functools

    from robofinetune.envs import AUTORESET_MODE, _WorkerEnvFactory, load_task_spec, make_env
    from robofinetune.envs.spec import task_source_for

    def wrapped(index: int) -> gymnasium.Env:
        return InterventionWrapper(make_env(task, seed=seed + index), make_intervener(index))

    source = task_source_for(task)
    if source is not None and source.single_env:
        return gymnasium.vector.SyncVectorEnv([functools.partial(wrapped, 0)], autoreset_mode=AUTORESET_MODE)
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    if num_envs == 1:
        return gymnasium.vector.SyncVectorEnv([functools.partial(wrapped, 0)], autoreset_mode=AUTORESET_MODE)
    spec = load_task_spec(task)
    context = "forkserver" if spec.cameras and sys.platform.startswith("linux") else None
    factories = [_InterveningWorkerFactory(_WorkerEnvFactory(spec, seed + i, False, {}), make_intervener, i)
                 for i in range(num_envs)]
    return gymnasium.vector.AsyncVectorEnv(factories, context=context, autoreset_mode=AUTORESET_MODE)
