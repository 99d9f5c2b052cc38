"""What the lab costs on top of the model: Lightning against a bare PyTorch loop, and the free wins.

    python scripts/bench.py                  # the table (about 8 minutes on 2 CPU cores)
    python scripts/bench.py --json           # one JSON object on stdout (the table goes to stderr)
    python scripts/bench.py --quick          # a smoke run, under a minute; its ratios are rough
    python scripts/bench.py trainer.enable_progress_bar=false   # extra overrides for every run
    python scripts/bench.py --packed 8 --downscales 16   # packed sweeps: 8 seeds as one pack (8 min on 2 cores)
    python scripts/bench.py --packed 8 data.image_size=64 --downscales 16   # where the model costs least (2 min)

All on the embedded data set at 256 px (generated into data/ on first use, like `python
train.py`), in one process, measurements interleaved (A B C, B C A, ...) because these machines
are noisy; ratios are of medians.

- ``lightning_vs_bare`` (``_aug``: with ``data.augment=true``): images/s of real training
  epochs, ``alexnet_lab.train.train`` as ``python train.py`` runs it (our datamodule, module,
  logging, checkpoints, progress bar, validation after each epoch), over images/s of a bare
  loop doing the same work (same batches gathered the same way, to_float, the same
  augmentation call, forward/backward/step of the same net and optimizer, the same validation
  pass; no metrics, hooks or checkpoints), per ``model.downscale``. An epoch runs from one
  epoch's start to the next's; each run's first epoch is a warm-up and not counted.
- ``floor_vs_bare``, ``lightning_vs_floor``, ``floor_step_overhead_ms``: a third contender,
  Lightning by itself (our datamodule and net, the module without its metrics or logging, a
  Trainer with no callbacks, loggers, checkpoints or progress bar): what Lightning's automatic
  loop costs on its own, and what the lab adds on top of it. ``lightning_vs_bare`` cannot pass
  ``floor_vs_bare`` without leaving Lightning's loop.
- ``pipeline_overhead``: the fraction of a Lightning epoch spent outside the train and
  validation steps' forward/backward/step (sampling, batching, augmentation, hooks, metrics,
  logging, checkpoints); ``pipeline_overhead_bare``: the same for the bare loop (its data work).
- ``epoch_overhead_ms``, ``step_overhead_ms`` (``_aug`` likewise): where a Lightning epoch's
  extra time over the bare loop's (``difference_ms``) goes: per step (hooks, closure, the
  module's metric updates), and per epoch by part (``data``: beyond the bare loop's same data
  work; ``checkpoint``, ``progress_bar``, ``metrics_and_logging``: the module's epoch ends;
  ``callbacks``: the other callbacks' hooks; ``validation_setup``; ``loop``: the rest, Lightning's
  own code between its profiling points), timed in one more run with Lightning's profiler
  hooks (``profiler_cost_ms``: how much slower that run was). ``steps_per_epoch``: train and
  validation batches; the parts plus ``step_overhead_ms`` times it make ``difference_ms``.
- ``channels_last_speedup``, ``bf16_speedup``: training steps per second (forward, backward,
  step on a fixed batch) with channels-last against channels-first, and with bf16 autocast
  (what ``trainer.precision=bf16-mixed`` does) against float32, both channels-last; on a GPU
  also ``cudnn_benchmark_speedup`` (``trainer.benchmark=true``), and with ``--compile``
  ``compile_speedup`` (torch.compile; on a GPU also mode reduce-overhead, i.e. CUDA graphs).
- ``preprocess_vs_naive``: ``build_cache`` against the notebook's one-image-at-a-time loop
  on the same raw files (functions of scripts/bench_preprocess.py).

With ``--packed K`` the bench measures packed sweeps instead (``hydra/sweeper=packed``), per
``model.downscale``: K runs that differ only in their seed (0 .. K-1) trained as one pack
(``alexnet_lab.packed.train_pack``, one Lightning run), against the same K runs one after
another (``alexnet_lab.train.train``, as above) and against K bare loops one after another (each
with its own seed), interleaved in rounds. Images/s are of training epochs, timed by the same
clock for all three (a packed epoch trains K members' images); each run's first epoch is a
warm-up. Per round, each contender's median epoch's images/s; ``packed_vs_bare`` and
``packed_vs_unpacked`` are the medians of the rounds' ratios, ``..._spread`` their [min, max]
over the rounds. ``images_per_s``, ``epoch_s`` (every measured epoch), ``wall_s`` (each round's
whole wall time: the unpacked runs' and the pack's setup and test too), ``packed_images_per_epoch``
and ``member_images_per_epoch`` (one run's), ``packed_runs_ok`` (the pack's run dirs whose
metrics.json says ok). Defaults: ``trainer.max_epochs`` 6 (``--quick``: 3), 4 rounds (``--rounds``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from pytorch_lightning.profilers import Profiler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # bench_preprocess and bench_help live next to this file

from bench_help import cpu_seconds_of_others

import alexnet_lab.packed
import alexnet_lab.train
from alexnet_lab.cli import keep_freed_host_memory, load
from alexnet_lab.config import LabConfig
from alexnet_lab.data.datamodule import ImageFolderDataModule, augment_in_chunks, upload_split
from alexnet_lab.data.preprocess import build_cache, scan_folder
from alexnet_lab.data.sampling import epoch_order, epoch_seed
from alexnet_lab.model import to_float
from alexnet_lab.module import AlexNetClassifier, optimizer_class
from alexnet_lab.packing import FORMS, Pack, PackJob, write_pack
from alexnet_lab.train import train

DOWNSCALES = (16, 8, 4)
#: --packed: epochs per run (the first a warm-up) and interleaved rounds, unless given
PACKED_EPOCHS, PACKED_ROUNDS = 6, 4


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- clocks


class StepClock:
    """Summed time inside steps: wall clock on the CPU, CUDA events on a GPU (no sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self._pairs: list[tuple[Any, Any]] = []
        self._started: Any = None

    def start(self) -> None:
        if self.cuda:
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record()
        else:
            self._started = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pairs.append((self._started, end))
        else:
            self.seconds += time.perf_counter() - self._started

    def total(self) -> float:
        """Seconds in steps so far (on a GPU: waits for the device, once)."""
        if self._pairs:
            torch.cuda.synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self._pairs) / 1000
            self._pairs.clear()
        return self.seconds


