"""collect -> train bc -> eval on the fast MuJoCo task, through the real CLI, in well under a minute."""

import json
from pathlib import Path

import pytest
import torch

from robofinetune.cli import main
from robofinetune.data.io import load_dataset
from robofinetune.errors import CheckpointError
from robofinetune.policies import load_policy, save_policy


@pytest.fixture(scope="module")
def pointmass_demos(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pointmass_demos.hdf5"
    assert main(["collect", "--task=pointmass", "--episodes=40", f"--output={path}", "--seed=1"]) == 0
    return path


def test_collect_writes_a_loadable_dataset(pointmass_demos):
    episodes, meta = load_dataset(pointmass_demos)
    assert len(episodes) == 40
    assert sum(episode.success for episode in episodes) >= 36
    assert set(episodes[0].observations) == {"agent_pos", "agent_vel", "goal_pos"}


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_bc_then_eval_beats_a_broken_policy(pointmass_demos, tmp_path, kind, capsys):
    runs = tmp_path / "runs"
    code = main(["train", "bc", "--task=pointmass", f"--policy={kind}", f"--dataset={pointmass_demos}",
                 f"--runs-dir={runs}", "--max-steps=1500", "--batch-size=128", "--hidden-dim=128", "--depth=2",
                 "--n-obs-steps=1", "--horizon=4", "--n-action-steps=2", "--eval-episodes=0", "--warmup-steps=100",
                 "--checkpoint-every=500", "--learning-rate=1e-3"])
    assert code == 0
    run = next(runs.iterdir())
    assert (run / "config.yaml").exists() and (run / "metrics.jsonl").exists()
    assert (run / "checkpoints" / "last.ckpt").exists()
    losses = [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    policy_path = run / "policy"
    # The broken policy: the same checkpoint (config, normalisers, sampler) with its networks back at their
    # untrained initialisation, so its actions carry no knowledge of the goal.
    broken = load_policy(policy_path, device="cpu")
    torch.manual_seed(1)
    reinitialised = 0
    for module in broken.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
            reinitialised += 1
    assert reinitialised > 0
    broken_path = save_policy(broken, tmp_path / "broken", {"task": "pointmass"})
    results = {}
    # the broken one runs every episode to the 100-step horizon: 10 of the same seeded episodes suffice
    for name, path, episodes in (("trained", policy_path, 30), ("broken", broken_path, 10)):
        report = tmp_path / f"eval_{name}.json"
        assert main(["eval", "--task=pointmass", f"--policy={path}", f"--episodes={episodes}",
                     f"--output={report}"]) == 0
        results[name] = json.loads(report.read_text())
        assert results[name]["episodes"] == episodes
    assert "success" in capsys.readouterr().out
    trained, broken_result = results["trained"], results["broken"]
    # A policy that does not steer to the goal essentially never stops within 2 cm of it, so the trained one's
    # interval lies wholly above the broken one's.
    assert broken_result["success_rate"] <= 0.1, broken_result
    assert trained["success_rate"] >= 0.6, trained
    assert trained["success_ci"][0] > broken_result["success_ci"][1], (trained, broken_result)


def test_eval_refuses_a_checkpoint_for_another_task(pointmass_demos, tmp_path, capsys):
    runs = tmp_path / "runs"
    main(["train", "bc", "--task=pointmass", f"--dataset={pointmass_demos}", f"--runs-dir={runs}", "--max-steps=5",
          "--hidden-dim=16", "--depth=1", "--eval-episodes=0"])
    policy_path = next(runs.iterdir()) / "policy"
    assert main(["eval", "--task=can", f"--policy={policy_path}", "--episodes=1"]) == 2
    assert "trained for task 'pointmass', not 'can'" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        load_policy(policy_path, task="lift")


def test_resume_continues_from_the_last_checkpoint(pointmass_demos, tmp_path):
    runs = tmp_path / "runs"
    args = ["train", "bc", "--task=pointmass", f"--dataset={pointmass_demos}", f"--runs-dir={runs}",
            "--max-steps=40", "--hidden-dim=16", "--depth=1", "--eval-episodes=0", "--checkpoint-every=20"]
    assert main(args) == 0
    run = next(runs.iterdir())
    config = (run / "config.yaml").read_text().replace("max_steps: 40", "max_steps: 60")
    (run / "config.yaml").write_text(config)
    assert main(["train", "bc", f"--resume={run}"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_steps"] == 60


def first_losses(run: Path, count: int = 5) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in rows if "train/loss" in row][:count]
    assert len(losses) == count, rows
    return float(sum(losses) / count)


def test_init_policy_starts_from_a_trained_policy_and_refuses_another_network(pointmass_demos, tmp_path):
    """``--init_policy`` (train a finished run longer): the new run starts at the trained policy's loss, not at a fresh
    network's, and a policy built with another network or of another type is refused naming the field."""
    from robofinetune.algos.bc import BCConfig, build_policy, load_initial_weights
    from robofinetune.envs import load_task_spec
    from robofinetune.errors import ConfigError

    common = ["train", "bc", "--task=pointmass", f"--dataset={pointmass_demos}", "--hidden-dim=32", "--depth=1",
              "--eval-episodes=0", "--checkpoint-every=1000", "--log-every=1", "--warmup-steps=1"]
    assert main([*common, f"--runs-dir={tmp_path / 'trained'}", "--max-steps=400", "--learning-rate=1e-3"]) == 0
    trained = next((tmp_path / "trained").iterdir())
    assert main([*common, f"--runs-dir={tmp_path / 'fresh'}", "--max-steps=5"]) == 0
    assert main([*common, f"--runs-dir={tmp_path / 'longer'}", "--max-steps=5",
                 f"--init-policy={trained / 'policy'}", "--n-action-steps=2"]) == 0
    fresh, longer = next((tmp_path / "fresh").iterdir()), next((tmp_path / "longer").iterdir())
    assert first_losses(longer) < 0.5 * first_losses(fresh), (first_losses(longer), first_losses(fresh))
    card = load_policy(longer / "policy", device="cpu").checkpoint_metadata   # the lineage is on the new card
    assert card["init_policy"] == str(trained / "policy") and card["prior_train_steps"] == 400
    assert card["prior_train_seconds"] > 0 and card["train_steps"] == 5
    # the weights are copied exactly (normalizers included)
    import dataclasses

    import yaml

    spec = load_task_spec("pointmass")
    saved = {key: value for key, value in yaml.safe_load((trained / "config.yaml").read_text()).items()
             if key in {field.name for field in dataclasses.fields(BCConfig)}}
    config = BCConfig(**{**saved, "init_policy": str(trained / "policy")})
    policy = build_policy(config, spec)
    load_initial_weights(policy, config)
    reference = load_policy(trained / "policy", device="cpu").state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in policy.state_dict().items())
    with pytest.raises(ConfigError, match=r"init_policy.*hidden_dim: 32 there, 64 here"):
        wider = dataclasses.replace(config, hidden_dim=64)
        load_initial_weights(build_policy(wider, spec), wider)
    with pytest.raises(ConfigError, match=r"init_policy.*is a DiffusionPolicy.*FlowPolicy"):
        flow = dataclasses.replace(config, policy="flow")
        load_initial_weights(build_policy(flow, spec), flow)
    with pytest.raises(ConfigError, match=r"init_policy.*does not exist"):
        missing = dataclasses.replace(config, init_policy=str(tmp_path / "nowhere"))
        load_initial_weights(build_policy(missing, spec), missing)
