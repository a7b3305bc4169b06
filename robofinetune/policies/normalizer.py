"""Min-max normalisation to [-1, 1]; the statistics are buffers, so they travel inside every checkpoint."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class MinMaxNormalizer(nn.Module):
    """Maps each feature's [low, high] range seen in the data onto [-1, 1].

    Constant features (high == low) would divide by zero; they are centred and left unscaled instead, as
    Diffusion Policy does, so a constant gripper reading stays constant rather than exploding.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("low", -torch.ones(size))
        self.register_buffer("high", torch.ones(size))

    @classmethod
    def from_data(cls, data: np.ndarray) -> "MinMaxNormalizer":
        data = np.asarray(data, dtype=np.float64).reshape(len(data), -1)
        normalizer = cls(data.shape[1])
        normalizer.low.copy_(torch.as_tensor(data.min(axis=0), dtype=torch.float32))
        normalizer.high.copy_(torch.as_tensor(data.max(axis=0), dtype=torch.float32))
        return normalizer

    def _scale_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.high - self.low
        constant = span < 1e-6
        scale = torch.where(constant, torch.ones_like(span), 2.0 / span.clamp_min(1e-6))
        offset = torch.where(constant, -self.low, -1.0 - self.low * scale)
        return scale, offset

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        scale, offset = self._scale_offset()
        return x * scale + offset

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        scale, offset = self._scale_offset()
        return (x - offset) / scale
