"""AlexNet (Krizhevsky, Sutskever and Hinton 2012) with every width divided by `downscale`.

Plain typed PyTorch: the network takes an `AlexNetConfig` of plain values and knows nothing
of Hydra or Lightning, so it can be built in a test or a notebook with one line.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from alexnet_lab.config import ModelConfig
from alexnet_lab.errors import setting


@dataclass(frozen=True)
class ConvLayer:
    """One convolution (+ ReLU), at the paper's width; followed by LRN and/or max-pooling."""

    width: int  # output channels at downscale 1
    kernel: int  # square kernel side, pixels
    stride: int = 1  # pixels
    padding: int = 0  # pixels, each side
    lrn: bool = False  # local response normalisation after the ReLU when `AlexNetConfig.lrn`
    pool: bool = False  # 3x3 stride-2 max-pooling after the ReLU (and LRN)


@dataclass(frozen=True)
class ArchSpec:
    """A whole variant as data: the conv stack, the pooled grid and the hidden dense widths."""

    convs: tuple[ConvLayer, ...]
    pool_padding: int  # padding of every 3x3/2 max-pool, pixels
    pooled_size: tuple[int, int]  # (h, w) of the adaptive average pool before the dense layers
    hidden: tuple[int, ...]  # hidden dense widths at downscale 1; the output layer follows them


# Fig. 2 of the paper, with torchvision's padding (conv1 pad 2) so that 224 and 256 inputs both work.
PAPER = ArchSpec(
    convs=(
        ConvLayer(width=96, kernel=11, stride=4, padding=2, lrn=True, pool=True),
        ConvLayer(width=256, kernel=5, padding=2, lrn=True, pool=True),
        ConvLayer(width=384, kernel=3, padding=1),
        ConvLayer(width=384, kernel=3, padding=1),
        ConvLayer(width=256, kernel=3, padding=1, pool=True),
    ),
    pool_padding=0,
    pooled_size=(6, 6),
    hidden=(4096, 4096),
)

# The user's notebook: four max-pooled convolutions, one hidden dense layer. The pools are
# padded so that a 64x64 input still reaches the dense layers (256x256 in -> 4x4 out).
NOTEBOOK = ArchSpec(
    convs=(
        ConvLayer(width=96, kernel=11, stride=4, padding=2, lrn=True, pool=True),
        ConvLayer(width=256, kernel=5, padding=2, lrn=True, pool=True),
        ConvLayer(width=384, kernel=3, padding=1, pool=True),
        ConvLayer(width=256, kernel=3, padding=1, pool=True),
    ),
    pool_padding=1,
    pooled_size=(4, 4),
    hidden=(4096,),
)

ARCHS: dict[str, ArchSpec] = {"notebook": NOTEBOOK, "paper": PAPER}


@dataclass
class AlexNetConfig(ModelConfig):
    """:class:`ModelConfig` and what the data decides: input channels and classes."""

    in_channels: int = setting(1, ge=1, hint="1 = grayscale, 3 = RGB")
    num_classes: int = setting(2, ge=2, hint="the number of classes in the data")


def layer_widths(config: AlexNetConfig) -> dict[str, int]:
    """Width of every scaled layer (conv channels, hidden dense units), e.g. {"conv1": 6, ...}.

    In order: conv1..convN, then fc(N+1).. for the hidden dense layers.
    """
    spec = ARCHS[config.arch]
    widths = [conv.width for conv in spec.convs] + list(spec.hidden)
    names = [f"conv{i}" for i in range(1, len(spec.convs) + 1)]
    names += [f"fc{len(spec.convs) + i}" for i in range(1, len(spec.hidden) + 1)]
    return {name: width // config.downscale for name, width in zip(names, widths, strict=True)}


class AlexNet(nn.Module):
    """AlexNet from "ImageNet Classification with Deep Convolutional Neural Networks"
    (Krizhevsky, Sutskever and Hinton, NeurIPS 2012), every width divided by `downscale`.

    arch="paper" follows Fig. 2 on one device: five convolutions (LRN after conv1 and conv2
    when `lrn`), max-pooling after conv1, conv2 and conv5, then dense 4096, 4096, num_classes.
    arch="notebook" follows the user's notebook: four convolutions each followed by
    max-pooling, then one hidden dense layer and the output layer.

    Dropout sits before each of the last two dense layers, i.e. on the outputs of fc6 and
    fc7 for arch="paper", as the paper describes ("dropout in the first two fully-connected
    layers"). torchvision's AlexNet instead drops the inputs of fc6 and fc7.
    """

    def __init__(self, config: AlexNetConfig) -> None:
        super().__init__()
        self.config = config
        spec = ARCHS[config.arch]
        widths = list(layer_widths(config).values())
        n_conv = len(spec.convs)

        features: OrderedDict[str, nn.Module] = OrderedDict()
        channels = config.in_channels
        for i, (conv, width) in enumerate(zip(spec.convs, widths[:n_conv], strict=True), start=1):
            features[f"conv{i}"] = nn.Conv2d(channels, width, conv.kernel, stride=conv.stride, padding=conv.padding)
            features[f"relu{i}"] = nn.ReLU(inplace=True)
            if conv.lrn and config.lrn:
                # The paper's k=2, n=5, alpha=1e-4, beta=0.75. torch divides alpha by `size`
                # (as Caffe does) and the paper does not, so alpha here is 5 x 1e-4.
                features[f"lrn{i}"] = nn.LocalResponseNorm(size=5, alpha=5e-4, beta=0.75, k=2.0)
            if conv.pool:
                features[f"pool{i}"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=spec.pool_padding)
            channels = width

        # Dropout is kept at p=0 too (an identity), so the module tree and checkpoint keys
        # do not depend on p.
        dense_in = channels * math.prod(spec.pooled_size)
        dense_out = widths[n_conv:] + [config.num_classes]
        classifier: OrderedDict[str, nn.Module] = OrderedDict()
        for j, width in enumerate(dense_out):
            index = n_conv + j + 1  # fc6.. for the paper, fc5.. for the notebook
            if j >= len(dense_out) - 2:
                classifier[f"drop{index}"] = nn.Dropout(p=config.dropout)
            classifier[f"fc{index}"] = nn.Linear(in_features=dense_in, out_features=width)
            if j < len(dense_out) - 1:
                classifier[f"relu{index}"] = nn.ReLU(inplace=True)
            dense_in = width

        self.features = nn.Sequential(features)
        self.avgpool = nn.AdaptiveAvgPool2d(spec.pooled_size)
        self.classifier = nn.Sequential(classifier)
        # PyTorch's default initialisation (Kaiming-uniform), not the paper's N(0, 0.01).

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) float, H and W >= 64 -> logits (B, num_classes)."""
        x = self.features(x)  # (B, C_last, h, w)
        x = self.avgpool(x)  # (B, C_last, *pooled_size)
        x = torch.flatten(x, start_dim=1)  # (B, C_last * prod(pooled_size))
        logits: torch.Tensor = self.classifier(x)  # (B, num_classes)
        return logits


def to_float(images: torch.Tensor) -> torch.Tensor:
    """The cache's uint8 pixels (B, C, H, W) in 0..255 as the net's input: float32 (B, C, H, W) in [0, 1]."""
    if images.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images, got {images.dtype}")
    return images.to(torch.float32).div_(255.0)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters in `model` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
