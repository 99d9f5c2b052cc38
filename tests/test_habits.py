"""The habits of Hydra + Lightning users work here: logger=, callbacks=, debug=, scheduler=, ckpt_path=.

Each runs ``python train.py`` through its real entry point (in this process) on the tiny
generated data set, and checks what the run wrote against its own metrics.json: the numbers a
logger holds are the run's numbers, a callback changed how the run went, a schedule's rates
follow its formula.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONF_DIR, compose_config, run_in_process, tiny_overrides
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.plugins import AsyncCheckpointIO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from alexnet_lab.cli import load
from alexnet_lab.config import AdamConfig, LabConfig, SchedulerConfig
from alexnet_lab.data.synthetic import MARKER_NAME
from alexnet_lab.train import build_trainer

LR = AdamConfig().lr  # the default optimizer's rate


def train(tmp_path: Path, name: str, *overrides: str, epochs: int = 2) -> tuple[Path, dict]:
    """One tiny run in tmp_path/name; returns its dir and metrics.json (fails on a non-zero exit)."""
    run_dir = tmp_path / name
    code, _, err = run_in_process([*tiny_overrides(tmp_path, epochs=epochs), *overrides, f"hydra.run.dir={run_dir}"])
    assert code == 0, err[-2000:]
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def fails(tmp_path: Path, *overrides: str) -> str:
    """The one ``error:`` line of a run that must fail with exit 2."""
    code, _, err = run_in_process([*tiny_overrides(tmp_path), *overrides, f"hydra.run.dir={tmp_path / 'bad'}"])
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err[-2000:])
    return lines[0]


def history(metrics: dict, key: str) -> list[float]:
    return [row[key] for row in metrics["history"]]


# ----------------------------------------------------------------------------- loggers


def test_tensorboard_holds_the_runs_curves_rate_and_results(tmp_path):
    run_dir, metrics = train(tmp_path, "tb", "logger=tensorboard")
    events = EventAccumulator(str(run_dir)).Reload()
    scalars = events.Tags()["scalars"]
    assert [event.value for event in events.Scalars("val/acc")] == pytest.approx(history(metrics, "val/acc"))
    assert [event.value for event in events.Scalars("train/lr")] == pytest.approx(history(metrics, "train/lr"))
    assert events.Scalars("hp/test_acc")[-1].value == pytest.approx(metrics["test_acc"])
    assert "val/confusion_matrix" in events.Tags()["images"]  # the lab's pictures are drawn for TensorBoard
    assert not (run_dir / "csv").exists() and "hp/test_balanced_acc" in scalars


def test_csv_holds_the_runs_curves_and_results(tmp_path):
    run_dir, metrics = train(tmp_path, "csv", "logger=csv", epochs=3)
    rows = list(csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()))
    val = [float(row["val/acc"]) for row in rows if row.get("val/acc")]
    assert val == pytest.approx(history(metrics, "val/acc"))
    assert [float(row["train/lr"]) for row in rows if row.get("train/lr")] == pytest.approx(
        history(metrics, "train/lr")
    )
    assert float(next(row["hp/test_acc"] for row in rows if row.get("hp/test_acc"))) == pytest.approx(
        metrics["test_acc"]
    )
    hparams = yaml.safe_load((run_dir / "csv" / "version_0" / "hparams.yaml").read_text())
    assert hparams["model"]["downscale"] == 16  # the whole config
    assert not list(run_dir.glob("events.out.tfevents.*"))


def test_mlflow_keeps_a_local_store_in_the_run_dir(tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    run_dir, metrics = train(tmp_path, "mlflow", "logger=mlflow", "model.downscale=12")
    (store,) = [path for path in (run_dir / "mlruns").glob("*/*") if (path / "metrics").is_dir()]
    logged = (store / "metrics" / "val" / "acc").read_text().split("\n")
    assert [float(line.split()[1]) for line in logged if line] == pytest.approx(history(metrics, "val/acc"))
    assert float((store / "metrics" / "hp" / "test_acc").read_text().split()[1]) == pytest.approx(metrics["test_acc"])
    assert (store / "params" / "model" / "downscale").read_text() == "12"


def test_wandb_runs_offline_into_the_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install -e '.[wandb]')")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # not logged in
    run_dir, _ = train(tmp_path, "wandb", "logger=wandb")
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_many_loggers_each_get_everything_and_none_still_records_the_run(tmp_path):
    run_dir, metrics = train(tmp_path, "many", "logger=many")
    assert list(run_dir.glob("events.out.tfevents.*")) and (run_dir / "csv" / "version_0" / "metrics.csv").is_file()
    quiet_dir, quiet = train(tmp_path, "none", "logger=none")
    assert not list(quiet_dir.glob("events.out.tfevents.*")) and not (quiet_dir / "csv").exists()
    assert quiet["status"] == "ok" and (quiet_dir / "checkpoints" / "last.ckpt").is_file()
    assert history(quiet, "val/acc") == history(metrics, "val/acc")  # a logger does not change what is learned


def test_a_logger_whose_package_is_missing_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr("pytorch_lightning.loggers.mlflow._MLFLOW_AVAILABLE", False)
    assert (
        fails(tmp_path, "logger=mlflow")
        == 'error: logger=mlflow needs mlflow, not installed: pip install -e ".[mlflow]"'
    )


@pytest.mark.parametrize("key", ["logger", "callbacks"])
def test_loggers_and_callbacks_given_to_the_trainer_point_to_their_group(tmp_path, key):
    assert fails(tmp_path, f"+trainer.{key}=null").startswith(f"error: trainer.{key} is set by the lab: ")


# ----------------------------------------------------------------------------- callbacks


def test_an_added_early_stopping_ends_the_run_once_val_loss_stalls(tmp_path):
    run_dir, metrics = train(
        tmp_path, "early", "callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=1", epochs=30
    )
    losses = history(metrics, "val/loss")
    assert len(losses) < 30
    # patience 1: it stops at the first epoch whose val loss is no better than the one before
    assert all(later < earlier for earlier, later in zip(losses[:-2], losses[1:-1], strict=True)), losses
    assert losses[-1] >= losses[-2], losses
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()  # the lab's own callbacks are still there


def test_no_callbacks_keeps_the_ones_the_lab_depends_on(tmp_path):
    run_dir, metrics = train(tmp_path, "bare", "callbacks=none", epochs=2)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(key.startswith("RunState") for key in checkpoint["callbacks"])  # exact resume still possible
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and metrics["epochs"] == 2
    assert "val/confusion_matrix" not in EventAccumulator(str(run_dir)).Reload().Tags()["images"]


@pytest.mark.parametrize("given", ["+trainer.plugins._target_={}", "+trainer.plugins=[{{_target_:{}}}]"])
def test_trainer_plugins_from_the_command_line_join_the_labs_own(tmp_path, monkeypatch, given):
    monkeypatch.setenv("SLURM_NTASKS", "1")  # inside a Slurm job the lab adds its own cluster environment
    monkeypatch.setenv("SLURM_JOB_NAME", "lab")
    plugin = given.format("pytorch_lightning.plugins.AsyncCheckpointIO")
    trainer, _, _ = build_trainer(load(compose_config(*tiny_overrides(tmp_path), plugin), LabConfig), tmp_path)
    assert isinstance(trainer.strategy.checkpoint_io, AsyncCheckpointIO)
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and not environment.auto_requeue  # submitit requeues


def test_a_run_saves_its_checkpoints_through_a_plugin_from_the_command_line(tmp_path):
    plugin = "+trainer.plugins._target_=pytorch_lightning.plugins.AsyncCheckpointIO"  # writes in a thread
    run_dir, metrics = train(tmp_path, "async", plugin, "checkpoint_every=1", epochs=3)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and metrics["epochs"] == 3 and metrics["status"] == "ok"
    assert torch.load(metrics["best_checkpoint"], weights_only=True)["state_dict"].keys() == last["state_dict"].keys()


# ----------------------------------------------------------------------------- debug presets


def debug_run(tmp_path: Path, preset: str, *overrides: str) -> tuple[Path, dict]:
    """A debug preset's run, its dir found where the preset puts it (under paths.output_dir/debug)."""
    out = tmp_path / "out"
    settings = [item for item in tiny_overrides(tmp_path) if not item.startswith("trainer.max_epochs")]
    code, _, err = run_in_process([*settings, f"debug={preset}", f"paths.output_dir={out}", *overrides])
    assert code == 0, err[-2000:]
    (run_dir,) = (out / "debug" / "runs").iterdir()
    assert not (out / "runs").exists()  # never among real runs
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def test_debug_fdr_runs_one_batch_through_everything(tmp_path):
    run_dir, metrics = debug_run(tmp_path, "fdr")
    assert metrics["status"] == "ok" and metrics["epochs"] == 1 and math.isfinite(metrics["test_acc"])
    assert not (run_dir / "checkpoints").exists()  # Lightning's fast_dev_run writes none


