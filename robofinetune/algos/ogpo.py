"""Full-chain PPO fine-tuning of a diffusion or flow policy: OGPO (arXiv 2605.03065), and DPPO (arXiv
2409.00588) as its on-policy mode (``--mode=dppo``).

The policy acts in action chunks, so RL runs at the chunk level (a semi-MDP):

    state s      the observation history the policy conditions on (n_obs_steps frames), flattened
    action a0    the chain's final element: a normalised chunk (horizon, A). The env executes the first
                 n_action_steps of unnormalise(clip(a0)); the critic sees exactly that executed part,
                 clip(a0[:n_action_steps]) in normalised units.
    transition   s -> s' after the chunk's k env steps (k = n_action_steps unless the episode ends first),
                 reward R = sum_i gamma^i r_i over those steps, bootstrap discount gamma^k (0 on success).

The denoising chain a_K -> ... -> a_0 is a K-step MDP inside every env step; ``chain_log_prob`` gives each
transition's Gaussian log-density: for diffusion a DDIM step plus Gaussian noise of std >= chain_min_std (DPPO's
stochastic DDIM; eta = ``chain_eta``, 0 by default so that the deterministic DDIM that act() deploys is the
mean path of the trained chain), for flow a noise-injected Euler step (as in ReinFlow and OGPO).

OGPO (mode "ogpo")
    critic    Q ensemble (shared ``robofinetune.rl.CriticEnsemble``) trained by TD on the replay buffer
              (shared ``ReplayBuffer``: demo chunks and online chunks, RLPD symmetric sampling):
                  y = R + gamma^k * mean over heads and over M next chunks a' ~ pi(s') of Q'_h(s', a')
              (ensemble mean, Q-variance reduction by averaging over M sampled next actions). The a' of each
              replay row are kept (``NextActionCache``) and re-sampled round-robin as the policy moves.
    actor     every ``actor_update_every`` env steps: for B replay states, sample G chains each from the
              current ("old", frozen for this round) policy; terminal reward Q_h(s, a0) per head;
                  A_h = Q_h - mean over the group of Q_h            (group baseline, no std normalisation)
                  A   = min_h A_h if all A_h > 0, max_h A_h if all A_h < 0, else 0   (two-sided conservative)
              then a few epochs of PPO's clipped ratio on every chain transition (same A for all K steps)
              + bc_coef * the policy's own BC loss on a buffer of successful episodes only.
              The ratio is DPPO's: exp of the per-element mean log-density change over the executed steps
              (``ratio_log_prob``), not of the whole chunk's density, which one optimiser step moves past
              any clip on can (``OGPOConfig.ratio_element_mean``).
DPPO (mode "dppo")
    on-policy: collect ``dppo.steps_per_iteration`` env steps with the stochastic chain, a value critic
    V(s) and GAE over chunk transitions (environment returns, no Q), then PPO epochs over the last
    ``dppo.ft_denoising_steps`` chain transitions with advantage * denoising_discount^(steps to the end).

The update steps are :func:`critic_update`, :func:`ogpo_actor_update` and :func:`dppo_update`. Sizes
(group 8 x 32 states, K = 10, critics 10 x 2 x 256) are chosen for a 2-core CPU; see ``OGPOConfig``.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from robofinetune.data.chunks import ActionChunkWindows
from robofinetune.data.episode import Episode
from robofinetune.errors import CheckpointError, ConfigError
from robofinetune.policies import GenerativePolicy, save_policy
from robofinetune.rl import (CriticEnsemble, ReplayBuffer, RunLoop, TransitionBatch, VectorRollout,
                             flatten_observation, mlp, polyak_update, sample_symmetric, symmetric_slots)
from robofinetune.rl.learner import CheckpointedLearner
from robofinetune.rl.setup import base_path, load_base_policy, load_demo_episodes
from robofinetune.runs import Run


@dataclass
class DPPOSettings:
    """Fields of the on-policy mode (``--mode=dppo``); set them as ``--dppo.<field>=value``.

    DPPO's Can preset is 50 envs x 300 steps (15k chunks) per iteration, 10 epochs, clip 0.01, gamma 0.999,
    GAE 0.95, denoising discount 0.99, std floor 0.1. Here the iteration is smaller (2 envs on a CPU), so an
    iteration is ``steps_per_iteration`` env steps and the other settings follow DPPO.
    """

    steps_per_iteration: int = 4_000   # env steps collected (all envs) before each PPO update
    epochs: int = 5
    minibatch: int = 256               # chunk transitions per gradient step
    actor_lr: float = 3e-5
    clip_ratio: float = 0.01
    denoising_discount: float = 0.99
    ft_denoising_steps: int = 0        # PPO over the last this-many chain transitions (0 = all K)
    gae_lambda: float = 0.95
    value_lr: float = 1e-3
    value_hidden_dim: int = 256
    value_depth: int = 2
    value_coef: float = 0.5
    normalize_advantage: bool = True
    bc_coef: float = 0.0               # DPPO uses no BC term; >0 adds the success-buffer BC loss


@dataclass
class OGPOConfig:
    task: str = "can"
    mode: str = "ogpo"                 # ogpo | dppo
    base: str = ""                     # base policy folder (diffusion or flow); default policies/<task>/weak_diffusion
    dataset: str = ""                  # demos (critic's offline half and the BC buffer); default datasets/<task>_scripted_200.hdf5
    num_demos: int = 0                 # use the first N successful demos (0 = all; -1 = none)
    seed: int = 0
    total_env_steps: int = 300_000
    num_envs: int = 2                  # env processes; critic updates overlap their stepping
    # --- the denoising chain -------------------------------------------------------------------------------
    # K = 10 (OGPO's flow preset): every actor update costs B*G*K denoiser passes, so K is the first knob on
    # a CPU. act() (eval, deploy) is switched to the same K, so the trained chain is the deployed chain.
    chain_steps: int = 0               # 0 = the base's inference_steps
    chain_std: float = 0.0             # per-transition std floor; 0 = the checkpoint's chain_min_std
    # Diffusion: DDIM eta of the trained chain. act() (eval, deploy) runs DDIM with eta 0, so with eta 0 every
    # trained transition is N(deployed DDIM step, chain_std^2) and the deployed sampler is exactly the mean path
    # of the trained chain (as for flow). With DPPO's eta 1 the deployed sampler drifts from what PPO shaped.
    chain_eta: float = 0.0
    # --- OGPO actor: PPO over the whole chain, Q(s, a0) as terminal reward ----------------------------------
    # OGPO's Square preset: group 32, clip 0.01, lr 4.5e-5. Group 8 x 32 states = 256 chains per round keeps a
    # round at ~0.1-0.5 s of one core; the group mean of 8 samples is a baseline of adequate variance here
    # because the conservative advantage zeroes the uncertain ones anyway.
    group_size: int = 8
    actor_states: int = 32             # replay states per actor round
    actor_update_every: int = 100      # env steps between actor rounds
    actor_epochs: int = 4              # passes over each round's chains (the ratio moves off 1 after the first)
    actor_minibatch: int = 128         # chains per gradient step
    actor_lr: float = 4.5e-5
    clip_ratio: float = 0.01
    # The PPO ratio of a chain transition as DPPO computes it: per-element log-densities clamped to [-5, 2],
    # over the executed steps of the chunk only, averaged over elements (a geometric mean per element). With
    # the summed density of the whole chunk (8 x 7 elements on can, std 0.1) one Adam step moved the ratio
    # far past any clip (measured on can: mean ratio 1.7-3.1, 73% of transitions clipped, approx KL 0.9-2.4).
    ratio_element_mean: bool = True
    denoising_discount: float = 1.0    # terminal reward only: every chain transition gets the same advantage
    # PPO over the last this-many chain transitions only (0 = all K, OGPO's whole chain). DPPO's
    # ft_denoising_steps: the first DDIM steps of a diffusion chain map a small change of the predicted noise
    # to a large change of the step's mean (x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) with abar near 0).
    ppo_last_transitions: int = 0
    conservative_advantage: bool = True
    # One batch-wide scale on the advantages of a round: divide by their root mean square over the chains the
    # conservative rule left active. Not GRPO's per-group std (a group whose chains the critic barely tells
    # apart keeps a small weight next to one it separates well); it only makes PPO's term independent of Q's
    # scale. With the sparse 0/1 reward the active advantages on can have an RMS of ~0.02 (4% of chains active),
    # which left PPO's gradient 30-80x smaller than the BC term's (measured at 6k env steps from the weak
    # diffusion / flow bases: pg_grad_norm x adv_rms vs bc_grad_norm in metrics.jsonl): the run was BC alone.
    advantage_rms_scale: bool = True
    pg_coef: float = 1.0               # weight of the PPO term (0 = the BC-only ablation)
    max_log_ratio: float = 5.0         # log-ratio clamp before exp (the ratio is clipped anyway)
    max_grad_norm: float = 1.0
    bc_coef: float = 0.1               # weight of the BC loss on the success-only buffer
    bc_batch_size: int = 128
    success_capacity: int = 100_000    # BC windows kept (one per env step of a successful episode)
    bc_from_demos: bool = True         # seed the success buffer with the (successful) demos
    # Also admit the run's own successful episodes. Their actions are the stochastic chain's, noisy: on can
    # their gripper commands averaged |g| 0.66 where every demo's is +-1 (see README, OGPO on can).
    bc_online_successes: bool = True
    warmup_steps: int = 2_000          # env steps of critic-only learning before the first actor round
    # --- critic ensemble (shared robofinetune.rl.CriticEnsemble) --------------------------------------------
    num_critics: int = 10
    critic_hidden_dim: int = 256
    critic_depth: int = 2
    critic_lr: float = 3e-4
    layer_norm: bool = True
    gamma: float = 0.99                # per env step; a chunk of k steps discounts by gamma^k
    n_step: int = 1                    # in chunk transitions (one already spans n_action_steps env steps)
    tau: float = 0.005
    critic_updates_per_step: float = 0.5   # per env step, i.e. n_action_steps * this per chunk transition
    critic_batch_size: int = 256
    # Q-variance reduction: the TD target is averaged over this many a' ~ pi(s'). Each costs critic_batch_size
    # more K-step chains per TD update, the largest CPU cost of OGPO, hence 2.
    next_action_samples: int = 2
    # Keep those M chunks per replay row (sampled at the row's s') instead of sampling them inside every TD
    # update, and re-sample ``next_action_refresh`` rows per env step, oldest first, so they follow the
    # policy. A TD update then costs critic passes only, and the critic gets more of them per env step.
    next_action_cache: bool = True
    next_action_refresh: float = 32.0
    offline_fraction: float = 0.5      # share of demo chunks in critic batches and actor states
    buffer_capacity: int = 0           # online chunk transitions kept (0 = all)
    clip_target: bool = True           # sparse 0/1 reward with success terminating: Q lies in [0, 1]
    # --- on-policy mode ---------------------------------------------------------------------------------------
    dppo: DPPOSettings = field(default_factory=DPPOSettings)
    # --- evaluation, logging, checkpoints -------------------------------------------------------------------
    eval_every: int = 10_000
    eval_episodes: int = 50
    final_eval_episodes: int = 100
    eval_base: bool = True             # evaluate the base before training (the curve's first point)
    eval_envs: int = 2
    eval_seed: int = 100_000
    checkpoint_every: int = 5_000
    log_every: int = 1_000
    # --gate: at each periodic evaluation and at the end, the policy becomes <run>/best only if the OPE gate
    # (FQE on gate_data, default the demos) promotes it over the current best, at first the base
    gate: bool = False
    gate_data: str = ""
    gate_margin: float = 0.0
    gate_confidence: float = 0.95
    gate_iterations: int = 0
    gate_steps_per_iteration: int = 50
    torch_threads: int = 1
    progress: bool = True


# --- the chunk-level state and action -------------------------------------------------------------------------

def unflatten_history(flat: torch.Tensor | np.ndarray, policy: GenerativePolicy) -> dict[str, torch.Tensor]:
    """(B, n_obs_steps * obs_dim) flat histories (frames in time order, keys in the policy's order within a
    frame, the layout ``encode_observation`` builds) -> {key: (B, n_obs_steps, *shape)}."""
    config = policy.config
    flat = torch.as_tensor(flat, dtype=torch.float32)
    frames = flat.reshape(flat.shape[0], config.n_obs_steps, -1)
    out, offset = {}, 0
    for key in config.obs_keys:
        shape = list(config.obs_shapes[key])
        size = int(np.prod(shape))
        out[key] = frames[..., offset: offset + size].reshape(flat.shape[0], config.n_obs_steps, *shape)
        offset += size
    return out


def critic_observation(flat: torch.Tensor, policy: GenerativePolicy) -> torch.Tensor:
    """Critic / value input: the history normalised with the policy's (fixed) observation statistics."""
    frames = flat.reshape(flat.shape[0], policy.config.n_obs_steps, -1)
    return policy.obs_normalizer.normalize(frames).reshape(flat.shape[0], -1).clamp(-5.0, 5.0)


