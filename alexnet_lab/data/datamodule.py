"""LightningDataModule over the uint8 cache: stratified split, per-epoch sampling, device-side augmentation.

Batches leave the loader as uint8 ``(B, C, S, S)`` and are turned into float ``[0, 1]``
(and augmented, when training with ``augment``) only after they reach the device, so the
host only ever slices the memory-mapped cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from alexnet_lab.data.augment import AugmentConfig, augment_batch, to_float
from alexnet_lab.data.preprocess import Cache, DataError, build_cache
from alexnet_lab.data.synthetic import ensure_synthetic


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of (train, val, test): every class split by the same fractions, seeded.

    Each split gets at least one image of every class that has three or more.
    """
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n = len(members)
        n_val = max(1, round(n * val_fraction)) if n >= 3 else 0
        n_test = max(1, round(n * test_fraction)) if n >= 3 else 0
        val.append(members[:n_val])
        test.append(members[n_val : n_val + n_test])
        train.append(members[n_val + n_test :])
    return tuple(np.sort(np.concatenate(part)) for part in (train, val, test))  # type: ignore[return-value]


def epoch_order(indices: np.ndarray, labels: np.ndarray, *, epoch: int, seed: int, balance: bool) -> np.ndarray:
    """The images one training epoch visits, in order.

    Plain: every index once, shuffled. Balanced (the notebook's ``balance_sample``): the
    same number of images from every class, that of the smallest class, a fresh random
    subset of the larger classes each epoch, shuffled together.
    """
    rng = np.random.default_rng([seed, epoch])
    if not balance:
        return rng.permutation(indices)
    classes = [indices[labels[indices] == c] for c in np.unique(labels[indices])]
    per_class = min(len(members) for members in classes)
    drawn = np.concatenate([rng.choice(members, size=per_class, replace=False) for members in classes])
    return rng.permutation(drawn)


class EpochBatchSampler(Sampler[list[int]]):
    """Yields batches of indices; the order is a pure function of (seed, epoch).

    Lightning calls ``set_epoch`` before each epoch, so a resumed run replays the same order.
    ``shuffle=False`` keeps the given order (evaluation).
    """

    def __init__(
        self,
        indices: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool,
        balance: bool = False,
        seed: int = 0,
    ) -> None:
        self.indices, self.labels = indices, labels
        self.batch_size, self.shuffle, self.balance, self.seed = batch_size, shuffle, balance, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return self.indices
        return epoch_order(self.indices, self.labels, epoch=self.epoch, seed=self.seed, balance=self.balance)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        n = len(self.indices)
        if self.shuffle and self.balance:
            counts = np.unique(self.labels[self.indices], return_counts=True)[1]
            n = len(counts) * int(counts.min())
        return -(-n // self.batch_size)


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


class ImageFolderDataModule(pl.LightningDataModule):
    """Raw folder -> cache -> stratified splits -> uint8 batches -> float (augmented) on the device.

    With ``synthetic`` set (``{"seed": ..., "counts": {...}}``) the embedded data set is
    generated into ``raw_dir`` first if it is not there yet.
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
    ) -> None:
        super().__init__()
        self.raw_dir, self.cache_dir = Path(raw_dir).expanduser(), Path(cache_dir).expanduser()
        self.image_size, self.grayscale = image_size, grayscale
        self.balance, self.augment = balance, augment
        self.augment_config = AugmentConfig(**(augmentation or {}))
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 4 * batch_size  # no gradients kept: bigger batches are free
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.seed, self.workers, self.progress = seed, workers, progress
        self.synthetic = dict(synthetic) if synthetic else None
        self.cache: Cache | None = None

    def prepare_data(self) -> None:
        """Generate the embedded data set if needed, and build (or find) the cache."""
        self._load()

    def _load(self) -> Cache:
        if self.cache is None:
            if self.synthetic is not None:
                ensure_synthetic(
                    self.raw_dir,
                    counts=dict(self.synthetic["counts"]),
                    seed=int(self.synthetic["seed"]),
                    progress=self.progress,
                )
            self.cache = build_cache(
                self.raw_dir,
                self.cache_dir,
                image_size=self.image_size,
                grayscale=self.grayscale,
                workers=self.workers,
                progress=self.progress,
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

    def _loader(self, indices: np.ndarray, *, train: bool) -> DataLoader:
        cache = self._load()
        sampler = EpochBatchSampler(
            indices,
            cache.labels,
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            balance=self.balance and train,
            seed=self.seed,
        )
        # batch_size=None: the sampler hands over whole batches, the dataset slices them at once
        return DataLoader(CacheBatches(cache), sampler=sampler, batch_size=None, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_idx, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_idx, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_idx, train=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        images = to_float(images)  # (B, C, S, S) uint8 -> float in [0, 1], on the device
        if self.augment and self.trainer is not None and self.trainer.training:
            images = augment_batch(images, self.augment_config)
        return images, labels