def page_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def wall(device: torch.device) -> float:
    """time.perf_counter() after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Epoch:
    seconds: float  # wall clock, one epoch's start to the next's (training and validation)
    step_seconds: float  # of which inside the train and validation steps' forward/backward/step
    images: int  # training images seen
    page_faults: int  # minor page faults of this process in the epoch (memory mapped afresh from the OS)
    started: float = 0.0  # time.perf_counter() at its start
    steps: int = 0  # training and validation batches

    @property
    def rate(self) -> float:
        return self.images / self.seconds


class EpochClock(pl.Callback):
    """Times every training epoch of a fit, and the steps inside it.

    A step is timed from the last callback's batch-start hook (:attr:`starter`, listed last) to
    the first one's batch-end hook (this clock, listed first), so the other callbacks' per-batch
    hooks count outside the steps, as in the bare loop.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.epochs: list[Epoch] = []
        self._epoch_start: float | None = None
        self._steps = StepClock(device)
        self._images = 0
        self._faults = 0
        self._count = 0
        self.starter = StepStart(self)

    def _close(self) -> None:
        now, faults = wall(self.device), page_faults()
        if self._epoch_start is not None:
            seconds, steps = now - self._epoch_start, self._steps.total()
            epoch = Epoch(seconds, steps, self._images, faults - self._faults, self._epoch_start, self._count)
            self.epochs.append(epoch)
        self._epoch_start, self._steps, self._images, self._faults = now, StepClock(self.device), 0, faults
        self._count = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def start_step(self, images: int) -> None:
        self._steps.start()
        self._images += images
        self._count += 1

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._steps.stop()

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._steps.stop()


class StepStart(pl.Callback):
    """The start of each step for an :class:`EpochClock`: batch hooks run after the batch reached the device
    and was augmented."""

    def __init__(self, clock: EpochClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, index: int) -> None:
        self.clock.start_step(len(batch[1]))

    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self.clock.start_step(0)


class HookTimes(Profiler):
    """Lightning's own profiling points, timed: where a Lightning epoch's time goes.

    Lightning wraps every hook, step, batch transfer and ``next()`` on a loader in its profiler
    (nested: an optimizer step inside a training batch inside the epoch). Kept: each action
    that no other action except the epoch itself encloses, with its start and seconds.
    """

    def __init__(self) -> None:
        super().__init__()
        self._open: list[tuple[str, float]] = []
        self.events: list[tuple[str, float, float]] = []  # (action, started, seconds)

    def start(self, action_name: str) -> None:
        self._open.append((action_name, time.perf_counter()))

    def stop(self, action_name: str) -> None:
        name, started = self._open.pop()  # Lightning's actions are context managers: last in, first out
        if all(outer == "run_training_epoch" for outer, _ in self._open) and name != "run_training_epoch":
            self.events.append((name, started, time.perf_counter() - started))

    def summary(self) -> str:
        return ""


#: the parts of a Lightning epoch, by Lightning's action names (the first that matches wins)
PARTS: dict[str, Callable[[str], bool]] = {
    "steps": lambda action: action == "run_training_batch" or action.endswith(".validation_step"),
    "data": lambda action: action.endswith(("_dataloader_next", "].val_next", ".batch_to_device", "_dataloader")),
    "checkpoint": lambda action: "Checkpoint{" in action or action == "save_checkpoint",  # Model-, LastCheckpoint
    "progress_bar": lambda action: "ProgressBar" in action,
    "metrics_and_logging": lambda action: action.startswith("[LightningModule]") and action.endswith("_epoch_end"),
    "callbacks": lambda action: action.startswith("[Callback]"),
    "validation_setup": lambda action: True,  # the module's, strategy's and datamodule's other hooks
}


def part_of(action: str) -> str:
    return next(part for part, matches in PARTS.items() if matches(action))


def parts_ms(epochs: list[Epoch], events: list[tuple[str, float, float]]) -> dict[str, float]:
    """Median milliseconds per epoch of each part of ``epochs`` (a profiled run's)."""
    per_epoch = []
    for epoch in epochs:
        parts = dict.fromkeys(PARTS, 0.0)
        for action, started, seconds in events:
            if epoch.started <= started < epoch.started + epoch.seconds:
                parts[part_of(action)] += seconds * 1000
        per_epoch.append(parts)
    return {part: statistics.median(parts[part] for parts in per_epoch) for part in PARTS}


#: what :func:`overhead_ms` returns, each a key of ``bench.py --json`` (per config, as the ratios)
OVERHEAD_KEYS = ("epoch_overhead_ms", "step_overhead_ms", "steps_per_epoch", "difference_ms", "profiler_cost_ms")


def overhead_ms(cfg: Any, work: Path, device: torch.device, light: list[Epoch], bare: list[Epoch]) -> dict[str, Any]:
    """Where the Lightning epochs' extra time over the bare ones goes: per step, and per epoch by part.

    ``step_overhead_ms``: a Lightning step (hooks, closure, the module's metric updates) minus a
    bare one, from the timed runs. ``epoch_overhead_ms``: each part's milliseconds per epoch in
    one more Lightning run with its actions timed (``data`` minus the bare loop's same data
    work), and ``loop``, the rest of the measured difference: Lightning's code between its
    profiling points (loop bookkeeping, logger writes). So the parts and ``step_overhead_ms``
    times ``steps_per_epoch`` add up to ``difference_ms``; the smaller ``loop``, the more of
    it is placed. ``profiler_cost_ms``: how much slower the timed run's epochs were.
    """
    hooks = HookTimes()
    profiled, _ = lightning_epochs(cfg, work, device, hooks)
    parts = parts_ms(profiled, hooks.events)

    def median_ms(epochs: list[Epoch], value: Callable[[Epoch], float]) -> float:
        return statistics.median(value(epoch) for epoch in epochs) * 1000

    steps = statistics.median(epoch.steps for epoch in bare)
    step_overhead = (median_ms(light, lambda e: e.step_seconds) - median_ms(bare, lambda e: e.step_seconds)) / steps
    difference = median_ms(light, lambda e: e.seconds) - median_ms(bare, lambda e: e.seconds)
    epoch_overhead = {part: ms for part, ms in parts.items() if part != "steps"}
    epoch_overhead["data"] -= median_ms(bare, lambda e: e.seconds - e.step_seconds)
    epoch_overhead["loop"] = difference - step_overhead * steps - sum(epoch_overhead.values())
    return {
        "epoch_overhead_ms": epoch_overhead,
        "step_overhead_ms": step_overhead,
        "steps_per_epoch": steps,
        "difference_ms": difference,
        "profiler_cost_ms": median_ms(profiled, lambda e: e.seconds) - median_ms(light, lambda e: e.seconds),
    }


