"""Denoiser networks: a residual MLP (DPPO-like, the CPU default) and a 1-D temporal UNet (Diffusion Policy-like).

Both map (noisy action chunk (B, H, A), time (B,), condition (B, C)) to a chunk of the same shape: the
predicted noise for diffusion, the velocity for flow matching.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Mish(nn.Module):
    """x * tanh(softplus(x)), the same function as ``nn.Mish`` (no parameters, so checkpoints are unchanged).

    Written out because PyTorch's CPU mish kernel (2.13) is the slowest op of a denoiser pass: it took ~45% of
    a 512-chain DDIM-10 sample in a profile, about twice these three ops on the same tensors. Sampling the
    chains is most of OGPO's cost (its TD target samples them on every critic update); whole-chain times are
    in ``benchmarks/chain_sampling.py``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tanh(nn.functional.softplus(x))


class SinusoidalTimeEmbedding(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=time.device) / max(half - 1, 1))
        angles = time.float()[:, None] * frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), Mish(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class ResidualMLP(nn.Module):
    """Input projection, ``depth`` residual blocks, output projection."""

    def __init__(self, input_dim: int, output_dim: int, hidden_dim: int = 512, depth: int = 3) -> None:
        super().__init__()
        self.input = nn.Sequential(nn.Linear(input_dim, hidden_dim), Mish())
        self.blocks = nn.Sequential(*[ResidualBlock(hidden_dim) for _ in range(depth)])
        self.output = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.blocks(self.input(x)))


class MLPDenoiser(nn.Module):
    def __init__(self, action_dim: int, horizon: int, cond_dim: int, hidden_dim: int = 512, depth: int = 3,
                 time_dim: int = 32) -> None:
        super().__init__()
        self.horizon, self.action_dim = horizon, action_dim
        self.time_embedding = nn.Sequential(SinusoidalTimeEmbedding(time_dim), nn.Linear(time_dim, time_dim * 2),
                                            Mish(), nn.Linear(time_dim * 2, time_dim))
        self.net = ResidualMLP(horizon * action_dim + time_dim + cond_dim, horizon * action_dim, hidden_dim, depth)

    def forward(self, noisy_actions: torch.Tensor, time: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        batch = noisy_actions.shape[0]
        features = torch.cat([noisy_actions.reshape(batch, -1), self.time_embedding(time), condition], dim=-1)
        return self.net(features).reshape(batch, self.horizon, self.action_dim)


class ConditionalConvBlock(nn.Module):
    """Two 1-D convolutions with FiLM conditioning between them (Diffusion Policy's ConditionalResidualBlock1D)."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, kernel_size: int = 5) -> None:
        super().__init__()
        groups = 8 if out_channels % 8 == 0 else 1
        self.conv1 = nn.Sequential(nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
                                   nn.GroupNorm(groups, out_channels), Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(out_channels, out_channels, kernel_size, padding=kernel_size // 2),
                                   nn.GroupNorm(groups, out_channels), Mish())
        self.film = nn.Sequential(Mish(), nn.Linear(cond_dim, out_channels * 2))
        self.skip = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        scale, bias = self.film(condition).unsqueeze(-1).chunk(2, dim=1)
        h = self.conv2(h * (1 + scale) + bias)
        return h + self.skip(x)


class TemporalUnet1D(nn.Module):
    """A small 1-D UNet over the chunk's time axis; the horizon must be divisible by 2**(len(dims) - 1)."""

    def __init__(self, action_dim: int, horizon: int, cond_dim: int, dims: tuple[int, ...] = (64, 128, 256),
                 time_dim: int = 64, kernel_size: int = 5) -> None:
        super().__init__()
        if horizon % (2 ** (len(dims) - 1)) != 0:
            raise ValueError(f"unet horizon {horizon} must be divisible by {2 ** (len(dims) - 1)} for dims {dims}")
        self.time_embedding = nn.Sequential(SinusoidalTimeEmbedding(time_dim), nn.Linear(time_dim, time_dim * 4),
                                            Mish(), nn.Linear(time_dim * 4, time_dim))
        full_cond = time_dim + cond_dim
        channels = [action_dim, *dims]
        self.down = nn.ModuleList()
        for index, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            last = index == len(dims) - 1
            self.down.append(nn.ModuleList([
                ConditionalConvBlock(c_in, c_out, full_cond, kernel_size),
                nn.Conv1d(c_out, c_out, 3, stride=2, padding=1) if not last else nn.Identity()]))
        self.mid = ConditionalConvBlock(dims[-1], dims[-1], full_cond, kernel_size)
        self.up = nn.ModuleList()
        for c_out, c_in in zip(reversed(dims[:-1]), reversed(dims[1:])):
            self.up.append(nn.ModuleList([
                ConditionalConvBlock(c_in * 2, c_out, full_cond, kernel_size),
                nn.ConvTranspose1d(c_out, c_out, 4, stride=2, padding=1)]))
        groups = 8 if dims[0] % 8 == 0 else 1
        self.final = nn.Sequential(nn.Conv1d(dims[0], dims[0], kernel_size, padding=kernel_size // 2),
                                   nn.GroupNorm(groups, dims[0]), Mish(), nn.Conv1d(dims[0], action_dim, 1))

    def forward(self, noisy_actions: torch.Tensor, time: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        x = noisy_actions.transpose(1, 2)
        cond = torch.cat([self.time_embedding(time), condition], dim=-1)
        skips = []
        for block, downsample in self.down:
            x = block(x, cond)
            skips.append(x)
            x = downsample(x)
        x = self.mid(x, cond)
        for block, upsample in self.up:
            # Concatenate with the skip of the same resolution, then upsample (the first level's skip is unused,
            # as in Diffusion Policy's ConditionalUnet1D).
            x = upsample(block(torch.cat([x, skips.pop()], dim=1), cond))
        return self.final(x).transpose(1, 2)


def build_denoiser(network: str, action_dim: int, horizon: int, cond_dim: int, hidden_dim: int, depth: int,
                   unet_dims: tuple[int, ...]) -> nn.Module:
    if network == "mlp":
        return MLPDenoiser(action_dim, horizon, cond_dim, hidden_dim, depth)
    if network == "unet":
        return TemporalUnet1D(action_dim, horizon, cond_dim, tuple(unet_dims))
    raise ValueError(f"unknown network '{network}': choose 'mlp' or 'unet'")
