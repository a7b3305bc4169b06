"""One-step consistency policy: a student distilled from a diffusion or flow teacher (``robofinetune distill``).

A consistency function ``f(x_t, t)`` maps any point of the teacher's sampling ODE straight to that ODE's end,
the action chunk. One call of ``f`` on pure noise is a whole sample; ``steps > 1`` alternates ``f`` with
re-noising to a smaller noise level (multi-step consistency sampling), trading speed for quality.

The student keeps the teacher's network and time convention so that it can start from the teacher's weights:

* diffusion teachers (variance preserving, discrete timesteps ``t``)::

      f(x, t) = c_skip(t) * x + c_out(t) * x0_hat,     x0_hat = net(x_t, t)            (prediction "sample")
                                       or x0_hat = (x_t - sqrt(1 - abar_t) net(x_t, t)) / sqrt(abar_t)  ("epsilon")

  with ``abar`` and the boundary scalings ``c_skip``/``c_out`` from diffusers' ``LCMScheduler``
  (``c_skip(0) = 1, c_out(0) = 0``: f is the identity at the ODE's end). Re-noising: ``sqrt(abar) x0 + sqrt(1 - abar) z``.
  "sample" is the default: the teacher's solver starts at t = 90 of 100 where sqrt(abar) = 0.14, so an
  epsilon student's one-step error is amplified ~7x (pointmass, 500 steps at lr 1e-3, held-out states: one-step
  MSE to the teacher's chunk 0.069 epsilon vs 0.009 sample). The teacher's trunk is reused; only the output
  layer starts from zero.

* flow teachers (rectified flow, noise at ``t = 0``, actions at ``t = 1``)::

      f(x, t) = x + (1 - t) * net(x, t)

  i.e. the network predicts the average velocity over the rest of the path (a shortcut of length 1 - t);
  the boundary condition f(x, 1) = x is built in. Re-noising: ``t x1 + (1 - t) z``.

``grid`` holds the teacher's solver times in the order the teacher visits them (diffusion DDIM: 90, 80, ..., 0;
flow Euler: 0, 0.1, ..., 0.9); the student is trained on the points of those trajectories and samples at
``steps`` of them, spread evenly. ``grid[0]`` always starts from pure N(0, I) noise, as the teacher does.

For RL on top of a student the chain is explicitly stochastic: every re-noising step is a Gaussian with mean
``alpha * clip(f)`` and std ``max(sigma, chain_min_std)``; the last step ``f`` gets std ``chain_min_std`` when
``stochastic``. ``chain_log_prob`` is that density.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import LCMScheduler

from robofinetune.errors import ConfigError
from robofinetune.policies.base import ChainSample, GenerativePolicy, PolicyConfig, SamplingGenerator, sampling_noise
from robofinetune.policies.checkpoint import register_policy
from robofinetune.policies.diffusion import gaussian_log_prob
from robofinetune.policies.flow import TIME_SCALE
from robofinetune.policies.networks import MLPDenoiser, build_denoiser

ODE_KINDS = ("diffusion", "flow")


@dataclass
class ConsistencyPolicyConfig(PolicyConfig):
    inference_steps: int = 1          # consistency steps used by act(); 1 = one network call per chunk
    ode: str = "diffusion"            # which teacher ODE the student was distilled along: diffusion | flow
    grid: list[float] = field(default_factory=list)   # teacher solver times, noise end first
    num_train_timesteps: int = 100    # diffusion teachers: their noise schedule
    beta_schedule: str = "squaredcos_cap_v2"
    timestep_scaling: float = 10.0    # LCM boundary scalings: c_skip = s^2 / ((t k)^2 + s^2), k = this
    prediction: str = "sample"        # diffusion: the network predicts the chunk ("sample") or the noise ("epsilon")
    clip_output: bool = True          # clip normalised chunks to [-1, 1] as the teacher does (its clip_sample)


class ConsistencyPolicy(GenerativePolicy):
    kind = "consistency"
    config: ConsistencyPolicyConfig

    def __init__(self, config: ConsistencyPolicyConfig) -> None:
        super().__init__(config)
        if config.ode not in ODE_KINDS:
            raise ConfigError(f"consistency policy field 'ode' is {config.ode!r}; choose one of {ODE_KINDS}")
        if config.prediction not in ("sample", "epsilon"):
            raise ConfigError(f"consistency policy field 'prediction' is {config.prediction!r}; choose 'sample' or 'epsilon'")
        if not config.grid:
            raise ConfigError("consistency policy field 'grid' is empty: it needs the teacher's solver times")
        self.denoiser = build_denoiser(config.network, config.action_dim, config.horizon, self.condition_dim,
                                       config.hidden_dim, config.depth, tuple(config.unet_dims))
        if config.ode == "diffusion":
            self.lcm = LCMScheduler(num_train_timesteps=config.num_train_timesteps,
                                    beta_schedule=config.beta_schedule, prediction_type="epsilon",
                                    timestep_scaling=config.timestep_scaling)
            # not persistent: recomputed from the config, so checkpoints hold only weights and normalisers
            self.register_buffer("alphas_cumprod", self.lcm.alphas_cumprod.clone(), persistent=False)
        self._coefficients: dict[float, tuple[float, float, float, float]] = {}
        self._time_embeddings: dict[float, tuple[tuple, torch.Tensor]] = {}

    # --- the ODE's noise levels and the consistency function ---------------------------------------------
    def noise_levels(self, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma), each (B, 1, 1), with x_t = alpha * x_end + sigma * noise on the teacher's path."""
        times = times.reshape(-1, 1, 1)
        if self.config.ode == "diffusion":
            alpha_bar = self.alphas_cumprod[times.long()]
            return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
        return times, 1.0 - times

    def boundary_scalings(self, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out), each (B, 1, 1): diffusers' LCM scalings, or the flow path's (0, 1) (see module doc)."""
        times = times.reshape(-1, 1, 1).float()
        if self.config.ode == "diffusion":
            return self.lcm.get_scalings_for_boundary_condition_discrete(times)
        return torch.zeros_like(times), torch.ones_like(times)

    def network_time(self, times: torch.Tensor) -> torch.Tensor:
        """The time input the teacher's network was trained with (integer timesteps, or flow time x 1000)."""
        return times.long() if self.config.ode == "diffusion" else times * TIME_SCALE

    def consistency_function(self, x: torch.Tensor, times: torch.Tensor | float,
                             condition: torch.Tensor) -> torch.Tensor:
        """f(x_t, t): the end of the teacher's ODE through x_t, unclipped normalised chunk (B, H, A).

        ``times`` is (B,) in the teacher's convention (diffusion timesteps or flow time in [0, 1]), or one
        float for the whole batch (sampling), whose coefficients are cached as Python numbers."""
        if isinstance(times, torch.Tensor):
            alpha, sigma = self.noise_levels(times)
            c_skip, c_out = self.boundary_scalings(times)
            time_input = times
        else:
            alpha, sigma, c_skip, c_out = self.scalar_coefficients(float(times))
            time_input = torch.full((x.shape[0],), float(times), device=x.device)
        if not isinstance(times, torch.Tensor) and isinstance(self.denoiser, MLPDenoiser) and not torch.is_grad_enabled():
            out = self._mlp_with_cached_time(x, float(times), condition)
        else:
            out = self.denoiser(x, self.network_time(time_input), condition)
        if self.config.ode == "diffusion":
            predicted_end = (x - sigma * out) / alpha if self.config.prediction == "epsilon" else out
            return c_skip * x + c_out * predicted_end
        return x + sigma * out   # flow: sigma = 1 - t, the rest of the path

    def scalar_coefficients(self, time: float) -> tuple[float, float, float, float]:
        """(alpha, sigma, c_skip, c_out) at one time, cached: a one-step chunk then costs little beyond the
        network call (the latency is the point of this policy)."""
        if time not in self._coefficients:
            times = torch.tensor([time], device=self.device)
            alpha, sigma = self.noise_levels(times)
            c_skip, c_out = self.boundary_scalings(times)
            self._coefficients[time] = (float(alpha), float(sigma), float(c_skip), float(c_out))
        return self._coefficients[time]

    def _mlp_with_cached_time(self, x: torch.Tensor, time: float, condition: torch.Tensor) -> torch.Tensor:
        """MLPDenoiser.forward with the time embedding of a constant sampling time computed once: at batch 1 it
        is a quarter of the network's cost. The cache key includes the embedding weights' storage and version,
        so training, loading weights or moving devices recomputes it (tests check it equals the full forward)."""
        denoiser = self.denoiser
        weights = tuple((p.data_ptr(), p._version) for p in denoiser.time_embedding.parameters())
        cached = self._time_embeddings.get(time)
        if cached is None or cached[0] != weights:
            times = self.network_time(torch.tensor([time], device=x.device))
            cached = (weights, denoiser.time_embedding(times))
            self._time_embeddings[time] = cached
        batch = x.shape[0]
        features = torch.cat([x.reshape(batch, -1), cached[1].expand(batch, -1), condition], dim=-1)
        return denoiser.net(features).reshape(batch, denoiser.horizon, denoiser.action_dim)

    @property
    def device(self) -> torch.device:
        # a buffer's device: Policy.device walks every parameter, and act() asks several times per chunk
        return self.action_normalizer.low.device

    def clip_chunk(self, x: torch.Tensor) -> torch.Tensor:
        """Clip a normalised chunk to [-1, 1], as the teacher's sampler does (unless the config says not to)."""
        return x.clamp(-1.0, 1.0) if self.config.clip_output else x

    def sampling_times(self, steps: int) -> list[float]:
        """``steps`` times from the grid, evenly spread and always starting at the grid's noise end."""
        grid = self.config.grid
        if not 1 <= steps <= len(grid):
            raise ConfigError(f"consistency steps must be between 1 and {len(grid)} (the teacher's solver steps), "
                              f"got {steps}")
        return [float(grid[(index * len(grid)) // steps]) for index in range(steps)]

    # --- GenerativePolicy ---------------------------------------------------------------------------------
    def sample(self, obs: dict[str, Any], steps: int | None = None, noise: torch.Tensor | None = None,
               return_chain: bool = False, stochastic: bool = False,
               generator: SamplingGenerator = None) -> ChainSample:
        condition = self.encode_observation(obs)
        batch = condition.shape[0]
        shape = (batch, self.config.horizon, self.config.action_dim)
        times = self.sampling_times(steps or self.config.inference_steps)
        x = noise.to(self.device) if noise is not None else sampling_noise(shape, self.device, generator)
        chain = [x] if return_chain else None
        for index, time in enumerate(times):
            end = self.clip_chunk(self.consistency_function(x, time, condition))
            if index + 1 < len(times):
                # multi-step consistency sampling: go back onto the path at the next (smaller) noise level
                alpha, sigma = self.scalar_coefficients(times[index + 1])[:2]
                std = max(sigma, self.config.chain_min_std) if stochastic else sigma
                x = alpha * end + std * sampling_noise(shape, self.device, generator)
            elif stochastic:
                x = end + self.config.chain_min_std * sampling_noise(shape, self.device, generator)
            else:
                x = end
            if chain is not None:
                chain.append(x)
        actions = self.action_normalizer.unnormalize(self.clip_chunk(x))
        return ChainSample(actions, torch.stack(chain, dim=1) if chain is not None else None)

    def chain_log_prob(self, obs: dict[str, Any], chain: torch.Tensor, per_element: bool = False) -> torch.Tensor:
        condition = self.encode_observation(obs)
        batch, length = chain.shape[:2]
        steps = length - 1
        times = torch.tensor(self.sampling_times(steps), device=chain.device, dtype=torch.float32)
        inputs = chain[:, :-1].reshape(batch * steps, *chain.shape[2:])
        ends = self.clip_chunk(self.consistency_function(inputs, times.repeat(batch),
                                                    condition.repeat_interleave(steps, dim=0)))
        ends = ends.reshape(batch, steps, *chain.shape[2:])
        log_probs = []
        for k in range(steps):
            if k + 1 < steps:
                alpha, sigma = self.noise_levels(times[k + 1: k + 2])
                mean, std = alpha[0] * ends[:, k], sigma.clamp_min(self.config.chain_min_std).reshape(())
            else:
                mean, std = ends[:, k], self.config.chain_min_std
            log_probs.append(gaussian_log_prob(chain[:, k + 1], mean, std, per_element))
        return torch.stack(log_probs, dim=1)

    def bc_loss(self, obs: dict[str, Any], actions: torch.Tensor) -> torch.Tensor:
        """Supervised regulariser (e.g. for RL on a student): f at a random grid time, on a demo chunk noised to
        that time (pure noise at the grid's start, as in sampling), must return the demo chunk. It is not a
        substitute for distillation: from pure noise it regresses to the mean of multimodal demos."""
        condition = self.encode_observation(obs)
        target = self.action_normalizer.normalize(torch.as_tensor(actions, dtype=torch.float32, device=self.device))
        grid = torch.tensor(self.config.grid, device=self.device, dtype=torch.float32)
        index = torch.randint(0, len(grid), (target.shape[0],), device=self.device)
        times = grid[index]
        alpha, sigma = self.noise_levels(times)
        start = (index == 0).reshape(-1, 1, 1)
        noise = torch.randn_like(target)
        noisy = torch.where(start, noise, alpha * target + sigma * noise)
        return F.mse_loss(self.consistency_function(noisy, times, condition), target)


register_policy("consistency", ConsistencyPolicy, ConsistencyPolicyConfig)
