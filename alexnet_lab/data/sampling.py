"""Which images a split and an epoch visit: the seeded stratified split, each epoch's order, batches.

Pure functions of (labels, seed, epoch) and a batch sampler over them, so that the order of
every epoch can be recomputed exactly (resume) and tested without a Trainer.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


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
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val)), np.sort(np.concatenate(test))


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for one epoch of one run, independent of every other (seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


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
    ``shuffle=False`` keeps the given order (evaluation). Under data-parallel training each
    of ``num_replicas`` processes takes every ``num_replicas``-th image of the epoch's order;
    training cuts the order to a multiple of ``num_replicas`` so that every process runs the
    same number of steps (a process waiting for a missing step would hang the others).
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
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.indices, self.labels = indices, labels
        self.batch_size, self.shuffle, self.balance, self.seed = batch_size, shuffle, balance, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return self.indices[self.rank :: self.num_replicas]
        order = epoch_order(self.indices, self.labels, epoch=self.epoch, seed=self.seed, balance=self.balance)
        order = order[: len(order) - len(order) % self.num_replicas]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        # counted, not drawn: Lightning asks several times an epoch, and an order is a permutation
        n = len(self.indices)
        if self.shuffle and self.balance:
            counts = np.unique(self.labels[self.indices], return_counts=True)[1]
            n = len(counts) * int(counts.min())
        if self.shuffle:
            n = n // self.num_replicas
        else:
            n = len(range(self.rank, n, self.num_replicas))
        return -(-n // self.batch_size)
