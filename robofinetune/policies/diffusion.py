"""Diffusion policy over action chunks; the noise-schedule maths is diffusers' (DDPM training, DDPM/DDIM sampling).

For RL the chain is made explicitly stochastic, as in DPPO: every DDIM transition x_t -> x_{t-1} is a
Gaussian whose mean is diffusers' DDIM step and whose std is eta * sigma_t floored at ``chain_min_std``.
With ``steps == num_train_timesteps`` and ``eta == 1`` that is the DDPM posterior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from robofinetune.policies.base import ChainSample, GenerativePolicy, PolicyConfig, SamplingGenerator, sampling_noise
from robofinetune.policies.networks import build_denoiser


@dataclass
class DiffusionPolicyConfig(PolicyConfig):
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    sampler: str = "ddim"         # what act() uses: "ddim" (deterministic, eta 0) or "ddpm" (all train steps)
    chain_eta: float = 1.0        # DDIM eta of the stochastic chain used by sample(stochastic=True)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float,
                      per_element: bool = False) -> torch.Tensor:
    """Log N(x; mean, std^2) summed over all but the first dimension (or, with ``per_element``, of every
    element: the diagonal Gaussian's per-dimension terms, shape of x)."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    log_density = -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density if per_element else log_density.reshape(x.shape[0], -1).sum(dim=-1)


class DiffusionPolicy(GenerativePolicy):
    kind = "diffusion"
    config: DiffusionPolicyConfig

    def __init__(self, config: DiffusionPolicyConfig) -> None:
        super().__init__(config)
        self.denoiser = build_denoiser(config.network, config.action_dim, config.horizon, self.condition_dim,
                                       config.hidden_dim, config.depth, tuple(config.unet_dims))
        scheduler_kwargs = dict(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                                clip_sample=True, prediction_type="epsilon")
        self.train_scheduler = DDPMScheduler(**scheduler_kwargs)
        self._scheduler_kwargs = scheduler_kwargs
        self._ddim_cache: dict[int, DDIMScheduler] = {}

    def _ddim(self, steps: int) -> DDIMScheduler:
        if steps not in self._ddim_cache:
            scheduler = DDIMScheduler(**self._scheduler_kwargs, set_alpha_to_one=True)
            scheduler.set_timesteps(steps)
            self._ddim_cache[steps] = scheduler
        return self._ddim_cache[steps]

    def _transition_std(self, scheduler: DDIMScheduler, timestep: int) -> float:
        prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        variance = float(scheduler._get_variance(timestep, prev_timestep))
        return max(self.config.chain_eta * math.sqrt(max(variance, 0.0)), self.config.chain_min_std)

    def _predict_noise(self, x: torch.Tensor, timestep: int | torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            timestep = torch.full((x.shape[0],), timestep, device=x.device, dtype=torch.long)
        return self.denoiser(x, timestep, condition)

    def sample(self, obs: dict[str, Any], steps: int | None = None, noise: torch.Tensor | None = None,
               return_chain: bool = False, stochastic: bool = False,
               generator: SamplingGenerator = None) -> ChainSample:
        condition = self.encode_observation(obs)
        batch = condition.shape[0]
        shape = (batch, self.config.horizon, self.config.action_dim)
        x = noise.to(self.device) if noise is not None else sampling_noise(shape, self.device, generator)
        chain = [x] if return_chain else None
        if self.config.sampler == "ddpm" and not stochastic and steps is None:
            scheduler = DDPMScheduler(**self._scheduler_kwargs)
            scheduler.set_timesteps(self.config.num_train_timesteps)
            for timestep in scheduler.timesteps:
                x = scheduler.step(self._predict_noise(x, int(timestep), condition), int(timestep), x,
                                   generator=generator).prev_sample
                if chain is not None:
                    chain.append(x)
        else:
            scheduler = self._ddim(steps or self.config.inference_steps)
            for timestep in scheduler.timesteps:
                timestep = int(timestep)
                eps = self._predict_noise(x, timestep, condition)
                if stochastic:
                    mean = scheduler.step(eps, timestep, x, eta=self.config.chain_eta,
                                          variance_noise=torch.zeros_like(x)).prev_sample
                    std = self._transition_std(scheduler, timestep)
                    x = mean + std * sampling_noise(shape, self.device, generator)
                else:
                    x = scheduler.step(eps, timestep, x, eta=0.0).prev_sample
                if chain is not None:
                    chain.append(x)
        actions = self.action_normalizer.unnormalize(x.clamp(-1.0, 1.0))
        return ChainSample(actions, torch.stack(chain, dim=1) if chain is not None else None)

    def chain_log_prob(self, obs: dict[str, Any], chain: torch.Tensor, per_element: bool = False) -> torch.Tensor:
        condition = self.encode_observation(obs)
        batch, length = chain.shape[:2]
        steps = length - 1
        scheduler = self._ddim(steps)
        timesteps = [int(t) for t in scheduler.timesteps]
        # One batched network call over all K transitions, then diffusers' step for each transition's mean.
        inputs = chain[:, :-1].reshape(batch * steps, *chain.shape[2:])
        time_batch = torch.tensor(timesteps, device=chain.device).repeat(batch)
        eps = self.denoiser(inputs, time_batch, condition.repeat_interleave(steps, dim=0))
        eps = eps.reshape(batch, steps, *chain.shape[2:])
        log_probs = []
        for k, timestep in enumerate(timesteps):
            mean = scheduler.step(eps[:, k], timestep, chain[:, k], eta=self.config.chain_eta,
                                  variance_noise=torch.zeros_like(chain[:, k])).prev_sample
            log_probs.append(gaussian_log_prob(chain[:, k + 1], mean, self._transition_std(scheduler, timestep),
                                               per_element))
        return torch.stack(log_probs, dim=1)

    def bc_loss(self, obs: dict[str, Any], actions: torch.Tensor) -> torch.Tensor:
        condition = self.encode_observation(obs)
        target = self.action_normalizer.normalize(torch.as_tensor(actions, dtype=torch.float32, device=self.device))
        noise = torch.randn_like(target)
        timesteps = torch.randint(0, self.config.num_train_timesteps, (target.shape[0],), device=self.device)
        noisy = self.train_scheduler.add_noise(target, noise, timesteps)
        return F.mse_loss(self.denoiser(noisy, timesteps, condition), noise)