def test_debug_limit_runs_few_short_epochs(tmp_path):
    run_dir, metrics = debug_run(tmp_path, "limit", "data.batch_size=2")
    limits = yaml.safe_load((CONF_DIR / "debug" / "limit.yaml").read_text())["trainer"]
    assert metrics["epochs"] == limits["max_epochs"]
    steps = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert steps == limits["max_epochs"] * limits["limit_train_batches"]  # 3 of the 13 batches of 2 per epoch


def test_debug_overfit_drives_the_train_loss_to_about_zero(tmp_path):
    _, metrics = debug_run(tmp_path, "overfit")
    losses = history(metrics, "train/loss")
    assert losses[0] > 0.5 and losses[-1] < 0.05, losses


def test_debug_profiler_writes_its_report_into_the_run_dir(tmp_path):
    run_dir, metrics = debug_run(tmp_path, "profiler")
    report = (run_dir / "fit-profile.txt").read_text()
    assert "run_training_epoch" in report and metrics["epochs"] == 1


def test_debug_tiny_is_a_seconds_long_run_on_its_own_data(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    code, _, err = run_in_process(
        ["debug=tiny", f"paths.output_dir={out}", f"paths.data_dir={data}", "data.progress=false"]
    )
    assert code == 0, err[-2000:]
    (run_dir,) = (out / "debug" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    tiny = yaml.safe_load((CONF_DIR / "debug" / "tiny.yaml").read_text())
    marker = json.loads((data / "debug" / "synthetic" / "raw" / MARKER_NAME).read_text())  # what was generated
    assert marker["counts"] == tiny["data"]["synthetic"]["counts"] and metrics["epochs"] == 1
    assert not (data / "synthetic").exists()  # the full data set's folder is untouched


# ----------------------------------------------------------------------------- schedules


def test_cosine_with_warmup_follows_its_formula(tmp_path):
    _, metrics = train(tmp_path, "cos", "scheduler=cosine", "scheduler.warmup_epochs=2", "optim.lr=0.01", epochs=6)
    lr, warm, rest = 0.01, 2, 4
    start = SchedulerConfig().warmup_start_factor
    expected = [lr * (start + (1 - start) * epoch / warm) for epoch in range(warm)]
    expected += [lr * 0.5 * (1 + math.cos(math.pi * epoch / rest)) for epoch in range(rest)]
    assert history(metrics, "train/lr") == pytest.approx(expected)


def test_step_multiplies_the_rate_by_gamma_every_step_size_epochs(tmp_path):
    overrides = ("scheduler=step", "scheduler.step_size=2", "scheduler.gamma=0.5")
    _, metrics = train(tmp_path, "step", *overrides, epochs=5)
    assert history(metrics, "train/lr") == pytest.approx([LR * 0.5 ** (epoch // 2) for epoch in range(5)])


def test_plateau_cuts_the_rate_after_patience_epochs_without_a_better_val_loss(tmp_path):
    overrides = ("scheduler=plateau", "scheduler.patience=0", "scheduler.factor=0.5", "scheduler.threshold=0.5")
    _, metrics = train(tmp_path, "plateau", *overrides, epochs=4)
    # threshold 0.5 (relative): the first epoch sets the best val loss, no later one beats it by half,
    # so each later epoch halves the rate at its end, for the epoch after it
    assert history(metrics, "train/lr") == pytest.approx([LR, LR, LR / 2, LR / 4])


def test_no_schedule_keeps_the_notebooks_constant_rate(tmp_path):
    _, metrics = train(tmp_path, "const", "optim.lr=0.002", epochs=3)
    assert history(metrics, "train/lr") == [0.002] * 3


def test_plateau_refuses_a_warmup_it_cannot_do(tmp_path):
    assert fails(tmp_path, "scheduler=plateau", "scheduler.warmup_epochs=2").startswith(
        "error: scheduler.warmup_epochs: plateau has no warm-up"
    )


# ----------------------------------------------------------------------------- start from a checkpoint


def test_ckpt_path_starts_a_new_run_from_trained_weights(tmp_path):
    trained_dir, trained = train(tmp_path, "trained", epochs=30)  # memorises the 21 training images
    _, fresh = train(tmp_path, "fresh", epochs=1)
    last = trained_dir / "checkpoints" / "last.ckpt"  # (the run dir names its best.ckpt: best val acc)
    _, tuned = train(tmp_path, "tuned", f"ckpt_path={last}", epochs=1)
    first_fresh, first_tuned = history(fresh, "train/loss")[0], history(tuned, "train/loss")[0]
    assert first_tuned < 0.5 * first_fresh, (first_tuned, first_fresh)
    assert first_tuned < min(history(trained, "train/loss")[:15])  # below where the trained run was halfway
    assert tuned["epochs"] == 1  # a new run: its own epochs, not the trained run's continued


def test_ckpt_path_of_another_architecture_is_one_line_naming_it(tmp_path):
    trained_dir, _ = train(tmp_path, "trained", epochs=1)
    line = fails(tmp_path, f"ckpt_path={trained_dir}", "model.downscale=8")
    assert line.startswith(f"error: ckpt_path={trained_dir / 'checkpoints' / 'best.ckpt'}: its weights do not fit")
    assert "model.downscale=16" in line
    assert fails(tmp_path, f"ckpt_path={tmp_path / 'nowhere'}").startswith("error: ckpt_path=")
