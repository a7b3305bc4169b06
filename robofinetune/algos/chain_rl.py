"""The denoising chain of a diffusion or flow policy as an RL policy, and what OGPO and DPPO both need around it.

The policy acts in action chunks, so RL runs at the chunk level (a semi-MDP):

    state s      the observation history the policy conditions on (n_obs_steps frames), flattened
    action a0    the chain's final element: a normalised chunk (horizon, A). The env executes the first
                 n_action_steps of unnormalise(clip(a0)); a critic sees exactly that executed part,
                 clip(a0[:n_action_steps]) in normalised units.
    transition   s -> s' after the chunk's k env steps (k = n_action_steps unless the episode ends first),
                 reward R = sum_i gamma^i r_i over those steps, bootstrap discount gamma^k (0 on success).

The chain a_K -> ... -> a_0 is a K-step MDP inside every env step with Gaussian transitions
(:class:`DenoisingChain`): for diffusion a DDIM step plus noise of std >= chain_min_std (DPPO's stochastic
DDIM), for flow a noise-injected Euler step (ReinFlow, OGPO), with constant noise or OGPO's tapered
sigma_t = sigma sqrt(1 - t) and its score drift. The PPO ratio is built from these densities
(:func:`ratio_log_prob`: per transition as DPPO does, or one per chain as OGPO does) and clipped
(:func:`ppo_chain_loss`).

Also here: acting in chunks with the stochastic chain (:class:`ChunkedActor`), demos as chunk transitions,
the success-only BC buffer, the settings both modes share (:class:`ChainRLConfig`) and the set-up of the base.
``robofinetune.algos.ogpo`` and ``robofinetune.algos.dppo`` build on this module; it imports neither.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from robofinetune.data.chunks import ActionChunkWindows
from robofinetune.data.episode import Episode
from robofinetune.errors import CheckpointError, ConfigError
from robofinetune.policies import GenerativePolicy
from robofinetune.policies.base import SamplingGenerator, sampling_noise
from robofinetune.rl import RunLoop, VectorRollout, flatten_observation
from robofinetune.rl.learner import CheckpointedLearner
from robofinetune.rl.setup import base_path, load_base_policy, load_demo_episodes


@dataclass
class ChainRLConfig:
    """Fields both modes (OGPO and its on-policy DPPO mode) read. ``OGPOConfig`` extends it."""

    task: str = "can"
    base: str = ""                     # base policy folder (diffusion or flow); default policies/<task>/weak_diffusion
    dataset: str = ""                  # demos (critic's offline half and the BC buffer); default datasets/<task>_scripted_200.hdf5
    num_demos: int = 0                 # use the first N successful demos (0 = all; -1 = none)
    seed: int = 0
    total_env_steps: int = 300_000
    num_envs: int = 2                  # env processes; critic updates overlap their stepping
    num_env_workers: int = 0           # > 0: the envs run in this many Ray actors (robofinetune/distributed); 0: local
    ray_address: str = ""              # with num_env_workers: "" starts a local Ray, "auto" / "ray://host:port" joins one
    # --- the denoising chain -------------------------------------------------------------------------------
    # K = 10 (OGPO's flow preset): every actor update costs B*G*K denoiser passes, so K is the first knob on
    # a CPU. act() (eval, deploy) is switched to the same K, so the trained chain is the deployed chain.
    chain_steps: int = 0               # 0 = the base's inference_steps
    chain_std: float = 0.0             # per-transition noise std (floor for diffusion); 0 = the checkpoint's chain_min_std
    # Diffusion: DDIM eta of the trained chain. act() (eval, deploy) runs DDIM with eta 0, so with eta 0 every
    # trained transition is N(deployed DDIM step, chain_std^2) and the deployed sampler is exactly the mean path
    # of the trained chain (as for flow). With DPPO's eta 1 the deployed sampler drifts from what PPO shaped.
    chain_eta: float = 0.0
    # Flow only. "constant": std chain_std at every Euler step, the last included. "tapered" (OGPO's reference):
    # sigma_t = chain_std * sqrt(1 - t) at step time t = k / K, so the noise fades as the chunk forms.
    chain_noise: str = "constant"
    # Flow, tapered only: add the score term (sigma_t^2 / 2) grad log p_t = (chain_std^2 / 2)(t v - x) to the
    # Euler drift (OGPO's error_correct_sde_to_ode), so the noisy chain keeps the marginals of the deterministic
    # one that act() deploys instead of widening them.
    chain_score_drift: bool = False
    chain_clip_intermediate: bool = False   # flow: clip each step's mean to [-1, 1] (OGPO's clip_intermediate_actions)
    # --- the PPO ratio --------------------------------------------------------------------------------------
    # Per transition, as DPPO computes it: per-element log-densities clamped to [-5, 2], over the executed
    # steps of the chunk only, averaged over elements (a geometric mean per element). With the summed density
    # of the whole chunk (8 x 7 elements on can, std 0.1) one Adam step moved the ratio far past any clip
    # (measured on can: mean ratio 1.7-3.1, 73% of transitions clipped, approx KL 0.9-2.4).
    ratio_element_mean: bool = True
    max_log_ratio: float = 5.0         # log-ratio clamp before exp (the ratio is clipped anyway)
    max_grad_norm: float = 1.0
    # --- the success-only BC buffer -------------------------------------------------------------------------
    bc_batch_size: int = 128
    success_capacity: int = 100_000    # BC windows kept (one per env step of a successful episode)
    bc_from_demos: bool = True         # seed the success buffer with the (successful) demos
    # Also admit the run's own successful episodes. Their actions are the stochastic chain's, noisy: on can
    # their gripper commands averaged |g| 0.66 where every demo's is +-1 (see README, OGPO on can).
    bc_online_successes: bool = True
    gamma: float = 0.99                # per env step; a chunk of k steps discounts by gamma^k
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
    # Where the policy, its EMA target actor, the critics / value net, their optimisers and every training batch
    # live: "auto" = CUDA when torch sees one, else the CPU (the project's rule: use the GPU when it is there);
    # "cpu", "cuda" or "cuda:N" to choose. Env-facing arrays and replay buffers stay numpy on the CPU;
    # checkpoints are written on the CPU, so a run resumes on either.
    device: str = "auto"
    progress: bool = True


# --- device placement ---------------------------------------------------------------------------------------------

DEVICE_TYPES = ("cpu", "cuda")


def resolve_chain_device(name: str) -> torch.device:
    """The device config field ``device`` names: residual RL's :func:`~robofinetune.algos.residual.resolve_device`
    (``auto`` -> CUDA when present, else CPU; a string torch cannot read is a ConfigError naming the field), then
    checked here against what OGPO/DPPO run on and what this machine has, so a wrong value fails before the base
    loads instead of deep inside the first CUDA call."""
    from robofinetune.algos.residual import resolve_device

    device = resolve_device(name)
    if device.type not in DEVICE_TYPES:
        raise ConfigError(f"config field 'device' is {name!r}; choose auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"config field 'device' is {name!r} but torch sees no CUDA device here; use auto or cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"config field 'device' is {name!r} but torch sees {count} CUDA device(s) "
                              f"(cuda:0..cuda:{count - 1})")
    return device


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (nested dicts, lists, tuples) moved to the CPU: what a checkpoint holds,
    so that one written on a GPU loads on a machine without one."""
    if torch.is_tensor(value):
        return value.cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value


