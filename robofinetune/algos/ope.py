"""Off-policy evaluation gate: Fitted Q Evaluation over action chunks, a paired episode bootstrap, a decision.

    logged episodes -> one window per step t: (history h_t, logged chunk c_t, R_t, gamma^n (0 if it ended), h_{t+n})
    per policy:  its chunks pi(h) at every logged history, a few samples each (generative policies are random)
                 H heads, each with its own resample of the episodes and its own initialisation:
                     K times:  Q_target <- Q;  fit Q(h, c) to  R + gamma^n * mean_m Q_target(h', pi_m(h'))
                 J_b = mean over the resample's first histories of  mean_m Q_b(h_0, pi_m(h_0))
    gate:        gain_b = J_b(candidate) - J_b(incumbent)  (head b: same resample, init and minibatches for both)
                 interval = mean(gain) +- t_{H-1} * sd(gain);  PROMOTE only when its lower end clears the margin

Why chunks: a chunked policy commits to ``n_action_steps`` actions at a decision point and is not Markov in the
per-step state (what it does at t+1 depends on when it last planned). Q is therefore a function of
(observation history, whole executed chunk) and the Bellman backup jumps a chunk at a time (an SMDP with
discount gamma^n). Every logged step is used as a decision point: the policy re-plans from whatever history it
reaches, so the alignment of the logged chunks does not matter and no data is thrown away.

Why FQE only (no importance sampling / doubly robust): IS needs the behaviour policy's action likelihood, which
teleop demos and mixed replay do not have, and the target's likelihood of a *logged* chunk, which a diffusion or
flow policy does not give (``chain_log_prob`` scores one denoising chain, not the marginal of its final action).

Observations with cameras: the Q networks never see pixels. Each logged history is encoded once by the evaluated
policy's own observation encoder (a residual's: its frozen base's), frozen and in eval mode, and FQE runs on
those float32 features (:func:`history_encoder`); data with cameras and a policy without an encoder is refused.

Why a paired bootstrap: the question is the sign of J(A) - J(B), not either value. Head b of both policies
shares the resample, the network initialisation and the minibatch sequence (common random numbers), so the
noise of fitting Q mostly cancels in the difference, and the heads' spread of the *difference* measures both
data and fitting uncertainty. With few heads a percentile interval is crude, so the default interval is the
bootstrap standard error with a Student-t quantile on H - 1 degrees of freedom.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from robofinetune.data.episode import Episode
from robofinetune.errors import CheckpointError, ConfigError, DatasetError
from robofinetune.images import image_keys, is_image_key

GATE_FILE = "gate.json"
GATE_HISTORY_FILE = "gate_history.jsonl"
GATE_PLOT_FILE = "gate.png"
PROMOTE, REJECT = "PROMOTE", "REJECT"
ESTIMATOR = "fqe-chunk+paired-episode-bootstrap"


@dataclass
class GateConfig:
    """Everything that decides an OPE estimate and a gate decision (saved in every report)."""

    margin: float = 0.0               # promote only if the gain's lower bound is above this (value units)
    confidence: float = 0.95          # two-sided level of the reported intervals; the gate uses the lower end
    interval: str = "t"               # t: mean +- t_{H-1} * sd over heads | percentile: quantiles over heads
    gamma: float = 0.99
    heads: int = 12                   # bootstrap replicates; each is its own Q network
    hidden_dim: int = 64
    depth: int = 2                    # hidden layers of each Q network (LayerNorm + ReLU)
    iterations: int = 0               # FQE Bellman iterations; 0: longest episode / chunk + 10 (>= 20)
    steps_per_iteration: int = 50     # gradient steps fitting each iteration's targets
    batch_size: int = 256             # windows per head per gradient step
    learning_rate: float = 1e-3
    action_samples: int = 2           # policy chunks drawn per history (1 kept if the policy is deterministic)
    chunk_steps: int = 0              # 0: the length of the chunk the policy's act() returns
    seed: int = 0
    device: str = "auto"              # auto: cuda when present, else cpu
    policy_batch: int = 1024          # histories per policy.act call when precomputing chunks

    def check(self) -> None:
        problems = []
        if not 0.0 < self.confidence < 1.0:
            problems.append(f"'confidence' must be in (0, 1), got {self.confidence}")
        if not 0.0 < self.gamma <= 1.0:
            problems.append(f"'gamma' must be in (0, 1], got {self.gamma}")
        if self.heads < 2:
            problems.append(f"'heads' must be >= 2 for an interval, got {self.heads}")
        if self.interval not in ("t", "percentile"):
            problems.append(f"'interval' must be 't' or 'percentile', got {self.interval!r}")
        if self.iterations < 0:
            problems.append(f"'iterations' must be >= 0 (0 = automatic), got {self.iterations}")
        for name in ("hidden_dim", "depth", "steps_per_iteration", "batch_size", "action_samples", "policy_batch"):
            if getattr(self, name) < 1:
                problems.append(f"'{name}' must be >= 1, got {getattr(self, name)}")
        if self.chunk_steps < 0:
            problems.append(f"'chunk_steps' must be >= 0, got {self.chunk_steps}")
        if problems:
            raise ConfigError("gate config field " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Config = GateConfig


# --- logged data -> chunk windows --------------------------------------------------------------------------------


def check_logged_data(episodes: Sequence[Episode], policies: Sequence[Any], source: str = "logged data") -> None:
    """Raise a DatasetError naming ``source`` and the field when the data cannot evaluate these policies."""
    if len(episodes) < 2:
        raise DatasetError(f"{source}: {len(episodes)} episode(s); off-policy evaluation needs at least 2 "
                           f"(and dozens for a useful interval)")
    action_dims = {policy.config.action_dim for policy in policies}
    if len(action_dims) > 1:
        raise CheckpointError(f"the policies disagree on action_dim ({sorted(action_dims)}); they cannot be compared")
    for index, episode in enumerate(episodes):
        where = f"{source}: episode {index}"
        if len(episode) == 0:
            raise DatasetError(f"{where}: field 'actions' is empty")
        for policy in policies:
            config = policy.config
            for key in config.obs_keys:
                if key not in episode.observations:
                    raise DatasetError(f"{where}: lacks observation '{key}' which the policy for task "
                                       f"'{config.task}' needs (the data has {episode.obs_keys})")
                shape = tuple(episode.observations[key].shape[1:])
                if shape != tuple(config.obs_shapes[key]):
                    raise DatasetError(f"{where}: observation '{key}' has shape {shape}, the policy for task "
                                       f"'{config.task}' expects {tuple(config.obs_shapes[key])}")
            if episode.actions.shape[1] != config.action_dim:
                raise DatasetError(f"{where}: field 'actions' has {episode.actions.shape[1]} dims, the policy for "
                                   f"task '{config.task}' has action_dim {config.action_dim}")
        episode.validate(where)
    if not any(np.any(episode.rewards != 0) for episode in episodes):
        unknown = all(episode.metadata.get("success_source") == "unknown" for episode in episodes)
        why = ("no rewards were recorded (and no episode is marked successful or failed)" if unknown else
               "every reward is 0 (no episode succeeded)")
        raise DatasetError(f"{source}: field 'rewards': {why}; off-policy evaluation needs a reward signal to tell "
                           f"a better policy from a worse one")


@dataclass
class ChunkWindows:
    """Every logged step t as a decision point of a policy that executes ``chunk_steps`` actions at a time.

    ``histories[key]`` (S, n_obs_steps, ...) are the observation histories at every index 0..T of every episode
    (index T is the observation after the last action); windows refer to them by row. A window that meets a
    terminal stops there (``discount`` 0); one that runs off the end of a truncated episode bootstraps from the
    last observation with gamma^(steps left).
    """

    histories: dict[str, np.ndarray]
    chunk_steps: int
    obs: np.ndarray               # (N, obs_features) flat history of each window's start
    chunk: np.ndarray             # (N, chunk_steps * A) logged chunk, padded with the episode's last action
    reward: np.ndarray            # (N,) discounted reward collected inside the window
    discount: np.ndarray          # (N,) gamma^n, or 0 when the episode terminated inside the window
    next_state: np.ndarray        # (N,) row of the history at the next decision point
    episode: np.ndarray           # (N,) episode of each window
    initial_state: np.ndarray     # (E,) row of each episode's first history
    state_obs: np.ndarray         # (S, obs_features) flat histories, rows of ``histories``
    value_range: tuple[float, float]

    def __len__(self) -> int:
        return len(self.reward)


def build_chunk_windows(episodes: Sequence[Episode], obs_keys: list[str], n_obs_steps: int, chunk_steps: int,
                        gamma: float, encode: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None
                        ) -> ChunkWindows:
    """Windows of every logged step. ``state_obs`` is the flattened history of each row, or, given ``encode``
    (histories (B, n_obs_steps, ...) -> (B, D)), its features: camera keys are never flattened, and without
    ``encode`` data with cameras is refused."""
    cameras = [key for key in obs_keys if is_image_key(key)]
    if cameras and encode is None:
        raise ConfigError(f"FQE on observations with cameras {cameras} needs an image encoder for the Q networks' "
                          f"input (images are not flattened into vectors); the policy has none")
    histories: dict[str, list[np.ndarray]] = {key: [] for key in obs_keys}
    obs_rows, chunks, rewards, discounts, next_rows, episode_ids, initial_rows = [], [], [], [], [], [], []
    offset = 0
    for index, episode in enumerate(episodes):
        length = len(episode)
        # frames 0..T: the T observations the actions were taken from, then the one after the last action
        frames = {}
        for key in obs_keys:
            dtype = np.uint8 if is_image_key(key) else np.float32   # images stay uint8, as policies take them
            values = np.asarray(episode.observations[key], dtype=dtype)
            last = values[-1] if episode.final_observation is None else np.asarray(episode.final_observation[key])
            frames[key] = np.concatenate([values, last[None].astype(dtype)])
        rows = np.clip(np.arange(length + 1)[:, None] + np.arange(-n_obs_steps + 1, 1)[None], 0, length)
        for key in obs_keys:
            histories[key].append(frames[key][rows])
        initial_rows.append(offset)
        padded = np.concatenate([episode.actions, np.repeat(episode.actions[-1:], chunk_steps, axis=0)])
        powers = gamma ** np.arange(chunk_steps)
        terminal_steps = np.flatnonzero(episode.terminals)
        for t in range(length):
            end = min(t + chunk_steps, length)
            later = terminal_steps[(terminal_steps >= t) & (terminal_steps < end)]
            done = len(later) > 0
            if done:
                end = int(later[0]) + 1
            steps = end - t
            rewards.append(float(np.dot(powers[:steps], episode.rewards[t:end])))
            discounts.append(0.0 if done else gamma ** steps)
            next_rows.append(offset + end)
            obs_rows.append(offset + t)
            chunks.append(padded[t: t + chunk_steps].reshape(-1))
            episode_ids.append(index)
        offset += length + 1
    stacked = {key: np.concatenate(parts) for key, parts in histories.items()}
    if encode is not None:
        state_obs = encode(stacked)
    else:
        state_obs = np.concatenate([stacked[key].reshape(len(stacked[key]), -1) for key in obs_keys], axis=1)
    all_rewards = np.concatenate([episode.rewards for episode in episodes])
    return ChunkWindows(histories=stacked, chunk_steps=chunk_steps, obs=state_obs[np.asarray(obs_rows)],
                        chunk=np.asarray(chunks, dtype=np.float32), reward=np.asarray(rewards, dtype=np.float32),
                        discount=np.asarray(discounts, dtype=np.float32), next_state=np.asarray(next_rows),
                        episode=np.asarray(episode_ids), initial_state=np.asarray(initial_rows),
                        state_obs=state_obs.astype(np.float32),
                        value_range=_value_range(episodes, all_rewards, gamma))


def _value_range(episodes: Sequence[Episode], rewards: np.ndarray, gamma: float) -> tuple[float, float]:
    """Bounds on any policy's value; clipping targets to them keeps FQE from drifting on unseen actions."""
    sparse_success = np.isin(rewards, (0.0, 1.0)).all() and all(
        bool(np.all(episode.terminals[episode.rewards > 0])) for episode in episodes)
    if sparse_success:  # a 0/1 reward that ends the episode: the value is a discounted success probability
        return 0.0, 1.0
    horizon = 1.0 / (1.0 - gamma) if gamma < 1.0 else float(max(len(episode) for episode in episodes))
    return min(0.0, float(rewards.min())) * horizon, max(0.0, float(rewards.max())) * horizon


