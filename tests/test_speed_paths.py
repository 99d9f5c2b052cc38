"""The fast paths: device-resident batches, bf16-mixed on CPU, no host sync in a step.

Correctness only; speed is measured by ``scripts/bench.py``, never in a test. The device
path is checked on the CPU (``on_device=True`` with a CPU trainer) against the host path;
tests marked ``gpu`` check the same on CUDA and skip without it (``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import ROOT, compose_config, small_data, tiny_overrides
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassConfusionMatrix

from alexnet_lab.callbacks import ProgressBar
from alexnet_lab.cli import load
from alexnet_lab.config import LabConfig
from alexnet_lab.data.augment import AugmentConfig, augment_batch
from alexnet_lab.data.datamodule import (
    CPU_AUGMENT_CHUNK,
    DeviceBatches,
    ImageFolderDataModule,
    augment_in_chunks,
    upload_split,
)
from alexnet_lab.module import AlexNetClassifier, ConfusionCounts
from alexnet_lab.train import build_trainer, train

sys.path.insert(0, str(ROOT / "scripts"))
bench = importlib.import_module("bench")  # scripts/bench.py, a script rather than a module of the package

MODEL = {"arch": "notebook", "downscale": 16, "dropout": 0.0, "lrn": False}
OPTIM = {"name": "Adam", "lr": 1e-3}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def fake_trainer(device: torch.device, world_size: int = 1, rank: int = 0) -> SimpleNamespace:
    """What the datamodule reads from its trainer, for loaders built outside a fit (training, epoch 0)."""
    return SimpleNamespace(
        world_size=world_size,
        global_rank=rank,
        training=True,
        current_epoch=0,
        overfit_batches=0,
        strategy=SimpleNamespace(root_device=device),
    )


def make_datamodule(raw, tmp_path, **settings) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(small_data(raw, tmp_path, **{"batch_size": 4, **settings}), seed=3)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def fit(dm: ImageFolderDataModule, epochs: int, **trainer_kwargs) -> tuple[AlexNetClassifier, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    module = AlexNetClassifier(MODEL, OPTIM, dm.classes, dm.in_channels)
    trainer = pl.Trainer(
        **{
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": epochs,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "use_distributed_sampler": False,
            **trainer_kwargs,
        }
    )
    trainer.fit(module, datamodule=dm)
    return module, trainer


@pytest.mark.parametrize("balance", [False, True])
def test_device_loader_yields_the_host_loaders_batches(make_raw, tmp_path, balance):
    raw = make_raw({"cat": 14, "dog": 8})
    host = make_datamodule(raw, tmp_path, balance=balance, on_device=False)
    device = make_datamodule(raw, tmp_path, balance=balance, on_device=True)
    epochs = []
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        host_loader, device_loader = getattr(host, name)(), getattr(device, name)()
        assert isinstance(host_loader, DataLoader) and isinstance(device_loader, DeviceBatches)
        for epoch in (0, 1):
            host_loader.sampler.set_epoch(epoch)
            device_loader.sampler.set_epoch(epoch)
            host_batches, device_batches = list(host_loader), list(device_loader)
            assert len(device_batches) == len(host_batches) == len(device_loader) == len(host_loader)
            for (hx, hy), (dx, dy) in zip(host_batches, device_batches, strict=True):
                assert dx.dtype == hx.dtype == torch.uint8 and dy.dtype == hy.dtype == torch.int64
                assert torch.equal(dx, hx) and torch.equal(dy, hy)
            if name == "train_dataloader":
                epochs.append(torch.cat([x for x, _ in device_batches]))
    assert not torch.equal(epochs[0], epochs[1])  # a new order each epoch, so the orders above really matched


def test_device_loader_is_rank_aware(make_raw, tmp_path):
    raw = make_raw({"cat": 14, "dog": 8})
    host = make_datamodule(raw, tmp_path, on_device=False)
    device = make_datamodule(raw, tmp_path, on_device=True)
    shares = []
    for rank in (0, 1):
        host.trainer = device.trainer = fake_trainer(torch.device("cpu"), world_size=2, rank=rank)
        loader = device.train_dataloader()
        assert loader.sampler.batch_size == 2  # the step's batch of 4 shared by two processes
        pairs = list(zip(host.train_dataloader(), loader, strict=True))
        assert all(torch.equal(hx, dx) and torch.equal(hy, dy) for (hx, hy), (dx, dy) in pairs)
        shares.append(torch.cat([x for _, (x, _) in pairs]))
    assert len(shares[0]) == len(shares[1]) == len(device.train_idx) // 2
    assert not any(torch.equal(a, b) for a in shares[0] for b in shares[1])  # disjoint shares of the epoch


def test_upload_split_copies_in_chunks_in_index_order(make_raw, tmp_path):
    raw = make_raw({"cat": 6, "dog": 5})
    cache = make_datamodule(raw, tmp_path).cache
    indices = np.array([7, 0, 3, 10, 5])
    images, labels = upload_split(cache, indices, torch.device("cpu"), chunk=2)
    assert torch.equal(images, torch.from_numpy(cache.images[indices]))
    assert torch.equal(labels, torch.from_numpy(cache.labels[indices]))


def test_device_path_trains_to_the_host_paths_metrics(make_raw, tmp_path):
    raw = make_raw({"cat": 14, "dog": 8})
    runs = {}
    for on_device in (False, True):
        dm = make_datamodule(raw, tmp_path, balance=True, augment=True, on_device=on_device)
        module, trainer = fit(dm, epochs=2)
        assert isinstance(trainer.train_dataloader, DeviceBatches if on_device else DataLoader)
        assert trainer.train_dataloader.sampler.epoch == 1  # Lightning set the epoch on our sampler
        runs[on_device] = module.history
    assert len(runs[True]) == len(runs[False]) == 2
    for host_row, device_row in zip(runs[False], runs[True], strict=True):
        for key, value in host_row.items():
            if key != "epoch_s":
                assert device_row[key] == pytest.approx(value, rel=1e-6, abs=1e-7, nan_ok=True), key


def test_on_device_auto_is_the_host_path_on_a_cpu_and_bad_values_are_refused(make_raw, tmp_path):
    raw = make_raw({"cat": 6, "dog": 5})
    assert isinstance(make_datamodule(raw, tmp_path).train_dataloader(), DataLoader)  # default: auto
    with pytest.raises(ValueError, match="data.on_device='yes'"):
        small_data(raw, tmp_path, on_device="yes")


def test_on_device_auto_falls_back_to_the_host_when_the_gpu_is_too_small(make_raw, tmp_path, monkeypatch, caplog):
    raw = make_raw({"cat": 6, "dog": 5})
    dm = make_datamodule(raw, tmp_path)
    dm.trainer = fake_trainer(torch.device("cuda", 0))
    free = dm.cache.images.nbytes  # the cache would take all of it: more than half
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 4 * free))
    with caplog.at_level(logging.WARNING):
        loaders = [dm.train_dataloader(), dm.val_dataloader()]
    assert all(isinstance(loader, DataLoader) for loader in loaders)
    assert "data.on_device=auto" in caplog.text and caplog.text.count("data.on_device") == 1  # decided once


def test_eval_batches_are_larger_on_a_gpu_only_unless_set(make_raw, tmp_path):
    raw = make_raw({"cat": 6, "dog": 5})
    dm = ImageFolderDataModule(small_data(raw, tmp_path, batch_size=8))
    assert dm.eval_batch_size_on(torch.device("cpu")) == 8
    assert dm.eval_batch_size_on(torch.device("cuda", 0)) == 32
    fixed = ImageFolderDataModule(small_data(raw, tmp_path, batch_size=8), eval_batch_size=5)
    assert fixed.eval_batch_size_on(torch.device("cpu")) == fixed.eval_batch_size_on(torch.device("cuda")) == 5
    loader = make_datamodule(raw, tmp_path, batch_size=2).val_dataloader()
    assert loader.sampler.batch_size == 2  # no trainer: the CPU


def test_config_passes_on_device_to_the_datamodule(tmp_path):
    assert compose_config().data.on_device == "auto"
    dm = ImageFolderDataModule(load(compose_config(*tiny_overrides(tmp_path), "data.on_device=true"), LabConfig).data)
    assert dm.data.on_device is True


def test_bf16_mixed_trains_on_cpu(make_raw, tmp_path):
    raw = make_raw({"cat": 14, "dog": 8})
    dm = make_datamodule(raw, tmp_path)
    pl.seed_everything(0, verbose=False)
    module = AlexNetClassifier(MODEL, OPTIM, dm.classes, dm.in_channels)
    before = [p.detach().clone() for p in module.parameters()]
    output_dtypes = set()
    module.net.features.register_forward_hook(lambda _, __, out: output_dtypes.add(out.dtype))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    assert torch.bfloat16 in output_dtypes  # the convolutions ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in module.parameters())  # weights stay float32
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    row = module.history[-1]
    assert math.isfinite(row["train/loss"]) and math.isfinite(row["val/loss"])


def test_bf16_mixed_from_the_command_line_config(tmp_path):
    cfg = compose_config(*tiny_overrides(tmp_path), "trainer.precision=bf16-mixed")
    metrics = train(cfg, tmp_path / "run")
    assert metrics["status"] == "ok" and metrics["epochs"] == 1
    assert math.isfinite(metrics["history"][-1]["train/loss"]) and 0.0 <= metrics["test_acc"] <= 1.0


def test_augmenting_in_chunks_on_a_cpu_gives_the_whole_batch_result():
    config = AugmentConfig()
    images = torch.rand(2 * CPU_AUGMENT_CHUNK + 5, 1, 64, 64)  # two chunks and a short one
    whole = augment_batch(images, config, torch.Generator().manual_seed(7))
    chunked = augment_in_chunks(images, config, torch.Generator().manual_seed(7))
    assert torch.equal(chunked, whole)
    assert not torch.equal(chunked, augment_in_chunks(images, config, torch.Generator().manual_seed(8)))


FAULT_PROBE = """
import ctypes, resource, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    from alexnet_lab.cli import keep_freed_host_memory
    assert keep_freed_host_memory()
