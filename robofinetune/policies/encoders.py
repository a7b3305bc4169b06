"""Observation encoders: camera images and state vectors -> one feature vector per time step (plain torch).

torchvision does not load beside this project's torch build and no pretrained weights can be fetched at run
time, so both image backbones are written here and train from scratch, end to end through the policy's loss:

* ``conv``: DrQ / LeRobot SAC's encoder: four 3x3 convolutions of 32 channels (the first with stride 2), ReLU,
  flatten, a linear layer to ``feature_dim``, LayerNorm. Cheap; the CPU default.
* ``strided_conv``: LeRobot SAC's default image encoder: four convolutions of 32 channels, kernels 7, 5, 3, 3,
  all with stride 2, ReLU, then the same linear layer and LayerNorm. At 84x84 it costs ~16 M multiply-adds an
  image against ~40 M for ``conv`` (which keeps full resolution after its first layer) and has 40x fewer weights
  (its flattened map is 3x3 instead of 35x35); measured on the 2-core CPU, forward and backward of 128 images,
  ~2.7x faster. The choice for image BC and RL on a CPU.
* ``resnet18``: ResNet-18 with every BatchNorm replaced by GroupNorm (16 channels a group) and global pooling
  replaced by a spatial softmax over 32 keypoints, then a linear layer to ``feature_dim`` (robomimic's
  VisualCore, Diffusion Policy's image encoder). BatchNorm is avoided because EMA weights and small batches make
  its running statistics unreliable, as Diffusion Policy found.

Augmentation runs in training mode only: ``shift`` (DrQ: replicate-pad by ``shift_pad`` pixels, random crop back
to the original size, i.e. a random shift of up to +-pad pixels per image) or ``crop`` (robomimic / Diffusion
Policy: a random ``crop_fraction`` crop, 84 -> 76, in training; the centre crop at inference, so the backbone
always sees the cropped size). In eval mode both are deterministic.

Images arrive as uint8 (B, T, H, W, C) and are converted to float in [-1, 1] inside :meth:`ImageEncoder.forward`,
on the encoder's device: batches, datasets and observation histories keep them uint8 until here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robofinetune.errors import TaskError
from robofinetune.images import image_keys as select_image_keys
from robofinetune.images import state_keys as select_state_keys
from robofinetune.policies.normalizer import MinMaxNormalizer

ENCODERS = ("conv", "strided_conv", "resnet18")
AUGMENTATIONS = ("shift", "crop", "none")


# --- augmentation ------------------------------------------------------------------------------------------------


def _gather_windows(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: int,
                    width: int) -> torch.Tensor:
    """``images[n, :, top[n]:top[n]+height, left[n]:left[n]+width]`` for every n, in one indexing op."""
    rows = (top[:, None] + torch.arange(height, device=images.device)[None])[:, :, None]   # (N, h, 1)
    cols = (left[:, None] + torch.arange(width, device=images.device)[None])[:, None, :]   # (N, 1, w)
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


class RandomShift(nn.Module):
    """DrQ's random shift: replicate-pad by ``pad`` and crop back at a random offset (training only)."""

    def __init__(self, pad: int = 4) -> None:
        super().__init__()
        self.pad = int(pad)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return height, width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.training or self.pad == 0:
            return images
        count, _, height, width = images.shape
        padded = F.pad(images, (self.pad,) * 4, mode="replicate")
        top = torch.randint(0, 2 * self.pad + 1, (count,), device=images.device)
        left = torch.randint(0, 2 * self.pad + 1, (count,), device=images.device)
        return _gather_windows(padded, top, left, height, width)