def sampling_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """The training chain's noise source, on ``device`` so that noise is drawn where the denoiser runs (a CPU
    generator would draw on the CPU and copy every step). CUDA's generator (Philox) gives other numbers than the
    CPU's (Mersenne twister) for the same seed: a run is reproducible on the same kind of device, not across."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


class ChainLearner(CheckpointedLearner):
    """A :class:`CheckpointedLearner` that lives on its policy's device: OGPO's and DPPO's learners.

    ``sampling_generator`` draws the noise of every training chain (groups, next actions, rollouts) on that
    device. Checkpoints hold CPU tensors only, plus the generator's state with its device type and, on CUDA, the
    global CUDA RNG (the BC loss draws from it). Resuming on another kind of device reseeds the generator from
    (seed, updates so far) instead, since a CUDA generator state does not fit a CPU generator."""

    policy: GenerativePolicy
    sampling_generator: torch.Generator

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def _progress(self) -> int:
        return sum(int(getattr(self, name)) for name in self.counters)

    def learner_state(self) -> dict[str, Any]:
        state = to_cpu(super().learner_state())
        state["sampling_generator"] = {"device": self.sampling_generator.device.type,
                                       "state": self.sampling_generator.get_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_learner_state(self, state: dict[str, Any]) -> None:
        super().load_learner_state(state)   # load_state_dict copies into this device; optimisers cast their state
        saved = state.get("sampling_generator")
        if saved is not None and saved["device"] == self.sampling_generator.device.type:
            self.sampling_generator.set_state(saved["state"])
        else:
            seed = int(self.config.seed) + 1_000_003 * (self._progress() + 1)
            self.sampling_generator.manual_seed(seed)
            if saved is not None:
                print(f"checkpoint written on {saved['device']}, resuming on {self.device.type}: the chain's noise "
                      f"generator is reseeded ({seed}); the run goes on, its random draws differ from an "
                      f"uninterrupted run's")
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)


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


# --- the stochastic chain: sampling and transition densities ------------------------------------------------

CHAIN_NOISE = ("constant", "tapered")


class DenoisingChain:
    """The K-step stochastic chain PPO trains, x_K ~ N(0, I) -> ... -> x_0 = the action chunk.

    With constant noise and neither score drift nor clipping this is the policy's own ``sample(stochastic=True)``
    / ``chain_log_prob`` (diffusion or flow). Otherwise (flow only) each Euler step is
        x_{k+1} ~ N(mean_k, sigma_k^2),  mean_k = x_k + dt (v(x_k, t_k) + drift_k),  t_k = k / K,
        sigma_k = std sqrt(1 - t_k) (tapered) or std,  drift_k = (std^2 / 2)(t_k v - x_k) (tapered score drift),
    mean_k clipped to [-1, 1] with ``clip_intermediate``; std is the policy's ``chain_min_std``.
    """

    def __init__(self, steps: int, noise: str = "constant", score_drift: bool = False,
                 clip_intermediate: bool = False) -> None:
        if noise not in CHAIN_NOISE:
            raise ConfigError(f"config field 'chain_noise' is '{noise}'; choose one of {list(CHAIN_NOISE)}")
        if score_drift and noise != "tapered":
            raise ConfigError("config field 'chain_score_drift' needs chain_noise 'tapered' (with constant noise "
                              "the score term divides by 1 - t, which is 0 at the last step)")
        self.steps, self.noise, self.score_drift, self.clip_intermediate = int(steps), noise, score_drift, clip_intermediate

    @property
    def is_policy_chain(self) -> bool:
        """True when the chain is the policy's own stochastic sampler (any policy kind)."""
        return self.noise == "constant" and not self.score_drift and not self.clip_intermediate

    def check_policy(self, policy: GenerativePolicy) -> None:
        if not self.is_policy_chain and policy.kind != "flow":
            raise ConfigError(f"config fields 'chain_noise', 'chain_score_drift' and 'chain_clip_intermediate' "
                              f"shape a flow chain; the base is a '{policy.kind}' policy (leave them at "
                              f"'constant', false, false)")

    def noise_std(self, policy: GenerativePolicy) -> torch.Tensor:
        """(K,) std of each transition's noise, on the policy's device."""
        times = torch.arange(self.steps, dtype=torch.float32, device=policy.device) / self.steps
        std = float(policy.config.chain_min_std)
        return std * (1.0 - times).sqrt() if self.noise == "tapered" else torch.full_like(times, std)

    def _flow_means(self, policy: GenerativePolicy, x: torch.Tensor, times: torch.Tensor,
                    condition: torch.Tensor) -> torch.Tensor:
        velocity = policy.velocity(x, times, condition)
        drift = velocity
        if self.score_drift:
            # (sigma_t^2 / 2) * score with the CondOT score (t v - x) / (1 - t): the (1 - t) of the tapered
            # sigma_t^2 cancels, so the term stays finite at every step.
            std = float(policy.config.chain_min_std)
            drift = velocity + 0.5 * std * std * (times.view(-1, 1, 1) * velocity - x)
        mean = x + drift / self.steps
        return mean.clamp(-1.0, 1.0) if self.clip_intermediate else mean

    @torch.no_grad()
    def sample(self, policy: GenerativePolicy, flat_obs: torch.Tensor,
               generator: SamplingGenerator = None) -> torch.Tensor:
        """Stochastic chains (B, K + 1, horizon, A) for flat observation histories, on the policy's device; the
        noise from ``generator`` (best on that device, see :func:`sampling_generator`), else torch's global RNG."""
        obs = unflatten_history(flat_obs, policy)
        if self.is_policy_chain:
            return policy.sample(obs, steps=self.steps, return_chain=True, stochastic=True, generator=generator).chain
        condition = policy.encode_observation(obs)
        batch, device = condition.shape[0], condition.device
        shape = (batch, policy.config.horizon, policy.config.action_dim)
        x = sampling_noise(shape, device, generator)
        stds = self.noise_std(policy)
        chain = [x]
        for k in range(self.steps):
            mean = self._flow_means(policy, x, torch.full((batch,), k / self.steps, device=device), condition)
            x = mean + stds[k] * sampling_noise(shape, device, generator)
            chain.append(x)
        return torch.stack(chain, dim=1)

    def transition_log_prob(self, policy: GenerativePolicy, flat_obs: torch.Tensor, chains: torch.Tensor,
                            per_element: bool = False) -> torch.Tensor:
        """Log-density (N, K) of each transition chains[:, k] -> chains[:, k + 1]; (N, K, horizon, A) per element."""
        obs = unflatten_history(flat_obs, policy)
        if self.is_policy_chain:
            return policy.chain_log_prob(obs, chains, per_element=per_element)
        from robofinetune.policies.diffusion import gaussian_log_prob

        condition = policy.encode_observation(obs)
        batch, steps = chains.shape[0], chains.shape[1] - 1
        if steps != self.steps:
            raise ValueError(f"chains have {steps} transitions, the chain {self.steps}")
        inputs = chains[:, :-1].reshape(batch * steps, *chains.shape[2:])
        times = (torch.arange(steps, dtype=torch.float32, device=chains.device) / steps).repeat(batch)
        means = self._flow_means(policy, inputs, times, condition.repeat_interleave(steps, dim=0))
        stds = self.noise_std(policy).repeat(batch).view(-1, 1, 1)
        elements = gaussian_log_prob(chains[:, 1:].reshape(batch * steps, *chains.shape[2:]), means, stds,
                                     per_element=True).reshape(batch, steps, *chains.shape[2:])
        return elements if per_element else elements.sum(dim=(-1, -2))


