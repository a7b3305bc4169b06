"""Off-policy evaluation gate: FQE against closed-form values on a small chain MDP, interval coverage, the
gate's behaviour on tied and better candidates, data checks, the gate record deploy reads, and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from robofinetune.algos.ope import (PROMOTE, REJECT, CheckpointGate, GateConfig, GateResult, build_chunk_windows,
                                    check_logged_data, decide, estimate_policy_value, gate_check, gate_passed,
                                    gate_policies, head_interval, policy_fingerprint)
from robofinetune.data.episode import Episode
from robofinetune.errors import ConfigError, DatasetError
from robofinetune.policies import save_policy
from robofinetune.policies.base import Policy, PolicyConfig
from robofinetune.robot.cli import deploy_permission

# --- a chain MDP whose values are known in closed form ------------------------------------------------------------
#
# States 0..N-1 observed one-hot; reaching N-1 pays 1 and ends the episode. A 1-D action in [-1, 1] moves right
# with probability 0.85 when positive, 0.15 otherwise (else left; state 0 reflects). Episodes start uniformly in
# 0..N-2 and are truncated after HORIZON steps. The behaviour policy acts uniformly at random.

N_STATES, HORIZON, GAMMA = 6, 30, 0.8
P_RIGHT = {True: 0.85, False: 0.15}


def transition_matrix(positive: bool) -> np.ndarray:
    matrix = np.zeros((N_STATES, N_STATES))
    for state in range(N_STATES - 1):
        matrix[state, state + 1] += P_RIGHT[positive]
        matrix[state, max(state - 1, 0)] += 1 - P_RIGHT[positive]
    matrix[N_STATES - 1, N_STATES - 1] = 1.0
    return matrix


def true_chunk_value(action_of_state: np.ndarray, chunk: int, gamma: float = GAMMA) -> float:
    """Value of executing, from each decision state s, ``chunk`` copies of action_of_state[s] (zero-order hold);
    averaged over the uniform start distribution. Solved by iterating the chunk Bellman equation to convergence."""
    goal = N_STATES - 1
    values = np.zeros(N_STATES)
    matrices = {sign: transition_matrix(sign) for sign in (True, False)}
    for _ in range(2000):
        new = np.zeros(N_STATES)
        for state in range(goal):
            matrix = matrices[bool(action_of_state[state] > 0)]
            # distribution over (state, still running) after each step of the chunk
            alive = np.zeros(N_STATES)
            alive[state] = 1.0
            total = 0.0
            for step in range(chunk):
                moved = alive @ matrix
                total += gamma ** step * moved[goal]          # reward on entering the goal
                moved[goal] = 0.0
                alive = moved
            new[state] = total + gamma ** chunk * alive @ values
        values = new
    return float(values[:goal].mean())


def chain_episodes(count: int, seed: int) -> list[Episode]:
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(count):
        state = int(rng.integers(0, N_STATES - 1))
        states, actions, rewards = [], [], []
        success = False
        for _ in range(HORIZON):
            action = rng.uniform(-1, 1)
            right = rng.random() < P_RIGHT[bool(action > 0)]
            states.append(state)
            actions.append([action])
            state = state + 1 if right else max(state - 1, 0)
            success = state == N_STATES - 1
            rewards.append(1.0 if success else 0.0)
            if success:
                break
        one_hot = np.eye(N_STATES, dtype=np.float32)
        episodes.append(Episode(observations={"state": one_hot[states]}, actions=np.asarray(actions),
                                rewards=np.asarray(rewards), success=success,
                                final_observation={"state": one_hot[state]}))
    return episodes


class ChainPolicy(Policy):
    """Deterministic state-feedback policy executed in chunks (zero-order hold): act() -> (B, chunk, 1)."""

    def __init__(self, action_of_state, chunk: int = 1, name: str = "chain") -> None:
        super().__init__()
        self.action_of_state = np.asarray(action_of_state, dtype=np.float32)
        self.name = name
        self.config = PolicyConfig(task="chain", obs_keys=["state"], obs_shapes={"state": [N_STATES]}, action_dim=1,
                                   n_obs_steps=1, horizon=chunk, n_action_steps=chunk)

    def act(self, obs):
        states = np.argmax(np.asarray(obs["state"])[:, -1], axis=-1)
        actions = self.action_of_state[states][:, None, None]
        return np.repeat(actions, self.config.n_action_steps, axis=1)

    def reset(self, env_index=None):
        pass

    def select_action(self, obs):
        return self.act({key: value[:, None] for key, value in obs.items()})[:, 0]


GOOD = np.full(N_STATES, 0.5)             # always right
SLOW = np.array([0.5, 0.5, -0.5, 0.5, 0.5, 0.5])   # steps back at state 2: clearly worse
FAST_CONFIG = dict(heads=8, hidden_dim=64, depth=2, iterations=15, steps_per_iteration=30, batch_size=128,
                   learning_rate=3e-3, gamma=GAMMA, action_samples=1)


def test_closed_form_values_are_ordered_and_chunking_matters():
    good, slow = true_chunk_value(GOOD, 1), true_chunk_value(SLOW, 1)
    assert 0.4 < good < 1.0 and slow < good - 0.1
    # a constant policy does not care about chunking; a state-dependent one does
    assert true_chunk_value(GOOD, 2) == pytest.approx(good, abs=1e-9)
    assert abs(true_chunk_value(SLOW, 2) - slow) > 0.01


def test_chunk_windows_reward_discount_and_next_state():
    episode = Episode(observations={"x": np.arange(5, dtype=np.float32)[:, None]}, actions=np.arange(5)[:, None],
                      rewards=[0, 0, 0, 0, 1], success=True, final_observation={"x": np.array([5.0], np.float32)})
    truncated = Episode(observations={"x": np.arange(3, dtype=np.float32)[:, None]}, actions=np.ones((3, 1)),
                        rewards=[0, 0, 0], success=False, final_observation={"x": np.array([9.0], np.float32)})
    windows = build_chunk_windows([episode, truncated], ["x"], n_obs_steps=2, chunk_steps=2, gamma=0.5)
    assert len(windows) == 8
    # episode 0: window at t=3 covers steps 3, 4 and meets the terminal: reward gamma^1 * 1, no bootstrap
    assert windows.reward[3] == pytest.approx(0.5) and windows.discount[3] == 0.0
    # window at t=4 (last step) is cut by the terminal: reward 1 at once
    assert windows.reward[4] == pytest.approx(1.0) and windows.discount[4] == 0.0
    # window at t=0 bootstraps from the history at index 2 with gamma^2
    assert windows.discount[0] == pytest.approx(0.25) and windows.state_obs[windows.next_state[0]].tolist() == [1, 2]
    # the logged chunk at the last step is padded with the last action
    assert windows.chunk[4].tolist() == [4, 4]
    # truncated episode, last window: one step left, bootstraps from the final observation with gamma^1
    assert windows.discount[7] == pytest.approx(0.5)
    assert windows.state_obs[windows.next_state[7]].tolist() == [2, 9]
    # first histories repeat the first frame
    assert windows.state_obs[windows.initial_state[1]].tolist() == [0, 0]
    assert windows.value_range == (0.0, 1.0)


@pytest.mark.parametrize("action_of_state,chunk", [(GOOD, 1), (SLOW, 1), (SLOW, 2)])
def test_fqe_recovers_the_closed_form_value(action_of_state, chunk):
    episodes = chain_episodes(200, seed=1)
    estimate = estimate_policy_value(ChainPolicy(action_of_state, chunk), episodes, GateConfig(**FAST_CONFIG))
    truth = true_chunk_value(action_of_state, chunk)
    assert estimate.chunk_steps == chunk and estimate.head_values.shape == (8,)
    assert estimate.value == pytest.approx(truth, abs=0.05), (estimate.value, truth)


def test_bootstrap_interval_covers_the_truth_at_about_the_stated_rate():
    draws, confidence = 12, 0.9
    truth = true_chunk_value(SLOW, 2)
    covered, widths = 0, []
    for draw in range(draws):
        estimate = estimate_policy_value(ChainPolicy(SLOW, 2), chain_episodes(60, seed=100 + draw),
                                         GateConfig(**{**FAST_CONFIG, "seed": draw}))
        low, high = estimate.interval(confidence)
        covered += low <= truth <= high
        widths.append(high - low)
    # 12 draws at 90%: 8 or more covered has probability ~0.97 under exact coverage; intervals must be informative
    assert covered >= 8, f"covered {covered}/{draws}"
    assert np.mean(widths) < 0.3


def test_gate_rejects_an_equal_candidate_and_promotes_a_better_one():
    # "equal" has the same true value as "good" with different actions, so the Q networks see different inputs
    # and the two estimates differ by noise only; "slow" is truly worse.
    policies = {"equal": ChainPolicy(np.full(N_STATES, 0.9)), "good": ChainPolicy(GOOD), "slow": ChainPolicy(SLOW)}
    decisions = {"equal>good": [], "good>slow": [], "slow>good": []}
    for draw in range(4):
        episodes = chain_episodes(80, seed=200 + draw)
        config = GateConfig(**{**FAST_CONFIG, "seed": draw})
        estimates = {name: estimate_policy_value(policy, episodes, config, name) for name, policy in policies.items()}
        for pair in decisions:
            candidate, incumbent = pair.split(">")
            decisions[pair].append(decide(estimates[candidate], estimates[incumbent], 0.0, config.confidence)[0])
    assert decisions["equal>good"].count(REJECT) >= 3
    assert decisions["good>slow"].count(PROMOTE) >= 3
    assert decisions["slow>good"].count(PROMOTE) == 0


@pytest.mark.slow
@pytest.mark.parametrize("action_of_state,chunk", [(GOOD, 1), (SLOW, 2)])
def test_bootstrap_coverage_over_many_draws(action_of_state, chunk):
    truth = true_chunk_value(action_of_state, chunk)
    hits = {0.9: 0, 0.95: 0}
    draws = 40
    for draw in range(draws):
        estimate = estimate_policy_value(ChainPolicy(action_of_state, chunk), chain_episodes(60, seed=1000 + draw),
                                         GateConfig(**{**FAST_CONFIG, "heads": 16, "seed": draw}))
        for level in hits:
            low, high = estimate.interval(level)
            hits[level] += low <= truth <= high
    assert 0.75 <= hits[0.9] / draws <= 1.0 and 0.8 <= hits[0.95] / draws <= 1.0, hits


def test_checkpoint_gate_keeps_the_best_and_pays_for_the_incumbent_once():
    episodes = chain_episodes(80, seed=11)
    gate = CheckpointGate(episodes, ChainPolicy(SLOW), GateConfig(**FAST_CONFIG), data="chain", incumbent_name="base")
    worse = gate.consider(ChainPolicy(np.array([0.5, -0.5, -0.5, 0.5, 0.5, 0.5])), name="step 1")
    assert worse.decision == REJECT and gate.incumbent_name == "base"
    better = gate.consider(ChainPolicy(GOOD), name="step 2")
    assert better.decision == PROMOTE and better.incumbent == "base" and gate.incumbent_name == "step 2"
    assert gate.consider(ChainPolicy(GOOD), name="step 3").decision == REJECT  # a tie with the new best
    assert [r.candidate for r in gate.history] == ["step 1", "step 2", "step 3"]


def test_identical_policies_tie_exactly_and_are_rejected():
    episodes = chain_episodes(30, seed=3)
    result = gate_policies(ChainPolicy(GOOD), ChainPolicy(GOOD), episodes, GateConfig(**FAST_CONFIG))
    assert result.decision == REJECT and result.gain == 0.0
    assert "does not exceed the margin" in result.reason


def test_decide_uses_the_lower_end_of_the_interval():
    from robofinetune.algos.ope import PolicyEstimate

    def estimate(values):
        return PolicyEstimate("x", np.asarray(values, float), 1, 1, 10, 10, 0.0, 0.0, 0.0, config_key="k")

    base = estimate(np.zeros(10))
    noisy_gain = estimate(np.linspace(-0.1, 0.3, 10))
    clear_gain = estimate(np.linspace(0.18, 0.22, 10))
    assert decide(noisy_gain, base)[0] == REJECT and "reaches below" in decide(noisy_gain, base)[1]
    assert decide(clear_gain, base)[0] == PROMOTE
    assert decide(clear_gain, base, margin=0.25)[0] == REJECT
    low, high = head_interval(np.linspace(0.18, 0.22, 10), 0.95, "percentile")
    assert 0.18 <= low < high <= 0.22
    with pytest.raises(ConfigError):
        decide(clear_gain, PolicyEstimate("y", np.zeros(10), 1, 1, 10, 10, 0.0, 0.0, 0.0, config_key="other"))


# --- bad data ---------------------------------------------------------------------------------------------------


def test_data_without_rewards_is_refused():
    episodes = chain_episodes(10, seed=0)
    for episode in episodes:
        episode.rewards[:] = 0.0
        episode.metadata["success_source"] = "unknown"
    with pytest.raises(DatasetError, match="rewards.*no rewards were recorded"):
        check_logged_data(episodes, [ChainPolicy(GOOD)], "demo.hdf5")
    for episode in episodes:
        episode.metadata.clear()
    with pytest.raises(DatasetError, match="every reward is 0"):
        gate_policies(ChainPolicy(GOOD), ChainPolicy(SLOW), episodes, GateConfig(**FAST_CONFIG))


def test_mismatched_keys_shapes_and_actions_are_refused():
    episodes = chain_episodes(5, seed=0)
    renamed = [Episode(observations={"position": e.observations["state"]}, actions=e.actions, rewards=e.rewards)
               for e in episodes]
    with pytest.raises(DatasetError, match="demo.hdf5: episode 0: lacks observation 'state'"):
        check_logged_data(renamed, [ChainPolicy(GOOD)], "demo.hdf5")
    short = [Episode(observations={"state": e.observations["state"][:, :3]}, actions=e.actions, rewards=e.rewards)
             for e in episodes]
    with pytest.raises(DatasetError, match="'state' has shape \\(3,\\)"):
        check_logged_data(short, [ChainPolicy(GOOD)], "demo.hdf5")
    wide = [Episode(observations=e.observations, actions=np.zeros((len(e), 3)), rewards=e.rewards) for e in episodes]
    with pytest.raises(DatasetError, match="'actions' has 3 dims"):
        check_logged_data(wide, [ChainPolicy(GOOD)], "demo.hdf5")
    with pytest.raises(DatasetError, match="at least 2"):
        check_logged_data(episodes[:1], [ChainPolicy(GOOD)], "demo.hdf5")
    with pytest.raises(ConfigError, match="confidence"):
        GateConfig(confidence=1.5).check()


# --- the record deploy reads, and the command ----------------------------------------------------------------------


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


def _pointmass_like_episodes(count: int = 8):
    from robofinetune.data.synthetic import synthetic_episodes

    shapes = {"agent_pos": (2,), "agent_vel": (2,), "goal_pos": (2,)}
    return synthetic_episodes(count, length=(6, 10), obs_shapes=shapes, action_dim=2, state_dim=None, seed=0)


TINY_FLAGS = ["--heads=3", "--hidden-dim=16", "--depth=1", "--iterations=2", "--steps-per-iteration=3",
              "--batch-size=16", "--action-samples=1"]


def _record(candidate: Path, incumbent: Path, decision: str, plot: bool = False) -> None:
    """A gate record as `robofinetune gate` writes it, tying ``candidate`` to ``incumbent``'s weights."""
    GateResult(decision=decision, reason="recorded by the test", candidate=str(candidate), incumbent=str(incumbent),
               data="d", candidate_value=0.5, candidate_interval=(0.4, 0.6), incumbent_value=0.2,
               incumbent_interval=(0.1, 0.3), gain=0.3, gain_interval=(0.2, 0.4), margin=0.0, confidence=0.95,
               candidate_heads=[0.5, 0.6], incumbent_heads=[0.2, 0.1],
               incumbent_fingerprint=policy_fingerprint(incumbent)).save(candidate, plot=plot)


