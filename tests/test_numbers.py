"""Known answers for every number the lab reports, so that a wrong number fails a fast test.

Each test computes its expected value by hand (written next to it), never by calling the
code under test a second way: metrics from hand-written confusion matrices, verdicts at
and around each threshold, the per-epoch random streams, the divergence guard, "what
differs" over cumulative runs, and which runs count as finished.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import compose_config, small_data, tiny_overrides
from test_report import collapsed_history, make_run, with_changes

from alexnet_lab.callbacks import RunState
from alexnet_lab.config import VerdictThresholds
from alexnet_lab.data.datamodule import ImageFolderDataModule
from alexnet_lab.data.sampling import epoch_order, epoch_seed
from alexnet_lab.identity import (
    MAX_NAME_BYTES,
    config_diff,
    finished_metrics,
    format_value,
    override_key,
    read_overrides,
    run_name,
    split_name,
    strip_common,
    without_seed,
)
from alexnet_lab.metrics import confusion_summary
from alexnet_lab.report import Run, _mean_std, experiment_rows, group_runs, load_runs, run_rows
from alexnet_lab.train import train
from alexnet_lab.verdicts import VERDICTS, describe_verdicts, verdicts

# --------------------------------------------------------------------------- metrics


def summary(rows: list[list[int]], classes: list[str]) -> dict[str, float]:
    return {key: float(value) for key, value in confusion_summary(torch.tensor(rows), classes).items()}


def test_metrics_of_an_imbalanced_confusion_matrix():
    # rows: true cat (50), true dog (30); columns: predicted cat, dog
    got = summary([[45, 5], [10, 20]], ["cat", "dog"])
    assert got["acc"] == pytest.approx(65 / 80)  # 0.8125
    assert got["recall/cat"] == pytest.approx(45 / 50) and got["recall/dog"] == pytest.approx(20 / 30)
    assert got["balanced_acc"] == pytest.approx((45 / 50 + 20 / 30) / 2)  # 0.7833, not the accuracy
    assert got["pred_frac/cat"] == pytest.approx(55 / 80) and got["pred_frac/dog"] == pytest.approx(25 / 80)


def test_a_class_without_images_has_no_say_in_balanced_accuracy():
    # three classes; no bird in the data, but the model says "bird" four times
    got = summary([[8, 2, 0], [1, 3, 4], [0, 0, 0]], ["cat", "dog", "bird"])
    assert got["acc"] == pytest.approx(11 / 18)
    assert got["recall/cat"] == pytest.approx(0.8) and got["recall/dog"] == pytest.approx(3 / 8)
    assert got["recall/bird"] == 0.0  # 0 of 0: reported as 0, left out of the balanced mean
    assert got["balanced_acc"] == pytest.approx((0.8 + 3 / 8) / 2)
    assert [got[f"pred_frac/{c}"] for c in ("cat", "dog", "bird")] == pytest.approx([9 / 18, 5 / 18, 4 / 18])


def test_a_collapsed_model_scores_its_majority_share_and_balanced_chance():
    got = summary([[30, 0], [20, 0]], ["cat", "dog"])  # always "cat"
    assert got["acc"] == pytest.approx(0.6) and got["balanced_acc"] == pytest.approx(0.5)
    assert got["recall/cat"] == 1.0 and got["recall/dog"] == 0.0
    assert got["pred_frac/cat"] == 1.0 and got["pred_frac/dog"] == 0.0


def test_no_images_gives_zero_accuracy_and_no_balanced_accuracy():
    got = summary([[0, 0], [0, 0]], ["cat", "dog"])
    assert got["acc"] == 0.0 and math.isnan(got["balanced_acc"])
    assert got["pred_frac/cat"] == 0.0 and got["recall/dog"] == 0.0


def test_one_image_is_all_or_nothing():
    assert summary([[1, 0], [0, 0]], ["cat", "dog"])["acc"] == 1.0
    assert summary([[0, 0], [1, 0]], ["cat", "dog"])["pred_frac/cat"] == 1.0


# --------------------------------------------------------------------------- verdicts at their thresholds

WINDOW_1 = {"window": 1}


def flat_history(epochs: int = 4, **row: float) -> list[dict[str, float]]:
    """Every epoch alike: a healthy two-class run, with ``row`` replacing any value."""
    base = {
        "train/loss": 0.5,
        "val/loss": 0.5,
        "train/acc": 0.75,
        "val/acc": 0.75,
        "val/balanced_acc": 0.75,
        "val/pred_frac/cat": 0.5,
        "val/pred_frac/dog": 0.5,
    }
    return [{**base, **row, "epoch": i} for i in range(epochs)]


@pytest.mark.parametrize(("share", "collapsed"), [(0.75, True), (0.7499, False), (0.8, True)])
def test_collapsed_from_the_threshold_on(share, collapsed):
    rows = flat_history(**{"val/pred_frac/cat": share, "val/pred_frac/dog": 1 - share})
    assert ("collapsed" in verdicts(rows, {"collapsed_pred_frac": 0.75})) is collapsed


def test_collapsed_counts_the_larger_class_whichever_it_is():
    rows = flat_history(**{"val/pred_frac/cat": 0.03, "val/pred_frac/dog": 0.97})
    assert verdicts(rows) == ["collapsed"]


@pytest.mark.parametrize(("balanced", "chance"), [(0.625, True), (0.6251, False), (0.5, True)])
def test_chance_up_to_one_over_classes_plus_the_margin(balanced, chance):
    rows = flat_history(**{"val/balanced_acc": balanced})
    assert ("chance" in verdicts(rows, {"chance_margin": 0.125})) is chance  # 1/2 + 0.125


def test_chance_depends_on_the_number_of_classes():
    three = [{**row, "val/pred_frac/bird": 0.0} for row in flat_history(**{"val/balanced_acc": 0.45})]
    assert "chance" in verdicts(flat_history(**{"val/balanced_acc": 0.45}), {"chance_margin": 0.0})
    assert "chance" not in verdicts(three, {"chance_margin": 0.0})  # 0.45 > 1/3


@pytest.mark.parametrize(("val_acc", "overfit"), [(0.625, True), (0.6251, False)])
def test_overfit_from_a_train_val_gap_of_the_threshold(val_acc, overfit):
    rows = flat_history(**{"train/acc": 0.875, "val/acc": val_acc})  # gap 0.25 or just under
    assert ("overfit" in verdicts(rows, {"overfit_gap": 0.25})) is overfit


def loss_curve_history(val_end: float, train_end: float) -> list[dict[str, float]]:
    """Val loss falls to 1.0 at epoch 1 then ends at ``val_end``; train loss is 2.0 there, ends at ``train_end``."""
    rows = flat_history(epochs=3)
    for row, train_loss, val_loss in zip(rows, (2.5, 2.0, train_end), (1.5, 1.0, val_end), strict=True):
        row["train/loss"], row["val/loss"] = train_loss, val_loss
    return rows


@pytest.mark.parametrize(
    ("val_end", "train_end", "overfit"),
    [
        (1.5, 1.0, True),  # val x1.5 and train /2 (both beyond x1.5): overfit
        (1.5, 4 / 3, True),  # train exactly /1.5
        (1.4999, 1.0, False),  # val rise just short of 1.5
        (1.5, 1.3334, False),  # train fall just short of 1.5
    ],
)
def test_overfit_when_val_loss_rises_and_train_loss_falls_by_the_factor(val_end, train_end, overfit):
    rows = loss_curve_history(val_end, train_end)
    assert ("overfit" in verdicts(rows, {**WINDOW_1, "overfit_val_loss_rise": 0.5})) is overfit


@pytest.mark.parametrize(("end", "diverged"), [(5.0, True), (4.999, False)])
def test_diverged_from_the_factor_times_the_first_loss(end, diverged):
    rows = flat_history(epochs=3)
    for row, loss in zip(rows, (0.5, 1.0, end), strict=True):
        row["train/loss"] = loss
    assert ("diverged" in verdicts(rows, {**WINDOW_1, "diverged_factor": 10.0})) is diverged


def test_end_of_run_values_average_over_the_window():
    rows = flat_history(epochs=6)
    for row in rows[-2:]:  # the last two epochs collapse
        row["val/pred_frac/cat"], row["val/pred_frac/dog"] = 1.0, 0.0
    assert "collapsed" not in verdicts(rows, {"window": 5, "collapsed_pred_frac": 0.95})  # mean 0.7
    assert "collapsed" in verdicts(rows, {"window": 2, "collapsed_pred_frac": 0.95})
    # 0.5 * 3 + 1.0 * 2 over the last 5 = 0.7: exactly at a threshold of 0.7
    assert "collapsed" in verdicts(rows, {"window": 5, "collapsed_pred_frac": 0.7})


# --------------------------------------------------------------------------- per-epoch random streams


def test_epoch_seed_is_the_documented_derivation_and_differs_by_epoch_and_seed():
    for seed, epoch in ((0, 0), (0, 1), (7, 3)):
        expected = int(np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint64)[0]) >> 1
        assert epoch_seed(seed, epoch) == expected
    seeds = {epoch_seed(seed, epoch) for seed in range(3) for epoch in range(5)}
    assert len(seeds) == 15 and all(0 <= s < 2**63 for s in seeds)


def test_epoch_order_draws_from_the_seed_and_epoch():
    indices, labels = np.arange(10, 30), np.zeros(30, dtype=np.int64)
    for epoch in (0, 4):
        expected = np.random.default_rng([5, epoch]).permutation(indices)
        assert np.array_equal(epoch_order(indices, labels, epoch=epoch, seed=5, balance=False), expected)


def test_dropout_is_reseeded_from_the_seed_and_the_epoch_at_each_epochs_first_batch():
    state = RunState(seed=3)
    for epoch in (0, 4, 9):
        torch.manual_seed(12345)
        state.on_train_batch_start(SimpleNamespace(current_epoch=epoch), None, None, batch_idx=0)
        assert torch.initial_seed() == epoch_seed(3, epoch)
    torch.manual_seed(12345)
    state.on_train_batch_start(SimpleNamespace(current_epoch=4), None, None, batch_idx=1)
    assert torch.initial_seed() == 12345  # later batches go on with the epoch's stream


def test_augmentation_generator_follows_the_seed_and_the_epoch(tmp_path):
    datamodule = ImageFolderDataModule(small_data(tmp_path, tmp_path), seed=11)
    seen = {}
    for epoch in (0, 1, 6):
        datamodule.trainer = SimpleNamespace(current_epoch=epoch)
        seen[epoch] = datamodule._augment_generator(torch.device("cpu")).initial_seed()
    assert seen == {epoch: epoch_seed(11, epoch) for epoch in (0, 1, 6)}


# --------------------------------------------------------------------------- the divergence guard


def test_a_finite_loss_above_the_limit_stops_the_run_as_diverged(tmp_path):
    # chance is ln 2 = 0.69 nats: a limit of 0.05 is crossed by the first epoch's finite mean loss
    cfg = compose_config(*tiny_overrides(tmp_path, epochs=3), "divergence.max_train_loss=0.05")
    metrics = train(cfg, tmp_path / "run")
    assert metrics["status"] == "diverged" and metrics["epochs"] == 1
    assert metrics["diverged"]["epoch"] == 0
    assert 0.05 < metrics["diverged"]["train_loss"] < 5 and math.isfinite(metrics["history"][0]["train/loss"])


# --------------------------------------------------------------------------- what differs


def cumulative_sweep(sweep: Path, seeds: tuple[int, ...] = (0,)) -> None:
    """Four cumulative steps like the ablation's: bare, +balance, +dropout, +lr."""
    steps = [
        {},
        {"data": {"balance": True}},
        {"data": {"balance": True}, "model": {"dropout": 0.5}},
        {"data": {"balance": True}, "model": {"dropout": 0.5}, "optim": {"lr": 0.0001}},
    ]
    job = 0
    for step, changes in enumerate(steps):
        for seed in seeds:
            make_run(sweep, f"{job}_step{step},seed={seed}", config=with_changes(seed=seed, **changes))
            job += 1