def sample_chains(policy: GenerativePolicy, flat_obs: torch.Tensor, steps: int,
                  chain: DenoisingChain | None = None, generator: SamplingGenerator = None) -> torch.Tensor:
    """Stochastic chains (B, K + 1, horizon, A): ``chain``'s, or the policy's own K-step chain."""
    return (chain or DenoisingChain(steps)).sample(policy, flat_obs, generator)


LOG_PROB_CLAMP = (-5.0, 2.0)   # DPPO's clamp of per-element log-densities before the ratio


def chain_log_density(policy: GenerativePolicy, flat_obs: torch.Tensor, chains: torch.Tensor,
                      chain: DenoisingChain | None = None, last_transitions: int = 0) -> torch.Tensor:
    """OGPO's log-density of a whole chain, (N,): the log-density of x_K ~ N(0, I) and of every transition,
    averaged over all (K + 1) x horizon x A elements (the reference's normalize_denoising_horizon and
    normalize_act_space_dimension). x_K's term is the same for every policy: it cancels in a ratio and only
    sets the (K + 1) of the average. With ``last_transitions`` only those transitions, without x_K's term."""
    chain = chain or DenoisingChain(chains.shape[1] - 1)
    elements = chain.transition_log_prob(policy, flat_obs, chains, per_element=True)     # (N, K, H, A)
    if last_transitions:
        return elements[:, -last_transitions:].mean(dim=(1, 2, 3))
    initial = -0.5 * chains[:, :1].square() - 0.5 * math.log(2 * math.pi)                 # (N, 1, H, A)
    return torch.cat([initial, elements], dim=1).mean(dim=(1, 2, 3))


