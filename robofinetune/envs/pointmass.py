"""``pointmass``: a 2-D point mass pushed by a force towards a random goal; fast enough for tests.

The model is ``envs/assets/pointmass.xml``: a 1 kg sphere on two damped slide joints (x, y), driven by two
motors with a force range of [-1, 1] N, no gravity, no contacts. The action is the force, one step holds it
for ``1 / control_freq`` seconds. Success needs the agent within ``success_radius`` of the goal *and* slower
than ``success_speed``, so a policy must brake, not just fly through the goal.
"""

from __future__ import annotations

import atexit
import os
import weakref
from pathlib import Path
from typing import Any

import gymnasium
import mujoco
import numpy as np

from robofinetune.envs.base import action_space, check_action, observation_space
from robofinetune.envs.rendering import apply_render_settings, apply_scene_flags
from robofinetune.envs.spec import TaskSpec
from robofinetune.errors import TaskError
from robofinetune.paths import task_specs_dir


# Renderers still open at interpreter exit are closed before EGL is torn down (else a noisy EGLError). MuJoCo
# registers its EGL teardown when it makes the first context; atexit runs handlers last-in first-out, so ours is
# registered after that, once the first renderer exists.
_RENDERING_ENVS: "weakref.WeakSet[PointMassEnv]" = weakref.WeakSet()
_close_registered = False


def _close_renderers() -> None:
    for env in list(_RENDERING_ENVS):
        env.close()


STATE_KEYS = ("agent_pos", "agent_vel", "goal_pos")


