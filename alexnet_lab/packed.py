"""The packed engine: the runs of one pack trained side by side in one Lightning run, each still an ordinary run.

A pack (alexnet_lab/packing.py) holds K runs that share every shape and setting but what a pack
may vary. :func:`train_pack` builds one data set and split, and per member its own
:class:`~alexnet_lab.module.AlexNetClassifier` (seeded as that run alone would be: the same
initial weights), sampler (its seed and balancing), augmentation (its magnitudes, its generator),
dropout random numbers, optimizer parameter group (its learning rate), loggers, log file and run
dir. The members' parameters are views of one :class:`~alexnet_lab.model.AlexNetStack` (a
stacked tensor per layer), and a training step runs in one of two forms (``hydra.sweeper.form``):
``fused``, the members as one net (one grouped convolution and one batched matmul per layer for
all of them, each member's dropout from its own stream), or ``in_turn``, each member's own net on
its batch one after another (bit for bit the run alone on a CPU); ``auto`` times a few steps of
each on the pack's device first (:func:`time_forms`) and keeps the faster. Either way each member's
gradient is its own loss's, and one optimizer step updates every parameter group (a member's own
learning rate and the rest of its optim); validation and test batches are shared. What Lightning
and the lab cost per step and per epoch is then paid once per pack.

Each member is judged as a run of its own after every epoch: its history row, its loggers, its
divergence guard and early stopping (a stopped member gets no more batches, so its weights and
optimizer state stay as they were), ``best.ckpt`` when its val accuracy improved, ``last.ckpt``
every ``checkpoint_every`` epochs and when it stops. Its checkpoints hold its weights and optimizer
state alone (eval.py, predict.py, ``ckpt_path=`` read them as any run's) plus the pack's loop
state; ``resume=true`` (or a Slurm requeue) rebuilds the pack from its members' ``last.ckpt``. Its
metrics.json has the fields of any run's, its share of the pack's wall time (by the epochs it
trained), and ``pack``: where and in which form it trained, and the pack's wall time.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.trainer.states import TrainerStatus
from torch import nn

from alexnet_lab.callbacks import TensorBoardInspection
from alexnet_lab.config import DataConfig, LabConfig, load
from alexnet_lab.data.datamodule import ImageFolderDataModule, augment_in_chunks
from alexnet_lab.data.sampling import EpochBatchSampler, epoch_seed
from alexnet_lab.errors import LabError, one_line
from alexnet_lab.identity import finished_metrics, record_failure
from alexnet_lab.inference import load_weights
from alexnet_lab.model import AlexNet, AlexNetConfig, AlexNetStack, count_parameters, to_float
from alexnet_lab.module import AlexNetClassifier, optimizer_class
from alexnet_lab.packing import FUSED_AT_LEAST, Pack, PackJob, read_pack
from alexnet_lab.train import (
    DIVERGED,
    RunInterrupted,
    build_loggers,
    build_module,
    check_optimizer,
    divergence_guard,
    finish,
    hydra_job,
    instantiate_group,
    lab_trainer,
    record_interrupted,
    requeued,
    reset_job_state,
    run_metrics,
    train,
)

log = logging.getLogger(__name__)

#: a run's log file in its run dir: Hydra's job log, ${hydra.job.name}.log (conf/config.yaml: train)
RUN_LOG = "train.log"
#: the share of a GPU's free memory a pack may plan to fill (the rest: the data set, the allocator's slack)
GPU_MEMORY_SHARE = 0.8


# ----------------------------------------------------------------------------- data


class MemberBatches(list):  # type: ignore[type-arg]
    """A training step's batches, one per member (None: it has none): a type of its own, so that the
    datamodule tells it from an ordinary batch (a DataLoader hands those as lists too)."""


class PackBatches:
    """Per training step one batch per member: MemberBatches of (uint8 images (B, C, S, S), labels) or None.

    ``images``/``labels``: the memory-mapped cache (host) or the train split on the device, with
    ``positions`` mapping a cache index to its row there. Each member's order is its own
    :class:`EpochBatchSampler`'s, so its batches are exactly those of the run alone. A member
    that stopped training (``training[k]`` false) or whose epoch is over gets None. Each member's
    batch is read on its own: one read of K batches at 256 px is above glibc's mmap threshold
    (cli.keep_freed_host_memory), and would be mapped afresh from the OS every step.
    """

    batch_sampler = None  # Lightning looks for one next to ``sampler``

    def __init__(
        self,
        images: Any,
        labels: Any,
        positions: np.ndarray | None,
        samplers: Sequence[EpochBatchSampler],
        training: Sequence[bool],
    ) -> None:
        self.images, self.labels, self.positions = images, labels, positions
        self.samplers, self.training = list(samplers), training
        self.sampler = self  # Lightning calls sampler.set_epoch before each epoch

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.samplers:
            sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return max((len(s) for s, on in zip(self.samplers, self.training, strict=True) if on), default=0)

    def __iter__(self) -> Iterator[MemberBatches]:
        size = self.samplers[0].batch_size
        orders: list[Any] = [
            s._order() if on else s.indices[:0] for s, on in zip(self.samplers, self.training, strict=True)
        ]
        if isinstance(self.images, torch.Tensor):  # on the device: rows of the split there, uploaded once an epoch
            assert self.positions is not None
            orders = [
                torch.from_numpy(self.positions[order]).to(self.images.device, non_blocking=True) for order in orders
            ]
        for start in range(0, len(self) * size, size):
            batch = MemberBatches()
            for order in orders:
                rows = order[start : start + size]
                if not len(rows):
                    batch.append(None)
                elif isinstance(rows, torch.Tensor):
                    batch.append((self.images[rows], self.labels[rows]))  # a gather on the device
                else:  # one fancy-indexed read of the memmap, copied into RAM
                    batch.append((torch.from_numpy(self.images[rows]), torch.from_numpy(self.labels[rows])))
            yield batch


class PackedData(ImageFolderDataModule):
    """One data set and split for the pack; per member its own epoch order, balancing and augmentation.

    ``members``: each member's (``data`` config, seed). Everything a pack shares (the folder, the
    cache, the split, the batch size, where batches are gathered) comes from the first; validation
    and test batches are the ordinary ones, shared by all members.
    """

    def __init__(self, members: Sequence[tuple[DataConfig, int]]) -> None:
        super().__init__(members[0][0], seed=members[0][1])
        self.use(members)

    def use(self, members: Sequence[tuple[DataConfig, int]]) -> None:
        """Serve these members from now on (a part of the pack trained on its own): fresh augmentation generators."""
        self.members = list(members)
        self.training = [True] * len(members)  # members still training: the others get no batches
        self._generators.clear()

    def train_dataloader(self) -> Any:
        cache = self._load()
        samplers = [
            EpochBatchSampler(
                self.train_idx, cache.labels, self.data.batch_size, shuffle=True, balance=data.balance, seed=seed
            )
            for data, seed in self.members
        ]
        device = self._batch_device()
        if device is None:
            return PackBatches(cache.images, cache.labels, None, samplers, self.training)
        return PackBatches(*self.on_device("train", self.train_idx, device), samplers, self.training)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A training step's batches (a list: one per member) as float images, augmented as each member's run is."""
        if not isinstance(batch, MemberBatches):  # validation and test: the ordinary batches, shared
            return super().on_after_batch_transfer(batch, dataloader_idx)
        parts: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for member, (part, (data, seed)) in enumerate(zip(batch, self.members, strict=True)):
            if part is None:
                parts.append(None)
                continue
            floats = to_float(part[0])  # (B, C, S, S) in [0, 1], on the device
            if data.augment:
                floats = augment_in_chunks(
                    floats, data.augmentation, self._augment_generator(floats.device, seed, member)
                )
            parts.append((floats, part[1]))
        return parts