def ratio_log_prob(policy: GenerativePolicy, flat_obs: torch.Tensor, chains: torch.Tensor,
                   element_mean: bool = True, last_transitions: int = 0, chain: DenoisingChain | None = None,
                   per_chain: bool = False) -> torch.Tensor:
    """(N, K') log-probabilities the PPO ratio is built from, of the chain's last ``last_transitions``
    transitions (0 = all K; OGPO's ``ppo_last_transitions``, DPPO's ``ft_denoising_steps``).

    ``per_chain``: one log-probability per chain, (N, 1), :func:`chain_log_density` (OGPO's reference ratio).
    Otherwise one per transition; ``element_mean``: DPPO's per-element mean over the executed part of the chunk
    (clamped), so that a ratio of 1 +- clip means the same per-element change for any chunk size and the
    unexecuted tail of the chunk, which the return never saw, does not move it; else the transition's full
    density."""
    chain = chain or DenoisingChain(chains.shape[1] - 1)
    if per_chain:
        return chain_log_density(policy, flat_obs, chains, chain, last_transitions)[:, None]
    if not element_mean:
        log_prob = chain.transition_log_prob(policy, flat_obs, chains)
    else:
        elements = chain.transition_log_prob(policy, flat_obs, chains, per_element=True)
        log_prob = elements[:, :, : policy.config.n_action_steps].clamp(*LOG_PROB_CLAMP).mean(dim=(-1, -2))
    return log_prob[:, -last_transitions:] if last_transitions else log_prob