def test_gate_record_ties_candidate_and_incumbent_weights(tmp_path):
    candidate, incumbent, other = tmp_path / "candidate", tmp_path / "incumbent", tmp_path / "other"
    save_policy(_flow_policy(0), candidate)
    save_policy(_flow_policy(1), incumbent)
    save_policy(_flow_policy(2), other)
    assert not gate_passed(candidate, incumbent)
    assert "no gate record" in gate_check(candidate, incumbent)[1]

    _record(candidate, incumbent, PROMOTE, plot=True)
    assert (candidate / "gate.json").exists() and (candidate / "gate.png").exists()
    assert gate_passed(candidate, incumbent)
    assert not gate_passed(candidate, other)
    assert "never against" in gate_check(candidate, other)[1]
    record = (candidate / "gate.json").read_text()
    save_policy(_flow_policy(3), candidate)  # retrained after the gate: the record no longer applies
    (candidate / "gate.json").write_text(record)
    assert not gate_passed(candidate, incumbent)
    assert "changed" in gate_check(candidate, incumbent)[1]


def test_gate_command_end_to_end(tmp_path, capsys):
    import argparse

    from robofinetune.algos.ope_cli import add_gate_parser, command_gate
    from robofinetune.data.io import save_dataset
    data = save_dataset(_pointmass_like_episodes(), tmp_path / "logged.hdf5")
    candidate, incumbent = tmp_path / "candidate", tmp_path / "incumbent"
    save_policy(_flow_policy(0), candidate)
    save_policy(_flow_policy(0), incumbent)   # same weights: an exact tie
    parser = argparse.ArgumentParser()
    add_gate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["gate", f"--candidate={candidate}", f"--incumbent={incumbent}", f"--data={data}",
                              "--margin=0.0", "--confidence=0.9", *TINY_FLAGS])
    assert command_gate(args) == 1
    out = capsys.readouterr().out
    assert "candidate" in out and "incumbent" in out and "REJECT" in out
    report = json.loads((candidate / "gate.json").read_text())
    assert report["decision"] == REJECT and report["confidence"] == 0.9 and report["gain"] == 0.0
    assert report["incumbent_fingerprint"] == policy_fingerprint(incumbent)
    assert (candidate / "gate.png").exists()
    assert not gate_passed(candidate, incumbent)

    # mismatched keys stop with a clear error through the whole command path
    from robofinetune.cli import main as cli_main  # noqa: F401  (the lead wires `gate` into it)
    bad = save_dataset([Episode(observations={"other": np.zeros((4, 2), np.float32)}, actions=np.zeros((4, 2)),
                                rewards=[0, 0, 0, 1], success=True)] * 3, tmp_path / "bad.hdf5")
    args = parser.parse_args(["gate", f"--candidate={candidate}", f"--incumbent={incumbent}", f"--data={bad}",
                              *TINY_FLAGS])
    with pytest.raises(DatasetError, match="agent_pos"):
        command_gate(args)


