"""Q-function ensembles for off-policy RL, computed as one batched module.

``CriticEnsemble`` keeps the weights of all heads stacked, (num_heads, in, out) per layer, so a forward pass
is ``depth + 1`` batched matmuls whatever the number of heads (REDQ/RLPD use 10). ``LoopCriticEnsemble`` is
the same function written as a Python loop over ``nn.Sequential`` heads; it exists to check the batched
module against (tests) and to measure what batching buys (``benchmarks/residual_throughput.py``).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

Result = TypeVar("Result")


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

    def forward(self, obs: torch.Tensor, action: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """Q values (num_heads, B) from obs (B, obs_dim) and action (B, action_dim); inputs may also carry a
        leading head dimension, (num_heads, B, ...), to give every head its own batch. ``heads`` (a 1-D index
        tensor) evaluates only those heads, (len(heads), B): REDQ's target needs 2 of 10."""
        x = torch.cat([obs, action], dim=-1)
        weights, biases = list(self.weights), list(self.biases)
        scales, shifts = list(self.norm_scales), list(self.norm_shifts)
        if heads is not None:
            heads = heads.to(weights[0].device)
            weights = [weight.index_select(0, heads) for weight in weights]
            biases = [bias.index_select(0, heads) for bias in biases]
            scales = [scale.index_select(0, heads) for scale in scales]
            shifts = [shift.index_select(0, heads) for shift in shifts]
        num_heads = weights[0].shape[0]
        for layer in range(self.depth):
            if layer == 0 and x.dim() == 2:
                # one batch shared by every head: a single (B, in) @ (in, heads * hidden) GEMM, which a CPU runs
                # several times faster than ``num_heads`` small batched ones
                fused = weights[0].permute(1, 0, 2).reshape(x.shape[-1], num_heads * self.hidden_dim)
                x = (x @ fused).reshape(x.shape[0], num_heads, self.hidden_dim).transpose(0, 1) + biases[0]
            else:
                x = torch.baddbmm(biases[layer], x.expand(num_heads, -1, -1), weights[layer])
            if self.layer_norm:
                x = torch.addcmul(shifts[layer], F.layer_norm(x, (self.hidden_dim,)), scales[layer])
            x = F.relu(x)
        return torch.baddbmm(biases[-1], x, weights[-1]).squeeze(-1)

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


class HeadGroups:
    """The heads of an ensemble split into ``threads`` groups whose forward and backward passes run at once, one
    group per thread (each with torch's intra-op thread count, 1 in the RL learners).

    Why: an update's ops are small (10 heads x 256 x 128), so torch's intra-op threads spend their time at
    barriers, and on a 2-core machine shared with env processes a second intra-op thread makes an update slower.
    Whole groups of heads are independent until the optimiser step, so one thread per group needs one join per
    update phase. Each group's gradients land in disjoint slices of the stacked weights, so the result does not
    depend on which thread finishes first. ``threads=1`` runs everything on the calling thread (``heads=None``).
    """

    def __init__(self, num_heads: int, threads: int = 1) -> None:
        self.threads = max(1, min(int(threads), num_heads))
        self.groups: list[torch.Tensor | None] = (
            [None] if self.threads == 1 else list(torch.arange(num_heads).chunk(self.threads)))
        self._pool: ThreadPoolExecutor | None = None

    def map(self, function: Callable[[torch.Tensor | None], Result]) -> list[Result]:
        """``[function(group) for group in groups]``, the first group on the calling thread, the rest on workers."""
        if self.threads == 1:
            return [function(None)]
        if self._pool is None:
            # worker threads take torch's process-wide intra-op thread count (torch.set_num_threads) at first use
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="critic-heads")
        futures = [self._pool.submit(function, group) for group in self.groups[1:]]
        return [function(self.groups[0])] + [future.result() for future in futures]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def random_head_subset(num_heads: int, subset_size: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """REDQ's random subset of heads for one target, or None when the subset is every head."""
    if subset_size >= num_heads:
        return None
    return torch.randperm(num_heads, generator=generator)[:subset_size]


def ensemble_min_target(q_heads: torch.Tensor, subset_size: int = 2,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """REDQ's target: the minimum over a random subset of ``subset_size`` heads of ``q_heads`` (H, B) -> (B,).

    One subset is drawn per call (per update), as in REDQ; the in-target minimum over a few heads controls
    overestimation while the other heads keep the ensemble diverse. Where the heads are computed only to take
    this minimum, draw the subset first (:func:`random_head_subset`) and evaluate just those heads
    (``CriticEnsemble(obs, action, heads=subset)``): the same value for a fifth of the work at 2 of 10.
    """
    chosen = random_head_subset(q_heads.shape[0], subset_size, generator)
    if chosen is None:
        return q_heads.min(dim=0).values
    return q_heads.index_select(0, chosen.to(q_heads.device)).min(dim=0).values


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
