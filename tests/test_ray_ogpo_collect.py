"""``train ogpo --num_env_workers`` and ``collect --num-env-workers``: the envs (ogpo) and the scripted-expert
episodes (collect) run in Ray actors and give exactly what the local env processes give for the same seeds.

One local Ray (2 CPUs, no dashboard, tests/conftest.py) serves the whole session: starting Ray takes seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray env workers need `pip install 'robofinetune[ray]'`")

from robofinetune.cli import main  # noqa: E402
from robofinetune.data.io import load_dataset, save_dataset  # noqa: E402

pytestmark = pytest.mark.usefixtures("local_ray")

OBS_KEYS = ("agent_pos", "agent_vel", "goal_pos")


@pytest.fixture(scope="module")
def untrained_base_and_demos(tmp_path_factory):
    """A small untrained diffusion policy over pointmass (training it would only cost time: both runs start from
    the same weights) and 4 scripted demos for the critic's offline half and the BC buffer."""
    from robofinetune.data.collect import collect_episodes
    from robofinetune.policies import POLICY_TYPES, save_policy

    folder = tmp_path_factory.mktemp("ray_ogpo")
    policy_class, config_class = POLICY_TYPES["diffusion"]
    config = config_class(task="pointmass", obs_keys=list(OBS_KEYS), obs_shapes={key: [2] for key in OBS_KEYS},
                          action_dim=2, n_obs_steps=1, horizon=4, n_action_steps=2, hidden_dim=32, depth=1,
                          inference_steps=3)
    torch.manual_seed(0)
    policy = policy_class(config)
    generator = np.random.default_rng(0)
    policy.set_normalizers(generator.uniform(-0.4, 0.4, (200, 6)), generator.uniform(-1, 1, (200, 2)))
    save_policy(policy, folder / "base", {"task": "pointmass"})
    demos = folder / "demos.hdf5"
    save_dataset(collect_episodes("pointmass", 4, seed=1, progress=False), demos,
                 env_meta={"env_name": "pointmass", "task": "pointmass"})
    return folder / "base", demos


def _train_ogpo(base, demos, runs, *extra):
    """A tiny ``train ogpo`` on pointmass through the CLI; the run folder. 240 env steps on 2 envs: both reach the
    100-step horizon (an autoreset in the workers), the critic trains and the actor takes its rounds."""
    arguments = ["train", "ogpo", "--task=pointmass", f"--base={base}", f"--dataset={demos}", f"--runs-dir={runs}",
                 "--num_envs=2", "--total_env_steps=240", "--warmup_steps=60", "--actor_update_every=60",
                 "--critic_hidden_dim=16", "--critic_batch_size=16", "--group_size=2", "--actor_states=4",
                 "--next_action_samples=1", "--progress=false", "--eval_base=false", "--eval_every=1000000",
                 "--final_eval_episodes=2", "--eval_envs=1", "--checkpoint_every=1000000", "--log_every=120", *extra]
    assert main(arguments) == 0
    return next(runs.iterdir())


def test_train_ogpo_on_ray_env_workers_collects_the_local_runs_transitions(untrained_base_and_demos, tmp_path):
    from robofinetune.policies import load_policy

    base, demos = untrained_base_and_demos
    local = _train_ogpo(base, demos, tmp_path / "local")
    on_ray = _train_ogpo(base, demos, tmp_path / "ray", "--num_env_workers=2")
    assert "num_env_workers: 2" in (on_ray / "config.yaml").read_text()
    assert "num_env_workers: 0" in (local / "config.yaml").read_text()
    # every online chunk transition the run stored (observation history, executed chunk, reward, next history, ends)
    ours, theirs = (np.load(run / "checkpoints" / "latest" / "online.npz") for run in (on_ray, local))
    assert sorted(ours.files) == sorted(theirs.files)
    for name in theirs.files:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert len(theirs["reward"]) >= 100
    summaries = [json.loads((run / "summary.json").read_text()) for run in (on_ray, local)]
    assert summaries[0]["episodes"] == summaries[1]["episodes"] == 2   # each env reached the horizon: an autoreset
    assert summaries[0]["critic_updates"] == summaries[1]["critic_updates"] > 0
    assert summaries[0]["actor_rounds"] == summaries[1]["actor_rounds"] > 0
    # same transitions and the same learner RNG: the same critic and actor updates, hence the same weights
    tuned_on_ray, tuned_locally = load_policy(on_ray / "policy"), load_policy(local / "policy")
    for a, b in zip(tuned_on_ray.parameters(), tuned_locally.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(tuned_locally.parameters(), load_policy(base).parameters()))


