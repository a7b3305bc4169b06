"""Residual RL on the fast pointmass task: composite policy, demo relabelling, base resets, crash + resume."""

import copy
import json

import numpy as np
import pytest
import torch

from bc_common import train_pointmass_base

from robofinetune.algos import residual
from robofinetune.algos.residual import (ResidualConfig, ResidualPolicy, ResidualPolicyConfig, label_base_actions,
                                         train)
from robofinetune.data.collect import collect_episodes
from robofinetune.envs import load_task_spec
from robofinetune.policies import load_policy, save_policy
from robofinetune.rl import ReplayBuffer, RunLoop, VectorRollout
from robofinetune.runs import Run


@pytest.fixture(scope="session")
def pointmass_base(tmp_path_factory):
    """A small, poor diffusion base on pointmass (few demos, few BC steps) and its demos."""
    return train_pointmass_base(tmp_path_factory.mktemp("pointmass_base"), demos=12, max_steps=60, hidden_dim=64,
                                depth=1, batch_size=64, warmup_steps=10)


def residual_policy(base):
    spec = load_task_spec("pointmass")
    config = ResidualPolicyConfig(task="pointmass", obs_keys=spec.obs_keys,
                                  obs_shapes={k: list(v) for k, v in spec.obs_shapes.items()}, action_dim=2,
                                  hidden_dim=32, depth=2)
    return ResidualPolicy(config, base=base)


def pointmass_obs(batch=3, seed=0):
    rng = np.random.default_rng(seed)
    return {key: rng.uniform(-0.3, 0.3, (batch, 2)).astype(np.float32) for key in ("agent_pos", "agent_vel", "goal_pos")}


def test_zero_initialised_residual_leaves_base_actions_unchanged(pointmass_base, tmp_path):
    base = load_policy(pointmass_base[0], device="cpu")
    policy = residual_policy(copy.deepcopy(base)).eval()
    obs = pointmass_obs()
    for step in range(6):  # across chunk boundaries (n_action_steps = 4)
        torch.manual_seed(step)
        expected = base.select_action(obs)
        torch.manual_seed(step)
        assert np.array_equal(policy.select_action(obs), expected)
    assert torch.count_nonzero(policy.actor(torch.randn(5, 8))) == 0
    # a trained residual moves the action, by at most action_scale
    torch.nn.init.normal_(policy.actor.net[-1].weight, std=1.0)
    policy.reset()
    base.reset()
    torch.manual_seed(0)
    corrected = policy.select_action(obs)
    torch.manual_seed(0)
    plain = base.select_action(obs)
    assert 0 < np.abs(corrected - plain).max() <= 0.1 + 1e-6


def test_residual_policy_is_a_loadable_policy_kind(pointmass_base, tmp_path):
    policy = residual_policy(load_policy(pointmass_base[0], device="cpu"))
    torch.nn.init.normal_(policy.actor.net[-1].weight, std=0.5)
    save_policy(policy, tmp_path / "policy", {"note": "test"})
    assert (tmp_path / "policy" / "base" / "policy.json").exists()
    loaded = load_policy(tmp_path / "policy", task="pointmass")
    assert isinstance(loaded, ResidualPolicy) and loaded.base.kind == "diffusion"
    obs = pointmass_obs()
    torch.manual_seed(1)
    first = policy.eval().select_action(obs)
    torch.manual_seed(1)
    assert np.allclose(loaded.select_action(obs), first, atol=1e-6)
    assert loaded.act({k: np.repeat(v[:, None], 2, axis=1) for k, v in obs.items()}).shape == (3, 1, 2)


def test_demo_relabelling_runs_the_base_along_each_demo_from_a_fresh_start(pointmass_base):
    from robofinetune.data.io import load_dataset

    base = load_policy(pointmass_base[0], device="cpu")
    keys = load_task_spec("pointmass").obs_keys
    episodes, _ = load_dataset(pointmass_base[1], obs_keys=keys)
    episode = episodes[0]
    torch.manual_seed(0)
    labels = label_base_actions(base, [episode], keys)[0]
    assert labels.shape == (len(episode) + 1, 2)
    # the same as driving the base along the demo, final observation included
    torch.manual_seed(0)
    base.reset()
    states = [{k: episode.observations[k][t][None] for k in keys} for t in range(len(episode))]
    states.append({k: np.asarray(episode.final_observation[k])[None] for k in keys})
    manual = np.concatenate([base.select_action(state) for state in states])
    assert np.allclose(labels, manual, atol=1e-6)
    # a base left mid-chunk by earlier use does not leak its queued actions into the labels
    base.reset()
    base.select_action(pointmass_obs(1))
    base.select_action(pointmass_obs(1, seed=1))
    torch.manual_seed(0)
    assert np.allclose(label_base_actions(base, [episode], keys)[0], labels, atol=1e-6)
    # a batch of demos of different lengths gets one label per state of each
    together = label_base_actions(base, episodes[:3], keys)
    assert [len(label) for label in together] == [len(e) + 1 for e in episodes[:3]]