# ----------------------------------------------------------------------------- the two contenders


def plain(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=["run_name=bench", *overrides])


def optimizer_of(cfg: Any, net: torch.nn.Module) -> torch.optim.Optimizer:
    """The module's optimizer for ``net``, without a schedule (the bench keeps the rate constant)."""
    optim = plain(cfg.optim)
    return optimizer_class(optim.pop("name"))(net.parameters(), **optim)


def lightning_epochs(
    cfg: Any, work: Path, device: torch.device, profiler: HookTimes | None = None
) -> tuple[list[Epoch], float]:
    """Train with ``alexnet_lab.train.train`` exactly as ``python train.py`` does, timing each epoch.

    Returns the epochs after the first, and the run's seconds outside its epochs (setup,
    test, final logging). With ``profiler``, Lightning's actions are timed too (slower).
    """
    clock = EpochClock(device)
    original, arguments = alexnet_lab.train.instantiate_group, alexnet_lab.train.trainer_arguments

    def with_clock(group: str, specs: Any) -> list[Any]:  # the one change: our clock among the callbacks
        return [clock, *original(group, specs), clock.starter] if group == "callbacks" else original(group, specs)

    def with_profiler(trainer: Any) -> dict[str, Any]:
        return {**arguments(trainer), "profiler": profiler} if profiler else arguments(trainer)

    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    started = time.perf_counter()
    quiet = io.StringIO()  # progress bars and Lightning's banners stay out of the table and the JSON
    with mock.patch.object(alexnet_lab.train, "instantiate_group", with_clock), contextlib.redirect_stdout(quiet):
        with (
            contextlib.redirect_stderr(quiet),
            mock.patch.object(alexnet_lab.train, "trainer_arguments", with_profiler),
        ):
            metrics = train(cfg, run_dir)
    total = time.perf_counter() - started
    shutil.rmtree(run_dir, ignore_errors=True)
    if metrics.get("status") != "ok" or len(clock.epochs) != cfg.trainer.max_epochs:
        raise SystemExit(f"bench: the Lightning run failed ({metrics.get('status')}):\n{quiet.getvalue()[-3000:]}")
    return clock.epochs[1:], total - sum(epoch.seconds for epoch in clock.epochs)