def test_what_differs_compares_each_run_with_the_one_before_it(tmp_path):
    cumulative_sweep(tmp_path)
    rows = run_rows(load_runs(tmp_path))
    assert [row["differs"] for row in rows] == ["", "data.balance=true", "model.dropout=0.5", "optim.lr=0.0001"]


def test_what_differs_compares_each_experiment_with_the_one_before_it(tmp_path):
    cumulative_sweep(tmp_path, seeds=(0, 1))
    rows = experiment_rows(group_runs(load_runs(tmp_path)))
    assert [row["runs"] for row in rows] == [2, 2, 2, 2]
    assert [row["differs"] for row in rows] == ["", "data.balance=true", "model.dropout=0.5", "optim.lr=0.0001"]


# --------------------------------------------------------------------------- finished or not


@pytest.mark.parametrize(
    ("content", "finished"),
    [
        ({"status": "ok"}, True),
        ({"status": "diverged"}, True),
        ({"status": "failed", "error": "x"}, False),
        ({"status": "interrupted"}, False),
        ({}, False),  # no status
        ("{not json", False),
        (None, False),  # no metrics.json
    ],
)
def test_finished_runs_are_ok_or_diverged_and_nothing_else(tmp_path, content, finished):
    if content is not None:
        (tmp_path / "metrics.json").write_text(content if isinstance(content, str) else json.dumps(content))
    assert (finished_metrics(tmp_path) is not None) is finished