def ppo_chain_loss(new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantage: torch.Tensor,
                   clip: float | torch.Tensor, denoising_discount: float = 1.0,
                   max_log_ratio: float = 5.0) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate over every chain transition. ``new_log_prob`` / ``old_log_prob`` (N, K): one
    ratio per transition (K = 1: one per chain); ``advantage`` (N,) is the chain's, weighted by
    denoising_discount^(K - 1 - k) for transition k (1 for the last, the one that emits the action). ``clip``:
    one for all, or (K,) per transition (DPPO's schedule)."""
    steps = new_log_prob.shape[1]
    weights = denoising_discount ** torch.arange(steps - 1, -1, -1, dtype=new_log_prob.dtype,
                                                 device=new_log_prob.device)
    step_advantage = advantage[:, None] * weights[None]
    log_ratio = (new_log_prob - old_log_prob).clamp(-max_log_ratio, max_log_ratio)
    ratio = log_ratio.exp()
    clip = torch.as_tensor(clip, dtype=ratio.dtype, device=ratio.device)
    clipped = torch.minimum(torch.maximum(ratio, 1 - clip), 1 + clip)
    surrogate = torch.min(ratio * step_advantage, clipped * step_advantage)
    loss = -surrogate.mean()
    with torch.no_grad():
        stats = {"ratio_mean": ratio.mean().item(), "ratio_dev": (ratio - 1).abs().max().item(),
                 "clip_frac": ((ratio - 1).abs() > clip).float().mean().item(),
                 "approx_kl": ((ratio - 1) - log_ratio).mean().item()}
    return loss, stats


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - tau) target + tau source, parameters and buffers (a policy's normalisers are buffers
    that never change here, so they stay equal)."""
    for target_param, param in zip(target.parameters(), source.parameters()):
        target_param.lerp_(param, tau)


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

    def sample(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of windows (kept on the CPU, numpy) moved to ``device``, the policy's."""
        rows = self.rng.integers(0, self.size, size=batch_size)
        return torch.from_numpy(self.obs[rows]).to(device), torch.from_numpy(self.actions[rows]).to(device)

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
    # Ray env workers only: the worker died during the chunk's last step, so that step never happened and the episode
    # was cut (truncated, next_obs from the last delivered observation; robofinetune/distributed/ray_envs.py)
    aborted: bool = False


