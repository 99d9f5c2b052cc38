"""The Hydra task: compose -> check -> build -> fit -> test -> metrics.json.

``train(cfg, run_dir)`` is plain Python (tests and notebooks call it with a composed
config); ``main`` is the Hydra glue that ``python train.py`` runs, once per job of a
multirun, all in one process: everything a job depends on (seeds, threads) is set here.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from alexnet_lab.data.datamodule import ImageFolderDataModule
from alexnet_lab.data.preprocess import DataError
from alexnet_lab.model import AlexNetConfig
from alexnet_lab.module import AlexNetClassifier, optimizer_class

log = logging.getLogger(__name__)

#: Config keys a user must set to a value of the given type (bool is not an int here).
_INT_KEYS = {"data.image_size": 64, "data.batch_size": 1, "trainer.max_epochs": 1}


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key and what to do."""


def run_label(override_dirname: str) -> str:
    """Run name from Hydra's ``override_dirname``: what differs from the defaults, readable.

    ``experiment=ablation_2_dropout,seed=1`` -> ``ablation_2_dropout,seed=1``; no overrides -> ``default``.
    """
    parts = [part.removeprefix("experiment=") for part in override_dirname.split(",") if part]
    return ",".join(parts).replace("/", "_") or "default"


OmegaConf.register_new_resolver("run_label", run_label, replace=True)


def check_config(cfg: DictConfig) -> None:
    """Reject values that cannot work before any data is touched; raises :class:`ConfigError`."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{key} is not set: pass {key}=... on the command line ({type(err).__name__})") from None
    for key, least in _INT_KEYS.items():
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{key}={value!r}: must be an integer >= {least}")
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
    try:
        optimizer_class(cfg.optim.name)
        AlexNetConfig(**cfg.model)  # checks arch, downscale, dropout before any data work
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
    )


def train(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train and test one configuration; write TensorBoard logs, checkpoints and metrics.json into ``run_dir``.

    Returns the metrics written to ``metrics.json``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    check_config(cfg)
    if cfg.seed is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = AlexNetClassifier(
        model=_plain(cfg.model), optim=_plain(cfg.optim), classes=datamodule.classes, in_channels=datamodule.in_channels
    )
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False)
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor="val/acc",
        mode="max",
        save_last=True,
        auto_insert_metric_name=False,
    )
    trainer = pl.Trainer(**_plain(cfg.trainer), logger=logger, callbacks=[checkpoint], default_root_dir=str(run_dir))
    log.info(
        "training %s: %d parameters, %d train / %d val / %d test images of classes %s, on %s",
        cfg.run_name if "run_name" in cfg else run_dir.name,
        module.num_parameters,
        len(datamodule.train_idx),
        len(datamodule.val_idx),
        len(datamodule.test_idx),
        datamodule.classes,
        trainer.strategy.root_device,
    )
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, ckpt_path="best" if checkpoint.best_model_path else None, verbose=False)

    final = module.history[-1] if module.history else {}
    best = checkpoint.best_model_score
    test = module.test_metrics
    metrics: dict[str, Any] = {
        "status": "ok",
        "run_name": cfg.get("run_name") if "run_name" in cfg else run_dir.name,
        "epochs": len(module.history),
        "wall_s": round(time.perf_counter() - started, 2),
        "params": module.num_parameters,
        "device": str(trainer.strategy.root_device),
        "seed": cfg.seed,
        "classes": datamodule.classes,
        "val_acc": final.get("val/acc", math.nan),
        "val_acc_best": float(best) if best is not None else math.nan,
        "val_balanced_acc": final.get("val/balanced_acc", math.nan),
        "val_pred_frac": {c: final.get(f"val/pred_frac/{c}", math.nan) for c in datamodule.classes},
        "test_acc": test.get("test/acc", math.nan),
        "test_balanced_acc": test.get("test/balanced_acc", math.nan),
        "per_class_recall": {c: test.get(f"test/recall/{c}", math.nan) for c in datamodule.classes},
        "test_pred_frac": {c: test.get(f"test/pred_frac/{c}", math.nan) for c in datamodule.classes},
        "best_checkpoint": checkpoint.best_model_path,
        "overrides": list(overrides or []),
        "history": module.history,
    }
    logger.log_hyperparams(
        _plain(cfg),
        metrics={f"hp/{key}": metrics[key] for key in ("val_acc", "val_acc_best", "test_acc", "test_balanced_acc")},
    )
    logger.finalize("success")
    write_json(run_dir / "metrics.json", metrics)
    log.info(
        "done in %.0f s: val acc %.3f (best %.3f), test acc %.3f, balanced %.3f -> %s",
        metrics["wall_s"],
        metrics["val_acc"],
        metrics["val_acc_best"],
        metrics["test_acc"],
        metrics["test_balanced_acc"],
        run_dir,
    )
    return metrics


def main(cfg: DictConfig) -> float:
    """Hydra entry: one job. Bad input becomes one line on stderr; a single run then exits 2.

    In a multirun the error is re-raised so that Hydra's launcher records it and goes on
    with the other jobs; either way ``metrics.json`` says ``failed`` and why.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    try:
        return float(train(cfg, run_dir, overrides)["val_acc_best"])
    except (ConfigError, DataError) as err:
        message = str(err).splitlines()[0]
        write_json(run_dir / "metrics.json", {"status": "failed", "error": message, "overrides": overrides})
        if hydra_cfg.mode == RunMode.MULTIRUN:
            log.error("error: %s", message)
            raise
        print(f"error: {message}", file=sys.stderr)  # once, on stderr: Hydra's log handler writes to stdout
        sys.exit(2)
