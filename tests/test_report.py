"""Verdicts from crafted histories; the sweep report on crafted run dirs (failed, missing, seeds, labels,
step order past ten, a run done twice); CLI, callback."""

from __future__ import annotations

import csv
import json
import logging
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, compose_config, run_train, tiny_overrides
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf

from alexnet_lab.callbacks import SweepReport
from alexnet_lab.identity import config_diff, split_name, strip_common
from alexnet_lab.report import (
    experiment_rows,
    group_runs,
    load_run,
    load_runs,
    plot_training_stats,
    run_rows,
    write_report,
)
from alexnet_lab.verdicts import VERDICTS, VerdictThresholds, verdicts

# --------------------------------------------------------------------------- crafted histories


def history(
    epochs: int = 20,
    *,
    train_acc: tuple[float, float] = (0.6, 0.9),
    val_acc: tuple[float, float] = (0.58, 0.82),
    train_loss: list[float] | None = None,
    val_loss: list[float] | None = None,
    cat_frac: float = 0.55,
) -> list[dict[str, float]]:
    """A per-epoch history shaped like metrics.json's; the defaults are a healthy run."""
    ramp = np.linspace(0, 1, epochs)
    train_loss = train_loss if train_loss is not None else list(np.linspace(0.69, 0.3, epochs))
    val_loss = val_loss if val_loss is not None else list(np.linspace(0.69, 0.4, epochs))
    rows = []
    for i in range(epochs):
        val = val_acc[0] + (val_acc[1] - val_acc[0]) * ramp[i]
        rows.append(
            {
                "epoch": i,
                "epoch_s": 1.0,
                "train/loss": float(train_loss[i]),
                "train/acc": float(train_acc[0] + (train_acc[1] - train_acc[0]) * ramp[i]),
                "val/loss": float(val_loss[i]),
                "val/acc": float(val),
                "val/balanced_acc": float(val - 0.01),
                "val/pred_frac/cat": cat_frac,
                "val/pred_frac/dog": 1 - cat_frac,
            }
        )
    return rows


def collapsed_history() -> list[dict[str, float]]:
    rows = history(train_acc=(0.59, 0.59), val_acc=(0.59, 0.59), cat_frac=0.99)
    for row in rows:
        row["val/balanced_acc"] = 0.5
        row["train/loss"] = row["val/loss"] = 0.68
    return rows


def chance_history() -> list[dict[str, float]]:
    rows = history(train_acc=(0.52, 0.52), val_acc=(0.51, 0.51), cat_frac=0.5)
    for row in rows:
        row["train/loss"] = row["val/loss"] = 0.69
    return rows


def test_a_healthy_run_gets_no_verdict():
    assert verdicts(history()) == []


def test_an_empty_history_gets_no_verdict():
    assert verdicts([]) == []


def test_collapsed_when_val_predictions_go_to_one_class():
    assert verdicts(collapsed_history()) == ["collapsed", "chance"]


def test_chance_without_collapse():
    assert verdicts(chance_history()) == ["chance"]


def test_overfit_when_train_accuracy_is_far_above_val():
    rows = history(train_acc=(0.6, 1.0), val_acc=(0.6, 0.7))
    assert verdicts(rows) == ["overfit"]


def test_overfit_when_val_loss_rises_while_train_loss_falls():
    val_loss = [0.7 - 0.03 * i for i in range(10)] + [0.43 + 0.03 * i for i in range(10)]  # min 0.43, ends ~0.7
    rows = history(train_acc=(0.6, 0.8), val_acc=(0.6, 0.75), val_loss=val_loss)
    assert verdicts(rows) == ["overfit"]


def test_val_loss_rising_while_train_loss_stays_flat_is_not_overfitting():
    val_loss = [0.3 - 0.02 * i for i in range(10)] + [0.1 + 0.02 * i for i in range(10)]  # doubles after epoch 9
    train_loss = [0.3 - 0.02 * i for i in range(10)] + [0.12] * 10
    assert verdicts(history(train_loss=train_loss, val_loss=val_loss)) == []


