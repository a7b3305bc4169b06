"""Scripted experts: demos without a human, for pointmass, lift, can and square.

``make_expert(task, noise, seed)`` returns an object with ``reset(env)`` (call it after ``env.reset()``; it
reads task facts such as the target bin from ``env.unwrapped``) and ``act(obs) -> action`` in [-1, 1].

``noise = 0`` gives the clean expert. ``noise > 0`` imitates a pool of imperfect human operators: each
episode draws an operator *style* (speed gain, offsets of the waypoints it aims at, how often and how long it
hesitates, how long it waits for the gripper) whose spread grows with ``noise``, and Gaussian noise with
std ``ACTION_NOISE_STD * noise`` is added to every motion command. Success falls gradually as noise grows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import gymnasium
import numpy as np
from scipy.spatial.transform import Rotation

from robofinetune.envs.spec import TaskSpec, load_task_spec
from robofinetune.errors import TaskError

#: Std of the Gaussian added to each motion command, per unit of ``noise``.
ACTION_NOISE_STD = 0.3


@runtime_checkable
class ScriptedExpert(Protocol):
    def reset(self, env: gymnasium.Env) -> None: ...

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray: ...


@dataclass
class OperatorStyle:
    """How one (simulated) operator behaves during one episode. ``noise = 0`` gives the defaults."""

    gain: float = 1.0                 # speed multiplier on every proportional command
    grasp_offset: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # where it grasps, m
    place_offset: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # where it releases, m
    via_offset: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])    # detour on the way, m
    approach_height: float = 0.10     # height above the object before descending, m
    grasp_wait: int = 8               # steps it keeps closing before lifting
    pause_prob: float = 0.0           # per-step probability of starting a hesitation
    pause_max: int = 0                # longest hesitation, steps
    action_noise: float = 0.0         # std of the Gaussian added to motion commands

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_style(rng: np.random.Generator, noise: float) -> OperatorStyle:
    """A random operator whose deviations from the clean expert scale with ``noise`` (0 -> clean)."""
    if noise <= 0:
        return OperatorStyle()
    n = float(noise)
    return OperatorStyle(
        gain=float(np.clip(np.exp(rng.normal(0.0, 0.35 * n)), 0.4, 2.0)),
        grasp_offset=(rng.normal(0.0, 1.0, 3) * [0.006 * n, 0.006 * n, 0.005 * n]).round(5).tolist(),
        place_offset=(rng.normal(0.0, 1.0, 3) * [0.03 * n, 0.03 * n, 0.02 * n]).round(5).tolist(),
        via_offset=(rng.normal(0.0, 1.0, 3) * [0.08 * n, 0.08 * n, 0.03 * n]).round(5).tolist(),
        approach_height=float(np.clip(0.10 + rng.normal(0.0, 0.02 * n), 0.05, 0.18)),
        grasp_wait=int(np.clip(round(8 + rng.normal(0.0, 3.0 * n)), 3, 20)),
        pause_prob=float(np.clip(rng.uniform(0.0, 0.04 * n), 0.0, 0.2)),
        pause_max=int(round(4 + 12 * n)),
        action_noise=ACTION_NOISE_STD * n,
    )


class _StyledExpert:
    """Shared bookkeeping: the per-episode style, hesitations and action noise."""

    action_dim = 0
    STATE_KEYS: tuple[str, ...] = ()  # the observation keys act() reads

    def __init__(self, noise: float = 0.0, seed: int | None = None) -> None:
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.noise = float(noise)
        self.rng = np.random.default_rng(seed)
        self.style = OperatorStyle()
        self._pause_left = 0
        self._last_action: np.ndarray | None = None
        self._env: Any = None

    def _full_observation(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``obs`` completed with the simulator state it lacks: an image task shows the goal or the object to the
        policy only in pixels, the expert still reads it from the simulator (``env.expert_observation()``)."""
        source = getattr(self._env, "expert_observation", None)
        if source is None or all(key in obs for key in self.STATE_KEYS):
            return obs
        return {**source(), **obs}

    def take_over(self, env: gymnasium.Env, obs: dict[str, np.ndarray]) -> None:
        """Start driving in the middle of an episode (an intervention, ``rl.interventions``): like ``reset``, and
        experts with phases pick the phase that fits the current state."""
        self.reset(env)

    def _new_episode(self) -> None:
        self.style = sample_style(self.rng, self.noise)
        self._pause_left = 0
        self._last_action = None

    def _finish(self, action: np.ndarray, motion_dims: int) -> np.ndarray:
        """Apply hesitations and action noise to the clean command; clip to [-1, 1]."""
        action = np.asarray(action, dtype=np.float64).copy()
        style = self.style
        if self._pause_left > 0:
            self._pause_left -= 1
            action[:motion_dims] = 0.0  # hold still (the gripper command is kept)
        elif style.pause_prob > 0 and self.rng.random() < style.pause_prob:
            self._pause_left = int(self.rng.integers(1, max(style.pause_max, 1) + 1))
        if style.action_noise > 0:
            action[:motion_dims] += self.rng.normal(0.0, style.action_noise, motion_dims)
        action = np.clip(action, -1.0, 1.0).astype(np.float32)
        self._last_action = action
        return action