# --- deploy refuses a policy that has not passed the gate against the robot's incumbent, unless --force ----------
# (the refusal happens before any ROS connection, so these need no roscore)

@pytest.fixture
def policies(tmp_path):
    candidate, incumbent = tmp_path / "candidate", tmp_path / "incumbent"
    save_policy(_flow_policy(0), candidate)
    save_policy(_flow_policy(1), incumbent)
    return candidate, incumbent


def test_no_incumbent_refuses_unless_forced(policies):
    candidate, _ = policies
    allowed, why, forced = deploy_permission(candidate, None, force=False)
    assert not allowed and not forced and "no incumbent" in why and "--force" in why
    allowed, why, forced = deploy_permission(candidate, None, force=True)
    assert allowed and forced and why.startswith("--force")


def test_the_incumbent_itself_may_run(policies, tmp_path):
    _, incumbent = policies
    copy = tmp_path / "copy_of_incumbent"
    shutil.copytree(incumbent, copy)   # same weights elsewhere: still the incumbent
    allowed, why, forced = deploy_permission(copy, incumbent, force=False)
    assert allowed and not forced and "is the incumbent" in why


def test_ungated_and_rejected_candidates_are_refused_and_promoted_ones_run(policies):
    candidate, incumbent = policies
    allowed, why, forced = deploy_permission(candidate, incumbent, force=False)
    assert not allowed and not forced and "no gate record" in why and "robofinetune gate" in why
    _record(candidate, incumbent, REJECT)
    allowed, why, forced = deploy_permission(candidate, incumbent, force=False)
    assert not allowed and not forced and "REJECT" in why
    _record(candidate, incumbent, PROMOTE)
    allowed, why, forced = deploy_permission(candidate, incumbent, force=False)
    assert allowed and not forced and "passed the gate" in why
    save_policy(_flow_policy(5), candidate)   # retrained after the gate: the record no longer covers it
    assert not deploy_permission(candidate, incumbent, force=False)[0]
    forced_permission = deploy_permission(candidate, incumbent, force=True)
    assert forced_permission.allowed and forced_permission.forced


def test_deploy_command_refuses_before_touching_the_robot(capsys):
    from robofinetune.cli import main

    repo = Path(__file__).resolve().parents[1]
    # can_twin.yaml names strong_diffusion as its incumbent; the weak base has no gate record against it
    code = main(["deploy", "--robot=" + str(repo / "real_robot" / "can_twin.yaml"),
                 "--policy=" + str(repo / "policies" / "can" / "weak_diffusion"), "--episodes=1", "--no-status"])
    assert code == 2
    err = capsys.readouterr().err
    assert "refusing to deploy" in err and "weak_diffusion" in err and "strong_diffusion" in err
