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

from robofinetune.envs.spec import TaskSpec, list_tasks, load_task_spec, task_source_for  # noqa: E402
from robofinetune import logs  # noqa: E402
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
    source = task_source_for(task)
    if source is not None and source.make_env is not None:  # e.g. a robot YAML: a connected robot env
        return source.make_env(task, seed=seed, **overrides)
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
                    render: bool = False, context: str | None = None, backend: str = "subprocess",
                    num_workers: int = 0, ray_address: str | None = None,
                    **overrides: Any) -> gymnasium.vector.VectorEnv:
    """``num_envs`` copies of ``make_env(task)``, env ``i`` seeded with ``seed + i``.

    ``AsyncVectorEnv`` (one process per env) unless ``num_envs == 1`` or ``asynchronous=False``, then
    ``SyncVectorEnv``. ``context`` is the multiprocessing start method: by default the platform's (``fork``
    on Linux), but ``forkserver`` on Linux when ``render=True`` or the task has cameras, because EGL contexts
    hang in workers forked from a process that has loaded libEGL (``spawn``/``forkserver`` re-import the task,
    so scripts using them need the usual ``if __name__ == "__main__":`` guard).

    Autoreset mode: **SAME_STEP** (``gymnasium.vector.AutoresetMode.SAME_STEP``, also exported here as
    ``AUTORESET_MODE``). When env ``i`` terminates or truncates in ``step()``, it is reset inside that same
    call: the returned ``obs[i]`` is already the first observation of the next episode, while
    ``reward[i]``, ``terminated[i]``, ``truncated[i]`` belong to the finished episode. The finished
    episode's last observation is ``info["final_obs"][i]`` and its info ``info["final_info"]`` (masked by
    ``info["_final_obs"]``). ``info["is_success"][i]`` on that step is the *new* episode's (False): read
    success from ``terminated[i]`` (our envs terminate exactly on success) or from
    ``info["final_info"]["is_success"][i]``. Every step is therefore a valid transition and no action
    is wasted on a reset step, unlike gymnasium's default NEXT_STEP mode.

    ``backend="ray"``: the envs live in ``num_workers`` Ray actors (default one per env) instead of local
    processes, with the same seeds, observations and autoreset (``robofinetune.distributed.RayVectorEnv``, which
    also says how a killed worker's episodes are reported); ``ray_address`` None starts a local Ray, "auto" or
    "ray://host:port" joins a cluster.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    if backend not in ("subprocess", "ray"):
        raise ValueError(f"backend must be 'subprocess' or 'ray', got {backend!r}")
    source = task_source_for(task)
    if source is not None and source.single_env:  # one robot: one env, driven from this process
        if backend == "ray":
            raise TaskError(f"task {task}: a robot task runs its one env in this process, not in Ray env workers")
        return gymnasium.vector.SyncVectorEnv([functools.partial(make_env, task, seed=seed, **overrides)],
                                              autoreset_mode=AUTORESET_MODE)
    spec = load_task_spec(task)
    if backend == "ray":
        from robofinetune.distributed.ray_envs import RayVectorEnv

        return RayVectorEnv(spec, num_envs, seed=seed, num_workers=num_workers or num_envs, render=render,
                            overrides=overrides, ray_address=ray_address)
    if asynchronous and num_envs > 1:
        if context is None and (render or spec.cameras) and sys.platform.startswith("linux"):
            context = "forkserver"  # camera observations render in the workers too
        factories = [_WorkerEnvFactory(spec, seed + i, render, overrides) for i in range(num_envs)]
        return gymnasium.vector.AsyncVectorEnv(factories, context=context, autoreset_mode=AUTORESET_MODE)
    fns = [functools.partial(make_env, spec, seed=seed + i, render=render, **overrides) for i in range(num_envs)]
    return gymnasium.vector.SyncVectorEnv(fns, autoreset_mode=AUTORESET_MODE)


class _SpacesOnlyEnv(gymnasium.Env):
    """Stands in for a task's env in the parent process: its spaces and metadata, no simulator."""

    def __init__(self, spec: TaskSpec, render: bool) -> None:
        from robofinetune.envs.base import action_space, observation_space

        self.observation_space = observation_space(spec)
        self.action_space = action_space(spec)
        self.metadata = {"render_modes": ["rgb_array"], "render_fps": spec.control_freq}
        self.render_mode = "rgb_array" if render else None


class _WorkerEnvFactory:
    """``make_env`` for an AsyncVectorEnv worker.

    AsyncVectorEnv calls its first env function once in the parent process, only to read spaces and
    metadata. Called in the process that created it, this factory returns a simulator-free stand-in, so
    the parent neither pays robosuite's ~5 s construction nor opens a GL context (a GL context in the
    parent makes EGL hang in forked workers).
    """

    def __init__(self, spec: TaskSpec, seed: int, render: bool, overrides: dict[str, Any]) -> None:
        self.overrides = {key: value for key, value in overrides.items() if key in _WRAPPER_KWARGS}
        task_overrides = {key: value for key, value in overrides.items() if key not in _WRAPPER_KWARGS}
        self.spec = spec.replace(**task_overrides) if task_overrides else spec
        self.seed = seed
        self.render = render
        self.parent_pid = os.getpid()
        # where robosuite's chatter goes (robofinetune.logs); a forkserver started earlier has an older environment
        self.log_settings = logs.snapshot()

    def __call__(self) -> gymnasium.Env:
        if os.getpid() == self.parent_pid:
            return _SpacesOnlyEnv(self.spec, self.render)
        logs.restore(self.log_settings)
        return make_env(self.spec, seed=self.seed, render=self.render, **self.overrides)


def __getattr__(name: str) -> Any:
    # The env classes import mujoco/robosuite; load them only when asked for.
    if name == "RobosuiteEnv":
        from robofinetune.envs.robosuite_env import RobosuiteEnv

        return RobosuiteEnv
    if name == "PointMassEnv":
        from robofinetune.envs.pointmass import PointMassEnv

        return PointMassEnv
    raise AttributeError(f"module 'robofinetune.envs' has no attribute {name!r}")
