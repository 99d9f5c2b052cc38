"""Tests for batched device augmentation (alexnet_lab.data.augment)."""

from __future__ import annotations

import math

import pytest
import torch

from alexnet_lab.data.augment import AugmentConfig, augment_batch, to_float

SIZE = 64  # the least the AlexNet stem accepts
IDENTITY = dict(flip=0.0, max_shift=0.0, max_rotate_deg=0.0, scale=(1.0, 1.0), brightness=0.0, contrast=0.0)


def only(**changes: object) -> AugmentConfig:
    """Identity config with the given fields switched on."""
    return AugmentConfig(**{**IDENTITY, **changes})


def random_images(batch: int = 8, channels: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((batch, channels, SIZE, SIZE), generator=gen)  # (B, C, H, W)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 2) as (x, y) in pixels."""
    weights = images[:, 0]  # (B, H, W)
    total = weights.sum(dim=(1, 2))  # (B,)
    ys = torch.arange(images.shape[-2], dtype=images.dtype)
    xs = torch.arange(images.shape[-1], dtype=images.dtype)
    x = (weights.sum(dim=1) * xs).sum(dim=1) / total
    y = (weights.sum(dim=2) * ys).sum(dim=1) / total
    return torch.stack([x, y], dim=-1)


def orientation_deg(images: torch.Tensor) -> torch.Tensor:
    """Principal-axis angle of each (B, 1, H, W) image from its second moments, degrees."""
    weights = images[:, 0]  # (B, H, W)
    total = weights.sum(dim=(1, 2))
    com = centre_of_mass(images)  # (B, 2)
    ys = torch.arange(images.shape[-2], dtype=images.dtype).view(1, -1, 1) - com[:, 1, None, None]
    xs = torch.arange(images.shape[-1], dtype=images.dtype).view(1, 1, -1) - com[:, 0, None, None]
    mu20 = (weights * xs * xs).sum(dim=(1, 2)) / total
    mu02 = (weights * ys * ys).sum(dim=(1, 2)) / total
    mu11 = (weights * xs * ys).sum(dim=(1, 2)) / total
    return torch.rad2deg(0.5 * torch.atan2(2 * mu11, mu20 - mu02))


def horizontal_bar(batch: int, height: int = SIZE, width: int = SIZE) -> torch.Tensor:
    images = torch.zeros((batch, 1, height, width))
    top, left = height // 2 - 2, width // 2 - 20
    images[:, :, top : top + 4, left : left + 40] = 1.0  # 4 px tall, 40 px wide, centred
    return images


def test_shape_dtype_device_and_range_preserved() -> None:
    images = random_images()
    out = augment_batch(images, AugmentConfig(), seeded(1))
    assert out.shape == images.shape
    assert out.dtype == images.dtype
    assert out.device == images.device
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_half_precision_dtype_preserved() -> None:
    images = random_images().to(torch.bfloat16)
    out = augment_batch(images, AugmentConfig(), seeded(1))
    assert out.dtype == torch.bfloat16
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_no_host_sync_on_meta_device() -> None:
    # meta tensors hold no data: any .item()/.cpu()/data-dependent branch would raise
    images = torch.empty((4, 3, SIZE, SIZE), device="meta")
    out = augment_batch(images, AugmentConfig())
    assert out.device.type == "meta" and out.shape == images.shape


def test_default_config_changes_pixels() -> None:
    images = random_images()
    out = augment_batch(images, AugmentConfig(), seeded(1))
    assert (out - images).abs().mean() > 0.05


def test_identity_config_returns_input() -> None:
    images = random_images()
    out = augment_batch(images, only(), seeded(1))
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_flip_only_mirrors_width() -> None:
    images = random_images()
    out = augment_batch(images, only(flip=1.0), seeded(1))
    torch.testing.assert_close(out, images.flip(-1), atol=1e-5, rtol=0)


def test_flip_probability_is_per_sample() -> None:
    images = random_images(batch=64)
    out = augment_batch(images, only(flip=0.5), seeded(2))
    flipped = (out - images.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5  # (B,)
    kept = (out - images).abs().amax(dim=(1, 2, 3)) < 1e-5  # (B,)
    assert bool((flipped ^ kept).all())  # each sample is exactly one of the two
    assert 10 < int(flipped.sum()) < 54


def test_shift_only_moves_square_within_bound() -> None:
    max_shift = 0.1
    images = torch.zeros((64, 1, SIZE, SIZE))
    images[:, :, 30:34, 30:34] = 1.0  # centred 4 x 4 square
    out = augment_batch(images, only(max_shift=max_shift), seeded(3))
    moved = centre_of_mass(out) - centre_of_mass(images)  # (B, 2) pixels
    assert moved.abs().max() <= max_shift * SIZE + 1
    for axis in range(2):
        assert moved[:, axis].min() < -1.0 and moved[:, axis].max() > 1.0  # both ways
    # translation only: the square keeps its mass (it never leaves the image)
    torch.testing.assert_close(out.sum(dim=(1, 2, 3)), images.sum(dim=(1, 2, 3)), atol=1e-3, rtol=0)


def test_rotation_only_tilts_bar_within_bound() -> None:
    max_deg = 20.0
    images = horizontal_bar(64)
    out = augment_batch(images, only(max_rotate_deg=max_deg), seeded(4))
    angles = orientation_deg(out)  # (B,)
    assert angles.abs().max() <= max_deg + 1.0
    assert angles.min() < -5.0 and angles.max() > 5.0
    # rotation about the centre leaves the centre of mass in place
    assert (centre_of_mass(out) - centre_of_mass(images)).abs().max() < 0.5


@pytest.mark.parametrize(("height", "width"), [(SIZE, 2 * SIZE), (2 * SIZE, SIZE)])
def test_rotation_is_rigid_on_non_square_images(height: int, width: int) -> None:
    max_deg = 30.0
    images = horizontal_bar(64, height, width)
    out = augment_batch(images, only(max_rotate_deg=max_deg), seeded(11))
    assert orientation_deg(out).abs().max() <= max_deg + 1.0
    # no shear or stretch: the bar keeps its area
    ratio = out.sum(dim=(1, 2, 3)) / images.sum(dim=(1, 2, 3))
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=0.02, rtol=0)


def test_scale_only_stretches_bar_length() -> None:
    images = horizontal_bar(4)
    out = augment_batch(images, only(scale=(1.25, 1.25)), seeded(5))
    # mass of a 2-D shape grows with the square of the zoom
    ratio = out.sum(dim=(1, 2, 3)) / images.sum(dim=(1, 2, 3))
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1.25**2), atol=0.05, rtol=0)


