"""Policy workers on Ray (robofinetune.distributed.policy_workers): the in-process acting's rows from the same
seeds, weights that reach the workers, a killed worker without lost or repeated rows, and
``train residual --rollout-in-workers`` with ``--resume``. Uses the session's local Ray (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray env workers need `pip install 'robofinetune[ray]'`")

from bc_common import train_pointmass_base  # noqa: E402

from robofinetune.algos.residual import ResidualActor  # noqa: E402
from robofinetune.distributed.policy_workers import RayPolicyRollout, worker_seeds  # noqa: E402
from robofinetune.envs import make_vector_env  # noqa: E402
from robofinetune.rl import VectorRollout  # noqa: E402
from robofinetune.rl.features import FrozenFeatures  # noqa: E402
from robofinetune.rl.residual_acting import ResidualActing  # noqa: E402
from robofinetune.rl.setup import load_base_policy  # noqa: E402

pytestmark = pytest.mark.usefixtures("local_ray")

OBS_KEYS = ["agent_pos", "agent_vel", "goal_pos"]
ACTOR_KWARGS = {"obs_dim": 6, "action_dim": 2, "hidden_dim": 16, "depth": 1, "layer_norm": True, "action_scale": 0.1}
ENV_SEED, RUN_SEED, HORIZON = 50, 3, 6   # a short horizon: time-limit cuts and autoresets within a few calls


@pytest.fixture(scope="module")
def pointmass_base(tmp_path_factory):
    return train_pointmass_base(tmp_path_factory.mktemp("bc"), demos=6, max_steps=10, hidden_dim=16, depth=1,
                                batch_size=32, warmup_steps=2)


def random_actor(seed):
    """A residual actor whose corrections are not zero (the zero-initialised last layer replaced)."""
    torch.manual_seed(seed)
    actor = ResidualActor(**ACTOR_KWARGS)
    torch.nn.init.normal_(actor.net[-1].weight, std=1.0)
    return actor.requires_grad_(False)


def make_rollout(base_path, num_envs, num_workers, **options):
    # a generous start timeout: a loaded test machine can take minutes to import torch in the workers
    settings = dict(exploration_noise=0.05, warmup_noise=0.1, warmup_steps=0, steps_per_call=4, weights_every=1,
                    restart_timeout_s=600)
    settings.update(options)
    return RayPolicyRollout("pointmass", num_envs, num_workers, ENV_SEED, base_path, ACTOR_KWARGS, "state",
                            run_seed=RUN_SEED, overrides={"horizon": HORIZON}, **settings)


def collect(rollout, env_steps, actor, updates=0):
    """Every batch until the budget is spent, per worker in arrival order."""
    rollout.start(0, env_steps, updates, actor)
    batches = []
    while (batch := rollout.next_batch()) is not None:
        batches.append(batch)
    return batches


def rows_of(batches, worker):
    mine = [batch for batch in batches if batch.worker == worker and batch.rows is not None]
    return [np.concatenate(parts) for parts in zip(*(batch.rows for batch in mine))]


def test_workers_produce_the_in_process_rows_for_the_same_seeds(pointmass_base):
    base_path, _ = pointmass_base
    actor = random_actor(0)
    # 3 envs in shares [0, 1] and [2]; warm-up covers worker 0's first call and worker 1's first call
    rollout = make_rollout(base_path, 3, 2, warmup_steps=9)
    try:
        assert rollout.shares == [[0, 1], [2]]
        batches = collect(rollout, 3 * 12, actor)
    finally:
        rollout.close()
    assert sum(batch.env_steps for batch in batches) == 36 and all(batch.version.max() == 0 for batch in batches)
    finished = {worker: [] for worker in (0, 1)}
    for batch in batches:
        finished[batch.worker].extend(batch.finished)
    for worker, share in enumerate(rollout.shares):
        envs = make_vector_env("pointmass", len(share), seed=ENV_SEED + share[0], asynchronous=False, horizon=HORIZON)
        base = load_base_policy(str(base_path), "pointmass").requires_grad_(False).eval()
        reset_seed, sampling_seed, noise_seed = worker_seeds(RUN_SEED, 0, share[0])
        acting = ResidualActing(VectorRollout(envs), base, actor, FrozenFeatures("state", OBS_KEYS),
                                np.random.default_rng(noise_seed), 0.05, 0.1)
        acting.start(reset_seed, sampling_seed)
        ours = rows_of(batches, worker)
        steps = len(ours[0]) // len(share)   # which worker claims the last calls depends on timing
        assert steps >= 4
        expected_rows, expected_finished = [], []
        for step in range(steps):
            row, transitions = acting.step(warming_up=step < 4)   # each worker's first call of 4 steps
            expected_rows.append(row)
            expected_finished.extend((share[o.env_index], o.success, o.length) for o in transitions.finished)
        envs.close()
        expected = [np.concatenate(parts) for parts in zip(*expected_rows)]
        for name, a, b in zip(("rl_obs", "action", "reward", "next_rl_obs", "terminated", "truncated",
                               "intervened"), ours, expected):
            np.testing.assert_array_equal(a, b, err_msg=f"worker {worker} {name}")
        assert [(o.env_index, o.success, o.length) for o in finished[worker]] == expected_finished
        for batch in (b for b in batches if b.worker == worker):
            assert batch.env_index.tolist() == share * (batch.env_steps // len(share))
    assert len(finished[0]) + len(finished[1]) >= 3   # the horizon cut episodes: truncation rows were compared


def test_published_weights_reach_the_workers_and_they_act_with_them(pointmass_base):
    base_path, _ = pointmass_base
    first, second = random_actor(1), random_actor(2)
    rollout = make_rollout(base_path, 1, 1, exploration_noise=0.0, steps_per_call=3, weights_every=5)
    versions = []
    try:
        rollout.start(0, 60, 0, first)
        while (batch := rollout.next_batch()) is not None:
            versions.append(int(batch.version[0]))
            actor = first if batch.version[0] == 0 else second
            rl_obs, executed = torch.as_tensor(batch.rows[0].copy()), batch.rows[1]
            with torch.no_grad():   # no exploration noise: the executed action is base + this actor's residual
                acted = (rl_obs[:, -2:] + actor(rl_obs)).clamp(-1, 1).numpy()
            np.testing.assert_allclose(executed, acted, atol=1e-6)
            if len(versions) == 2:
                assert not rollout.publish(4, second)   # fewer than weights_every updates since version 0
                assert rollout.publish(5, second)
    finally:
        rollout.close()
    # the third call was submitted after the publish; the second may have started before it
    assert versions[:2] == [0, 0] and set(versions[3:]) == {5} and versions[2] in (0, 5)
    assert rollout.broadcaster.publications == 2


def test_a_killed_worker_is_restarted_without_losing_or_repeating_rows(pointmass_base):
    base_path, _ = pointmass_base
    rollout = make_rollout(base_path, 2, 2, steps_per_call=3)
    delivered = []
    try:
        rollout.start(0, 2 * 30, 0, random_actor(3))
        killed_pid, killed = rollout.pids[1], False
        while (batch := rollout.next_batch()) is not None:
            delivered.append(batch)
            if not killed and len([b for b in delivered if b.worker == 1]) == 2:   # kill -9 mid-run
                os.kill(killed_pid, signal.SIGKILL)
                killed = True
    finally:
        rollout.close()
    assert rollout.restarts == 1 and rollout.pids[1] != killed_pid and rollout.dropped_episodes == 1
    lost = [index for index, batch in enumerate(delivered) if batch.rows is None]
    assert len(lost) == 1 and delivered[lost[0]].dropped_envs == [1] and delivered[lost[0]].worker == 1
    # the budget is delivered in full: the lost call's env steps were collected again, none twice
    assert sum(batch.env_steps for batch in delivered) == 60
    for env in (0, 1):
        positions = [index for index, batch in enumerate(delivered) if batch.rows is not None and batch.worker == env]
        rows = [delivered[index] for index in positions]
        rl_obs, next_rl_obs = (np.concatenate([batch.rows[part] for batch in rows]) for part in (0, 3))
        done = np.concatenate([batch.rows[4] | batch.rows[5] for batch in rows])
        restart_at = sum(delivered[index].env_steps for index in positions if index < lost[0]) if env == 1 else None
        for t in range(len(rl_obs) - 1):
            if done[t]:
                continue
            if t + 1 == restart_at:   # the restarted worker starts a new episode, not the lost one's continuation
                assert not np.array_equal(rl_obs[t + 1], next_rl_obs[t])
                continue
            # every step follows the one delivered before it: no row lost, none repeated
            np.testing.assert_array_equal(rl_obs[t + 1], next_rl_obs[t], err_msg=f"env {env} step {t}")
        assert len(np.unique(rl_obs, axis=0)) == len(rl_obs)


def test_train_residual_with_the_rollout_in_workers_runs_and_resumes(pointmass_base, tmp_path, capsys):
    from robofinetune.cli import main

    base, demos = pointmass_base
    runs = tmp_path / "runs"
    common = [f"--base={base}", f"--dataset={demos}", "--num_envs=2", "--critic_hidden_dim=16",
              "--num_critics=2", "--actor_hidden_dim=16", "--batch_size=16", "--eval_episodes=1", "--eval_envs=2",
              "--final_eval_episodes=2", "--progress=false"]
    assert main(["train", "residual", "--task=pointmass", "--num-env-workers=2", "--rollout-in-workers",
                 "--intervener=scripted", f"--runs-dir={tmp_path / 'refused'}", *common]) == 2
    assert "config field 'rollout_in_workers' cannot be combined with 'intervener'" in capsys.readouterr().err
    common.append(f"--runs-dir={runs}")
    assert main(["train", "residual", "--task=pointmass", "--num-env-workers=2", "--rollout-in-workers",
                 "--total_env_steps=96", "--worker_steps=8", "--weights_every=4", "--updates_per_step=0.5",
                 "--warmup_steps=32", "--eval_every=48", "--checkpoint_every=48", "--log_every=32", *common]) == 0
    run = next(runs.iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["env_steps"] == 96 and summary["rollout_in_workers"] and summary["actor_updates"] > 0
    assert summary["staleness_max"] >= summary["staleness_mean"] >= 0 and summary["weights_publications"] >= 2
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/staleness_mean" in line and "train/staleness_max" in line for line in metrics)
    assert any("eval/success" in line for line in metrics)
    # resume the finished run for more env steps: the workers start again from the checkpoint's count
    assert main(["train", "residual", f"--resume={run}", "--total_env_steps=144"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["env_steps"] == 144 and summary["rollout_in_workers"]
    assert ray.is_initialized()   # the session's Ray: the runs used it and left it up
