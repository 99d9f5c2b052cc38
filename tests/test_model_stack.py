"""AlexNetStack: K AlexNets as one fused net (grouped convs, batched matmuls) over stacked parameters.

Each test compares the fused forward with each member run alone (a deep copy taken before stacking) and with
in_turn; images are 64x64, downscale 16, so the whole file takes seconds.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alexnet_lab.model import AlexNet, AlexNetConfig, AlexNetStack

ARCHS = ["notebook", "paper"]
BATCH, SIZE = 4, 64  # images per member, px
TOL = {"rtol": 1e-4, "atol": 1e-5}


def build(count: int, arch: str = "notebook", lrn: bool = False, dropout: Sequence[float] = ()) -> list[AlexNet]:
    """`count` channels-last AlexNets of one shape, member k seeded with k; dropout p per member (default 0)."""
    nets = []
    for k in range(count):
        torch.manual_seed(k)
        p = dropout[k] if dropout else 0.0
        config = AlexNetConfig(arch=arch, downscale=16, dropout=p, lrn=lrn, in_channels=1, num_classes=2)
        nets.append(AlexNet(config).to(memory_format=torch.channels_last))
    return nets


def batches(count: int, seed: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (K, B, 1, S, S) and labels (K, B), one batch per member."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, BATCH, 1, SIZE, SIZE, generator=generator)
    return images, torch.randint(0, 2, (count, BATCH), generator=generator)


def run_alone(nets: Sequence[AlexNet], images: torch.Tensor) -> torch.Tensor:
    """Each net's own forward on its batch: (K, B, num_classes)."""
    return torch.stack(
        [net(x.contiguous(memory_format=torch.channels_last)) for net, x in zip(nets, images, strict=True)]
    )


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return sum((F.cross_entropy(member, y) for member, y in zip(logits, labels, strict=True)), torch.zeros(()))


def adam(nets: Sequence[AlexNet], lrs: Sequence[float]) -> torch.optim.Adam:
    """One param group per member, each with its own learning rate."""
    return torch.optim.Adam([{"params": net.parameters(), "lr": lr} for net, lr in zip(nets, lrs, strict=True)])