class FloorModule(AlexNetClassifier):
    """The lab's module with nothing of the lab around it: the same forward, loss and optimizer; no metrics or logs."""

    def _step(
        self, batch: tuple[torch.Tensor, torch.Tensor], key: str, logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.forward(batch[0]) if logits is None else logits
        return F.cross_entropy(logits, batch[1]), logits

    def on_train_epoch_end(self) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        pass


def floor_epochs(cfg: Any, dm: ImageFolderDataModule, device: torch.device) -> list[Epoch]:
    """Lightning's own floor: our datamodule and net in a Trainer with no callbacks, loggers, checkpoints or bar.

    What Lightning's automatic loop costs by itself over the bare loop; the lab cannot go below it
    without leaving that loop. Epochs after the first, as :func:`lightning_epochs`.
    """
    clock = EpochClock(device)
    module = FloorModule(plain(cfg.model), plain(cfg.optim), dm.classes, dm.in_channels)
    quiet = io.StringIO()  # Lightning's banners and warnings stay out of the table, as in lightning_epochs
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        trainer = pl.Trainer(
            **{key: cfg.trainer[key] for key in ("max_epochs", "accelerator", "devices", "precision")},
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
            callbacks=[clock, clock.starter],
            **{key: cfg.trainer[key] for key in ("limit_train_batches", "limit_val_batches") if key in cfg.trainer},
        )
        trainer.fit(module, datamodule=dm)
    return clock.epochs[1:]


@dataclass
class BareLoop:
    """The same work as a training epoch of ours, as a plain loop: no Lightning, metrics, hooks or checkpoints."""

    dm: ImageFolderDataModule
    cfg: Any
    device: torch.device
    net: torch.nn.Module = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        # the module only supplies the same net (channels-last) and optimizer; its steps are not used
        module = AlexNetClassifier(plain(self.cfg.model), plain(self.cfg.optim), self.dm.classes, self.dm.in_channels)
        self.net = module.net.to(self.device)
        self.optimizer = optimizer_of(self.cfg, self.net)
        precision = str(self.cfg.trainer.precision)
        if precision not in ("32-true", "32", "bf16-mixed"):
            raise SystemExit(f"bench: trainer.precision={precision}: the bare loop knows 32-true and bf16-mixed only")
        self.autocast = precision == "bf16-mixed"
        # on a GPU the data set lives there, as with data.on_device=auto
        self.resident: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.device.type == "cuda":
            for name, indices in (("train", self.dm.train_idx), ("val", self.dm.val_idx)):
                self.resident[name] = upload_split(self.dm.cache, indices, self.device)

    def _batches(self, split: str, order: np.ndarray, batch_size: int):
        cache, indices = self.dm.cache, self.dm.train_idx if split == "train" else self.dm.val_idx
        if split in self.resident:
            images, labels = self.resident[split]
            positions = np.empty(len(cache), dtype=np.int64)
            positions[indices] = np.arange(len(indices))
            rows = torch.from_numpy(positions[order]).to(self.device, non_blocking=True)
            for start in range(0, len(order), batch_size):
                yield images[rows[start : start + batch_size]], labels[rows[start : start + batch_size]]
            return
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield torch.from_numpy(cache.images[idx]), torch.from_numpy(cache.labels[idx])

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.net(images.contiguous(memory_format=torch.channels_last))

    def epoch(self, epoch: int) -> Epoch:
        dm, cache = self.dm, self.dm.cache
        steps = StepClock(self.device)
        started, faults = wall(self.device), page_faults()
        order = epoch_order(dm.train_idx, cache.labels, epoch=epoch, seed=dm.seed, balance=dm.data.balance)
        generator = torch.Generator(device=self.device).manual_seed(epoch_seed(dm.seed, epoch))
        self.net.train()
        count = 0
        for images, labels in self._batches("train", order, dm.data.batch_size):
            images, labels = to_float(images.to(self.device)), labels.to(self.device)
            if dm.data.augment:
                images = augment_in_chunks(images, dm.data.augmentation, generator)  # as the datamodule does
            steps.start()
            loss = F.cross_entropy(self._forward(images), labels)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            steps.stop()
            count += 1
        self.net.eval()
        with torch.no_grad():
            for images, labels in self._batches("val", dm.val_idx, dm.eval_batch_size_on(self.device)):
                images, labels = to_float(images.to(self.device)), labels.to(self.device)
                steps.start()
                F.cross_entropy(self._forward(images), labels)
                steps.stop()
                count += 1
        seconds = wall(self.device) - started
        return Epoch(seconds, steps.total(), len(order), page_faults() - faults, steps=count)


def compare(cfg: Any, dm: ImageFolderDataModule, work: Path, device: torch.device, rounds: int) -> dict[str, Any]:
    """Lightning (ours and by itself) and bare epochs of one config, interleaved; medians and their ratios."""
    light: list[Epoch] = []
    floor: list[Epoch] = []
    bare: list[Epoch] = []
    run_overhead: list[float] = []
    epochs = int(cfg.trainer.max_epochs)
    others_before, started = cpu_seconds_of_others(), time.perf_counter()
    sides = ["lightning", "floor", "bare"]
    for round_ in range(rounds):
        for side in sides[round_ % 3 :] + sides[: round_ % 3]:  # each side first in turn
            if side == "lightning":
                measured, overhead = lightning_epochs(cfg, work, device)
                light += measured
                run_overhead.append(overhead)
            elif side == "floor":
                pl.seed_everything(cfg.seed, verbose=False)
                floor += floor_epochs(cfg, dm, device)
            else:
                pl.seed_everything(cfg.seed, verbose=False)
                loop = BareLoop(dm, cfg, device)
                bare += [loop.epoch(e) for e in range(epochs)][1:]  # the first is a warm-up, as above
    light_rate = statistics.median(e.rate for e in light)
    floor_rate = statistics.median(e.rate for e in floor)
    bare_rate = statistics.median(e.rate for e in bare)
    overhead = overhead_ms(cfg, work, device, light, bare)
    return {
        "ratio": light_rate / bare_rate,
        "floor_ratio": floor_rate / bare_rate,  # Lightning by itself
        "ours_vs_floor": light_rate / floor_rate,  # what the lab adds to Lightning
        "floor_step_overhead_ms": (  # a step of Lightning by itself minus a bare one
            statistics.median(e.step_seconds for e in floor) - statistics.median(e.step_seconds for e in bare)
        )
        * 1000
        / statistics.median(e.steps for e in bare),
        "lightning_images_per_s": light_rate,
        "bare_images_per_s": bare_rate,
        "overhead": statistics.median(1 - e.step_seconds / e.seconds for e in light),
        "overhead_bare": statistics.median(1 - e.step_seconds / e.seconds for e in bare),
        "run_overhead_s": statistics.median(run_overhead),
        "epoch_s": {
            "lightning": [e.seconds for e in light],
            "floor": [e.seconds for e in floor],
            "bare": [e.seconds for e in bare],
        },
        "page_faults": {"lightning": [e.page_faults for e in light], "bare": [e.page_faults for e in bare]},
        "others_cores": (cpu_seconds_of_others() - others_before) / (time.perf_counter() - started),
        **overhead,
    }


# ----------------------------------------------------------------------------- packed sweeps


class PackedStepStart(StepStart):
    """:class:`StepStart` for a pack: a training batch is one (images, labels) per member, None where it has none."""

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, index: int) -> None:
        self.clock.start_step(sum(len(part[1]) for part in batch if part is not None))


def packed_epochs(
    cfgs: list[Any], work: Path, device: torch.device, form: str
) -> tuple[list[Epoch], float, int, dict[str, Any]]:
    """Train ``cfgs`` as one pack (``alexnet_lab.packed.train_pack``), as a packed sweep's job does; time its epochs.

    The pack file is the sweeper's (one job per config, each its own run dir; ``form``:
    hydra.sweeper.form). The one change: our clock among the callbacks of the pack's Trainer, listed
    as :func:`lightning_epochs` lists it. Returns the epochs after the first (each K members'
    images), the run's seconds outside its epochs (auto's timing of the forms among them), how many
    of its run dirs have a metrics.json that says ok, and the first one's ``pack`` (the form trained).
    """
    clock = EpochClock(device)
    clock.starter = PackedStepStart(clock)
    original = alexnet_lab.packed.lab_trainer

    def with_clock(lab: Any, root: Path, callbacks: list[Any], loggers: list[Any], **fixed: Any) -> pl.Trainer:
        return original(lab, root, [clock, *callbacks, clock.starter], loggers, **fixed)

    pack_dir = Path(tempfile.mkdtemp(prefix="pack-", dir=work))
    jobs = []
    for job, cfg in enumerate(cfgs):
        run_dir = pack_dir / f"{job}_bench"
        run_dir.mkdir()
        jobs.append(PackJob(job, str(run_dir), [f"seed={cfg.seed}"], plain(cfg)))
    pack_file = write_pack(Pack(jobs, max_size=len(jobs), form=form), pack_dir / "pack.json")
    started = time.perf_counter()
    quiet = io.StringIO()  # progress bars and Lightning's banners stay out of the table and the JSON
    with mock.patch.object(alexnet_lab.packed, "lab_trainer", with_clock), contextlib.redirect_stdout(quiet):
        with contextlib.redirect_stderr(quiet):
            outcomes = alexnet_lab.packed.train_pack(pack_file)
    total = time.perf_counter() - started
    ok, pack = 0, {}
    for job in jobs:
        metrics = Path(job.run_dir) / "metrics.json"
        found = json.loads(metrics.read_text()) if metrics.exists() else {}
        ok += found.get("status") == "ok"
        pack = pack or found.get("pack", {})
    shutil.rmtree(pack_dir, ignore_errors=True)
    statuses = [outcome.get("status") for outcome in outcomes.values()]
    if statuses != ["ok"] * len(cfgs) or len(clock.epochs) != cfgs[0].trainer.max_epochs:
        raise SystemExit(f"bench: the packed run failed ({statuses}):\n{quiet.getvalue()[-3000:]}")
    return clock.epochs[1:], total - sum(epoch.seconds for epoch in clock.epochs), ok, pack


