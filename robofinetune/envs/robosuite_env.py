"""A gymnasium wrapper around one robosuite environment (lift, can, square, ...)."""

from __future__ import annotations

import copy
from typing import Any

import gymnasium
import numpy as np

from robofinetune.envs.base import action_space, check_action, check_obs_shapes, is_image_key, observation_space
from robofinetune.envs.spec import TaskSpec
from robofinetune.errors import TaskError
from robofinetune.logs import import_robosuite

ROBOMIMIC_ENV_TYPE_ROBOSUITE = 1


def resolve_controller_configs(controller: Any, robots: Any) -> Any:
    """Turn a controller name into a robosuite 1.5 composite controller config.

    A part-controller name (``OSC_POSE``, ``OSC_POSITION``, ``JOINT_VELOCITY``, ...) is loaded from robosuite's
    defaults and placed on every arm of the robot, keeping the robot's default gripper; a composite name
    (``BASIC``, ``WHOLE_BODY_IK``, ...) or a ``.json`` path goes to ``load_composite_controller_config``;
    a dict (already a config) is returned unchanged.
    """
    if controller is None or isinstance(controller, dict):
        return controller
    import_robosuite()  # an env process's first robosuite import: its start-up warnings go to the log
    from robosuite.controllers import (
        ALL_PART_CONTROLLERS,
        load_composite_controller_config,
        load_part_controller_config,
    )
    from robosuite.controllers.composite.composite_controller_factory import refactor_composite_controller_config

    robot = robots[0] if isinstance(robots, (list, tuple)) else robots
    if not isinstance(controller, str):
        raise TaskError(f"env_kwargs.controller_configs must be a name or a mapping, got {controller!r}")
    if controller.upper() in ALL_PART_CONTROLLERS:
        part = load_part_controller_config(default_controller=controller.upper())
        return refactor_composite_controller_config(part, robot, ["right"])
    return load_composite_controller_config(controller=controller, robot=robot)


# --- the robomimic ``object`` vector ---------------------------------------------------------------------------
# robomimic's datasets were made with robosuite <= 1.4, whose ``object-state`` differs from robosuite 1.5's:
# 1.5 puts the object-to-eef pose first for PickPlace/NutAssembly (and computes it from the previous step's
# object pose, zeros right after reset) and flips the sign of Lift's ``gripper_to_cube_pos``. The builders
# below compute ``object`` fresh from the sim in the robomimic (robosuite <= 1.4) layout, so policies trained
# on robomimic data see the same numbers here.


def _pose_in_gripper(obj_pos: np.ndarray, obj_quat: np.ndarray, eef_pos: np.ndarray, eef_quat: np.ndarray):
    from robosuite.utils import transform_utils as T

    world_pose_in_gripper = T.pose_inv(T.pose2mat((eef_pos, eef_quat)))
    rel = T.pose_in_A_to_pose_in_B(T.pose2mat((obj_pos, obj_quat)), world_pose_in_gripper)
    return T.mat2pose(rel)


def _body_pose(env: Any, body_name: str) -> tuple[np.ndarray, np.ndarray]:
    from robosuite.utils import transform_utils as T

    body_id = env.obj_body_id[body_name]
    pos = np.array(env.sim.data.body_xpos[body_id])
    quat = T.convert_quat(np.array(env.sim.data.body_xquat[body_id]), to="xyzw")
    return pos, quat


def _object_pose_and_relative(env: Any, name: str, raw: dict[str, Any]) -> np.ndarray:
    pos, quat = _body_pose(env, name)
    rel_pos, rel_quat = _pose_in_gripper(pos, quat, raw["robot0_eef_pos"], raw["robot0_eef_quat"])
    return np.concatenate([pos, quat, rel_pos, rel_quat])


def _lift_object(env: Any, raw: dict[str, Any]) -> np.ndarray:
    # cube_pos, cube_quat, gripper_to_cube_pos (= eef_pos - cube_pos, robosuite <= 1.4 sign)
    from robosuite.utils import transform_utils as T

    pos = np.array(env.sim.data.body_xpos[env.cube_body_id])
    quat = T.convert_quat(np.array(env.sim.data.body_xquat[env.cube_body_id]), to="xyzw")
    return np.concatenate([pos, quat, np.asarray(raw["robot0_eef_pos"]) - pos])


