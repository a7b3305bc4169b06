"""Q-function ensembles for off-policy RL, computed as one batched module.

``CriticEnsemble`` keeps the weights of all heads stacked, (num_heads, in, out) per layer, so a forward pass
is ``depth + 1`` batched matmuls whatever the number of heads (REDQ/RLPD use 10). ``LoopCriticEnsemble`` is
the same function written as a Python loop over ``nn.Sequential`` heads; it exists to check the batched
module against (tests) and to measure what batching buys (``benchmarks/residual_throughput.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CriticEnsemble(nn.Module):
    """``num_heads`` independent MLPs Q(obs, action) -> (num_heads, B).

    Each head: ``depth`` hidden layers of ``hidden_dim`` units, each Linear -> LayerNorm (optional) -> ReLU,
    then a Linear to one output. LayerNorm keeps Q estimates bounded when extrapolating to unseen actions,
    which is what lets high update-to-data ratios stay stable (RLPD).
    """

    def __init__(self, obs_dim: int, action_dim: int, num_heads: int = 10, hidden_dim: int = 256, depth: int = 2,
                 layer_norm: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or depth < 1:
            raise ValueError(f"num_heads and depth must be >= 1, got {num_heads} and {depth}")
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.num_heads, self.hidden_dim, self.depth, self.layer_norm = num_heads, hidden_dim, depth, layer_norm
        sizes = [obs_dim + action_dim] + [hidden_dim] * depth + [1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            # nn.Linear's default initialisation, drawn independently for every head
            bound = 1.0 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(num_heads, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_heads, 1, fan_out).uniform_(-bound, bound)))
        self.norm_scales = nn.ParameterList()
        self.norm_shifts = nn.ParameterList()
        if layer_norm:
            for _ in range(depth):
                self.norm_scales.append(nn.Parameter(torch.ones(num_heads, 1, hidden_dim)))
                self.norm_shifts.append(nn.Parameter(torch.zeros(num_heads, 1, hidden_dim)))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Q values (num_heads, B) from obs (B, obs_dim) and action (B, action_dim); inputs may also carry a
        leading head dimension, (num_heads, B, ...), to give every head its own batch."""
        x = torch.cat([obs, action], dim=-1)
        if x.dim() == 2:
            x = x.unsqueeze(0)  # broadcast one batch to every head: (1, B, in) @ (H, in, out)
        for layer in range(self.depth):
            x = torch.baddbmm(self.biases[layer], x.expand(self.num_heads, -1, -1), self.weights[layer])
            if self.layer_norm:
                x = F.layer_norm(x, (self.hidden_dim,)) * self.norm_scales[layer] + self.norm_shifts[layer]
            x = F.relu(x)
        return torch.baddbmm(self.biases[-1], x, self.weights[-1]).squeeze(-1)

    def head_modules(self) -> "LoopCriticEnsemble":
        """The same function as a Python loop over per-head ``nn.Sequential`` modules (weights copied)."""
        loop = LoopCriticEnsemble(self.obs_dim, self.action_dim, self.num_heads, self.hidden_dim, self.depth,
                                  self.layer_norm)
        with torch.no_grad():
            for head_index, head in enumerate(loop.heads):
                linears = [module for module in head if isinstance(module, nn.Linear)]
                norms = [module for module in head if isinstance(module, nn.LayerNorm)]
                for layer, linear in enumerate(linears):
                    linear.weight.copy_(self.weights[layer][head_index].T)
                    linear.bias.copy_(self.biases[layer][head_index, 0])
                for layer, norm in enumerate(norms):
                    norm.weight.copy_(self.norm_scales[layer][head_index, 0])
                    norm.bias.copy_(self.norm_shifts[layer][head_index, 0])
        return loop.to(self.weights[0].device)


class LoopCriticEnsemble(nn.Module):
    """Reference implementation: one ``nn.Sequential`` per head, evaluated in a Python loop."""

    def __init__(self, obs_dim: int, action_dim: int, num_heads: int = 10, hidden_dim: int = 256, depth: int = 2,
                 layer_norm: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.heads = nn.ModuleList()
        for _ in range(num_heads):
            layers: list[nn.Module] = []
            fan_in = obs_dim + action_dim
            for _ in range(depth):
                layers.append(nn.Linear(fan_in, hidden_dim))
                if layer_norm:
                    layers.append(nn.LayerNorm(hidden_dim))
                layers.append(nn.ReLU())
                fan_in = hidden_dim
            layers.append(nn.Linear(fan_in, 1))
            self.heads.append(nn.Sequential(*layers))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, action], dim=-1)
        return torch.stack([head(x).squeeze(-1) for head in self.heads])


def ensemble_min_target(q_heads: torch.Tensor, subset_size: int = 2,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """REDQ's target: the minimum over a random subset of ``subset_size`` heads of ``q_heads`` (H, B) -> (B,).

    One subset is drawn per call (per update), as in REDQ; the in-target minimum over a few heads controls
    overestimation while the other heads keep the ensemble diverse.
    """
    num_heads = q_heads.shape[0]
    if subset_size >= num_heads:
        return q_heads.min(dim=0).values
    chosen = torch.randperm(num_heads, generator=generator)[:subset_size].to(q_heads.device)
    return q_heads.index_select(0, chosen).min(dim=0).values


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - tau) * target + tau * source, for every parameter; buffers are copied."""
    target_params = list(target.parameters())
    source_params = list(source.parameters())
    torch._foreach_lerp_(target_params, source_params, tau)
    for target_buffer, source_buffer in zip(target.buffers(), source.buffers()):
        target_buffer.copy_(source_buffer)


def mlp(input_dim: int, output_dim: int, hidden_dim: int, depth: int, layer_norm: bool = True) -> nn.Sequential:
    """Linear -> [LayerNorm] -> ReLU, ``depth`` times, then a Linear to ``output_dim``."""
    layers: list[nn.Module] = []
    fan_in = input_dim
    for _ in range(depth):
        layers.append(nn.Linear(fan_in, hidden_dim))
        if layer_norm:
            layers.append(nn.LayerNorm(hidden_dim))
        layers.append(nn.ReLU())
        fan_in = hidden_dim
    layers.append(nn.Linear(fan_in, output_dim))
    return nn.Sequential(*layers)
