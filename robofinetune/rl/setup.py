"""What every fine-tuning method starts from: the base policy to improve and the demos for its replay."""

from __future__ import annotations

from pathlib import Path

from robofinetune.data.episode import Episode
from robofinetune.errors import ConfigError, DatasetError
from robofinetune.policies import load_policy
from robofinetune.policies.base import Policy


def default_base(task: str) -> Path:
    """The shipped deliberately weak base of ``task`` (``policies/<task>/weak_diffusion``)."""
    from robofinetune.paths import policies_dir

    return policies_dir() / task / "weak_diffusion"


def base_path(base: str, task: str) -> Path:
    return Path(base) if base else default_base(task)


def load_base_policy(base: str, task: str) -> Policy:
    """The policy in folder ``base`` (default: the task's shipped weak base), on the CPU, checked against ``task``."""
    path = base_path(base, task)
    if not (path / "policy.json").exists():
        raise ConfigError(f"base policy '{path}' not found (config field 'base'); train one with "
                          f"`robofinetune train bc --task={task}` and pass --base=<run>/policy")
    from robofinetune.envs.spec import task_source_for

    if task_source_for(task) is not None:
        # a robot YAML (train residual --task=real_robot/<robot>.yaml): the base was trained for the robot's task
        from robofinetune.envs import load_task_spec

        task = load_task_spec(task).name
    return load_policy(path, device="cpu", task=task)


def load_demo_episodes(task: str, dataset: str, obs_keys: list[str], num_demos: int = 0,
                       only_success: bool = True) -> tuple[Path, list[Episode]]:
    """Demos for the offline half of the replay: ``dataset`` (default ``datasets/<task>_scripted_200.hdf5``, collected
    with the scripted expert when absent), successful ones only unless told otherwise, the first ``num_demos``."""
    from robofinetune.algos.bc import default_dataset, ensure_default_dataset
    from robofinetune.data.io import load_dataset
    from robofinetune.data.task_check import check_training_demos
    from robofinetune.envs import load_task_spec

    path = Path(dataset) if dataset else default_dataset(task)
    if not dataset:
        ensure_default_dataset(task, path)
    episodes, env_meta = load_dataset(path, obs_keys=obs_keys)
    check_training_demos(episodes, env_meta, load_task_spec(task), str(path))
    if only_success:
        episodes = [episode for episode in episodes if episode.success]
    if num_demos:
        episodes = episodes[:num_demos]
    if not episodes:
        raise DatasetError(f"{path}: no {'successful ' if only_success else ''}episodes for the offline half of the "
                           f"replay buffer (config field 'dataset')")
    return path, episodes
