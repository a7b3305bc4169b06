"""Give a state dataset camera images by replaying its MuJoCo states in a task that has cameras.

The 200 scripted can demos were recorded on ``can`` (state observations, with the can's pose). ``can_image``
runs the same robosuite env with cameras and without the can's pose. Putting the image task's env in each
recorded state and reading its observation gives the images the cameras would have seen, without re-running
the expert (robomimic's ``dataset_states_to_obs.py`` does the same for its datasets)::

    robofinetune data convert datasets/can_scripted_200.hdf5 datasets/can_image_200.hdf5 --task=can_image

Actions, rewards, terminals, success and states are kept as recorded; observations become the image task's
keys (state keys it shares are re-read from the replayed state, which matches the recording to within one
physics substep). The observation after the last action comes from replaying that action from the last state; it is approximate
(the OSC controller's goal is not part of the MuJoCo state: on can the wrist camera's last frame can differ
noticeably), which matters only as the next observation of the last transition.
Episodes are rendered in worker processes, one env each, and written in their original order.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from robofinetune import logs
from robofinetune.data.episode import Episode
from robofinetune.data.workers import default_worker_processes, ordered_results, worker_pool
from robofinetune.errors import DatasetError
from robofinetune.images import is_image_key

if TYPE_CHECKING:
    from robofinetune.envs.spec import TaskSpec


def needs_rendering(episodes: list[Episode], task_spec: Any) -> list[str]:
    """The image keys of ``task_spec`` the episodes do not already carry (empty: nothing to render)."""
    image_keys = [key for key in task_spec.obs_keys if is_image_key(key)]
    present = set(episodes[0].obs_keys) if episodes else set()
    return [key for key in image_keys if key not in present]


def render_episodes(
    episodes: list[Episode],
    task: "str | TaskSpec",
    source: str,
    num_workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Episode]:
    """Replay every episode's ``states`` in ``make_env(task)`` and return the episodes with that task's
    observations (cameras included). ``source`` names the dataset in errors."""
    for index, episode in enumerate(episodes):
        if episode.states is None or len(episode.states) != len(episode):
            raise DatasetError(
                f"{source}: data/demo_{index}/states: missing or not one state per action; rendering cameras "
                f"needs the MuJoCo state before each action (datasets written by `robofinetune collect` on a "
                f"robosuite task have them)"
            )
    workers = max(1, min(num_workers or default_worker_processes(), len(episodes)))
    rendered: list[Episode] = []
    if workers == 1:
        from robofinetune.envs import make_env

        env = make_env(task)
        try:
            env.reset(seed=0)
            for index, episode in enumerate(episodes):
                rendered.append(_render_one(env, episode, f"{source}: episode {index}"))
                if progress is not None:
                    progress(index + 1, len(episodes))
        finally:
            env.close()
        return rendered
    log_settings = logs.snapshot()   # the forkserver may predate the current settings: pass them on
    with worker_pool(workers) as pool:
        for episode in ordered_results(pool, workers, len(episodes), lambda k: (
                _worker_render, (task, episodes[k], f"{source}: episode {k}", log_settings))):
            rendered.append(episode)
            if progress is not None:
                progress(len(rendered), len(episodes))
    return rendered


_worker_envs: dict[str, Any] = {}


def _worker_render(task: "str | TaskSpec", episode: Episode, where: str,
                   log_settings: dict[str, str | None]) -> Episode:
    key = task if isinstance(task, str) else repr(task.to_dict())
    if key not in _worker_envs:
        from robofinetune.envs import make_env

        logs.restore(log_settings)
        _worker_envs[key] = make_env(task)
        _worker_envs[key].reset(seed=0)
    return _render_one(_worker_envs[key], episode, where)


def _render_one(env: Any, episode: Episode, where: str) -> Episode:
    unwrapped = env.unwrapped
    keys = list(unwrapped.task_spec.obs_keys)
    frames: list[dict[str, np.ndarray]] = []
    for t, state in enumerate(episode.states):
        try:
            frames.append(unwrapped.set_state(np.asarray(state)))
        except ValueError as exc:
            raise DatasetError(f"{where}: states[{t}]: {exc} (recorded on another robot or task?)") from None
    env.step(np.clip(episode.actions[-1], -1.0, 1.0))
    final = unwrapped.set_state(unwrapped.get_state())
    missing = [key for key in keys if key not in frames[0]]
    if missing:
        raise DatasetError(f"{where}: the task's env gives no observation {missing}")

    def stored(key: str, value: np.ndarray) -> np.ndarray:
        return np.asarray(value, dtype=np.uint8 if is_image_key(key) else np.float32)

    metadata = dict(episode.metadata)
    metadata["task"] = unwrapped.task_spec.name
    metadata["rendered_from_states"] = True
    rendered = Episode(
        observations={key: stored(key, np.stack([frame[key] for frame in frames])) for key in keys},
        actions=episode.actions,
        rewards=episode.rewards,
        terminals=episode.terminals,
        success=episode.success,
        final_observation={key: stored(key, final[key]).copy() for key in keys},
        states=episode.states,
        metadata=metadata,
    )
    rendered.validate(where)
    return rendered