def step():  # four 24 MB blocks alive at once, written, freed: like a step's activations at downscale 4
    blocks = [libc.malloc(24 * 2**20) for _ in range(4)]
    for block in blocks:
        ctypes.memset(block, 1, 24 * 2**20)
    for block in blocks:
        libc.free(block)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_kept_host_memory_spares_the_page_faults_of_every_step():
    faults = {}
    for mode in ("default", "keep"):
        done = subprocess.run([sys.executable, "-c", FAULT_PROBE, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        faults[mode] = int(done.stdout.split()[-1])  # minor page faults per step
    if faults["default"] < 1000:
        pytest.skip(f"this C library keeps freed memory by itself ({faults})")
    assert faults["keep"] < faults["default"] / 10, faults  # glibc 2.36: 24551 against 0


def test_every_command_keeps_freed_memory(monkeypatch):
    from alexnet_lab import cli

    calls = []
    monkeypatch.setenv("HYDRA_FULL_ERROR", "")  # run_command sets it; restored after the test
    monkeypatch.setattr(cli, "keep_freed_host_memory", lambda: calls.append(True))
    cli.run_command(lambda: calls.append("ran"))
    assert calls == [True, "ran"]  # tuned before the command runs


def test_metrics_skip_host_side_input_checks():
    module = AlexNetClassifier(MODEL, OPTIM, ["cat", "dog"], 1)
    assert all(metric.validate_args is False for metric in module.confusion.values())


def test_confusion_counts_match_torchmetrics_without_bincount(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randint(0, 3, (n,), generator=generator), torch.randint(0, 3, (n,), generator=generator))
        for n in (17, 5)
    ]
    reference = MulticlassConfusionMatrix(num_classes=3)
    for preds, target in batches:
        reference.update(preds, target)

    def no_bincount(*args, **kwargs):
        raise AssertionError("torch.bincount reads the input's maximum back to the host on CUDA")

    monkeypatch.setattr(torch, "bincount", no_bincount)
    counts = ConfusionCounts(num_classes=3)
    for preds, target in batches:
        counts.update(preds, target)
    assert torch.equal(counts.compute(), reference.compute())


def test_epoch_loss_weighs_every_image_alike():
    torch.manual_seed(0)
    module = AlexNetClassifier(MODEL, OPTIM, ["cat", "dog"], 1)
    images, labels = torch.rand(5, 1, 64, 64), torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        module._step((images[:4], labels[:4]), "val")  # batches of 4 and 1, as a short last batch
        module._step((images[4:], labels[4:]), "val")
        per_image = F.cross_entropy(module(images), labels)
    assert float(module.mean_loss["val"].compute()) == pytest.approx(float(per_image), rel=1e-5)


def test_a_module_on_its_own_builds_its_optimizer_and_needs_a_trainer_only_for_a_schedule():
    module = AlexNetClassifier(MODEL, {"name": "SGD", "lr": 0.05, "momentum": 0.9}, ["cat", "dog"], 1)
    optimizer = module.configure_optimizers()  # no Trainer: as the GPU step test and a notebook use it
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.05
    assert optimizer.defaults["momentum"] == 0.9
    scheduled = AlexNetClassifier(MODEL, OPTIM, ["cat", "dog"], 1, scheduler={"name": "cosine", "eta_min": 0.0})
    with pytest.raises(RuntimeError, match="not attached to a `Trainer`"):  # cosine anneals over trainer.max_epochs
        scheduled.configure_optimizers()


def test_a_training_step_never_reads_a_tensor_back(make_raw, tmp_path, monkeypatch):
    """Batch transfer hook (to float, augmentation) and training step: no .item(), bool(), float() or .tolist()."""
    raw = make_raw({"cat": 14, "dog": 8})
    dm = make_datamodule(raw, tmp_path, augment=True, on_device=True)
    dm.trainer = fake_trainer(torch.device("cpu"))
    module = AlexNetClassifier(MODEL, OPTIM, dm.classes, dm.in_channels)
    batches = iter(dm.train_dataloader())
    images, labels = next(batches)  # the epoch's order is uploaded here, once

    def read_back(*args, **kwargs):
        raise AssertionError("a host read of a tensor inside a step")

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    for step_batch in [(images, labels), next(batches)]:
        batch = dm.on_after_batch_transfer(step_batch, 0)
        module.training_step(batch, 0).backward()
    monkeypatch.undo()
    assert int(module.confusion["fit"].confmat.sum()) == 8  # both steps were counted


@pytest.mark.gpu
@needs_cuda
def test_gpu_device_path_gives_the_host_batches_and_never_syncs_in_a_step(make_raw, tmp_path):
    raw = make_raw({"cat": 14, "dog": 8})
    cuda = torch.device("cuda", 0)
    trainer = fake_trainer(cuda)
    host, device = make_datamodule(raw, tmp_path, on_device=False), make_datamodule(raw, tmp_path, augment=True)
    host.trainer = device.trainer = trainer
    loader = device.train_dataloader()
    assert isinstance(loader, DeviceBatches) and loader.images.device.type == "cuda"  # auto chose the GPU
    for (hx, hy), (dx, dy) in zip(host.train_dataloader(), loader, strict=True):
        assert torch.equal(dx.cpu(), hx) and torch.equal(dy.cpu(), hy)

    module = AlexNetClassifier(MODEL, OPTIM, device.classes, device.in_channels).to(cuda)
    optimizer = module.configure_optimizers()
    batches = iter(loader)
    first = device.on_after_batch_transfer(next(batches), 0)  # order upload and generator set-up: once per epoch
    module.training_step(first, 0).backward()
    optimizer.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch_idx, batch in enumerate(batches, start=1):
            loss = module.training_step(device.on_after_batch_transfer(batch, 0), batch_idx)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(module.confusion["fit"].confmat.sum()) == len(device.train_idx)


@pytest.mark.gpu
@needs_cuda
def test_gpu_fit_on_device_matches_the_host_path(make_raw, tmp_path):
    raw = make_raw({"cat": 14, "dog": 8})
    runs = {}
    for on_device in (False, True):
        dm = make_datamodule(raw, tmp_path, balance=True, augment=True, on_device=on_device)
        module, trainer = fit(dm, epochs=2, accelerator="gpu")
        assert isinstance(trainer.train_dataloader, DeviceBatches if on_device else DataLoader)
        runs[on_device] = module.history
    for host_row, device_row in zip(runs[False], runs[True], strict=True):
        # same batches and augmentations; cuDNN's backward kernels may add rounding differences
        assert device_row["train/loss"] == pytest.approx(host_row["train/loss"], rel=1e-3)
        assert device_row["val/loss"] == pytest.approx(host_row["val/loss"], rel=1e-3)


@pytest.mark.gpu
@needs_cuda
def test_gpu_bf16_mixed_trains(make_raw, tmp_path):
    raw = make_raw({"cat": 14, "dog": 8})
    module, _ = fit(make_datamodule(raw, tmp_path), epochs=1, accelerator="gpu", precision="bf16-mixed")
    assert math.isfinite(module.history[-1]["train/loss"])


@pytest.mark.slow
def test_the_benchmark_runs_and_reports_each_figure(tmp_path):
    # the benchmark is not timed here, only run: it once broke silently when train() changed
    overrides = [item for item in tiny_overrides(tmp_path) if not item.startswith("trainer.max_epochs")]
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--json", "--out", str(out)]
    done = subprocess.run(
        [*command, "--downscales", "16", "--", *overrides], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    assert found == json.loads(out.read_text())
    assert found["data"]["image_size"] == 64 and found["quick"] is True
    keys = ("lightning_vs_bare", "lightning_vs_bare_aug", "floor_vs_bare", "lightning_vs_floor", "floor_vs_bare_aug")
    for key in (*keys, "channels_last_speedup", "bf16_speedup"):
        assert list(found[key]) == ["d16"] and 0 < found[key]["d16"] < 10, (key, found[key])
    for key in ("pipeline_overhead", "pipeline_overhead_bare"):
        assert 0 <= found[key]["d16"] < 1, (key, found[key])
    # three epochs per run, the first a warm-up: two measured epochs of each side
    epochs = {side: len(seconds) for side, seconds in found["epoch_s"]["d16"].items()}
    assert epochs == {"lightning": 2, "floor": 2, "bare": 2}
    # ours over Lightning alone, times Lightning alone over bare, is ours over bare (medians of the same epochs)
    product = found["lightning_vs_floor"]["d16"] * found["floor_vs_bare"]["d16"]
    assert product == pytest.approx(found["lightning_vs_bare"]["d16"], abs=0.01)
    assert found["preprocess_vs_naive"] > 0
    # where the extra time goes: the tiny runs write checkpoints and metrics every epoch, show no progress bar
    parts = found["epoch_overhead_ms"]["d16"]
    assert list(parts) == [*(part for part in bench.PARTS if part != "steps"), "loop"]
    assert parts["checkpoint"] > 0 and parts["metrics_and_logging"] > 0 and parts["progress_bar"] == 0
    steps = found["steps_per_epoch"]["d16"]
    assert steps == 3 + 1, "three training batches of 8 out of 20 images, one validation batch"
    placed = sum(parts.values()) + found["step_overhead_ms"]["d16"] * steps
    assert placed == pytest.approx(found["difference_ms"]["d16"], abs=0.01), "the parts make the difference"
    assert "d16" in done.stderr and "lightning img/s" in done.stderr, "the table goes to stderr with --json"


def test_the_breakdown_keeps_what_only_the_epoch_encloses_and_names_its_part():
    hooks = bench.HookTimes()
    for action in ("run_training_epoch", "run_training_batch", "[Strategy]SingleDeviceStrategy.backward"):
        hooks.start(action)
    for action in ("[Strategy]SingleDeviceStrategy.backward", "run_training_batch"):
        hooks.stop(action)
    hooks.start("[Callback]ModelCheckpoint{'monitor': None}.on_train_epoch_end")
    hooks.start("save_checkpoint")
    hooks.stop("save_checkpoint")
    hooks.stop("[Callback]ModelCheckpoint{'monitor': None}.on_train_epoch_end")
    hooks.stop("run_training_epoch")
    kept = [action for action, _, _ in hooks.events]
    assert kept == ["run_training_batch", "[Callback]ModelCheckpoint{'monitor': None}.on_train_epoch_end"]
    names = {
        "run_training_batch": "steps",
        "[Strategy]SingleDeviceStrategy.validation_step": "steps",
        "[_TrainingEpochLoop].train_dataloader_next": "data",
        "[_EvaluationLoop].val_next": "data",
        "[Strategy]SingleDeviceStrategy.batch_to_device": "data",
        "[Callback]ModelCheckpoint{'monitor': 'val/acc'}.on_train_epoch_end": "checkpoint",
        "[Callback]LastCheckpoint{'monitor': None, 'every_n_epochs': 5}.on_train_end": "checkpoint",
        "[Callback]RichProgressBar.on_train_batch_end": "progress_bar",
        "[Callback]TQDMProgressBar.on_validation_batch_end": "progress_bar",
        "[Callback]ProgressBar.on_train_batch_end": "progress_bar",  # the lab's own bar
        "[LightningModule]AlexNetClassifier.on_validation_epoch_end": "metrics_and_logging",
        "[Callback]TensorBoardInspection.on_validation_batch_end": "callbacks",
        "[LightningModule]AlexNetClassifier.on_validation_model_eval": "validation_setup",
    }
    assert {action: bench.part_of(action) for action in names} == names


# ----------------------------------------------------------------------------- the progress bar


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("every_s", [3600.0, 0.0])
def test_the_progress_bar_is_redrawn_at_most_every_every_s_and_after_each_loops_last_batch(capsys, every_s):
    data = torch.utils.data.TensorDataset(torch.randn(24, 2), torch.randint(0, 2, (24,)))
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[ProgressBar(every_s=every_s)],
    )
    trainer.fit(Tiny(), DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    drawn = capsys.readouterr().out.replace("\n", "\r").split("\r")  # Lightning's bars write to stdout
    for epoch in (0, 1):
        counts = {int(m[1]) for line in drawn if (m := re.match(rf"Epoch {epoch}: .*?\| (\d+)/6 ", line))}
        if every_s:  # the first batch of the fit is drawn (nothing was yet), then only each epoch's last
            assert counts <= {0, 1, 6} and 6 in counts and not counts & {2, 3, 4, 5}, (epoch, counts)
        else:
            assert {1, 2, 3, 4, 5, 6} <= counts, (epoch, counts)


@pytest.mark.parametrize(
    ("overrides", "bar"),
    [
        ([], ProgressBar),
        (["callbacks=[default,rich_progress_bar]"], pl.callbacks.RichProgressBar),
        (["trainer.enable_progress_bar=false"], None),
    ],
)
def test_a_run_gets_the_lab_s_bar_unless_it_brings_its_own_or_shows_none(tmp_path, overrides, bar):
    lab = load(compose_config(*tiny_overrides(tmp_path), "trainer.enable_progress_bar=true", *overrides), LabConfig)
    trainer, _, _ = build_trainer(lab, tmp_path / "run")
    shown = trainer.progress_bar_callback
    assert (type(shown) if shown is not None else None) is bar
    assert sum(isinstance(callback, pl.callbacks.ProgressBar) for callback in trainer.callbacks) == (bar is not None)