# --- the policy's chunks at every logged history ------------------------------------------------------------------


def history_encoder(policy: Any, batch: int = 1024) -> Callable[[dict[str, np.ndarray]], np.ndarray] | None:
    """For a policy with cameras: histories (S, n_obs_steps, ...) -> (S, n_obs_steps * D) float32 features from
    the policy's own observation encoder (a residual's: its base's), frozen, in eval mode (no augmentation),
    computed once per logged history. None for a state-only policy (FQE flattens its state keys).

    Why the policy's own encoder: it is the representation the policy acts on, so Q sees what tells its chunks
    apart; no other encoder is available without training one. The training gate compares a residual with its
    base, which share the encoder, so both fits see identical inputs and stay paired exactly. Two image
    policies with different encoders are each fitted on their own features (same resample, init and minibatches)."""
    if not image_keys(policy.config.obs_keys):
        return None
    from robofinetune.rl.features import observation_encoder_of

    encoder = observation_encoder_of(policy)
    if encoder is None:
        raise ConfigError(f"policy kind '{getattr(policy, 'kind', type(policy).__name__)}' observes cameras "
                          f"{image_keys(policy.config.obs_keys)} but has no observation encoder; FQE cannot read "
                          f"its images")

    @torch.no_grad()
    def encode(histories: dict[str, np.ndarray]) -> np.ndarray:
        was_training = encoder.training
        encoder.eval()
        try:
            keys = list(encoder.shapes)
            count = len(histories[keys[0]])
            parts = [encoder({key: torch.as_tensor(histories[key][start: start + batch]) for key in keys})
                     .reshape(min(batch, count - start), -1).float().cpu().numpy()
                     for start in range(0, count, batch)]
        finally:
            encoder.train(was_training)
        return np.concatenate(parts).astype(np.float32)

    return encode


