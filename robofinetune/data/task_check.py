"""Does a dataset fit the task a method trains for? Checked once where ``train bc|residual|ogpo`` and ``distill``
load their demos, so a dataset of another task or with actions outside the env's range stops with an error
naming the file and the field, not with a torch shape error deep in training (or, worse, trains silently)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from robofinetune.data.episode import Episode
from robofinetune.errors import DatasetError

# float32 round trips of values clipped to [-1, 1] stay within this
ACTION_TOLERANCE = 1e-5


def _scene(spec: Any) -> tuple[Any, ...]:
    """What a task simulates, whatever it observes: ``can`` and ``can_image`` share PickPlaceCan."""
    return spec.kind, spec.env_name or spec.env_kwargs.get("model_path")


def _recorded_elsewhere(recorded: str, spec: Any) -> bool:
    """True when a dataset recorded for task ``recorded`` shows another scene than ``spec`` (or an unknown task)."""
    from robofinetune.envs import load_task_spec

    if recorded == spec.name:
        return False
    try:
        other = load_task_spec(recorded)
    except Exception:  # noqa: BLE001 - a task this install does not define is another task
        return True
    return _scene(other) != _scene(spec)


def check_training_demos(episodes: Sequence[Episode], env_meta: Mapping[str, Any] | None, spec: Any,
                         source: str, obs_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
    """Raise :class:`DatasetError` naming ``source`` when the dataset was recorded for another task (its
    ``env_meta`` names a task of another scene than ``spec``: the same scene seen through other sensors, e.g.
    ``can`` data for ``can_image``, passes on to the layout check), when an observation key's per-step shape
    (``obs_shapes``, default the spec's) or the action size differs, or when an action lies outside [-1, 1]
    (every env's action space; a policy trained on such actions is clipped by the env)."""
    from robofinetune.data.io import task_from_env_meta

    task = spec.name
    recorded = task_from_env_meta(dict(env_meta)) if env_meta else None
    if recorded and _recorded_elsewhere(recorded, spec):
        raise DatasetError(f"{source}: env_meta says the episodes were recorded for task '{recorded}', not '{task}' "
                           f"(config field 'dataset'; pass a {task} dataset)")
    obs_shapes = spec.obs_shapes if obs_shapes is None else obs_shapes
    action_dim = spec.action_dim
    for index, episode in enumerate(episodes):
        where = f"{source}: episode {index}"
        for key, shape in obs_shapes.items():
            if key not in episode.observations:
                continue  # missing keys are the readers' error (they name the stored keys)
            found = tuple(np.shape(episode.observations[key])[1:])
            if found != tuple(shape):
                raise DatasetError(f"{where}: observation '{key}' has shape {found} per step, task '{task}' expects "
                                   f"{tuple(shape)} (a dataset of another task?)")
        if episode.actions.shape[1] != action_dim:
            raise DatasetError(f"{where}: field 'actions' has {episode.actions.shape[1]} dims per step, task '{task}' "
                               f"takes {action_dim}")
        if len(episode) and np.max(np.abs(episode.actions)) > 1.0 + ACTION_TOLERANCE:
            step, dim = np.unravel_index(np.argmax(np.abs(episode.actions)), episode.actions.shape)
            raise DatasetError(f"{where}: field 'actions' holds {float(episode.actions[step, dim]):g} at step {step}, "
                               f"dim {dim}; actions must lie in [-1, 1] (the env's action space): normalise them "
                               f"before training")
