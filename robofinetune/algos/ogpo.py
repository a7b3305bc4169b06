"""OGPO (arXiv 2605.03065): off-policy critics and PPO through the whole denoising chain of a diffusion or flow
policy. DPPO is its on-policy mode (``--mode=dppo``, :mod:`robofinetune.algos.dppo`); the chain, the chunk-level
MDP, the success buffer and acting in chunks are shared (:mod:`robofinetune.algos.chain_rl`).

    critic   Q ensemble, TD on replay chunk transitions (demo and online rows, ``offline_fraction`` demos):
                 y = R + gamma^k * mean over heads h and M chunks a' ~ pi'(s') of Q'_h(s', a')
             Q' the Polyak target (``tau``); pi' the EMA target actor when ``target_actor_tau`` > 0, else the
             policy. ``success_td``: after each TD step one more on a batch of successful episodes' transitions.
    actor    every ``actor_update_every`` env steps, for B replay states s (``actor_states``):
                 G chains ~ pi_old(.|s) (``group_size``); pi_old = the EMA target actor, or the policy as it is
                 A_h = Q_h(s, a0) - mean over the group of Q_h      (Q = target critic or online critic)
                 A   = min_h A_h if all > 0, max_h A_h if all < 0, else 0   (two-sided conservative advantage)
                 loss = -mean clip-PPO(r, A) + bc_coef * BC loss on the success buffer
             r = pi / pi_old of each chain transition (DPPO-style, clamped per-element mean over the executed
             steps) or, with ``ratio_per_chain``, one ratio per chain: the log-density averaged over the K + 1
             chain elements x horizon x A (the reference's). ``actor_epochs`` passes over the round's chains;
             the reference's one step per fresh group is actor_epochs 1 with all chains in one minibatch.
             After each step the EMA target actor moves by ``target_actor_tau``.

The update step is :func:`ogpo_actor_update` (actor) and :func:`critic_update` (TD); the loop
:func:`run_ogpo`.

Parity with the reference (``simchowitzlabpublic/OGPO_public``: ``scripts/ogpo/square.sh`` over
``ogpo/configs/algos/{common,ogpo}.yaml``; the agent in ``ogpo/agents/ogpo.py``, ``modules/pg_helper.py``).
"ref" is that recipe; ``can_reference.yaml`` copies it; ``can_cpu.yaml`` scales it for 2 CPU cores:

| setting | ref | can_reference.yaml | can_cpu.yaml | deviation and reason |
| --- | --- | --- | --- | --- |
| policy | flow, 4x512 MLP, chunk 4 executed whole, 1 obs frame, BC 500k steps | the base given (``--base``, flow) | same | ours: the project's BC bases (can: 3x256 MLP, horizon 8, 4 executed, 2 frames); the base is an input, not part of the RL recipe |
| chain | flow, K = 10, all 10 transitions trained | ``chain_steps`` 10 | 10 | none |
| exploration noise | tapered sigma_t = 0.05 sqrt(1 - t), score drift, means clipped to [-1, 1], z clipped at 3 sigma | ``chain_noise`` tapered, ``chain_std`` 0.05, ``chain_score_drift``, ``chain_clip_intermediate`` | same | z is not clipped: the reference's clip truncates 0.3% of draws and its log-density ignores the truncation; unclipped keeps the density exact |
| sampler / ratio denominator | EMA target actor, tau 0.005 | ``target_actor_tau`` 0.005 | same | none |
| ratio | one per chain, log-density / ((K+1) x 28 elements) incl. x_K's N(0, I) term, no clamp | ``ratio_per_chain`` | same | ours averages over horizon x A = 8 x 7 chunk elements (the can base predicts 8, executes 4); the ref's chunk is the executed one |
| PPO step | one per env step on fresh groups: 256 states x 32 chains, clip 0.01 | ``actor_update_every`` 1, ``actor_states`` 256, ``group_size`` 32, ``actor_epochs`` 1, ``actor_minibatch`` 8192 | every 4 env steps (one per chunk), 16 states x 8 chains | CPU: 8,192 chains x 11 passes per env step is a GPU load; 128 chains per chunk decision keeps an actor step ~0.1-0.3 s on one core |
| actor optimiser | Adam, lr 4.5e-5, linear warm-up 2k steps then cosine to 2e-5 over 50k, grad-norm clip 1000 | ``actor_lr`` 4.5e-5, ``actor_lr_warmup_steps`` 2000, ``actor_lr_decay_steps`` 50000, ``actor_lr_end`` 2e-5, ``max_grad_norm`` 1000 | same | the schedule's exact shape (optax warmup-cosine) is read from its arguments, not run |
| advantage | per-head group mean, conservative (safe max), from the target critic, no std normalisation | ``conservative_advantage``, ``advantage_critic`` target, ``advantage_rms_scale`` false | same | none |
| BC anchor | coef 1.0, 256 windows of online successes (falls back to the replay batch until the first success) | ``bc_coef`` 1.0, ``bc_batch_size`` 256, ``bc_from_demos`` false | same | no fallback: replay rows keep only the executed chunk, not the horizon the BC loss needs; BC starts at the first success |
| critic | 10 heads of 4 x 512, LayerNorm, mean over heads at one a' from the target actor, no Q-variance reduction | ``num_critics`` 10, ``critic_hidden_dim`` 512, ``critic_depth`` 4, ``next_action_samples`` 1, a' sampled at each TD step | 10 x 2 x 256, a' kept per row and refreshed (``next_action_cache``) | CPU: a 4 x 512 ensemble step is ~10x the 2 x 256 one; fresh a' per TD step was the largest TD cost (``benchmarks/td_update.py``) |
| critic optimiser | AdamW lr 4.5e-5 (ppo_lr, set at the online phase), wd 1e-5, constant; target tau 0.05 | ``critic_lr`` 4.5e-5, ``critic_weight_decay`` 1e-5, ``tau`` 0.05 | same | none |
| critic data | online only (offline_ratio 0), UTD 1, + one TD step on a success-buffer batch | ``offline_fraction`` 0, one TD step per env step, ``success_td`` | one TD step per chunk (0.25 per env step) | CPU: a TD step at 10 x 2 x 256 costs ~20 ms on one core |
| reward | -1 per step, +5 on success (env sparse false), gamma 0.99, chunk bootstrap gamma^4 | ``reward_scale`` 6, ``reward_offset`` -1, ``clip_target`` false | same | none (0/1 env reward mapped affinely) |
| warm-up | 10k env steps of collection, nothing trains | ``warmup_steps`` 10000 | same | the critic trains during the warm-up here (more TD steps on the same data) |
| rollouts | best-of-8 chunks by Q | one chunk from the policy's chain | same | not implemented: optional in the paper ("marginal gains"); evaluation uses the deterministic chain |
| compute | one GPU (JAX) | ``device`` auto: CUDA when present (policy, EMA actor, critics, optimisers, batches; replay buffers stay on the CPU) | the CPU (2 cores) | PyTorch, not JAX; the per-env-step cost on a GPU is what ``scripts/gpu_check.py`` measures (not yet run on one) |

The defaults (``can.yaml``, ``pointmass.yaml``) stay the earlier CPU design: per-transition ratios against the
round's policy, 4 epochs, online critic advantages, BC 0.1 on demos + online successes, constant noise.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from robofinetune.algos.chain_rl import (ChainLearner, ChainRLConfig, ChunkedActor, ChunkTransition, DenoisingChain,
                                         RunningMeans, SuccessBuffer, chain_of, critic_observation,
                                         demo_chunk_transitions, ema_update, evaluate, executed_chunk, gradient_norm,
                                         load_demos, policy_step, ppo_chain_loss, prepare_policy, ratio_log_prob,
                                         resolve_chain_device, sampling_generator, unflatten_history)
from robofinetune.algos.dppo import DPPOLearner, DPPOSettings, run_dppo
from robofinetune.errors import CheckpointError, ConfigError
from robofinetune.policies import GenerativePolicy, save_policy
from robofinetune.policies.base import SamplingGenerator
from robofinetune.rl import (CriticEnsemble, ReplayBuffer, RunLoop, TransitionBatch, VectorRollout, polyak_update,
                             sample_symmetric, symmetric_slots)
from robofinetune.rl.setup import base_path
from robofinetune.runs import Run


@dataclass
class OGPOConfig(ChainRLConfig):
    """``train ogpo``: the fields of :class:`ChainRLConfig` (task, base, chain, ratio, BC buffer, evaluation)
    and these."""

    mode: str = "ogpo"                 # ogpo | dppo
    # --- OGPO actor: PPO over the whole chain, Q(s, a0) as terminal reward ----------------------------------
    # Defaults are the CPU design of can.yaml: group 8 x 32 states = 256 chains per round every 100 env steps,
    # ~0.1-0.5 s of one core; the reference's one step per env step on 256 x 32 chains is can_reference.yaml.
    group_size: int = 8
    actor_states: int = 32             # replay states per actor round
    actor_update_every: int = 100      # env steps between actor rounds
    actor_epochs: int = 4              # passes over each round's chains (the ratio moves off 1 after the first)
    actor_minibatch: int = 128         # chains per gradient step
    actor_lr: float = 4.5e-5
    # The reference's schedule: linear warm-up over this many actor steps, then cosine to actor_lr_end at
    # actor_lr_decay_steps (counted from the first step). 0, 0: constant actor_lr.
    actor_lr_warmup_steps: int = 0
    actor_lr_decay_steps: int = 0
    actor_lr_end: float = 2e-5
    clip_ratio: float = 0.01
    # EMA target actor (the reference: 0.005): it samples the groups and the TD target's a' and is the PPO
    # ratio's denominator, moving by this fraction towards the policy after every actor step. 0: none; the
    # groups come from the policy as it is at the round, which is then the denominator.
    target_actor_tau: float = 0.0
    # One ratio per chain (the reference): the chain's log-density averaged over its K + 1 elements x horizon
    # x A (``chain_rl.chain_log_density``), unclamped. Off: one ratio per transition (``ratio_element_mean``).
    ratio_per_chain: bool = False
    denoising_discount: float = 1.0    # terminal reward only: every chain transition gets the same advantage
    # PPO over the last this-many chain transitions only (0 = all K, OGPO's whole chain). DPPO's
    # ft_denoising_steps: the first DDIM steps of a diffusion chain map a small change of the predicted noise
    # to a large change of the step's mean (x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) with abar near 0).
    ppo_last_transitions: int = 0
    conservative_advantage: bool = True
    # Which critic scores the group: "online" (the one TD trains) or "target" (its Polyak average, the
    # reference's, which moves less between two actor steps).
    advantage_critic: str = "online"
    # One batch-wide scale on the advantages of a round: divide by their root mean square over the chains the
    # conservative rule left active. Not GRPO's per-group std (a group whose chains the critic barely tells
    # apart keeps a small weight next to one it separates well); it only makes PPO's term independent of Q's
    # scale. With the sparse 0/1 reward the active advantages on can have an RMS of ~0.02 (4% of chains active),
    # which left PPO's gradient 30-80x smaller than the BC term's (measured at 6k env steps from the weak
    # diffusion / flow bases: pg_grad_norm x adv_rms vs bc_grad_norm in metrics.jsonl): the run was BC alone.
    advantage_rms_scale: bool = True
    pg_coef: float = 1.0               # weight of the PPO term (0 = the BC-only ablation)
    bc_coef: float = 0.1               # weight of the BC loss on the success-only buffer
    warmup_steps: int = 2_000          # env steps of critic-only learning before the first actor round
    # --- critic ensemble (shared robofinetune.rl.CriticEnsemble) --------------------------------------------
    num_critics: int = 10
    critic_hidden_dim: int = 256
    critic_depth: int = 2
    critic_lr: float = 3e-4
    critic_weight_decay: float = 0.0   # AdamW's decoupled decay (the reference: 1e-5); 0 = Adam
    layer_norm: bool = True
    n_step: int = 1                    # in chunk transitions (one already spans n_action_steps env steps)
    tau: float = 0.005                 # critic target Polyak rate (the reference: 0.05)
    critic_updates_per_step: float = 0.5   # per env step, i.e. n_action_steps * this per chunk transition
    critic_batch_size: int = 256
    # Q-variance reduction: the TD target is averaged over this many a' ~ pi(s'). Each costs critic_batch_size
    # more K-step chains per TD update, the largest CPU cost of OGPO, hence 2. The reference: 1.
    next_action_samples: int = 2
    # Keep those M chunks per replay row (sampled at the row's s') instead of sampling them inside every TD
    # update, and re-sample ``next_action_refresh`` rows per env step, oldest first, so they follow the
    # policy. A TD update then costs critic passes only, and the critic gets more of them per env step.
    next_action_cache: bool = True
    next_action_refresh: float = 32.0
    offline_fraction: float = 0.5      # share of demo chunks in critic batches and actor states (0 = online only)
    buffer_capacity: int = 0           # online chunk transitions kept (0 = all)
    # After every TD step, one more on a batch drawn only from transitions of successful online episodes (the
    # reference's use_success_buffer_q): the rare rows that carry the success reward are seen every step.
    success_td: bool = False
    # Per env step r -> reward_scale * r + reward_offset before chunk discounting, online and demo rows alike.
    # The env pays 0/1; the reference pays -1 a step and +5 on success: scale 6, offset -1.
    reward_scale: float = 1.0
    reward_offset: float = 0.0
    clip_target: bool = True           # sparse 0/1 reward with success terminating: Q lies in [0, 1]
    # --- on-policy mode ---------------------------------------------------------------------------------------
    dppo: DPPOSettings = field(default_factory=DPPOSettings)


# --- OGPO's advantage -----------------------------------------------------------------------------------------

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


def scheduled_lr(config: OGPOConfig, step: int) -> float:
    """The actor's learning rate at actor step ``step`` (0-based): constant, or linear warm-up then cosine."""
    if config.actor_lr_decay_steps <= 0 and config.actor_lr_warmup_steps <= 0:
        return config.actor_lr
    if step < config.actor_lr_warmup_steps:
        return config.actor_lr * (step + 1) / config.actor_lr_warmup_steps
    span = max(config.actor_lr_decay_steps - config.actor_lr_warmup_steps, 1)
    progress = min((step - config.actor_lr_warmup_steps) / span, 1.0)
    return config.actor_lr_end + (config.actor_lr - config.actor_lr_end) * 0.5 * (1 + math.cos(math.pi * progress))