def executed_chunk(final: torch.Tensor, n_action_steps: int) -> torch.Tensor:
    """The part of a normalised chunk (B, horizon, A) the env executes, clipped as executed, flattened."""
    return final[:, :n_action_steps].clamp(-1.0, 1.0).reshape(final.shape[0], -1)


def sample_chains(policy: GenerativePolicy, flat_obs: torch.Tensor, steps: int) -> torch.Tensor:
    """Stochastic chains (B, K + 1, horizon, A) for flat observation histories."""
    return policy.sample(unflatten_history(flat_obs, policy), steps=steps, return_chain=True, stochastic=True).chain


# --- OGPO's advantage and the PPO loss over chain transitions --------------------------------------------------

def group_relative(q_heads: torch.Tensor, group_size: int) -> torch.Tensor:
    """Q of each chain minus the mean Q of its group, per head: (H, B * G) -> (H, B * G). Rows of one state
    are consecutive. No division by the group's std (OGPO): small Q gaps stay small advantages."""
    heads = q_heads.shape[0]
    grouped = q_heads.reshape(heads, -1, group_size)
    return (grouped - grouped.mean(dim=-1, keepdim=True)).reshape(heads, -1)


def conservative_advantage(head_advantages: torch.Tensor) -> torch.Tensor:
    """OGPO's two-sided conservative advantage over critic heads, (H, N) -> (N,): if every head says the
    chain is better than its group, the smallest such advantage; if every head says worse, the largest (the
    least negative); if the heads disagree, 0 (no push either way where the critic is unsure)."""
    lowest = head_advantages.min(dim=0).values
    highest = head_advantages.max(dim=0).values
    return torch.where(lowest > 0, lowest, torch.where(highest < 0, highest, torch.zeros_like(lowest)))


def rms_scaled(advantage: torch.Tensor) -> torch.Tensor:
    """Advantages divided by their root mean square over the non-zero ones: one scale for the whole round,
    so signs, zeros (chains the conservative rule silenced) and the ratios between chains are kept."""
    nonzero = advantage[advantage != 0]
    if nonzero.numel() == 0:
        return advantage
    return advantage / nonzero.square().mean().sqrt().clamp_min(1e-12)


LOG_PROB_CLAMP = (-5.0, 2.0)   # DPPO's clamp of per-element log-densities before the ratio