# ----------------------------------------------------------------------------- members


@dataclass
class Member:
    """One run of a pack: its config, module, loggers, log file, callbacks, and how far it got."""

    index: int
    job: PackJob
    lab: LabConfig
    module: AlexNetClassifier
    loggers: list[Any]
    callbacks: list[Any]  # its own (TensorBoard pictures), called by MemberCallbacks
    stoppers: list[EarlyStopping]  # the divergence guard, then the callbacks group's early stopping
    log_file: logging.Handler
    steps: int = 0  # optimizer steps this member took: its global_step
    best: float = -math.inf  # val/acc of best.ckpt
    best_path: str = ""
    saved_epoch: int = -1  # the epoch last.ckpt holds
    stopped: str | None = None  # why it trains no more: diverged, or early stopping
    lr: float = 0.0  # this epoch's learning rate
    rng: list[torch.Tensor] = field(default_factory=list)  # its dropout's random state (CPU, CUDA)
    resumed: dict[str, Any] | None = None  # its last.ckpt, when it continues from there

    @property
    def run_dir(self) -> Path:
        return Path(self.job.run_dir)

    @property
    def extra(self) -> dict[str, int]:
        """``extra=`` of a log record meant for this member's log file alone."""
        return {"member": self.index}

    def judge(self, row: dict[str, float]) -> str | None:
        """Feed the epoch's row to the guard and the early stopping, as the Trainer's callbacks would; why it stops."""
        for stopper in self.stoppers:
            if stopper.monitor in row and stopper._evaluate_stopping_criteria(torch.tensor(row[stopper.monitor]))[0]:
                return "diverged" if stopper.stopping_reason in DIVERGED else "stopped early"
        return None

    def checkpoint(
        self, pack_checkpoint: dict[str, Any], preprocessing: dict[str, Any], pack: dict[str, Any]
    ) -> dict[str, Any]:
        """This member's checkpoint, as an unpacked run's: its weights, optimizer state and history alone."""
        prefix = f"nets.{self.index}."
        state = pack_checkpoint["state_dict"]
        return {
            **{key: pack_checkpoint[key] for key in ("epoch", "pytorch-lightning_version", "loops")},
            "global_step": self.steps,
            # cloned: each member's weights are a view of the pack's stacked storage, which torch.save writes whole
            "state_dict": {
                name[len(prefix) :]: value.clone() for name, value in state.items() if name.startswith(prefix)
            },
            "optimizer_states": [optimizer_slice(pack_checkpoint["optimizer_states"][0], self.index)],
            "lr_schedulers": [],
            "callbacks": {"RunState": {"history": list(self.module.history)}},
            "hparams_name": "kwargs",
            "hyper_parameters": dict(self.module.hparams),
            "preprocessing": preprocessing,
            "pack": pack,
        }