# --- next actions for the TD target, kept per replay row ------------------------------------------------------

def sample_next_actions(policy: GenerativePolicy, next_obs: torch.Tensor, samples: int, chain_steps: int,
                        chain: DenoisingChain | None = None, generator: SamplingGenerator = None) -> torch.Tensor:
    """(B, M, A): M executed chunks a' from the policy's stochastic chain at each of B flat histories s', on the
    policy's device."""
    next_obs = next_obs.to(policy.device)
    chains = (chain or DenoisingChain(chain_steps)).sample(policy, next_obs.repeat_interleave(samples, dim=0),
                                                           generator)
    return executed_chunk(chains[:, -1], policy.config.n_action_steps).reshape(len(next_obs), samples, -1)


class NextActionCache:
    """M chunks a' ~ pi(s') for the bootstrap state s' of every row of one replay buffer (n_step 1: the row's
    own ``next_obs``), in the executed, normalised form the critic takes.

    Sampling them inside every TD update (2 x 256 chains of K = 10 denoiser passes) made it 2.3x (critic width
    256) to 5.4x (width 128) dearer than its critic passes (``benchmarks/td_update.py``), which held the can preset
    to 0.25 TD updates per env step. Kept here, they are refreshed round-robin (``refresh``), so each is at most
    one refresh cycle (~1k env steps on can at 32 rows per env step) behind the policy, which PPO's small clip
    moves slowly. The target is the same up to that lag; the random numbers drawn differ. The chunks are kept
    as numpy on the CPU beside their replay rows; a batch's go to the learner's device with the batch."""

    def __init__(self, buffer: ReplayBuffer, samples: int, action_dim: int) -> None:
        self.buffer, self.samples = buffer, int(samples)
        self.actions = np.zeros((buffer.capacity, self.samples, action_dim), np.float32)
        self.cursor = 0

    @torch.no_grad()
    def fill(self, slots: np.ndarray, policy: GenerativePolicy, chain_steps: int, batch: int = 1024,
             chain: DenoisingChain | None = None, generator: SamplingGenerator = None) -> None:
        """Sample fresh a' for ``slots`` with the policy as it is now."""
        slots = np.asarray(slots, np.int64)
        for start in range(0, len(slots), batch):
            rows = slots[start: start + batch]
            next_obs = torch.from_numpy(self.buffer.next_obs[rows])
            self.actions[rows] = sample_next_actions(policy, next_obs, self.samples, chain_steps, chain,
                                                     generator).cpu().numpy()

    def refresh(self, rows: int, policy: GenerativePolicy, chain_steps: int,
                chain: DenoisingChain | None = None, generator: SamplingGenerator = None) -> None:
        """Re-sample the next ``rows`` rows after the last refreshed one, wrapping over the rows held."""
        size = len(self.buffer)
        rows = min(int(rows), size)
        if rows <= 0:
            return
        slots = (self.cursor + np.arange(rows)) % size
        self.fill(slots, policy, chain_steps, chain=chain, generator=generator)
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
                        config: OGPOConfig, gamma_chunk: float, device: torch.device | str = "cpu"
                        ) -> tuple[TransitionBatch, torch.Tensor | None]:
    """A symmetric critic batch and, with the cache on, its rows' kept next actions (B, M, A), on ``device``."""
    return gather_critic_batch(symmetric_slots(offline, online, config.critic_batch_size, config.offline_fraction),
                               caches, config, gamma_chunk, device)


