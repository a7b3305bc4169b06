"""Image encoders: output shapes, augmentation in training only, uint8 in / features out."""

import numpy as np
import pytest
import torch

from robofinetune.errors import TaskError
from robofinetune.policies.encoders import (ConvEncoder, ImageEncoder, ObservationEncoder, RandomCrop, RandomShift,
                                            ResNet18Encoder, SpatialSoftmax, StridedConvEncoder, crop_size)


def images(batch, height=84, width=84, channels=3, seed=0):
    return torch.randint(0, 256, (batch, height, width, channels), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [(84, 84), (64, 64), (32, 48)])
def test_conv_encoder_output_shape(size):
    encoder = ConvEncoder(3, *size, feature_dim=50)
    features = encoder(torch.rand(5, 3, *size))
    assert features.shape == (5, 50)
    # LayerNorm at the end: every feature vector is normalised
    assert torch.allclose(features.mean(dim=1), torch.zeros(5), atol=1e-5)


@pytest.mark.parametrize("size, spatial", [((84, 84), (3, 3)), ((64, 64), (2, 2)), ((43, 50), (1, 1))])
def test_strided_conv_encoder_halves_the_image_four_times(size, spatial):
    encoder = StridedConvEncoder(3, *size, feature_dim=32)
    assert [m.stride for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)] == [(2, 2)] * 4
    assert encoder.convs(torch.rand(1, 3, *size)).shape[-2:] == spatial
    features = encoder(torch.rand(5, 3, *size))
    assert features.shape == (5, 32) and torch.allclose(features.mean(dim=1), torch.zeros(5), atol=1e-5)
    # far fewer weights than DrQ's encoder, whose flattened map keeps nearly full resolution
    assert sum(p.numel() for p in encoder.parameters()) * 10 < sum(p.numel() for p in ConvEncoder(3, *size).parameters())
    StridedConvEncoder(3, 39, 39)  # the smallest that leaves a 1x1 map
    with pytest.raises(ValueError, match="at least 39x39"):
        StridedConvEncoder(3, 38, 39)


@pytest.mark.parametrize("size", [(84, 84), (76, 76), (40, 48)])
def test_resnet18_with_group_norm_and_spatial_softmax(size):
    encoder = ResNet18Encoder(3, *size, feature_dim=64)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in encoder.modules()) == 1 + 8 * 2 + 3  # stem, blocks, skips
    assert encoder(torch.rand(2, 3, *size)).shape == (2, 64)
    # ResNet-18's conv layers: the stem, 8 basic blocks of two, 3 downsampling skips (+ the keypoint 1x1 conv)
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 16 + 3 + 1


def test_resnet18_refuses_images_too_small_for_its_keypoints():
    with pytest.raises(ValueError, match="at least 33x33"):
        ResNet18Encoder(3, 32, 32)


def test_spatial_softmax_finds_a_bright_spot():
    pool = SpatialSoftmax(1, 9, 9, num_keypoints=1)
    with torch.no_grad():
        pool.keypoints.weight.fill_(50.0)
        pool.keypoints.bias.zero_()
    feature = torch.zeros(1, 1, 9, 9)
    feature[0, 0, 2, 6] = 1.0  # row 2 (y), column 6 (x) of 0..8
    x, y = pool(feature)[0].tolist()
    assert x == pytest.approx(-1 + 2 * 6 / 8, abs=1e-3) and y == pytest.approx(-1 + 2 * 2 / 8, abs=1e-3)


def test_random_shift_moves_the_image_in_training_and_not_in_eval():
    shift = RandomShift(pad=4)
    x = torch.rand(16, 3, 20, 20)
    shift.eval()
    assert torch.equal(shift(x), x)
    shift.train()
    torch.manual_seed(0)
    shifted = shift(x)
    assert shifted.shape == x.shape and not torch.equal(shifted, x)
    # each image is its replicate-padded self seen through a 20x20 window at some offset within +-4 pixels
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="replicate")
    for n in range(16):
        windows = {(dy, dx) for dy in range(9) for dx in range(9)
                   if torch.equal(padded[n, :, dy: dy + 20, dx: dx + 20], shifted[n])}
        assert windows, n
    offsets = set()
    for n in range(16):
        offsets |= {(dy, dx) for dy in range(9) for dx in range(9)
                    if torch.equal(padded[n, :, dy: dy + 20, dx: dx + 20], shifted[n])}
    assert len(offsets) > 3  # offsets differ between images of a batch