def rate(epochs: list[Epoch]) -> float:
    """Images per second of these epochs: the median epoch's (robust to the odd epoch another process slowed)."""
    return statistics.median(epoch.rate for epoch in epochs)


def packed_compare(
    cfgs: list[Any], dm: ImageFolderDataModule, work: Path, device: torch.device, rounds: int, forms: list[str]
) -> dict[str, Any]:
    """A pack of ``cfgs`` in each form, the same runs one after another, and as many bare loops, interleaved."""
    sides = [*forms, "unpacked", "bare"]
    epochs: dict[str, list[list[Epoch]]] = {side: [] for side in sides}  # per round
    wall_s: dict[str, list[float]] = {side: [] for side in sides}  # per round: the side's whole time
    run_overhead: dict[str, list[float]] = {side: [] for side in [*forms, "unpacked"]}
    runs_ok, chosen = [], []
    others_before, started = cpu_seconds_of_others(), time.perf_counter()
    for round_ in range(rounds):
        shift = round_ % len(sides)
        for side in sides[shift:] + sides[:shift]:  # each side first in turn
            began = time.perf_counter()
            measured: list[Epoch] = []
            if side in forms:
                measured, overhead, ok, pack = packed_epochs(cfgs, work, device, side)
                run_overhead[side].append(overhead)
                runs_ok.append(ok)
                if side == "auto":
                    chosen.append({"form": pack.get("form"), "form_ratio": pack.get("form_ratio")})
            elif side == "unpacked":
                for cfg in cfgs:
                    found, overhead = lightning_epochs(cfg, work, device)
                    measured += found
                    run_overhead["unpacked"].append(overhead)
            else:
                for cfg in cfgs:
                    pl.seed_everything(cfg.seed, verbose=False)
                    seeded = copy.copy(dm)  # the same data and split; the run's own epoch order
                    seeded.seed = int(cfg.seed)
                    loop = BareLoop(seeded, cfg, device)
                    measured += [loop.epoch(e) for e in range(int(cfg.trainer.max_epochs))][1:]  # first: warm-up
            epochs[side].append(measured)
            wall_s[side].append(time.perf_counter() - began)
    rates = {side: [rate(found) for found in epochs[side]] for side in sides}
    found: dict[str, Any] = {}
    # per form against bare loops; against the in-turn pack; the default form (auto, else the first) unpacked
    default = "auto" if "auto" in forms else forms[0]
    pairs = [(form, "bare") for form in forms] + [(form, "in_turn") for form in forms if form != "in_turn"]
    pairs.append((default, "unpacked"))
    for side, against in pairs:
        ratios = [ours / theirs for ours, theirs in zip(rates[side], rates[against], strict=True)]
        key = f"{side}_vs_{against}"
        found[key], found[f"{key}_spread"] = statistics.median(ratios), [min(ratios), max(ratios)]
        found.setdefault("rounds", {})[key] = ratios
    # the names of issue 23's figures: the default form's
    for key in ("vs_bare", "vs_unpacked"):
        found[f"packed_{key}"], found[f"packed_{key}_spread"] = (
            found[f"{default}_{key}"],
            found[f"{default}_{key}_spread"],
        )
    return {
        **found,
        "images_per_s": {side: statistics.median(values) for side, values in rates.items()},
        "auto_chose": chosen,
        "packed_images_per_epoch": statistics.median(e.images for found in epochs[default] for e in found),
        "member_images_per_epoch": statistics.median(e.images for found in epochs["unpacked"] for e in found),
        "packed_runs_ok": min(runs_ok),
        "epoch_s": {side: [e.seconds for found in epochs[side] for e in found] for side in sides},
        "wall_s": wall_s,
        "run_overhead_s": {side: statistics.median(values) for side, values in run_overhead.items()},
        "others_cores": (cpu_seconds_of_others() - others_before) / (time.perf_counter() - started),
    }


def packed_vs_bare(
    args: argparse.Namespace, base: list[str], dm: ImageFolderDataModule, device: torch.device, work: Path
) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """Every downscale, --packed K seeds: the JSON keys, and rows for the table."""
    result: dict[str, Any] = {"packed": args.packed, "forms": args.forms}
    rows = []
    rounds = 1 if args.quick else (args.rounds or PACKED_ROUNDS)
    for downscale in args.downscales:
        log(
            f"packed ({', '.join(args.forms)}) vs unpacked vs bare: {args.packed} seeds, downscale {downscale},"
            f" {rounds} rounds ..."
        )
        switches = [f"model.downscale={downscale}"]
        cfgs = [compose([*base, *args.overrides, *switches, f"seed={seed}"]) for seed in range(args.packed)]
        dm.data.augment = bool(cfgs[0].data.augment)
        if args.wait_quiet:
            wait_for_quiet(args.wait_quiet)
        found = packed_compare(cfgs, dm, work, device, rounds, args.forms)
        name = f"d{downscale}"
        for key, value in found.items():
            if key != "others_cores":
                result.setdefault(key, {})[name] = value
        result.setdefault("other_processes_cores", {})[name] = found["others_cores"]
        rows.append((name, found))
    dm.data.augment = False
    return result, rows