def sample_success_batch(success: ReplayBuffer, caches: dict[str, NextActionCache], config: OGPOConfig,
                         gamma_chunk: float, device: torch.device | str = "cpu"
                         ) -> tuple[TransitionBatch, torch.Tensor | None]:
    """A critic batch drawn only from the transitions of successful episodes (``success_td``), on ``device``."""
    return gather_critic_batch([(success, success.sample_slots(config.critic_batch_size))], caches, config,
                               gamma_chunk, device)


class SuccessfulEpisodes:
    """Holds each env's chunk transitions until its episode ends and hands back those of the episodes that
    ended in success (terminated: success ends an episode early; a time limit truncates it)."""

    def __init__(self, num_envs: int) -> None:
        self.running: list[list[ChunkTransition]] = [[] for _ in range(num_envs)]

    def add(self, chunks: list[ChunkTransition]) -> list[ChunkTransition]:
        won: list[ChunkTransition] = []
        for chunk in chunks:
            self.running[chunk.env_index].append(chunk)
            if chunk.terminated or chunk.truncated:
                if chunk.terminated:
                    won += self.running[chunk.env_index]
                self.running[chunk.env_index] = []
        return won


def gather_critic_batch(parts: list[tuple[ReplayBuffer, np.ndarray]], caches: dict[str, NextActionCache],
                        config: OGPOConfig, gamma_chunk: float, device: torch.device | str = "cpu"
                        ) -> tuple[TransitionBatch, torch.Tensor | None]:
    """Rows gathered from the (CPU, numpy) replay buffers, moved to ``device`` as one batch."""
    batch = TransitionBatch.concatenate([buffer.gather(slots, config.n_step, gamma_chunk) for buffer, slots in parts])
    if not caches:
        return batch.to_torch(device), None
    cache_of = {id(cache.buffer): cache for cache in caches.values()}
    next_actions = np.concatenate([cache_of[id(buffer)].actions[slots] for buffer, slots in parts])
    return batch.to_torch(device), torch.from_numpy(next_actions).to(device)



