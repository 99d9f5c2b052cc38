"""The Hydra task: compose -> check -> build -> fit -> test -> metrics.json.

``train(cfg, run_dir)`` is plain Python (tests and notebooks call it with a composed
config); ``main`` is the Hydra glue that ``python train.py`` runs, once per job of a
multirun, all in one process: everything a job depends on (seeds, threads) is set here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.trainer.states import TrainerStatus

from alexnet_lab.data.datamodule import ImageFolderDataModule
from alexnet_lab.data.preprocess import DataError
from alexnet_lab.model import AlexNetConfig
from alexnet_lab.module import AlexNetClassifier, optimizer_class
from alexnet_lab.verdicts import VerdictThresholds, verdicts
from alexnet_lab.run_state import RunState, finished_metrics, history_from_checkpoint

log = logging.getLogger(__name__)

#: Config keys a user must set to a value of the given type (bool is not an int here).
_INT_KEYS = {"data.image_size": 64, "data.batch_size": 1, "trainer.max_epochs": 1}


#: torch's thread count when this process started; each job starts from it again
_DEFAULT_THREADS = torch.get_num_threads()


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key and what to do."""


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped training; metrics.json says ``interrupted``."""


def run_label(override_dirname: str) -> str:
    """Run name from Hydra's ``override_dirname``: what differs from the defaults, readable.

    ``experiment=ablation_2_dropout,seed=1`` -> ``ablation_2_dropout,seed=1``; no overrides -> ``default``.
    """
    parts = [part.removeprefix("experiment=") for part in override_dirname.split(",") if part]
    return ",".join(parts).replace("/", "_") or "default"


OmegaConf.register_new_resolver("run_label", run_label, replace=True)


def check_all_set(cfg: DictConfig) -> None:
    """A required key left unset (``???``) or an interpolation that fails, as one ConfigError line."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{key} is not set: pass {key}=... on the command line ({type(err).__name__})") from None


def check_config(cfg: DictConfig) -> None:
    """Reject values that cannot work before any data is touched; raises :class:`ConfigError`."""
    check_all_set(cfg)
    for key, least in _INT_KEYS.items():
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{key}={value!r}: must be an integer >= {least}")
    on_device = OmegaConf.select(cfg, "data.on_device", default="auto")
    if on_device not in ("auto", True, False):
        raise ConfigError(f"data.on_device={on_device!r}: must be auto, true or false")
    for key in ("data.balance", "data.augment", "data.grayscale"):
        if not isinstance(OmegaConf.select(cfg, key), bool):
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r}: must be true or false")
    val, test = cfg.data.val_fraction, cfg.data.test_fraction
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise ConfigError(
            f"data.val_fraction={val}, data.test_fraction={test}: each must be in (0, 1) and together below 1"
        )
    lr = cfg.optim.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"optim.lr={lr!r}: must be a positive number")
    if cfg.seed is not None and (isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int)):
        raise ConfigError(f"seed={cfg.seed!r}: must be an integer")
    max_loss = OmegaConf.select(cfg, "divergence.max_train_loss", default=20.0)
    if isinstance(max_loss, bool) or not isinstance(max_loss, (int, float)) or not max_loss > 0:
        raise ConfigError(f"divergence.max_train_loss={max_loss!r}: must be a positive number (nats)")
    try:
        optimizer_class(cfg.optim.name)
        AlexNetConfig(**cfg.model)  # checks arch, downscale, dropout before any data work
        VerdictThresholds.from_mapping(cfg.get("verdicts"))  # else a bad threshold fails after training
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err).splitlines()[0]) from None


def _plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON via a temporary file, so a reader never sees half a file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    tmp.replace(path)


def build_datamodule(cfg: DictConfig) -> ImageFolderDataModule:
    data = _plain(cfg.data)
    return ImageFolderDataModule(
        raw_dir=data["raw_dir"],
        cache_dir=data["cache_dir"],
        image_size=data["image_size"],
        grayscale=data["grayscale"],
        balance=data["balance"],
        augment=data["augment"],
        augmentation=data["augmentation"],
        batch_size=data["batch_size"],
        val_fraction=data["val_fraction"],
        test_fraction=data["test_fraction"],
        split_seed=data["split_seed"],
        seed=cfg.seed if cfg.seed is not None else 0,
        workers=data["workers"],
        progress=data["progress"],
        synthetic=data.get("synthetic"),
        discard=data.get("discard"),
        on_device=data.get("on_device", "auto"),
    )


