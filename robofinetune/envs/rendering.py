"""A task's render settings (:class:`~robofinetune.envs.spec.RenderSettings`) applied to MuJoCo, for every env kind.

Under software OpenGL (Mesa llvmpipe through EGL, the headless default here) rendering, not physics, is the cost
of camera observations, and most of a frame goes to multisampling (the can scene, agentview 84x84, loaded 2-core
machine: 166 ms with MuJoCo's 4 samples and every light effect, 147 ms without shadows, reflections, skybox and
haze, 24 ms with neither).
"""

from __future__ import annotations

import mujoco
import numpy as np

from robofinetune.envs.spec import RenderSettings

_SCENE_FLAGS = (("shadows", mujoco.mjtRndFlag.mjRND_SHADOW), ("reflections", mujoco.mjtRndFlag.mjRND_REFLECTION),
                ("skybox", mujoco.mjtRndFlag.mjRND_SKYBOX), ("haze", mujoco.mjtRndFlag.mjRND_HAZE))


def apply_render_settings(model: mujoco.MjModel, settings: RenderSettings) -> None:
    """Settings that live in the model and must be set before a rendering context is made (multisampling)."""
    if settings.multisamples is not None:
        model.vis.quality.offsamples = settings.multisamples


def apply_scene_flags(flags: np.ndarray, settings: RenderSettings) -> None:
    """Switch off the effects ``settings`` turns off, in an ``mjvScene.flags`` array."""
    for name, flag in _SCENE_FLAGS:
        if not getattr(settings, name):
            flags[flag] = 0
