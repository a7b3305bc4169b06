"""Environments: tasks defined as data (``envs/<task>.yaml``) behind one gymnasium interface.

``make_env("can")`` returns a ``gymnasium.Env`` with a Dict observation space (float32 Box per key, in the
spec's order), a Box(-1, 1) action space, a sparse 0/1 success reward, ``terminated`` on success,
``truncated`` at the horizon and ``info["is_success"]`` on every step. ``make_vector_env`` batches them.

Headless rendering: unless ``MUJOCO_GL`` is already set, importing this package sets it to ``egl`` on Linux
when libEGL is present (Mesa's EGL renders on the CPU without a GPU or display), else ``osmesa`` when
libOSMesa is present. It must happen before ``mujoco`` is first imported.
"""

from __future__ import annotations

import ctypes.util
import functools
import os
import sys
from pathlib import Path
from typing import Any


def _default_mujoco_gl() -> None:
    if os.environ.get("MUJOCO_GL") or not sys.platform.startswith("linux") or "mujoco" in sys.modules:
        return
    if ctypes.util.find_library("EGL"):
        os.environ["MUJOCO_GL"] = "egl"
    elif ctypes.util.find_library("OSMesa"):
        os.environ["MUJOCO_GL"] = "osmesa"


_default_mujoco_gl()

import gymnasium  # noqa: E402

from robofinetune.envs.spec import TaskSpec, list_tasks, load_task_spec  # noqa: E402
from robofinetune.errors import TaskError  # noqa: E402

__all__ = ["TaskSpec", "load_task_spec", "list_tasks", "make_env", "make_vector_env"]

# Keyword arguments of make_env that configure the wrapper itself rather than the task.
_WRAPPER_KWARGS = ("render_camera", "render_size")

#: Autoreset mode of every vector env made here (see make_vector_env).
AUTORESET_MODE = gymnasium.vector.AutoresetMode.SAME_STEP


def make_env(task: str | Path | TaskSpec, seed: int | None = None, render: bool = False,
             **overrides: Any) -> gymnasium.Env:
    """Build one environment for ``task`` (a name from :func:`list_tasks`, a YAML path, or a TaskSpec).

    ``seed`` seeds the first ``reset()`` (a later ``reset(seed=...)`` reseeds). ``render=True`` creates an
    offscreen renderer so ``env.render()`` returns an HxWx3 uint8 frame (robosuite: the ``agentview``
    camera; choose with ``render_camera=``, size with ``render_size=(H, W)``). Other ``overrides`` replace
    TaskSpec fields (``horizon=50``) or, for any other name, entries of ``env_kwargs``.
    """
    spec = load_task_spec(task)
    wrapper_kwargs = {key: overrides.pop(key) for key in _WRAPPER_KWARGS if key in overrides}
    if overrides:
        spec = spec.replace(**overrides)
    if spec.kind == "pointmass":
        from robofinetune.envs.pointmass import PointMassEnv

        try:
            return PointMassEnv(spec, seed=seed, render=render, **wrapper_kwargs, **spec.env_kwargs)
        except TypeError as exc:
            raise TaskError(f"task '{spec.name}': bad env_kwargs for the pointmass env: {exc}") from exc
    if spec.kind == "robosuite":
        from robofinetune.envs.robosuite_env import RobosuiteEnv

        return RobosuiteEnv(spec, seed=seed, render=render, **wrapper_kwargs)
    raise TaskError(f"task '{spec.name}': unsupported kind {spec.kind!r}")


def make_vector_env(task: str | Path | TaskSpec, num_envs: int, seed: int = 0, asynchronous: bool = True,
                    render: bool = False, context: str | None = None,
                    **overrides: Any) -> gymnasium.vector.VectorEnv:
    """``num_envs`` copies of ``make_env(task)``, env ``i`` seeded with ``seed + i``.

    ``AsyncVectorEnv`` (one process per env; ``context`` picks the multiprocessing start method, default
    the platform's) unless ``num_envs == 1`` or ``asynchronous=False``, then ``SyncVectorEnv``.

    Autoreset mode: **SAME_STEP** (``gymnasium.vector.AutoresetMode.SAME_STEP``, also exported here as
    ``AUTORESET_MODE``). When env ``i`` terminates or truncates in ``step()``, it is reset inside that same
    call: the returned ``obs[i]`` is already the first observation of the next episode, while
    ``reward[i]``, ``terminated[i]``, ``truncated[i]`` belong to the finished episode. The finished
    episode's last observation is ``info["final_obs"][i]`` and its info ``info["final_info"]`` (masked by
    ``info["_final_obs"]``). ``info["is_success"][i]`` on that step is the *new* episode's (False): read
    success from ``terminated[i]`` (our envs terminate exactly on success) or from
    ``info["final_info"]["is_success"][i]``. Every step is therefore a valid transition and no action
    is wasted on a reset step, unlike gymnasium's default NEXT_STEP mode.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    spec = load_task_spec(task)
    fns = [functools.partial(make_env, spec, seed=seed + i, render=render, **overrides) for i in range(num_envs)]
    if asynchronous and num_envs > 1:
        return gymnasium.vector.AsyncVectorEnv(fns, context=context, autoreset_mode=AUTORESET_MODE)
    return gymnasium.vector.SyncVectorEnv(fns, autoreset_mode=AUTORESET_MODE)


def __getattr__(name: str) -> Any:
    # The env classes import mujoco/robosuite; load them only when asked for.
    if name == "RobosuiteEnv":
        from robofinetune.envs.robosuite_env import RobosuiteEnv

        return RobosuiteEnv
    if name == "PointMassEnv":
        from robofinetune.envs.pointmass import PointMassEnv

        return PointMassEnv
    raise AttributeError(f"module 'robofinetune.envs' has no attribute {name!r}")
