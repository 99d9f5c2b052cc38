"""LightningDataModule over the uint8 cache: stratified split, per-epoch sampling, device-side augmentation.

Batches leave the loader as uint8 ``(B, C, S, S)`` and are turned into float ``[0, 1]``
(and augmented, when training with ``augment``) only after they reach the device, so the
host only ever slices the memory-mapped cache. On a GPU (``on_device``) even that goes: each
split is uploaded once and batches are gathered on the device from an order uploaded once per
epoch, so a training step never waits for the host.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from alexnet_lab.data.augment import AugmentConfig, augment_batch, to_float
from alexnet_lab.data.preprocess import Cache, DataError, build_cache
from alexnet_lab.data.sampling import EpochBatchSampler, epoch_seed, stratified_split
from alexnet_lab.data.synthetic import ensure_from_config

log = logging.getLogger(__name__)

#: Images augmented at a time on a CPU. A whole 64-image batch's sampling grid (64 x 256 x 256 x 2
#: floats, 33 MB) is above glibc's mmap threshold, so every batch maps it afresh from the OS and
#: page-faults it in: 16 at a time is 1.4-2x faster here (scripts/bench.py), with the same numbers.
CPU_AUGMENT_CHUNK = 16


class CacheBatches(Dataset):
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
    return torch.cat([augment_batch(chunk, config, generator) for chunk in images.split(CPU_AUGMENT_CHUNK)])


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

    With ``synthetic`` set (``{"seed": ..., "counts": {...}, "placeholders": ..., "broken": ...}``)
    the embedded data set is generated into ``raw_dir`` first if it is not there yet.
    ``discard`` (``data.discard``: min_copies, known_digests, min_std, max_image_pixels) says
    which files preprocessing throws away; None = the defaults of `DiscardRules`.
    ``on_device``: hold each split on the trainer's device and gather batches there
    (:class:`DeviceBatches`): ``"auto"`` on a CUDA device when the cache takes at most half of
    its free memory, ``True`` on any device (a CPU too: the same batches, for tests), ``False``
    never (batches sliced from the memory-mapped cache on the host, then copied).
    """

    def __init__(
        self,
        raw_dir: str | Path,
        cache_dir: str | Path,
        image_size: int = 256,
        grayscale: bool = True,
        balance: bool = False,
        augment: bool = False,
        augmentation: Mapping[str, Any] | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        seed: int = 0,
        workers: int | None = None,
        progress: bool = True,
        synthetic: Mapping[str, Any] | None = None,
        eval_batch_size: int | None = None,
        discard: Mapping[str, Any] | None = None,
        on_device: bool | str = "auto",
    ) -> None:
        super().__init__()
        if on_device not in ("auto", True, False):
            raise ValueError(f"data.on_device={on_device!r}: must be auto, true or false")
        self.raw_dir, self.cache_dir = Path(raw_dir).expanduser(), Path(cache_dir).expanduser()
        self.image_size, self.grayscale = image_size, grayscale
        self.balance, self.augment = balance, augment
        self.augment_config = AugmentConfig(**(augmentation or {}))
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size  # None: chosen by device, see `eval_batch_size_on`
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.seed, self.workers, self.progress = seed, workers, progress
        self.synthetic = dict(synthetic) if synthetic else None
        self.discard = dict(discard) if discard else None
        self.on_device = on_device
        self.cache: Cache | None = None
        self._device_splits: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (split, device) -> data
        self._device_choice: dict[str, bool] = {}  # device -> whether the splits are held there

    def prepare_data(self) -> None:
        """Generate the embedded data set if needed, and build (or find) the cache."""
        self._load()

    def _load(self) -> Cache:
        if self.cache is None:
            if self.synthetic is not None:
                ensure_from_config(self.raw_dir, self.synthetic, progress=self.progress)
            self.cache = build_cache(
                self.raw_dir,
                self.cache_dir,
                image_size=self.image_size,
                grayscale=self.grayscale,
                workers=self.workers,
                progress=self.progress,
                discard=self.discard,
            )
        return self.cache

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_idx"):
            return
        cache = self._load()
        self.train_idx, self.val_idx, self.test_idx = stratified_split(
            cache.labels, self.val_fraction, self.test_fraction, self.split_seed
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

    def eval_batch_size_on(self, device: torch.device) -> int:
        """Images per validation/test batch: ``eval_batch_size`` if given, else by device.

        On a GPU 4 x ``batch_size`` (no gradients are kept, and fewer, larger launches are
        faster); on a CPU ``batch_size``, since larger batches' activations are mapped afresh
        from the OS on every batch there (a 1.3-1.5x slower validation pass at 4x, measured).
        """
        if self.eval_batch_size is not None:
            return self.eval_batch_size
        return 4 * self.batch_size if device.type == "cuda" else self.batch_size

    def _trainer_device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _batch_device(self) -> torch.device | None:
        """The device that holds the splits and gathers batches (``on_device``), or None: the host path.

        Decided once per device, before anything is uploaded, so that every split goes the same way.
        """
        device = self._trainer_device()
        if self.on_device is not True and (self.on_device is False or device.type != "cuda"):
            return None
        key = str(device)
        if key not in self._device_choice:
            fits = True
            if self.on_device == "auto":
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

    def _loader(self, split: str, indices: np.ndarray, *, train: bool) -> DataLoader | DeviceBatches:
        cache = self._load()
        # data-parallel: each process takes its share; batch_size stays the batch of one optimizer step
        replicas = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if train:
            batch_size = max(1, self.batch_size // replicas)
        else:
            batch_size = self.eval_batch_size_on(self._trainer_device())
        sampler = EpochBatchSampler(
            indices,
            cache.labels,
            batch_size,
            shuffle=train,
            balance=self.balance and train,
            seed=self.seed,
            num_replicas=replicas,
            rank=rank,
        )
        device = self._batch_device()
        if device is not None:
            key = (split, str(device))
            if key not in self._device_splits:  # uploaded once, kept for later fits and tests
                self._device_splits[key] = upload_split(cache, indices, device)
            positions = np.full(len(cache), -1, dtype=np.int64)  # cache index -> row of the split on the device
            positions[indices] = np.arange(len(indices))
            return DeviceBatches(*self._device_splits[key], positions, sampler)
        # batch_size=None: the sampler hands over whole batches, the dataset slices them at once
        return DataLoader(CacheBatches(cache), sampler=sampler, batch_size=None, num_workers=0)

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("train", self.train_idx, train=True)

    def val_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("val", self.val_idx, train=False)

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("test", self.test_idx, train=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        images = to_float(images)  # (B, C, S, S) uint8 -> float in [0, 1], on the device
        if self.augment and self.trainer is not None and self.trainer.training:
            images = augment_in_chunks(images, self.augment_config, self._augment_generator(images.device))
        return images, labels

    def _augment_generator(self, device: torch.device) -> torch.Generator:
        """The augmentations' own generator, seeded by (seed, epoch) on the batch's device.

        An epoch's augmentations then depend on nothing that ran before it, so a run resumed
        from an end-of-epoch checkpoint draws exactly what the uninterrupted run drew.
        """
        key = (self.trainer.current_epoch, str(device))
        if getattr(self, "_generator_key", None) != key:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(epoch_seed(self.seed, key[0]))
            self._generator_key = key
        return self._generator