def packed_table(result: dict[str, Any], rows: list[tuple[str, dict[str, Any]]]) -> str:
    data, quick = result["data"], " | QUICK (rough)" if result["quick"] else ""
    k, forms = result["packed"], result["forms"]
    sides = [*forms, "unpacked", "bare"]
    ratios = [
        key for key in rows[0][1] if "_vs_" in key and not key.endswith("_spread") and not key.startswith("packed_")
    ]
    lines = [
        f"{result['device']} | torch {result['torch']} | lightning {result['lightning']} | {data['train_images']} "
        f"train images, {data['image_size']} px, batch {data['batch_size']} | packed: {k} seeds{quick}",
        "images/s: " + ", ".join(sides) + "; ratios: median of the rounds (min-max)",
    ]
    for name, found in rows:
        images = found["images_per_s"]
        lines.append(f"{name:<5} images/s " + "  ".join(f"{side} {images[side]:.1f}" for side in sides))
        for key in ratios:
            low, high = found[f"{key}_spread"]
            lines.append(f"{'':<5} {key.replace('_vs_', ' / '):<18} {found[key]:.3f} ({low:.3f}-{high:.3f})")
        walls = ", ".join(f"{side} {statistics.median(values):.1f}" for side, values in found["wall_s"].items())
        chose = ", ".join(f"{c['form']} ({c['form_ratio']:.2f})" for c in found["auto_chose"] if c["form_ratio"])
        lines.append(
            f"{'':<5} a round's wall s (setup and test too): {walls}; packed epochs of"
            f" {found['packed_images_per_epoch']:.0f} images ({k} x {found['member_images_per_epoch']:.0f}),"
            f" {found['packed_runs_ok']} of {k} run dirs ok; others {found['others_cores']:.2f} cores"
            + (f"; auto chose {chose}" if chose else "")
        )
    lines.append(
        f"other processes used {result['other_processes_cores']['whole_run']:.2f} cores on average; "
        f"{result['seconds']:.0f} s in all"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- free wins


@dataclass(frozen=True)
class Variant:
    """One way to run the training step."""

    memory_format: torch.memory_format = torch.channels_last
    bf16: bool = False  # autocast to bfloat16, as trainer.precision=bf16-mixed does
    compile_mode: str | None = None  # torch.compile's mode; None: eager
    cudnn_benchmark: bool = False  # cuDNN picks its fastest kernels per shape (trainer.benchmark=true)


def step_seconds(
    dm: ImageFolderDataModule,
    cfg: Any,
    device: torch.device,
    downscale: int,
    variants: dict[str, Variant],
    steps: int,
    rounds: int,
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per training step (forward, backward, step on one fixed batch) of each variant, interleaved.

    Also returns each variant's first round (a warm-up that is not counted: compilation, kernel choice).
    """
    idx = dm.train_idx[: dm.data.batch_size]
    images = to_float(torch.from_numpy(dm.cache.images[idx]).to(device))  # (B, C, S, S) in [0, 1]
    labels = torch.from_numpy(dm.cache.labels[idx]).to(device)
    nets = {}
    for name, variant in variants.items():
        torch.manual_seed(0)
        model = {**plain(cfg.model), "downscale": downscale}
        module = AlexNetClassifier(model, plain(cfg.optim), dm.classes, dm.in_channels)
        net = module.net.to(device, memory_format=variant.memory_format)
        optimizer = optimizer_of(cfg, net)
        nets[name] = (torch.compile(net, mode=variant.compile_mode) if variant.compile_mode else net, optimizer)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    first: dict[str, float] = {}
    benchmark = torch.backends.cudnn.benchmark
    try:
        for round_ in range(rounds + 1):  # round 0 warms up
            for name, variant in variants.items():
                net, optimizer = nets[name]
                torch.backends.cudnn.benchmark = variant.cudnn_benchmark
                x = images.contiguous(memory_format=variant.memory_format)
                started = wall(device)
                for _ in range(steps):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.bf16):
                        loss = F.cross_entropy(net(x), labels)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                elapsed = (wall(device) - started) / steps
                if round_:
                    seconds[name].append(elapsed)
                else:
                    first[name] = elapsed * steps
    finally:
        torch.backends.cudnn.benchmark = benchmark
    return {name: statistics.median(values) for name, values in seconds.items()}, first


def free_wins(
    dm: ImageFolderDataModule, cfg: Any, device: torch.device, downscale: int, quick: bool, compile_: bool
) -> dict[str, Any]:
    """Training-step speed-ups: channels-last, bf16 autocast, (GPU) cuDNN benchmark, (--compile) torch.compile."""
    variants = {
        "channels_first": Variant(memory_format=torch.contiguous_format),
        "channels_last": Variant(),
        "bf16": Variant(bf16=True),
    }
    if device.type == "cuda":
        variants["cudnn_benchmark"] = Variant(cudnn_benchmark=True)
    steps, rounds = (2, 1) if quick else ((20, 3) if device.type == "cuda" else (4, 3))
    median, _ = step_seconds(dm, cfg, device, downscale, variants, steps=steps, rounds=rounds)
    base = median["channels_last"]  # our default
    found: dict[str, Any] = {
        "channels_last_speedup": median["channels_first"] / base,
        "bf16_speedup": base / median["bf16"],
    }
    if "cudnn_benchmark" in median:
        found["cudnn_benchmark_speedup"] = base / median["cudnn_benchmark"]
    if compile_:
        speedups, first_round_s = {}, {}
        for mode in ("default", "reduce-overhead") if device.type == "cuda" else ("default",):
            try:  # each against eager channels-last, measured alongside; reduce-overhead is CUDA graphs
                pair = {"eager": Variant(), mode: Variant(compile_mode=mode)}
                times, first = step_seconds(dm, cfg, device, downscale, pair, steps=steps, rounds=rounds)
                speedups[mode], first_round_s[mode] = times["eager"] / times[mode], first[mode]
            except Exception as err:  # noqa: BLE001  (a compiler failure is a finding, not a failed bench)
                speedups[mode] = f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        found["compile_speedup"], found["compile_first_round_s"] = speedups, first_round_s
    found["step_ms"] = {name: 1000 * value for name, value in median.items()}
    return found


def preprocess_speed(raw: Path, work: Path, size: int, files: int | None) -> dict[str, Any]:
    """Our preprocessing against the naive loop of scripts/bench_preprocess.py, on the same files."""
    try:
        from bench_preprocess import CPUS, naive_loop, timed
    except ImportError as err:
        return {"ratio": None, "note": f"scripts/bench_preprocess.py not importable: {err}"}
    if files is not None:  # every n-th file (both classes), copied into a raw folder of its own
        subset = work / "raw-subset"
        samples = scan_folder(raw).samples
        for raw_file, _ in samples[:: max(1, len(samples) // files)][:files]:
            target = subset / raw_file.path.relative_to(raw)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(raw_file.path, target)
        raw = subset
    paths = [raw_file.path for raw_file, _ in scan_folder(raw).samples]
    for path in paths:
        path.read_bytes()  # a warm page cache for both
    _, naive_s, _ = timed(naive_loop, paths, size)
    _, ours_s, _ = timed(build_cache, raw, work / "cache-bench", image_size=size, workers=CPUS, progress=False)
    return {
        "ratio": naive_s / ours_s,
        "files": len(paths),
        "naive_files_per_s": len(paths) / naive_s,
        "ours_files_per_s": len(paths) / ours_s,
        "workers": CPUS,
    }


# ----------------------------------------------------------------------------- the machine


def others_busy(seconds: float = 1.0) -> float:
    """Cores' worth of CPU that other processes used over the next ``seconds``."""
    before = cpu_seconds_of_others()
    time.sleep(seconds)
    return (cpu_seconds_of_others() - before) / seconds


def wait_for_quiet(max_wait_s: float, threshold: float = 0.2) -> float:
    """Wait (up to ``max_wait_s``) until other processes use under ``threshold`` cores; returns the last reading."""
    deadline = time.perf_counter() + max_wait_s
    busy = others_busy()
    while busy >= threshold and time.perf_counter() < deadline:
        log(f"  waiting: other processes use {busy:.1f} cores")
        time.sleep(4.0)
        busy = others_busy()
    return busy


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"cpu: {model}, {torch.get_num_threads()} threads"


def cpu_has_bf16() -> bool | None:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX); None where unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


# ----------------------------------------------------------------------------- main


def rounded(value: Any, digits: int = 3) -> Any:
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item, digits) for item in value]
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table on stderr)")
    parser.add_argument("--quick", action="store_true", help="a smoke run, under a minute: few batches, rough ratios")
    parser.add_argument("--out", type=Path, help="also write the JSON object to this file")
    parser.add_argument("--downscales", type=int, nargs="+", default=list(DOWNSCALES), help="model.downscale values")
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"interleaved rounds of the three contenders (3; --packed: {PACKED_ROUNDS}; --quick: 1)",
    )
    parser.add_argument(
        "--packed",
        type=int,
        metavar="K",
        help=f"packed sweeps instead: K seeds as one pack against K runs and K bare loops"
        f" (trainer.max_epochs={PACKED_EPOCHS}, --quick 3, unless given)",
    )
    parser.add_argument(
        "--forms",
        type=lambda text: text.split(","),
        default=list(FORMS),
        help=f"--packed: the pack's forms to time, each a contender (default {','.join(FORMS)}: hydra.sweeper.form)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also measure torch.compile (and CUDA graphs on a GPU) on the training step",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each measurement, wait up to S s for other processes to go quiet",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (as for train.py)")
    return parser.parse_args()