def optimizer_slice(state: dict[str, Any], group: int) -> dict[str, Any]:
    """The optimizer state of one parameter group, as an optimizer over that group's parameters alone has it."""
    ids = state["param_groups"][group]["params"]
    return {
        "state": {new: state["state"][old] for new, old in enumerate(ids) if old in state["state"]},
        "param_groups": [{**state["param_groups"][group], "params": list(range(len(ids)))}],
    }


def optimizer_merge(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One optimizer state with one parameter group per member's state (the inverse of :func:`optimizer_slice`)."""
    merged: dict[str, Any] = {"state": {}, "param_groups": []}
    for state in states:
        (group,) = state["param_groups"]
        offset = sum(len(g["params"]) for g in merged["param_groups"])
        merged["state"].update({offset + index: value for index, value in state["state"].items()})
        merged["param_groups"].append({**group, "params": [offset + index for index in group["params"]]})
    return merged


# ----------------------------------------------------------------------------- the packed module


class PackedClassifier(pl.LightningModule):
    """K AlexNetClassifiers trained as one: a training step runs each member on its own batch (see the module doc).

    ``form``: ``fused``, the members as one :class:`~alexnet_lab.model.AlexNetStack` (one grouped
    convolution and one batched matmul per layer for all of them), or ``in_turn``, each member's own
    net one after another. Either way the members' parameters are views of the stack's rows, and one
    optimizer with a parameter group per member steps them.
    """

    def __init__(
        self, members: Sequence[Member], pack: dict[str, Any], data: PackedData, form: str = "in_turn"
    ) -> None:
        super().__init__()
        self.members, self.data, self.form = list(members), data, form
        self.nets = nn.ModuleList([member.module for member in members])
        self.pack = pack  # where the members trained: id and size, into their checkpoints
        self.stack: AlexNetStack | None = None  # built on the device, before the optimizer (configure_optimizers)
        self._stepped: set[int] = set()  # members with a batch since the last optimizer step
        self._epoch_started = 0.0

    def active(self) -> list[Member]:
        return [member for member in self.members if member.stopped is None]

    def configure_optimizers(self) -> Any:
        # the members' nets are on the device now: their parameters become views of one stack there
        self.stack = AlexNetStack([member.module.net for member in self.members])
        # one parameter group per member: its own learning rate (and the other arguments of its optim)
        groups = [{"params": list(m.module.parameters()), **m.module.optimizer_arguments()} for m in self.members]
        optimizer: Any = optimizer_class(self.members[0].lab.optim.name)  # its defaults: every group sets its own
        # torch's multi-tensor update where the class has one (on a CPU it defaults to one tensor at a time):
        # 0.8 of the time for a pack of 8 at downscale 16, and the same numbers (tests/test_packed.py)
        many = {"foreach": True} if "foreach" in inspect.signature(optimizer).parameters else {}
        return optimizer(groups, **many)

    def on_train_start(self) -> None:
        self.trainer.should_stop = not self.active()  # a resumed pack whose members all stopped: test only

    def on_train_epoch_start(self) -> None:
        self._epoch_started = time.perf_counter()
        groups = self.trainer.optimizers[0].param_groups
        for member in self.members:
            member.lr = float(groups[member.index]["lr"])
        self.data.training[:] = [member.stopped is None for member in self.members]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:  # each member's dropout draws from its own stream, seeded by (its seed, epoch)
            for member in self.members:
                torch.manual_seed(epoch_seed(member.lab.seed, self.current_epoch))
                member.rng = [torch.get_rng_state()]
                if self.device.type == "cuda":
                    member.rng.append(torch.cuda.get_rng_state(self.device))

    def training_step(self, batch: list[Any], batch_idx: int) -> torch.Tensor:
        """The active members' forward and backward, on their own batches; the optimizer then steps once for all.

        In turn, each member's backward comes right after its forward, freeing its activations before
        the next one's (at 256 px 2-3 % faster than one backward over the sum of the losses). Fused,
        members whose batches are of one size run as one net, and back up together. Lightning backs up
        the last loss itself, the others in :meth:`_backward`. A member that stopped gets no batch.
        """
        if batch_idx % self.trainer.accumulate_grad_batches == 0:  # see optimizer_zero_grad
            self.trainer.optimizers[0].zero_grad()
            assert self.stack is not None
            self.stack.zero_grad()
        parts = zip(self.members, batch, strict=True)
        active = [(member, part) for member, part in parts if part is not None and member.stopped is None]
        self._stepped.update(member.index for member, _ in active)
        losses: list[torch.Tensor] = []
        if self.form == "fused":
            for size in sorted({len(part[1]) for _, part in active}, reverse=True):  # an epoch's last batch is short
                losses.append(self._fused("training_step", [(m, p) for m, p in active if len(p[1]) == size], batch_idx))
        else:
            for member, part in active:
                with self._random_state(member):
                    losses.append(member.module.training_step(part, batch_idx))
        for loss in losses[:-1]:
            self._backward(loss)
        return losses[-1]

    def _fused(self, hook: str, members: Sequence[tuple[Member, Any]], batch_idx: int) -> Any:
        """The members' logits from one fused forward, each member's ``hook`` on its batch and logits.

        Training: the sum of their losses (each member's gradient is its own loss's); else each one's logits.
        """
        assert self.stack is not None
        dtype = self.members[0].module.dtype  # the weights' (16-true, bf16-true: Lightning casts them)
        images = [(to_float(p[0]) if p[0].dtype == torch.uint8 else p[0]).to(dtype) for _, p in members]
        logits = self.stack.forward(images, self._dropout, [member.index for member, _ in members])  # (K', B, classes)
        outputs = [getattr(m.module, hook)(part, batch_idx, logits=logits[j]) for j, (m, part) in enumerate(members)]
        return torch.stack(outputs).sum() if hook == "training_step" else outputs

    def _dropout(self, index: int, h: torch.Tensor, p: float) -> torch.Tensor:
        """Member ``index``'s dropout inside the fused forward: drawn from its own stream, as its net alone draws."""
        with self._random_state(self.members[index]):
            return F.dropout(h, p, training=True)

    def on_after_backward(self) -> None:
        """The fused backward's gradients to the members that had a batch; the others get none (their optimizer
        state and weights stay as they are)."""
        assert self.stack is not None
        self.stack.member_grads([member.index in self._stepped for member in self.members])

    def _backward(self, loss: torch.Tensor) -> None:
        """A member's backward inside the step, as Lightning's own: over the accumulated batches, scaled under
        16-bit mixed precision (through the strategy); else plain, since the strategy's hooks cost 9 % at 64 px."""
        if self.trainer.accumulate_grad_batches > 1:
            loss = loss / self.trainer.accumulate_grad_batches
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            self.trainer.strategy.backward(loss, None)
        else:
            torch.autograd.backward(loss)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Nothing here: Lightning zeroes the gradients after the training step, when every member but the
        last has been backed up already; training_step zeroes them before its first member instead."""

    @contextlib.contextmanager
    def _random_state(self, member: Member) -> Iterator[None]:
        """The member's own random numbers for its dropout (none to draw without dropout)."""
        if not member.lab.model.dropout:
            yield
            return
        torch.set_rng_state(member.rng[0])
        if len(member.rng) > 1:
            torch.cuda.set_rng_state(member.rng[1], self.device)
        yield
        member.rng = [torch.get_rng_state(), *([torch.cuda.get_rng_state(self.device)] if len(member.rng) > 1 else [])]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)  # runs the training step (its closure), then steps
        for index in self._stepped:
            self.members[index].steps += 1
        self._stepped.clear()

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        """Clipping by norm is per member (each run's own norm); by value it is per element anyway."""
        if gradient_clip_val is None or gradient_clip_algorithm not in (None, "norm"):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        for member in self.members:
            grads = [p for p in member.module.parameters() if p.grad is not None]
            if grads:
                torch.nn.utils.clip_grad_norm_(grads, float(gradient_clip_val))

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        # {"logits": per member (None: stopped)}, for its own callbacks
        return {"logits": self._shared("validation_step", batch, batch_idx, self.active())}

    def _shared(self, hook: str, batch: Any, batch_idx: int, members: Sequence[Member]) -> list[Any]:
        """Each member's ``hook`` on one batch that all share (validation, test); None for those not given."""
        given = {member.index for member in members}
        if self.form == "fused" and members:
            outputs = iter(self._fused(hook, [(member, batch) for member in members], batch_idx))
            return [next(outputs) if member.index in given else None for member in self.members]
        return [getattr(m.module, hook)(batch, batch_idx) if m.index in given else None for m in self.members]

    def on_validation_epoch_end(self) -> None:
        for member in self.active():
            row = {name: float(value) for name, value in member.module.epoch_values("val", "val").items()}
            if not self.trainer.sanity_checking:
                member.module._val_row = row

    def on_train_epoch_end(self) -> None:
        """Each active member's epoch, judged as the run alone is: its row, logs, stop, best and last checkpoints."""
        epoch, saves = self.current_epoch, []
        for member in self.active():
            train = {name: float(value) for name, value in member.module.epoch_values("fit", "train").items()}
            row = member.module.record_epoch(epoch, self._epoch_started, member.lr, train)
            for logger in member.loggers:
                logger.log_metrics({**{k: v for k, v in row.items() if "/" in k}, "epoch": epoch}, step=member.steps)
            member.stopped = member.judge(row)
            if member.stopped == "diverged":
                log.warning(
                    "diverged at epoch %d: train loss %s; run stopped", epoch, row["train/loss"], extra=member.extra
                )
            accuracy = row.get("val/acc", math.nan)
            if "val/acc" in row and (not member.best_path or accuracy > member.best):  # ModelCheckpoint's rule
                member.best = accuracy if math.isfinite(accuracy) else -math.inf
                saves.append((member, "best"))
            if (epoch + 1) % member.lab.checkpoint_every == 0 or member.stopped:
                saves.append((member, "last"))
        self._save(saves)
        if not self.active():
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        # last.ckpt after the last epoch too (LastCheckpoint's rule), for members that ran to the end
        self._save(
            [(m, "last") for m in self.members if m.saved_epoch != len(m.module.history) - 1 and m.module.history]
        )

    def _save(self, saves: Sequence[tuple[Member, str]]) -> None:
        if not saves:
            return
        pack_checkpoint = self.trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        preprocessing = self.data.preprocessing
        for member, name in saves:
            path = member.run_dir / "checkpoints" / f"{name}.ckpt"
            checkpoint = member.checkpoint(pack_checkpoint, preprocessing, {**self.pack, "member": member.index})
            self.trainer.strategy.save_checkpoint(checkpoint, path)
            if name == "best":
                member.best_path = str(path)
            else:
                member.saved_epoch = len(member.module.history) - 1

    def on_test_epoch_start(self) -> None:
        for member in self.members:
            member.module.on_test_epoch_start()

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return {"logits": self._shared("test_step", batch, batch_idx, self.members)}

    def on_test_epoch_end(self) -> None:
        for member in self.members:
            member.module.keep_test_predictions()