class RandomCrop(nn.Module):
    """A random ``size`` crop in training, the centre crop at inference (robomimic's CropRandomizer)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        count, _, height, width = images.shape
        crop_h, crop_w = self.size
        if not self.training:
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
            return images[:, :, top: top + crop_h, left: left + crop_w]
        top = torch.randint(0, height - crop_h + 1, (count,), device=images.device)
        left = torch.randint(0, width - crop_w + 1, (count,), device=images.device)
        return _gather_windows(images, top, left, crop_h, crop_w)


class NoAugmentation(nn.Module):
    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return height, width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


def crop_size(height: int, width: int, fraction: float) -> tuple[int, int]:
    """The crop ``crop`` augmentation takes: ``fraction`` of each side, rounded (84 -> 76 at 0.9)."""
    return max(1, int(round(height * fraction))), max(1, int(round(width * fraction)))


def build_augmentation(kind: str, height: int, width: int, shift_pad: int = 4,
                       crop_fraction: float = 0.9) -> nn.Module:
    if kind == "shift":
        return RandomShift(shift_pad)
    if kind == "crop":
        return RandomCrop(crop_size(height, width, crop_fraction))
    if kind == "none":
        return NoAugmentation()
    raise ValueError(f"unknown augmentation '{kind}': choose one of {list(AUGMENTATIONS)}")


# --- backbones ---------------------------------------------------------------------------------------------------


class ConvEncoder(nn.Module):
    """DrQ / LeRobot's 4-layer conv encoder: (N, C, H, W) floats -> (N, feature_dim)."""

    def __init__(self, channels: int, height: int, width: int, feature_dim: int = 64, width_channels: int = 32) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(channels, width_channels, 3, stride=2), nn.ReLU(),
            nn.Conv2d(width_channels, width_channels, 3, stride=1), nn.ReLU(),
            nn.Conv2d(width_channels, width_channels, 3, stride=1), nn.ReLU(),
            nn.Conv2d(width_channels, width_channels, 3, stride=1), nn.ReLU(),
        )
        out_h, out_w = (height - 3) // 2 + 1 - 6, (width - 3) // 2 + 1 - 6
        if out_h < 1 or out_w < 1:
            raise ValueError(f"conv encoder needs images of at least 17x17 pixels, got {height}x{width}")
        self.projection = nn.Sequential(nn.Linear(width_channels * out_h * out_w, feature_dim),
                                        nn.LayerNorm(feature_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.convs(images).flatten(1))


class StridedConvEncoder(nn.Module):
    """LeRobot SAC's encoder: four stride-2 convolutions (kernels 7, 5, 3, 3) of 32 channels, linear, LayerNorm."""

    def __init__(self, channels: int, height: int, width: int, feature_dim: int = 64, width_channels: int = 32) -> None:
        super().__init__()
        layers, in_channels, out_h, out_w = [], channels, height, width
        for kernel in (7, 5, 3, 3):
            layers += [nn.Conv2d(in_channels, width_channels, kernel, stride=2), nn.ReLU()]
            in_channels = width_channels
            out_h, out_w = (out_h - kernel) // 2 + 1, (out_w - kernel) // 2 + 1
        if out_h < 1 or out_w < 1:
            raise ValueError(f"strided_conv encoder needs images of at least 39x39 pixels (after cropping), got "
                             f"{height}x{width}; use encoder 'conv' for smaller images")
        self.convs = nn.Sequential(*layers)
        self.projection = nn.Sequential(nn.Linear(width_channels * out_h * out_w, feature_dim),
                                        nn.LayerNorm(feature_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.convs(images).flatten(1))


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, channels // 16), channels)  # Diffusion Policy's replace_bn_with_gn


class BasicBlock(nn.Module):
    """ResNet's basic block (two 3x3 convolutions and a skip), with GroupNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.norm2 = _group_norm(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            _group_norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class SpatialSoftmax(nn.Module):
    """Keypoints from a feature map: a 1x1 conv to ``num_keypoints`` maps, a softmax over each map's pixels, and
    each map's expected (x, y) in [-1, 1] (Levine et al. 2016; robomimic's SpatialSoftmax)."""

    def __init__(self, channels: int, height: int, width: int, num_keypoints: int = 32) -> None:
        super().__init__()
        self.keypoints = nn.Conv2d(channels, num_keypoints, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        self.register_buffer("grid", torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1), persistent=False)
        self.num_keypoints = num_keypoints

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        maps = self.keypoints(features).flatten(2)                      # (N, K, H*W)
        attention = torch.softmax(maps, dim=-1)
        return (attention @ self.grid).flatten(1)                       # (N, K * 2): x, y per keypoint


class ResNet18Encoder(nn.Module):
    """ResNet-18 (GroupNorm) trunk -> spatial softmax (32 keypoints) -> linear: (N, C, H, W) -> (N, feature_dim)."""

    def __init__(self, channels: int, height: int, width: int, feature_dim: int = 64, num_keypoints: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False), _group_norm(64),
                                  nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
        layers, in_channels = [], 64
        for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(in_channels, out_channels, stride),
                                        BasicBlock(out_channels, out_channels, 1)))
            in_channels = out_channels
        self.layers = nn.Sequential(*layers)
        out_h, out_w = height, width
        for _ in range(5):  # stem conv, max pool, layer2..4: each halves the size, rounding up
            out_h, out_w = math.ceil(out_h / 2), math.ceil(out_w / 2)
        if out_h < 2 or out_w < 2:  # a 1x1 map has one place for every keypoint: the output ignores the image
            raise ValueError(f"resnet18 encoder needs images of at least 33x33 pixels (after cropping) for its "
                             f"spatial softmax, got {height}x{width}; use encoder 'conv' for smaller images")
        self.pool = SpatialSoftmax(512, out_h, out_w, num_keypoints)
        self.projection = nn.Linear(num_keypoints * 2, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.pool(self.layers(self.stem(images))))


def build_backbone(kind: str, channels: int, height: int, width: int, feature_dim: int) -> nn.Module:
    if kind == "conv":
        return ConvEncoder(channels, height, width, feature_dim)
    if kind == "strided_conv":
        return StridedConvEncoder(channels, height, width, feature_dim)
    if kind == "resnet18":
        return ResNet18Encoder(channels, height, width, feature_dim)
    raise ValueError(f"unknown image encoder '{kind}': choose one of {list(ENCODERS)}")


class ImageEncoder(nn.Module):
    """One camera: uint8 (N, H, W, C) -> float in [-1, 1] -> augmentation (training only) -> backbone."""

    def __init__(self, shape: Sequence[int], encoder: str = "conv", feature_dim: int = 64, augmentation: str = "shift",
                 shift_pad: int = 4, crop_fraction: float = 0.9) -> None:
        super().__init__()
        height, width, channels = (int(s) for s in shape)
        self.shape = (height, width, channels)
        self.augmentation = build_augmentation(augmentation, height, width, shift_pad, crop_fraction)
        self.backbone = build_backbone(encoder, channels, *self.augmentation.output_size(height, width), feature_dim)
        self.feature_dim = feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return self.backbone(self.augmentation(x))


# --- the whole observation ---------------------------------------------------------------------------------------


class ObservationEncoder(nn.Module):
    """A dict of (B, T, ...) observations -> (B, T, output_dim): each camera's features, then the state keys.

    Image keys (``<camera>_image``, uint8 (B, T, H, W, C)) go through one :class:`ImageEncoder` per camera; state
    keys are flattened, concatenated in ``obs_keys`` order and min-max normalised by ``state_normalizer``
    (statistics fitted on the training data, stored with the weights). Per time step the output is
    ``[camera_1 features, ..., camera_n features, normalised state]``.
    """

    def __init__(self, obs_keys: Sequence[str], obs_shapes: Mapping[str, Sequence[int]], encoder: str = "conv",
                 feature_dim: int = 64, augmentation: str = "shift", shift_pad: int = 4,
                 crop_fraction: float = 0.9) -> None:
        super().__init__()
        self.image_keys = select_image_keys(obs_keys)
        self.state_keys = select_state_keys(obs_keys)
        self.shapes = {key: tuple(int(s) for s in obs_shapes[key]) for key in obs_keys}
        self.state_dim = int(sum(int(np.prod(self.shapes[key])) for key in self.state_keys))
        self.state_normalizer = MinMaxNormalizer(self.state_dim)
        self.image_encoders = nn.ModuleDict({
            key: ImageEncoder(self.shapes[key], encoder, feature_dim, augmentation, shift_pad, crop_fraction)
            for key in self.image_keys})
        self.output_dim = len(self.image_keys) * feature_dim + self.state_dim

    @property
    def device(self) -> torch.device:
        return self.state_normalizer.low.device

    def _tensor(self, value: Any, dtype: torch.dtype | None) -> torch.Tensor:
        tensor = value if torch.is_tensor(value) else torch.as_tensor(np.asarray(value))
        return tensor.to(device=self.device, dtype=dtype) if dtype is not None else tensor.to(self.device)

    def forward(self, obs: Mapping[str, Any]) -> torch.Tensor:
        parts = []
        batch = steps = None
        for key in self.image_keys:
            images = self._tensor(obs[key], None)  # stays uint8 on the way to the device: 4x less to copy
            if images.dtype != torch.uint8:
                raise TaskError(f"observation '{key}' is {str(images.dtype).replace('torch.', '')}; images must be "
                                f"uint8 (0..255)")
            if images.ndim != 5 or tuple(images.shape[2:]) != self.shapes[key]:
                raise TaskError(f"observation '{key}' has shape {tuple(images.shape)}, expected (B, T) + "
                                f"{self.shapes[key]}")
            batch, steps = images.shape[:2]
            features = self.image_encoders[key](images.reshape(batch * steps, *self.shapes[key]))
            parts.append(features.reshape(batch, steps, -1))
        if self.state_keys:
            state = []
            for key in self.state_keys:
                value = self._tensor(obs[key], torch.float32)
                state.append(value.reshape(value.shape[0], value.shape[1], -1))
            flat = torch.cat(state, dim=-1)
            parts.append(self.state_normalizer.normalize(flat))
        return torch.cat(parts, dim=-1)