def policy_chunk_length(policy: Any, windows_histories: dict[str, np.ndarray]) -> int:
    probe = {key: value[:1] for key, value in windows_histories.items()}
    with torch.no_grad():
        return int(np.asarray(policy.act(probe)).shape[1])


def policy_chunks(policy: Any, histories: dict[str, np.ndarray], chunk_steps: int, samples: int, batch: int,
                  seed: int, progress: bool = False, name: str = "policy") -> np.ndarray:
    """(S, samples, chunk_steps * A): what ``policy.act`` executes from each history, ``samples`` draws each
    (one when the policy turns out to be deterministic).

    Drawn under a fixed torch seed (without disturbing the caller's generator), so two policies with the same
    weights get the same chunks: an exact tie, which the gate must and does reject.
    """
    keys = list(policy.config.obs_keys)
    count = len(histories[keys[0]])
    out = np.empty((count, samples, chunk_steps * policy.config.action_dim), dtype=np.float32)
    was_training = getattr(policy, "training", False)
    policy.eval()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    bar = tqdm(total=samples * count, desc=f"fqe {name}: its chunks", unit="state", leave=None,
               disable=not progress, dynamic_ncols=True)
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for sample in range(samples):  # act() is stateless; reset() is not called, so a running rollout is undisturbed
            for start in range(0, count, batch):
                obs = {key: histories[key][start: start + batch] for key in keys}
                chunk = np.asarray(policy.act(obs), dtype=np.float32)
                if chunk.ndim != 3 or chunk.shape[1] < chunk_steps:
                    raise CheckpointError(f"policy for task '{policy.config.task}': act() returned shape "
                                          f"{chunk.shape}, expected (batch, >= {chunk_steps}, action_dim)")
                out[start: start + len(chunk), sample] = chunk[:, :chunk_steps].reshape(len(chunk), -1)
                bar.update(len(chunk))
    bar.close()
    policy.train(was_training)
    if samples > 1 and np.array_equal(out[:, 0], out[:, 1]):
        return out[:, :1]  # a deterministic policy: more samples would only cost FQE time
    return out


# --- the Q ensemble ---------------------------------------------------------------------------------------------


