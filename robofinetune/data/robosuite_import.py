"""Import robosuite's own demonstration files by replaying their MuJoCo states.

robosuite's ``scripts/collect_human_demonstrations.py`` writes::

    data                 attrs: env (class name, e.g. PickPlaceCan), env_info (JSON: env_name, robots,
                                controller_configs), date, time, repository_version
    data/demo_N          attr model_file (MJCF XML); datasets states (T, S) and actions (T, A)

``states[t]`` is the flattened MuJoCo state (time, qpos, qvel) the action ``actions[t]`` was taken from
(the script drops the state recorded after the last action). It saves only successful demos. robomimic's
"raw" files (``env_args`` JSON instead of ``env``, states without ``obs``) have the same shape and import
the same way.

Observations are recovered by putting the task's env (``robofinetune.envs.make_env(task)``) in each state
and reading its observation; the observation after the last action is obtained by replaying that action
from the last state, as robomimic's ``dataset_states_to_obs.py`` does. Rewards are the sparse task success
after each action and terminals mark the steps where the task is solved (our envs terminate on success).

Every observation is a function of its state (robomimic's convention). robosuite's live ``step()`` reports
kinematics from before the last 2 ms physics substep, so imported observations differ from what a policy saw
live by up to one substep of motion (~1e-3). The final observation is approximate beyond that: the gripper
command of a Panda accumulates over steps and is not part of the MuJoCo state.

``model_file`` is not loaded: the env is built from the task spec, and a state whose size does not fit that
model is rejected with an error naming the demo. This holds for the robomimic tasks (lift, can, square),
whose per-episode variation lives in the state (object placement), not in the XML.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from robofinetune.data._util import loads, resolve_obs_keys
from robofinetune.data.episode import Episode
from robofinetune.data.robomimic_io import _attr_str, _read, demo_names, open_hdf5
from robofinetune.errors import DatasetError

# robosuite env class -> robofinetune task name (``envs/<task>.yaml``)
TASK_FROM_ENV_NAME = {"PickPlaceCan": "can", "Lift": "lift", "NutAssemblySquare": "square"}


def infer_task(env_name: str | None) -> str | None:
    """The robofinetune task for a robosuite env name: the built-in table, else a task spec whose
    ``env_name`` matches (when exactly one does), else None."""
    if not env_name:
        return None
    if env_name in TASK_FROM_ENV_NAME:
        return TASK_FROM_ENV_NAME[env_name]
    try:
        from robofinetune.envs.spec import list_tasks, load_task_spec

        matches = [t for t in list_tasks() if load_task_spec(t).env_name == env_name]
    except Exception:  # a broken spec file elsewhere must not stop an import that names its task
        return None
    return matches[0] if len(matches) == 1 else None


def read_robosuite_header(f: h5py.File, path: Path) -> dict[str, Any]:
    """env_name and the recording config of a robosuite (or robomimic raw) demo file."""
    if "data" not in f or not isinstance(f["data"], h5py.Group):
        raise DatasetError(f"{path}: data: missing group (not a robosuite demonstration file)")
    attrs = f["data"].attrs
    header: dict[str, Any] = {"env_name": None, "env_info": {}}
    if "env_info" in attrs:
        info = loads(attrs["env_info"], f"{path}: data.attrs['env_info']")
        header["env_info"] = info if isinstance(info, dict) else {}
    if "env" in attrs:
        header["env_name"] = _attr_str(attrs["env"])
    elif "env_args" in attrs:
        args = loads(attrs["env_args"], f"{path}: data.attrs['env_args']")
        if isinstance(args, dict):
            header["env_name"] = args.get("env_name")
            header["env_info"] = args
    if header["env_name"] in (None, "None") and header["env_info"].get("env_name"):
        header["env_name"] = header["env_info"]["env_name"]
    for key in ("date", "time", "repository_version"):
        if key in attrs:
            header[key] = _attr_str(attrs[key])
    return header


def _success_now(env: Any) -> bool:
    if callable(getattr(env, "is_success", None)):
        return bool(env.is_success())
    return bool(env.robosuite_env._check_success())


def _replay_demo(env: Any, group: h5py.Group, name: str, path: Path, obs_keys: list[str] | None) -> Episode:
    where = f"{path}: data/{name}"
    for field in ("states", "actions"):
        if field not in group:
            raise DatasetError(f"{where}/{field}: missing")
    states = _read(group["states"], f"{where}/states")
    actions = _read(group["actions"], f"{where}/actions")
    if states.ndim != 2 or actions.ndim != 2:
        raise DatasetError(f"{where}: states and actions must be 2-D, got {states.shape} and {actions.shape}")
    length = len(actions)
    if len(states) == length + 1:  # a writer that kept the state after the last action
        states = states[:length]
    if len(states) != length:
        raise DatasetError(f"{where}/states: {len(states)} steps but actions has {length}")
    if length == 0:
        raise DatasetError(f"{where}/actions: empty demo")
    action_dim = env.action_space.shape[0]
    if actions.shape[1] != action_dim:
        raise DatasetError(f"{where}/actions: action dim {actions.shape[1]}, the task's env takes {action_dim}")
    if not np.all(np.isfinite(states)):
        raise DatasetError(f"{where}/states: contains NaN or inf")
    if not np.all(np.isfinite(actions)):
        raise DatasetError(f"{where}/actions: contains NaN or inf")

    frames: list[dict[str, np.ndarray]] = []
    success_after = np.zeros(length, dtype=bool)  # success after action t, i.e. in state t + 1
    for t in range(length):
        try:
            frames.append(env.set_state(states[t]))
        except ValueError as exc:
            raise DatasetError(f"{where}/states: step {t}: {exc} (was the demo recorded with another robot or task?)") from None
        if t:
            success_after[t - 1] = _success_now(env)
    last_state_success = _success_now(env)
    env.step(actions[-1])  # from the last recorded state, as robomimic does
    # read the observation of the state reached, like every other step (robosuite's own step() reports
    # observables sampled on its internal clock, which set_state has put out of phase)
    final_obs = env.set_state(env.get_state())
    success_after[-1] = _success_now(env)

    mapping = resolve_obs_keys(obs_keys, list(frames[0]), f"{where} (replayed observations)")
    observations = {key: np.stack([frame[stored] for frame in frames]) for key, stored in mapping.items()}
    final_observation = {key: np.asarray(final_obs[stored]) for key, stored in mapping.items()}
    episode = Episode(
        observations=observations,
        actions=actions,
        rewards=success_after.astype(np.float32),
        terminals=success_after.copy(),
        success=bool(last_state_success or success_after[-1]),
        final_observation=final_observation,
        states=states,
        metadata={"source_demo": name},
    )
    episode.validate(where)
    return episode


def iter_robosuite_demo(
    path: str | os.PathLike,
    task: str | None = None,
    obs_keys: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[Episode, dict]]:
    """Yield ``(episode, env_meta)`` per demo, replaying states in ``make_env(task)``'s env."""
    path = Path(path)
    with open_hdf5(path) as f:
        header = read_robosuite_header(f, path)
        task = task or infer_task(header["env_name"])
        if task is None:
            raise DatasetError(
                f"{path}: data.attrs['env']: cannot tell the task for env {header['env_name']!r}; pass task= "
                f"(known: {', '.join(f'{k} -> {v}' for k, v in TASK_FROM_ENV_NAME.items())})"
            )
        from robofinetune.envs import make_env

        gym_env = make_env(task)
        env = gym_env.unwrapped
        try:
            spec_env = getattr(getattr(env, "task_spec", None), "env_name", None)
            if header["env_name"] and spec_env and spec_env != header["env_name"]:
                raise DatasetError(
                    f"{path}: data.attrs['env']: demos are from {header['env_name']!r} but task {task!r} "
                    f"runs {spec_env!r}"
                )
            gym_env.reset(seed=0)
            env_meta = dict(getattr(env, "env_meta", None) or {"env_name": header["env_name"], "env_type": 1})
            env_meta.setdefault("type", env_meta.get("env_type", 1))
            env_meta["task"] = task
            names = demo_names(f["data"])
            for i, name in enumerate(names):
                group = f["data"][name]
                if not isinstance(group, h5py.Group):
                    raise DatasetError(f"{path}: data/{name}: expected a group")
                yield _replay_demo(env, group, name, path, obs_keys), env_meta
                if progress is not None:
                    progress(i + 1, len(names))
        finally:
            gym_env.close()


def load_robosuite_demo(
    path: str | os.PathLike,
    task: str | None = None,
    obs_keys: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Episode], dict]:
    """Import a robosuite ``collect_human_demonstrations.py`` file: (episodes, env_meta).

    ``task`` is a robofinetune task name; by default it is inferred from the file's env name
    (PickPlaceCan -> can, Lift -> lift, NutAssemblySquare -> square). ``env_meta`` is the task env's
    robomimic ``env_args`` plus ``task``.
    """
    episodes, env_meta = [], {}
    for episode, env_meta in iter_robosuite_demo(path, task=task, obs_keys=obs_keys, progress=progress):
        episodes.append(episode)
    if not episodes:
        with open_hdf5(path) as f:
            header = read_robosuite_header(f, Path(path))
        env_meta = {"env_name": header["env_name"], "type": 1, "env_type": 1, "env_kwargs": {}}
        if task or infer_task(header["env_name"]):
            env_meta["task"] = task or infer_task(header["env_name"])
    return episodes, env_meta
