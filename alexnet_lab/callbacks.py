"""Callbacks: what a run needs to survive a kill, what TensorBoard shows, and the sweep report.

Lightning callbacks:

- :class:`RunState`: the per-epoch history in every checkpoint, and random numbers that depend
  only on (seed, epoch). Lightning's checkpoints hold weights, optimizer, loop progress and
  callback states, but not our metrics history, and not the global RNG that dropout draws
  from. Restoring the RNG is not enough either: Lightning creates the first epoch's data
  iterator (which draws from the RNG) before a resumed run's states are restored. So the
  history lives in this callback's state, and the global RNG is reseeded from (seed, epoch)
  at the first batch of every epoch (the augmentations have their own generator, seeded the
  same way in the datamodule). A run resumed from an end-of-epoch ``last.ckpt`` then
  continues exactly as if it had never stopped (same seed, CPU).
- :class:`TensorBoardInspection`: at fit start a custom-scalars layout that draws the
  per-epoch prediction fractions, recalls, accuracies and losses as multi-line charts; at the
  end of training and of testing the confusion matrix as an image and a grid of the most
  confidently wrong images, with predicted and true class. The wrong images are kept on the
  device as a running top-k (no host sync); training steps do no extra work. It does
  nothing unless the run logs to TensorBoard.

The Hydra callback :class:`SweepReport` writes report.md, report.csv, curves.png and
report.html into the sweep dir when a multirun ends (registered in conf/config.yaml). A
report that cannot be written is a warning in the log, never a failed sweep.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from matplotlib.figure import Figure
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger

from alexnet_lab.data.sampling import epoch_seed
from alexnet_lab.effects import DEFAULT_DELTA, DEFAULT_METRIC
from alexnet_lab.errors import ConfigError
from alexnet_lab.module import AlexNetClassifier

log = logging.getLogger(__name__)


def classifier(pl_module: pl.LightningModule) -> AlexNetClassifier:
    """The lab's module, typed: these callbacks read its classes, history and confusion matrices."""
    assert isinstance(pl_module, AlexNetClassifier), type(pl_module)
    return pl_module


WRONG_GRID_SIZE = 16  # most confidently wrong images shown per stage in TensorBoard (a 4 x 4 grid)


# ----------------------------------------------------------------------------- exact resume


class RunState(pl.Callback):
    """Saves the module's ``history`` in checkpoints and restores it on resume; reseeds each epoch.

    Checkpoints also carry the datamodule's ``preprocessing`` (ImageFolderDataModule.preprocessing),
    which eval.py and predict.py read: the module itself knows nothing of preprocessing.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._module: pl.LightningModule | None = None
        self._restored_history: list[dict[str, float]] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._module = pl_module

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(getattr(self._module, "history", []))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_history = list(state_dict["history"])

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        preprocessing = getattr(getattr(trainer, "datamodule", None), "preprocessing", None)
        if preprocessing is not None:
            checkpoint["preprocessing"] = preprocessing

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored_history is not None:
            classifier(pl_module).history = self._restored_history
            self._restored_history = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:  # dropout's random numbers: a function of (seed, epoch) only
            torch.manual_seed(epoch_seed(self.seed, trainer.current_epoch))


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``, written at the end of every ``every_n_epochs``-th training epoch and of the last one.

    Saving less often loses nothing a resume needs: it replays the epochs since the last save
    to the same numbers, since each epoch's randomness is a function of (seed, epoch) (RunState
    reseeds dropout, the sampler's order and the augmentation are derived the same way). The
    save after the last epoch keeps the history in last.ckpt complete: under ddp_spawn the
    parent process reads it back from there.
    """

    def __init__(self, dirpath: Path, every_n_epochs: int) -> None:
        super().__init__(
            dirpath,
            "last",
            monitor=None,
            enable_version_counter=False,  # overwrite last.ckpt, never last-v1.ckpt
            every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=True,  # after the epoch's history row exists
        )
        self.saved_step = -1  # the global step of the last save

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if (trainer.current_epoch + 1) % (self.every_n_epochs or 1) == 0:  # the rule ModelCheckpoint saves by
            self.saved_step = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # fast_dev_run saves nothing (Lightning sets it on the Trainer outside its __init__, hence getattr)
        if not getattr(trainer, "fast_dev_run", False) and trainer.global_step != self.saved_step:
            trainer.save_checkpoint(Path(self.dirpath or ".") / "last.ckpt")


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, redrawn at most every ``every_s`` seconds and after each loop's last batch.

    Lightning's own redraws it after every batch (its ``refresh_rate`` counts batches, whatever
    they cost): on 2 CPU cores at 64 px that was 10 ms of a 110 ms epoch. The lab adds this bar
    when the run shows one and the callbacks group brings none of its own (rich_progress_bar).
    """

    def __init__(self, every_s: float = 0.5) -> None:
        super().__init__()
        self.every_s = every_s
        self._drawn = -math.inf  # time.monotonic() of the last redraw

    def _should_update(self, current: int, total: int) -> bool:
        due = current == total or time.monotonic() - self._drawn >= self.every_s
        if due and super()._should_update(current, total):
            self._drawn = time.monotonic()
            return True
        return False


def history_from_checkpoint(path: str | Path) -> list[dict[str, float]]:
    """The history stored in a checkpoint by :class:`RunState` (empty if it has none)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("RunState"):
            return list(state["history"])
    return []