def test_a_noisy_flat_val_loss_is_not_overfitting():
    val_loss = [0.5 + 0.02 * (-1) ** i for i in range(20)]
    assert verdicts(history(val_loss=val_loss)) == []


def test_diverged_on_a_non_finite_loss():
    rows = history()
    rows[-1]["train/loss"] = math.nan
    assert "diverged" in verdicts(rows)
    rows = history()
    rows[3]["val/loss"] = math.inf
    assert "diverged" in verdicts(rows)


def test_diverged_when_the_loss_grows_without_bound():
    growing = [0.69 * 1.3**i for i in range(20)]  # about 100x by the end
    rows = history(train_acc=(0.6, 0.5), val_acc=(0.6, 0.5), train_loss=growing, val_loss=growing)
    found = verdicts(rows)
    assert "diverged" in found and "overfit" not in found  # train loss rose too: not overfitting


def test_thresholds_come_from_config():
    rows = history(train_acc=(0.6, 0.9), val_acc=(0.6, 0.8))  # gap 0.1
    assert verdicts(rows) == []
    assert verdicts(rows, {"overfit_gap": 0.05}) == ["overfit"]
    assert verdicts(collapsed_history(), {"collapsed_pred_frac": 0.999}) == ["chance"]


def test_config_block_documents_the_same_defaults():
    cfg = compose_config()
    assert OmegaConf.to_container(cfg.verdicts) == asdict(VerdictThresholds())
    assert verdicts(collapsed_history(), cfg.verdicts) == ["collapsed", "chance"]  # a DictConfig works


@pytest.mark.parametrize(
    ("block", "key"),
    [
        ({"windw": 3}, "verdicts.windw"),
        ({"window": 0}, "verdicts.window"),
        ({"chance_margin": "x"}, "verdicts.chance_margin"),
    ],
)
def test_bad_thresholds_name_their_key(block, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        verdicts(history(), block)


# --------------------------------------------------------------------------- crafted run dirs

BASE_CONFIG = {
    "seed": 0,
    "run_name": "${run_label:${hydra:job.override_dirname}}",
    "model": {"arch": "notebook", "downscale": 16, "dropout": 0.0},
    "optim": {"name": "Adam", "lr": 0.001, "betas": [0.9, 0.999]},
    "data": {"raw_dir": "/data/a", "balance": False, "augment": False},
    "trainer": {"max_epochs": 20},
}


def make_run(
    parent: Path,
    dirname: str,
    *,
    rows: list[dict[str, float]] | None = None,
    metrics: dict | None = None,
    config: dict | None = None,
    optim: str = "adam",
    experiment: str | None = None,
    overrides: list[str] | None = None,
    write_metrics: bool = True,
) -> Path:
    """A run dir as train.py leaves it: .hydra/config.yaml, .hydra/hydra.yaml, metrics.json.

    ``experiment`` is the experiment group's choice (Hydra records ``null`` when none is chosen);
    ``overrides`` the command line's, written to .hydra/overrides.yaml only when given.
    """
    run = parent / dirname
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config or BASE_CONFIG), run / ".hydra" / "config.yaml")
    choices = {"model": "alexnet", "optim": optim, "data": "synthetic", "experiment": experiment}
    choices["hydra/launcher"] = "basic"
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"choices": choices}}}), run / ".hydra" / "hydra.yaml")
    if overrides is not None:
        OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    if write_metrics:
        rows = rows if rows is not None else history()
        data = {
            "status": "ok",
            "run_name": dirname.split("_", 1)[1],
            "epochs": len(rows),
            "wall_s": 12.5,
            "val_acc": rows[-1]["val/acc"] if rows else math.nan,
            "val_acc_best": max((r["val/acc"] for r in rows), default=math.nan),
            "val_balanced_acc": rows[-1]["val/balanced_acc"] if rows else math.nan,
            "test_acc": 0.8,
            "test_balanced_acc": 0.79,
            "history": rows,
            **(metrics or {}),
        }
        (run / "metrics.json").write_text(json.dumps(data))
    return run