# --- learner and update steps -----------------------------------------------------------------------------------

class OGPOLearner(ChainLearner):
    """The policy (all weights trained), its EMA target actor (``target_actor_tau`` > 0), the critic ensemble
    and its target, optimisers, all on the policy's device (:class:`ChainLearner`)."""

    optimizers = ("actor_optimizer", "critic_optimizer")
    counters = ("critic_updates", "actor_rounds")

    def __init__(self, config: OGPOConfig, policy: GenerativePolicy, chain_steps: int,
                 chain: DenoisingChain | None = None) -> None:
        super().__init__()
        self.config, self.policy, self.chain_steps = config, policy, chain_steps
        self.chain = chain or DenoisingChain(chain_steps)
        if config.target_actor_tau > 0:
            self.target_policy = copy.deepcopy(policy).requires_grad_(False)
        obs_dim = policy.config.n_obs_steps * policy.config.obs_dim
        action_dim = policy.config.n_action_steps * policy.config.action_dim
        self.critic = CriticEnsemble(obs_dim, action_dim, config.num_critics, config.critic_hidden_dim,
                                     config.critic_depth, config.layer_norm).to(policy.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optimizer = torch.optim.Adam(policy.parameters(), lr=config.actor_lr)
        # AdamW with weight decay 0 is Adam; its decay is decoupled from the gradient's scale (the reference's)
        self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=config.critic_lr,
                                                  weight_decay=config.critic_weight_decay)
        self.generator = torch.Generator().manual_seed(config.seed)   # CPU: minibatch orders, any device alike
        self.sampling_generator = sampling_generator(policy.device, config.seed)
        self.critic_updates = 0
        self.actor_rounds = 0

    @property
    def sampler(self) -> GenerativePolicy:
        """The policy that samples actor groups and TD next actions: the EMA target actor, else the policy."""
        return self.target_policy if self.config.target_actor_tau > 0 else self.policy

    @property
    def actor_steps(self) -> int:
        """Actor optimiser steps taken (Adam's own count, so a resumed run continues the schedule)."""
        state = next(iter(self.actor_optimizer.state.values()), None)
        return int(state["step"]) if state else 0