@pytest.mark.parametrize(
    ("status", "finished"), [("ok", True), ("diverged", True), ("failed", False), ("interrupted", False)]
)
def test_the_report_counts_finished_runs_by_status(tmp_path, status, finished):
    run = load_runs(make_run(tmp_path, "0_run", metrics={"status": status}))[0]
    assert isinstance(run, Run) and run.finished is finished


def test_resume_skips_a_finished_run_and_retries_a_failed_one(tmp_path):
    cfg = compose_config(
        "data=folder",
        f"data.raw_dir={tmp_path / 'nothing_here'}",
        "resume=true",
        f"data.cache_dir={tmp_path / 'cache'}",
        "trainer.accelerator=cpu",
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    done = {"status": "ok", "val_acc_best": 0.75, "history": []}
    (run_dir / "metrics.json").write_text(json.dumps(done))
    assert train(cfg, run_dir) == done  # skipped: the missing data is never looked at
    (run_dir / "metrics.json").write_text(json.dumps({"status": "failed", "error": "x"}))
    with pytest.raises(ValueError, match="nothing_here"):  # tried again: now the missing data shows
        train(cfg, run_dir)


# --------------------------------------------------------------------------- run identity, exactly


def comparable(config: dict, choices: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(config=config, choices=choices or {})


def test_what_differs_lists_added_removed_and_changed_keys_and_groups():
    old = comparable({"model.downscale": 16, "model.lrn": False, "data.workers": None}, {"optim": "adam"})
    new = comparable({"model.downscale": 8, "model.arch": "paper", "data.workers": None}, {"optim": "sgd"})
    # a group choice first, then keys in order; ", " between parts; a key gone is ~key
    assert config_diff(old, new) == "optim=sgd, model.arch=paper, model.downscale=8, ~model.lrn"
    assert config_diff(comparable({"seed": 0}), comparable({"seed": 0, "x": None})) == "x=null"
    assert config_diff(comparable({"a": 1}), comparable({"a": 1}, {"optim": "sgd"})) == "optim=sgd"
    assert config_diff(comparable({"a": 1}), comparable({})) == ""  # a run without a config: nothing to compare


def test_what_differs_leaves_out_what_a_changed_group_implies_but_not_more():
    old = comparable(
        {"optim.name": "Adam", "optim.lr": 0.001, "optim.betas": [0.9, 0.999], "optim.sub.name": "a", "seed": 0},
        {"optim": "adam"},
    )
    new = comparable(
        {"optim.name": "SGD", "optim.lr": 0.01, "optim.momentum": 0.0, "optim.sub.name": "b", "seed": 1},
        {"optim": "sgd"},
    )
    # name, betas (gone) and momentum (new) come with the group; lr's new value and what follows do not
    assert config_diff(old, new) == "optim=sgd, optim.lr=0.01, seed=1"


def test_values_are_written_as_overrides():
    assert [format_value(v) for v in (True, None, 0.001, 16, [1, 2], {"cat": 3}, "sgd")] == [
        "true",
        "null",
        "0.001",
        "16",
        "[1,2]",
        '{"cat":3}',
        "sgd",
    ]


def test_the_key_of_an_override():
    assert override_key("+trainer.fast_dev_run=true") == "trainer.fast_dev_run"
    assert override_key("~seed") == "seed"
    assert override_key("data.note=a=b") == "data.note"


def test_run_names_replace_slashes_and_cut_long_names_to_the_limit(tmp_path):
    assert run_name(["model.arch=a/b"]) == "model.arch=a_b"
    exactly = "x=" + "a" * (MAX_NAME_BYTES - 2)
    assert run_name([exactly]) == exactly  # at the limit: kept whole
    cut = run_name(["x=" + "a" * MAX_NAME_BYTES])
    assert len(cut.encode()) == MAX_NAME_BYTES and cut[-9] == "-"
    wide = run_name(["x=" + "é" * MAX_NAME_BYTES])  # the cut falls inside a two-byte character
    assert len(wide.encode()) <= MAX_NAME_BYTES and wide.startswith("x=éé")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("a: 1\n")  # not a list of overrides
    assert read_overrides(tmp_path) is None


def test_names_split_at_top_level_commas_and_drop_what_all_share():
    assert split_name("model.arch=X,data.synthetic.counts={cat:1,dog:2},seed=1") == [
        "model.arch=X",
        "data.synthetic.counts={cat:1,dog:2}",
        "seed=1",
    ]
    assert strip_common(["a=1,b=2,c=3", "a=1,b=5,c=6"]) == ["b=2,c=3", "b=5,c=6"]
    assert without_seed("a=1,seed=2,b=3") == "a=1,b=3"


def test_experiments_compare_ignoring_seed_and_count_verdicts(tmp_path):
    make_run(tmp_path, "0_a,seed=0", config=with_changes(seed=0), rows=collapsed_history())
    make_run(tmp_path, "1_a,seed=1", config=with_changes(seed=1))
    make_run(tmp_path, "2_b,seed=5", config=with_changes(seed=5, model={"dropout": 0.5}), rows=collapsed_history())
    rows = experiment_rows(group_runs(load_runs(tmp_path)))
    assert [row["runs"] for row in rows] == [2, 1]
    assert rows[1]["differs"] == "model.dropout=0.5"  # seed 0 -> 5 is not a difference between experiments
    assert rows[0]["verdicts"] == "collapsed 1/2, chance 1/2" and rows[1]["verdicts"] == "collapsed, chance"


def test_runs_without_a_config_group_by_name_and_runs_with_one_by_config(tmp_path):
    for name in ("0_a,seed=0", "1_a,seed=1", "2_b,seed=0"):
        make_run(tmp_path / "named", name)
        (tmp_path / "named" / name / ".hydra" / "config.yaml").unlink()
    assert [(e.label, len(e.runs)) for e in group_runs(load_runs(tmp_path / "named"))] == [("a", 2), ("b", 1)]
    make_run(tmp_path / "configs", "0_x", config=with_changes(seed=0))
    make_run(tmp_path / "configs", "1_y", config=with_changes(seed=1))
    assert [len(e.runs) for e in group_runs(load_runs(tmp_path / "configs"))] == [2]  # one config, two seeds


def test_spread_over_seeds_is_per_metric_and_needs_two_values():
    means, stds = _mean_std(np.array([[1.0, 2.0], [3.0, math.nan], [math.inf, 4.0]]))
    assert means.tolist() == [2.0, 3.0]
    assert stds[0] == pytest.approx(math.sqrt(2.0)) and stds[1] == pytest.approx(math.sqrt(2.0))
    _, one = _mean_std(np.array([[1.0, 2.0], [math.nan, 3.0]]))
    assert math.isnan(one[0]) and one[1] == pytest.approx(math.sqrt(0.5))


def test_verdict_rules_are_described_with_the_thresholds_in_use():
    rules = describe_verdicts(VerdictThresholds(window=3, overfit_val_loss_rise=0.5, diverged_factor=7.0))
    assert list(rules) == list(VERDICTS)
    assert "last 3 epochs" in rules["collapsed"] and "factor >= 1.5" in rules["overfit"]
    assert ">= 7 x its first-epoch value" in rules["diverged"] and "last 3 epochs" in rules["diverged"]
    assert "1/classes + 0.05" in rules["chance"] and "95%" in describe_verdicts()["collapsed"]