def _pick_place_object(env: Any, raw: dict[str, Any]) -> np.ndarray:
    # <Obj>_pos, <Obj>_quat, <Obj>_to_robot0_eef_pos, <Obj>_to_robot0_eef_quat (single-object PickPlace)
    return _object_pose_and_relative(env, env.objects[env.object_id].name, raw)


def _nut_object(env: Any, raw: dict[str, Any]) -> np.ndarray:
    # <Nut>_pos, <Nut>_quat, <Nut>_to_robot0_eef_pos, <Nut>_to_robot0_eef_quat (single-nut NutAssembly)
    return _object_pose_and_relative(env, env.nuts[env.nut_id].name, raw)


ROBOMIMIC_OBJECT_BUILDERS = {
    "Lift": _lift_object,
    "PickPlaceCan": _pick_place_object,
    "PickPlaceMilk": _pick_place_object,
    "PickPlaceBread": _pick_place_object,
    "PickPlaceCereal": _pick_place_object,
    "NutAssemblySquare": _nut_object,
    "NutAssemblyRound": _nut_object,
}


def _camera_kwargs(spec: TaskSpec, env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """robosuite's camera arguments for the spec's cameras (none when it has none)."""
    if not spec.cameras:
        return {}
    wanted = {"use_camera_obs": True, "camera_names": [c.name for c in spec.cameras],
              "camera_heights": [c.height for c in spec.cameras], "camera_widths": [c.width for c in spec.cameras],
              "camera_depths": False}
    for name, value in wanted.items():
        given = env_kwargs.get(name)
        if given is not None and given != value and not (isinstance(given, (str, int)) and [given] == value):
            raise TaskError(f"task '{spec.name}': env_kwargs.{name} is {given!r} but field 'cameras' asks for "
                            f"{value!r}; name cameras in 'cameras' only")
    return wanted


class RobosuiteEnv(gymnasium.Env):
    """One robosuite env behind the robofinetune Env interface.

    Observations are the spec's keys, float32 (uint8 for ``*_image``), in spec order, computed at the state
    reached (so ``set_state(get_state())`` gives back the same observation). ``object`` follows robomimic's
    layout (see ``ROBOMIMIC_OBJECT_BUILDERS``) for the envs robomimic covers; for other envs a key ``k``
    missing from robosuite's observations is read from ``k-state`` (``object`` -> ``object-state``).
    Reward is sparse: 1.0 when ``_check_success()`` holds, which also terminates the episode; ``truncated``
    at the spec's horizon. ``reset(seed=s)`` reseeds robosuite's own generator (robot init noise, object
    placement) so placements repeat exactly.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        spec: TaskSpec,
        seed: int | None = None,
        render: bool = False,
        render_camera: str = "agentview",
        render_size: tuple[int, int] = (256, 256),
    ) -> None:
        robosuite = import_robosuite()
        self.task_spec = spec
        kwargs = copy.deepcopy(spec.env_kwargs)
        kwargs.setdefault("robots", "Panda")
        kwargs["controller_configs"] = resolve_controller_configs(kwargs.get("controller_configs", "OSC_POSE"),
                                                                   kwargs["robots"])
        kwargs.update(_camera_kwargs(spec, kwargs))
        kwargs.setdefault("use_camera_obs", False)
        kwargs.setdefault("use_object_obs", True)
        kwargs.setdefault("reward_shaping", False)
        kwargs.setdefault("hard_reset", False)
        kwargs["has_renderer"] = False
        kwargs["has_offscreen_renderer"] = bool(render or kwargs["use_camera_obs"])
        kwargs["control_freq"] = spec.control_freq
        kwargs["horizon"] = spec.horizon
        kwargs["ignore_done"] = True  # the wrapper decides when an episode ends
        self._kwargs = kwargs
        self.robosuite_env = robosuite.make(spec.env_name, seed=seed, **kwargs)
        self._styled_context: Any = None
        self._cameras: dict[str, Any] | None = None
        self._camera_observables()  # switched off before robosuite's first reset could render them
        self._apply_render_settings()
        low, _ = self.robosuite_env.action_spec
        if len(low) != spec.action_dim:
            raise TaskError(
                f"task '{spec.name}': robosuite env '{spec.env_name}' has action dim {len(low)}, "
                f"the spec says action_dim {spec.action_dim}"
            )
        self.observation_space = observation_space(spec)
        self.action_space = action_space(spec)
        self.metadata = dict(self.metadata, render_fps=spec.control_freq)
        self.render_mode = "rgb_array" if render else None
        self.render_camera = render_camera
        self.render_size = tuple(render_size)
        self.horizon = spec.horizon
        self._key_map: dict[str, str] | None = None
        self._steps = 0
        self._pending_seed = seed

    # --- gymnasium API -------------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is None and self._pending_seed is not None:
            seed = self._pending_seed
        self._pending_seed = None
        super().reset(seed=seed)
        if seed is not None:
            self._reseed_robosuite(seed)
        self.robosuite_env.reset()
        self._apply_render_settings()  # a hard reset makes a new sim and rendering context
        self._steps = 0
        return self._convert(self._observe()), {"is_success": False}

    def step(self, action):
        action = check_action(action, self.task_spec.action_dim)
        self.robosuite_env.step(action)
        # robosuite's own step observations come from the kinematics before the last physics substep (up to
        # ~2 mm behind the state for a falling object); recompute them at the state itself, as robomimic's
        # dataset_states_to_obs did, so that obs == set_state(get_state()) exactly. Costs ~0.5 ms a step.
        raw = self._observe()
        self._steps += 1
        success = bool(self.robosuite_env._check_success())
        truncated = (not success) and self._steps >= self.horizon
        return self._convert(raw), (1.0 if success else 0.0), success, truncated, {"is_success": success}

    def render(self):
        if self.render_mode is None:
            raise RuntimeError("this env was made with render=False; use make_env(..., render=True)")
        height, width = self.render_size
        frame = self.robosuite_env.sim.render(width=width, height=height, camera_name=self.render_camera)
        return np.ascontiguousarray(frame[::-1])  # OpenGL images are bottom-up

    def close(self) -> None:
        env = getattr(self, "robosuite_env", None)
        if env is not None:
            env.close()
            self.robosuite_env = None

    # --- state, for replaying demos ------------------------------------------------------------------------

    def get_state(self) -> np.ndarray:
        """The flattened MuJoCo state (time, qpos, qvel), as robomimic stores it in ``states``."""
        return np.asarray(self.robosuite_env.sim.get_state().flatten())

    def set_state(self, state: np.ndarray) -> dict[str, np.ndarray]:
        """Put the sim in a flattened MuJoCo state and return the observation there (the same observation
        ``reset``/``step`` returned at that state)."""
        sim = self.robosuite_env.sim
        state = np.asarray(state, dtype=np.float64).reshape(-1)
        expected = 1 + sim.model.nq + sim.model.nv
        if state.shape[0] != expected:
            raise ValueError(f"state has {state.shape[0]} values, this model's flattened state has {expected}")
        sim.set_state_from_flattened(state)
        return self._convert(self._observe())

    def is_success(self) -> bool:
        return bool(self.robosuite_env._check_success())

    def expert_observation(self) -> dict[str, np.ndarray]:
        """robomimic's low-dim keys (robot0_eef_pos/quat, robot0_gripper_qpos, ``object``) at the current state,
        whatever the spec observes: an image task hides the object from the policy, not from a scripted expert.
        Read from robosuite's observation cache, which ``reset``/``step`` refreshed (nothing is rendered)."""
        env = self.robosuite_env
        raw = {key: np.asarray(value) for key, value in env._obs_cache.items() if not is_image_key(key)}
        obs = {key: raw[key].astype(np.float32) for key in ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
               if key in raw}
        if self.task_spec.env_name in ROBOMIMIC_OBJECT_BUILDERS:
            obs["object"] = ROBOMIMIC_OBJECT_BUILDERS[self.task_spec.env_name](env, raw).astype(np.float32)
        elif "object-state" in raw:
            obs["object"] = raw["object-state"].astype(np.float32)
        return obs

    @property
    def env_meta(self) -> dict[str, Any]:
        """robomimic ``env_args``: env_name, env_type (1 = robosuite), env_kwargs (controller config resolved)."""
        kwargs = copy.deepcopy(self._kwargs)
        kwargs.pop("seed", None)
        return {"env_name": self.task_spec.env_name, "env_type": ROBOMIMIC_ENV_TYPE_ROBOSUITE, "env_kwargs": kwargs}

    # --- helpers -------------------------------------------------------------------------------------------

    def _apply_render_settings(self) -> None:
        """Put the spec's render settings on robosuite's offscreen context (robosuite exposes none of them).

        Multisampling is a property of the context's framebuffer, fixed when the context is made, so the context
        robosuite made is remade once with the new sample count.
        """
        settings = self.task_spec.render_settings
        sim = self.robosuite_env.sim
        context = getattr(sim, "_render_context_offscreen", None)
        if settings.is_default or context is None or context is self._styled_context:
            return
        import mujoco

        from robofinetune.envs.rendering import apply_scene_flags

        if settings.multisamples is not None and sim.model.vis.quality.offsamples != settings.multisamples:
            sim.model.vis.quality.offsamples = settings.multisamples
            context.gl_ctx.make_current()
            context.con.free()
            context.con = mujoco.MjrContext(sim.model._model, mujoco.mjtFontScale.mjFONTSCALE_150)
            mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, context.con)
        apply_scene_flags(context.scn.flags, settings)
        self._styled_context = context

    def _observe(self) -> dict[str, Any]:
        """robosuite's observations at the current state (forward kinematics first, sensors resampled), and each
        camera rendered once, here, at that state.

        robosuite itself samples camera observables early in its control step (after the first physics
        substep, ~45 ms of motion before the state the step ends in) and would render them there; its camera
        observables are switched off (``_camera_observables``), so an image step renders each camera once, and
        the frames match the state, as frames rendered by replaying a dataset's states do.
        """
        env = self.robosuite_env
        env.sim.forward()
        raw = env._get_observations(force_update=True)
        for name, observable in self._camera_observables().items():
            raw[name] = observable._sensor(env._obs_cache)
        return raw

    def _camera_observables(self) -> dict[str, Any]:
        if self._cameras is None:
            self._cameras = {}
            for name, observable in self.robosuite_env._observables.items():
                if observable.modality == "image" and name in self.task_spec.obs_shapes:
                    observable.set_enabled(False)  # rendered by _observe instead, at the state the step ends in
                    self._cameras[name] = observable
        return self._cameras

    def _reseed_robosuite(self, seed: int) -> None:
        # robosuite hands one np.random.Generator (env.rng) to its placement samplers and robot resets; set its
        # state in place so every holder of the reference sees the new seed.
        fresh = np.random.default_rng(seed)
        self.robosuite_env.rng.bit_generator.state = fresh.bit_generator.state

    def _convert(self, raw: dict[str, Any]) -> dict[str, np.ndarray]:
        if self._key_map is None:
            key_map = {}
            for key in self.task_spec.obs_shapes:
                if key == "object" and self.task_spec.env_name in ROBOMIMIC_OBJECT_BUILDERS:
                    key_map[key] = ""  # built by ROBOMIMIC_OBJECT_BUILDERS
                elif key in raw:
                    key_map[key] = key
                elif f"{key}-state" in raw:
                    key_map[key] = f"{key}-state"
                else:
                    raise TaskError(
                        f"task '{self.task_spec.name}': observation key '{key}' is not among robosuite's "
                        f"observations {sorted(raw)}"
                    )
            self._key_map = key_map
            check_obs_shapes(self.task_spec, self._gather(raw))
        return self._gather(raw)

    def _gather(self, raw: dict[str, Any]) -> dict[str, np.ndarray]:
        obs = {}
        for key, src in self._key_map.items():
            if src == "":
                value = ROBOMIMIC_OBJECT_BUILDERS[self.task_spec.env_name](self.robosuite_env, raw)
            else:
                value = raw[src]
            # camera observations keep robosuite's (OpenGL, bottom-up) convention, as robomimic datasets do
            obs[key] = np.asarray(value, dtype=np.uint8 if is_image_key(key) else np.float32)
        return obs
