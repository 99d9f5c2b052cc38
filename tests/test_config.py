"""The config schema: every group and option composes and checks against it; every default is written once."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from conftest import CONF_DIR, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from alexnet_lab import config
from alexnet_lab.cli import load

SCHEMA_OF_GROUP = {"model": config.ModelConfig, "optim": config.OptimConfig, "data": config.DataConfig}


def group_options(group: str) -> list[str]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return GlobalHydra.instance().config_loader().get_group_options(group)


@pytest.mark.parametrize("group", ["model", "optim", "data", "trainer", "experiment"])
def test_every_option_of_every_group_composes_and_checks_against_the_schema(group, tmp_path):
    options = group_options(group)
    assert options, group
    for option in options:
        overrides = [f"{group}={option}"]
        if option == "folder":
            overrides.append(f"data.raw_dir={tmp_path}")
        lab = load(compose_config(*overrides), config.LabConfig)
        assert isinstance(lab, config.LabConfig), option
        assert isinstance(lab.model, config.ModelConfig) and isinstance(lab.data, config.DataConfig)
        assert isinstance(lab.optim, config.OptimConfig), option
        assert isinstance(lab.data.augmentation, config.AugmentConfig)
        assert isinstance(lab.verdicts, config.VerdictThresholds)
        if group in SCHEMA_OF_GROUP:
            assert isinstance(getattr(lab, group), SCHEMA_OF_GROUP[group]), option


def test_each_optimizer_option_is_its_schema():
    for name, schema in config.OPTIMIZERS.items():
        optim = load(compose_config(f"optim={name}"), config.LabConfig).optim
        assert type(optim) is schema and optim == schema()  # the YAML preset adds nothing to the schema


@pytest.mark.parametrize(
    ("name", "overrides", "schema"),
    [
        ("eval", ["ckpt_path=x"], config.EvalConfig),
        ("eval", ["ckpt_path=x", "data=folder", "data.raw_dir=y"], config.EvalConfig),
        ("predict", ["ckpt_path=x"], config.PredictConfig),
        ("preprocess", [], config.PreprocessConfig),
    ],
)
def test_the_other_commands_compose_against_their_schema(name, overrides, schema):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        checked = load(compose(name, overrides=overrides), schema)
    assert type(checked) is schema


def test_group_files_set_nothing_the_schema_already_says():
    """A default lives in alexnet_lab/config.py only; the YAML group files just point at their schema."""
    for group in SCHEMA_OF_GROUP:
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            content = yaml.safe_load(path.read_text())
            assert set(content) == {"defaults"}, f"{path} repeats values of the schema: {set(content) - {'defaults'}}"
            assert any(str(entry).startswith(f"/schema_{group}_") for entry in content["defaults"]), path


def test_defaults_in_the_schema_are_what_the_composed_config_holds():
    lab = load(compose_config(), config.LabConfig)
    assert lab.model == config.ModelConfig()
    assert lab.data.augmentation == config.AugmentConfig()
    assert lab.data.discard == config.DiscardRules()
    assert lab.data.synthetic == config.SyntheticConfig()
    assert lab.verdicts == config.VerdictThresholds() and lab.divergence == config.DivergenceConfig()
    assert dataclasses.asdict(lab.optim) == dataclasses.asdict(config.AdamConfig())