def mean_next_value(learner: OGPOLearner, next_obs: torch.Tensor, next_actions: torch.Tensor | None = None) -> torch.Tensor:
    """OGPO's TD bootstrap, (B,): the target ensemble's mean over heads, averaged over M chunks a' from the
    sampler's stochastic chain at each s': ``next_actions`` (B, M, A) when kept, else ``next_action_samples``
    drawn now."""
    config, policy = learner.config, learner.policy
    if next_actions is None:
        next_actions = sample_next_actions(learner.sampler, next_obs, max(1, config.next_action_samples),
                                           learner.chain_steps, learner.chain, learner.sampling_generator)
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


def actor_log_prob(learner: OGPOLearner, policy: GenerativePolicy, flat_obs: torch.Tensor,
                   chains: torch.Tensor) -> torch.Tensor:
    """(N, K') log-probabilities of ``chains`` under ``policy`` that the actor's PPO ratio is built from."""
    config = learner.config
    return ratio_log_prob(policy, flat_obs, chains, config.ratio_element_mean, config.ppo_last_transitions,
                          learner.chain, per_chain=config.ratio_per_chain)


def ogpo_actor_update(learner: OGPOLearner, states: torch.Tensor, success: SuccessBuffer | None) -> dict[str, float]:
    """One OGPO actor round on ``states`` (B, D) flat observation histories.

    Chains, their old log-probs and advantages are computed once, with the sampler (the EMA target actor, or the
    policy as it is now); then ``actor_epochs`` passes of PPO minibatch steps move the policy, each followed by
    the target actor's EMA step. Chains with zero advantage (the heads disagree) add nothing to the PPO
    gradient and are skipped (the loss stays the mean over all chains).
    """
    config, policy = learner.config, learner.policy
    group, n_act, device = config.group_size, policy.config.n_action_steps, learner.device
    with torch.no_grad():
        group_states = states.to(device).repeat_interleave(group, dim=0)   # rows of one state are consecutive
        chains = learner.chain.sample(learner.sampler, group_states, learner.sampling_generator)
        old_log_prob = actor_log_prob(learner, learner.sampler, group_states, chains)
        critic = learner.critic_target if config.advantage_critic == "target" else learner.critic
        q_heads = critic(critic_observation(group_states, policy), executed_chunk(chains[:, -1], n_act))
        head_advantages = group_relative(q_heads, group)
        advantage = conservative_advantage(head_advantages) if config.conservative_advantage else head_advantages.mean(0)
    active = torch.nonzero(advantage != 0).squeeze(1) if config.pg_coef > 0 else advantage.new_zeros(0, dtype=torch.long)
    active_share = active.numel() / max(advantage.numel(), 1)
    stats = {"adv_abs": advantage.abs().mean().item(), "adv_active": active_share,
             "q_group_std": q_heads.mean(0).reshape(-1, group).std(dim=1).mean().item(),
             "q_head_std": q_heads.std(dim=0).mean().item()}
    if active.numel():
        stats["adv_rms"] = advantage[active].square().mean().sqrt().item()
    if config.advantage_rms_scale:
        advantage = rms_scaled(advantage)
    sums: dict[str, float] = {}
    steps = 0
    split_logged = False
    for _ in range(config.actor_epochs):
        order = active[torch.randperm(active.numel(), generator=learner.generator).to(device)]
        starts = range(0, order.numel(), config.actor_minibatch) if order.numel() else [None]
        for start in starts:
            loss = torch.zeros((), device=device)
            if start is not None:
                rows = order[start: start + config.actor_minibatch]
                new_log_prob = actor_log_prob(learner, policy, group_states[rows], chains[rows])
                pg_loss, ppo_stats = ppo_chain_loss(new_log_prob, old_log_prob[rows], advantage[rows], config.clip_ratio,
                                                    config.denoising_discount, config.max_log_ratio)
                # The objective is the mean over *all* chains, zero-advantage ones included: scaling each
                # minibatch of active chains by the active share keeps PPO's weight against BC as in OGPO.
                loss = loss + config.pg_coef * pg_loss * active_share
                for key, value in ppo_stats.items():
                    sums[key] = sums.get(key, 0.0) + value
                sums["pg_loss"] = sums.get("pg_loss", 0.0) + pg_loss.item()
            if success is not None and len(success) and config.bc_coef > 0:
                bc_obs, bc_actions = success.sample(config.bc_batch_size, device)
                bc_loss = policy.bc_loss(unflatten_history(bc_obs, policy), bc_actions)
                if not split_logged and start is not None:
                    # Once a round, the two terms' gradient norms apart: how much PPO steers next to BC.
                    stats["pg_grad_norm"] = gradient_norm(policy, config.pg_coef * pg_loss * active_share)
                    stats["bc_grad_norm"] = gradient_norm(policy, config.bc_coef * bc_loss)
                    split_logged = True
                loss = loss + config.bc_coef * bc_loss
                sums["bc_loss"] = sums.get("bc_loss", 0.0) + bc_loss.item()
            if loss.requires_grad:
                for group_settings in learner.actor_optimizer.param_groups:
                    group_settings["lr"] = scheduled_lr(config, learner.actor_steps)
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + policy_step(policy, learner.actor_optimizer, loss,
                                                                            config.max_grad_norm)
                if config.target_actor_tau > 0:
                    ema_update(learner.target_policy, policy, config.target_actor_tau)
                steps += 1
    learner.actor_rounds += 1
    stats.update({key: value / max(steps, 1) for key, value in sums.items()})
    stats["lr"] = learner.actor_optimizer.param_groups[0]["lr"]
    return stats