def tiny_config(base, dataset, **overrides):
    values = dict(task="pointmass", base=str(base), dataset=str(dataset), total_env_steps=160, num_envs=1,
                  critic_hidden_dim=32, num_critics=3, actor_hidden_dim=32, batch_size=32, updates_per_step=0.25,
                  warmup_steps=40, eval_every=0, eval_episodes=1, final_eval_episodes=1, eval_envs=1,
                  checkpoint_every=80, log_every=40, progress=False)
    values.update(overrides)
    return ResidualConfig(**values)


class Crash(RuntimeError):
    pass


def test_crash_then_resume_restores_buffers_and_counters_exactly(pointmass_base, tmp_path, monkeypatch):
    base_path, dataset = pointmass_base
    config = tiny_config(base_path, dataset, total_env_steps=200, checkpoint_every=80)
    run = Run.create("residual", "pointmass", config, root=tmp_path)

    saved = {}
    original_save = RunLoop.save_checkpoint

    def recording_save(self, state, buffers):
        saved[self.env_steps] = {name: copy.deepcopy(buffer.state_dict()) for name, buffer in buffers.items()}
        saved[self.env_steps]["updates"] = state["learner"]["critic_updates"]
        return original_save(self, state, buffers)

    monkeypatch.setattr(RunLoop, "save_checkpoint", recording_save)
    original_step = VectorRollout.step
    calls = {"n": 0}

    def crashing_step(self, actions, while_waiting=None):
        calls["n"] += 1
        if calls["n"] > 120:
            raise Crash("simulated crash")
        return original_step(self, actions, while_waiting)

    monkeypatch.setattr(VectorRollout, "step", crashing_step)
    with pytest.raises(Crash):
        train(config, run)
    assert sorted(saved) == [80]

    monkeypatch.setattr(VectorRollout, "step", original_step)
    restored = {}
    original_load = RunLoop.load_checkpoint

    def recording_load(self, buffers):
        state = original_load(self, buffers)
        restored.update({name: copy.deepcopy(buffer.state_dict()) for name, buffer in buffers.items()})
        restored["env_steps"], restored["episodes"] = self.env_steps, self.episodes
        restored["updates"] = state["learner"]["critic_updates"]
        return state

    monkeypatch.setattr(RunLoop, "load_checkpoint", recording_load)
    summary = train(config, Run.open(run.path), resume=True)

    assert restored["env_steps"] == 80 and restored["updates"] == saved[80]["updates"] > 0
    for name in ("offline", "online"):
        before, after = saved[80][name], restored[name]
        for key in ReplayBuffer._ARRAYS:
            assert np.array_equal(before[key], after[key]), (name, key)
        assert before["rng"] == after["rng"] and before["added"] == after["added"]
    assert restored["online"]["added"] == 80
    assert summary["env_steps"] == 200
    # the resumed run continued the same curve and finished with the base and final points
    metrics = Run.open(run.path).metrics()
    assert [m for m in metrics if "base/success" in m] and [m for m in metrics if "final/success" in m]
    assert (run.path / "success_curve.png").exists() and (run.path / "policy" / "base" / "policy.json").exists()
    assert json.loads((run.path / "summary.json").read_text())["env_steps"] == 200


def test_training_resets_the_base_at_every_episode_start(pointmass_base, tmp_path, monkeypatch):
    base_path, dataset = pointmass_base
    config = tiny_config(base_path, dataset, total_env_steps=220, num_envs=2, checkpoint_every=0)
    resets: list = []
    original_load_base = residual.load_base

    def spying_load_base(cfg):
        base = original_load_base(cfg)
        original_reset = base.reset

        def reset(env_index=None):
            resets.append(env_index)
            original_reset(env_index)

        base.reset = reset
        return base

    monkeypatch.setattr(residual, "load_base", spying_load_base)
    original_step = VectorRollout.step
    finished = []

    def recording_step(self, actions, while_waiting=None):
        transitions = original_step(self, actions, while_waiting)
        finished.extend(outcome.env_index for outcome in transitions.finished)
        resets.append(("episode_end", [outcome.env_index for outcome in transitions.finished]))
        return transitions

    monkeypatch.setattr(VectorRollout, "step", recording_step)
    train(config, Run.create("residual", "pointmass", config, root=tmp_path))
    assert len(finished) >= 2  # pointmass horizon is 100: 110 steps of two envs
    # right after each step that ended episodes, exactly those envs' base state is reset
    for position, entry in enumerate(resets):
        if isinstance(entry, tuple) and entry[1]:
            assert resets[position + 1: position + 1 + len(entry[1])] == entry[1]