class MemberView:
    """The pack's Trainer as one member's own callbacks see it: that member's loggers and steps."""

    def __init__(self, trainer: pl.Trainer, member: Member) -> None:
        self._trainer, self.loggers, self.global_step = trainer, member.loggers, member.steps

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)


class MemberCallbacks(pl.Callback):
    """Calls each member's own callbacks (TensorBoard pictures) with its module, its logits and a MemberView."""

    def __init__(self, members: Sequence[Member]) -> None:
        self.members = members

    def _each(self, trainer: pl.Trainer, hook: str, *args: Any, outputs: Any = None, only_active: bool = True) -> None:
        for member in self.members:
            if only_active and member.stopped is not None and not trainer.testing:
                continue
            if outputs is not None and outputs[member.index] is None:
                continue
            given = (outputs[member.index], *args) if outputs is not None else args
            for callback in member.callbacks:
                getattr(callback, hook)(MemberView(trainer, member), member.module, *given)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._each(trainer, "on_fit_start")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._each(trainer, "on_validation_epoch_start")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._each(trainer, "on_test_epoch_start")

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
    ) -> None:
        self._each(trainer, "on_validation_batch_end", *args, outputs=outputs["logits"])

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self._each(trainer, "on_test_batch_end", *args, outputs=outputs["logits"])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._each(trainer, "on_validation_epoch_end")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._each(trainer, "on_train_end", only_active=False)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._each(trainer, "on_test_end")