class MemberStreams:
    """A dropout callable drawing member k's masks from member k's own seeded stream (torch's global RNG
    swapped around each draw), and the streams' start states to replay a member alone."""

    def __init__(self, count: int) -> None:
        self.start = [torch.Generator().manual_seed(1000 + k).get_state() for k in range(count)]
        self.state = list(self.start)
        self.calls: list[int] = []  # the members drawn for, in order

    def __call__(self, k: int, h: torch.Tensor, p: float) -> torch.Tensor:
        self.calls.append(k)
        outer = torch.get_rng_state()
        torch.set_rng_state(self.state[k])
        h = F.dropout(h, p, training=True)
        self.state[k] = torch.get_rng_state()
        torch.set_rng_state(outer)
        return h


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("lrn", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_in_turn_and_alone_agree(arch: str, lrn: bool, train: bool) -> None:
    nets = build(3, arch, lrn)
    alone = copy.deepcopy(nets)
    stack = AlexNetStack(nets).train(train)
    images, _ = batches(3)
    with torch.no_grad():
        expected = run_alone([net.train(train) for net in alone], images)
        fused, in_turn = stack.forward(images), stack.in_turn(images)
    assert fused.shape == (3, BATCH, 2)
    torch.testing.assert_close(fused, expected, **TOL)
    torch.testing.assert_close(in_turn, expected, **TOL)
    assert not torch.equal(expected[0], expected[1])  # the members differ, so a mixed-up row would show


@pytest.mark.parametrize("arch", ARCHS)
def test_a_subset_runs_only_its_members(arch: str) -> None:
    nets = build(4, arch, lrn=True)
    stack = AlexNetStack(nets)
    images, _ = batches(4)
    with torch.no_grad():
        expected = run_alone(nets, images)[[3, 1]]
        torch.testing.assert_close(stack.forward(images[[3, 1]], members=[3, 1]), expected, **TOL)
        torch.testing.assert_close(stack.in_turn(images[[3, 1]], members=[3, 1]), expected, **TOL)
    with pytest.raises(ValueError, match="rows"):
        stack.forward(images, members=[3, 1])


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_draws_each_members_own_masks(arch: str) -> None:
    p = [0.5, 0.0, 0.3]
    nets = build(3, arch, dropout=p)
    alone = copy.deepcopy(nets)
    stack = AlexNetStack(nets).train()
    images, _ = batches(3)
    fused_streams, turn_streams = MemberStreams(3), MemberStreams(3)
    with torch.no_grad():
        fused = stack.forward(images, dropout=fused_streams)
        in_turn = stack.in_turn(images, dropout=turn_streams)
        expected = []
        for k, net in enumerate(alone):  # the member's own nn.Dropout layers, on its own stream
            torch.set_rng_state(fused_streams.start[k])
            expected.append(net(images[k].contiguous(memory_format=torch.channels_last)))
        undropped = stack.eval().forward(images)
    torch.testing.assert_close(fused, torch.stack(expected), **TOL)
    torch.testing.assert_close(in_turn, torch.stack(expected), **TOL)
    assert not torch.allclose(fused[0], undropped[0]) and not torch.allclose(fused[2], undropped[2])
    torch.testing.assert_close(fused[1], undropped[1], **TOL)  # p == 0: an identity
    assert 1 not in fused_streams.calls and 1 not in turn_streams.calls  # ... that draws nothing
    assert sorted(fused_streams.calls) == sorted(turn_streams.calls) == [0, 0, 2, 2]  # two dropout layers each


def test_default_dropout_only_in_training_mode() -> None:
    stack = AlexNetStack(build(2, dropout=[0.0, 0.5]))
    images, _ = batches(2)
    with torch.no_grad():
        before = torch.get_rng_state()
        undropped = stack.eval().forward(images)
        assert torch.equal(torch.get_rng_state(), before)  # eval: nothing drawn
        dropped = stack.train().forward(images)
    assert not torch.equal(torch.get_rng_state(), before)
    assert not torch.allclose(dropped[1], undropped[1])
    torch.testing.assert_close(dropped[0], undropped[0], **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_and_an_adam_step_match_each_member_alone(arch: str) -> None:
    lrs = [1e-3, 3e-3, 1e-2]
    nets = build(3, arch, lrn=True)
    alone = copy.deepcopy(nets)
    stack = AlexNetStack(nets)
    images, labels = batches(3)

    summed_loss(stack.forward(images), labels).backward()
    stack.member_grads([True] * 3)
    for net, reference, x, y in zip(nets, alone, images, labels, strict=True):
        F.cross_entropy(reference(x.contiguous(memory_format=torch.channels_last)), y).backward()
        for (name, param), own in zip(net.named_parameters(), reference.parameters(), strict=True):
            assert param.grad is not None and own.grad is not None, name
            torch.testing.assert_close(param.grad, own.grad, rtol=1e-4, atol=1e-8, msg=name)
            assert 1 in param.shape or param.grad.stride() == param.stride(), name  # the member's own layout
    # the members' grads are views of the stacked grads, not copies
    grad = stack.stacked["features.conv1.weight"].grad
    assert grad is not None and nets[2].features.conv1.weight.grad.data_ptr() == grad[2].data_ptr()

    start = [stack.member_state(k) for k in range(3)]
    adam(nets, lrs).step()
    adam(alone, lrs).step()
    # Adam's first step is lr * g / (|g| + eps), about lr * sign(g): a gradient of rounding-noise size (1e-9,
    # near eps) that differs by its 1e-10 of noise moves a weight by up to a few 1e-3 x lr differently; a
    # wrong gradient or learning rate moves it by about lr.
    for k, (net, reference) in enumerate(zip(nets, alone, strict=True)):
        for (name, tensor), own in zip(net.state_dict().items(), reference.state_dict().values(), strict=True):
            assert not torch.equal(tensor, start[k][name]), name  # the step moved it
            torch.testing.assert_close(tensor - start[k][name], own - start[k][name], rtol=0, atol=lrs[k] / 100)


def test_an_inactive_member_keeps_its_weights_and_optimizer_state() -> None:
    nets = build(3)
    stack = AlexNetStack(nets)
    optimizer = adam(nets, [1e-3, 1e-3, 1e-3])
    images, labels = batches(3)

    def step(members: list[int]) -> None:
        optimizer.zero_grad()
        stack.zero_grad()
        summed_loss(stack.forward(images[members], members=members), labels[members]).backward()
        stack.member_grads([k in members for k in range(3)])
        optimizer.step()

    before = [stack.member_state(k) for k in range(3)]
    step([0, 2])  # member 1 never stepped: no optimizer state at all
    assert all(param not in optimizer.state for param in nets[1].parameters())
    assert all(torch.equal(tensor, before[1][name]) for name, tensor in nets[1].state_dict().items())
    for k in (0, 2):
        assert not torch.equal(nets[k].features.conv1.weight, before[k]["features.conv1.weight"])

    step([0, 1, 2])
    weights = stack.member_state(1)
    state = {
        name: {key: value.clone() for key, value in optimizer.state[param].items()}
        for name, param in nets[1].named_parameters()
    }
    moved = stack.member_state(0)
    step([0, 2])
    for name, param in nets[1].named_parameters():
        assert param.grad is None
        assert torch.equal(param, weights[name]), name
        assert optimizer.state[param]["step"].item() == 1, name
        for key, value in optimizer.state[param].items():
            assert torch.equal(value, state[name][key]), (name, key)
    assert optimizer.state[nets[0].features.conv1.weight]["step"].item() == 3
    assert not torch.equal(nets[0].features.conv1.weight, moved["features.conv1.weight"])


def test_members_are_views_of_the_stack_with_their_own_layout() -> None:
    nets = build(3)
    before = {name: param.stride() for name, param in nets[0].named_parameters()}
    state_before = [{name: t.clone() for name, t in net.state_dict().items()} for net in nets]
    stack = AlexNetStack(nets)
    assert not isinstance(stack, nn.Module)
    for name, stacked in stack.stacked.items():
        assert stacked.is_leaf and stacked.shape[0] == 3
        for k, net in enumerate(nets):
            param = net.get_parameter(name)
            assert isinstance(param, nn.Parameter) and param.stride() == before[name], name
            assert param.data_ptr() == stacked.data_ptr() + k * param.numel() * param.element_size(), name
            assert torch.equal(param, state_before[k][name])
        if stacked.dim() == 5:  # a conv weight (K, out, in, kh, kw)
            assert stacked[0].is_contiguous(memory_format=torch.channels_last)
            assert stacked.shape[2] == 1 or not stacked[0].is_contiguous(), name  # in == 1: both formats at once
            grouped = stacked.reshape(-1, *stacked.shape[2:])  # (K*out, in, kh, kw) for the grouped conv
            assert grouped.data_ptr() == stacked.data_ptr() and grouped._base is stacked, name
            assert grouped.is_contiguous(memory_format=torch.channels_last), name
        elif stacked.dim() == 3:  # a dense weight (K, out, in)
            assert stacked.is_contiguous() and stacked[1].is_contiguous(), name
    conv2 = stack.stacked["features.conv2.weight"]
    assert conv2[1].stride() == (conv2.shape[2] * 25, 1, 5 * conv2.shape[2], conv2.shape[2])  # channels-last
    with torch.no_grad():  # writes either way show on the other side
        nets[1].classifier.fc6.bias.add_(1.0)
        stack.stacked["features.conv1.bias"][2].zero_()
    assert torch.equal(stack.stacked["classifier.fc6.bias"][1], state_before[1]["classifier.fc6.bias"] + 1.0)
    assert not nets[2].features.conv1.bias.any()


@pytest.mark.parametrize("channels", [1, 3])
def test_the_fused_input_is_one_channels_last_copy(channels: int) -> None:
    images = torch.rand(3, BATCH, channels, 8, 8)  # (K, B, C, H, W)
    grouped = AlexNetStack.grouped_images(images)
    assert grouped.is_contiguous(memory_format=torch.channels_last) and grouped.shape == (BATCH, 3 * channels, 8, 8)
    assert grouped.data_ptr() != images.data_ptr()
    assert torch.equal(grouped, images.transpose(0, 1).reshape(BATCH, 3 * channels, 8, 8))
    assert torch.equal(AlexNetStack.grouped_images(list(images)), grouped)  # the members' batches as they come


@pytest.mark.parametrize("arch", ARCHS)
def test_building_changes_no_members_output_or_state(arch: str) -> None:
    nets = build(2, arch, lrn=True)
    images, _ = batches(2)
    with torch.no_grad():
        before = run_alone(nets, images)
        states = [net.state_dict() for net in nets]
        state_before = [{name: t.clone() for name, t in state.items()} for state in states]
        AlexNetStack(nets)
        after = run_alone(nets, images)
    assert torch.equal(after, before) and after.stride() == before.stride()
    for net, state in zip(nets, state_before, strict=True):
        now = net.state_dict()
        assert list(now) == list(state)
        assert all(torch.equal(now[name], t) and now[name].stride() == t.stride() for name, t in state.items())


def test_slicing_out_and_back() -> None:
    nets = build(3)
    stack = AlexNetStack(nets)
    states = [stack.member_state(k) for k in range(3)]
    assert states[1].keys() == nets[1].state_dict().keys()
    states[1]["features.conv1.weight"].add_(1.0)  # a clone: the member does not change
    assert not torch.equal(nets[1].features.conv1.weight, states[1]["features.conv1.weight"])
    states[1]["features.conv1.weight"].sub_(1.0)

    stack.load_member(0, stack.member_state(0))  # the round trip is the identity
    assert all(torch.equal(t, states[0][name]) for name, t in stack.member_state(0).items())

    replacement = build(5)[4].state_dict()
    stack.load_member(1, replacement)
    for name, stacked in stack.stacked.items():
        assert torch.equal(stacked[1], replacement[name]), name
        assert torch.equal(stacked[0], states[0][name]) and torch.equal(stacked[2], states[2][name]), name
    assert not torch.equal(stack.stacked["classifier.fc6.weight"][1], states[1]["classifier.fc6.weight"])


@pytest.mark.parametrize(
    ("change", "named"), [({"downscale": 8}, "downscale"), ({"lrn": True}, "lrn"), ({"arch": "paper"}, "arch")]
)
def test_members_of_different_shapes_are_refused(change: dict[str, object], named: str) -> None:
    base = {"downscale": 16, "lrn": False, "in_channels": 1, "num_classes": 2}
    nets = [AlexNet(AlexNetConfig(**base)), AlexNet(AlexNetConfig(**{**base, **change}))]
    with pytest.raises(ValueError, match=f"member 1 differs from member 0 in {named}"):
        AlexNetStack(nets)
    AlexNetStack([AlexNet(AlexNetConfig(**base)), AlexNet(AlexNetConfig(**base, dropout=0.5))])  # dropout may differ


def test_members_in_different_memory_formats_are_refused() -> None:
    nets = build(2)
    nets[1].to(memory_format=torch.contiguous_format)  # strides differ from conv1 on (even in its size-1 dim)
    with pytest.raises(ValueError, match=r"member 1 differs from member 0 in features\.conv1\.weight"):
        AlexNetStack(nets)
