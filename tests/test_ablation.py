"""The notebook's ablation as configs: each step cumulative, overrides win, one command replays all nine."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import CONF_DIR, compose_config, run_train, tiny_overrides
from omegaconf import OmegaConf

from alexnet_lab.cli import load
from alexnet_lab.config import LabConfig
from alexnet_lab.errors import ConfigError
from alexnet_lab.identity import flatten
from alexnet_lab.verdicts import VERDICTS

#: (experiment, what that notebook step changed); each step keeps every earlier change.
STEPS = [
    ("ablation_0_bare", {}),
    ("ablation_1_balanced", {"data.balance": True}),
    ("ablation_2_dropout", {"model.dropout": 0.5}),
    ("ablation_3_augmented", {"data.augment": True}),
    ("ablation_4_downscale8", {"model.downscale": 8}),
    ("ablation_5_downscale4", {"model.downscale": 4}),
    ("ablation_6_lr1e-4", {"optim.lr": 1e-4}),
    ("ablation_7_long", {"optim.lr": 1e-3, "trainer.max_epochs": 100}),
    ("ablation_8_sgd", {"optim.name": "SGD", "optim.momentum": 0.0, "optim.weight_decay": 0.0}),  # plain GD
]
BARE = {
    "model.arch": "notebook",
    "model.downscale": 16,
    "model.dropout": 0.0,
    "data.balance": False,
    "data.augment": False,
    "data.grayscale": True,
    "optim.name": "Adam",
    "optim.lr": 1e-3,
    "trainer.max_epochs": 50,
}
NAMES = [name for name, _ in STEPS]
#: what the report's "what differs from the previous run" says for each step of the replay
DIFFS = [
    "",
    "data.balance=true",
    "model.dropout=0.5",
    "data.augment=true",
    "model.downscale=8",
    "model.downscale=4",
    "optim.lr=0.0001",
    "optim.lr=0.001",  # the 100 epochs of ablation_7_long lose to trainer.max_epochs=1 on the command line
    "optim=sgd",
]


def expected_values(step: int) -> dict:
    values = dict(BARE)
    for _, changes in STEPS[: step + 1]:
        values.update(changes)
    return values


def flat(*overrides: str) -> dict:
    return flatten(OmegaConf.to_container(compose_config(*overrides), resolve=True))


def test_there_is_one_config_per_notebook_step():
    files = sorted(CONF_DIR.glob("experiment/ablation_*.yaml"))
    assert [path.stem for path in files] == NAMES
    for path in files:
        text = path.read_text()
        assert text.startswith("# @package _global_\n"), path.name
        assert "Notebook In [" in text, f"{path.name} should name the notebook cell it mirrors"


@pytest.mark.parametrize("step", range(len(STEPS)), ids=NAMES)
def test_each_step_is_cumulative_key_by_key(step):
    config = flat(f"experiment={NAMES[step]}")
    expected = expected_values(step)
    for key, value in expected.items():
        assert config[key] == value and type(config[key]) is type(value), key
    # nothing else moves away from the defaults, except what switching the optimizer group brings
    defaults = flat()
    moved = {key for key in set(config) | set(defaults) if config.get(key) != defaults.get(key)}
    allowed = set(expected) | ({key for key in moved if key.startswith("optim.")} if step == 8 else set())
    assert moved <= allowed, moved - allowed


def test_command_line_overrides_win_over_the_experiment():
    assert compose_config("experiment=ablation_7_long", "trainer.max_epochs=2").trainer.max_epochs == 2
    assert compose_config("experiment=ablation_8_sgd", "optim.lr=0.05").optim.lr == 0.05
    assert compose_config("experiment=ablation_7_long", "optim=sgd").optim.name == "SGD"
    # the SGD step spells out momentum, which Adam does not take: an error before any work, not a crash after it
    with pytest.raises(ConfigError, match=r"optim\.momentum is not a setting"):
        load(compose_config("experiment=ablation_8_sgd", "optim=adam"), LabConfig)
    assert compose_config("experiment=ablation_4_downscale8", "model.downscale=16").model.downscale == 16


@pytest.mark.slow
def test_one_command_replays_the_ablation_and_reports_it(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "experiment=glob(ablation_*)", *tiny_overrides(tmp_path), f"hydra.sweep.dir={sweep}"]
    result = run_train(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    runs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0]))
    assert len(runs) == 9
    for run, name in zip(runs, NAMES, strict=True):
        assert f",{name}," in f",{run.name.split('_', 1)[1]},", run.name  # the run dir is named after its step
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "ok" and metrics["epochs"] == 1, name  # max_epochs=1 beats ablation_7's 100
        assert isinstance(metrics["verdicts"], list) and set(metrics["verdicts"]) <= set(VERDICTS)
    assert OmegaConf.load(runs[8] / ".hydra" / "config.yaml").optim.name == "SGD"

    # written by the multirun itself, not by this test
    with (sweep / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["run"] for row in rows] == NAMES  # overrides shared by every run are left out of the names
    assert [row["differs"] for row in rows] == DIFFS
    assert all(row["status"] == "ok" and row["epochs"] == "1" for row in rows)
    report = (sweep / "report.md").read_text()
    runs_section = report.split("## Runs", 1)[1].split("\n## ", 1)[0]
    assert len([line for line in runs_section.splitlines() if line.startswith("| ablation_")]) == 9
    effects = report.split("## Effect", 1)[1].split("\n## ", 1)[0]  # each step against the one it builds on
    assert len([line for line in effects.splitlines() if line.startswith("| ablation_")]) == 8
    assert (sweep / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (sweep / "report.html").stat().st_size > 0