# --- pointmass -------------------------------------------------------------------------------------------------


class PointMassExpert(_StyledExpert):
    """A PD controller on the force: critically damped for the 1 kg, 1 N s/m point mass."""

    action_dim = 2
    STATE_KEYS = ("agent_pos", "agent_vel", "goal_pos")

    def __init__(self, noise: float = 0.0, seed: int | None = None, kp: float = 10.0) -> None:
        super().__init__(noise, seed)
        self.kp = kp
        self._via: np.ndarray | None = None

    def reset(self, env: gymnasium.Env) -> None:
        self._new_episode()
        self._env = env.unwrapped
        self._via = None
        if self.noise > 0:
            # some operators take a detour through a via-point on the way
            self._via = np.asarray(self.style.via_offset[:2]) * 2.0

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        obs = self._full_observation(obs)
        pos = np.asarray(obs["agent_pos"], dtype=np.float64)
        vel = np.asarray(obs["agent_vel"], dtype=np.float64)
        goal = np.asarray(obs["goal_pos"], dtype=np.float64)
        target = goal
        if self._via is not None:
            via = 0.5 * (pos + goal) + self._via
            if np.linalg.norm(self._via) > 0.01 and np.linalg.norm(via - pos) > 0.05:
                target = via
            else:
                self._via = None
        kp = self.kp * self.style.gain
        kd = 2.0 * np.sqrt(kp) - 1.0  # critical damping of m x'' + (1 + kd) x' + kp x = 0, m = 1
        return self._finish(kp * (target - pos) - kd * vel, motion_dims=2)


# --- robosuite waypoint experts --------------------------------------------------------------------------------


def _wrap_quarter_turn(angle: float) -> float:
    """Angle modulo 90 degrees into [-45, 45) degrees (a cube looks the same every quarter turn)."""
    return (angle + np.pi / 4) % (np.pi / 2) - np.pi / 4


def _yaw(matrix: np.ndarray) -> float:
    return float(np.arctan2(matrix[1, 0], matrix[0, 0]))