# ----------------------------------------------------------------------------- TensorBoard pictures


class WrongSamples(NamedTuple):
    """The most confidently wrong images seen so far, on the device, most confident first."""

    images: torch.Tensor  # uint8 (k, C, S, S)
    score: torch.Tensor  # float (k,): confidence of the prediction if wrong, -1 if the prediction was right
    predicted: torch.Tensor  # int64 (k,)
    true: torch.Tensor  # int64 (k,)


def keep_most_confident_wrong(
    kept: WrongSamples | None, images: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, k: int
) -> WrongSamples:
    """Merge a batch into the running top-k of wrong predictions ranked by confidence; all on the device.

    images: float (B, C, S, S) in [0, 1]; logits: (B, num_classes); labels: (B,). Only the
    batch's own top k are copied, so the work per batch is O(B + k) and never syncs the host.
    Right predictions may fill the k slots while fewer than k are wrong; they score -1.
    """
    confidence, predicted = logits.detach().float().softmax(dim=1).max(dim=1)
    score = torch.where(predicted != labels, confidence, torch.full_like(confidence, -1.0))
    top = score.topk(min(k, score.numel())).indices
    pixels = (images[top].detach().float() * 255).round_().clamp_(0, 255).to(torch.uint8)
    batch = WrongSamples(pixels, score[top], predicted[top], labels[top])
    if kept is None:
        return batch
    merged = WrongSamples(*(torch.cat(pair) for pair in zip(kept, batch, strict=True)))  # 2k candidates
    top = merged.score.topk(min(k, merged.score.numel())).indices
    return WrongSamples(*(part[top] for part in merged))


