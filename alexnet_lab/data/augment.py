"""Batched augmentation on the device: one affine resample plus brightness/contrast.

The whole batch is transformed with tensor ops (no per-sample Python loop, no host
sync), in the style of cifar10-airbench. Random draws come from one `torch.rand` call
per batch, so a seeded `torch.Generator` reproduces a batch exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alexnet_lab.config import AugmentConfig
from alexnet_lab.model import to_float as to_float  # where it lived before; the net's input scale is model.py's

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_NUM_DRAWS = 7  # uniforms per sample: flip, shift x, shift y, rotate, scale, brightness, contrast


def _affine_matrices(draws: torch.Tensor, config: AugmentConfig, height: int, width: int) -> torch.Tensor:
    """Per-sample output->input maps in affine_grid's normalized coordinates, (B, 2, 3).

    In pixel units about the image centre the content moves as
    p_out = t + s * R(a) @ Fl @ p_in, so the sampler needs the inverse
    p_in = Fl @ R(-a) @ (p_out - t) / s. Conjugating with D = diag(W/2, H/2) keeps
    rotations rigid on non-square images.
    """
    flip = torch.where(draws[:, 0] < config.flip, -1.0, 1.0)  # (B,) sign of x
    shift = (draws[:, 1:3] * 2.0 - 1.0) * config.max_shift  # (B, 2) fraction of W, H
    angle = (draws[:, 3] * 2.0 - 1.0) * math.radians(config.max_rotate_deg)  # (B,) rad
    low, high = config.scale
    zoom = low + draws[:, 4] * (high - low)  # (B,)

    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # (B,)
    aspect = height / width
    linear = torch.stack(
        [torch.stack([flip * cos, flip * sin * aspect], dim=-1), torch.stack([-sin / aspect, cos], dim=-1)], dim=-2
    )  # (B, 2, 2)
    # a shift of f * W pixels is 2 * f in normalized units (the image spans [-1, 1])
    offset = -(linear @ (2.0 * shift).unsqueeze(-1))  # (B, 2, 1)
    return torch.cat([linear, offset], dim=-1)  # (B, 2, 3)


def augment_batch(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """float (B, C, H, W) in [0,1] -> float (B, C, H, W) in [0,1], same dtype/device.

    Each sample gets its own flip, shift, rotation and zoom (one bilinear resample,
    zeros outside the image), then brightness and contrast. `generator`, if given,
    must live on `images.device`. With an identity config the input tensor itself
    is returned.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"augment_batch expects float (B, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
    # whether a flip, shift, rotation or zoom, and whether a brightness or contrast change, can be drawn
    moves = not (config.flip == config.max_shift == config.max_rotate_deg == 0.0 and tuple(config.scale) == (1.0, 1.0))
    recolours = config.brightness != 0.0 or config.contrast != 0.0
    if not (moves or recolours):
        return images

    batch, _, height, width = images.shape
    # half precision loses sub-pixel accuracy in the sampling grid; resample in float32
    out = images.float() if images.dtype in _HALF_DTYPES else images
    draws = torch.rand((batch, _NUM_DRAWS), device=images.device, dtype=torch.float32, generator=generator)  # (B, 7)

    if moves:
        theta = _affine_matrices(draws, config, height, width).to(out.dtype)  # (B, 2, 3)
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)  # (B, H, W, 2)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B, C, H, W)

    if recolours:
        shape = (batch, 1, 1, 1)
        offset = ((draws[:, 5] * 2.0 - 1.0) * config.brightness).view(shape).to(out.dtype)
        factor = (1.0 + (draws[:, 6] * 2.0 - 1.0) * config.contrast).view(shape).to(out.dtype)
        out = out + offset
        mean = out.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1), over channels too
        out = (out - mean) * factor + mean

    return out.clamp_(0.0, 1.0).to(images.dtype)
