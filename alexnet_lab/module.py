"""LightningModule: AlexNet + cross-entropy + the optimizer named in the config + per-epoch metrics.

Metrics come from one confusion matrix per stage, accumulated on the device and read once
per epoch: accuracy, balanced accuracy (mean per-class recall), per-class recall and the
fraction of predictions that go to each class, so that a net that always answers "cat"
(the notebook's first run) shows up as ``pred_frac/cat`` = 1.0. Validation, test and
predict steps return the logits, for callbacks (the TensorBoard pictures) and for
``Trainer.predict``. The last epoch's confusion matrix of each stage stays in
``last_confusion``.

The module knows nothing of how images were preprocessed: the task's checkpoints carry that
(``preprocessing``, from the datamodule: callbacks.RunState).
"""

from __future__ import annotations

import time
from typing import Any, Literal, cast

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from alexnet_lab.metrics import confusion_summary
from alexnet_lab.model import AlexNet, AlexNetConfig, count_parameters, to_float


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` class called ``name`` (``Adam``, ``SGD``, ``AdamW``, ...)."""
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"optim.name={name!r} is not an optimizer in torch.optim; use e.g. optim=adam or optim=sgd")
    return cls


def lr_schedule(optimizer: torch.optim.Optimizer, spec: dict[str, Any], max_epochs: int) -> dict[str, Any] | None:
    """Lightning's ``lr_scheduler`` entry for ``spec`` (a SchedulerConfig as plain data), stepped per epoch.

    None for a constant rate. A warm-up runs first (torch's LinearLR, then the schedule in a
    SequentialLR); cosine anneals over the epochs after it.
    """
    schedulers, warmup = torch.optim.lr_scheduler, int(spec.get("warmup_epochs", 0))
    name = spec.get("name", "none")
    if name == "plateau":
        mode: Literal["min", "max"] = "max" if spec["monitor"].endswith("acc") else "min"
        keys = ("factor", "patience", "threshold", "min_lr")
        plateau = schedulers.ReduceLROnPlateau(optimizer, mode=mode, **{key: spec[key] for key in keys})
        return {"scheduler": plateau, "monitor": spec["monitor"], "interval": "epoch"}
    main: schedulers.LRScheduler
    if name == "cosine":
        main = schedulers.CosineAnnealingLR(optimizer, max(1, max_epochs - warmup), spec["eta_min"])
    elif name == "step":
        main = schedulers.StepLR(optimizer, spec["step_size"], spec["gamma"])
    elif warmup:  # none: the constant rate after the warm-up
        main = schedulers.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        return None
    if warmup:
        rise = schedulers.LinearLR(optimizer, start_factor=spec["warmup_start_factor"], total_iters=warmup)
        main = schedulers.SequentialLR(optimizer, [rise, main], milestones=[warmup])
    return {"scheduler": main, "interval": "epoch"}


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


class AlexNetClassifier(pl.LightningModule):
    """Trains :class:`~alexnet_lab.model.AlexNet` with cross-entropy.

    Args take plain data (they are the checkpoint's hyperparameters): ``model`` holds
    :class:`AlexNetConfig` fields without ``in_channels``/``num_classes``, ``optim`` holds
    ``name`` (a class in ``torch.optim``) and that class's keyword arguments, ``scheduler`` a
    SchedulerConfig (None: constant rate).
    """

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        classes: list[str],
        in_channels: int = 1,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # train.py logs the whole config to every logger instead
        self.classes = list(classes)
        self.net = AlexNet(AlexNetConfig(**model, in_channels=in_channels, num_classes=len(classes)))
        # 1.2-1.4x faster convs on CPU; torch's type stubs lack Module.to's memory_format
        self.net = self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        optimizer_class(optim["name"])  # fail at build time, not after the data is ready
        self.confusion = nn.ModuleDict(
            {stage: ConfusionCounts(num_classes=len(classes)) for stage in ("fit", "val", "test")}
        )
        # nan_strategy="disable": a nan loss must reach the epoch mean (the divergence guard reads
        # it), not be dropped with a warning per step as torchmetrics does by default
        self.mean_loss = nn.ModuleDict({stage: MeanMetric(nan_strategy="disable") for stage in ("fit", "val", "test")})
        self.history: list[dict[str, float]] = []  # one row per epoch: train/* and val/* values
        # the last test's true and predicted class per image, in the test split's order: paired comparisons
        self.test_predictions: tuple[list[int], list[int]] = ([], [])
        self._test_batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        # a plain attribute, not a buffer, so checkpoints do not carry it
        self.last_confusion: dict[str, torch.Tensor] = {}  # stage -> (K, K) of its last epoch
        self._val_row: dict[str, float] = {}
        self._epoch_started = 0.0
        self._epoch_lr = 0.0

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.net)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # (B, C, S, S) float in [0, 1] (or uint8 0..255, as the cache holds them) -> (B, num_classes) logits
        if images.dtype == torch.uint8:
            images = to_float(images)
        # in the weights' dtype: under 16-true or bf16-true Lightning casts the float inputs before this line
        logits: torch.Tensor = self.net(images.to(self.dtype).contiguous(memory_format=torch.channels_last))
        return logits

    def _step(
        self, batch: tuple[torch.Tensor, torch.Tensor], key: str, logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and metrics of a batch; ``logits``: the net's output on it where it was computed elsewhere (a pack)."""
        images, labels = batch
        logits = self.forward(images) if logits is None else logits
        loss = F.cross_entropy(logits, labels)
        confusion, mean_loss = self._metrics(key)
        confusion.update(logits.argmax(dim=1), labels)
        # one value per image: the epoch mean weighs every image alike (a short last batch too), and
        # no Python-number weight is copied to the device each step (a host sync on a GPU)
        mean_loss.update(loss.detach().expand(labels.shape[0]))
        return loss, logits

    # each step's ``logits``: the net's output on the batch where a packed model computed it (alexnet_lab/packed.py)
    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._step(batch, "fit", logits)[0]

    def validation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._step(batch, "val", logits)[1]

    def test_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits = self._step(batch, "test", logits)[1]
        self._test_batches.append((batch[1].detach(), logits.detach().argmax(dim=1)))  # on the device: no sync
        return logits

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Class probabilities (B, num_classes) of a batch of images (or of (images, ...) tuples)."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.forward(images).float().softmax(dim=1)

    def epoch_values(self, key: str, stage: str) -> dict[str, torch.Tensor]:
        """The stage's epoch metrics (``stage/loss``, ``stage/acc``, ...), on the device; counts reset for the next."""
        confusion_counts, mean_loss = self._metrics(key)
        confusion = confusion_counts.compute()
        self.last_confusion[stage] = confusion
        values = {"loss": mean_loss.compute(), **confusion_summary(confusion, self.classes)}
        confusion_counts.reset()
        mean_loss.reset()
        return {f"{stage}/{name}": value for name, value in values.items()}

    def _epoch_metrics(self, key: str, stage: str) -> dict[str, float]:
        """Log the stage's epoch metrics and return them as floats (one host sync per epoch)."""
        values = self.epoch_values(key, stage)
        self.log_dict(values, on_step=False, on_epoch=True)
        return {name: float(value) for name, value in values.items()}

    def on_validation_epoch_end(self) -> None:
        row = self._epoch_metrics("val", "val")
        if not self.trainer.sanity_checking:
            self._val_row = row

    def on_train_epoch_start(self) -> None:
        self._epoch_started = time.perf_counter()
        # the rate of this epoch: Lightning steps an epoch schedule after the last batch, before this epoch ends
        self._epoch_lr = float(self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self) -> None:
        self.log("train/lr", self._epoch_lr, on_step=False, on_epoch=True)
        self.record_epoch(self.current_epoch, self._epoch_started, self._epoch_lr, self._epoch_metrics("fit", "train"))

    def record_epoch(self, epoch: int, started: float, lr: float, train: dict[str, float]) -> dict[str, float]:
        """Append the epoch's history row (its training metrics and the validation before them) and return it."""
        row = {
            "epoch": epoch,
            "epoch_s": time.perf_counter() - started,  # training + validation, wall clock
            **train,
            "train/lr": lr,
            **self._val_row,
        }
        self._val_row = {}
        self.history.append(row)
        return row

    def on_test_epoch_start(self) -> None:
        self._test_batches = []

    def on_test_epoch_end(self) -> None:
        self._epoch_metrics("test", "test")
        self.keep_test_predictions()

    def keep_test_predictions(self) -> None:
        """The test's true and predicted classes, in the test split's order (one host sync)."""
        if self._test_batches:
            true, pred = (torch.cat(part).tolist() for part in zip(*self._test_batches, strict=True))
            self.test_predictions = (true, pred)

    def _metrics(self, key: str) -> tuple[ConfusionCounts, MeanMetric]:
        """The stage's confusion matrix and mean loss (``fit``, ``val`` or ``test``)."""
        return cast(ConfusionCounts, self.confusion[key]), cast(MeanMetric, self.mean_loss[key])

    def optimizer_arguments(self) -> dict[str, Any]:
        """The optimizer's keyword arguments (``optim`` without its ``name``)."""
        kwargs = {key: value for key, value in self.hparams["optim"].items() if key != "name"}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])  # a list after a round trip through YAML
        return kwargs

    def configure_optimizers(self) -> Any:
        optimizer = optimizer_class(self.hparams["optim"]["name"])(self.parameters(), **self.optimizer_arguments())
        spec = self.hparams.get("scheduler") or {}
        # only a schedule needs the run's length (cosine anneals over it); a module used on its own has no Trainer
        max_epochs = int(self.trainer.max_epochs or 1) if spec.get("name", "none") != "none" else 1
        schedule = lr_schedule(optimizer, spec, max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": schedule} if schedule else optimizer