# --- set-up and training -------------------------------------------------------------------------------------

def _check_config(config: OGPOConfig) -> None:
    if config.mode not in ("ogpo", "dppo"):
        raise ConfigError(f"config field 'mode' is '{config.mode}'; choose 'ogpo' or 'dppo'")
    for name in ("num_envs", "total_env_steps", "group_size", "actor_states", "actor_epochs", "actor_minibatch",
                 "critic_batch_size", "num_critics", "actor_update_every"):
        if getattr(config, name) < 1:
            raise ConfigError(f"config field '{name}' must be >= 1, got {getattr(config, name)}")
    if config.ppo_last_transitions < 0:
        raise ConfigError(f"config field 'ppo_last_transitions' must be >= 0 (0 = all), got {config.ppo_last_transitions}")
    if config.group_size < 2:
        raise ConfigError("config field 'group_size' must be >= 2: the baseline is the group's mean Q")
    if config.advantage_critic not in ("online", "target"):
        raise ConfigError(f"config field 'advantage_critic' is '{config.advantage_critic}'; choose 'online' or 'target'")
    if not 0.0 <= config.target_actor_tau <= 1.0:
        raise ConfigError(f"config field 'target_actor_tau' must be in [0, 1], got {config.target_actor_tau}")
    if not 0.0 <= config.offline_fraction <= 1.0:
        raise ConfigError(f"config field 'offline_fraction' must be in [0, 1], got {config.offline_fraction}")
    if config.clip_target and (config.reward_scale, config.reward_offset) != (1.0, 0.0):
        raise ConfigError("config field 'clip_target' clamps TD targets to [0, 1], the range of the 0/1 reward; with "
                          f"reward_scale {config.reward_scale} and reward_offset {config.reward_offset} set "
                          "--clip_target=false")
    if config.mode == "ogpo" and config.next_action_cache and config.n_step != 1:
        raise ConfigError(f"config field 'next_action_cache' keeps a' for each row's own next state, so it needs "
                          f"n_step 1 (got n_step {config.n_step}); set --next_action_cache=false for n-step targets")
    if config.dppo.steps_per_iteration < config.num_envs:
        raise ConfigError("config field 'dppo.steps_per_iteration' must be >= num_envs")
    if config.num_env_workers < 0:
        raise ConfigError(f"config field 'num_env_workers' must be >= 0 (0 = local env processes), "
                          f"got {config.num_env_workers}")
    if config.num_env_workers > 0:
        from robofinetune.distributed.ray_envs import check_env_workers

        check_env_workers(config.num_envs, config.num_env_workers, 200_000 + 1_000 * config.seed)
    resolve_chain_device(config.device)   # names a bad device (or a CUDA one this machine lacks) before any loading
    chain_of(config, max(config.chain_steps, 1))   # names a bad chain_noise / chain_score_drift


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
        if config.success_td:   # transitions of successful online episodes, for the extra TD step
            buffers["success"] = ReplayBuffer(obs_dim, action_dim, capacity, seed=config.seed + 3)
    chain = chain_of(config, chain_steps)
    learner: OGPOLearner | DPPOLearner = (OGPOLearner if config.mode == "ogpo" else DPPOLearner)(
        config, policy, chain_steps, chain)
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
        for buffer in buffers.values():
            buffer.end_streams()  # envs restart: episodes in flight at the checkpoint are over
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
                rows = demo_chunk_transitions(episode, policy, config.gamma, config.reward_scale, config.reward_offset)
                buffers["offline"].add_transitions(rows["obs"], rows["action"], rows["reward"], rows["next_obs"],
                                        rows["terminated"], rows["truncated"],
                                        -(number * policy.config.n_action_steps + rows["stream"]) - 1)
            if caches:
                caches["offline"].fill(np.arange(len(buffers["offline"])), learner.sampler, chain_steps, chain=chain,
                                       generator=learner.sampling_generator)
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

    env_seed = 200_000 + 1_000 * config.seed
    if config.num_env_workers > 0:   # the same envs and seeds, in Ray actors; the policy stays here
        envs = make_vector_env(config.task, num_envs=config.num_envs, seed=env_seed, backend="ray",
                               num_workers=config.num_env_workers, ray_address=config.ray_address or None)
    else:
        envs = make_vector_env(config.task, num_envs=config.num_envs, seed=env_seed)
    rewards = (config.reward_scale, config.reward_offset) if config.mode == "ogpo" else (1.0, 0.0)
    actor = ChunkedActor(VectorRollout(envs), policy, chain_steps, config.gamma, chain, *rewards,
                         generator=learner.sampling_generator)
    try:
        actor.reset(seed=env_seed + loop.env_steps)
        loop.start()
        if config.mode == "ogpo":
            run_ogpo(config, learner, actor, loop, run, buffers, caches, success, gamma_chunk, save_checkpoint,
                     periodic_eval)
        else:
            run_dppo(config, learner, actor, loop, run, success, save_checkpoint, periodic_eval)
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


