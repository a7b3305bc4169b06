"""Rendering cameras for a state dataset by replaying its MuJoCo states (``data convert --task=can_image``): the
frames are the ones the live env showed at those states, and what cannot be rendered is refused by name."""

import numpy as np
import pytest

from robofinetune.data.episode import Episode
from robofinetune.data.io import convert_dataset, load_dataset, save_dataset
from robofinetune.data.render_states import needs_rendering, render_episodes
from robofinetune.envs import load_task_spec, make_env
from robofinetune.envs.experts import make_expert
from robofinetune.envs.spec import Camera
from robofinetune.errors import DatasetError

STEPS = 12


def small_can_image_spec():
    """can_image with 32x32 cameras: the same scene and render settings, a few times cheaper to draw."""
    spec = load_task_spec("can_image")
    shapes = {key: ((32, 32, 3) if key.endswith("_image") else shape) for key, shape in spec.obs_shapes.items()}
    return spec.replace(obs_shapes=shapes, cameras=[Camera(camera.name, 32, 32) for camera in spec.cameras])


@pytest.fixture(scope="module")
def live_episode():
    """The can expert for STEPS steps in the image env: the frames it saw, the states before each action."""
    spec = small_can_image_spec()
    env = make_env(spec)
    try:
        obs, _ = env.reset(seed=3)
        expert = make_expert(spec, seed=3)
        expert.reset(env)
        frames = {key: [] for key in spec.obs_keys}
        actions, states = [], []
        for _ in range(STEPS):
            for key in spec.obs_keys:
                frames[key].append(obs[key])
            states.append(env.unwrapped.get_state())
            action = np.clip(expert.act(obs), -1, 1).astype(np.float32)
            actions.append(action)
            obs, *_ = env.step(action)
        return spec, Episode(observations={key: np.stack(v) for key, v in frames.items()}, actions=np.stack(actions),
                             final_observation=dict(obs), states=np.stack(states), metadata={"seed": 3})
    finally:
        env.close()


def state_only(episode: Episode) -> Episode:
    keep = [key for key in episode.observations if not key.endswith("_image")]
    return Episode(observations={key: episode.observations[key] for key in keep}, actions=episode.actions,
                   final_observation={key: episode.final_observation[key] for key in keep}, states=episode.states,
                   metadata=dict(episode.metadata))


def test_rendered_frames_are_the_ones_the_live_env_showed(live_episode):
    spec, live = live_episode
    source = state_only(live)
    assert needs_rendering([source], spec) == ["agentview_image", "robot0_eye_in_hand_image"]
    (rendered,) = render_episodes([source], spec, "demo.hdf5", num_workers=1)
    assert list(rendered.observations) == spec.obs_keys
    for key in ("agentview_image", "robot0_eye_in_hand_image"):
        assert rendered.observations[key].dtype == np.uint8 and rendered.observations[key].shape == (STEPS, 32, 32, 3)
        difference = np.abs(rendered.observations[key].astype(int) - live.observations[key].astype(int))
        assert difference.mean() < 1.0, key  # same state, same scene: the same picture
        # and not a constant picture: the arm moves over the steps
        assert np.abs(np.diff(rendered.observations[key].astype(int), axis=0)).sum() > 0, key
        # the last observation is re-simulated from the last state: the OSC controller's goal is not part of the
        # MuJoCo state, so it is approximate (as robomimic's replay), only its form is checked
        assert rendered.final_observation[key].shape == (32, 32, 3) and rendered.final_observation[key].dtype == np.uint8
    assert np.allclose(rendered.observations["robot0_eef_pos"], live.observations["robot0_eef_pos"], atol=2e-3)
    assert np.array_equal(rendered.actions, live.actions) and rendered.metadata["rendered_from_states"]


def test_a_dataset_without_states_is_refused_naming_it(live_episode):
    spec, live = live_episode
    source = state_only(live)
    source.states = None
    with pytest.raises(DatasetError, match=r"demo\.hdf5.*states: missing"):
        render_episodes([source], spec, "demo.hdf5", num_workers=1)


def test_convert_checks_cameras_before_rendering(tmp_path, live_episode):
    _, live = live_episode
    path = save_dataset([state_only(live)], tmp_path / "states.hdf5", env_meta={"env_name": "can", "task": "can"})
    with pytest.raises(DatasetError, match=r"--cameras: \['wrist'\] are not cameras of task 'can_image'"):
        convert_dataset(path, tmp_path / "images.hdf5", task="can_image", cameras=["wrist"])
    with pytest.raises(DatasetError, match="also pass --task"):
        convert_dataset(path, tmp_path / "images.hdf5", cameras=["agentview"])
    assert not (tmp_path / "images.hdf5").exists()


def test_keeping_only_some_cameras_drops_the_others(tmp_path, live_episode):
    _, live = live_episode
    path = save_dataset([live], tmp_path / "both.hdf5", env_meta={"env_name": "can_image", "task": "can_image"})
    output = convert_dataset(path, tmp_path / "eye.hdf5", task="can_image", cameras=["robot0_eye_in_hand"])
    (episode,), _ = load_dataset(output)
    assert "agentview_image" not in episode.observations
    assert np.array_equal(episode.observations["robot0_eye_in_hand_image"], live.observations["robot0_eye_in_hand_image"])


def test_worker_processes_give_the_same_episodes_in_order(live_episode):
    """Two worker processes (forkserver, ``robofinetune.data.workers``) hand the episodes back in the order given,
    each rendered as one process renders it."""
    spec, live = live_episode
    whole = state_only(live)
    short = Episode(observations={key: value[:5] for key, value in whole.observations.items()},
                    actions=whole.actions[:5], final_observation=dict(whole.final_observation),
                    states=whole.states[:5], metadata={"seed": 3})
    parallel = render_episodes([whole, short, whole], spec, "demo.hdf5", num_workers=2)
    (alone,) = render_episodes([short], spec, "demo.hdf5", num_workers=1)
    assert [len(episode) for episode in parallel] == [STEPS, 5, STEPS]
    for key in alone.observations:
        assert np.array_equal(parallel[1].observations[key], alone.observations[key]), key
        assert np.array_equal(parallel[0].observations[key], parallel[2].observations[key]), key
