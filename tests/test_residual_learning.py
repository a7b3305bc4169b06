"""Residual RL really learns: a deliberately poor pointmass base improves by a margin a no-op cannot produce.

The base is BC on scripted demos whose actions were pushed by a constant +0.2 N along x (a miscalibrated
operator), so it drifts past the goal and rarely stops inside it. The residual learns from the sparse success
reward, with the clean demos as the offline half of its replay.
"""

import numpy as np
import pytest

from robofinetune.algos.bc import BCConfig, train_bc
from robofinetune.algos.residual import ResidualConfig, train
from robofinetune.data.collect import collect_episodes
from robofinetune.data.io import save_dataset
from robofinetune.runs import Run

BIAS = np.array([0.2, 0.0], np.float32)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_poor_base_improves_by_a_margin_a_no_op_cannot_produce(tmp_path):
    meta = {"env_name": "pointmass", "task": "pointmass"}
    demos = collect_episodes("pointmass", 30, seed=0, progress=False)
    clean = save_dataset(demos, tmp_path / "clean.hdf5", env_meta=meta)
    for episode in demos:
        episode.actions = np.clip(episode.actions + BIAS, -1.0, 1.0)
    biased = save_dataset(demos, tmp_path / "biased.hdf5", env_meta=meta)
    bc = BCConfig(task="pointmass", dataset=str(biased), num_demos=20, max_steps=1000, hidden_dim=128, depth=2,
                  batch_size=128, warmup_steps=50, eval_episodes=0, checkpoint_every=10**9, accelerator="cpu")
    bc_run = Run.create("bc", "pointmass", bc, root=tmp_path)
    train_bc(bc, bc_run, progress=False)

    # a lighter learner than the default (5 heads, UTD 1, batch 128) keeps this near 5 minutes on 2 cores
    config = ResidualConfig(task="pointmass", base=str(bc_run.path / "policy"), dataset=str(clean), seed=0,
                            total_env_steps=6000, warmup_steps=1000, action_scale=0.3, actor_lr=1e-4,
                            num_critics=5, updates_per_step=1.0, batch_size=128, eval_every=0,
                            final_eval_episodes=60, checkpoint_every=0, log_every=500, progress=False)
    summary = train(config, Run.create("residual", "pointmass", config, root=tmp_path))

    # base and final are evaluated on the same 60 initial states; the zero-initialised residual *is* the base
    assert summary["base_success"] <= 0.4
    assert summary["final_success"] >= summary["base_success"] + 0.4
    assert summary["final_success_ci"][0] > summary["base_success_ci"][1]