def run_ogpo(config: OGPOConfig, learner: OGPOLearner, actor: ChunkedActor, loop: RunLoop, run: Run,
             buffers: dict[str, ReplayBuffer], caches: dict[str, NextActionCache], success: SuccessBuffer,
             gamma_chunk: float, save_checkpoint: Callable[[], None], periodic_eval: Callable[[], None]) -> None:
    """Env steps with TD steps overlapping them, and an actor round every ``actor_update_every`` env steps."""
    # The replay buffers stay numpy on the CPU (they outgrow a GPU's memory on long runs and are written to
    # checkpoints as .npz); each sampled batch moves to the learner's device as one copy.
    offline, online, success_rows = buffers["offline"], buffers["online"], buffers.get("success")
    device, generator = learner.device, learner.sampling_generator
    stats = RunningMeans()
    update_debt, refresh_debt = 0.0, 0.0
    window_start, window_steps = time.time(), 0
    successful = SuccessfulEpisodes(config.num_envs)

    def learn_while_envs_step(count: int, refresh_rows: int) -> None:
        # critic updates and next-action refreshes overlap the env processes' stepping
        for _ in range(count):
            batch, next_actions = sample_critic_batch(offline, online, caches, config, gamma_chunk, device)
            stats.add("critic", critic_update(learner, batch, next_actions))
            if success_rows is not None and len(success_rows):
                batch, next_actions = sample_success_batch(success_rows, caches, config, gamma_chunk, device)
                stats.add("critic_success", critic_update(learner, batch, next_actions))
        held = sum(len(cache.buffer) for cache in caches.values())
        for name, cache in caches.items():
            cache.refresh(round(refresh_rows * len(cache.buffer) / max(held, 1)), learner.sampler, learner.chain_steps,
                          chain=learner.chain, generator=generator)

    def add(buffer: ReplayBuffer, name: str, chunks: list[ChunkTransition]) -> None:
        slots = buffer.add_transitions(np.stack([c.obs for c in chunks]), np.stack([c.action for c in chunks]),
                                       np.array([c.reward for c in chunks]), np.stack([c.next_obs for c in chunks]),
                                       np.array([c.terminated for c in chunks]),
                                       np.array([c.truncated for c in chunks]), [c.env_index for c in chunks])
        if caches:
            caches[name].fill(slots, learner.sampler, learner.chain_steps, chain=learner.chain, generator=generator)

    while not loop.finished:
        has_data = len(online) + len(offline) > 0
        update_debt += config.critic_updates_per_step * config.num_envs if has_data else 0.0
        count = int(update_debt)
        update_debt -= count
        refresh_debt += config.next_action_refresh * config.num_envs if caches else 0.0
        refresh_rows = int(refresh_debt)
        refresh_debt -= refresh_rows
        step, chunks, episodes = actor.step(while_waiting=lambda: learn_while_envs_step(count, refresh_rows))
        real = [chunk for chunk in chunks if not chunk.aborted]   # an aborted chunk's last step never happened
        if real:
            add(online, "online", real)
        if success_rows is not None:
            won = successful.add(chunks)
            if won:
                add(success_rows, "success", won)
        if config.bc_online_successes:
            for episode in episodes:
                success.add_episode(episode)
        loop.record(config.num_envs, step.finished)
        window_steps += config.num_envs
        if (loop.env_steps >= config.warmup_steps and loop.due(config.actor_update_every)
                and len(online) + len(offline) > 0):
            states = sample_symmetric(offline, online, config.actor_states, 1, gamma_chunk, config.offline_fraction).obs
            stats.add("actor", ogpo_actor_update(learner, torch.as_tensor(states, device=device), success))
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


# The CLI looks for these two names in every training method's module.
Config = OGPOConfig