def test_a_chunk_cut_by_a_killed_env_worker_is_marked_aborted_and_its_episode_dropped(untrained_base_and_demos):
    """OGPO keeps no aborted chunk in its replay and DPPO ends the env's sequence there; both need ChunkedActor to say
    which chunk a dead worker cut, and to hand back no Episode (no success, no failure) for it."""
    import os
    import signal

    from robofinetune.algos.chain_rl import ChunkedActor
    from robofinetune.envs import make_vector_env
    from robofinetune.policies import load_policy
    from robofinetune.rl import VectorRollout

    policy = load_policy(untrained_base_and_demos[0])
    envs = make_vector_env("pointmass", num_envs=2, seed=3, horizon=50, backend="ray", num_workers=2)
    try:
        actor = ChunkedActor(VectorRollout(envs), policy, chain_steps=3, gamma=0.9)
        actor.reset(seed=3)
        before = [actor.step() for _ in range(3)]   # chunks of 2: env 1 is one step into its second chunk
        os.kill(envs.pids[1], signal.SIGKILL)
        while True:   # until Ray has noticed the death: the worker is gone, or back as a new incarnation
            try:
                token, _ = ray.get(envs.workers[1].identity.remote(), timeout=60)
            except ray.exceptions.RayActorError:
                break
            if token != envs.incarnations[1]:
                break
        _, chunks, episodes = actor.step()
        after = [actor.step() for _ in range(3)]
    finally:
        envs.close()
    assert not any(chunk.aborted for _, step_chunks, _ in before for chunk in step_chunks)
    cut = [chunk for chunk in chunks if chunk.env_index == 1]
    assert len(cut) == 1 and cut[0].aborted and cut[0].truncated and not cut[0].terminated and cut[0].steps == 2
    assert not any(chunk.aborted for chunk in chunks if chunk.env_index == 0)
    assert episodes == []   # the cut episode is not handed back, and env 0's goes on
    assert not any(chunk.aborted for _, step_chunks, _ in after for chunk in step_chunks)
    assert any(chunk.env_index == 1 for _, step_chunks, _ in after for chunk in step_chunks)   # env 1 acts again


def test_collect_on_ray_workers_writes_the_local_episodes(tmp_path):
    local, on_ray = tmp_path / "local.hdf5", tmp_path / "ray.hdf5"
    common = ["collect", "--task=pointmass", "--episodes=5", "--seed=3", "--noise=0.5"]
    assert main([*common, "--num-envs=1", f"--output={local}"]) == 0
    assert main([*common, "--num-env-workers=2", f"--output={on_ray}"]) == 0
    (theirs, _), (ours, _) = load_dataset(local), load_dataset(on_ray)
    assert len(ours) == len(theirs) == 5
    assert len({len(episode) for episode in theirs}) > 1   # distinct episodes: an order change would show
    for a, b in zip(ours, theirs):
        assert a.metadata["seed"] == b.metadata["seed"]
        np.testing.assert_array_equal(a.actions, b.actions)
        for key in OBS_KEYS:
            np.testing.assert_array_equal(a.observations[key], b.observations[key])
        assert a.success == b.success
    assert ray.is_initialized()   # the session's Ray, which collect joined, stays up


def test_bad_env_worker_counts_are_refused_naming_the_field(tmp_path, capsys):
    # refused before the base is looked for: the base named here does not exist
    assert main(["train", "ogpo", "--task=pointmass", f"--base={tmp_path / 'no_base'}", f"--runs-dir={tmp_path}",
                 "--num_envs=2", "--num_env_workers=3"]) == 2
    assert "num_env_workers must be between 1 and num_envs (2), got 3" in capsys.readouterr().err
    assert main(["train", "ogpo", "--task=pointmass", f"--base={tmp_path / 'no_base'}", f"--runs-dir={tmp_path}",
                 "--num_env_workers=-1"]) == 2
    assert "config field 'num_env_workers' must be >= 0" in capsys.readouterr().err
    assert main(["collect", "--task=pointmass", "--episodes=2", "--num-env-workers=-1",
                 f"--output={tmp_path / 'demos.hdf5'}"]) == 2
    assert "num_env_workers must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "demos.hdf5").exists()