def test_random_crop_is_random_in_training_and_the_centre_in_eval():
    assert crop_size(84, 84, 0.9) == (76, 76)
    crop = RandomCrop((76, 76))
    x = torch.rand(8, 3, 84, 84)
    crop.eval()
    assert torch.equal(crop(x), x[:, :, 4:80, 4:80])
    crop.train()
    torch.manual_seed(0)
    out = crop(x)
    assert out.shape == (8, 3, 76, 76)
    tops = []
    for n in range(8):
        found = [(t, l) for t in range(9) for l in range(9) if torch.equal(x[n, :, t: t + 76, l: l + 76], out[n])]
        assert len(found) == 1
        tops.append(found[0])
    assert len(set(tops)) > 1


@pytest.mark.parametrize("augmentation", ["shift", "crop"])
@pytest.mark.parametrize("encoder", ["conv", "strided_conv", "resnet18"])
def test_image_encoder_is_deterministic_in_eval_and_augments_in_training(encoder, augmentation):
    size = {"conv": 32, "strided_conv": 52, "resnet18": 48}[encoder]
    module = ImageEncoder((size, size, 3), encoder=encoder, feature_dim=16, augmentation=augmentation)
    batch = images(4, size, size)
    module.eval()
    assert torch.equal(module(batch), module(batch))
    module.train()
    torch.manual_seed(1)
    first = module(batch)
    second = module(batch)
    assert first.shape == (4, 16) and not torch.allclose(first, second)


def test_observation_encoder_concatenates_cameras_and_normalised_state():
    shapes = {"agent_pos": [2], "front_image": [32, 32, 3], "wrist_image": [24, 24, 3], "joint": [3]}
    encoder = ObservationEncoder(list(shapes), shapes, encoder="conv", feature_dim=10, augmentation="none")
    assert encoder.image_keys == ["front_image", "wrist_image"] and encoder.state_keys == ["agent_pos", "joint"]
    assert encoder.output_dim == 2 * 10 + 5
    encoder.state_normalizer.low.copy_(torch.tensor([0.0, 0.0, -2.0, -2.0, -2.0]))
    encoder.state_normalizer.high.copy_(torch.tensor([2.0, 2.0, 2.0, 2.0, 2.0]))
    obs = {"agent_pos": np.full((3, 2, 2), 2.0, np.float32), "joint": np.zeros((3, 2, 3), np.float32),
           "front_image": images(6, 32, 32).reshape(3, 2, 32, 32, 3).numpy(),
           "wrist_image": images(6, 24, 24, seed=1).reshape(3, 2, 24, 24, 3)}
    encoder.eval()
    out = encoder(obs)
    assert out.shape == (3, 2, 25)
    assert torch.allclose(out[..., 20:], torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]).expand(3, 2, 5))
    # the image part of each step is that camera's encoder applied to that frame
    front = encoder.image_encoders["front_image"](torch.as_tensor(obs["front_image"][1, 0])[None])
    assert torch.allclose(out[1, 0, :10], front[0], atol=1e-5)


def test_observation_encoder_takes_images_as_uint8_only():
    shapes = {"top_image": [32, 32, 3]}
    encoder = ObservationEncoder(["top_image"], shapes, augmentation="none")
    with pytest.raises(TaskError, match=r"observation 'top_image' is float32; images must be uint8"):
        encoder({"top_image": np.zeros((1, 1, 32, 32, 3), np.float32)})
    with pytest.raises(TaskError, match=r"'top_image' has shape \(1, 1, 32, 32, 4\)"):
        encoder({"top_image": np.zeros((1, 1, 32, 32, 4), np.uint8)})
    # image-only observation: no state keys, features only
    assert encoder({"top_image": np.zeros((2, 3, 32, 32, 3), np.uint8)}).shape == (2, 3, 64)
