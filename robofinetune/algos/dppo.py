"""DPPO (arXiv 2409.00588): on-policy PPO through the last denoising steps of a diffusion or flow policy, the
on-policy mode of ``robofinetune train ogpo --mode=dppo`` (settings ``--dppo.<field>=...``).

    repeat
        collect ``steps_per_iteration`` env steps with the stochastic chain (chunk transitions, env returns)
        reward scaling (optional, DPPO's running std of the discounted return)
        V(s) and GAE over each env's chunk transitions (semi-MDP: a chunk of k steps discounts by gamma^k)
        PPO epochs over the last ``ft_denoising_steps`` chain transitions of every chunk:
            advantage (normalised) x denoising_discount^(steps to the chain's end), clip per transition
            (DPPO's schedule from clip_ratio_base at the first fine-tuned step to clip_ratio at the last),
            stop the epochs once approx KL passes target_kl; value regression to the GAE returns
        (the first ``critic_warmup_iterations`` iterations train the value only)

DPPO's can recipe (``cfg/robomimic/finetune/can/ft_ppo_diffusion_mlp.yaml``) is ``configs/ogpo/can_dppo.yaml``.
The update step is :func:`dppo_update`; the loop :func:`run_dppo`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Any, Callable

import numpy as np
import torch

from robofinetune.algos.chain_rl import (ChainLearner, ChainRLConfig, ChunkedActor, ChunkTransition, DenoisingChain,
                                         RunningMeans, SuccessBuffer, critic_observation, policy_step, ppo_chain_loss,
                                         ratio_log_prob, sampling_generator, unflatten_history)
from robofinetune.policies import GenerativePolicy
from robofinetune.rl import RunLoop, mlp
from robofinetune.runs import Run


@dataclass
class DPPOSettings:
    """Fields of the on-policy mode (``--mode=dppo``); set them as ``--dppo.<field>=value``.

    DPPO's can preset: 50 envs x 300 chunk steps (60k env steps) per iteration, 10 epochs, batch_size 7500
    denoising transitions ((chunk, k) pairs drawn at random: 20 gradient steps an epoch; here ``minibatch`` 750
    whole chains, the same transitions a step and steps an epoch),
    clip 0.01 (0.001 at the first fine-tuned step), gamma 0.999 per chunk, GAE 0.95, denoising discount 0.99,
    std floor 0.1, DDPM-20 with the last 10 steps fine-tuned, running reward scaling, target KL 1, two
    value-only iterations (``configs/ogpo/can_dppo.yaml``). The defaults here are the CPU settings used before.
    """

    steps_per_iteration: int = 4_000   # env steps collected (all envs) before each PPO update
    epochs: int = 5
    minibatch: int = 256               # chains (chunk transitions, all their fine-tuned steps) per gradient step
    actor_lr: float = 3e-5
    clip_ratio: float = 0.01
    # DPPO's clip schedule over the fine-tuned transitions: clip_ratio_base at the first, rising as
    # (e^(rate x) - 1) / (e^rate - 1) to clip_ratio at the last (x = 0 .. 1). 0 = clip_ratio for all.
    clip_ratio_base: float = 0.0
    clip_ratio_rate: float = 3.0
    denoising_discount: float = 0.99
    ft_denoising_steps: int = 0        # PPO over the last this-many chain transitions (0 = all K)
    gae_lambda: float = 0.95
    value_lr: float = 1e-3
    value_hidden_dim: int = 256
    value_depth: int = 2
    value_coef: float = 0.5
    normalize_advantage: bool = True
    target_kl: float = 0.0             # stop an iteration's epochs once approx KL exceeds this (0 = never)
    critic_warmup_iterations: int = 0  # first iterations that train the value only (DPPO: 2)
    # Divide rewards by the running std of the discounted return (DPPO's reward_scale_running): with sparse
    # 0/1 rewards and gamma 0.999 returns are small; this sets the advantages' scale before normalisation.
    reward_scale_running: bool = False
    bc_coef: float = 0.0               # DPPO uses no BC term; >0 adds the success-buffer BC loss


class RunningReturnScale(torch.nn.Module):
    """DPPO's running reward scale: per env, the discounted return G <- discount * G + r (reset at an
    episode's end); rewards are divided by the running std of every G seen. Buffers, so checkpoints keep it.
    It stays on the CPU whatever the learner's device: float64 bookkeeping per chunk transition."""

    def __init__(self, num_envs: int) -> None:
        super().__init__()
        self.register_buffer("returns", torch.zeros(num_envs, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("m2", torch.zeros((), dtype=torch.float64))

    def scale(self, sequences: list[list[ChunkTransition]]) -> list[np.ndarray]:
        """Update the statistics with this iteration's returns and return each sequence's scaled rewards."""
        seen = []
        for sequence in sequences:
            for transition in sequence:
                index = transition.env_index
                self.returns[index] = self.returns[index] * transition.discount + transition.reward
                seen.append(float(self.returns[index]))
                if transition.terminated or transition.truncated:
                    self.returns[index] = 0.0
        for value in seen:   # Welford
            self.count += 1
            delta = value - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (value - self.mean)
        std = math.sqrt(float(self.m2 / self.count)) if self.count > 1 else 1.0
        return [np.array([t.reward for t in sequence]) / (std + 1e-8) for sequence in sequences]


class DPPOLearner(ChainLearner):
    """The policy (all weights trained), the state-value critic, optimisers, on the policy's device
    (:class:`ChainLearner`). ``config`` is the run's config (a :class:`ChainRLConfig` with a ``dppo`` section of
    :class:`DPPOSettings`)."""

    optimizers = ("actor_optimizer", "value_optimizer")
    counters = ("iterations",)

    def __init__(self, config: ChainRLConfig, policy: GenerativePolicy, chain_steps: int,
                 chain: DenoisingChain | None = None) -> None:
        super().__init__()
        settings: DPPOSettings = config.dppo
        self.config, self.policy, self.chain_steps = config, policy, chain_steps
        self.chain = chain or DenoisingChain(chain_steps)
        obs_dim = policy.config.n_obs_steps * policy.config.obs_dim
        self.value = mlp(obs_dim, 1, settings.value_hidden_dim, settings.value_depth, layer_norm=True).to(policy.device)
        if settings.reward_scale_running:
            self.reward_scale = RunningReturnScale(config.num_envs)
        self.actor_optimizer = torch.optim.Adam(policy.parameters(), lr=settings.actor_lr)
        self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=settings.value_lr)
        self.generator = torch.Generator().manual_seed(config.seed)   # CPU: minibatch orders, any device alike
        self.sampling_generator = sampling_generator(policy.device, config.seed)
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


def clip_schedule(settings: DPPOSettings, transitions: int) -> float | torch.Tensor:
    """The PPO clip of each of the last ``transitions`` chain transitions (DPPO's clip_ploss_coef schedule)."""
    if settings.clip_ratio_base <= 0 or transitions < 2:
        return settings.clip_ratio
    x = torch.linspace(0.0, 1.0, transitions)
    rise = (torch.exp(settings.clip_ratio_rate * x) - 1) / (math.exp(settings.clip_ratio_rate) - 1)
    return settings.clip_ratio_base + (settings.clip_ratio - settings.clip_ratio_base) * rise


@dataclass
class OnPolicyBatch:
    obs: torch.Tensor            # (N, D)
    chains: torch.Tensor         # (N, K + 1, horizon, A)
    old_log_prob: torch.Tensor   # (N, K') of the fine-tuned (last K') transitions
    advantage: torch.Tensor      # (N,)
    returns: torch.Tensor        # (N,)

    def to(self, device: torch.device | str) -> "OnPolicyBatch":
        """The batch on ``device`` (a no-op for tensors already there)."""
        return OnPolicyBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


def build_on_policy_batch(learner: DPPOLearner, sequences: list[list[ChunkTransition]]) -> OnPolicyBatch:
    """Value estimates, GAE advantages and returns for one iteration's chunk transitions (per-env lists)."""
    settings, policy, device = learner.config.dppo, learner.policy, learner.device
    transitions = [transition for sequence in sequences for transition in sequence]
    # the iteration's rows go to the learner's device once; GAE runs on the CPU over numpy (a sequential scan)
    obs = torch.from_numpy(np.stack([t.obs for t in transitions])).to(device)
    next_obs = torch.from_numpy(np.stack([t.next_obs for t in transitions])).to(device)
    chains = torch.from_numpy(np.stack([t.chain for t in transitions])).to(device)
    with torch.no_grad():
        value, next_value = learner.values(obs).cpu().numpy(), learner.values(next_obs).cpu().numpy()
        log_prob = torch.cat([ratio_log_prob(policy, obs[i: i + 512], chains[i: i + 512],
                                             learner.config.ratio_element_mean, settings.ft_denoising_steps,
                                             learner.chain)
                              for i in range(0, len(transitions), 512)])
    rewards = (learner.reward_scale.scale(sequences) if settings.reward_scale_running
               else [np.array([t.reward for t in sequence]) for sequence in sequences])
    advantage = np.zeros(len(transitions))
    start = 0
    for sequence, reward in zip(sequences, rewards):
        end = start + len(sequence)
        advantage[start:end] = generalized_advantage(
            reward, np.array([t.discount for t in sequence]), value[start:end],
            next_value[start:end], np.array([t.terminated for t in sequence]),
            np.array([t.terminated or t.truncated for t in sequence]), settings.gae_lambda)
        start = end
    returns = advantage + value
    return OnPolicyBatch(obs, chains, log_prob, torch.as_tensor(advantage, dtype=torch.float32, device=device),
                         torch.as_tensor(returns, dtype=torch.float32, device=device))


def dppo_update(learner: DPPOLearner, batch: OnPolicyBatch, success: SuccessBuffer | None) -> dict[str, float]:
    """PPO epochs over one iteration: clipped ratio on the last K' chain transitions of every chunk, advantage
    (normalised) times denoising_discount^(steps to the chain's end); value regression to the GAE returns.
    While ``critic_warmup_iterations`` last, the value alone trains."""
    settings, config, policy, device = learner.config.dppo, learner.config, learner.policy, learner.device
    batch = batch.to(device)
    advantage = batch.advantage
    if settings.normalize_advantage and len(advantage) > 1:
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
    train_actor = learner.iterations >= settings.critic_warmup_iterations
    clip = clip_schedule(settings, batch.old_log_prob.shape[1])
    sums: dict[str, float] = {}
    steps = 0
    kl_stop = False
    for _ in range(settings.epochs):
        order = torch.randperm(len(advantage), generator=learner.generator).to(device)
        for start in range(0, len(order), settings.minibatch):
            rows = order[start: start + settings.minibatch]
            record: dict[str, float] = {}
            if train_actor:
                new_log_prob = ratio_log_prob(policy, batch.obs[rows], batch.chains[rows], config.ratio_element_mean,
                                              settings.ft_denoising_steps, learner.chain)
                pg_loss, ppo_stats = ppo_chain_loss(new_log_prob, batch.old_log_prob[rows], advantage[rows], clip,
                                                    settings.denoising_discount, config.max_log_ratio)
                if settings.target_kl > 0 and ppo_stats["approx_kl"] > settings.target_kl:
                    kl_stop = True   # DPPO: the policy left the trust region; no more steps this iteration
                    break
                loss = pg_loss
                if success is not None and len(success) and settings.bc_coef > 0:
                    bc_obs, bc_actions = success.sample(config.bc_batch_size, device)
                    loss = loss + settings.bc_coef * policy.bc_loss(unflatten_history(bc_obs, policy), bc_actions)
                record = {**ppo_stats, "pg_loss": pg_loss.item(),
                          "grad_norm": policy_step(policy, learner.actor_optimizer, loss, config.max_grad_norm)}
            value_loss = settings.value_coef * (learner.values(batch.obs[rows]) - batch.returns[rows]).pow(2).mean()
            learner.value_optimizer.zero_grad(set_to_none=True)
            value_loss.backward()
            learner.value_optimizer.step()
            for key, value in {**record, "value_loss": value_loss.item()}.items():
                sums[key] = sums.get(key, 0.0) + value
            steps += 1
        if kl_stop:
            break
    learner.iterations += 1
    stats = {key: value / max(steps, 1) for key, value in sums.items()}
    stats.update(adv_raw_abs=batch.advantage.abs().mean().item(), returns=batch.returns.mean().item(),
                 actor_trained=float(train_actor), kl_stop=float(kl_stop))
    return stats


def run_dppo(config: ChainRLConfig, learner: DPPOLearner, actor: ChunkedActor, loop: RunLoop, run: Run,
             success: SuccessBuffer, save_checkpoint: Callable[[], None], periodic_eval: Callable[[], Any]) -> None:
    """Iterations of collect-then-update until the env-step budget is spent."""
    settings: DPPOSettings = config.dppo
    stats = RunningMeans()
    window_start, window_steps = time.time(), 0
    while not loop.finished:
        sequences: list[list[ChunkTransition]] = [[] for _ in range(config.num_envs)]
        collected, checkpoint_due, log_due = 0, False, False
        while collected < settings.steps_per_iteration and not loop.finished:
            step, chunks, episodes = actor.step()
            # an aborted chunk (its Ray env worker died) is kept: truncated, it ends its env's sequence as a time
            # limit does, so GAE does not run on into the next episode; it bootstraps from the last real observation
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
            # every env keeps its slot (a scale's per-env return follows it) even if it had no chunk
            stats.add("ppo", dppo_update(learner, build_on_policy_batch(learner, sequences), success))
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