def confusion_image(confusion: np.ndarray, classes: list[str], title: str) -> Figure:
    """The confusion matrix (rows: true, columns: predicted) as a heat map with counts."""
    n = len(classes)
    row_share = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)  # colour = fraction of the true class
    side = 2.0 + 0.6 * n
    figure = Figure(figsize=(side + 1.0, side), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    shown = axes.imshow(row_share, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    for i, j in np.ndindex(n, n):
        colour = "white" if row_share[i, j] > 0.5 else "black"
        axes.text(j, i, f"{int(confusion[i, j])}", ha="center", va="center", color=colour)
    axes.set_xticks(range(n), classes, rotation=45 if n > 4 else 0)
    axes.set_yticks(range(n), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    return figure


def wrong_grid_image(wrong: WrongSamples, classes: list[str], title: str) -> Figure:
    """A grid of the wrong images in ``wrong`` (right ones dropped), titled with predicted and true class."""
    keep = (wrong.score >= 0).cpu().numpy()
    images, score, predicted, true = (part.cpu().numpy()[keep] for part in wrong)  # images: (n, C, S, S) uint8
    columns = 4
    rows = max(1, -(-len(images) // columns))
    figure = Figure(figsize=(2.4 * columns, 2.6 * rows + 0.4), dpi=100, layout="constrained")
    figure.suptitle(title)
    if len(images) == 0:
        figure.text(0.5, 0.5, "no wrong predictions", ha="center", va="center")
    for i, pixels in enumerate(images):
        axes = figure.add_subplot(rows, columns, i + 1)
        if pixels.shape[0] == 1:
            axes.imshow(pixels[0], cmap="gray", vmin=0, vmax=255)
        else:
            axes.imshow(pixels.transpose(1, 2, 0))
        axes.set_title(f"said {classes[predicted[i]]} (p={score[i]:.2f})\nis {classes[true[i]]}", fontsize=9)
        axes.axis("off")
    return figure


class TensorBoardInspection(pl.Callback):
    """Confusion matrices, most-confidently-wrong grids and multi-line charts in TensorBoard (see module doc)."""

    def __init__(self, k: int = WRONG_GRID_SIZE) -> None:
        self.k = k
        self._wrong: dict[str, WrongSamples | None] = {}  # stage -> running top-k of this epoch
        self._val_epoch = -1  # epoch of the last (non-sanity) validation, for the image titles

    @staticmethod
    def _writer(trainer: pl.Trainer) -> Any:
        """The TensorBoard SummaryWriter if this run logs to TensorBoard, else None."""
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        return loggers[0].experiment if loggers and trainer.is_global_zero else None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = self._writer(trainer)
        if writer is not None:
            writer.add_custom_scalars(chart_layout(classifier(pl_module).classes))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wrong["test" if trainer.testing else "val"] = None  # keep the last epoch's only

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Merge the batch's logits (``outputs``) into the stage's running top-k of wrong predictions."""
        if not trainer.sanity_checking and self._writer(trainer) is not None:
            images, labels = batch
            stage = "test" if trainer.testing else "val"
            self._wrong[stage] = keep_most_confident_wrong(self._wrong.get(stage), images, outputs, labels, self.k)

    on_test_batch_end = on_validation_batch_end

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_epoch = trainer.current_epoch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_epoch >= 0:  # a real (non-sanity) validation ran
            self._log_images("val", trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_images("test", trainer, pl_module)  # after the module's own epoch end made its matrix

    def _log_images(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Confusion matrix and most confidently wrong images of the stage's last epoch, as TensorBoard images."""
        writer, module = self._writer(trainer), classifier(pl_module)
        confusion = module.last_confusion.get(stage)
        if writer is None or confusion is None:
            return
        matrix = confusion.cpu().numpy()
        accuracy = np.trace(matrix) / max(int(matrix.sum()), 1)
        where = f"{stage}, epoch {self._val_epoch}" if stage == "val" else stage
        title = f"{where}: {int(matrix.sum())} images, accuracy {accuracy:.3f}"
        step = trainer.global_step
        # add_figure draws off-screen (Agg): no pyplot, no display
        writer.add_figure(f"{stage}/confusion_matrix", confusion_image(matrix, module.classes, title), step)
        wrong = self._wrong.get(stage)
        if wrong is not None:
            title = f"{where}: the most confidently wrong of {int(matrix.sum())}"
            grid = wrong_grid_image(wrong, module.classes, title)
            writer.add_figure(f"{stage}/most_confident_wrong", grid, step)


def chart_layout(classes: list[str]) -> dict[str, dict[str, list[Any]]]:
    """Custom-scalars layout: one multi-line chart per stage and quantity, from the logged scalars."""

    def lines(tags: list[str]) -> list[Any]:
        return ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]]  # entries are regexes

    stages = ("train", "val")
    return {
        "prediction fractions (a collapsed net puts 1.0 on one class)": {
            stage: lines([f"{stage}/pred_frac/{name}" for name in classes]) for stage in stages
        },
        "recall per class": {stage: lines([f"{stage}/recall/{name}" for name in classes]) for stage in stages},
        "train vs val": {
            "accuracy": lines(["train/acc", "val/acc", "train/balanced_acc", "val/balanced_acc"]),
            "loss": lines(["train/loss", "val/loss"]),
        },
    }


# ----------------------------------------------------------------------------- the sweep report


class SweepReport(Callback):
    """Write report.md, report.csv, curves.png and report.html into the sweep dir, after every job.

    So a long sweep shows its results as they come: until the last job the report says "in
    progress (k of n jobs)". ``metric`` is what the effect of each step is measured on, ``delta``
    the smallest difference in it worth telling from none (alexnet_lab/effects.py). The
    report reads every run again, so on a GPU, where a job takes seconds, rewriting it after
    each one would cost a good part of the sweep: an in-progress report is written at most
    every ``every_s`` seconds (the first job's always, and the last one's or else the sweep's end).
    """

    def __init__(
        self, html: bool = True, metric: str = DEFAULT_METRIC, delta: float = DEFAULT_DELTA, every_s: float = 60.0
    ) -> None:
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta > 0:
            raise ConfigError(f"hydra.callbacks.sweep_report.delta={delta}: must be a number > 0 (in {metric}'s units)")
        self.html, self.metric, self.delta, self.every_s = html, metric, delta, every_s
        self.jobs: int | None = None  # in the whole sweep, when the sweeper says
        # run dirs already finished when this sweep started (more seeds into a sweep dir): not this sweep's progress
        self.before = 0
        self._written_at = -math.inf  # time.monotonic() of the last in-progress report
        self._complete = False  # the last job's report is written: the sweep's end has nothing to add

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.jobs = _sweep_size(config)
        self.before = _finished_dirs(Path(config.hydra.sweep.dir))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.get("mode") in (RunMode.MULTIRUN, "MULTIRUN"):
            sweep_dir = Path(config.hydra.sweep.dir)
            # a run that resume=true skips is not counted: the report then stays "in progress" until the sweep's end
            done = _finished_dirs(sweep_dir) - self.before
            total = max(self.jobs or done, done)
            if done < total and time.monotonic() - self._written_at < self.every_s:
                return  # the next one will say more
            self._written_at, self._complete = time.monotonic(), done >= total
            self._write(sweep_dir, progress=(done, total) if done < total else None)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # a parallel launcher ends jobs in other processes, whose reports this one does not know of
        if not self._complete:
            self._write(Path(config.hydra.sweep.dir), progress=None)

    def _write(self, sweep_dir: Path, progress: tuple[int, int] | None) -> None:
        try:
            from alexnet_lab.report import write_report

            written = write_report(
                sweep_dir, html_report=self.html, metric=self.metric, delta=self.delta, progress=progress
            )
            log.info("sweep report: %s", written["report.md"])
        except Exception as err:  # noqa: BLE001  (a report problem must never fail the sweep)
            log.warning("sweep report not written for %s: %s: %s", sweep_dir, type(err).__name__, err)


def _finished_dirs(sweep_dir: Path) -> int:
    """How many run dirs of a sweep dir have their metrics.json."""
    if not sweep_dir.is_dir():
        return 0
    return sum((path / "metrics.json").is_file() for path in sweep_dir.iterdir() if path.is_dir())


def _sweep_size(config: DictConfig) -> int | None:
    """How many jobs the sweep will run: Hydra's basic sweeper's own expansion of the overrides, or n_trials."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if "n_trials" in sweeper:  # a search (Optuna)
        return int(sweeper.n_trials)
    try:
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        arguments = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
        overrides = parser.parse_overrides([*arguments, *config.hydra.overrides.task])
        return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))
    except Exception:  # another sweeper, or overrides it expands its own way: "k jobs so far"
        return None