class ChunkedActor:
    """Steps a :class:`VectorRollout` with chunks from ``policy``'s stochastic chain and cuts the stream
    into :class:`ChunkTransition`s (one per decision and env) and finished :class:`Episode`s.

    Each env keeps its own history (padded with the episode's first frame, as ``GenerativePolicy`` does) and
    queue; envs that need a chunk on the same step are sampled as one batch. A chunk is abandoned when its
    episode ends; its transition then ends there. An episode a dead Ray env worker cut short ends in a transition
    marked ``aborted`` and is not handed back as an Episode: it is neither a success nor a failure.
    """

    def __init__(self, rollout: VectorRollout, policy: GenerativePolicy, chain_steps: int, gamma: float,
                 chain: DenoisingChain | None = None, reward_scale: float = 1.0, reward_offset: float = 0.0,
                 generator: SamplingGenerator = None) -> None:
        self.rollout, self.policy, self.chain_steps, self.gamma = rollout, policy, chain_steps, gamma
        self.chain = chain or DenoisingChain(chain_steps)
        self.generator = generator   # the chain's noise (the learner's sampling_generator); None: torch's global RNG
        # r -> reward_scale * r + reward_offset per env step (OGPO's reference pays -1 a step, +5 on success)
        self.reward_scale, self.reward_offset = float(reward_scale), float(reward_offset)
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
        # the histories go to the policy's device once per decision; chunks and chains come back as numpy
        chain = self.chain.sample(self.policy, torch.from_numpy(flat).to(self.policy.device), self.generator)
        normalised = chain[:, -1]
        chunks = self.policy.action_normalizer.unnormalize(normalised.clamp(-1.0, 1.0))[:, : self.n_action_steps]
        chunks = chunks.clamp(-1.0, 1.0).cpu().numpy()
        executed = executed_chunk(normalised, self.n_action_steps).cpu().numpy()
        chain = chain.cpu().numpy()
        for row, index in enumerate(indices):
            self.queues[index].extend(chunks[row])
            self.pending[index] = ChunkTransition(index, flat[row], executed[row], chain[row])

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
            reward = self.reward_scale * float(step.reward[index]) + self.reward_offset
            transition.reward += transition.discount * reward
            transition.discount *= self.gamma
            transition.steps += 1
            frame = self._frame(step.next_obs, index)
            if step.done[index]:
                next_history = np.concatenate([*list(self.histories[index])[1:], frame])
                chunk = self._finish(index, next_history, bool(step.terminated[index]),
                                     bool(step.truncated[index] and not step.terminated[index]))
                chunk.aborted = step.aborted is not None and bool(step.aborted[index])
                chunks.append(chunk)
                if not chunk.aborted:
                    observations = {key: np.stack([obs[key] for obs in self.episode_obs[index]])
                                    for key in self.obs_keys}
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

def demo_chunk_transitions(episode: Episode, policy: GenerativePolicy, gamma: float, reward_scale: float = 1.0,
                           reward_offset: float = 0.0) -> dict[str, np.ndarray]:
    """Every step t of a demo as a decision point: (history at t, the next n_action_steps demo actions
    normalised, their discounted reward, history at t + k). Rows come back grouped by the offset t mod
    n_action_steps, and ``stream`` says which chain of consecutive decisions a row belongs to. Rewards go
    through the same affine map as online ones (:class:`ChunkedActor`)."""
    config = policy.config
    keys, n_obs, n_act = list(config.obs_keys), config.n_obs_steps, config.n_action_steps
    length = len(episode)
    final = episode.final_observation or {key: episode.observations[key][-1] for key in keys}
    frames = np.concatenate([flatten_observation(episode.observations, keys),
                             flatten_observation({key: np.asarray(final[key])[None] for key in keys}, keys)])
    with torch.no_grad():
        normalised = policy.action_normalizer.normalize(torch.as_tensor(episode.actions, device=policy.device))
        normalised = normalised.clamp(-1.0, 1.0).cpu().numpy()
    rows: dict[str, list] = {name: [] for name in ("obs", "action", "reward", "next_obs", "terminated", "truncated",
                                                     "stream")}

    def history(t: int) -> np.ndarray:
        return frames[np.clip(np.arange(t - n_obs + 1, t + 1), 0, None)].reshape(-1)

    for offset in range(min(n_act, length)):
        for t in range(offset, length, n_act):
            k = min(n_act, length - t)
            rows["obs"].append(history(t))
            rows["action"].append(normalised[np.minimum(np.arange(t, t + n_act), length - 1)].reshape(-1))
            step_rewards = reward_scale * episode.rewards[t: t + k] + reward_offset
            rows["reward"].append(float(np.sum(step_rewards * gamma ** np.arange(k))))
            rows["next_obs"].append(history(t + k))
            terminated = bool(episode.terminals[t: t + k].any())
            rows["terminated"].append(terminated)
            rows["truncated"].append(t + k == length and not terminated)
            rows["stream"].append(offset)
    return {name: np.asarray(value) for name, value in rows.items()}