def reset_job_state(cfg: DictConfig, parallel_jobs: int = 1) -> None:
    """Set what a job depends on, since a multirun runs its jobs one after another in one process.

    ``parallel_jobs`` jobs side by side (a joblib launcher) share the cores instead of each
    taking all of them.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // parallel_jobs) if parallel_jobs > 1 else _DEFAULT_THREADS)
    if cfg.seed is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)


def train(
    cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None, parallel_jobs: int = 1
) -> dict[str, Any]:
    """Train and test one configuration; write TensorBoard logs, checkpoints and metrics.json into ``run_dir``.

    With ``resume: true`` a run dir whose metrics.json says the run finished is skipped
    (its metrics are returned), and an unfinished one continues from ``checkpoints/last.ckpt``.
    Returns the metrics written to ``metrics.json``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = bool(cfg.get("resume", False))
    if resume and (done := finished_metrics(run_dir)) is not None:
        log.info("%s already finished (%s): skipped", run_dir, done["status"])
        return done
    started = time.perf_counter()
    check_config(cfg)
    reset_job_state(cfg, parallel_jobs)

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = AlexNetClassifier(
        model=_plain(cfg.model), optim=_plain(cfg.optim), classes=datamodule.classes, in_channels=datamodule.in_channels
    )
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False)
    # Both save at the end of each training epoch, after the epoch's history row exists, so a
    # resume replays nothing. Two callbacks: since Lightning 2.6, `save_last` on a monitored
    # checkpoint writes last.ckpt only in epochs where the monitored metric improved.
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor="val/acc",
        mode="max",
        auto_insert_metric_name=False,
        save_on_train_epoch_end=True,
    )
    last_checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="last",
        monitor=None,
        save_top_k=1,
        enable_version_counter=False,  # overwrite last.ckpt, never last-v1.ckpt
        save_on_train_epoch_end=True,
    )
    divergence = cfg.get("divergence") or {}
    guard = EarlyStopping(
        monitor="train/loss",
        mode="min",
        check_finite=True,  # a nan/inf loss stops the run at the end of that epoch
        divergence_threshold=float(divergence.get("max_train_loss", 20.0)),
        patience=sys.maxsize,  # this guard only stops runs that blow up, never slow ones
        check_on_train_epoch_end=True,
        verbose=False,
    )
    # Under SLURM, submitit requeues a timed-out or preempted job and `resume=true` continues
    # it; Lightning's own requeue handler would fight submitit's over the same signal.
    plugins = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None
    trainer = pl.Trainer(
        **_plain(cfg.trainer),
        plugins=plugins,
        logger=logger,
        callbacks=[checkpoint, last_checkpoint, guard, RunState(cfg.seed if cfg.seed is not None else 0)],
        default_root_dir=str(run_dir),
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    resume_from = str(last) if resume and last.exists() else None
    log.info(
        "%s %s: %d parameters, %d train / %d val / %d test images of classes %s, on %s",
        f"resuming from {last}" if resume_from else "training",
        cfg.run_name if "run_name" in cfg else run_dir.name,
        module.num_parameters,
        len(datamodule.train_idx),
        len(datamodule.val_idx),
        len(datamodule.test_idx),
        datamodule.classes,
        trainer.strategy.root_device,
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    except SystemExit:  # Lightning's graceful stop on Ctrl-C (exit 1) or SIGTERM
        if trainer.state.status != TrainerStatus.INTERRUPTED:
            raise
        epochs = len(history_from_checkpoint(last)) if last.exists() else 0
        write_json(
            run_dir / "metrics.json",
            {"status": "interrupted", "epochs": epochs, "checkpoint": str(last) if last.exists() else None,
             "overrides": list(overrides or [])},
        )
        raise RunInterrupted(f"interrupted after {epochs} finished epochs; rerun with resume=true to continue") from None

    # under ddp_spawn, training ran in child processes: the history comes back in last.ckpt
    history = module.history or (history_from_checkpoint(last) if last.exists() else [])
    status = "ok"
    if guard.stopping_reason in (EarlyStoppingReason.NON_FINITE_METRIC, EarlyStoppingReason.DIVERGENCE_THRESHOLD):
        status = "diverged"
        log.warning(
            "diverged at epoch %d: train loss %s; run stopped", len(history) - 1, history[-1].get("train/loss")
        )
    trainer.test(module, datamodule=datamodule, ckpt_path="best" if checkpoint.best_model_path else None, verbose=False)

    final = history[-1] if history else {}
    val_accs = [row["val/acc"] for row in history if math.isfinite(row.get("val/acc", math.nan))]
    test = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("test/")}
    metrics: dict[str, Any] = {
        "status": status,
        "run_name": cfg.get("run_name") if "run_name" in cfg else run_dir.name,
        "epochs": len(history),
        "wall_s": round(time.perf_counter() - started, 2),
        "params": module.num_parameters,
        "device": str(trainer.strategy.root_device),
        "threads": torch.get_num_threads(),
        "seed": cfg.seed,
        "classes": datamodule.classes,
        "val_acc": final.get("val/acc", math.nan),
        "val_acc_best": max(val_accs, default=math.nan),
        "val_balanced_acc": final.get("val/balanced_acc", math.nan),
        "val_pred_frac": {c: final.get(f"val/pred_frac/{c}", math.nan) for c in datamodule.classes},
        "test_acc": test.get("test/acc", math.nan),
        "test_balanced_acc": test.get("test/balanced_acc", math.nan),
        "per_class_recall": {c: test.get(f"test/recall/{c}", math.nan) for c in datamodule.classes},
        "test_pred_frac": {c: test.get(f"test/pred_frac/{c}", math.nan) for c in datamodule.classes},
        "verdicts": verdicts(history, cfg.get("verdicts")),  # collapsed / chance / overfit / diverged
        "best_checkpoint": checkpoint.best_model_path,
        "overrides": list(overrides or []),
        "history": history,
    }
    if status == "diverged":
        metrics["diverged"] = {"epoch": len(history) - 1, "train_loss": final.get("train/loss", math.nan)}
    logger.log_hyperparams(
        _plain(cfg),
        metrics={f"hp/{key}": metrics[key] for key in ("val_acc", "val_acc_best", "test_acc", "test_balanced_acc")},
    )
    logger.finalize("success")
    write_json(run_dir / "metrics.json", metrics)
    log.info(
        "%s in %.0f s: val acc %.3f (best %.3f), test acc %.3f, balanced %.3f -> %s",
        "done" if status == "ok" else status,
        metrics["wall_s"],
        metrics["val_acc"],
        metrics["val_acc_best"],
        metrics["test_acc"],
        metrics["test_balanced_acc"],
        run_dir,
    )
    return metrics


def main(cfg: DictConfig) -> float:
    """Hydra entry: one job, recorded in its run dir whatever happens.

    Bad input becomes one line on stderr and exit 2; Ctrl-C or SIGTERM, exit 130 with
    ``interrupted``; any other error is ``failed`` in metrics.json with its traceback in
    the run's log. In a multirun a failed job is re-raised so that Hydra's launcher
    records it, goes on with the other jobs and exits non-zero at the end.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    parallel_jobs = int(OmegaConf.select(hydra_cfg, "launcher.n_jobs", default=1) or 1)
    try:
        return float(train(cfg, run_dir, overrides, parallel_jobs=parallel_jobs)["val_acc_best"])
    except RunInterrupted as err:
        print(f"{run_dir}: {err}", file=sys.stderr)
        sys.exit(130)
    except (ConfigError, DataError) as err:
        message = str(err).splitlines()[0]
        write_json(run_dir / "metrics.json", {"status": "failed", "error": message, "overrides": overrides})
        if multirun:
            log.error("error: %s", message)
            raise
        print(f"error: {message}", file=sys.stderr)  # once, on stderr: Hydra's log handler writes to stdout
        sys.exit(2)
    except Exception as err:
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log.exception("run failed: %s", message)  # the traceback goes to the run's log file
        write_json(run_dir / "metrics.json", {"status": "failed", "error": message, "overrides": overrides})
        raise
