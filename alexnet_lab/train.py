"""The Hydra task: config -> data -> model -> fit -> test -> metrics.json.

``train(cfg, run_dir)`` is plain Python (tests and notebooks call it with a composed
config); ``train_job`` is the Hydra glue that ``python train.py`` runs, once per job of a
multirun, all in one process: everything a job depends on (seeds, threads) is set here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import sys
import time
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments.slurm import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerStatus

from alexnet_lab.callbacks import LastCheckpoint, ProgressBar, RunState, history_from_checkpoint
from alexnet_lab.config import LabConfig, load
from alexnet_lab.data.datamodule import ImageFolderDataModule
from alexnet_lab.errors import ConfigError, LabError, check_value, one_line
from alexnet_lab.identity import finished_metrics, write_json
from alexnet_lab.inference import load_weights
from alexnet_lab.module import AlexNetClassifier, optimizer_class
from alexnet_lab.stats import balanced_accuracy, bootstrap, wilson
from alexnet_lab.verdicts import phases, verdicts

log = logging.getLogger(__name__)

#: torch's thread count when this process started; each job starts from it again
_DEFAULT_THREADS = torch.get_num_threads()
#: metrics.json keys that go to TensorBoard's HPARAMS tab as the run's results
HP_METRICS = ("val_acc", "val_acc_best", "test_acc", "test_balanced_acc")


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped training; metrics.json says ``interrupted``."""