@pytest.mark.parametrize("margin, promoted", [(10.0, False), (-10.0, True)])
def test_gated_training_keeps_a_best_only_through_the_gate(pointmass_base, tmp_path, margin, promoted):
    """--gate: every periodic eval and the end consult the OPE gate; ``best/`` appears only on PROMOTE, and then
    carries the record that lets ``deploy`` run it against the base. An unreachable margin never promotes, a
    margin below any possible loss always does."""
    from robofinetune.robot.cli import deploy_permission

    base_path, dataset = pointmass_base
    config = tiny_config(base_path, dataset, total_env_steps=160, eval_every=80, gate=True, gate_margin=margin,
                         gate_iterations=3, gate_steps_per_iteration=3)
    run = Run.create("residual", "pointmass", config, root=tmp_path)
    summary = train(config, run)
    decisions = [m for m in Run.open(run.path).metrics() if "gate/promoted" in m]
    assert len(decisions) == 2   # the eval at 80 env steps and the final policy
    assert summary["gate_promotions"] == (2 if promoted else 0)
    best = run.path / "best"
    assert (best / "policy.json").exists() == promoted
    if promoted:
        # best beat the previous best, which beat the base: the chain of records lets deploy run it over the base
        allowed, why, forced = deploy_permission(best, base_path, force=False)
        assert allowed and not forced and "2 successive promotions" in why
        assert json.loads((best / "gate.json").read_text())["decision"] == "PROMOTE"
        assert len((best / "gate_history.jsonl").read_text().splitlines()) == 2


# --- reproducibility: the same seed gives the same episodes, whatever ran before in the process --------------

def test_seeded_sampling_depends_only_on_seed_env_and_episode(pointmass_base):
    base = load_policy(pointmass_base[0], device="cpu").eval()
    obs = pointmass_obs(2)

    def first_actions(seed, disturb):
        base.seed_sampling(seed)
        base.reset()
        if disturb:   # draws from torch's and numpy's global generators between seeding and sampling
            torch.randn(1000)
            np.random.rand(10)
        return base.select_action(obs)

    reference = first_actions(7, disturb=False)
    assert np.array_equal(first_actions(7, disturb=True), reference)
    assert not np.allclose(first_actions(8, disturb=False), reference)
    # env 0 starting a new episode gets new noise; env 1, mid-chunk, keeps its own stream
    base.seed_sampling(7)
    base.reset()
    base.select_action(obs)
    base.reset(0)
    for _ in range(base.config.n_action_steps - 1):
        second = base.select_action(obs)
    base.seed_sampling(None)
    assert not np.allclose(second[0], reference[0])


def test_evaluation_repeats_its_episodes_after_a_demo_collection(pointmass_base):
    from robofinetune.eval import evaluate_policy

    base = load_policy(pointmass_base[0], device="cpu")
    executed = []
    original = base.select_action
    base.select_action = lambda obs: executed.append(original(obs)) or executed[-1]

    def evaluation():
        executed.clear()
        result = evaluate_policy(base, "pointmass", episodes=4, num_envs=2, seed=321, progress=False)
        return result, np.stack(executed)

    first, first_actions = evaluation()
    collect_episodes("pointmass", 2, seed=5, progress=False)   # advances the process's global generators
    torch.randn(100)
    again, again_actions = evaluation()
    assert (again.episode_success, again.episode_length) == (first.episode_success, first.episode_length)
    assert np.array_equal(again_actions, first_actions)      # every action of every episode
    # the actions do depend on the sampling noise: another eval seed (same env seed here) changes them
    base.seed_sampling(99)
    base.reset()
    assert not np.allclose(original({key: value[None] for key, value in _first_obs(321).items()}),
                           first_actions[0][:1])


def _first_obs(seed):
    from robofinetune.envs import make_env

    env = make_env("pointmass")
    obs, _ = env.reset(seed=seed)
    env.close()
    return obs


