"""LightningModule: AlexNet + cross-entropy + the optimizer named in the config + per-epoch metrics.

Metrics come from one confusion matrix per stage, accumulated on the device and read once
per epoch: accuracy, balanced accuracy (mean per-class recall), per-class recall and the
fraction of predictions that go to each class, so that a net that always answers "cat"
(the notebook's first run) shows up as ``pred_frac/cat`` = 1.0.

For inspection in TensorBoard (TensorBoardLogger only): at fit start a custom-scalars
layout that draws the per-epoch prediction fractions, recalls, accuracies and losses as
multi-line charts (from the scalars already logged, nothing extra per step); at the end
of training and of testing the confusion matrix as an image and a grid of the most
confidently wrong images (val: last epoch; test) with predicted and true class. The
wrong images are kept on the device as a running top-k during val/test steps (no host
sync); training steps do no extra work.

Checkpoints also carry ``preprocessing`` (image size, grayscale, preprocess version and the
data cache's fingerprint) from the datamodule, so a checkpoint alone is enough to preprocess
new images the same way, and an evaluation can tell whether the data changed since.
"""

from __future__ import annotations

import ctypes
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from alexnet_lab.metrics import confusion_summary
from alexnet_lab.model import AlexNet, AlexNetConfig, count_parameters

STAGES = ("train", "val", "test")
WRONG_GRID_SIZE = 16  # most confidently wrong images shown per stage in TensorBoard (a 4 x 4 grid)


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` class called ``name`` (``Adam``, ``SGD``, ``AdamW``, ...)."""
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"optim.name={name!r} is not an optimizer in torch.optim; use e.g. optim=adam or optim=sgd")
    return cls


def keep_freed_host_memory(trim_threshold_bytes: int = 256 * 2**20) -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the OS after every step.

    With glibc's default, adaptive thresholds a training step's activations on a CPU (24 MB for
    conv1 at downscale 4, 64 images of 256 px) are often mapped afresh from the OS and
    page-faulted in every step: 370k-580k faults an epoch, 1.2-1.3x slower at downscale 4
    (scripts/bench.py). Fixed thresholds keep blocks up to 32 MB (glibc's largest mmap
    threshold) on the heap and up to ``trim_threshold_bytes`` of freed memory with the
    process; peak memory is the same. Process-wide; returns False where the C library is not
    glibc (nothing changes there).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, trim_threshold_bytes))


class ConfusionCounts(MulticlassConfusionMatrix):
    """A confusion matrix (rows: true, columns: predicted) whose ``update`` never waits for the device.

    torchmetrics counts with ``torch.bincount``, which on CUDA reads the input's maximum back
    to the host, and (with ``validate_args``) checks the inputs' values on the host: a host
    sync in every step. A scatter-add into the counts does the same on the device alone.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes=num_classes, validate_args=False)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        # preds, target: int (B,) class indices; cell (t, p) of the flattened (K, K) matrix is t * K + p
        cells = target.long() * self.num_classes + preds.long()
        self.confmat.view(-1).scatter_add_(0, cells, torch.ones_like(cells))


@dataclass(frozen=True)
class WrongSamples:
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
    batch = WrongSamples(
        images=(images[top].detach().float() * 255).round_().clamp_(0, 255).to(torch.uint8),
        score=score[top],
        predicted=predicted[top],
        true=labels[top],
    )
    if kept is None:
        return batch
    old = (kept.images, kept.score, kept.predicted, kept.true)
    new = (batch.images, batch.score, batch.predicted, batch.true)
    images, score, predicted, true = (torch.cat(pair) for pair in zip(old, new))  # 2k candidates
    top = score.topk(min(k, score.numel())).indices
    return WrongSamples(images[top], score[top], predicted[top], true[top])


def _render(figure: Any) -> np.ndarray:
    """A matplotlib Figure as uint8 (H, W, 3), drawn off-screen (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def confusion_image(confusion: np.ndarray, classes: list[str], title: str) -> np.ndarray:
    """The confusion matrix (rows: true, columns: predicted) as a heat map with counts: uint8 (H, W, 3)."""
    from matplotlib.figure import Figure

    n = len(classes)
    row_share = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)  # colour = fraction of the true class
    side = 2.0 + 0.6 * n
    figure = Figure(figsize=(side + 1.0, side), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    shown = axes.imshow(row_share, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    for i in range(n):
        for j in range(n):
            axes.text(j, i, f"{int(confusion[i, j])}", ha="center", va="center",
                      color="white" if row_share[i, j] > 0.5 else "black")
    axes.set_xticks(range(n), classes, rotation=45 if n > 4 else 0)
    axes.set_yticks(range(n), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    return _render(figure)


def wrong_grid_image(wrong: WrongSamples, classes: list[str], title: str) -> np.ndarray:
    """A grid of the wrong images in ``wrong`` (right ones dropped), titled with predicted and true class."""
    from matplotlib.figure import Figure

    keep = (wrong.score >= 0).cpu().numpy()
    images = wrong.images.cpu().numpy()[keep]  # (n, C, S, S) uint8
    score, predicted, true = (part.cpu().numpy()[keep] for part in (wrong.score, wrong.predicted, wrong.true))
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
    return _render(figure)


class AlexNetClassifier(pl.LightningModule):
    """Trains :class:`~alexnet_lab.model.AlexNet` with cross-entropy.

    Args take plain data (they are the checkpoint's hyperparameters): ``model`` holds
    :class:`AlexNetConfig` fields without ``in_channels``/``num_classes``, ``optim`` holds
    ``name`` (a class in ``torch.optim``) and that class's keyword arguments.
    """

    def __init__(self, model: dict[str, Any], optim: dict[str, Any], classes: list[str], in_channels: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.classes = list(classes)
        self.net = AlexNet(AlexNetConfig(**model, in_channels=in_channels, num_classes=len(classes)))
        self.net = self.net.to(memory_format=torch.channels_last)  # 1.2-1.4x faster convs on CPU
        optimizer_class(optim["name"])  # fail at build time, not after the data is ready
        self.confusion = nn.ModuleDict(
            {stage: ConfusionCounts(num_classes=len(classes)) for stage in ("fit", "val", "test")}
        )
        # nan_strategy="disable": a nan loss must reach the epoch mean (the divergence guard reads
        # it), not be dropped with a warning per step as torchmetrics does by default
        self.mean_loss = nn.ModuleDict(
            {stage: MeanMetric(nan_strategy="disable") for stage in ("fit", "val", "test")}
        )
        self.history: list[dict[str, float]] = []  # one row per epoch: train/* and val/* values
        self.test_metrics: dict[str, float] = {}
        self._val_row: dict[str, float] = {}
        self._epoch_started = 0.0
        # For the TensorBoard images: plain attributes, not buffers, so checkpoints do not carry them.
        self._last_confusion: dict[str, torch.Tensor] = {}  # stage -> (K, K) of its last epoch
        self._wrong: dict[str, WrongSamples | None] = {}  # stage -> running top-k of this epoch
        self._val_epoch = -1  # epoch of the last (non-sanity) validation, for the image titles

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.net)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # (B, C, S, S) float in [0, 1] -> (B, num_classes) logits
        return self.net(images.contiguous(memory_format=torch.channels_last))

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], key: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.confusion[key].update(logits.argmax(dim=1), labels)
        # one value per image: the epoch mean weighs every image alike (a short last batch too), and
        # no Python-number weight is copied to the device each step (a host sync on a GPU)
        self.mean_loss[key].update(loss.detach().expand(labels.shape[0]))
        return loss, logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "fit")[0]

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        _, logits = self._step(batch, stage)
        if not self.trainer.sanity_checking:
            images, labels = batch
            kept = self._wrong.get(stage)
            self._wrong[stage] = keep_most_confident_wrong(kept, images, logits, labels, WRONG_GRID_SIZE)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _epoch_metrics(self, key: str, stage: str) -> dict[str, float]:
        """Log the stage's epoch metrics and return them as floats (one host sync per epoch)."""
        confusion = self.confusion[key].compute()
        self._last_confusion[stage] = confusion
        values = {"loss": self.mean_loss[key].compute(), **confusion_summary(confusion, self.classes)}
        self.confusion[key].reset()
        self.mean_loss[key].reset()
        values = {f"{stage}/{name}": value for name, value in values.items()}
        self.log_dict(values, on_step=False, on_epoch=True)
        return {name: float(value) for name, value in values.items()}

    def on_validation_epoch_start(self) -> None:
        self._wrong["val"] = None  # keep the last epoch's only

    def on_test_epoch_start(self) -> None:
        self._wrong["test"] = None

    def on_validation_epoch_end(self) -> None:
        row = self._epoch_metrics("val", "val")
        if not self.trainer.sanity_checking:
            self._val_row = row
            self._val_epoch = self.current_epoch

    def on_train_epoch_start(self) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        row = {
            "epoch": self.current_epoch,
            "epoch_s": time.perf_counter() - self._epoch_started,  # training + validation, wall clock
            **self._epoch_metrics("fit", "train"),
            **self._val_row,
        }
        self._val_row = {}
        self.history.append(row)

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self._epoch_metrics("test", "test")
        self._log_inspection_images("test")

    def setup(self, stage: str) -> None:
        keep_freed_host_memory()  # in every process that trains or evaluates (ddp_spawn's too)

    def on_fit_start(self) -> None:
        writer = self._tensorboard()
        if writer is not None:
            writer.add_custom_scalars(self._chart_layout())

    def on_train_end(self) -> None:
        self._log_inspection_images("val")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store how images were preprocessed (plain data, loadable with ``weights_only=True``)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        image_size, grayscale = getattr(datamodule, "image_size", None), getattr(datamodule, "grayscale", None)
        if isinstance(image_size, int) and isinstance(grayscale, bool):
            from alexnet_lab.data.preprocess import PREPROCESS_VERSION

            fingerprint = getattr(getattr(datamodule, "cache", None), "fingerprint", None)
            checkpoint["preprocessing"] = {
                "image_size": image_size,
                "grayscale": grayscale,
                "preprocess_version": PREPROCESS_VERSION,
                # the cache's fingerprint: which files and settings it was trained on
                "data_fingerprint": fingerprint if isinstance(fingerprint, str) else None,
            }

    def _tensorboard(self) -> Any:
        """The TensorBoard SummaryWriter if this run logs to TensorBoard, else None."""
        if self._trainer is None or not isinstance(self.logger, TensorBoardLogger):
            return None
        return self.logger.experiment

    def _chart_layout(self) -> dict[str, dict[str, list]]:
        """Custom-scalars layout: one multi-line chart per stage and quantity, from the logged scalars."""

        def lines(tags: list[str]) -> list:
            return ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]]  # entries are regexes

        stages = ("train", "val")
        return {
            "prediction fractions (a collapsed net puts 1.0 on one class)": {
                stage: lines([f"{stage}/pred_frac/{name}" for name in self.classes]) for stage in stages
            },
            "recall per class": {
                stage: lines([f"{stage}/recall/{name}" for name in self.classes]) for stage in stages
            },
            "train vs val": {
                "accuracy": lines(["train/acc", "val/acc", "train/balanced_acc", "val/balanced_acc"]),
                "loss": lines(["train/loss", "val/loss"]),
            },
        }

    def _log_inspection_images(self, stage: str) -> None:
        """Confusion matrix and most confidently wrong images of the stage's last epoch, as TensorBoard images."""
        writer = self._tensorboard()
        confusion = self._last_confusion.get(stage)
        if writer is None or confusion is None or (stage == "val" and self._val_epoch < 0):
            return  # not TensorBoard, or no real (non-sanity) validation ran
        matrix = confusion.cpu().numpy()
        accuracy = np.trace(matrix) / max(int(matrix.sum()), 1)
        where = f"{stage}, epoch {self._val_epoch}" if stage == "val" else stage
        title = f"{where}: {int(matrix.sum())} images, accuracy {accuracy:.3f}"
        writer.add_image(f"{stage}/confusion_matrix", confusion_image(matrix, self.classes, title),
                         self.global_step, dataformats="HWC")
        wrong = self._wrong.get(stage)
        if wrong is not None:
            title = f"{where}: the most confidently wrong of {int(matrix.sum())}"
            grid = wrong_grid_image(wrong, self.classes, title)
            writer.add_image(f"{stage}/most_confident_wrong", grid, self.global_step, dataformats="HWC")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        kwargs = {key: value for key, value in self.hparams.optim.items() if key != "name"}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return optimizer_class(self.hparams.optim["name"])(self.parameters(), **kwargs)