def lightning_vs_bare(
    args: argparse.Namespace, base: list[str], dm: ImageFolderDataModule, device: torch.device, work: Path
) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """Every downscale, augmentation off and on: the JSON keys, and rows for the table."""
    result: dict[str, Any] = {}
    rows = []
    for augment in (False, True):
        suffix = "_aug" if augment else ""
        for downscale in args.downscales:
            log(f"lightning vs bare: downscale {downscale}, augment {augment} ...")
            switches = [f"model.downscale={downscale}", f"data.augment={str(augment).lower()}"]
            cfg = compose([*base, *args.overrides, *switches])
            dm.data.augment = augment
            if args.wait_quiet:
                wait_for_quiet(args.wait_quiet)
            found = compare(cfg, dm, work, device, rounds=1 if args.quick else (args.rounds or 3))
            name = f"d{downscale}"
            values = {
                "lightning_vs_bare": found["ratio"],
                "floor_vs_bare": found["floor_ratio"],
                "lightning_vs_floor": found["ours_vs_floor"],
                "floor_step_overhead_ms": found["floor_step_overhead_ms"],
                "pipeline_overhead": found["overhead"],
                "pipeline_overhead_bare": found["overhead_bare"],
                "images_per_s": {"lightning": found["lightning_images_per_s"], "bare": found["bare_images_per_s"]},
                "run_overhead_s": found["run_overhead_s"],
                **{key: found[key] for key in OVERHEAD_KEYS},
            }
            for key, value in values.items():
                result.setdefault(f"{key}{suffix}", {})[name] = value
            result.setdefault("epoch_s", {})[f"{name}{suffix}"] = found["epoch_s"]
            result.setdefault("page_faults_per_epoch", {})[f"{name}{suffix}"] = found["page_faults"]
            result.setdefault("other_processes_cores", {})[f"{name}{suffix}"] = found["others_cores"]
            rows.append((f"{name}{' aug' if augment else ''}", found))
    dm.data.augment = False
    return result, rows