# ----------------------------------------------------------------------------- training a pack


def pack_job(cfg: Any) -> dict[int, dict[str, Any]]:
    """One job of a packed sweep (``pack=FILE``, set by hydra/sweeper=packed): train that pack; as train_job."""
    pack_dir, _, parallel_jobs, gpu = hydra_job(cfg)
    try:
        return train_pack(cfg.pack, devices=gpu, parallel_jobs=parallel_jobs)
    except RunInterrupted as err:
        print(f"{pack_dir}: {err}", file=sys.stderr)
        sys.exit(130)


def train_pack(pack_file: Any, devices: Any = None, parallel_jobs: int = 1) -> dict[int, dict[str, Any]]:
    """Train the pack a pack file describes (alexnet_lab/packing.py); per job number, how its run ended.

    A job that trains alone, or a pack of one, trains the ordinary way (:func:`alexnet_lab.train.train`)
    in its own run dir. ``devices``: the Trainer's, when the launcher gave this pack its own GPU.
    """
    pack = read_pack(pack_file)
    pack_file = Path(pack_file)
    with member_logs(pack.jobs) as log_files:
        if pack.alone is not None or len(pack.jobs) == 1:
            job = pack.jobs[0]
            cfg = OmegaConf.create(job.config)
            if devices is not None:
                cfg.trainer.devices = devices
            with recorded([job], log_files):
                return {job.job: outcome(train(cfg, job.run_dir, job.overrides, parallel_jobs))}
        return _train_members(pack, pack_file.parent, log_files, devices, parallel_jobs)