def test_brightness_only_shifts_mean_within_bound() -> None:
    brightness = 0.2
    images = 0.4 + 0.2 * random_images(batch=64)  # values in [0.4, 0.6]: no clamping
    out = augment_batch(images, only(brightness=brightness), seeded(6))
    change = out.mean(dim=(1, 2, 3)) - images.mean(dim=(1, 2, 3))  # (B,)
    assert change.abs().max() <= brightness + 1e-5
    assert change.abs().max() > brightness / 2
    # additive: every pixel of a sample moves by the same amount
    spread = (out - images).flatten(1).std(dim=1)
    assert spread.max() < 1e-5


def test_contrast_only_scales_deviation_within_bound() -> None:
    contrast = 0.2
    images = 0.4 + 0.2 * random_images(batch=64)
    out = augment_batch(images, only(contrast=contrast), seeded(7))
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), images.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)
    ratio = out.flatten(1).std(dim=1) / images.flatten(1).std(dim=1)  # (B,)
    assert ratio.min() >= 1 - contrast - 1e-4 and ratio.max() <= 1 + contrast + 1e-4
    assert ratio.min() < 0.95 and ratio.max() > 1.05


def test_same_seed_reproduces_and_different_seed_differs() -> None:
    images = random_images()
    first = augment_batch(images, AugmentConfig(), seeded(8))
    again = augment_batch(images, AugmentConfig(), seeded(8))
    other = augment_batch(images, AugmentConfig(), seeded(9))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_samples_of_a_batch_get_different_transforms() -> None:
    images = random_images(batch=1).expand(8, -1, -1, -1).contiguous()
    out = augment_batch(images, AugmentConfig(), seeded(10))
    flat = out.flatten(1)  # (B, C*H*W)
    distances = torch.cdist(flat, flat)  # (B, B)
    off_diagonal = distances[~torch.eye(8, dtype=torch.bool)]
    assert off_diagonal.min() > 1.0


def test_scale_list_becomes_tuple() -> None:
    config = AugmentConfig(scale=[0.8, 1.2])  # type: ignore[arg-type]
    assert config.scale == (0.8, 1.2)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("flip", 1.5),
        ("flip", -0.1),
        ("flip", math.nan),
        ("max_shift", -0.1),
        ("max_rotate_deg", -1.0),
        ("brightness", -0.2),
        ("contrast", -0.2),
        ("contrast", 1.5),
        ("scale", (1.1, 0.9)),
        ("scale", (0.0, 1.0)),
        ("scale", (1.0,)),
    ],
)
def test_bad_config_raises_naming_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"data\\.augmentation\\.{field}"):
        AugmentConfig(**{field: value})


def test_augment_rejects_integer_images() -> None:
    with pytest.raises(ValueError, match="float"):
        augment_batch(torch.zeros((2, 3, SIZE, SIZE), dtype=torch.uint8), AugmentConfig())


def test_to_float_maps_uint8_range_to_unit_interval() -> None:
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    out = to_float(images)
    assert out.dtype == torch.float32
    assert out.shape == images.shape
    assert out[0, 0, 0, 0] == 0.0 and out[0, 0, 0, 2] == 1.0
    assert abs(float(out[0, 0, 0, 1]) - 128 / 255) < 1e-7