def with_changes(**changes: Any) -> dict:
    """BASE_CONFIG with keys of a group (a dict) or top-level values (anything else) replaced."""
    config = json.loads(json.dumps(BASE_CONFIG))
    for key, value in changes.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    return config


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_report_lists_failed_missing_and_damaged_runs(tmp_path):
    sweep = tmp_path / "sweep"
    make_run(sweep, "0_healthy")
    make_run(sweep, "1_collapsed", rows=collapsed_history(), config=with_changes(model={"downscale": 8}))
    failed = {"status": "failed", "error": "data.raw_dir=/nope: not a folder"}
    make_run(sweep, "2_bad", metrics=failed, rows=[], config=with_changes(model={"downscale": 4}))
    make_run(sweep, "3_killed", write_metrics=False, config=with_changes(model={"downscale": 2}))
    make_run(sweep, "4_torn", write_metrics=False, config=with_changes(model={"downscale": 1}))
    (sweep / "4_torn" / "metrics.json").write_text('{"status": "ok", "hist')
    (sweep / "1_collapsed" / ".hydra" / "hydra.yaml").write_text("hydra:\n")  # torn too: a run read without it
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "not_a_run").mkdir()

    written = write_report(sweep)

    rows = read_csv(written["report.csv"])
    assert [row["run"] for row in rows] == ["healthy", "collapsed", "bad", "killed", "torn"]
    assert [row["status"] for row in rows] == ["ok", "ok", "failed", "no metrics.json", "unreadable metrics.json"]
    assert rows[0]["verdicts"] == "" and rows[1]["verdicts"] == "collapsed, chance"
    assert rows[2]["error"] == "data.raw_dir=/nope: not a folder" and rows[2]["val_acc_best"] == ""
    assert float(rows[0]["val_acc_best"]) == pytest.approx(0.82) and rows[0]["epochs"] == "20"
    markdown = written["report.md"].read_text()
    runs_section = markdown.split("## Runs", 1)[1].split("## ", 1)[0]
    table = [line for line in runs_section.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 5  # header + one row per run
    assert "failed: data.raw_dir=/nope: not a folder" in markdown and "no metrics.json" in markdown
    assert "2 finished" in markdown
    assert written["curves.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plotly" in written["report.html"].read_text()[:2_000_000]


def test_verdicts_are_judged_with_each_runs_own_thresholds(tmp_path):
    strict = with_changes(verdicts={"collapsed_pred_frac": 0.999})
    judged = load_run(make_run(tmp_path, "0_a", rows=collapsed_history(), metrics={"verdicts": ["overfit"]}))
    own = load_run(make_run(tmp_path, "1_b", rows=collapsed_history(), config=strict))
    stored_only = load_run(make_run(tmp_path, "2_c", rows=[], metrics={"verdicts": ["diverged"]}))
    assert judged.verdicts == ["collapsed", "chance"]  # from the history, not an older stored list
    assert own.verdicts == ["chance"]
    assert stored_only.verdicts == ["diverged"]  # no history to judge: metrics.json's list stands


def test_a_run_dir_and_its_metrics_json_report_on_that_run(tmp_path):
    run = make_run(tmp_path, "0_only")
    assert [r.label for r in load_runs(run)] == ["only"]
    assert [r.label for r in load_runs(run / "metrics.json")] == ["only"]
    assert (write_report(run)["report.md"]).parent == run


def test_what_differs_reads_the_resolved_configs(tmp_path):
    bare = load_run(make_run(tmp_path, "0_bare"))
    balanced = load_run(make_run(tmp_path, "1_balanced", config=with_changes(data={"balance": True, "raw_dir": "/b"})))
    sgd_config = with_changes(data={"balance": True}, optim={"name": "SGD", "lr": 0.001, "momentum": 0.0})
    del sgd_config["optim"]["betas"]
    sgd = load_run(make_run(tmp_path, "2_sgd", config=sgd_config, optim="sgd"))
    faster_config = json.loads(json.dumps(sgd_config))
    faster_config["optim"]["lr"] = 0.01
    faster = load_run(make_run(tmp_path, "3_faster", config=faster_config, optim="sgd"))
    assert config_diff(None, bare) == ""
    assert config_diff(bare, balanced) == "data.balance=true"  # data.raw_dir is a path: ignored
    assert config_diff(balanced, sgd) == "optim=sgd"  # the keys that come with the group are implied
    assert config_diff(sgd, faster) == "optim.lr=0.01"
    assert config_diff(bare, load_run(make_run(tmp_path, "4_seed", config=with_changes(seed=1)))) == "seed=1"


def test_labels_come_from_the_runs_overrides_then_metrics_json_then_the_dir_name(tmp_path):
    overrides = ["model.downscale=8", "resume=true", "data.cache_dir=/x"]
    run = make_run(tmp_path, "0_resumed_elsewhere", overrides=overrides, metrics={"run_name": "from_metrics"})
    assert load_run(run).label == "model.downscale=8"  # resume and a cache folder change nothing learned
    (run / ".hydra" / "overrides.yaml").write_text("{not: [a list")
    assert load_run(run).label == "from_metrics"
    (run / "metrics.json").unlink()
    assert load_run(run).label == "resumed_elsewhere"
    single = make_run(tmp_path, "2024-05-01_12-00-00-123456_lr=0.01", write_metrics=False)
    assert load_run(single).label == "lr=0.01"
    assert load_run(make_run(tmp_path, "1_x", overrides=[])).label == "default"


def ablation_sweep(sweep: Path, steps: int = 11) -> None:
    """``-m 'experiment=glob(ablation_*)'``: Hydra numbers the jobs in string order of the names.

    Step ``k`` trains ``10 + k`` epochs, so each step differs from the one before it by one key.
    """
    names = sorted(f"ablation_{step}" for step in range(steps))  # ablation_0, ablation_1, ablation_10, ablation_2, ...
    for job, name in enumerate(names):
        step = int(name.rsplit("_", 1)[1])
        config = with_changes(trainer={"max_epochs": 10 + step})
        make_run(sweep, f"{job}_{name}", config=config, experiment=name, overrides=[f"experiment={name}"])


def test_an_ablation_reports_its_steps_in_order_past_ten(tmp_path):
    ablation_sweep(tmp_path)
    rows = run_rows(load_runs(tmp_path))
    assert [row["run"] for row in rows] == [f"ablation_{step}" for step in range(11)]
    assert [row["differs"] for row in rows] == [""] + [f"trainer.max_epochs={10 + step}" for step in range(1, 11)]
    assert rows[10]["dir"] == "2_ablation_10"  # Hydra's glob numbered it third
    experiments = experiment_rows(group_runs(load_runs(tmp_path)))
    assert [row["experiment"] for row in experiments] == [f"ablation_{step}" for step in range(11)]
    assert experiments[2]["differs"] == "trainer.max_epochs=12"


def test_a_run_done_twice_counts_once(tmp_path):
    # seed 1 done twice, both finished: the later counts; seed 0 again but failed: the finished one counts
    for job, seed, acc, status in ((0, 0, 0.6, "ok"), (1, 1, 0.8, "ok"), (2, 1, 0.7, "ok"), (3, 0, 0.9, "failed")):
        make_run(
            tmp_path,
            f"{job}_bare,seed={seed}",
            rows=history(val_acc=(0.55, acc)) if status == "ok" else [],
            metrics={"status": status},
            config=with_changes(seed=seed),
            overrides=[f"seed={seed}"],
        )
    runs = load_runs(tmp_path)
    assert [run.path.name for run in runs] == ["0_bare,seed=0", "2_bare,seed=1"]
    rows = experiment_rows(group_runs(runs))
    assert len(rows) == 1 and rows[0]["runs"] == 2 and rows[0]["finished"] == 2
    assert rows[0]["val_acc_best_mean"] == pytest.approx(0.65)
    assert rows[0]["val_acc_best_std"] == pytest.approx(0.1 / 2**0.5)  # sample std of 0.6 and 0.7
    written = write_report(tmp_path)
    assert [row["dir"] for row in read_csv(written["report.csv"])] == ["0_bare,seed=0", "2_bare,seed=1"]
    assert "2 runs, 2 finished." in written["report.md"].read_text()
    figure = plot_training_stats(tmp_path)
    val_acc = next(t for t in figure.data if t.name == "val acc")
    assert val_acc.y[-1] == pytest.approx(0.65)  # the mean of two runs, not four
    assert [a.text for a in figure.layout.annotations] == ["default ×2: overfit"]  # two runs, both overfit


def test_runs_without_a_config_are_never_taken_for_repeats(tmp_path):
    for job in (0, 1):
        (make_run(tmp_path, f"{job}_same") / ".hydra" / "config.yaml").unlink()
    assert len(load_runs(tmp_path)) == 2


def test_labels_split_at_top_level_commas_and_drop_shared_overrides():
    label = "ablation_0_bare,data.synthetic.counts={cat:18,dog:12},trainer.max_epochs=1"
    assert split_name(label) == ["ablation_0_bare", "data.synthetic.counts={cat:18,dog:12}", "trainer.max_epochs=1"]
    other = label.replace("ablation_0_bare", "ablation_1_balanced")
    assert strip_common([label, other]) == ["ablation_0_bare", "ablation_1_balanced"]
    assert strip_common([label]) == [label]


def test_seeds_group_into_experiments_with_mean_and_spread(tmp_path):
    sweep = tmp_path / "sweep"
    job = 0
    steps = (("ablation_0_bare", (0.6, 0.7, 0.8), 0.0), ("ablation_2_dropout", (0.9, 0.9, 0.9), 0.5))
    for name, accs, dropout in steps:
        for seed, acc in enumerate(accs):
            make_run(
                sweep,
                f"{job}_{name},seed={seed}",
                rows=history(val_acc=(0.55, acc)),
                config=with_changes(seed=seed, model={"dropout": dropout}),
            )
            job += 1
    runs = load_runs(sweep)
    experiments = group_runs(runs)
    assert [(e.label, len(e.runs)) for e in experiments] == [("ablation_0_bare", 3), ("ablation_2_dropout", 3)]
    rows = experiment_rows(experiments)
    assert rows[0]["val_acc_best_mean"] == pytest.approx(0.7) and rows[0]["val_acc_best_std"] == pytest.approx(0.1)
    assert rows[1]["val_acc_best_mean"] == pytest.approx(0.9) and rows[1]["val_acc_best_std"] == pytest.approx(0.0)
    assert rows[0]["differs"] == "" and rows[1]["differs"] == "model.dropout=0.5"  # seed is not a difference
    markdown = write_report(sweep)["report.md"].read_text()
    assert "0.700 ± 0.100" in markdown and "mean ± standard deviation" in markdown

    figure = plot_training_stats(sweep)  # one panel per experiment
    lines = [trace for trace in figure.data if trace.fill is None and trace.mode != "markers"]
    bands = [trace for trace in figure.data if trace.fill == "toself"]
    assert len(lines) == 2 * 4 and len(bands) == 2 * 4  # experiments x (train, val) x (acc, loss)
    val_acc = next(trace for trace in lines if trace.name == "val acc" and trace.xaxis == "x")  # the first panel
    assert val_acc.y[-1] == pytest.approx(0.7)  # the mean of the three seeds' last epoch


def test_figure_has_a_panel_per_experiment_with_dashed_train_curves_and_phases(tmp_path):
    make_run(tmp_path, "0_bare", rows=collapsed_history())
    make_run(tmp_path, "1_balanced", config=with_changes(data={"balance": True}))
    figure = plot_training_stats(tmp_path)
    assert [a.text for a in figure.layout.annotations] == ["bare: collapsed, chance", "balanced"]  # panel titles
    lines = [trace for trace in figure.data if trace.mode != "markers"]
    assert len(lines) == 2 * 4 and [t.name for t in figure.data if t.showlegend] == [
        "train acc",
        "val acc",
        "train loss",
        "val loss",
    ]
    assert {trace.line.dash for trace in lines} == {"dash", "solid"}
    assert figure.layout.yaxis2.type == "log" and figure.layout.yaxis.range == (0.0, 1.02)  # loss right, log
    # the collapsed run is grey across its whole history; the healthy one left chance and has a best epoch
    spans = [shape for shape in figure.layout.shapes if shape.type == "rect"]
    assert len(spans) == 1 and spans[0].x0 == -0.5 and spans[0].x1 == 19.5
    stars = [trace for trace in figure.data if trace.mode == "markers"]
    assert [trace.x[0] for trace in stars] == [0, 19]  # best val accuracy: the flat run's first epoch, the last


# --------------------------------------------------------------------------- CLI and callback


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plot_training_stats.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_writes_the_report_into_the_dir(tmp_path):
    make_run(tmp_path, "0_bare")
    result = run_cli(str(tmp_path), "--no-html")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| bare |" in result.stdout
    assert (tmp_path / "report.md").exists() and (tmp_path / "curves.png").exists()
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_cli_without_runs_fails_in_one_line(tmp_path, case):
    target = tmp_path / "nope"
    if case == "empty":
        target.mkdir()
    result = run_cli(str(target))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and str(target) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def sweep_config(sweep: Path):
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "mode": RunMode.MULTIRUN}})


