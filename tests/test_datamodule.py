"""Split, samplers and the datamodule's batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import small_data

from alexnet_lab.data.datamodule import ImageFolderDataModule
from alexnet_lab.data.sampling import EpochBatchSampler, epoch_order, stratified_split
from alexnet_lab.errors import DataError

# the notebook's imbalance: 1127 cats, 791 dogs
LABELS = np.array([0] * 1127 + [1] * 791)


def test_stratified_split_keeps_class_fractions_and_is_seeded():
    train, val, test = stratified_split(LABELS, 0.15, 0.15, seed=0)
    assert len(set(train) | set(val) | set(test)) == len(LABELS) == len(train) + len(val) + len(test)
    for split, fraction in ((val, 0.15), (test, 0.15)):
        counts = np.bincount(LABELS[split], minlength=2)
        assert counts[0] == round(1127 * fraction) and counts[1] == round(791 * fraction)
    again = stratified_split(LABELS, 0.15, 0.15, seed=0)
    other = stratified_split(LABELS, 0.15, 0.15, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    assert not np.array_equal(val, other[1])


def test_plain_epoch_visits_every_image_once_in_a_new_order_each_epoch():
    indices = np.arange(100, 400)
    labels = np.zeros(400, dtype=np.int64)
    first = epoch_order(indices, labels, epoch=0, seed=0, balance=False)
    second = epoch_order(indices, labels, epoch=1, seed=0, balance=False)
    assert sorted(first.tolist()) == indices.tolist() == sorted(second.tolist())
    assert not np.array_equal(first, second)
    assert np.array_equal(first, epoch_order(indices, labels, epoch=0, seed=0, balance=False))


def test_balanced_epoch_draws_equal_counts_per_class_and_a_fresh_majority_subset():
    indices = np.arange(len(LABELS))
    drawn = [epoch_order(indices, LABELS, epoch=e, seed=3, balance=True) for e in range(3)]
    for order in drawn:
        assert np.bincount(LABELS[order]).tolist() == [791, 791]
        assert len(set(order.tolist())) == len(order)  # without replacement
    cats = [set(order[LABELS[order] == 0].tolist()) for order in drawn]
    assert cats[0] != cats[1] != cats[2]
    # over a few epochs the balanced sampler reaches cats a single epoch leaves out
    assert len(cats[0] | cats[1] | cats[2]) > 791


def test_three_class_balance_uses_the_smallest_class():
    labels = np.array([0] * 50 + [1] * 20 + [2] * 9)
    order = epoch_order(np.arange(len(labels)), labels, epoch=0, seed=0, balance=True)
    assert np.bincount(labels[order]).tolist() == [9, 9, 9]


@pytest.mark.parametrize("balance", [False, True])
def test_batch_sampler_length_matches_what_it_yields_and_follows_set_epoch(balance):
    indices = np.arange(len(LABELS))
    sampler = EpochBatchSampler(indices, LABELS, batch_size=64, shuffle=True, balance=balance, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert all(len(b) == 64 for b in batches[:-1]) and 0 < len(batches[-1]) <= 64
    sampler.set_epoch(1)
    assert list(sampler) != batches
    sampler.set_epoch(0)
    assert list(sampler) == batches


@pytest.mark.parametrize("balance", [False, True])
def test_data_parallel_shares_are_disjoint_and_equal_for_training(balance):
    indices = np.arange(len(LABELS))
    shares = [
        EpochBatchSampler(indices, LABELS, 32, shuffle=True, balance=balance, seed=0, num_replicas=2, rank=r)
        for r in (0, 1)
    ]
    batches = [list(share) for share in shares]
    assert len(batches[0]) == len(batches[1]) == len(shares[0])  # same number of steps on every process
    seen = [sum(b, []) for b in batches]
    assert set(seen[0]).isdisjoint(seen[1])
    single = epoch_order(indices, LABELS, epoch=0, seed=0, balance=balance)
    assert sorted(seen[0] + seen[1]) == sorted(single.tolist()[: len(single) - len(single) % 2])
    evaluation = [EpochBatchSampler(indices[:7], LABELS, 2, shuffle=False, num_replicas=2, rank=r) for r in (0, 1)]
    assert [sum(list(e), []) for e in evaluation] == [[0, 2, 4, 6], [1, 3, 5]]
    assert [len(e) for e in evaluation] == [2, 2]


def test_eval_sampler_keeps_order():
    indices = np.array([5, 2, 9, 11])
    sampler = EpochBatchSampler(indices, np.zeros(12, dtype=np.int64), batch_size=3, shuffle=False)
    assert list(sampler) == [[5, 2, 9], [11]]


def test_datamodule_gives_uint8_batches_and_float_on_the_device(make_raw, tmp_path):
    raw = make_raw({"cat": 14, "dog": 9})
    dm = ImageFolderDataModule(small_data(raw, tmp_path, batch_size=4, augment=True))
    dm.prepare_data()
    dm.setup("fit")
    assert dm.classes == ["cat", "dog"] and dm.in_channels == 1
    assert len(dm.train_idx) + len(dm.val_idx) + len(dm.test_idx) == 23
    assert set(dm.val_idx) & set(dm.train_idx) == set()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (4, 1, 64, 64)
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1}

    class _Trainer:  # what on_after_batch_transfer looks at
        training = False
        current_epoch = 0

    dm.trainer = _Trainer()
    plain, _ = dm.on_after_batch_transfer((images, labels), 0)
    assert plain.dtype == torch.float32 and 0.0 <= plain.min() and plain.max() <= 1.0
    assert torch.allclose(plain * 255, images.float())
    _Trainer.training = True
    augmented, _ = dm.on_after_batch_transfer((images, labels), 0)
    assert augmented.shape == plain.shape and not torch.allclose(augmented, plain)
    # augmentations are a function of (seed, epoch): the same epoch again draws the same
    dm._generators.clear()
    assert torch.equal(dm.on_after_batch_transfer((images, labels), 0)[0], augmented)
    _Trainer.current_epoch = 1
    assert not torch.equal(dm.on_after_batch_transfer((images, labels), 0)[0], augmented)


@pytest.mark.parametrize("on_device", [False, True])  # read from the cache, or gathered on the device
def test_each_loader_serves_its_own_split_in_order(make_raw, tmp_path, on_device):
    # val and test of different sizes, so a loader serving the other split shows in its length and images
    raw = make_raw({"cat": 30, "dog": 20})
    dm = ImageFolderDataModule(
        small_data(raw, tmp_path, batch_size=4, on_device=on_device, val_fraction=0.2, test_fraction=0.1)
    )
    dm.setup("fit")
    assert len(dm.val_idx) != len(dm.test_idx)
    index = {dm.cache.images[i].tobytes(): i for i in range(len(dm.cache))}
    for loader, split in ((dm.val_dataloader(), dm.val_idx), (dm.test_dataloader(), dm.test_idx)):
        served = [index[image.cpu().numpy().tobytes()] for images, _ in loader for image in images]
        assert served == split.tolist()  # every image of its split, once, in the split's order


def test_balanced_datamodule_epoch_has_equal_classes(make_raw, tmp_path):
    raw = make_raw({"cat": 30, "dog": 10})
    dm = ImageFolderDataModule(small_data(raw, tmp_path, batch_size=5, balance=True))
    dm.setup("fit")
    labels = torch.cat([y for _, y in dm.train_dataloader()])
    train_dogs = int((dm.cache.labels[dm.train_idx] == 1).sum())
    assert torch.bincount(labels).tolist() == [train_dogs, train_dogs]


def test_a_split_without_a_class_is_a_clear_error(make_raw, tmp_path):
    raw = make_raw({"cat": 10, "dog": 2})
    dm = ImageFolderDataModule(small_data(raw, tmp_path))
    with pytest.raises(DataError, match="dog"):
        dm.setup("fit")