def table(result: dict[str, Any], rows: list[tuple[str, dict[str, Any]]]) -> str:
    data, quick = result["data"], " | QUICK (rough)" if result["quick"] else ""
    lines = [
        f"{result['device']} | torch {result['torch']} | lightning {result['lightning']} | {data['train_images']} "
        f"train images, {data['image_size']} px, batch {data['batch_size']}{quick}",
        f"{'run':<9} {'lightning img/s':>15} {'bare img/s':>11} {'ratio':>6} {'overhead':>9} {'bare overhead':>14}"
        f" {'run setup s':>12} {'others cores':>13}",
    ]
    for name, found in rows:
        lines.append(
            f"{name:<9} {found['lightning_images_per_s']:>15.1f} {found['bare_images_per_s']:>11.1f}"
            f" {found['ratio']:>6.3f} {found['overhead']:>9.1%} {found['overhead_bare']:>14.1%}"
            f" {found['run_overhead_s']:>12.1f} {found['others_cores']:>13.2f}"
        )
        parts = ", ".join(f"{part} {ms:.1f}" for part, ms in found["epoch_overhead_ms"].items())
        lines.append(
            f"{'':<9} ours - bare = {found['difference_ms']:.1f} ms per epoch: {parts} ms,"
            f" and {found['step_overhead_ms']:.2f} ms x {found['steps_per_epoch']:.0f} steps"
        )
        lines.append(
            f"{'':<9} Lightning alone / bare {found['floor_ratio']:.3f}"
            f" ({found['floor_step_overhead_ms']:.2f} ms a step); ours / Lightning alone {found['ours_vs_floor']:.3f}"
        )
    for key in ("channels_last_speedup", "bf16_speedup", "cudnn_benchmark_speedup"):
        if key in result:
            lines.append(f"{key:<24} " + "  ".join(f"{name} x{value:.2f}" for name, value in result[key].items()))
    for name, modes in result.get("compile_speedup", {}).items():
        shown = "  ".join(f"{mode} x{x:.2f}" if isinstance(x, float) else f"{mode} {x}" for mode, x in modes.items())
        lines.append(f"{'compile_speedup':<24} {name} {shown}")
    ratio = result["preprocess_vs_naive"]
    shown = f"x{ratio:.2f}" if ratio is not None else f"n/a: {result['preprocess'].get('note', '')}"
    lines.append(f"{'preprocess_vs_naive':<24} {shown}")
    lines.append(
        f"other processes used {result['other_processes_cores']['whole_run']:.2f} cores on average; "
        f"{result['seconds']:.0f} s in all"
    )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    started, others_started = time.perf_counter(), cpu_seconds_of_others()
    for name in ("pytorch_lightning", "lightning.pytorch"):  # its banners would fill the table
        logging.getLogger(name).setLevel(logging.WARNING)
    keep_freed_host_memory()  # process-wide, as every command sets it up: the bare loop gets it too

    # the real default data set, where `python train.py` keeps it (git-ignored data/)
    base = [
        f"data.raw_dir={ROOT / 'data/synthetic/raw'}",
        f"data.cache_dir={ROOT / 'data/cache'}",
        "data.progress=false",
        f"trainer.max_epochs={PACKED_EPOCHS if args.packed and not args.quick else 3}",
    ]
    if args.packed is not None and args.packed < 2:
        raise SystemExit(f"bench: --packed {args.packed}: a pack has 2 or more runs")
    if not args.forms or set(args.forms) - set(FORMS):
        raise SystemExit(f"bench: --forms {','.join(args.forms)}: each one of {', '.join(FORMS)}")
    if args.quick:  # a few batches per epoch: the same code paths, rough numbers
        base += ["+trainer.limit_train_batches=6", "+trainer.limit_val_batches=1"]
    cfg = compose([*base, *args.overrides])
    if int(cfg.trainer.max_epochs) < 2:  # the first epoch of every run is a warm-up, not counted
        raise SystemExit(f"bench: trainer.max_epochs={cfg.trainer.max_epochs}: use 2 or more (default 3)")
    log("data: preparing the embedded data set (generated and preprocessed on first use) ...")
    dm = ImageFolderDataModule(load(cfg, LabConfig).data, seed=cfg.seed)
    dm.prepare_data()
    dm.setup("fit")
    cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda" if cuda else "cpu")
    if args.quick:  # the bare loop sees as many batches as Lightning's limits let through
        dm.train_idx = dm.train_idx[: 6 * dm.data.batch_size]
        dm.val_idx = dm.val_idx[: dm.eval_batch_size_on(device)]

    result: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "data": {
            "train_images": len(dm.train_idx),
            "val_images": len(dm.val_idx),
            "image_size": dm.data.image_size,
            "batch_size": dm.data.batch_size,
            "precision": str(cfg.trainer.precision),
        },
    }
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    if args.packed:
        try:
            found, rows = packed_vs_bare(args, base, dm, device, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        result.update(found)
        finish(args, result, started, others_started, lambda done: packed_table(done, rows))
        return
    try:
        found, rows = lightning_vs_bare(args, base, dm, device, work)
        result.update(found)
        for downscale in args.downscales:
            log(f"free wins of the training step: downscale {downscale} ...")
            if args.wait_quiet:
                wait_for_quiet(args.wait_quiet)
            for key, value in free_wins(dm, cfg, device, downscale, args.quick, args.compile).items():
                result.setdefault(key, {})[f"d{downscale}"] = value
        result["cpu_bf16"] = cpu_has_bf16() if device.type == "cpu" else None
        log("preprocessing vs the naive loop ...")
        preprocess = preprocess_speed(
            Path(cfg.data.raw_dir), work, dm.data.image_size, files=200 if args.quick else None
        )
        result["preprocess_vs_naive"] = preprocess.pop("ratio")
        result["preprocess"] = preprocess
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.compile:
        result["notes"] = ["torch.compile not measured (--compile measures it; PITFALLS.md: slower on CPU here)"]
    finish(args, result, started, others_started, lambda done: table(done, rows))


def finish(
    args: argparse.Namespace,
    result: dict[str, Any],
    started: float,
    others_started: float,
    tabled: Callable[[dict[str, Any]], str],
) -> None:
    """The run's seconds and the other processes' load into ``result``; the table, the JSON, the --out file."""
    result["seconds"] = time.perf_counter() - started
    # cores' worth of CPU that other processes used while the bench ran: above ~0.2 its ratios are noisy
    others = (cpu_seconds_of_others() - others_started) / result["seconds"]
    result.setdefault("other_processes_cores", {})["whole_run"] = others
    result = rounded(result)

    print(tabled(result), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