def outcome(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the sweeper hears of a run: its status, its best val accuracy (what a search maximises), its error."""
    return {"status": metrics.get("status"), "val_acc_best": metrics.get("val_acc_best"), "error": metrics.get("error")}


@contextlib.contextmanager
def member_logs(jobs: Sequence[PackJob]) -> Iterator[list[logging.Handler]]:
    """Each job's own log file (``train.log`` in its run dir), beside the pack job's own.

    A record made with ``extra={"member": k}`` goes to member k's file alone; every other record
    (Lightning's, the pack's) to all of them.
    """
    root = logging.getLogger()
    template = next((h for h in root.handlers if isinstance(h, logging.FileHandler)), None)  # Hydra's job log
    handlers: list[logging.Handler] = []
    for index, job in enumerate(jobs):
        Path(job.run_dir).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(job.run_dir) / RUN_LOG)
        if template is not None:
            handler.setFormatter(template.formatter)
        handler.addFilter(MemberFilter(index))
        root.addHandler(handler)
        handlers.append(handler)
    try:
        yield handlers
    finally:
        for done in handlers:
            root.removeHandler(done)
            done.close()


class MemberFilter(logging.Filter):
    """Passes the records of member ``index`` and those of no member in particular."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "member", self.index) == self.index


@contextlib.contextmanager
def recorded(jobs: Sequence[PackJob], log_files: Sequence[logging.Handler]) -> Iterator[None]:
    """A failure recorded in every job's run dir (metrics.json: ``failed``; the traceback in its log), then raised.

    Out of memory on a GPU is one line naming the limit to lower.
    """
    try:
        yield
    except RunInterrupted:  # recorded as interrupted, not failed
        raise
    except Exception as err:
        failure = err
        if isinstance(err, torch.OutOfMemoryError):
            size = f"a pack of {len(jobs)} runs ({one_line(err)[:120]})"
            failure = LabError(f"out of memory training {size}: lower hydra.sweeper.max_size")
        message = one_line(failure) if isinstance(failure, LabError) else f"{type(err).__name__}: {one_line(err)}"
        for job, log_file in zip(jobs, log_files, strict=True):
            record_failure(Path(job.run_dir), err, message, job.overrides, [log_file])
        if failure is err:
            raise
        raise failure from err


def _train_members(
    pack: Pack, pack_dir: Path, log_files: Sequence[logging.Handler], devices: Any, parallel_jobs: int
) -> dict[int, dict[str, Any]]:
    """Members built, resumed where they had stopped, trained in groups that continue from the same epoch."""
    results: dict[int, dict[str, Any]] = {}
    labs = []
    for job, log_file in zip(pack.jobs, log_files, strict=True):
        cfg = OmegaConf.create(job.config)
        resume = bool(cfg.get("resume", False)) or requeued()
        if resume and (done := finished_metrics(Path(job.run_dir))) is not None:
            results[job.job] = outcome(done)  # a requeued pack: this run finished before
            continue
        try:
            with recorded([job], [log_file]):
                lab = load(cfg, LabConfig)
                check_optimizer(lab)
        except LabError as err:
            print(f"error: {job.run_dir}: {one_line(err)}", file=sys.stderr)
            results[job.job] = {"status": "failed", "val_acc_best": None, "error": one_line(err)}
            continue
        if devices is not None:
            lab.trainer["devices"] = devices
        labs.append((job, log_file, lab, resume))
    if not labs:
        return results
    jobs = [job for job, *_ in labs]
    with recorded(jobs, [log_file for _, log_file, *_ in labs]):
        reset_job_state(labs[0][2].seed, parallel_jobs)
        datamodule = PackedData([(lab.data, lab.seed) for _, _, lab, _ in labs])
        datamodule.prepare_data()
        datamodule.setup("fit")
        members = [build_member(index, *entry, datamodule) for index, entry in enumerate(labs)]
        # members continue from the epoch their last.ckpt holds: one Lightning run per such epoch
        by_epoch = sorted(members, key=lambda m: m.resumed["epoch"] if m.resumed else -1)
        for _, group in groupby(by_epoch, key=lambda m: m.resumed["epoch"] if m.resumed else -1):
            for part in fitting(list(group), datamodule):
                results.update(fit_members(part, datamodule, pack_dir, pack.form))
    return results


def build_member(
    index: int, job: PackJob, log_file: logging.Handler, lab: LabConfig, resume: bool, datamodule: PackedData
) -> Member:
    """A member's module (initial weights as the run alone gets them), loggers, callbacks, and its last.ckpt."""
    pl.seed_everything(lab.seed, workers=True, verbose=False)  # train() seeds the same way before building
    module = build_module(lab, datamodule)
    callbacks = instantiate_group("callbacks", lab.callbacks)
    stoppers = [divergence_guard(lab), *(c for c in callbacks if isinstance(c, EarlyStopping))]
    member = Member(
        index,
        job,
        lab,
        module,
        build_loggers(lab, Path(job.run_dir)),
        [c for c in callbacks if isinstance(c, TensorBoardInspection)],
        stoppers,
        log_file,
    )
    last = member.run_dir / "checkpoints" / "last.ckpt"
    if resume and last.exists():
        member.resumed = torch.load(last, map_location="cpu", weights_only=True)
        history = list(member.resumed["callbacks"]["RunState"]["history"])
        module.history, member.steps, member.saved_epoch = history, int(member.resumed["global_step"]), len(history) - 1
        for row in history:  # the guard, the early stopping and the best checkpoint as they stood
            member.stopped = member.judge(row)
            if "val/acc" in row and (member.best == -math.inf or row["val/acc"] > member.best):
                member.best = row["val/acc"] if math.isfinite(row["val/acc"]) else -math.inf
        best = member.run_dir / "checkpoints" / "best.ckpt"
        member.best_path = str(best) if best.exists() else ""
        log.info("resuming from %s", last, extra=member.extra)
    elif lab.ckpt_path:
        log.info("starting from the weights of %s", load_weights(module, lab.ckpt_path), extra=member.extra)
    return member


def member_bytes(member: Member, datamodule: PackedData) -> int:
    """About how much GPU memory one member's training step takes: state, activations and their gradients."""
    hparams = member.module.hparams
    size, batch = datamodule.data.image_size, datamodule.data.batch_size
    with torch.device("meta"):
        net = AlexNet(
            AlexNetConfig(**hparams["model"], in_channels=datamodule.in_channels, num_classes=len(hparams["classes"]))
        )
        outputs: list[int] = []
        for layer in net.modules():
            if not list(layer.children()):
                layer.register_forward_hook(lambda _, __, out: outputs.append(int(out.numel())))
        net(torch.empty(batch, datamodule.in_channels, size, size))
    state = 4 * 4 * count_parameters(net)  # float32 weights, gradients and two optimizer moments
    return state + 4 * 3 * sum(outputs)  # activations kept for backward, their gradients, the kernels' slack


#: Timed steps of each form before a pack trains with hydra.sweeper.form=auto, after one untimed step of each.
FORM_STEPS = 3


def time_forms(
    members: Sequence[Member], datamodule: PackedData, trainer: pl.Trainer, steps: int = FORM_STEPS
) -> float:
    """How fast a fused training step of these members is against one in turn, on the pack's device: time in turn
    / time fused, each the median of ``steps`` forward and backward passes, interleaved.

    Fresh nets of the members' shapes and dropout (their own weights untouched), one batch of random
    images a member, the trainer's precision; the random numbers the run draws are left as they were.
    """
    device, data = trainer.strategy.root_device, datamodule.data
    classes = len(members[0].module.hparams["classes"])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        nets = [
            AlexNet(AlexNetConfig(**m.module.hparams["model"], in_channels=datamodule.in_channels, num_classes=classes))
            for m in members
        ]
        # as the members' modules lay them out (torch's type stubs lack Module.to's memory_format)
        nets = [net.to(device).to(memory_format=torch.channels_last) for net in nets]  # type: ignore[call-overload]
        stack = AlexNetStack(nets)
        images = torch.rand(len(nets), data.batch_size, datamodule.in_channels, data.image_size, data.image_size)
        images, labels = images.to(device), torch.randint(0, classes, (len(nets), data.batch_size), device=device)
        forms = {"fused": stack.forward, "in_turn": stack.in_turn}
        times: dict[str, list[float]] = {name: [] for name in forms}
        for round_ in range(steps + 1):  # the first round warms up
            for name in sorted(forms, reverse=bool(round_ % 2)):  # each form first every other round
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                with trainer.precision_plugin.forward_context():
                    loss = F.cross_entropy(forms[name](images).flatten(0, 1).float(), labels.flatten())
                torch.autograd.backward(loss)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - start)
                stack.zero_grad()
                for net in nets:
                    net.zero_grad(set_to_none=True)
    return float(np.median(times["in_turn"][1:]) / np.median(times["fused"][1:]))