def test_callback_writes_the_report_at_the_end_of_a_multirun(tmp_path):
    make_run(tmp_path, "0_bare")
    SweepReport(html=False).on_multirun_end(config=sweep_config(tmp_path))
    assert len(read_csv(tmp_path / "report.csv")) == 1


def test_callback_rewrites_the_report_as_jobs_end_marked_in_progress_at_most_every_every_s(tmp_path):
    make_run(tmp_path, "0_bare")
    callback = SweepReport(html=False)
    callback.jobs = 3  # what on_multirun_start found
    callback.on_job_end(config=sweep_config(tmp_path), job_return=JobReturn(status=JobStatus.COMPLETED))
    assert "In progress (1 of 3 jobs)" in (tmp_path / "report.md").read_text()
    make_run(tmp_path, "1_more", config=with_changes(seed=1))
    callback.on_job_end(config=sweep_config(tmp_path), job_return=JobReturn(status=JobStatus.COMPLETED))
    assert "In progress (1 of 3 jobs)" in (tmp_path / "report.md").read_text()  # within every_s: not rewritten
    callback.every_s = 0.0
    callback.on_job_end(config=sweep_config(tmp_path), job_return=JobReturn(status=JobStatus.COMPLETED))
    assert "In progress (2 of 3 jobs)" in (tmp_path / "report.md").read_text()
    make_run(tmp_path, "2_failed", metrics={"status": "failed", "error": "x"}, rows=[], config=with_changes(seed=2))
    callback.on_job_end(config=sweep_config(tmp_path), job_return=JobReturn(status=JobStatus.FAILED))
    report = (tmp_path / "report.md").read_text()
    assert "In progress" not in report and "3 runs, 2 finished." in report  # the last job: complete
    (tmp_path / "report.md").unlink()
    callback.on_multirun_end(config=sweep_config(tmp_path))
    assert not (tmp_path / "report.md").exists(), "the sweep's end does not write the last job's report again"


def test_callback_never_fails_the_sweep(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="alexnet_lab.callbacks"):
        SweepReport().on_multirun_end(config=sweep_config(tmp_path / "empty"))
    assert "sweep report not written" in caplog.text and str(tmp_path / "empty") in caplog.text


@pytest.mark.slow
def test_a_sweep_with_a_failed_job_still_gets_its_report(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "model.downscale=16,0", *tiny_overrides(tmp_path), f"hydra.sweep.dir={sweep}"]
    result = run_train(args, cwd=tmp_path)
    assert result.returncode != 0  # Hydra reports the failed job at the end
    rows = read_csv(sweep / "report.csv")
    assert [row["status"] for row in rows] == ["ok", "failed"]
    assert "model.downscale" in rows[1]["error"] and rows[1]["differs"] == "model.downscale=0"
    assert set(rows[0]["verdicts"].split(", ")) - {""} <= set(VERDICTS)