# --- gradient steps and their bookkeeping ----------------------------------------------------------------------

def policy_step(policy: GenerativePolicy, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                max_grad_norm: float) -> float:
    """One optimiser step on ``loss`` with the policy's gradient norm clipped; returns the norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    optimizer.step()
    return float(norm)


def gradient_norm(policy: GenerativePolicy, loss: torch.Tensor) -> float:
    parameters = [p for p in policy.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum(g.square().sum() for g in grads if g is not None)))


class RunningMeans:
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


# --- set-up -----------------------------------------------------------------------------------------------

def shipped_path(path: str) -> str:
    """``path`` as given, or under the project root when it is relative and not found from the working folder
    (presets name shipped policies as ``policies/<task>/...``, which must load from any folder)."""
    from robofinetune.paths import project_root

    if path and not Path(path).is_absolute() and not Path(path).exists() and (project_root() / path).exists():
        return str(project_root() / path)
    return path


def load_base(config: ChainRLConfig) -> GenerativePolicy:
    policy = load_base_policy(shipped_path(config.base), config.task)
    if not isinstance(policy, GenerativePolicy):
        raise CheckpointError(f"{base_path(config.base, config.task)}: a '{policy.kind}' policy has no denoising "
                              f"chain; OGPO/DPPO fine-tune diffusion or flow policies (config field 'base')")
    return policy


def load_demos(config: ChainRLConfig, obs_keys: list[str]) -> tuple[Path | None, list[Episode]]:
    if config.num_demos < 0:   # fine-tune without demos
        return None, []
    return load_demo_episodes(config.task, config.dataset, obs_keys, config.num_demos, only_success=True)


def prepare_policy(config: ChainRLConfig) -> tuple[GenerativePolicy, int]:
    """Load the base, put it on the config's ``device`` and set the chain it will be trained and deployed with."""
    device = resolve_chain_device(config.device)
    policy = load_base(config).to(device)   # the learners built on it follow it there
    chain_steps = config.chain_steps or policy.config.inference_steps
    policy.config.inference_steps = chain_steps      # act() (eval, deploy) runs the chain that was trained
    if hasattr(policy.config, "sampler"):
        policy.config.sampler = "ddim"               # diffusion: deterministic DDIM-K, the mean of the trained chain
    if config.chain_std > 0:
        policy.config.chain_min_std = config.chain_std
    if hasattr(policy.config, "chain_eta"):
        policy.config.chain_eta = config.chain_eta
    chain_of(config, chain_steps).check_policy(policy)
    policy.requires_grad_(True)
    return policy.train(), chain_steps


def chain_of(config: ChainRLConfig, chain_steps: int) -> DenoisingChain:
    """The stochastic chain ``config`` trains."""
    return DenoisingChain(chain_steps, config.chain_noise, config.chain_score_drift, config.chain_clip_intermediate)


def evaluate(loop: RunLoop, policy: GenerativePolicy, config: ChainRLConfig, **kwargs: Any):
    """``loop.evaluate`` with the torch RNG forked and seeded: every evaluation draws the same initial latents
    for the same env seeds, so two evaluations of the same weights give the same episodes (a curve's changes
    are the policy's, and the base point is the same in both modes), and training's RNG stream is untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(config.eval_seed)
        return loop.evaluate(policy, **kwargs)
