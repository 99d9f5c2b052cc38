"""AlexNet: shapes for every variant, width scaling, dropout/LRN placement, config errors."""

import dataclasses
import subprocess
import sys

import pytest
import torch
from torch import nn

from alexnet_lab.model import AlexNet, AlexNetConfig, count_parameters, layer_widths

ARCHS = ["notebook", "paper"]


def build(**overrides: object) -> AlexNet:
    return AlexNet(AlexNetConfig(**overrides))


def conv_channels(model: AlexNet) -> list[int]:
    return [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]


def hidden_units(model: AlexNet) -> list[int]:
    return [m.out_features for m in model.classifier if isinstance(m, nn.Linear)][:-1]


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("downscale", [2, 4, 8, 16])
@pytest.mark.parametrize("arch", ARCHS)
def test_output_shape(arch: str, downscale: int, size: int, in_channels: int) -> None:
    model = build(arch=arch, downscale=downscale, in_channels=in_channels, num_classes=3)
    x = torch.rand(2, in_channels, size, size)  # (B, C, H, W)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_paper_widths_build_on_a_small_input(arch: str) -> None:
    model = build(arch=arch, downscale=1)
    with torch.no_grad():
        assert model(torch.rand(1, 1, 64, 64)).shape == (1, 2)


@pytest.mark.parametrize("hw", [(100, 100), (64, 200), (200, 64)])
@pytest.mark.parametrize("arch", ARCHS)
def test_other_input_sizes(arch: str, hw: tuple[int, int]) -> None:
    model = build(arch=arch, lrn=True, dropout=0.5).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, *hw)).shape == (2, 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_non_power_of_two_downscale(arch: str) -> None:
    model = build(arch=arch, downscale=3)
    assert conv_channels(model)[0] == 96 // 3
    with torch.no_grad():
        assert model(torch.rand(2, 1, 64, 64)).shape == (2, 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_parameters_fall_as_downscale_squared(arch: str) -> None:
    params = {ds: count_parameters(build(arch=arch, downscale=ds)) for ds in (2, 4, 8, 16)}
    assert params[2] > params[4] > params[8] > params[16]
    assert 3 < params[4] / params[8] < 4.5
    assert 3 < params[8] / params[16] < 4.5


def test_notebook_widths_at_downscale_16() -> None:
    model = build(arch="notebook", downscale=16)
    assert conv_channels(model) == [6, 16, 24, 16]
    assert hidden_units(model) == [256]
    assert layer_widths(model.config) == {"conv1": 6, "conv2": 16, "conv3": 24, "conv4": 16, "fc5": 256}


def test_paper_widths_at_downscale_1() -> None:
    model = build(arch="paper", downscale=1)
    assert conv_channels(model) == [96, 256, 384, 384, 256]
    assert hidden_units(model) == [4096, 4096]
    assert list(layer_widths(model.config).values()) == [96, 256, 384, 384, 256, 4096, 4096]


@pytest.mark.parametrize("arch", ARCHS)
def test_max_pool_count(arch: str) -> None:
    pools = [m for m in build(arch=arch).features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == {"notebook": 4, "paper": 3}[arch]


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_sits_before_the_last_two_dense_layers(arch: str, dropout: float) -> None:
    model = build(arch=arch, dropout=dropout)
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2
    layers = list(model.classifier)
    linear_at = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
    dropout_at = [i for i, m in enumerate(layers) if isinstance(m, nn.Dropout)]
    assert dropout_at == [i - 1 for i in linear_at[-2:]]
    assert all(layers[i].p == dropout for i in dropout_at)


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_is_random_in_train_mode_only(arch: str) -> None:
    torch.manual_seed(0)
    model = build(arch=arch, dropout=0.5)
    x = torch.rand(4, 1, 64, 64)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_no_dropout_is_deterministic_in_train_mode(arch: str) -> None:
    torch.manual_seed(0)
    model = build(arch=arch, dropout=0.0).train()
    x = torch.rand(4, 1, 64, 64)
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_lrn_adds_two_modules_after_conv1_and_conv2(arch: str) -> None:
    def lrn_count(model: nn.Module) -> int:
        return sum(isinstance(m, nn.LocalResponseNorm) for m in model.modules())

    assert lrn_count(build(arch=arch, lrn=False)) == 0
    model = build(arch=arch, lrn=True)
    assert lrn_count(model) == 2
    names = [name for name, m in model.features.named_children()]
    assert names.index("lrn1") == names.index("relu1") + 1
    assert names.index("lrn2") == names.index("relu2") + 1
    assert names.index("lrn2") < names.index("conv3")


def test_dropout_and_lrn_do_not_change_parameter_names() -> None:
    plain = build(arch="paper").state_dict().keys()
    assert build(arch="paper", dropout=0.5, lrn=True).state_dict().keys() == plain


def test_config_round_trips_as_plain_dict() -> None:
    config = AlexNetConfig(arch="paper", downscale=8, dropout=0.5, in_channels=3, lrn=True)
    model = AlexNet(AlexNetConfig(**dataclasses.asdict(config)))
    assert model.config == config


@pytest.mark.parametrize(
    ("overrides", "key", "extra"),
    [
        ({"downscale": 0}, "model.downscale", "an integer in [1, 96]"),
        ({"downscale": -1}, "model.downscale", "integer"),
        ({"downscale": 2.5}, "model.downscale", "integer"),
        ({"downscale": True}, "model.downscale", "integer"),
        ({"downscale": "8"}, "model.downscale", "integer"),
        ({"downscale": 200}, "model.downscale", "[1, 96]"),
        ({"downscale": 97, "arch": "paper"}, "model.downscale", "[1, 96]"),
        ({"arch": "vgg"}, "model.arch", "'notebook', 'paper'"),
        ({"dropout": 1.0}, "model.dropout", "[0, 1)"),
        ({"dropout": -0.1}, "model.dropout", "[0, 1)"),
        ({"in_channels": 0}, "model.in_channels", "integer >= 1"),
        ({"num_classes": 1}, "model.num_classes", ">= 2"),
    ],
)
def test_bad_values_raise_one_line_errors(overrides: dict, key: str, extra: str) -> None:
    with pytest.raises(ValueError) as error:
        AlexNetConfig(**overrides)
    message = str(error.value)
    assert key in message
    assert extra in message
    assert "\n" not in message


def test_largest_allowed_downscale_is_accepted() -> None:
    assert conv_channels(build(arch="paper", downscale=96))[0] == 1


def test_model_imports_no_config_tooling() -> None:
    code = (
        "import sys, alexnet_lab.model; "
        "bad = [m for m in ('hydra', 'omegaconf', 'lightning', 'pytorch_lightning') "
        "if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
