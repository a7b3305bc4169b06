"""`deploy` refuses a policy that has not passed the OPE gate against the robot's incumbent, unless --force.

The refusal happens before any ROS connection, so these tests need no roscore."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from robofinetune.algos.ope import PROMOTE, REJECT, GateResult, policy_fingerprint
from robofinetune.policies import save_policy
from robofinetune.robot.cli import deploy_permission

REPO = Path(__file__).resolve().parents[1]


def _flow_policy(seed: int):
    from robofinetune.policies import FlowPolicy, FlowPolicyConfig

    torch.manual_seed(seed)
    config = FlowPolicyConfig(task="pointmass", obs_keys=["agent_pos", "agent_vel", "goal_pos"],
                              obs_shapes={"agent_pos": [2], "agent_vel": [2], "goal_pos": [2]}, action_dim=2,
                              n_obs_steps=2, horizon=4, n_action_steps=2, hidden_dim=16, depth=1, inference_steps=2)
    policy = FlowPolicy(config)
    policy.set_normalizers(np.random.default_rng(0).uniform(-1, 1, (50, 6)),
                           np.random.default_rng(1).uniform(-1, 1, (50, 2)))
    return policy.eval()


def _record(candidate: Path, incumbent: Path, decision: str) -> None:
    GateResult(decision=decision, reason="recorded by the test", candidate=str(candidate), incumbent=str(incumbent),
               data="d", candidate_value=0.5, candidate_interval=(0.4, 0.6), incumbent_value=0.2,
               incumbent_interval=(0.1, 0.3), gain=0.3, gain_interval=(0.2, 0.4), margin=0.0, confidence=0.95,
               candidate_heads=[0.5, 0.6], incumbent_heads=[0.2, 0.1],
               incumbent_fingerprint=policy_fingerprint(incumbent)).save(candidate, plot=False)


@pytest.fixture
def policies(tmp_path):
    candidate, incumbent = tmp_path / "candidate", tmp_path / "incumbent"
    save_policy(_flow_policy(0), candidate)
    save_policy(_flow_policy(1), incumbent)
    return candidate, incumbent


def test_no_incumbent_refuses_unless_forced(policies):
    candidate, _ = policies
    allowed, why = deploy_permission(candidate, None, force=False)
    assert not allowed and "no incumbent" in why and "--force" in why
    allowed, why = deploy_permission(candidate, None, force=True)
    assert allowed and why.startswith("--force")


def test_the_incumbent_itself_may_run(policies, tmp_path):
    _, incumbent = policies
    copy = tmp_path / "copy_of_incumbent"
    shutil.copytree(incumbent, copy)   # same weights elsewhere: still the incumbent
    allowed, why = deploy_permission(copy, incumbent, force=False)
    assert allowed and "is the incumbent" in why


def test_ungated_and_rejected_candidates_are_refused_and_promoted_ones_run(policies):
    candidate, incumbent = policies
    allowed, why = deploy_permission(candidate, incumbent, force=False)
    assert not allowed and "no gate record" in why and "robofinetune gate" in why
    _record(candidate, incumbent, REJECT)
    allowed, why = deploy_permission(candidate, incumbent, force=False)
    assert not allowed and "REJECT" in why
    _record(candidate, incumbent, PROMOTE)
    allowed, why = deploy_permission(candidate, incumbent, force=False)
    assert allowed and "passed the gate" in why
    save_policy(_flow_policy(5), candidate)   # retrained after the gate: the record no longer covers it
    assert not deploy_permission(candidate, incumbent, force=False)[0]
    assert deploy_permission(candidate, incumbent, force=True)[0]


def test_deploy_command_refuses_before_touching_the_robot(capsys):
    from robofinetune.cli import main

    # can_twin.yaml names strong_diffusion as its incumbent; the weak base has no gate record against it
    code = main(["deploy", "--robot=" + str(REPO / "real_robot" / "can_twin.yaml"),
                 "--policy=" + str(REPO / "policies" / "can" / "weak_diffusion"), "--episodes=1", "--no-status"])
    assert code == 2
    err = capsys.readouterr().err
    assert "refusing to deploy" in err and "weak_diffusion" in err and "strong_diffusion" in err