class _WaypointExpert(_StyledExpert):
    """Phase machine over end-effector waypoints for an OSC_POSE Panda (7-D action: dpos, drot, gripper).

    Position commands are proportional (``POS_GAIN`` x error / 5 cm) and saturate at 1; orientation is held
    at the episode's target orientation. The OSC leaves ~1 cm steady-state error, so phases switch on
    tolerances, and every phase has a step budget after which it moves on anyway.
    """

    action_dim = 7
    STATE_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
    POS_GAIN = 1.5
    ROT_GAIN = 1.0
    OPEN, CLOSE = -1.0, 1.0

    def __init__(self, noise: float = 0.0, seed: int | None = None) -> None:
        super().__init__(noise, seed)
        self.phase = "start"
        self.phase_steps = 0
        self._target_rot: Rotation | None = None
        self._env: Any = None

    def reset(self, env: gymnasium.Env) -> None:
        self._new_episode()
        self._env = env.unwrapped
        if not hasattr(self._env, "robosuite_env"):
            raise TaskError(f"{type(self).__name__} needs a RobosuiteEnv, got {type(self._env).__name__}")
        self._target_rot = None
        self._set_phase("approach")
        self._setup(self._env.robosuite_env)

    def _setup(self, rs_env: Any) -> None:
        """Read task facts (bins, pegs) from the robosuite env at the start of an episode."""

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        self.phase_steps = 0

    def _servo(self, obs: dict[str, np.ndarray], target: np.ndarray, gripper: float,
               max_speed: float = 1.0) -> np.ndarray:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        dpos = self.POS_GAIN * self.style.gain * (np.asarray(target) - eef) / 0.05
        norm = np.linalg.norm(dpos)
        if norm > max_speed:
            dpos *= max_speed / norm
        current = Rotation.from_quat(obs["robot0_eef_quat"])
        if self._target_rot is None:
            self._target_rot = current
        drot = self.ROT_GAIN * (self._target_rot * current.inv()).as_rotvec() / 0.5
        return np.concatenate([dpos, np.clip(drot, -1.0, 1.0), [gripper]])

    @staticmethod
    def _reached(obs: dict[str, np.ndarray], target: np.ndarray, xy_tol: float, z_tol: float) -> bool:
        err = np.asarray(target) - np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        return bool(np.linalg.norm(err[:2]) < xy_tol and abs(err[2]) < z_tol)

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        obs = self._full_observation(obs)
        self.phase_steps += 1
        target, gripper = self._plan(obs)
        return self._finish(self._servo(obs, target, gripper), motion_dims=6)

    def _plan(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        raise NotImplementedError


class _PickExpert(_WaypointExpert):
    """approach above the object -> descend -> close -> lift, then whatever ``_after_lift`` does."""

    GRASP_Z = 0.0            # grasp height relative to the object's body origin
    LIFT_Z = 1.10            # absolute height to lift to
    ALIGN_YAW = False        # turn the gripper to the object's yaw (modulo a quarter turn)
    HOLD_GAP = 0.002         # finger opening below which the gripper has closed on nothing
    CARRY_PHASES = ("lift",)  # phases in which the object must be in the hand (else: regrasp)

    def _object_pos(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(obs["object"][:3], dtype=np.float64)

    def _object_quat(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(obs["object"][3:7], dtype=np.float64)

    def _hold_point(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Where the fingers should close (world frame), before the operator's offset."""
        return self._object_pos(obs) + [0.0, 0.0, self.GRASP_Z]

    def _grasp_point(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return self._hold_point(obs) + np.asarray(self.style.grasp_offset)

    def _holding(self, obs: dict[str, np.ndarray]) -> bool:
        """Object near the fingers and fingers not closed on nothing."""
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        gap = float(obs["robot0_gripper_qpos"][0] - obs["robot0_gripper_qpos"][1])
        near = np.linalg.norm(self._hold_point(obs) - eef) < 0.05
        return near and gap > self.HOLD_GAP

    def take_over(self, env: gymnasium.Env, obs: dict[str, np.ndarray]) -> None:
        """Mid-episode start: with the object already in the hand carry on from the lift, else approach it."""
        self.reset(env)
        if self._holding(self._full_observation(obs)):
            self._target_rot = Rotation.from_quat(self._full_observation(obs)["robot0_eef_quat"])
            self._set_phase("lift")

    def _yaw_error(self, object_yaw: float, gripper_yaw: float) -> float:
        """Yaw turn that lines the fingers up with the object (a cube: any face, modulo a quarter turn)."""
        return _wrap_quarter_turn(object_yaw - gripper_yaw)

    def _align_yaw(self, obs: dict[str, np.ndarray]) -> None:
        current = Rotation.from_quat(obs["robot0_eef_quat"])
        if self._target_rot is None:
            self._target_rot = current
        if not self.ALIGN_YAW:
            return
        obj_yaw = _yaw(Rotation.from_quat(self._object_quat(obs)).as_matrix())
        delta = self._yaw_error(obj_yaw, _yaw(self._target_rot.as_matrix()))
        self._target_rot = Rotation.from_rotvec([0.0, 0.0, delta]) * self._target_rot

    def _plan(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        grasp = self._grasp_point(obs)
        above = grasp + [0.0, 0.0, self.style.approach_height]
        if self.phase == "approach":
            if self.phase_steps == 1:
                self._align_yaw(obs)
            if self._reached(obs, above, 0.012, 0.03) or self.phase_steps > 80:
                self._set_phase("descend")
            return above, self.OPEN
        if self.phase == "descend":
            if self._reached(obs, grasp, 0.01, 0.012) or self.phase_steps > 50:
                self._set_phase("close")
            return grasp, self.OPEN
        if self.phase == "close":
            if self.phase_steps >= self.style.grasp_wait:
                self._set_phase("lift")
            return grasp, self.CLOSE
        if self.phase in self.CARRY_PHASES:
            eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
            if (self.phase != "lift" or self.phase_steps > 5) and not self._holding(obs):
                self._set_phase("regrasp")
                return eef + [0.0, 0.0, 0.05], self.OPEN
            return self._after_lift(obs)
        if self.phase == "regrasp":
            # missed or dropped: open, back off upwards, start over
            if self.phase_steps > 8:
                self._set_phase("approach")
            eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
            return eef + [0.0, 0.0, 0.03], self.OPEN
        return self._after_lift(obs)

    def _after_lift(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        raise NotImplementedError


class LiftExpert(_PickExpert):
    """Lift: grasp the cube (gripper turned to the cube's yaw) and raise it."""

    GRASP_Z = -0.002
    ALIGN_YAW = True

    def _after_lift(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        target = np.array([eef[0], eef[1], self._table_z + 0.15])
        return target, self.CLOSE

    def _setup(self, rs_env: Any) -> None:
        self._table_z = float(rs_env.model.mujoco_arena.table_offset[2])


class CanExpert(_PickExpert):
    """Can: grasp -> lift to z 1.10 -> carry over the can's bin -> lower -> open -> back off upwards."""

    GRASP_Z = 0.005
    LIFT_Z = 1.10
    RELEASE_Z = 1.00
    CARRY_PHASES = ("lift", "carry", "lower")

    def _setup(self, rs_env: Any) -> None:
        self._bin = np.array(rs_env.target_bin_placements[rs_env.object_to_id["can"]], dtype=np.float64)

    def _after_lift(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        offset = np.asarray(self.style.place_offset)
        place = self._bin[:2] + offset[:2]
        over_bin = np.array([place[0], place[1], self.LIFT_Z])
        if self.phase == "lift":
            up = np.array([eef[0], eef[1], self.LIFT_Z])
            if eef[2] > self.LIFT_Z - 0.04 or self.phase_steps > 60:
                self._set_phase("carry")
            return up, self.CLOSE
        if self.phase == "carry":
            if self._reached(obs, over_bin, 0.03, 0.06) or self.phase_steps > 100:
                self._set_phase("lower")
            return over_bin, self.CLOSE
        if self.phase == "lower":
            low = np.array([place[0], place[1], self.RELEASE_Z + offset[2]])
            if self._reached(obs, low, 0.03, 0.03) or self.phase_steps > 40:
                self._set_phase("release")
            return low, self.CLOSE
        if self.phase == "release":
            if self.phase_steps >= 6:
                self._set_phase("retreat")
            return eef, self.OPEN
        # retreat: move up and away so the can counts as placed (success needs the gripper > ~7 cm away)
        return np.array([eef[0], eef[1], self.LIFT_Z + 0.05]), self.OPEN


class SquareExpert(_PickExpert):
    """Square: grasp the nut's handle across its width -> lift above the peg top -> put the nut's centre over
    the square peg -> lower it down the peg -> open -> back off upwards."""

    HANDLE = np.array([0.054, 0.0, 0.0])  # handle site in the nut frame (square-nut.xml)
    GRASP_Z = 0.0
    ALIGN_YAW = True
    LIFT_Z = 1.02          # nut bottom clears the 0.95 m peg top
    CARRY_PHASES = ("lift", "carry", "lower")

    def _setup(self, rs_env: Any) -> None:
        self._peg = np.array(rs_env.sim.data.body_xpos[rs_env.peg1_body_id], dtype=np.float64)
        self._peg_top = float(self._peg[2] + 0.1)  # pegs_arena.xml: a 0.1 m half-height box
        self._table_z = float(rs_env.table_offset[2])
        self._integral = np.zeros(2)

    def _hold_point(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        rot = Rotation.from_quat(self._object_quat(obs))
        return self._object_pos(obs) + rot.apply(self.HANDLE) + [0.0, 0.0, self.GRASP_Z]

    def _yaw_error(self, object_yaw: float, gripper_yaw: float) -> float:
        # fingers close along the hand's y axis: put the hand's x axis along the handle (either way round)
        return (object_yaw - gripper_yaw + np.pi / 2) % np.pi - np.pi / 2

    def _setup_carry(self, obs: dict[str, np.ndarray]) -> None:
        # turn the hand so the nut's square hole lines up with the square peg (its diagonal barely fits)
        nut_yaw = _yaw(Rotation.from_quat(self._object_quat(obs)).as_matrix())
        self._target_rot = Rotation.from_rotvec([0.0, 0.0, -_wrap_quarter_turn(nut_yaw)]) * self._target_rot
        self._integral = np.zeros(2)

    def _after_lift(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        nut = self._object_pos(obs)
        goal_xy = self._peg[:2] + np.asarray(self.style.place_offset[:2]) * 0.2  # the peg leaves little room
        error = goal_xy - nut[:2]
        if self.phase in ("carry", "lower") and np.linalg.norm(error) < 0.03:
            # the loaded arm sags ~1 cm short of its target: integrate the remaining error into the target
            self._integral = np.clip(self._integral + 0.15 * error, -0.03, 0.03)
        # where the hand must be for the nut's centre to sit over the peg
        hand_xy = goal_xy + (eef[:2] - nut[:2]) + self._integral
        if self.phase == "lift":
            if eef[2] > self.LIFT_Z - 0.02 or self.phase_steps > 60:
                self._set_phase("carry")
                self._setup_carry(obs)
            return np.array([eef[0], eef[1], self.LIFT_Z + 0.02]), self.CLOSE
        if self.phase == "carry":
            if (np.linalg.norm(error) < 0.004 and self.phase_steps > 10) or self.phase_steps > 150:
                self._set_phase("lower")
            return np.array([*hand_xy, self.LIFT_Z + 0.02]), self.CLOSE
        if self.phase == "lower":
            if nut[2] < self._table_z + 0.04 or self.phase_steps > 60:
                self._set_phase("release")
            elif nut[2] > self._peg_top - 0.01 and self.phase_steps > 15:
                self._set_phase("carry")  # stuck on the peg top: back up and line up again
            hand_z = eef[2] - (nut[2] - (self._table_z + 0.015))
            if np.linalg.norm(error) > 0.006 and nut[2] > self._peg_top - 0.01:
                hand_z = eef[2]  # do not push the nut onto the peg top while it is off centre
            return np.array([*hand_xy, hand_z]), self.CLOSE
        if self.phase == "release":
            if self.phase_steps >= 6:
                self._set_phase("retreat")
            return eef, self.OPEN
        return np.array([eef[0], eef[1], self.LIFT_Z + 0.1]), self.OPEN


_EXPERTS = {"pointmass": PointMassExpert, "lift": LiftExpert, "can": CanExpert, "square": SquareExpert}


def make_expert(task: str | Path | TaskSpec, noise: float = 0.0, seed: int | None = None) -> ScriptedExpert:
    """The scripted expert named by the task spec's ``expert`` field (``task`` may also name one directly)."""
    if isinstance(task, str) and task in _EXPERTS:
        name, label = task, task
    else:
        spec = load_task_spec(task)
        name, label = spec.expert, spec.name
    if name not in _EXPERTS:
        raise TaskError(f"no scripted expert for task '{label}'; experts exist for: {sorted(_EXPERTS)}")
    return _EXPERTS[name](noise=noise, seed=seed)