def ratio_log_prob(policy: GenerativePolicy, flat_obs: torch.Tensor, chains: torch.Tensor,
                   element_mean: bool = True, last_transitions: int = 0) -> torch.Tensor:
    """(N, K') log-probabilities the PPO ratio is built from, of the chain's last ``last_transitions``
    transitions (0 = all K; OGPO's ``ppo_last_transitions``, DPPO's ``ft_denoising_steps``). ``element_mean``:
    DPPO's per-element mean over the executed part of the chunk (clamped), so that a ratio of 1 +- clip means
    the same per-element change for any chunk size and the unexecuted tail of the chunk, which the return never
    saw, does not move it; otherwise the transition's full density (``chain_log_prob``)."""
    obs = unflatten_history(flat_obs, policy)
    if not element_mean:
        log_prob = policy.chain_log_prob(obs, chains)
    else:
        elements = policy.chain_log_prob(obs, chains, per_element=True)[:, :, : policy.config.n_action_steps]
        log_prob = elements.clamp(*LOG_PROB_CLAMP).mean(dim=(-1, -2))
    return log_prob[:, -last_transitions:] if last_transitions else log_prob


def ppo_chain_loss(new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantage: torch.Tensor, clip: float,
                   denoising_discount: float = 1.0, max_log_ratio: float = 5.0) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate over every chain transition. ``new_log_prob`` / ``old_log_prob`` (N, K): one
    ratio per transition; ``advantage`` (N,) is the chain's, weighted by denoising_discount^(K - 1 - k) for
    transition k (1 for the last, the one that emits the action)."""
    steps = new_log_prob.shape[1]
    weights = denoising_discount ** torch.arange(steps - 1, -1, -1, dtype=new_log_prob.dtype)
    step_advantage = advantage[:, None] * weights[None]
    log_ratio = (new_log_prob - old_log_prob).clamp(-max_log_ratio, max_log_ratio)
    ratio = log_ratio.exp()
    surrogate = torch.min(ratio * step_advantage, ratio.clamp(1 - clip, 1 + clip) * step_advantage)
    loss = -surrogate.mean()
    with torch.no_grad():
        stats = {"ratio_mean": ratio.mean().item(), "ratio_dev": (ratio - 1).abs().max().item(),
                 "clip_frac": ((ratio - 1).abs() > clip).float().mean().item(),
                 "approx_kl": ((ratio - 1) - log_ratio).mean().item()}
    return loss, stats


# --- the success-only BC buffer ----------------------------------------------------------------------------

class SuccessBuffer:
    """Training windows (observation history, action chunk) from successful episodes only, a ring of
    ``capacity`` windows. ``add_episode`` refuses an unsuccessful episode (returns False)."""

    def __init__(self, policy: GenerativePolicy, capacity: int, seed: int = 0) -> None:
        config = policy.config
        self.obs_keys, self.n_obs_steps, self.horizon = list(config.obs_keys), config.n_obs_steps, config.horizon
        self.capacity = int(capacity)
        self.obs = np.zeros((capacity, config.n_obs_steps * config.obs_dim), np.float32)
        self.actions = np.zeros((capacity, config.horizon, config.action_dim), np.float32)
        self.size = 0
        self.added = 0
        self.episodes = 0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    def add_episode(self, episode: Episode) -> bool:
        if not episode.success or len(episode) == 0:
            return False
        windows = ActionChunkWindows([episode], self.obs_keys, self.n_obs_steps, self.horizon, source="success buffer")
        obs, actions = windows.batch(np.arange(len(windows)))
        rows = len(actions)
        flat = torch.cat([obs[key].reshape(rows, self.n_obs_steps, -1) for key in self.obs_keys], dim=-1)
        slots = (self.added + np.arange(rows)) % self.capacity
        self.obs[slots] = flat.reshape(rows, -1).numpy()
        self.actions[slots] = actions.numpy()
        self.added += rows
        self.size = min(self.size + rows, self.capacity)
        self.episodes += 1
        return True

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rng.integers(0, self.size, size=batch_size)
        return torch.from_numpy(self.obs[rows]), torch.from_numpy(self.actions[rows])

    def state_dict(self) -> dict[str, Any]:
        return {"obs": self.obs[: self.size].copy(), "actions": self.actions[: self.size].copy(), "size": self.size,
                "added": self.added, "episodes": self.episodes, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size, self.added, self.episodes = int(state["size"]), int(state["added"]), int(state["episodes"])
        self.obs[: self.size], self.actions[: self.size] = state["obs"], state["actions"]
        self.rng.bit_generator.state = state["rng"]


# --- acting in chunks with the stochastic chain -----------------------------------------------------------------

@dataclass
class ChunkTransition:
    """One decision of one env: the chunk sampled at ``obs`` and what its executed steps led to."""

    env_index: int
    obs: np.ndarray            # flat observation history at the decision
    action: np.ndarray         # executed part of the normalised chunk, clipped, flat (n_action_steps * A)
    chain: np.ndarray          # (K + 1, horizon, A), the chain that produced it
    reward: float = 0.0        # sum_i gamma^i r_i over the executed steps
    discount: float = 1.0      # gamma^steps: the bootstrap factor when the episode goes on
    steps: int = 0
    next_obs: np.ndarray | None = None
    terminated: bool = False   # success: no bootstrap
    truncated: bool = False    # time limit: bootstrap from next_obs, the episode's last history


class ChunkedActor:
    """Steps a :class:`VectorRollout` with chunks from ``policy``'s stochastic chain and cuts the stream
    into :class:`ChunkTransition`s (one per decision and env) and finished :class:`Episode`s.

    Each env keeps its own history (padded with the episode's first frame, as ``GenerativePolicy`` does) and
    queue; envs that need a chunk on the same step are sampled as one batch. A chunk is abandoned when its
    episode ends; its transition then ends there.
    """

    def __init__(self, rollout: VectorRollout, policy: GenerativePolicy, chain_steps: int, gamma: float) -> None:
        self.rollout, self.policy, self.chain_steps, self.gamma = rollout, policy, chain_steps, gamma
        config = policy.config
        self.obs_keys, self.n_action_steps = list(config.obs_keys), config.n_action_steps
        self.num_envs = rollout.num_envs
        self.histories = [deque(maxlen=config.n_obs_steps) for _ in range(self.num_envs)]
        self.queues: list[deque] = [deque() for _ in range(self.num_envs)]
        self.pending: list[ChunkTransition | None] = [None] * self.num_envs
        self.episode_obs: list[list[dict[str, np.ndarray]]] = [[] for _ in range(self.num_envs)]
        self.episode_actions: list[list[np.ndarray]] = [[] for _ in range(self.num_envs)]

    def _frame(self, obs: dict[str, np.ndarray], index: int) -> np.ndarray:
        return flatten_observation({key: np.asarray(obs[key])[index: index + 1] for key in self.obs_keys},
                                   self.obs_keys)[0]

    def _start_episode(self, index: int) -> None:
        frame = self._frame(self.rollout.obs, index)
        self.histories[index].clear()
        self.histories[index].extend([frame] * self.histories[index].maxlen)
        self.queues[index].clear()
        self.pending[index] = None
        self.episode_obs[index], self.episode_actions[index] = [], []

    def history(self, index: int) -> np.ndarray:
        return np.concatenate(list(self.histories[index]))

    def reset(self, seed: int | None = None) -> None:
        self.rollout.reset(seed=seed)
        for index in range(self.num_envs):
            self._start_episode(index)

    @torch.no_grad()
    def _decide(self, indices: list[int]) -> None:
        flat = np.stack([self.history(index) for index in indices])
        chain = sample_chains(self.policy, torch.from_numpy(flat), self.chain_steps)
        normalised = chain[:, -1]
        chunks = self.policy.action_normalizer.unnormalize(normalised.clamp(-1.0, 1.0))[:, : self.n_action_steps]
        chunks = chunks.clamp(-1.0, 1.0).numpy()
        executed = executed_chunk(normalised, self.n_action_steps).numpy()
        for row, index in enumerate(indices):
            self.queues[index].extend(chunks[row])
            self.pending[index] = ChunkTransition(index, flat[row], executed[row], chain[row].numpy())

    def _finish(self, index: int, next_obs: np.ndarray, terminated: bool, truncated: bool) -> ChunkTransition:
        transition = self.pending[index]
        transition.next_obs, transition.terminated, transition.truncated = next_obs, terminated, truncated
        self.pending[index] = None
        return transition

    def step(self, while_waiting: Callable[[], Any] | None = None):
        """One vector step -> (StepTransitions, finished ChunkTransitions, finished Episodes)."""
        need = [index for index in range(self.num_envs) if not self.queues[index]]
        if need:
            self._decide(need)
        actions = np.stack([self.queues[index].popleft() for index in range(self.num_envs)]).astype(np.float32)
        for index in range(self.num_envs):
            self.episode_obs[index].append({key: np.asarray(self.rollout.obs[key][index]) for key in self.obs_keys})
            self.episode_actions[index].append(actions[index])
        step = self.rollout.step(actions, while_waiting=while_waiting)
        outcomes = {outcome.env_index: outcome for outcome in step.finished}
        chunks, episodes = [], []
        for index in range(self.num_envs):
            transition = self.pending[index]
            transition.reward += transition.discount * float(step.reward[index])
            transition.discount *= self.gamma
            transition.steps += 1
            frame = self._frame(step.next_obs, index)
            if step.done[index]:
                next_history = np.concatenate([*list(self.histories[index])[1:], frame])
                chunks.append(self._finish(index, next_history, bool(step.terminated[index]),
                                           bool(step.truncated[index] and not step.terminated[index])))
                observations = {key: np.stack([obs[key] for obs in self.episode_obs[index]]) for key in self.obs_keys}
                final = {key: np.asarray(step.next_obs[key][index]) for key in self.obs_keys}
                episodes.append(Episode(observations, np.stack(self.episode_actions[index]),
                                        success=bool(outcomes[index].success) if index in outcomes else False,
                                        final_observation=final))
                self._start_episode(index)
            else:
                self.histories[index].append(frame)
                if not self.queues[index]:
                    chunks.append(self._finish(index, self.history(index), False, False))
        return step, chunks, episodes

    def cut(self) -> list[ChunkTransition]:
        """End every chunk in flight where it is (DPPO's iteration boundary: the next chunk comes from the
        updated policy). The cut transitions bootstrap from the current history."""
        chunks = []
        for index in range(self.num_envs):
            if self.pending[index] is not None and self.pending[index].steps > 0:
                chunks.append(self._finish(index, self.history(index), False, False))
            self.pending[index] = None
            self.queues[index].clear()
        return chunks


# --- demos as chunk transitions ----------------------------------------------------------------------------

def demo_chunk_transitions(episode: Episode, policy: GenerativePolicy, gamma: float) -> dict[str, np.ndarray]:
    """Every step t of a demo as a decision point: (history at t, the next n_action_steps demo actions
    normalised, their discounted reward, history at t + k). Rows come back grouped by the offset t mod
    n_action_steps, and ``stream`` says which chain of consecutive decisions a row belongs to."""
    config = policy.config
    keys, n_obs, n_act = list(config.obs_keys), config.n_obs_steps, config.n_action_steps
    length = len(episode)
    final = episode.final_observation or {key: episode.observations[key][-1] for key in keys}
    frames = np.concatenate([flatten_observation(episode.observations, keys),
                             flatten_observation({key: np.asarray(final[key])[None] for key in keys}, keys)])
    with torch.no_grad():
        normalised = policy.action_normalizer.normalize(torch.as_tensor(episode.actions)).clamp(-1.0, 1.0).numpy()
    rows: dict[str, list] = {name: [] for name in ("obs", "action", "reward", "next_obs", "terminated", "truncated",
                                                     "stream")}

    def history(t: int) -> np.ndarray:
        return frames[np.clip(np.arange(t - n_obs + 1, t + 1), 0, None)].reshape(-1)

    for offset in range(min(n_act, length)):
        for t in range(offset, length, n_act):
            k = min(n_act, length - t)
            rows["obs"].append(history(t))
            rows["action"].append(normalised[np.minimum(np.arange(t, t + n_act), length - 1)].reshape(-1))
            rows["reward"].append(float(np.sum(episode.rewards[t: t + k] * gamma ** np.arange(k))))
            rows["next_obs"].append(history(t + k))
            terminated = bool(episode.terminals[t: t + k].any())
            rows["terminated"].append(terminated)
            rows["truncated"].append(t + k == length and not terminated)
            rows["stream"].append(offset)
    return {name: np.asarray(value) for name, value in rows.items()}


# --- next actions for the TD target, kept per replay row ------------------------------------------------------

def sample_next_actions(policy: GenerativePolicy, next_obs: torch.Tensor, samples: int, chain_steps: int) -> torch.Tensor:
    """(B, M, A): M executed chunks a' from the policy's stochastic chain at each of B flat histories s'."""
    chain = sample_chains(policy, next_obs.repeat_interleave(samples, dim=0), chain_steps)
    return executed_chunk(chain[:, -1], policy.config.n_action_steps).reshape(len(next_obs), samples, -1)


class NextActionCache:
    """M chunks a' ~ pi(s') for the bootstrap state s' of every row of one replay buffer (n_step 1: the row's
    own ``next_obs``), in the executed, normalised form the critic takes.

    Sampling them inside every TD update (2 x 256 chains of K = 10 denoiser passes) made it 2.3x (critic width
    256) to 5.4x (width 128) dearer than its critic passes (``benchmarks/td_update.py``), which held the can preset
    to 0.25 TD updates per env step. Kept here, they are refreshed round-robin (``refresh``), so each is at most
    one refresh cycle (~1k env steps on can at 32 rows per env step) behind the policy, which PPO's small clip
    moves slowly. The target is the same up to that lag; the random numbers drawn differ."""

    def __init__(self, buffer: ReplayBuffer, samples: int, action_dim: int) -> None:
        self.buffer, self.samples = buffer, int(samples)
        self.actions = np.zeros((buffer.capacity, self.samples, action_dim), np.float32)
        self.cursor = 0

    @torch.no_grad()
    def fill(self, slots: np.ndarray, policy: GenerativePolicy, chain_steps: int, batch: int = 1024) -> None:
        """Sample fresh a' for ``slots`` with the policy as it is now."""
        slots = np.asarray(slots, np.int64)
        for start in range(0, len(slots), batch):
            rows = slots[start: start + batch]
            next_obs = torch.from_numpy(self.buffer.next_obs[rows])
            self.actions[rows] = sample_next_actions(policy, next_obs, self.samples, chain_steps).numpy()

    def refresh(self, rows: int, policy: GenerativePolicy, chain_steps: int) -> None:
        """Re-sample the next ``rows`` rows after the last refreshed one, wrapping over the rows held."""
        size = len(self.buffer)
        rows = min(int(rows), size)
        if rows <= 0:
            return
        slots = (self.cursor + np.arange(rows)) % size
        self.fill(slots, policy, chain_steps)
        self.cursor = int((self.cursor + rows) % size)

    def state_dict(self) -> dict[str, Any]:
        return {"actions": self.actions[: len(self.buffer)].copy(), "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        actions = np.asarray(state["actions"])
        if actions.shape[1:] != self.actions.shape[1:] or len(actions) != len(self.buffer):
            raise CheckpointError(f"cached next actions {actions.shape} do not fit the replay buffer "
                                  f"({len(self.buffer)} rows, {self.actions.shape[1:]}): config field "
                                  f"'next_action_samples' changed since the checkpoint?")
        self.actions[: len(actions)] = actions
        self.cursor = int(state["cursor"])


def sample_critic_batch(offline: ReplayBuffer, online: ReplayBuffer, caches: dict[str, NextActionCache],
                        config: OGPOConfig, gamma_chunk: float) -> tuple[TransitionBatch, torch.Tensor | None]:
    """A symmetric critic batch and, with the cache on, its rows' kept next actions (B, M, A)."""
    parts = symmetric_slots(offline, online, config.critic_batch_size, config.offline_fraction)
    batch = TransitionBatch.concatenate([buffer.gather(slots, config.n_step, gamma_chunk) for buffer, slots in parts])
    if not caches:
        return batch.to_torch(), None
    cache_of = {id(cache.buffer): cache for cache in caches.values()}
    next_actions = np.concatenate([cache_of[id(buffer)].actions[slots] for buffer, slots in parts])
    return batch.to_torch(), torch.from_numpy(next_actions)


# --- learners and update steps ---------------------------------------------------------------------------------

class OGPOLearner(CheckpointedLearner):
    """The policy (all weights trained), the critic ensemble and its target, optimisers."""

    optimizers = ("actor_optimizer", "critic_optimizer")
    counters = ("critic_updates", "actor_rounds")

    def __init__(self, config: OGPOConfig, policy: GenerativePolicy, chain_steps: int) -> None:
        super().__init__()
        self.config, self.policy, self.chain_steps = config, policy, chain_steps
        obs_dim = policy.config.n_obs_steps * policy.config.obs_dim
        action_dim = policy.config.n_action_steps * policy.config.action_dim
        self.critic = CriticEnsemble(obs_dim, action_dim, config.num_critics, config.critic_hidden_dim,
                                     config.critic_depth, config.layer_norm)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optimizer = torch.optim.Adam(policy.parameters(), lr=config.actor_lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.critic_updates = 0
        self.actor_rounds = 0


def mean_next_value(learner: OGPOLearner, next_obs: torch.Tensor, next_actions: torch.Tensor | None = None) -> torch.Tensor:
    """OGPO's TD bootstrap, (B,): the target ensemble's mean over heads, averaged over M chunks a' from the
    policy's stochastic chain at each s': ``next_actions`` (B, M, A) when kept, else ``next_action_samples``
    drawn now."""
    config, policy = learner.config, learner.policy
    if next_actions is None:
        next_actions = sample_next_actions(policy, next_obs, max(1, config.next_action_samples), learner.chain_steps)
    samples = next_actions.shape[1]
    repeated = next_obs.repeat_interleave(samples, dim=0)
    q = learner.critic_target(critic_observation(repeated, policy), next_actions.reshape(len(repeated), -1))
    return q.mean(dim=0).reshape(-1, samples).mean(dim=1)


def critic_update(learner: OGPOLearner, batch: TransitionBatch, next_actions: torch.Tensor | None = None) -> dict[str, float]:
    """One TD step of every head on a batch of chunk transitions:
    y = R + discount * mean_{h, a'} Q'_h(s', a'),  loss = sum_h mean (Q_h(s, a) - y)^2; Polyak target."""
    config, policy = learner.config, learner.policy
    with torch.no_grad():
        target = batch.reward + batch.discount * mean_next_value(learner, batch.next_obs, next_actions)
        if config.clip_target:
            target = target.clamp(0.0, 1.0)
    q = learner.critic(critic_observation(batch.obs, policy), batch.action)
    loss = (q - target).pow(2).mean(dim=1).sum()
    learner.critic_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    learner.critic_optimizer.step()
    polyak_update(learner.critic_target, learner.critic, config.tau)
    learner.critic_updates += 1
    return {"critic_loss": loss.item() / q.shape[0], "q": q.mean().item(), "target": target.mean().item()}


def _policy_step(learner_policy: GenerativePolicy, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                 max_grad_norm: float) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(learner_policy.parameters(), max_grad_norm)
    optimizer.step()
    return float(norm)


def _gradient_norm(policy: GenerativePolicy, loss: torch.Tensor) -> float:
    parameters = [p for p in policy.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum(g.square().sum() for g in grads if g is not None)))


def ogpo_actor_update(learner: OGPOLearner, states: torch.Tensor, success: SuccessBuffer | None) -> dict[str, float]:
    """One OGPO actor round on ``states`` (B, D) flat observation histories.

    The chains, their old log-probs and their advantages are computed once, with the policy as it is now
    (the frozen "old" policy of this round); then ``actor_epochs`` passes of PPO minibatch steps move it.
    Chains with zero advantage (the heads disagree) add nothing to the PPO gradient and are skipped (the loss
    stays the mean over all chains).
    """
    config, policy = learner.config, learner.policy
    group, n_act = config.group_size, policy.config.n_action_steps
    with torch.no_grad():
        group_states = states.repeat_interleave(group, dim=0)            # rows of one state are consecutive
        chains = sample_chains(policy, group_states, learner.chain_steps)
        old_log_prob = ratio_log_prob(policy, group_states, chains, config.ratio_element_mean,
                                      config.ppo_last_transitions)
        q_heads = learner.critic(critic_observation(group_states, policy), executed_chunk(chains[:, -1], n_act))
        head_advantages = group_relative(q_heads, group)
        advantage = conservative_advantage(head_advantages) if config.conservative_advantage else head_advantages.mean(0)
    active = torch.nonzero(advantage != 0).squeeze(1) if config.pg_coef > 0 else advantage.new_zeros(0, dtype=torch.long)
    stats = {"adv_abs": advantage.abs().mean().item(), "adv_active": active.numel() / max(advantage.numel(), 1),
             "q_group_std": q_heads.mean(0).reshape(-1, group).std(dim=1).mean().item()}
    if active.numel():
        stats["adv_rms"] = advantage[active].square().mean().sqrt().item()
    if config.advantage_rms_scale:
        advantage = rms_scaled(advantage)
    sums: dict[str, float] = {}
    steps = 0
    split_logged = False
    for _ in range(config.actor_epochs):
        order = active[torch.randperm(active.numel(), generator=learner.generator)]
        starts = range(0, order.numel(), config.actor_minibatch) if order.numel() else [None]
        for start in starts:
            loss = torch.zeros(())
            if start is not None:
                rows = order[start: start + config.actor_minibatch]
                new_log_prob = ratio_log_prob(policy, group_states[rows], chains[rows], config.ratio_element_mean,
                                              config.ppo_last_transitions)
                pg_loss, ppo_stats = ppo_chain_loss(new_log_prob, old_log_prob[rows], advantage[rows], config.clip_ratio,
                                                    config.denoising_discount, config.max_log_ratio)
                # The objective is the mean over *all* chains, zero-advantage ones included: scaling each
                # minibatch of active chains by the active share keeps PPO's weight against BC as in OGPO.
                loss = loss + config.pg_coef * pg_loss * (active.numel() / advantage.numel())
                for key, value in ppo_stats.items():
                    sums[key] = sums.get(key, 0.0) + value
                sums["pg_loss"] = sums.get("pg_loss", 0.0) + pg_loss.item()
            if success is not None and len(success) and config.bc_coef > 0:
                bc_obs, bc_actions = success.sample(config.bc_batch_size)
                bc_loss = policy.bc_loss(unflatten_history(bc_obs, policy), bc_actions)
                if not split_logged and start is not None:
                    # Once a round, the two terms' gradient norms apart: how much PPO steers next to BC.
                    stats["pg_grad_norm"] = _gradient_norm(policy, config.pg_coef * pg_loss * (active.numel() / advantage.numel()))
                    stats["bc_grad_norm"] = _gradient_norm(policy, config.bc_coef * bc_loss)
                    split_logged = True
                loss = loss + config.bc_coef * bc_loss
                sums["bc_loss"] = sums.get("bc_loss", 0.0) + bc_loss.item()
            if loss.requires_grad:
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + _policy_step(policy, learner.actor_optimizer, loss,
                                                                             config.max_grad_norm)
                steps += 1
    learner.actor_rounds += 1
    stats.update({key: value / max(steps, 1) for key, value in sums.items()})
    return stats


# --- DPPO: value critic, GAE over chunk transitions, PPO over the last denoising steps -------------------------

class DPPOLearner(CheckpointedLearner):
    """The policy (all weights trained), the state-value critic, optimisers."""

    optimizers = ("actor_optimizer", "value_optimizer")
    counters = ("iterations",)

    def __init__(self, config: OGPOConfig, policy: GenerativePolicy, chain_steps: int) -> None:
        super().__init__()
        settings = config.dppo
        self.config, self.policy, self.chain_steps = config, policy, chain_steps
        obs_dim = policy.config.n_obs_steps * policy.config.obs_dim
        self.value = mlp(obs_dim, 1, settings.value_hidden_dim, settings.value_depth, layer_norm=True)
        self.actor_optimizer = torch.optim.Adam(policy.parameters(), lr=settings.actor_lr)
        self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=settings.value_lr)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.iterations = 0

    def values(self, flat_obs: torch.Tensor) -> torch.Tensor:
        return self.value(critic_observation(flat_obs, self.policy)).squeeze(-1)


def generalized_advantage(reward: np.ndarray, discount: np.ndarray, value: np.ndarray, next_value: np.ndarray,
                          terminated: np.ndarray, episode_end: np.ndarray, lam: float) -> np.ndarray:
    """GAE over one env's chunk transitions in time order. ``discount`` is each transition's gamma^k; a
    terminal transition does not bootstrap; the recursion restarts after every episode end, and the last
    transition of the sequence bootstraps from its own next value."""
    advantage = np.zeros(len(reward), np.float64)
    running = 0.0
    for t in range(len(reward) - 1, -1, -1):
        bootstrap = 0.0 if terminated[t] else discount[t] * next_value[t]
        delta = reward[t] + bootstrap - value[t]
        running = delta + (0.0 if episode_end[t] else discount[t] * lam * running)
        advantage[t] = running
    return advantage


@dataclass
class OnPolicyBatch:
    obs: torch.Tensor            # (N, D)
    chains: torch.Tensor         # (N, K + 1, horizon, A)
    old_log_prob: torch.Tensor   # (N, K') of the fine-tuned (last K') transitions
    advantage: torch.Tensor      # (N,)
    returns: torch.Tensor        # (N,)


def build_on_policy_batch(learner: DPPOLearner, sequences: list[list[ChunkTransition]]) -> OnPolicyBatch:
    """Value estimates, GAE advantages and returns for one iteration's chunk transitions (per-env lists)."""
    settings, policy = learner.config.dppo, learner.policy
    transitions = [transition for sequence in sequences for transition in sequence]
    obs = torch.from_numpy(np.stack([t.obs for t in transitions]))
    next_obs = torch.from_numpy(np.stack([t.next_obs for t in transitions]))
    chains = torch.from_numpy(np.stack([t.chain for t in transitions]))
    with torch.no_grad():
        value, next_value = learner.values(obs).numpy(), learner.values(next_obs).numpy()
        log_prob = torch.cat([ratio_log_prob(policy, obs[i: i + 512], chains[i: i + 512],
                                             learner.config.ratio_element_mean, settings.ft_denoising_steps)
                              for i in range(0, len(transitions), 512)])
    advantage = np.zeros(len(transitions))
    start = 0
    for sequence in sequences:
        end = start + len(sequence)
        advantage[start:end] = generalized_advantage(
            np.array([t.reward for t in sequence]), np.array([t.discount for t in sequence]), value[start:end],
            next_value[start:end], np.array([t.terminated for t in sequence]),
            np.array([t.terminated or t.truncated for t in sequence]), settings.gae_lambda)
        start = end
    returns = advantage + value
    return OnPolicyBatch(obs, chains, log_prob, torch.as_tensor(advantage, dtype=torch.float32),
                         torch.as_tensor(returns, dtype=torch.float32))


def dppo_update(learner: DPPOLearner, batch: OnPolicyBatch, success: SuccessBuffer | None) -> dict[str, float]:
    """PPO epochs over one iteration: clipped ratio on the last K' chain transitions of every chunk, advantage
    (normalised) times denoising_discount^(steps to the chain's end); value regression to the GAE returns."""
    settings, config, policy = learner.config.dppo, learner.config, learner.policy
    advantage = batch.advantage
    if settings.normalize_advantage and len(advantage) > 1:
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
    sums: dict[str, float] = {}
    steps = 0
    for _ in range(settings.epochs):
        order = torch.randperm(len(advantage), generator=learner.generator)
        for start in range(0, len(order), settings.minibatch):
            rows = order[start: start + settings.minibatch]
            new_log_prob = ratio_log_prob(policy, batch.obs[rows], batch.chains[rows], config.ratio_element_mean,
                                          settings.ft_denoising_steps)
            pg_loss, ppo_stats = ppo_chain_loss(new_log_prob, batch.old_log_prob[rows], advantage[rows],
                                                settings.clip_ratio, settings.denoising_discount, config.max_log_ratio)
            loss = pg_loss
            if success is not None and len(success) and settings.bc_coef > 0:
                bc_obs, bc_actions = success.sample(config.bc_batch_size)
                loss = loss + settings.bc_coef * policy.bc_loss(unflatten_history(bc_obs, policy), bc_actions)
            grad_norm = _policy_step(policy, learner.actor_optimizer, loss, config.max_grad_norm)
            value_loss = settings.value_coef * (learner.values(batch.obs[rows]) - batch.returns[rows]).pow(2).mean()
            learner.value_optimizer.zero_grad(set_to_none=True)
            value_loss.backward()
            learner.value_optimizer.step()
            for key, value in {**ppo_stats, "pg_loss": pg_loss.item(), "value_loss": value_loss.item(),
                               "grad_norm": grad_norm}.items():
                sums[key] = sums.get(key, 0.0) + value
            steps += 1
    learner.iterations += 1
    stats = {key: value / max(steps, 1) for key, value in sums.items()}
    stats.update(adv_raw_abs=batch.advantage.abs().mean().item(), returns=batch.returns.mean().item())
    return stats


# --- set-up -----------------------------------------------------------------------------------------------

def load_base(config: OGPOConfig) -> GenerativePolicy:
    policy = load_base_policy(config.base, config.task)
    if not isinstance(policy, GenerativePolicy):
        raise CheckpointError(f"{base_path(config.base, config.task)}: a '{policy.kind}' policy has no denoising "
                              f"chain; OGPO/DPPO fine-tune diffusion or flow policies (config field 'base')")
    return policy


def load_demos(config: OGPOConfig, obs_keys: list[str]) -> tuple[Path | None, list[Episode]]:
    if config.num_demos < 0:   # fine-tune without demos
        return None, []
    return load_demo_episodes(config.task, config.dataset, obs_keys, config.num_demos, only_success=True)


def _check_config(config: OGPOConfig) -> None:
    if config.mode not in ("ogpo", "dppo"):
        raise ConfigError(f"config field 'mode' is '{config.mode}'; choose 'ogpo' or 'dppo'")
    for name in ("num_envs", "total_env_steps", "group_size", "actor_states", "actor_epochs", "actor_minibatch",
                 "critic_batch_size", "num_critics"):
        if getattr(config, name) < 1:
            raise ConfigError(f"config field '{name}' must be >= 1, got {getattr(config, name)}")
    if config.ppo_last_transitions < 0:
        raise ConfigError(f"config field 'ppo_last_transitions' must be >= 0 (0 = all), got {config.ppo_last_transitions}")
    if config.group_size < 2:
        raise ConfigError("config field 'group_size' must be >= 2: the baseline is the group's mean Q")
    if config.mode == "ogpo" and config.next_action_cache and config.n_step != 1:
        raise ConfigError(f"config field 'next_action_cache' keeps a' for each row's own next state, so it needs "
                          f"n_step 1 (got n_step {config.n_step}); set --next_action_cache=false for n-step targets")
    if config.dppo.steps_per_iteration < config.num_envs:
        raise ConfigError("config field 'dppo.steps_per_iteration' must be >= num_envs")


def prepare_policy(config: OGPOConfig) -> tuple[GenerativePolicy, int]:
    """Load the base and set the chain it will be trained and deployed with."""
    policy = load_base(config)
    chain_steps = config.chain_steps or policy.config.inference_steps
    policy.config.inference_steps = chain_steps      # act() (eval, deploy) runs the chain that was trained
    if hasattr(policy.config, "sampler"):
        policy.config.sampler = "ddim"               # diffusion: deterministic DDIM-K, the mean of the trained chain
    if config.chain_std > 0:
        policy.config.chain_min_std = config.chain_std
    if hasattr(policy.config, "chain_eta"):
        policy.config.chain_eta = config.chain_eta
    policy.requires_grad_(True)
    return policy.train(), chain_steps


# --- training ------------------------------------------------------------------------------------------------

def evaluate(loop: RunLoop, policy: GenerativePolicy, config: OGPOConfig, **kwargs: Any):
    """``loop.evaluate`` with the torch RNG forked and seeded: every evaluation draws the same initial latents
    for the same env seeds, so two evaluations of the same weights give the same episodes (a curve's changes
    are the policy's, and the base point is the same in both modes), and training's RNG stream is untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(config.eval_seed)
        return loop.evaluate(policy, **kwargs)


def train(config: OGPOConfig, run: Run, resume: bool = False) -> dict[str, Any]:
    """Fine-tune every weight of the base; write ``<run>/policy`` (a normal diffusion/flow checkpoint),
    checkpoints, metrics, the success curve and ``eval.json``; return a summary with base and final success."""
    from robofinetune.envs import make_vector_env

    _check_config(config)
    torch.set_num_threads(max(1, config.torch_threads))
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    policy, chain_steps = prepare_policy(config)
    obs_keys = list(policy.config.obs_keys)
    dataset_path, demos = load_demos(config, obs_keys)
    gamma_chunk = config.gamma ** policy.config.n_action_steps
    success = SuccessBuffer(policy, config.success_capacity, seed=config.seed + 2)
    obs_dim = policy.config.n_obs_steps * policy.config.obs_dim
    action_dim = policy.config.n_action_steps * policy.config.action_dim
    buffers: dict[str, ReplayBuffer] = {}
    if config.mode == "ogpo":
        # Chunk transitions: about total_env_steps / n_action_steps of them, more when episodes end mid-chunk.
        capacity = config.buffer_capacity or max(2 * config.total_env_steps // policy.config.n_action_steps, 1_000)
        buffers = {"offline": ReplayBuffer(obs_dim, action_dim, max(sum(len(e) for e in demos), 1), seed=config.seed),
                   "online": ReplayBuffer(obs_dim, action_dim, capacity, seed=config.seed + 1)}
    learner: OGPOLearner | DPPOLearner = (OGPOLearner if config.mode == "ogpo" else DPPOLearner)(config, policy, chain_steps)
    caches: dict[str, NextActionCache] = {}
    if config.mode == "ogpo" and config.next_action_cache:
        caches = {name: NextActionCache(buffer, max(1, config.next_action_samples), action_dim)
                  for name, buffer in buffers.items()}
    loop = RunLoop(run, config.total_env_steps, config.task, eval_every=config.eval_every,
                   eval_episodes=config.eval_episodes, eval_envs=config.eval_envs, eval_seed=config.eval_seed,
                   checkpoint_every=config.checkpoint_every, progress=config.progress,
                   description=f"{config.mode} {config.task}")
    state = loop.load_checkpoint(buffers) if resume else None
    if resume and state is None:
        print(f"{run.path}: no checkpoint yet, starting from the beginning")
    if state is not None:
        learner.load_learner_state(state["learner"])
        success.load_state_dict(state["success"])
        torch.set_rng_state(state["torch_rng"])
        if buffers:
            buffers["online"].end_streams()  # envs restart: episodes in flight at the checkpoint are over
        if caches:
            if "next_actions" not in state:
                raise CheckpointError(f"{run.path}: the checkpoint has no cached next actions (written with "
                                      f"--next_action_cache=false); resume with that setting")
            for name, cache in caches.items():
                cache.load_state_dict(state["next_actions"][name])
        print(f"resumed at {loop.env_steps} env steps")
    else:
        if config.bc_from_demos:
            for episode in demos:
                success.add_episode(episode)
        if config.mode == "ogpo":
            for number, episode in enumerate(demos):
                rows = demo_chunk_transitions(episode, policy, config.gamma)
                buffers["offline"].add_transitions(rows["obs"], rows["action"], rows["reward"], rows["next_obs"],
                                        rows["terminated"], rows["truncated"],
                                        -(number * policy.config.n_action_steps + rows["stream"]) - 1)
            if caches:
                caches["offline"].fill(np.arange(len(buffers["offline"])), policy, chain_steps)
        if config.eval_base:
            evaluate(loop, policy, config, episodes=config.final_eval_episodes, label="base")

    metadata = {"task": config.task, "base": str(base_path(config.base, config.task)),
                "base_kind": policy.kind, "mode": config.mode, "dataset": str(dataset_path), "run": str(run.path),
                "chain_steps": chain_steps,
                "made_by": f"robofinetune train ogpo --task={config.task} --mode={config.mode}"}

    def save_checkpoint() -> None:
        extra = {"next_actions": {name: cache.state_dict() for name, cache in caches.items()}} if caches else {}
        loop.save_checkpoint({"learner": learner.learner_state(), "success": success.state_dict(),
                              "torch_rng": torch.get_rng_state(), **extra}, buffers)
        save_policy(policy, run.path / "policy", {**metadata, "env_steps": loop.env_steps})

    from robofinetune.algos.ope import training_gate   # here, not at import: keeps scipy out of `--help` and tests

    gate = training_gate(config, run, metadata["base"], dataset_path, obs_keys)

    def periodic_eval() -> None:
        evaluate(loop, policy, config)
        if gate is not None:
            gate.consider(policy, loop.env_steps, metadata)

    envs = make_vector_env(config.task, num_envs=config.num_envs, seed=200_000 + 1_000 * config.seed)
    actor = ChunkedActor(VectorRollout(envs), policy, chain_steps, config.gamma)
    try:
        actor.reset(seed=200_000 + 1_000 * config.seed + loop.env_steps)
        loop.start()
        if config.mode == "ogpo":
            _ogpo_loop(config, learner, actor, loop, run, buffers["offline"], buffers["online"], caches, success,
                       gamma_chunk, save_checkpoint, periodic_eval)
        else:
            _dppo_loop(config, learner, actor, loop, run, success, save_checkpoint, periodic_eval)
    finally:
        loop.close()
        actor.rollout.close()

    save_policy(policy, run.path / "policy", {**metadata, "env_steps": loop.env_steps})
    final = evaluate(loop, policy, config, episodes=config.final_eval_episodes, label="final")
    if gate is not None:
        gate.consider(policy, loop.env_steps, metadata)
    save_checkpoint()  # the final evaluation point is part of the curve kept in the checkpoint
    base_point = next((point for point in loop.eval_points if point["label"] == "base"), None)
    run.write_json("eval.json", {**final.to_dict(), "base": base_point})
    summary = {
        "task": config.task, "mode": config.mode, "base_kind": policy.kind,
        "base_success": base_point["success"] if base_point else None,
        "base_success_ci": base_point["ci"] if base_point else None,
        "final_success": final.success_rate, "final_success_ci": list(final.success_ci),
        "eval_episodes": final.episodes, "env_steps": loop.env_steps,
        "env_steps_to_90": loop.first_steps_reaching(0.9), "env_steps_to_95": loop.first_steps_reaching(0.95),
        "episodes": loop.episodes, "train_success": loop.successes / max(loop.episodes, 1),
        "wall_clock_s": round(loop.seconds, 1), "seed": config.seed, "chain_steps": chain_steps,
        "policy_path": str(run.path / "policy"), "success_curve": str(run.path / "success_curve.png"),
        "eval_points": loop.eval_points,
    }
    if isinstance(learner, OGPOLearner):
        summary.update(critic_updates=learner.critic_updates, actor_rounds=learner.actor_rounds)
    else:
        summary.update(ppo_iterations=learner.iterations)
    run.write_json("summary.json", summary)
    if base_point:
        low, high = base_point["ci"]
        print(f"base  success {base_point['success']:.1%} [{low:.1%}, {high:.1%}] over {base_point['episodes']} episodes")
    print(f"final success {final.success_rate:.1%} [{final.success_ci[0]:.1%}, {final.success_ci[1]:.1%}] over "
          f"{final.episodes} episodes after {loop.env_steps} env steps ({config.mode})")
    return summary


class _Stats:
    """Running means of update statistics between two log lines."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, prefix: str, stats: dict[str, float]) -> None:
        for key, value in stats.items():
            name = f"{prefix}/{key}"
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
            self.counts[name] = self.counts.get(name, 0) + 1

    def get(self, name: str, default: float = float("nan")) -> float:
        return self.sums[name] / self.counts[name] if self.counts.get(name) else default

    def flush(self) -> dict[str, float]:
        means = {name: self.sums[name] / self.counts[name] for name in self.sums}
        self.sums.clear()
        self.counts.clear()
        return means


def _ogpo_loop(config: OGPOConfig, learner: OGPOLearner, actor: ChunkedActor, loop: RunLoop, run: Run,
               offline: ReplayBuffer, online: ReplayBuffer, caches: dict[str, NextActionCache], success: SuccessBuffer,
               gamma_chunk: float, save_checkpoint: Callable[[], None], periodic_eval: Callable[[], None]) -> None:
    stats = _Stats()
    update_debt, refresh_debt = 0.0, 0.0
    window_start, window_steps = time.time(), 0

    def learn_while_envs_step(count: int, refresh_rows: int) -> None:
        # critic updates and next-action refreshes overlap the env processes' stepping
        for _ in range(count):
            batch, next_actions = sample_critic_batch(offline, online, caches, config, gamma_chunk)
            stats.add("critic", critic_update(learner, batch, next_actions))
        held = len(offline) + len(online)
        for name, cache in caches.items():
            cache.refresh(round(refresh_rows * len(cache.buffer) / max(held, 1)), learner.policy, learner.chain_steps)

    while not loop.finished:
        has_data = len(online) + len(offline) > 0
        update_debt += config.critic_updates_per_step * config.num_envs if has_data else 0.0
        count = int(update_debt)
        update_debt -= count
        refresh_debt += config.next_action_refresh * config.num_envs if caches else 0.0
        refresh_rows = int(refresh_debt)
        refresh_debt -= refresh_rows
        step, chunks, episodes = actor.step(while_waiting=lambda: learn_while_envs_step(count, refresh_rows))
        if chunks:
            slots = online.add_transitions(np.stack([c.obs for c in chunks]), np.stack([c.action for c in chunks]),
                                           np.array([c.reward for c in chunks]), np.stack([c.next_obs for c in chunks]),
                                           np.array([c.terminated for c in chunks]),
                                           np.array([c.truncated for c in chunks]), [c.env_index for c in chunks])
            if caches:
                caches["online"].fill(slots, learner.policy, learner.chain_steps)
        if config.bc_online_successes:
            for episode in episodes:
                success.add_episode(episode)
        loop.record(config.num_envs, step.finished)
        window_steps += config.num_envs
        if (loop.env_steps >= config.warmup_steps and loop.due(config.actor_update_every)
                and len(online) + len(offline) > 0):
            states = sample_symmetric(offline, online, config.actor_states, 1, gamma_chunk, config.offline_fraction).obs
            stats.add("actor", ogpo_actor_update(learner, torch.as_tensor(states), success))
        loop.show(q=stats.get("critic/q", 0.0), closs=stats.get("critic/critic_loss", 0.0),
                  adv=stats.get("actor/adv_active", 0.0))
        if loop.due(config.log_every):
            elapsed = max(time.time() - window_start, 1e-9)
            metrics = stats.flush()
            metrics.update({"train/success_recent": loop.recent_success_rate if loop.recent_success else 0.0,
                            "train/episodes": loop.episodes, "train/success_buffer": len(success),
                            "train/critic_updates": learner.critic_updates, "train/actor_rounds": learner.actor_rounds,
                            "perf/env_steps_per_s": window_steps / elapsed})
            run.log(loop.env_steps, **metrics)
            window_start, window_steps = time.time(), 0
        if loop.due(config.eval_every) and not loop.finished:
            periodic_eval()
        if loop.due(config.checkpoint_every) or loop.finished:
            save_checkpoint()
        loop.end_step()


def _dppo_loop(config: OGPOConfig, learner: DPPOLearner, actor: ChunkedActor, loop: RunLoop, run: Run,
               success: SuccessBuffer, save_checkpoint: Callable[[], None], periodic_eval: Callable[[], None]) -> None:
    settings = config.dppo
    stats = _Stats()
    window_start, window_steps = time.time(), 0
    while not loop.finished:
        sequences: list[list[ChunkTransition]] = [[] for _ in range(config.num_envs)]
        collected, checkpoint_due, log_due = 0, False, False
        while collected < settings.steps_per_iteration and not loop.finished:
            step, chunks, episodes = actor.step()
            for chunk in chunks:
                sequences[chunk.env_index].append(chunk)
            if config.bc_online_successes:
                for episode in episodes:
                    success.add_episode(episode)
            collected += config.num_envs
            loop.record(config.num_envs, step.finished)
            window_steps += config.num_envs
            loop.show(vloss=stats.get("ppo/value_loss", 0.0), kl=stats.get("ppo/approx_kl", 0.0))
            if loop.due(config.eval_every) and not loop.finished:
                periodic_eval()   # the policy does not change within an iteration
            checkpoint_due |= loop.due(config.checkpoint_every) or loop.finished
            log_due |= loop.due(config.log_every)
            loop.end_step()
        for chunk in actor.cut():
            sequences[chunk.env_index].append(chunk)
        if any(sequences):
            stats.add("ppo", dppo_update(learner, build_on_policy_batch(learner, [s for s in sequences if s]), success))
        if log_due:
            elapsed = max(time.time() - window_start, 1e-9)
            metrics = stats.flush()
            metrics.update({"train/success_recent": loop.recent_success_rate if loop.recent_success else 0.0,
                            "train/episodes": loop.episodes, "train/iterations": learner.iterations,
                            "perf/env_steps_per_s": window_steps / elapsed})
            run.log(loop.env_steps, **metrics)
            window_start, window_steps = time.time(), 0
        if checkpoint_due:
            # Only at iteration boundaries: a resumed run starts a fresh iteration with the updated policy.
            save_checkpoint()


# The CLI looks for these two names in every training method's module.
Config = OGPOConfig
