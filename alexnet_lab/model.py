"""AlexNet (Krizhevsky, Sutskever and Hinton 2012) with every width divided by `downscale`.

Plain typed PyTorch: the network takes an `AlexNetConfig` of plain values and knows nothing
of Hydra or Lightning, so it can be built in a test or a notebook with one line.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
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


#: dropout(k, h, p) -> h with member k's dropout of rate p applied, drawn from member k's own random stream
DropoutFn = Callable[[int, torch.Tensor, float], torch.Tensor]


def _default_dropout(k: int, h: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout from torch's global random stream, as the member's own nn.Dropout draws it."""
    return F.dropout(h, p, training=True)


def _select_rows(stacked: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """stacked[index] (differentiable) with the rows laid out in memory as the stack's are (channels-last stays so)."""
    order = [0, *sorted(range(1, stacked.dim()), key=lambda dim: -stacked.stride()[dim])]  # outermost in memory first
    inverse = [order.index(dim) for dim in range(stacked.dim())]
    return stacked.permute(order).index_select(0, index).permute(inverse)


def _grouped_local_response_norm(h: torch.Tensor, groups: int, lrn: nn.LocalResponseNorm) -> torch.Tensor:
    """torch's F.local_response_norm within each of `groups` channel groups: (B, G*C, H, W) -> (B, G*C, H, W).

    torch's own would window across the whole channel dim, mixing neighbouring members' channels at the
    group boundaries. The same arithmetic as torch's: the mean of `size` squares with zero padding counted.
    """
    batch, channels, height, width = h.shape
    squares = h.mul(h).view(batch, groups, channels // groups, height, width)  # (B, G, C, H, W)
    squares = F.pad(squares, (0, 0, 0, 0, lrn.size // 2, (lrn.size - 1) // 2))  # (B, G, C + size - 1, H, W)
    mean = F.avg_pool3d(squares, (lrn.size, 1, 1), stride=1).reshape(batch, channels, height, width)
    return h / mean.mul(lrn.alpha).add(lrn.k).pow(lrn.beta)


class AlexNetStack:
    """K AlexNets of one shape run as one fused net (HFTA: Wang et al., MLSys 2021): each convolution one grouped
    convolution (groups=K, channels-last), each dense layer one batched matmul over stacked weights.

    A plain object, not an nn.Module: nothing of it enters a state dict. It moves each parameter of the members
    into one stacked leaf ``stacked[name]`` of shape (K, *member_shape) and gives each member back a parameter
    that is a view of its row: the members keep their names, shapes, strides and values, and whatever writes a
    member's parameter in place (an optimizer step, load_state_dict) writes the stack. Build it once the members
    are on their device and in their memory format (``.to()`` afterwards would break the sharing), and build
    the optimizer after it, over the members' parameters, e.g. one param group per member::

        optimizer = torch.optim.Adam([{"params": net.parameters(), "lr": lr} for net, lr in zip(nets, lrs)])
        loss = sum(F.cross_entropy(logits, y) for logits, y in zip(stack.forward(x), ys)); loss.backward()
        stack.member_grads(active); optimizer.step(); optimizer.zero_grad(); stack.zero_grad()

    Each member then steps exactly on its own gradient with its own settings. A member marked inactive gets
    grad None, which torch's optimizers (Adam, AdamW, SGD, ...) skip: its weights and its optimizer state,
    Adam's step count included, stay as they were.

    torch.save of a member's own state_dict() writes the views' whole storage, all K members (K x the bytes):
    save :meth:`member_state` (clones) instead.
    """

    def __init__(self, nets: Sequence[AlexNet]) -> None:
        if not nets:
            raise ValueError("an AlexNetStack needs at least one AlexNet")
        first = nets[0]
        named = list(first.named_parameters())
        for index, net in enumerate(nets[1:], start=1):
            differences = [
                f"{field.name} {getattr(first.config, field.name)!r} != {getattr(net.config, field.name)!r}"
                for field in fields(first.config)
                if field.name != "dropout" and getattr(first.config, field.name) != getattr(net.config, field.name)
            ]
            if not differences:  # one config, one set of names; the memory format, dtype or device may still differ
                layouts = [  # (name, (shape, strides, dtype, device) of member 0's, of this member's)
                    (name, *((p.shape, p.stride(), p.dtype, p.device) for p in (ours, theirs)))
                    for (name, ours), theirs in zip(named, net.parameters(), strict=True)
                ]
                differences = [f"{name} {ours} != {theirs}" for name, ours, theirs in layouts if ours != theirs][:1]
            if differences:
                raise ValueError(f"AlexNetStack: member {index} differs from member 0 in {'; '.join(differences)}")
        self.members = list(nets)
        self.stacked: dict[str, nn.Parameter] = {}
        for name, param in named:
            if not (param.is_contiguous() or param.is_contiguous(memory_format=torch.channels_last)):
                raise ValueError(f"AlexNetStack: {name} is neither contiguous nor channels-last")
            # Row k holds member k with the member's own strides; rows are numel apart, so a conv weight
            # (K, out, in, kh, kw) reshapes to (K*out, in, kh, kw) without a copy, in the members' format.
            storage = torch.empty_strided(
                (len(nets), *param.shape), (param.numel(), *param.stride()), dtype=param.dtype, device=param.device
            )
            with torch.no_grad():
                for k, net in enumerate(nets):
                    storage[k].copy_(net.get_parameter(name))
            stacked = self.stacked[name] = nn.Parameter(storage, requires_grad=param.requires_grad)
            owner, _, leaf = name.rpartition(".")
            for k, net in enumerate(nets):
                setattr(net.get_submodule(owner), leaf, nn.Parameter(stacked.detach()[k], param.requires_grad))
        # each stacked parameter with its members' views, for the gradients after every backward
        self._rows = [(stacked, [net.get_parameter(name) for net in nets]) for name, stacked in self.stacked.items()]
        # p of each member's dropout layers, by classifier layer name: (K,) each
        self._dropout_p = {
            name: [float(getattr(net.classifier, name).p) for net in nets]
            for name, module in first.classifier.named_children()
            if isinstance(module, nn.Dropout)
        }

    @property
    def training(self) -> bool:
        """The members' mode (dropout on): whoever trains them (a LightningModule's train/eval) sets it."""
        return self.members[0].training

    def train(self, mode: bool = True) -> AlexNetStack:
        """Training mode (dropout on) for the fused forward and for every member, as nn.Module.train."""
        for net in self.members:
            net.train(mode)
        return self

    def eval(self) -> AlexNetStack:
        return self.train(False)

    def forward(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        dropout: DropoutFn | None = None,
        members: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """x: (K', B, C, S, S) float, or K' tensors (B, C, S, S): row j member ``members[j]``'s batch (all K
        members by default) -> logits (K', B, num_classes), fused. ``dropout`` applies member k's dropout to its
        (B, F) slice in training mode (default: torch's global stream, layer by layer, so not the draws of
        :meth:`in_turn`)."""
        ids = self._ids(members)
        if len(x) != len(ids):
            raise ValueError(f"AlexNetStack.forward: x has {len(x)} rows for {len(ids)} members")
        if ids == list(range(len(self.members))):
            weights: dict[str, torch.Tensor] = dict(self.stacked)
        else:  # the subset's rows; autograd scatters their gradients back into those rows of the stack only
            index = torch.tensor(ids, device=x[0].device)
            weights = {name: _select_rows(stacked, index) for name, stacked in self.stacked.items()}
        count, batch = len(x), len(x[0])
        h = self.grouped_images(x)  # (B, K'*C, S, S) channels-last
        first = self.members[0]
        for name, module in [*first.features.named_children(), ("avgpool", first.avgpool)]:
            h = self._image_layer(module, weights, f"features.{name}", h, count)
        # (B, K'*C, h, w) -> (K', B, C*h*w) in each member's own flatten order (C, h, w), one copy
        h = h.reshape(batch, count, -1, *h.shape[2:]).transpose(0, 1).reshape(count, batch, -1)
        for name, module in first.classifier.named_children():
            prefix = f"classifier.{name}"
            if isinstance(module, nn.Linear):
                bias, weight = weights[f"{prefix}.bias"], weights[f"{prefix}.weight"]  # (K', out), (K', out, in)
                # W h^T, not h W^T: the weights' gradient then comes out in the stack's own (K', out, in)
                # layout instead of being copied into it (at downscale 4, 38 MB a step: 1.25x the step)
                h = torch.baddbmm(bias.unsqueeze(2), weight, h.transpose(1, 2)).transpose(1, 2)  # (K', B, out)
            elif isinstance(module, nn.ReLU):
                h = F.relu(h, inplace=module.inplace)
            elif isinstance(module, nn.Dropout):
                h = self._dropout(h, ids, self._dropout_p[name], dropout or _default_dropout)
            else:
                raise TypeError(f"AlexNetStack cannot fuse {prefix}: {type(module).__name__}")
        return h

    @staticmethod
    def grouped_images(x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """(K', B, C, H, W), or K' tensors (B, C, H, W) -> (B, K'*C, H, W) channels-last, member k's channels the
        k-th group: one copy, each member's batch written straight into its group."""
        batch, channels, height, width = x[0].shape
        grouped = torch.empty(  # (B, H, W, K'*C) in memory
            (batch, len(x) * channels, height, width),
            dtype=x[0].dtype,
            device=x[0].device,
            memory_format=torch.channels_last,
        )
        for k, images in enumerate(x):
            grouped[:, k * channels : (k + 1) * channels].copy_(images)
        return grouped

    def _image_layer(
        self, module: nn.Module, weights: dict[str, torch.Tensor], prefix: str, h: torch.Tensor, count: int
    ) -> torch.Tensor:
        """One layer of `features` or the average pool on (B, K'*C, H, W) channels-last, members as channel groups."""
        if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros":
            weight, bias = weights[f"{prefix}.weight"], weights.get(f"{prefix}.bias")  # (K', out, in, kh, kw)
            grouped = weight.reshape(-1, *weight.shape[2:])  # (K'*out, in, kh, kw): a view, channels-last
            flat_bias = None if bias is None else bias.reshape(-1)  # (K'*out,)
            padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
            return F.conv2d(h, grouped, flat_bias, module.stride, padding, module.dilation, count * module.groups)
        if isinstance(module, nn.ReLU):
            return F.relu(h, inplace=module.inplace)
        if isinstance(module, nn.LocalResponseNorm):
            return _grouped_local_response_norm(h, count, module)
        if isinstance(module, nn.MaxPool2d):
            return F.max_pool2d(h, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
        if isinstance(module, nn.AdaptiveAvgPool2d):
            return F.adaptive_avg_pool2d(h, module.output_size)
        raise TypeError(f"AlexNetStack cannot fuse {prefix}: {type(module).__name__}")

    def _dropout(self, h: torch.Tensor, ids: list[int], p: list[float], draw: DropoutFn) -> torch.Tensor:
        """Each member's dropout on its own (B, F) slice of h (K', B, F), as its nn.Dropout would draw it;
        a member with p == 0 draws nothing."""
        if not self.training or not any(p[k] > 0 for k in ids):
            return h
        rows = list(h.unbind(0))  # K' x (B, F)
        for row, k in enumerate(ids):
            if p[k] > 0:
                rows[row] = draw(k, rows[row].contiguous(), p[k])  # as the member draws on its own (B, F)
        return torch.stack(rows)

    def in_turn(
        self, x: torch.Tensor, dropout: DropoutFn | None = None, members: Sequence[int] | None = None
    ) -> torch.Tensor:
        """The reference for :meth:`forward`, same contract: each member's own forward on its (B, C, S, S) slice
        (channels-last) in turn. With ``dropout``, member k's nn.Dropout layers draw through it instead."""
        logits = []
        for row, k in enumerate(self._ids(members)):
            net, image = self.members[k], x[row].contiguous(memory_format=torch.channels_last)
            if dropout is None:
                logits.append(net(image))
                continue
            h = torch.flatten(net.avgpool(net.features(image)), start_dim=1)  # (B, F), as AlexNet.forward
            for name, module in net.classifier.named_children():
                if isinstance(module, nn.Dropout):
                    h = dropout(k, h, self._dropout_p[name][k]) if module.training and module.p > 0 else h
                else:
                    h = module(h)
            logits.append(h)
        return torch.stack(logits)  # (K', B, num_classes)

    def _ids(self, members: Sequence[int] | None) -> list[int]:
        ids = list(range(len(self.members))) if members is None else list(members)
        if len(set(ids)) != len(ids) or not all(0 <= k < len(self.members) for k in ids):
            raise ValueError(f"AlexNetStack: members {ids} are not distinct indices below {len(self.members)}")
        return ids

    def member_grads(self, active: Sequence[bool]) -> None:
        """After a fused backward: each active member's parameter grads := views of its rows of the stacked
        grads (kept as they are where the stack has none, e.g. after an in_turn backward); inactive: None."""
        if len(active) != len(self.members):
            raise ValueError(f"AlexNetStack.member_grads: {len(active)} flags for {len(self.members)} members")
        for stacked, params in self._rows:
            for k, param in enumerate(params):
                if not active[k]:
                    param.grad = None
                elif stacked.grad is not None:
                    param.grad = stacked.grad[k]

    def zero_grad(self) -> None:
        """Drops the stacked grads (the members' own grads are their optimizer's to zero)."""
        for stacked in self.stacked.values():
            stacked.grad = None

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member k alone: an ordinary AlexNet state dict, cloned (same strides), sharing nothing with the stack."""
        return {name: tensor.clone() for name, tensor in self.members[k].state_dict().items()}

    def load_member(self, k: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Copies an AlexNet state dict into member k's row of the stack, in place (strict, as load_state_dict)."""
        self.members[k].load_state_dict(state_dict)
