"""LightningDataModule over the uint8 cache: stratified split, per-epoch sampling, device-side augmentation.

Batches leave the loader as uint8 ``(B, C, S, S)`` and are turned into float ``[0, 1]``
(and augmented, when training with ``augment``) only after they reach the device, so the
host only ever slices the memory-mapped cache. On a GPU (``on_device``) even that goes: each
split is uploaded once and batches are gathered on the device from an order uploaded once per
epoch, so a training step never waits for the host.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset

from alexnet_lab.data.augment import augment_batch
from alexnet_lab.data.preprocess import PREPROCESS_VERSION, Cache, build_cache
from alexnet_lab.data.sampling import EpochBatchSampler, epoch_seed, stratified_split
from alexnet_lab.data.synthetic import ensure_synthetic
from alexnet_lab.errors import DataError
from alexnet_lab.model import to_float

if TYPE_CHECKING:
    from alexnet_lab.config import AugmentConfig, DataConfig

log = logging.getLogger(__name__)

#: Images augmented at a time on a CPU. A whole 64-image batch's sampling grid (64 x 256 x 256 x 2
#: floats, 33 MB) is above glibc's mmap threshold, so every batch maps it afresh from the OS and
#: page-faults it in: 16 at a time is 1.4-2x faster here (scripts/bench.py), with the same numbers.
CPU_AUGMENT_CHUNK = 16

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images (B, C, S, S), int64 labels (B,)


class CacheBatches(Dataset[Batch]):
    """Whole batches from the memory-mapped cache: ``dataset[list_of_indices]`` -> (uint8 images, labels)."""

    def __init__(self, cache: Cache) -> None:
        self.images, self.labels = cache.images, cache.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(batch)
        # one fancy-indexed read of the memmap: (B, C, S, S) uint8, copied into RAM
        return torch.from_numpy(self.images[idx]), torch.from_numpy(self.labels[idx])


class DeviceBatches:
    """Batches gathered on the device from a device-resident copy of one split: an iterable for Lightning.

    ``images`` (uint8 (n, C, S, S)) and ``labels`` (int64 (n,)) hold the split's rows on the
    device; ``positions`` maps a cache index to its row there. Each epoch the order comes from
    ``sampler`` (the host path's own :class:`EpochBatchSampler`, balanced and rank-aware), is
    uploaded once, and every batch is one gather on the device: the same batches as the host
    path for the same seed, with no host work and no host-device copy per step. ``sampler``
    is public so that Lightning calls its ``set_epoch`` before each epoch.
    """

    batch_sampler = None  # Lightning looks for one next to ``sampler``

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, positions: np.ndarray, sampler: EpochBatchSampler
    ) -> None:
        self.images, self.labels, self.positions, self.sampler = images, labels, positions, sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.positions[self.sampler._order()]  # (n,) rows of this split, host
        rows = torch.from_numpy(order).to(self.images.device, non_blocking=True)  # one upload per epoch
        size = self.sampler.batch_size
        for start in range(0, len(order), size):
            batch = rows[start : start + size]
            yield self.images[batch], self.labels[batch]  # (B, C, S, S) uint8, (B,) int64


def augment_in_chunks(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """:func:`augment_batch`, on a CPU ``CPU_AUGMENT_CHUNK`` images at a time; float (B, C, S, S) -> same.

    The result is the whole-batch one, bit for bit: the chunks draw their random numbers from
    the same generator in order, and every image is transformed on its own. On a GPU the
    batch goes in one piece (fewer kernel launches; memory there is not handed back per call).
    """
    if images.device.type != "cpu" or len(images) <= CPU_AUGMENT_CHUNK:
        return augment_batch(images, config, generator)
    return torch.cat([augment_batch(chunk, config, generator) for chunk in torch.split(images, CPU_AUGMENT_CHUNK)])


def upload_split(
    cache: Cache, indices: np.ndarray, device: torch.device, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's uint8 images and int64 labels as tensors on ``device``, in ``indices`` order.

    Copied ``chunk`` images at a time, so the host never holds more than one chunk of a
    memory-mapped cache that may be larger than RAM.
    """
    images = torch.empty((len(indices), *cache.images.shape[1:]), dtype=torch.uint8, device=device)
    for start in range(0, len(indices), chunk):
        part = np.ascontiguousarray(cache.images[indices[start : start + chunk]])
        images[start : start + len(part)] = torch.from_numpy(part).to(device)
    return images, torch.from_numpy(cache.labels[indices]).to(device)


class ImageFolderDataModule(pl.LightningDataModule):
    """Raw folder -> cache -> stratified splits -> uint8 batches -> float (augmented) on the device.

    Built from the ``data`` config group (:class:`~alexnet_lab.config.DataConfig`). With
    ``data.synthetic`` set, the embedded data set is generated into ``raw_dir`` first if it is
    not there yet. ``data.on_device``: hold each split on the trainer's device and gather
    batches there (:class:`DeviceBatches`): ``"auto"`` on a CUDA device when the cache takes at
    most half of its free memory, ``True`` on any device (a CPU too: the same batches, for
    tests), ``False`` never (batches sliced from the memory-mapped cache on the host, then
    copied). ``seed`` fixes each epoch's sampling and augmentation; ``eval_batch_size`` None
    means chosen by device (:meth:`eval_batch_size_on`).
    """

    def __init__(self, data: DataConfig, seed: int = 0, eval_batch_size: int | None = None) -> None:
        super().__init__()
        self.data, self.seed, self.eval_batch_size = data, seed, eval_batch_size
        self.raw_dir = Path(data.raw_dir).expanduser()
        self.cache: Cache | None = None
        self._device_splits: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (split, device) -> data
        self._device_choice: dict[str, bool] = {}  # device -> whether the splits are held there
        self._generators: dict[int, tuple[tuple[int, int, str], torch.Generator]] = {}  # augmentation, per member

    def prepare_data(self) -> None:
        """Generate the embedded data set if needed, and build (or find) the cache."""
        self._load()

    def _load(self) -> Cache:
        if self.cache is None:
            data = self.data
            if data.synthetic is not None:
                ensure_synthetic(self.raw_dir, data.synthetic, progress=data.progress)
            self.cache = build_cache(
                self.raw_dir,
                Path(data.cache_dir).expanduser(),
                image_size=data.image_size,
                grayscale=data.grayscale,
                workers=data.workers,
                progress=data.progress,
                discard=data.discard,
            )
        return self.cache

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_idx"):
            return
        cache = self._load()
        self.train_idx, self.val_idx, self.test_idx = stratified_split(
            cache.labels, self.data.val_fraction, self.data.test_fraction, self.data.split_seed
        )
        for name, split in (("train", self.train_idx), ("val", self.val_idx)):
            missing = set(range(len(cache.classes))) - set(cache.labels[split].tolist())
            if missing:
                names = ", ".join(cache.classes[i] for i in sorted(missing))
                raise DataError(
                    f"data.raw_dir={self.raw_dir}: the {name} split has no image of class {names}; "
                    "add images (at least 3 per class) or change data.val_fraction / data.test_fraction"
                )

    @property
    def classes(self) -> list[str]:
        return self._load().classes

    @property
    def in_channels(self) -> int:
        return int(self._load().images.shape[1])

    @property
    def preprocessing(self) -> dict[str, Any]:
        """How the images were preprocessed, as plain data that a checkpoint stores (loadable with ``weights_only``).

        So a checkpoint alone is enough to preprocess new images the same way, and an evaluation
        can tell whether the data changed since.
        """
        cache = self._load()
        return {
            "image_size": cache.image_size,
            "grayscale": cache.grayscale,
            "preprocess_version": PREPROCESS_VERSION,
            "data_fingerprint": cache.fingerprint,  # which files and settings it was trained on
        }

    def eval_batch_size_on(self, device: torch.device) -> int:
        """Images per validation/test batch: ``eval_batch_size`` if given, else by device.

        On a GPU 4 x ``batch_size`` (no gradients are kept, and fewer, larger launches are
        faster); on a CPU ``batch_size``, since larger batches' activations are mapped afresh
        from the OS on every batch there (a 1.3-1.5x slower validation pass at 4x, measured).
        """
        if self.eval_batch_size is not None:
            return self.eval_batch_size
        return 4 * self.data.batch_size if device.type == "cuda" else self.data.batch_size

    def _trainer_device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _batch_device(self) -> torch.device | None:
        """The device that holds the splits and gathers batches (``on_device``), or None: the host path.

        Decided once per device, before anything is uploaded, so that every split goes the same way.
        """
        device, on_device = self._trainer_device(), self.data.on_device
        if on_device is not True and (on_device is False or device.type != "cuda"):
            return None
        key = str(device)
        if key not in self._device_choice:
            fits = True
            if on_device == "auto":
                free_bytes, _ = torch.cuda.mem_get_info(device)
                fits = self._load().images.nbytes <= free_bytes // 2  # leave half for the model and activations
                if not fits:
                    log.warning(
                        "data.on_device=auto: the cache (%.1f GiB) takes more than half of the free memory of %s; "
                        "batches come from the host instead",
                        self._load().images.nbytes / 2**30,
                        device,
                    )
            self._device_choice[key] = fits
        return device if self._device_choice[key] else None

    def _loader(self, split: str, indices: np.ndarray, *, train: bool) -> DataLoader[Batch] | DeviceBatches:
        cache = self._load()
        # data-parallel: each process takes its share; batch_size stays the batch of one optimizer step
        replicas = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if train:
            batch_size = max(1, self.data.batch_size // replicas)
        else:
            batch_size = self.eval_batch_size_on(self._trainer_device())
        sampler = EpochBatchSampler(
            indices,
            cache.labels,
            batch_size,
            shuffle=train,
            balance=self.data.balance and train,
            seed=self.seed,
            num_replicas=replicas,
            rank=rank,
        )
        # debug=overfit (Lightning sets the Trainer's overfit_batches outside its __init__, hence getattr)
        if split != "test" and getattr(self.trainer, "overfit_batches", False):
            # the first epoch's batches, every epoch, in order: Lightning's overfit_batches insists on a
            # SequentialSampler, so the batches become the items (the Subset's "indices" are index lists)
            fixed = Subset(CacheBatches(cache), list(sampler))  # type: ignore[arg-type]
            return DataLoader(fixed, sampler=SequentialSampler(fixed), batch_size=None, num_workers=0)
        device = self._batch_device()
        if device is not None:
            return DeviceBatches(*self.on_device(split, indices, device), sampler)
        # batch_size=None: the sampler hands over whole batches, the dataset slices them at once
        return DataLoader(CacheBatches(cache), sampler=sampler, batch_size=None, num_workers=0)

    def on_device(
        self, split: str, indices: np.ndarray, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """The split's images and labels on ``device`` (uploaded once, kept for later fits and tests), and
        ``positions``: cache index -> row of the split there."""
        key = (split, str(device))
        if key not in self._device_splits:
            self._device_splits[key] = upload_split(self._load(), indices, device)
        positions = np.full(len(self._load()), -1, dtype=np.int64)
        positions[indices] = np.arange(len(indices))
        return (*self._device_splits[key], positions)

    def train_dataloader(self) -> DataLoader[Batch] | DeviceBatches:
        return self._loader("train", self.train_idx, train=True)

    def val_dataloader(self) -> DataLoader[Batch] | DeviceBatches:
        return self._loader("val", self.val_idx, train=False)

    def test_dataloader(self) -> DataLoader[Batch] | DeviceBatches:
        return self._loader("test", self.test_idx, train=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        images = to_float(images)  # (B, C, S, S) uint8 -> float in [0, 1], on the device
        if self.data.augment and self.trainer is not None and self.trainer.training:
            images = augment_in_chunks(images, self.data.augmentation, self._augment_generator(images.device))
        return images, labels

    def _augment_generator(self, device: torch.device, seed: int | None = None, member: int = 0) -> torch.Generator:
        """The augmentations' own generator, seeded by (seed, epoch) on the batch's device.

        An epoch's augmentations then depend on nothing that ran before it, so a run resumed
        from an end-of-epoch checkpoint draws exactly what the uninterrupted run drew. A packed
        datamodule keeps one per ``member``, each with that member's ``seed``.
        """
        assert self.trainer is not None  # augmentation runs in training only
        key = (self.seed if seed is None else seed, self.trainer.current_epoch, str(device))
        held = self._generators.get(member)
        if held is None or held[0] != key:
            generator = torch.Generator(device=device)
            generator.manual_seed(epoch_seed(key[0], key[1]))
            held = self._generators[member] = (key, generator)
        return held[1]