class EnsembleQ(nn.Module):
    """H independent MLPs (LayerNorm + ReLU hidden layers) evaluated together with batched matmuls.

    Input (H, B, D) -> (H, B). Hidden layers are initialised like ``nn.Linear`` from the given generator, so
    head b of two FQE runs with the same seed starts from the same weights (the pairing the gate relies on).
    The output layer starts at zero: Q_0 = 0 is the value of never succeeding, so after k iterations Q_k is the
    value of succeeding within k chunks, rising monotonically to the answer instead of carrying a random offset.
    """

    def __init__(self, heads: int, input_dim: int, hidden_dim: int, depth: int, generator: torch.Generator) -> None:
        super().__init__()
        sizes = [input_dim] + [hidden_dim] * depth + [1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.norm_scales = nn.ParameterList()
        self.norm_shifts = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter((torch.rand(heads, fan_in, fan_out, generator=generator) * 2 - 1) * bound))
            self.biases.append(nn.Parameter((torch.rand(heads, 1, fan_out, generator=generator) * 2 - 1) * bound))
        with torch.no_grad():
            self.weights[-1].zero_()
            self.biases[-1].zero_()
        for _ in range(depth):
            self.norm_scales.append(nn.Parameter(torch.ones(heads, 1, hidden_dim)))
            self.norm_shifts.append(nn.Parameter(torch.zeros(heads, 1, hidden_dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, biases = list(self.weights), list(self.biases)
        scales, shifts = list(self.norm_scales), list(self.norm_shifts)
        for layer in range(len(scales)):
            x = torch.baddbmm(biases[layer], x, weights[layer])
            x = nn.functional.layer_norm(x, x.shape[-1:])
            x = torch.relu(torch.addcmul(shifts[layer], x, scales[layer]))
        return torch.baddbmm(biases[-1], x, weights[-1]).squeeze(-1)


def bootstrap_counts(episodes: int, heads: int, seed: int) -> np.ndarray:
    """(heads, episodes) multinomial resampling counts: the classic bootstrap over whole episodes."""
    rng = np.random.default_rng([seed, 7919])
    return rng.multinomial(episodes, np.full(episodes, 1.0 / episodes), size=heads)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class PolicyEstimate:
    """FQE value of one policy on one dataset: one value per bootstrap head, and diagnostics."""

    name: str
    head_values: np.ndarray               # (H,) J_b
    chunk_steps: int
    n_obs_steps: int
    transitions: int
    episodes: int
    action_gap: float                     # RMS distance of the policy's chunks from the logged ones (support)
    td_error: float                       # RMS Bellman residual in the last iteration, mean over heads
    seconds: float
    config_key: str = ""                  # estimates are comparable (paired) only when these match

    @property
    def value(self) -> float:
        return float(np.mean(self.head_values))

    def interval(self, confidence: float, method: str = "t") -> tuple[float, float]:
        return head_interval(self.head_values, confidence, method)

    def to_dict(self, confidence: float = 0.95, method: str = "t") -> dict[str, Any]:
        low, high = self.interval(confidence, method)
        return {"name": self.name, "value": self.value, "interval": [low, high],
                "head_values": [float(v) for v in self.head_values], "chunk_steps": self.chunk_steps,
                "n_obs_steps": self.n_obs_steps, "transitions": self.transitions, "episodes": self.episodes,
                "action_gap": self.action_gap, "td_error": self.td_error, "seconds": self.seconds,
                "config_key": self.config_key}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PolicyEstimate":
        return cls(name=data["name"], head_values=np.asarray(data["head_values"], dtype=np.float64),
                   chunk_steps=int(data["chunk_steps"]), n_obs_steps=int(data["n_obs_steps"]),
                   transitions=int(data["transitions"]), episodes=int(data["episodes"]),
                   action_gap=float(data["action_gap"]), td_error=float(data["td_error"]),
                   seconds=float(data["seconds"]), config_key=data.get("config_key", ""))


def head_interval(values: np.ndarray, confidence: float, method: str = "t") -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    if method == "percentile":
        low, high = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
        return float(low), float(high)
    centre, spread = float(values.mean()), float(values.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, df=len(values) - 1)) * spread
    return centre - half, centre + half


def estimate_key(config: GateConfig, episodes: Sequence[Episode]) -> str:
    """Estimates with equal keys were fitted identically on the same data, so they are paired."""
    fitting = {k: v for k, v in config.to_dict().items() if k not in ("margin", "confidence", "interval", "device",
                                                                       "policy_batch")}
    digest = hashlib.sha256(json.dumps(fitting, sort_keys=True).encode())
    for episode in episodes:  # what the fit depends on besides observations: lengths, actions, rewards, ends
        for array in (episode.actions, episode.rewards, episode.terminals):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def bellman_targets(q: EnsembleQ, state_obs: torch.Tensor, state_chunks: torch.Tensor, reward: torch.Tensor,
                    discount: torch.Tensor, next_state: torch.Tensor, value_range: tuple[float, float],
                    block: int = 4096) -> torch.Tensor:
    """(H, N) targets R + gamma^n * V(h') for every window, V(h') = mean_m Q(h', pi_m(h')) under the frozen
    current heads: one application of the policy's Bellman operator (the "fitted" in FQE).

    V is computed once per logged history (S rows), not per window, and in blocks to bound memory.
    """
    heads = len(q.weights[0])
    count, samples = state_chunks.shape[:2]
    values = torch.empty(heads, count, device=state_obs.device)
    for start in range(0, count, block):
        obs = state_obs[start: start + block]
        rows = len(obs)
        inputs = torch.cat([obs.unsqueeze(1).expand(-1, samples, -1), state_chunks[start: start + block]], dim=-1)
        inputs = inputs.reshape(1, rows * samples, -1).expand(heads, -1, -1)
        values[:, start: start + rows] = q(inputs).reshape(heads, rows, samples).mean(dim=2)
    return (reward[None] + discount[None] * values[:, next_state]).clamp(*value_range)


def fqe_update(q: EnsembleQ, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """One gradient step of every head towards its targets: inputs (H, B, D) = [history, logged chunk], targets
    (H, B). Returns the mean squared residual per head."""
    loss = ((q(inputs) - targets) ** 2).mean(dim=1).sum()  # heads are independent: sum their losses
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()) / len(targets)


def estimate_policy_value(policy: Any, episodes: Sequence[Episode], config: GateConfig | None = None,
                          name: str = "policy", source: str = "logged data", progress: bool = False) -> PolicyEstimate:
    """FQE of ``policy`` on ``episodes``: one value per bootstrap head (see the module docstring)."""
    config = config or GateConfig()
    config.check()
    check_logged_data(episodes, [policy], source)
    start = time.time()
    device = _resolve_device(config.device)
    policy_config = policy.config
    obs_keys, n_obs_steps = list(policy_config.obs_keys), int(policy_config.n_obs_steps)

    encode = history_encoder(policy, config.policy_batch)
    probe = build_chunk_windows(episodes[:1], obs_keys, n_obs_steps, 1, config.gamma, encode)
    act_length = policy_chunk_length(policy, probe.histories)
    chunk_steps = config.chunk_steps or act_length
    if chunk_steps > act_length:
        raise ConfigError(f"gate config field 'chunk_steps' is {chunk_steps} but the policy executes chunks of "
                          f"{act_length} actions")
    windows = build_chunk_windows(episodes, obs_keys, n_obs_steps, chunk_steps, config.gamma, encode)
    chunks = policy_chunks(policy, windows.histories, chunk_steps, config.action_samples, config.policy_batch,
                           seed=config.seed + 1, progress=progress, name=name)
    logged_rows = np.concatenate([np.arange(start_row, start_row + length) for start_row, length in
                                  zip(windows.initial_state, [len(e) for e in episodes])])
    action_gap = float(np.sqrt(np.mean((chunks[logged_rows, 0] - windows.chunk) ** 2)))

    # standardise the observation features on the logged histories (constant features are only centred)
    mean = windows.state_obs.mean(axis=0)
    std = windows.state_obs.std(axis=0)
    std = np.where(std < 1e-6, 1.0, std)

    def tensor(array: np.ndarray, dtype=torch.float32) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype, device=device)

    state_obs = tensor((windows.state_obs - mean) / std)
    state_chunks = tensor(chunks)
    obs = tensor((windows.obs - mean) / std)
    logged_chunk = tensor(windows.chunk)
    reward, discount = tensor(windows.reward), tensor(windows.discount)
    next_state = tensor(windows.next_state, torch.long)

    counts = bootstrap_counts(len(episodes), config.heads, config.seed)
    # each head draws windows uniformly from its resample: the pool lists each window once per copy of its episode
    window_counts = counts[:, windows.episode]
    pools = [np.repeat(np.arange(len(windows)), row) for row in window_counts]
    pool_sizes = tensor(np.array([len(pool) for pool in pools]), torch.long)
    pool_table = tensor(np.stack([np.resize(pool, max(len(p) for p in pools)) for pool in pools]), torch.long)

    generator = torch.Generator().manual_seed(config.seed)
    inputs_all = torch.cat([obs, logged_chunk], dim=-1)
    q = EnsembleQ(config.heads, inputs_all.shape[1], config.hidden_dim, config.depth, generator).to(device)
    optimizer = torch.optim.Adam(q.parameters(), lr=config.learning_rate)
    sampler = torch.Generator(device=device).manual_seed(config.seed + 2)
    heads, size = config.heads, config.batch_size
    iterations = config.iterations or max(20, math.ceil(max(len(e) for e in episodes) / chunk_steps) + 10)
    iterator = tqdm(range(iterations), desc=f"fqe {name}", unit="it", leave=None, disable=not progress,
                    dynamic_ncols=True)
    residual = float("nan")
    for _ in iterator:
        targets = bellman_targets(q, state_obs, state_chunks, reward, discount, next_state, windows.value_range)
        losses = []
        for _ in range(config.steps_per_iteration):
            position = (torch.rand(heads, size, generator=sampler, device=device) * pool_sizes[:, None]).long()
            index = torch.gather(pool_table, 1, position)
            losses.append(fqe_update(q, optimizer, inputs_all[index], torch.gather(targets, 1, index)))
        residual = math.sqrt(float(np.mean(losses[-max(1, len(losses) // 4):])))

    with torch.no_grad():
        rows = tensor(windows.initial_state, torch.long)
        samples = state_chunks.shape[1]
        first_obs = state_obs[rows].unsqueeze(1).expand(-1, samples, -1)
        inputs = torch.cat([first_obs, state_chunks[rows]], dim=-1).reshape(1, len(rows) * samples, -1)
        initial_values = q(inputs.expand(heads, -1, -1)).reshape(heads, len(episodes), samples).mean(dim=2)
        initial_values = initial_values.clamp(*windows.value_range).cpu().numpy().astype(np.float64)
    head_values = (initial_values * counts).sum(axis=1) / counts.sum(axis=1)
    return PolicyEstimate(name=name, head_values=head_values, chunk_steps=chunk_steps, n_obs_steps=n_obs_steps,
                          transitions=len(windows), episodes=len(episodes), action_gap=action_gap, td_error=residual,
                          seconds=time.time() - start, config_key=estimate_key(config, episodes))


# --- the decision -------------------------------------------------------------------------------------------------


@dataclass
class GateResult:
    """One gate decision; ``save(folder)`` writes it as ``gate.json`` (and appends to ``gate_history.jsonl``)."""

    decision: str
    reason: str
    candidate: str
    incumbent: str
    data: str
    candidate_value: float
    candidate_interval: tuple[float, float]
    incumbent_value: float
    incumbent_interval: tuple[float, float]
    gain: float
    gain_interval: tuple[float, float]
    margin: float
    confidence: float
    estimator: str = ESTIMATOR
    episodes: int = 0
    candidate_fingerprint: str | None = None
    incumbent_fingerprint: str | None = None
    candidate_heads: list[float] = field(default_factory=list)
    incumbent_heads: list[float] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    timestamp: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @property
    def promoted(self) -> bool:
        return self.decision == PROMOTE

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("candidate_interval", "incumbent_interval", "gain_interval"):
            data[key] = [float(v) for v in data[key]]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GateResult":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        for key in ("candidate_interval", "incumbent_interval", "gain_interval"):
            values[key] = tuple(values[key])
        return cls(**values)

    def summary(self) -> str:
        percent = f"{self.confidence:.0%}"

        def line(label: str, value: float, interval: tuple[float, float]) -> str:
            return f"  {label:<10} {value:+.4f}   {percent} interval [{interval[0]:+.4f}, {interval[1]:+.4f}]"

        return "\n".join([
            f"off-policy estimate ({self.estimator}, {self.episodes} logged episodes, discounted success):",
            line("candidate", self.candidate_value, self.candidate_interval) + f"   {self.candidate}",
            line("incumbent", self.incumbent_value, self.incumbent_interval) + f"   {self.incumbent}",
            line("gain", self.gain, self.gain_interval) + f"   margin {self.margin:+.4f}",
            f"{self.decision}: {self.reason}",
        ])

    def save(self, folder: str | Path, plot: bool = True) -> Path:
        """Write ``<folder>/gate.json`` atomically, append it to ``gate_history.jsonl``, and draw ``gate.png``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.candidate_fingerprint is None and (folder / "policy.json").exists():
            self.candidate_fingerprint = policy_fingerprint(folder)
        text = json.dumps(self.to_dict(), indent=2)
        path = folder / GATE_FILE
        temporary = path.with_name(f".{GATE_FILE}.tmp")
        temporary.write_text(text)
        os.replace(temporary, path)
        with open(folder / GATE_HISTORY_FILE, "a") as history:
            history.write(json.dumps(self.to_dict()) + "\n")
        if plot:
            plot_gate(self, folder / GATE_PLOT_FILE)
        return path


def decide(candidate: PolicyEstimate, incumbent: PolicyEstimate, margin: float = 0.0, confidence: float = 0.95,
           method: str = "t") -> tuple[str, str, float, tuple[float, float]]:
    """(decision, reason, gain, gain interval) from two paired estimates (same data, same config and seed)."""
    if candidate.config_key != incumbent.config_key or len(candidate.head_values) != len(incumbent.head_values):
        raise ConfigError("the two estimates were made with different data or gate configs; they are not paired")
    gains = candidate.head_values - incumbent.head_values
    gain = float(gains.mean())
    low, high = head_interval(gains, confidence, method)
    percent = f"{confidence:.0%}"
    if low > margin:
        return PROMOTE, (f"the gain's {percent} interval [{low:+.4f}, {high:+.4f}] lies above the margin "
                         f"{margin:+.4f}: the logged data shows a confident gain"), gain, (low, high)
    if gain <= margin:
        reason = f"the estimated gain {gain:+.4f} does not exceed the margin {margin:+.4f}"
    else:
        reason = (f"the estimated gain {gain:+.4f} exceeds the margin {margin:+.4f}, but its {percent} interval "
                  f"[{low:+.4f}, {high:+.4f}] reaches below it: not a confident gain (more logged data where the "
                  f"two policies differ would narrow it)")
    return REJECT, reason, gain, (low, high)


def mean_comparison(candidate: PolicyEstimate, incumbent: PolicyEstimate) -> str:
    """The baseline rule of RL-100 / Uni-O4: promote whenever the candidate's mean estimate is higher."""
    return PROMOTE if candidate.value > incumbent.value else REJECT


def make_result(candidate: PolicyEstimate, incumbent: PolicyEstimate, config: GateConfig, data: str,
                candidate_fingerprint: str | None = None, incumbent_fingerprint: str | None = None) -> GateResult:
    decision, reason, gain, gain_interval = decide(candidate, incumbent, config.margin, config.confidence,
                                                   config.interval)
    diagnostics = {
        "chunk_steps": {"candidate": candidate.chunk_steps, "incumbent": incumbent.chunk_steps},
        "action_gap": {"candidate": candidate.action_gap, "incumbent": incumbent.action_gap},
        "td_error": {"candidate": candidate.td_error, "incumbent": incumbent.td_error},
        "transitions": candidate.transitions, "seconds": candidate.seconds + incumbent.seconds,
        "mean_comparison": mean_comparison(candidate, incumbent),
    }
    if candidate.episodes < 20:
        diagnostics["warning"] = f"only {candidate.episodes} logged episodes: the interval is rough"
    return GateResult(decision=decision, reason=reason, candidate=candidate.name, incumbent=incumbent.name, data=data,
                      candidate_value=candidate.value,
                      candidate_interval=candidate.interval(config.confidence, config.interval),
                      incumbent_value=incumbent.value,
                      incumbent_interval=incumbent.interval(config.confidence, config.interval),
                      gain=gain, gain_interval=gain_interval, margin=config.margin, confidence=config.confidence,
                      episodes=candidate.episodes, candidate_fingerprint=candidate_fingerprint,
                      incumbent_fingerprint=incumbent_fingerprint,
                      candidate_heads=[float(v) for v in candidate.head_values],
                      incumbent_heads=[float(v) for v in incumbent.head_values],
                      diagnostics=diagnostics, config=config.to_dict())


def _as_policy(policy: Any) -> tuple[Any, str, str | None]:
    """(policy, display name, fingerprint) from a Policy or a checkpoint folder."""
    if isinstance(policy, (str, os.PathLike)):
        from robofinetune.policies import load_policy

        return load_policy(policy, device="cpu"), str(policy), policy_fingerprint(policy)
    return policy, getattr(policy, "name", type(policy).__name__), None


def gate_policies(candidate: Any, incumbent: Any, episodes: Sequence[Episode], config: GateConfig | None = None,
                  data: str = "in-memory episodes", candidate_name: str | None = None,
                  incumbent_name: str | None = None, incumbent_estimate: PolicyEstimate | None = None,
                  progress: bool = False) -> GateResult:
    """Estimate both policies on ``episodes`` and decide PROMOTE / REJECT. Policies or checkpoint folders.

    ``incumbent_estimate`` (from :func:`estimate_policy_value` with the same episodes and config) skips
    re-fitting the incumbent, so a training loop gating many checkpoints pays for the incumbent once.
    """
    config = config or GateConfig()
    config.check()
    candidate_policy, default_candidate, candidate_fingerprint = _as_policy(candidate)
    incumbent_policy, default_incumbent, incumbent_fingerprint = _as_policy(incumbent)
    check_logged_data(episodes, [candidate_policy, incumbent_policy], data)
    candidate_estimate = estimate_policy_value(candidate_policy, episodes, config, candidate_name or default_candidate,
                                               data, progress)
    if incumbent_estimate is None:
        incumbent_estimate = estimate_policy_value(incumbent_policy, episodes, config,
                                                   incumbent_name or default_incumbent, data, progress)
    return make_result(candidate_estimate, incumbent_estimate, config, data, candidate_fingerprint,
                       incumbent_fingerprint)


class CheckpointGate:
    """For training loops: a checkpoint becomes the new "best" only if it passes the gate against the current best.

        gate = CheckpointGate(logged_episodes, base_policy, GateConfig(), data=dataset_path)
        result = gate.consider(policy, name=f"step {step}")
        if result.promoted: save_policy(policy, run.path / "best"); result.save(run.path / "best")

    The incumbent's estimate is fitted once and reused; after a promotion the candidate's estimate becomes the
    incumbent's, so the policy object itself need not be copied.
    """

    def __init__(self, episodes: Sequence[Episode], incumbent: Any, config: GateConfig | None = None,
                 data: str = "in-memory episodes", incumbent_name: str = "incumbent", progress: bool = False) -> None:
        self.episodes = list(episodes)
        self.config = config or GateConfig()
        self.data = data
        self.progress = progress
        policy, name, fingerprint = _as_policy(incumbent)
        self.incumbent_name = name if isinstance(incumbent, (str, os.PathLike)) else incumbent_name
        self.incumbent_fingerprint = fingerprint
        self.incumbent_estimate = estimate_policy_value(policy, self.episodes, self.config, self.incumbent_name, data,
                                                        progress=progress)
        self.history: list[GateResult] = []

    def consider(self, candidate: Any, name: str = "candidate") -> GateResult:
        estimate = estimate_policy_value(candidate, self.episodes, self.config, name, self.data,
                                         progress=self.progress)
        result = make_result(estimate, self.incumbent_estimate, self.config, self.data,
                             incumbent_fingerprint=self.incumbent_fingerprint)
        self.history.append(result)
        if result.promoted:
            self.incumbent_estimate, self.incumbent_name, self.incumbent_fingerprint = estimate, name, None
        return result

    def promoted_to(self, folder: str | Path) -> None:
        """Tell the gate that the last promoted candidate now lives in ``folder`` (fingerprints later reports)."""
        self.incumbent_fingerprint = policy_fingerprint(folder)


class TrainingGate:
    """``--gate`` for training loops: a periodic checkpoint becomes the run's ``best/`` policy only when the OPE gate
    promotes it over the current best (at first the frozen base), on a fixed logged dataset.

    ``best/`` then carries the PROMOTE record tying its weights to the base's, so ``deploy`` accepts it against
    that base as incumbent. On resume, the current ``best/`` (if any) is the incumbent again.
    """

    def __init__(self, run: Any, base_path: str | Path, data: str | Path, task: str, obs_keys: Sequence[str],
                 config: GateConfig, progress: bool = False) -> None:
        from robofinetune.data.io import load_dataset

        self.run = run
        self.best = Path(run.path) / "best"
        episodes, _ = load_dataset(data, obs_keys=list(obs_keys), task=task)
        incumbent = self.best if (self.best / "policy.json").is_file() else Path(base_path)
        print(f"gate: fitting FQE of the incumbent ({incumbent}) on {data} ({len(episodes)} episodes)", flush=True)
        self.gate = CheckpointGate(episodes, str(incumbent), config, data=str(data), progress=progress)
        self.promotions = 0

    def consider(self, policy: Any, env_steps: int, metadata: dict[str, Any] | None = None) -> GateResult:
        from robofinetune.policies import save_policy

        result = self.gate.consider(policy, name=f"{self.run.path.name} at {env_steps} env steps")
        low, high = result.gain_interval
        self.run.log(env_steps, **{"gate/gain": result.gain, "gate/gain_low": low, "gate/gain_high": high,
                                   "gate/promoted": float(result.promoted)})
        if result.promoted:
            # save_policy replaces the folder; the earlier promotions are the chain back to the base, keep them
            history = self.best / GATE_HISTORY_FILE
            earlier = history.read_text() if history.exists() else ""
            save_policy(policy, self.best, {**(metadata or {}), "env_steps": env_steps, "gated": True})
            if earlier:
                history.write_text(earlier)
            result.save(self.best, plot=False)
            self.gate.promoted_to(self.best)
            self.promotions += 1
        print(f"gate at {env_steps} env steps: {result.decision}, gain {result.gain:+.3f} [{low:+.3f}, {high:+.3f}]"
              + (f" -> {self.best}" if result.promoted else ""), flush=True)
        return result


def training_gate(config: Any, run: Any, base_path: str | Path, dataset: str | Path,
                  obs_keys: Sequence[str]) -> TrainingGate | None:
    """The gate a training config asks for through its ``gate*`` fields (residual and ogpo share them), or None
    without ``--gate``. ``gate_data`` defaults to ``dataset``, the run's demos."""
    if not config.gate:
        return None
    return TrainingGate(run, base_path, config.gate_data or dataset, config.task, obs_keys,
                        GateConfig(margin=config.gate_margin, confidence=config.gate_confidence,
                                   iterations=config.gate_iterations,
                                   steps_per_iteration=config.gate_steps_per_iteration, seed=config.seed),
                        progress=bool(getattr(config, "progress", False)))


# --- what deploy checks -------------------------------------------------------------------------------------------


def policy_fingerprint(folder: str | Path) -> str:
    """sha256 of a checkpoint's weights and config files (``*.safetensors``, ``policy.json``, sub-policies too),
    so a gate record stays tied to exactly the weights it judged, wherever the folder is copied."""
    folder = Path(folder)
    if not (folder / "policy.json").is_file():
        raise CheckpointError(f"{folder}: not a policy checkpoint (missing policy.json)")
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                   p.relative_to(folder).parts) and (p.suffix == ".safetensors" or p.name == "policy.json"))
    for path in files:
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def gate_records(candidate_path: str | Path) -> list[GateResult]:
    """Every gate result stored with a candidate: ``gate.json`` and the lines of ``gate_history.jsonl``."""
    folder = Path(candidate_path)
    records = []
    texts = []
    if (folder / GATE_HISTORY_FILE).exists():
        texts += [line for line in (folder / GATE_HISTORY_FILE).read_text().splitlines() if line.strip()]
    if (folder / GATE_FILE).exists():
        texts.append((folder / GATE_FILE).read_text())
    for text in texts:
        try:
            records.append(GateResult.from_dict(json.loads(text)))
        except (json.JSONDecodeError, TypeError, KeyError):
            continue  # a damaged record proves nothing; it simply does not count as a pass
    return records


def gate_check(candidate_path: str | Path, incumbent_path: str | Path) -> tuple[bool, str]:
    """(passed, explanation): has exactly this candidate passed a gate against exactly this incumbent?"""
    candidate_fp = policy_fingerprint(candidate_path)
    incumbent_fp = policy_fingerprint(incumbent_path)
    records = gate_records(candidate_path)
    if not records:
        return False, f"{candidate_path}: no gate record ({GATE_FILE}); run `robofinetune gate` first"
    chain = _promotion_chain(records, candidate_fp, incumbent_fp)   # a direct PROMOTE is a chain of one
    if chain is not None and len(chain) == 1:
        return True, f"{candidate_path}: passed the gate against {incumbent_path} at {chain[0].timestamp}"
    if chain is not None:
        return True, (f"{candidate_path}: passed the gate against {incumbent_path} through {len(chain)} successive "
                      f"promotions (last at {chain[0].timestamp})")
    matching = [r for r in records if r.candidate_fingerprint == candidate_fp and r.incumbent_fingerprint == incumbent_fp]
    if not matching:
        if not any(r.candidate_fingerprint == candidate_fp for r in records):
            return False, f"{candidate_path}: its weights changed since it was gated"
        return False, f"{candidate_path}: gated, but never against the weights now in {incumbent_path}"
    return False, f"{candidate_path}: the gate against {incumbent_path} said REJECT ({matching[-1].reason})"


def _promotion_chain(records: list[GateResult], candidate_fp: str, incumbent_fp: str) -> list[GateResult] | None:
    """PROMOTE records linking candidate -> ... -> incumbent (a training run's best beat the previous best, which
    beat the base), or None. Each link is a confident gain of at least the margin, so the chain is one too."""
    edges: dict[str, list[GateResult]] = {}
    for record in records:
        if record.promoted and record.candidate_fingerprint and record.incumbent_fingerprint:
            edges.setdefault(record.candidate_fingerprint, []).append(record)
    frontier, seen = [(candidate_fp, [])], {candidate_fp}
    while frontier:
        node, path = frontier.pop()
        for record in edges.get(node, []):
            if record.incumbent_fingerprint == incumbent_fp:
                return path + [record]
            if record.incumbent_fingerprint not in seen:
                seen.add(record.incumbent_fingerprint)
                frontier.append((record.incumbent_fingerprint, path + [record]))
    return None


def gate_passed(candidate_path: str | Path, incumbent_path: str | Path) -> bool:
    """True when a PROMOTE record ties the candidate's current weights to the incumbent's current weights."""
    return gate_check(candidate_path, incumbent_path)[0]


# --- plot ---------------------------------------------------------------------------------------------------------


def plot_gate(result: GateResult, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    figure, (values_axis, gain_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for row, (label, heads, value, interval) in enumerate([
            ("incumbent", result.incumbent_heads, result.incumbent_value, result.incumbent_interval),
            ("candidate", result.candidate_heads, result.candidate_value, result.candidate_interval)]):
        jitter = np.random.default_rng(row).uniform(-0.12, 0.12, len(heads))
        values_axis.scatter(heads, row + jitter, s=12, alpha=0.6)
        values_axis.errorbar([value], [row], xerr=[[value - interval[0]], [interval[1] - value]], fmt="o",
                             color="black", capsize=4)
    values_axis.set_yticks([0, 1], ["incumbent", "candidate"])
    values_axis.set_xlabel("estimated value (discounted success)")
    values_axis.set_title("per-head FQE values and intervals")
    gains = np.asarray(result.candidate_heads) - np.asarray(result.incumbent_heads)
    gain_axis.hist(gains, bins=max(5, len(gains) // 2), alpha=0.6, color="tab:blue")
    gain_axis.axvspan(*result.gain_interval, color="tab:green" if result.promoted else "tab:red", alpha=0.15,
                      label=f"{result.confidence:.0%} interval")
    gain_axis.axvline(result.gain, color="black", label=f"gain {result.gain:+.3f}")
    gain_axis.axvline(result.margin, color="tab:red", linestyle="--", label=f"margin {result.margin:+.3f}")
    gain_axis.set_xlabel("J(candidate) - J(incumbent), per bootstrap head")
    gain_axis.set_title(result.decision)
    gain_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