def choose_form(
    form: str, members: Sequence[Member], datamodule: PackedData, trainer: pl.Trainer
) -> tuple[str, float | None]:
    """fused or in_turn, and the ratio auto timed (None where it timed none).

    auto: fused where :func:`time_forms` finds it at least :data:`~alexnet_lab.packing.FUSED_AT_LEAST`
    times as fast on the pack's device; a resumed pack goes on in the form its checkpoints name; a
    part of one member has nothing to fuse.
    """
    if form != "auto":
        return form, None
    saved = (members[0].resumed or {}).get("pack") or {}
    if saved.get("form") in ("fused", "in_turn"):
        return saved["form"], saved.get("form_ratio")
    if len(members) < 2:
        return "in_turn", None
    ratio = time_forms(members, datamodule, trainer)
    form = "fused" if ratio >= FUSED_AT_LEAST else "in_turn"
    log.info("pack form: %s (a fused step %.2fx the speed of one in turn here, timed)", form, ratio)
    return form, ratio


def fitting(members: list[Member], datamodule: PackedData) -> list[list[Member]]:
    """The members in parts that fit the GPU's free memory at once (by :func:`member_bytes`); one part on a CPU."""
    device = (
        torch.device("cuda")
        if torch.cuda.is_available() and members[0].lab.trainer.get("accelerator") != "cpu"
        else None
    )
    if device is None:
        return [members]
    free, _ = torch.cuda.mem_get_info(device)
    need = max(member_bytes(member, datamodule) for member in members)
    fits = max(1, int(free * GPU_MEMORY_SHARE) // need)
    if fits >= len(members):
        return [members]
    log.warning(
        "a pack of %d runs needs about %.1f GiB, %.1f GiB of %s are free: trained %d at a time",
        len(members),
        len(members) * need / 2**30,
        free / 2**30,
        device,
        fits,
    )
    return [members[start : start + fits] for start in range(0, len(members), fits)]


def resume_checkpoint(members: list[Member], pack_dir: Path) -> Path | None:
    """One checkpoint of the pack, put together from the resumed members' own (None: a fresh pack)."""
    if members[0].resumed is None:
        return None
    resume_from = pack_dir / "resume.ckpt"
    checkpoints = [member.resumed or {} for member in members]  # all resumed: grouped by their epoch
    state = {
        f"nets.{m.index}.{name}": value
        for m, c in zip(members, checkpoints, strict=True)
        for name, value in c["state_dict"].items()
    }
    optimizer = optimizer_merge([c["optimizer_states"][0] for c in checkpoints])
    torch.save({**checkpoints[0], "state_dict": state, "optimizer_states": [optimizer], "callbacks": {}}, resume_from)
    return resume_from


def fit_members(
    members: list[Member], datamodule: PackedData, pack_dir: Path, form: str = "auto"
) -> dict[int, dict[str, Any]]:
    """One Lightning run of these members (continuing from their last.ckpt where they have one), tested, recorded.

    ``form``: fused, in_turn, or auto (:func:`choose_form`).
    """
    started = time.perf_counter()
    for index, member in enumerate(members):  # their positions in this run's module and optimizer
        member.index = index
    epochs_before = [len(member.module.history) for member in members]  # a resumed member's earlier epochs
    datamodule.use([(member.lab.data, member.lab.seed) for member in members])
    shared = members[0].lab
    trainer = lab_trainer(shared, pack_dir, [MemberCallbacks(members)], [], enable_checkpointing=False)
    form, ratio = choose_form(form, members, datamodule, trainer)
    where = {"id": pack_dir.name, "dir": str(pack_dir), "size": len(members), "form": form, "form_ratio": ratio}
    module = PackedClassifier(members, where, datamodule, form)
    resume_from = resume_checkpoint(members, pack_dir)
    for member in members:
        for logger in member.loggers:  # the whole config, resolved, as train() logs it
            logger.log_hyperparams(member.job.config)
    log.info(
        "training a pack of %d runs (%s) on %s%s",
        len(members),
        ", ".join(f"#{m.job.job}" for m in members),
        trainer.strategy.root_device,
        f", resuming from epoch {members[0].saved_epoch + 1}" if resume_from else "",
    )
    with recorded([m.job for m in members], [m.log_file for m in members]):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
        except SystemExit:  # Lightning's graceful stop on Ctrl-C (exit 1) or SIGTERM
            if trainer.state.status != TrainerStatus.INTERRUPTED:
                raise
            for member in members:
                print(f"{member.run_dir}: {record_interrupted(member.run_dir, member.job.overrides)}", file=sys.stderr)
            raise RunInterrupted(f"interrupted; rerun with resume=true to continue the {len(members)} runs") from None
        for member in members:  # tested with their best weights, as trainer.test(ckpt_path="best") does
            if member.best_path:
                best = torch.load(member.best_path, map_location="cpu", weights_only=True)
                member.module.load_state_dict(best["state_dict"])
        trainer.test(module, datamodule=datamodule, verbose=False)
    if resume_from is not None:
        resume_from.unlink(missing_ok=True)
    results = {}
    wall_s = round(time.perf_counter() - started, 2)
    # each member's share of the pack's time, by the epochs it trained in it (one that stopped early costs less)
    trained = [len(m.module.history) - before for m, before in zip(members, epochs_before, strict=True)]
    shares = [epochs / sum(trained) if sum(trained) else 1 / len(members) for epochs in trained]
    for member, share in zip(members, shares, strict=True):
        test = {name: float(value) for name, value in member.module.epoch_values("test", "test").items()}
        fingerprint = datamodule.preprocessing["data_fingerprint"]
        metrics = run_metrics(
            member.lab,
            member.module.history,
            test,
            member.module,
            trainer.strategy.root_device,
            fingerprint,
            diverged=member.stopped == "diverged",
        )
        metrics.update(
            wall_s=round(wall_s * share, 2),
            best_checkpoint=member.best_path,
            overrides=list(member.job.overrides),
            pack={**where, "member": member.index, "wall_s": wall_s},
        )
        finish(member.run_dir, member.loggers, member.steps, member.job.config, metrics, extra=member.extra)
        results[member.job.job] = outcome(metrics)
    return results
