"""Rectified-flow policy over action chunks, sampled with Euler steps from noise (t = 0) to actions (t = 1).

For RL every Euler step gets injected Gaussian noise of std ``chain_min_std`` (as ReinFlow and OGPO do), so
each transition x_k -> x_{k+1} = x_k + v(x_k, t_k) dt + std * z has a tractable log-density.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from robofinetune.policies.base import ChainSample, GenerativePolicy, PolicyConfig, SamplingGenerator, sampling_noise
from robofinetune.policies.diffusion import gaussian_log_prob
from robofinetune.policies.networks import build_denoiser

TIME_SCALE = 1000.0  # flow time in [0, 1] is scaled to the diffusion timestep range for the sinusoidal embedding


@dataclass
class FlowPolicyConfig(PolicyConfig):
    chain_min_std: float = 0.05


class FlowPolicy(GenerativePolicy):
    kind = "flow"
    config: FlowPolicyConfig

    def __init__(self, config: FlowPolicyConfig) -> None:
        super().__init__(config)
        self.denoiser = build_denoiser(config.network, config.action_dim, config.horizon, self.condition_dim,
                                       config.hidden_dim, config.depth, tuple(config.unet_dims))

    def velocity(self, x: torch.Tensor, time: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, time * TIME_SCALE, condition)

    def sample(self, obs: dict[str, Any], steps: int | None = None, noise: torch.Tensor | None = None,
               return_chain: bool = False, stochastic: bool = False,
               generator: SamplingGenerator = None) -> ChainSample:
        condition = self.encode_observation(obs)
        batch = condition.shape[0]
        steps = steps or self.config.inference_steps
        shape = (batch, self.config.horizon, self.config.action_dim)
        x = noise.to(self.device) if noise is not None else sampling_noise(shape, self.device, generator)
        chain = [x] if return_chain else None
        dt = 1.0 / steps
        for k in range(steps):
            time = torch.full((batch,), k * dt, device=self.device)
            x = x + self.velocity(x, time, condition) * dt
            if stochastic:
                x = x + self.config.chain_min_std * sampling_noise(shape, self.device, generator)
            if chain is not None:
                chain.append(x)
        actions = self.action_normalizer.unnormalize(x.clamp(-1.0, 1.0))
        return ChainSample(actions, torch.stack(chain, dim=1) if chain is not None else None)

    def chain_log_prob(self, obs: dict[str, Any], chain: torch.Tensor, per_element: bool = False) -> torch.Tensor:
        condition = self.encode_observation(obs)
        batch, length = chain.shape[:2]
        steps = length - 1
        dt = 1.0 / steps
        inputs = chain[:, :-1].reshape(batch * steps, *chain.shape[2:])
        times = (torch.arange(steps, device=chain.device, dtype=torch.float32) * dt).repeat(batch)
        velocity = self.velocity(inputs, times, condition.repeat_interleave(steps, dim=0))
        means = chain[:, :-1] + velocity.reshape(batch, steps, *chain.shape[2:]) * dt
        log_probs = gaussian_log_prob(chain[:, 1:].reshape(batch * steps, -1), means.reshape(batch * steps, -1),
                                      self.config.chain_min_std, per_element)
        return log_probs.reshape(batch, steps, *(chain.shape[2:] if per_element else ()))

    def bc_loss(self, obs: dict[str, Any], actions: torch.Tensor) -> torch.Tensor:
        condition = self.encode_observation(obs)
        target = self.action_normalizer.normalize(torch.as_tensor(actions, dtype=torch.float32, device=self.device))
        noise = torch.randn_like(target)
        time = torch.rand(target.shape[0], device=self.device)
        noisy = (1 - time[:, None, None]) * noise + time[:, None, None] * target
        return F.mse_loss(self.velocity(noisy, time, condition), target - noise)