def test_two_runs_with_the_same_seed_log_identical_metrics(pointmass_base, tmp_path):
    base_path, dataset = pointmass_base
    logged = []
    for attempt in range(2):
        torch.randn(10 + attempt)    # a different global generator state before each run
        np.random.rand(3 + attempt)
        config = tiny_config(base_path, dataset, total_env_steps=160, num_envs=2, eval_every=80, checkpoint_every=0)
        run = Run.create("residual", "pointmass", config, root=tmp_path / str(attempt))
        train(config, run)
        rows = Run.open(run.path).metrics()
        logged.append([{key: value for key, value in row.items() if key != "time" and not key.startswith("perf/")}
                       for row in rows])
    assert logged[0] == logged[1]
    assert any("train/critic_loss" in row for row in logged[0]) and any("eval/success" in row for row in logged[0])


def test_skipping_the_base_evaluation_leaves_training_unchanged(pointmass_base, tmp_path):
    """--eval_base=false saves the base's evaluation episodes (minutes each on camera tasks) without changing what
    the run learns: evaluations draw from their own seeds, not the training streams."""
    base_path, dataset = pointmass_base
    logged, summaries = [], []
    for eval_base in (True, False):
        config = tiny_config(base_path, dataset, num_envs=2, checkpoint_every=0, eval_base=eval_base)
        run = Run.create("residual", "pointmass", config, root=tmp_path / str(eval_base))
        summaries.append(train(config, run))
        logged.append([{key: value for key, value in row.items()
                        if key != "time" and not key.startswith(("perf/", "base/"))}
                       for row in Run.open(run.path).metrics()])
    assert summaries[0]["base_success"] is not None and summaries[1]["base_success"] is None
    assert [row for row in logged[0] if set(row) != {"step"}] == [row for row in logged[1] if set(row) != {"step"}]
    assert summaries[0]["final_success"] == summaries[1]["final_success"]


def test_critic_head_groups_on_threads_give_the_sequential_update():
    """One thread per group of heads is an implementation detail: the update equals the single-thread one, and
    the REDQ target from the two drawn heads equals the minimum over those heads of the full ensemble."""
    from robofinetune.algos.residual import ResidualActor, ResidualLearner, td3_update
    from robofinetune.rl import TransitionBatch, ensemble_min_target

    rng = np.random.default_rng(0)
    obs_dim, action_dim, batch = 6, 2, 64
    learners = []
    for threads in (1, 2, 3):
        torch.manual_seed(0)
        config = ResidualConfig(num_critics=5, critic_hidden_dim=32, actor_hidden_dim=32, critic_threads=threads)
        actor = ResidualActor(obs_dim, action_dim, 32, 2, True, 0.1)
        learners.append(ResidualLearner(config, actor))
    batches = []
    for _ in range(4):
        rows = rng.normal(size=(batch, obs_dim + action_dim)).astype(np.float32)
        batches.append(TransitionBatch(
            obs=torch.as_tensor(rows), action=torch.as_tensor(rng.uniform(-1, 1, (batch, action_dim)), dtype=torch.float32),
            reward=torch.as_tensor(rng.random(batch) < 0.2, dtype=torch.float32), discount=torch.full((batch,), 0.97),
            next_obs=torch.as_tensor(rows + 0.1)))
    stats = [[td3_update(learner, b, update_actor=index % 2 == 1) for index, b in enumerate(batches)]
             for learner in learners]
    assert learners[1].head_groups.threads == 2 and learners[2].head_groups.threads == 3
    for other, other_stats in zip(learners[1:], stats[1:]):
        for (name, reference), value in zip(learners[0].state_dict().items(), other.state_dict().values()):
            assert torch.allclose(reference, value, atol=1e-6), name
        assert other_stats[-1]["actor_loss"] == pytest.approx(stats[0][-1]["actor_loss"], abs=1e-6)
    assert any((p != 0).any() for p in learners[0].actor.net[-1].parameters())   # the actor did move
    learner = learners[0]
    x, a = torch.randn(16, obs_dim + action_dim), torch.rand(16, action_dim)
    generator = torch.Generator().manual_seed(3)
    full = ensemble_min_target(learner.critic_target(x, a), 2, generator)
    subset = residual.random_head_subset(5, 2, torch.Generator().manual_seed(3))
    assert torch.allclose(learner.critic_target(x, a, heads=subset).min(dim=0).values, full)


def test_learner_device_is_resolved_and_a_bad_one_is_named():
    from robofinetune.errors import ConfigError

    assert residual.resolve_device("cpu").type == "cpu"
    assert residual.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="'device'"):
        residual.resolve_device("gpu0")
    assert residual.resolve_critic_threads(0, "cuda") == 1 and residual.resolve_critic_threads(3, "cuda") == 3
    import os

    cores = os.cpu_count() or 1
    assert residual.resolve_critic_threads(0, "cpu", num_envs=cores) == 1     # no core left over: one thread
    assert residual.resolve_critic_threads(0, "cpu", num_envs=0) == min(2, cores)