class PointMassEnv(gymnasium.Env):
    """Observation keys ``agent_pos`` (2), ``agent_vel`` (2), ``goal_pos`` (2), and ``<camera>_image`` for each
    of the spec's cameras (``top`` looks straight down at the whole arena); action: 2-D force in [-1, 1]."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        spec: TaskSpec,
        seed: int | None = None,
        render: bool = False,
        render_size: tuple[int, int] = (256, 256),
        model_path: str = "assets/pointmass.xml",
        success_radius: float = 0.02,
        success_speed: float = 0.05,
        goal_range: float = 0.3,
        start_range: float = 0.3,
        min_start_distance: float = 0.1,
        render_camera: str = "top",
        goal_marker_radius: float | None = None,
    ) -> None:
        self.task_spec = spec
        path = Path(model_path)
        if not path.is_absolute():
            base = spec.source.parent if spec.source is not None else task_specs_dir()
            path = base / path
        if not path.is_file():
            raise TaskError(f"task '{spec.name}': env_kwargs.model_path '{path}' does not exist")
        self.model = mujoco.MjModel.from_xml_path(str(path))
        if goal_marker_radius is not None:  # drawn only: the goal has no contacts, success uses success_radius
            self.model.geom_size[self.model.geom("goal").id][0] = float(goal_marker_radius)
        self.data = mujoco.MjData(self.model)
        self.frame_skip = max(1, int(round(1.0 / (spec.control_freq * self.model.opt.timestep))))
        self.success_radius = float(success_radius)
        self.success_speed = float(success_speed)
        self.goal_range = float(goal_range)
        self.start_range = float(start_range)
        self.min_start_distance = float(min_start_distance)
        self.horizon = spec.horizon
        self.observation_space = observation_space(spec)
        self.action_space = action_space(spec)
        self.metadata = dict(self.metadata, render_fps=spec.control_freq)
        self.render_mode = "rgb_array" if render else None
        self.render_camera = render_camera
        self._renderer: mujoco.Renderer | None = None
        self._camera_renderers: dict[str, tuple[str, mujoco.Renderer]] = {}  # obs key -> (camera, renderer)
        apply_render_settings(self.model, spec.render_settings)
        for camera in spec.cameras:
            if mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, camera.name) < 0:
                names = [self.model.camera(i).name for i in range(self.model.ncam)]
                raise TaskError(f"task '{spec.name}': camera '{camera.name}' is not in {path.name} (cameras: {names})")
            self._camera_renderers[camera.key] = (camera.name, self._make_renderer(camera.height, camera.width))
        unknown = [key for key in spec.obs_keys if key not in STATE_KEYS and key not in self._camera_renderers]
        if unknown:
            raise TaskError(f"task '{spec.name}': the pointmass env has no observation {unknown} (state keys: "
                            f"{list(STATE_KEYS)}, images: <camera>_image of the spec's cameras)")
        if render:
            self._renderer = self._make_renderer(*render_size)
        self._goal_mocap = self.model.body_mocapid[self.model.body("goal").id]
        self.goal = np.zeros(2)
        self._steps = 0
        self._pending_seed = seed

    # --- gymnasium API -------------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is None and self._pending_seed is not None:
            seed = self._pending_seed
        self._pending_seed = None
        super().reset(seed=seed)
        rng = self.np_random
        mujoco.mj_resetData(self.model, self.data)
        start = rng.uniform(-self.start_range, self.start_range, size=2)
        goal = rng.uniform(-self.goal_range, self.goal_range, size=2)
        while np.linalg.norm(goal - start) < self.min_start_distance:
            goal = rng.uniform(-self.goal_range, self.goal_range, size=2)
        if options:
            start = np.asarray(options.get("start", start), dtype=np.float64)
            goal = np.asarray(options.get("goal", goal), dtype=np.float64)
        self.data.qpos[:2] = start
        self.goal = goal
        self.data.mocap_pos[self._goal_mocap, :2] = goal
        mujoco.mj_forward(self.model, self.data)
        self._steps = 0
        obs = self._obs()
        return obs, {"is_success": False, "distance": float(np.linalg.norm(goal - start))}

    def step(self, action):
        action = check_action(action, 2)
        self.data.ctrl[:] = action
        mujoco.mj_step(self.model, self.data, nstep=self.frame_skip)
        self._steps += 1
        obs = self._obs()
        distance = float(np.linalg.norm(self.data.qpos[:2].astype(np.float32) - self.goal))
        speed = float(np.linalg.norm(self.data.qvel[:2].astype(np.float32)))
        success = distance < self.success_radius and speed < self.success_speed
        truncated = (not success) and self._steps >= self.horizon
        info = {"is_success": success, "distance": distance}
        return obs, (1.0 if success else 0.0), success, truncated, info

    def _make_renderer(self, height: int, width: int) -> mujoco.Renderer:
        try:
            renderer = mujoco.Renderer(self.model, height=height, width=width)
        except Exception as exc:  # noqa: BLE001 - GL backends raise many kinds of errors
            raise RuntimeError(
                f"cannot create an offscreen MuJoCo renderer (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}): "
                f"{exc}. On a headless Linux machine set MUJOCO_GL=egl (Debian: libegl1, libegl-mesa0, "
                "libgl1-mesa-dri) before mujoco is first imported"
            ) from exc
        apply_scene_flags(renderer.scene.flags, self.task_spec.render_settings)
        _RENDERING_ENVS.add(self)
        global _close_registered
        if not _close_registered:
            atexit.register(_close_renderers)
            _close_registered = True
        return renderer

    def render(self):
        if self._renderer is None:
            raise RuntimeError("this env was made with render=False; use make_env(..., render=True)")
        self._renderer.update_scene(self.data, camera=self.render_camera)
        return self._renderer.render().copy()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        for _, renderer in self._camera_renderers.values():
            renderer.close()
        self._camera_renderers = {}

    # --- helpers -------------------------------------------------------------------------------------------

    def _obs(self) -> dict[str, np.ndarray]:
        values = {
            "agent_pos": self.data.qpos[:2].astype(np.float32),
            "agent_vel": self.data.qvel[:2].astype(np.float32),
            "goal_pos": self.goal.astype(np.float32),
        }
        for key, (camera, renderer) in self._camera_renderers.items():
            renderer.update_scene(self.data, camera=camera)
            values[key] = renderer.render().copy()  # uint8 (H, W, 3), top row first
        return {key: values[key] for key in self.task_spec.obs_keys}

    def expert_observation(self) -> dict[str, np.ndarray]:
        """Every state key at the current state, whatever the spec observes (a scripted expert needs the goal
        even when the policy sees it only through the camera)."""
        return {"agent_pos": self.data.qpos[:2].astype(np.float32), "agent_vel": self.data.qvel[:2].astype(np.float32),
                "goal_pos": self.goal.astype(np.float32)}

    def is_success(self) -> bool:
        distance = np.linalg.norm(self.data.qpos[:2] - self.goal)
        return bool(distance < self.success_radius and np.linalg.norm(self.data.qvel[:2]) < self.success_speed)

    @property
    def env_meta(self) -> dict[str, Any]:
        """robomimic-style env metadata (env_type 2 = gym-like)."""
        return {"env_name": self.task_spec.name, "env_type": 2, "env_kwargs": dict(self.task_spec.env_kwargs)}