def reset_job_state(seed: int, parallel_jobs: int = 1) -> None:
    """Set what a job depends on, since a multirun runs its jobs one after another in one process.

    ``parallel_jobs`` jobs side by side (a joblib launcher) share the cores instead of each
    taking all of them.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // parallel_jobs) if parallel_jobs > 1 else _DEFAULT_THREADS)
    pl.seed_everything(seed, workers=True, verbose=False)


def requeued() -> bool:
    """Whether this process is a Slurm job started again after a requeue: preempted, timed out, node failure.

    Such a job always continues its own run dir, as with ``resume=true``: the cluster reruns the
    job's own command line, which the user cannot add ``resume=true`` to any more (README: "On a
    Slurm cluster"). Slurm counts the job's restarts in ``SLURM_RESTART_COUNT`` (unset at first).
    """
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def own_gpu(trainer: Mapping[str, Any], job_num: int, parallel_jobs: int, overrides: Sequence[str]) -> list[int] | None:
    """The GPU of job ``job_num`` of a sweep whose jobs run side by side (joblib's ``n_jobs``), else None.

    Round robin over the visible GPUs, so N jobs on N GPUs do not all land on ``cuda:0``. None
    (the Trainer's own choice) for one job at a time, fewer than two GPUs, an accelerator that is
    not a GPU, or ``trainer.devices`` set by the user (an override, or a config value other than
    the default 1): an explicit choice wins.
    """
    if parallel_jobs == 1 or any(item.lstrip("+~").startswith("trainer.devices=") for item in overrides):
        return None
    if str(trainer.get("accelerator", "auto")) not in ("auto", "gpu", "cuda") or trainer.get("devices", 1) != 1:
        return None
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    return [job_num % torch.cuda.device_count()]


#: Trainer arguments the lab sets itself, and where a user sets them instead
SET_BY_THE_LAB = {
    "logger": "choose loggers with logger=tensorboard, csv, mlflow, wandb, many or none",
    "callbacks": "add callbacks with callbacks=[default,early_stopping] (conf/callbacks)",
    "default_root_dir": "the run dir is hydra.run.dir (or paths.output_dir)",
}


def check_trainer_args(trainer: Mapping[str, Any]) -> None:
    """Each ``trainer.*`` value against the type ``pytorch_lightning.Trainer`` declares for that argument."""
    declared = typing.get_type_hints(pl.Trainer.__init__)
    for key, value in trainer.items():
        if key in SET_BY_THE_LAB:
            raise ConfigError(f"trainer.{key} is set by the lab: {SET_BY_THE_LAB[key]}")
        if key not in declared:
            raise ConfigError(f"trainer.{key} is not a pytorch_lightning.Trainer argument: check its spelling")
        check_value(f"trainer.{key}", value, declared[key])


@contextlib.contextmanager
def built_from_config(group: str, values: Mapping[str, Any]) -> Iterator[None]:
    """An exception while building something from config group ``group`` as one line naming the key it came from.

    Lightning's and torch's own checks (``Trainer(devices=0)``, ``SGD(momentum=-3)``) become
    ``error: trainer.devices=0: ...``; the traceback goes to the run's log, not the terminal.
    """
    try:
        yield
    except LabError:
        raise
    except Exception as err:
        text = " ".join(str(err).split())[:300]
        if group == "trainer" and values.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
            message = f"trainer.accelerator={values['accelerator']}: no GPU here; use trainer.accelerator=auto or cpu"
            raise ConfigError(message) from err
        named = re.search(r"unexpected keyword argument '(\w+)'", text)
        # a key written as `key=...` in the message names it better than a key merely mentioned
        found = [key for key in values if re.search(rf"\b{re.escape(key)}=", text)]
        found += [key for key in values if re.search(rf"\b{re.escape(key)}\b", text)]
        if "only has" in text and "devices" in values:  # "You requested gpu: [0, 1] But your machine only has: [0]"
            found = ["devices"]
        key = named.group(1) if named else found[0] if found else ""
        where = f"{group}.{key}={values[key]!r}" if key in values else f"{group}.{key}" if key else group
        raise ConfigError(f"{where}: {text}") from err


#: the optional packages behind a group's options, and the extra that installs them (pyproject.toml)
EXTRAS = {"logger.mlflow": "mlflow", "logger.wandb": "wandb"}


def instantiate_group(group: str, specs: Mapping[str, Any]) -> list[Any]:
    """What a config group's entries describe (a ``_target_`` each; null: off), built by Hydra.

    A package that is not installed is one line naming the extra that installs it; any other
    failure names the entry's key.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    built = []
    for key, spec in specs.items():
        if spec is None:
            continue
        try:
            built.append(instantiate(spec))
        except InstantiationException as err:
            cause = err.__cause__ or err
            if isinstance(cause, ModuleNotFoundError) and f"{group}.{key}" in EXTRAS:
                extra = EXTRAS[f"{group}.{key}"]
                raise ConfigError(f'{group}={key} needs {extra}, not installed: pip install -e ".[{extra}]"') from err
            raise ConfigError(f"{group}.{key}: {one_line(cause)}") from err
    return built


def build_loggers(lab: LabConfig, run_dir: Path) -> list[Any]:
    """The run's loggers (the logger group), writing into the run dir (or below it: a relative save_dir)."""
    in_run_dir = {
        key: {**spec, "save_dir": str(run_dir / spec.get("save_dir", ""))}
        for key, spec in lab.logger.items()
        if spec is not None
    }
    return instantiate_group("logger", in_run_dir)  # mlflow: mlruns/ below the run dir


def divergence_guard(lab: LabConfig) -> EarlyStopping:
    """What stops a run whose loss blew up: an epoch's mean train loss nan/inf or above divergence.max_train_loss."""
    return EarlyStopping(
        monitor="train/loss",
        mode="min",
        check_finite=True,  # a nan/inf loss stops the run at the end of that epoch
        divergence_threshold=lab.divergence.max_train_loss,
        patience=sys.maxsize,  # this guard only stops runs that blow up, never slow ones
        check_on_train_epoch_end=True,
        verbose=False,
    )


def build_trainer(lab: LabConfig, run_dir: Path) -> tuple[pl.Trainer, ModelCheckpoint, EarlyStopping]:
    """The Trainer of one run, with the callbacks the lab depends on; also its best checkpoint and its guard."""
    # best.ckpt at the end of each training epoch where val/acc improved, after the epoch's history
    # row exists; last.ckpt every checkpoint_every epochs (LastCheckpoint). Two callbacks: since
    # Lightning 2.6, `save_last` on a monitored checkpoint writes last.ckpt only when it improved.
    best = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor="val/acc",
        mode="max",
        auto_insert_metric_name=False,
        save_on_train_epoch_end=True,
    )
    last = LastCheckpoint(run_dir / "checkpoints", lab.checkpoint_every)
    guard = divergence_guard(lab)
    # The callbacks the lab depends on are always there, whatever the callbacks group says.
    callbacks = [best, last, guard, RunState(lab.seed), *instantiate_group("callbacks", lab.callbacks)]
    trainer = lab_trainer(lab, run_dir, callbacks, build_loggers(lab, run_dir))
    return trainer, best, guard


def lab_trainer(lab: LabConfig, root_dir: Path, callbacks: list[Any], loggers: list[Any], **fixed: Any) -> pl.Trainer:
    """``pl.Trainer`` from ``trainer.*`` with these callbacks and loggers, the lab's progress bar and Slurm plugin."""
    has_bar = any(isinstance(callback, pl.callbacks.ProgressBar) for callback in callbacks)  # rich_progress_bar
    if lab.trainer.get("enable_progress_bar", True) and not has_bar:
        callbacks.append(ProgressBar())  # Lightning's, redrawn at most twice a second
    arguments = trainer_arguments(lab.trainer)
    plugins = arguments.pop("plugins", None) or []  # the user's (+trainer.plugins=...) and the lab's
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    # Under SLURM, submitit requeues a timed-out or preempted job, which then continues (requeued());
    # Lightning's own requeue handler would fight submitit's over the same signal.
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return pl.Trainer(
        **{**arguments, **fixed},
        plugins=plugins or None,
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=str(root_dir),
    )


def check_optimizer(lab: LabConfig) -> None:
    """torch's own checks of the optimizer's arguments (``SGD(momentum=-3)``), before any data work; one line."""
    with built_from_config("optim", dataclasses.asdict(lab.optim)):
        optim = dataclasses.asdict(lab.optim)
        optimizer_class(optim.pop("name"))([torch.zeros(1, requires_grad=True)], **optim)


def trainer_arguments(trainer: Mapping[str, Any]) -> dict[str, Any]:
    """``trainer.*`` checked, with values that name a ``_target_`` built (``debug=profiler``'s profiler).

    A list of them is built item by item (``+trainer.plugins=[{_target_: ...}]``).
    """
    built = dict(trainer)
    for key, value in trainer.items():
        if isinstance(value, Mapping) and "_target_" in value:
            built[key] = instantiate_group("trainer", {key: value})[0]
        elif isinstance(value, list) and any(isinstance(item, Mapping) and "_target_" in item for item in value):
            built[key] = instantiate_group("trainer", {f"{key}[{i}]": item for i, item in enumerate(value)})
    check_trainer_args(built)
    return built


#: why the divergence guard stops a run that diverged (a nan/inf loss, or one above the limit)
DIVERGED = (EarlyStoppingReason.NON_FINITE_METRIC, EarlyStoppingReason.DIVERGENCE_THRESHOLD)


def train(
    cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None, parallel_jobs: int = 1
) -> dict[str, Any]:
    """Train and test one configuration; write TensorBoard logs, checkpoints and metrics.json into ``run_dir``.

    With ``resume: true`` a run dir whose metrics.json says the run finished is skipped
    (its metrics are returned), and an unfinished one continues from ``checkpoints/last.ckpt``;
    so does a Slurm job that was requeued, whatever ``resume`` says (:func:`requeued`).
    Returns the metrics written to ``metrics.json``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = bool(cfg.get("resume", False)) or requeued()
    if resume and (done := finished_metrics(run_dir)) is not None:
        log.info("%s already finished (%s): skipped", run_dir, done["status"])
        return done
    started = time.perf_counter()
    lab = load(cfg, LabConfig)  # every value checked before any data is touched
    reset_job_state(lab.seed, parallel_jobs)
    with built_from_config("trainer", lab.trainer):  # the Trainer and what it is given, before any data work
        trainer, best, guard = build_trainer(lab, run_dir)
    check_optimizer(lab)

    datamodule = ImageFolderDataModule(lab.data, seed=lab.seed)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(lab, datamodule)
    last = run_dir / "checkpoints" / "last.ckpt"
    resume_from = str(last) if resume and last.exists() else None
    if lab.ckpt_path and not resume_from:  # a new run from trained weights (a resumed one has its own)
        log.info("starting from the weights of %s", load_weights(module, lab.ckpt_path))
    log.info(
        "%s %s: %d parameters, %d train / %d val / %d test images of classes %s, on %s",
        f"resuming from {last}" if resume_from else "training",
        lab.run_name,
        module.num_parameters,
        len(datamodule.train_idx),
        len(datamodule.val_idx),
        len(datamodule.test_idx),
        datamodule.classes,
        trainer.strategy.root_device,
    )
    params = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    for logger in trainer.loggers:  # the whole config, not only the module's arguments
        logger.log_hyperparams(params)
    fit(trainer, module, datamodule, resume_from, run_dir, overrides)
    # under ddp_spawn, training ran in child processes: the history comes back in last.ckpt
    history = module.history or (history_from_checkpoint(last) if last.exists() else [])
    diverged = guard.stopping_reason in DIVERGED
    if diverged:
        log.warning("diverged at epoch %d: train loss %s; run stopped", len(history) - 1, history[-1].get("train/loss"))
    trainer.test(module, datamodule=datamodule, ckpt_path="best" if best.best_model_path else None, verbose=False)
    test = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("test/")}
    device = trainer.strategy.root_device
    metrics = run_metrics(
        lab, history, test, module, device, datamodule.preprocessing["data_fingerprint"], diverged=diverged
    )
    metrics.update(
        wall_s=round(time.perf_counter() - started, 2),
        best_checkpoint=best.best_model_path,
        overrides=list(overrides or []),
    )
    finish(run_dir, trainer.loggers, trainer.global_step, params, metrics)
    return metrics


def finish(
    run_dir: Path,
    loggers: Sequence[Any],
    step: int,
    params: dict[str, Any],
    metrics: dict[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """The results to the loggers and metrics.json, and one line saying how the run ended (``extra``: its record's)."""
    log_results(loggers, step, params, metrics)
    write_json(run_dir / "metrics.json", metrics)
    log.info(
        "%(outcome)s in %(wall_s).0f s: val acc %(val_acc).3f (best %(val_acc_best).3f), test acc %(test_acc).3f, "
        "balanced %(test_balanced_acc).3f -> %(run_dir)s",
        {**metrics, "outcome": "done" if metrics["status"] == "ok" else metrics["status"], "run_dir": run_dir},
        extra=extra,
    )


def build_module(lab: LabConfig, datamodule: ImageFolderDataModule) -> AlexNetClassifier:
    """The module ``lab`` describes, for the data's classes and channels (weights from torch's global RNG)."""
    return AlexNetClassifier(
        model=dataclasses.asdict(lab.model),
        optim=dataclasses.asdict(lab.optim),
        classes=datamodule.classes,
        in_channels=datamodule.in_channels,
        scheduler=dataclasses.asdict(lab.scheduler),
    )


def fit(
    trainer: pl.Trainer,
    module: AlexNetClassifier,
    datamodule: ImageFolderDataModule,
    resume_from: str | None,
    run_dir: Path,
    overrides: list[str] | None,
) -> None:
    """``trainer.fit``; a run stopped by Ctrl-C or SIGTERM is recorded as ``interrupted`` and raises RunInterrupted."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    except SystemExit:  # Lightning's graceful stop on Ctrl-C (exit 1) or SIGTERM
        if trainer.state.status != TrainerStatus.INTERRUPTED:
            raise
        raise RunInterrupted(record_interrupted(run_dir, overrides)) from None


def record_interrupted(run_dir: Path, overrides: Sequence[str] | None) -> str:
    """metrics.json of a run stopped by Ctrl-C or SIGTERM (``interrupted``), and what to do about it."""
    last = run_dir / "checkpoints" / "last.ckpt"
    epochs = len(history_from_checkpoint(last)) if last.exists() else 0
    checkpoint = str(last) if last.exists() else None
    record = {"status": "interrupted", "epochs": epochs, "checkpoint": checkpoint, "overrides": list(overrides or [])}
    write_json(run_dir / "metrics.json", record)
    return f"interrupted; {last} holds {epochs} finished epochs: rerun with resume=true to continue from there"


def log_results(loggers: Sequence[Any], step: int, params: dict[str, Any], metrics: dict[str, Any]) -> None:
    """The final results to every logger (TensorBoard: with the config again, for its HPARAMS tab), then close them."""
    results = {f"hp/{key}": metrics[key] for key in HP_METRICS}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics=results)
        else:
            logger.log_metrics(results, step=step)
        logger.finalize("success")


def run_metrics(
    lab: LabConfig,
    history: list[dict[str, float]],
    test: Mapping[str, float],
    module: AlexNetClassifier,
    device: torch.device,
    data_fingerprint: str | None,
    *,
    diverged: bool,
) -> dict[str, Any]:
    """metrics.json of a trained and tested run: status, verdicts, final and best numbers, the history.

    ``test``: the test's ``test/*`` values; ``data_fingerprint``: the files and preprocessing it saw.
    """
    classes = module.classes
    final = history[-1] if history else {}
    val_accs = [row["val/acc"] for row in history if math.isfinite(row.get("val/acc", math.nan))]
    metrics: dict[str, Any] = {
        "status": "diverged" if diverged else "ok",
        "run_name": lab.run_name,
        "epochs": len(history),
        "params": module.num_parameters,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seed": lab.seed,
        "classes": classes,
        "val_acc": final.get("val/acc", math.nan),
        "val_acc_best": max(val_accs, default=math.nan),
        "val_balanced_acc": final.get("val/balanced_acc", math.nan),
        "val_pred_frac": {c: final.get(f"val/pred_frac/{c}", math.nan) for c in classes},
        "test_acc": test.get("test/acc", math.nan),
        "test_balanced_acc": test.get("test/balanced_acc", math.nan),
        "per_class_recall": {c: test.get(f"test/recall/{c}", math.nan) for c in classes},
        "test_pred_frac": {c: test.get(f"test/pred_frac/{c}", math.nan) for c in classes},
        "verdicts": verdicts(history, lab.verdicts),  # collapsed / chance / overfit / diverged
        "phases": phases(history, lab.verdicts),  # collapsed epochs, the epoch it left chance, the best epoch
        "history": history,
    }
    true, pred = module.test_predictions
    if true:  # the test set is a sample: 95 % intervals (Wilson; a bootstrap over the test images)
        correct = sum(t == p for t, p in zip(true, pred, strict=True))
        metrics["test_acc_ci"] = wilson(correct, len(true)).as_list()
        metrics["test_balanced_acc_ci"] = bootstrap(balanced_accuracy, true, pred).as_list()
        # which images, in which order: two runs' predictions pair up only on the same test set
        metrics["test_set"] = {
            "data": data_fingerprint,  # the files and preprocessing
            "split_seed": lab.data.split_seed,
            "true": true,
            "pred": pred,
        }
    if diverged:
        metrics["diverged"] = {"epoch": len(history) - 1, "train_loss": final.get("train/loss", math.nan)}
    return metrics


def train_job(cfg: DictConfig) -> float:
    """One job of ``python train.py`` (cli.py records whatever it raises in its run dir: cli.error_policy).

    Ctrl-C or SIGTERM: exit 130 with ``interrupted``. Returns the best validation accuracy,
    what a hyperparameter search maximises.
    """
    run_dir, overrides, parallel_jobs, gpu = hydra_job(cfg)
    if gpu is not None:  # metrics.json's "device" says which (cuda:1)
        cfg.trainer.devices = gpu
    try:
        return float(train(cfg, run_dir, overrides, parallel_jobs=parallel_jobs)["val_acc_best"])
    except RunInterrupted as err:
        print(f"{run_dir}: {err}", file=sys.stderr)
        sys.exit(130)


def hydra_job(cfg: DictConfig) -> tuple[Path, list[str], int, list[int] | None]:
    """This Hydra job's run dir, overrides, jobs side by side (a joblib launcher's n_jobs) and its own GPU, if any."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    parallel_jobs = int(hydra_cfg.launcher.get("n_jobs") or 1)
    gpu = own_gpu(cfg.trainer, int(hydra_cfg.job.num), parallel_jobs, overrides) if multirun else None
    return Path(hydra_cfg.runtime.output_dir), overrides, parallel_jobs, gpu
