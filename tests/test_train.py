"""The Hydra task end to end: config tree, a real run through train.py, multirun, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config, run_train, tiny_overrides
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from alexnet_lab.callbacks import history_from_checkpoint
from alexnet_lab.cli import load
from alexnet_lab.config import LabConfig
from alexnet_lab.errors import ConfigError
from alexnet_lab.identity import run_name
from alexnet_lab.train import train


def test_defaults_are_the_notebooks_first_run():
    cfg = compose_config()
    assert cfg.model.arch == "notebook" and cfg.model.downscale == 16 and cfg.model.dropout == 0.0
    assert cfg.optim.name == "Adam" and cfg.optim.lr == 1e-3
    assert cfg.data.image_size == 256 and cfg.data.grayscale is True
    assert cfg.data.balance is False and cfg.data.augment is False
    assert dict(cfg.data.synthetic.counts) == {"cat": 1127, "dog": 791}
    assert cfg.trainer.max_epochs == 50 and cfg.seed == 0


def test_sgd_is_plain_gradient_descent_and_overrides_compose():
    cfg = compose_config("model.downscale=8", "optim=sgd")
    assert cfg.model.downscale == 8
    assert cfg.optim.name == "SGD" and cfg.optim.momentum == 0.0
    folder = compose_config("data=folder", "data.raw_dir=/somewhere")
    assert folder.data.raw_dir == "/somewhere" and folder.data.synthetic is None


def test_run_name_says_what_differs_in_what_is_learned():
    assert run_name([]) == "default"
    assert run_name(["experiment=ablation_2_dropout", "seed=1"]) == "ablation_2_dropout,seed=1"
    assert run_name(["model.downscale=8", "optim=sgd"]) == "model.downscale=8,optim=sgd"
    # paths, progress bars, resume and device placement do not change what is learned
    skipped = [
        "resume=true",
        "data.cache_dir=/c",
        "data.raw_dir=/r",
        "trainer.enable_progress_bar=false",
        "data.on_device=false",
        "verdicts.window=3",
        "data.progress=false",
    ]
    assert run_name(["model.downscale=8", *skipped]) == "model.downscale=8"
    assert run_name(["+trainer.fast_dev_run=true", "data.synthetic.counts={cat:1,dog:1}"]) == (
        "+trainer.fast_dev_run=true,data.synthetic.counts={cat:1,dog:1}"
    )


def test_a_long_run_name_is_cut_and_ends_in_a_hash_of_the_overrides():
    digests = [f"data.discard.known_digests=[{str(i) * 64}]" for i in range(4)]
    name = run_name(digests)
    assert len(name.encode()) <= 160 and name.startswith("data.discard.known_digests=[0000")
    assert run_name(digests) == name and run_name(digests[::-1]) != name  # the hash tells them apart
    assert run_name([*digests, "resume=true"]) == name


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.downscale=0", "model.downscale"),
        ("model.downscale=-4", "model.downscale"),
        ("model.downscale=200", "model.downscale"),
        ("model.downscale=abc", "model.downscale"),
        ("model.downscale=2.5", "model.downscale"),
        ("model.dropout=x", "model.dropout"),
        ("data.balance=maybe", "data.balance"),
        ("model.arch=vgg", "model.arch"),
        ("model.dropout=1.5", "model.dropout"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.name=Adamm", "optim.name"),
        ("optim.eps=-1", "optim.eps"),
        ("optim.betas=[0.9,1.5]", "optim.betas"),
        ("data.image_size=32", "data.image_size"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.val_fraction=0.9", "data.val_fraction"),
        ("data.augmentation.flip=2", "data.augmentation.flip"),
        ("data.discard.min_copies=1", "data.discard.min_copies"),
        ("data.synthetic.broken=-1", "data.synthetic.broken"),
        ("trainer.max_epochs=0", "trainer.max_epochs"),
        ("verdicts.window=0", "verdicts.window"),
        ("data.on_device=gpu", "data.on_device"),
        ("divergence.max_train_loss=-1", "divergence.max_train_loss"),
    ],
)
def test_bad_config_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        load(compose_config(override), LabConfig)
    message = str(err.value)
    assert key in message and "\n" not in message


@pytest.mark.parametrize("override", ["optim.momentum=0.9", "model.nosuch=1", "data.augmentation.nosuch=1"])
def test_an_unknown_key_fails_when_the_config_is_composed(override):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_config(override)


def test_folder_without_raw_dir_says_to_set_it():
    with pytest.raises(ConfigError, match=r"data\.raw_dir is not set"):
        load(compose_config("data=folder"), LabConfig)


def test_same_seed_same_numbers(tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = compose_config(*tiny_overrides(tmp_path, epochs=2), "data.augment=true", "data.balance=true")
        runs.append(train(cfg, tmp_path / name))
    keys = ("val_acc", "val_acc_best", "test_acc", "test_balanced_acc")
    assert [runs[0][k] for k in keys] == [runs[1][k] for k in keys]
    strip_time = [[{k: v for k, v in row.items() if k != "epoch_s"} for row in run["history"]] for run in runs]
    assert strip_time[0] == strip_time[1]
    other = train(compose_config(*tiny_overrides(tmp_path, epochs=2), "seed=1"), tmp_path / "c")
    assert other["history"][-1]["train/loss"] != runs[0]["history"][-1]["train/loss"]


def test_best_ckpt_is_the_best_epochs_weights_and_last_ckpt_the_whole_run_whatever_the_checkpoint_policy(tmp_path):
    runs = {}
    for every in (1, 3):  # 5 epochs: saves of last.ckpt after epochs 3 and 5 (the end) with checkpoint_every=3
        run_dir = tmp_path / f"every_{every}"
        cfg = compose_config(*tiny_overrides(tmp_path, epochs=5), "optim.lr=3e-3", f"checkpoint_every={every}")
        metrics = train(cfg, run_dir)
        best, last = (
            torch.load(run_dir / "checkpoints" / name, weights_only=True) for name in ("best.ckpt", "last.ckpt")
        )
        runs[every] = metrics, best, last
        accs = [row["val/acc"] for row in metrics["history"]]
        assert best["epoch"] == accs.index(max(accs))  # the first epoch of the best val accuracy
        assert history_from_checkpoint(run_dir / "checkpoints" / "last.ckpt") == metrics["history"]
    (m1, best1, last1), (m3, best3, last3) = runs[1], runs[3]
    assert m1["val_acc_best"] == m3["val_acc_best"] and m1["test_acc"] == m3["test_acc"]
    for key, weight in best1["state_dict"].items():
        assert torch.equal(weight, best3["state_dict"][key]), key
    for key, weight in last1["state_dict"].items():
        assert torch.equal(weight, last3["state_dict"][key]), key


@pytest.mark.slow
def test_train_py_writes_metrics_tensorboard_and_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train([*tiny_overrides(tmp_path, epochs=2), f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["epochs"] == 2 and len(metrics["history"]) == 2
    for key in ("wall_s", "params", "val_acc", "val_acc_best", "val_balanced_acc", "test_acc", "test_balanced_acc"):
        assert isinstance(metrics[key], (int, float)), key
    assert 0 <= metrics["test_acc"] <= 1 and metrics["val_acc_best"] >= metrics["history"][0]["val/acc"]
    assert set(metrics["per_class_recall"]) == {"cat", "dog"}
    assert "data.image_size=64" in metrics["overrides"]
    row = metrics["history"][-1]
    assert abs(row["val/pred_frac/cat"] + row["val/pred_frac/dog"] - 1) < 1e-6
    assert {"train/loss", "train/acc", "train/balanced_acc", "val/loss", "val/recall/dog", "epoch_s"} <= set(row)
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file in the run dir"
    scalars, hparams = set(), set()
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
        try:
            hparams |= set(accumulator.PluginTagToContent("hparams"))
        except KeyError:  # this event file holds no HPARAMS entry
            pass
    assert {"train/loss", "val/acc", "val/pred_frac/cat", "test/acc", "hp/test_acc"} <= scalars
    assert "_hparams_/experiment" in hparams, "no HPARAMS entry for TensorBoard"
    assert (run_dir / ".hydra" / "config.yaml").exists()
    for name in ("last.ckpt", "best.ckpt"):
        # hyperparameters are plain data: the checkpoint loads with weights_only=True
        ckpt = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert ckpt["hyper_parameters"]["model"]["downscale"] == 16
        assert ckpt["hyper_parameters"]["classes"] == ["cat", "dog"]
    # generated data and cache sit where the config said, not in the working dir
    assert (tmp_path / "raw" / "cat").is_dir() and any((tmp_path / "cache").iterdir())


@pytest.mark.slow
def test_multirun_over_downscale_gives_one_named_run_per_point(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train(
        ["-m", "model.downscale=4,8,16", *tiny_overrides(tmp_path), f"hydra.sweep.dir={sweep}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(
        (p for p in sweep.iterdir() if (p / "metrics.json").exists()), key=lambda p: int(p.name.split("_")[0])
    )
    assert len(runs) == 3
    for run, downscale in zip(runs, (4, 8, 16), strict=True):
        assert f"model.downscale={downscale}," in run.name + ",", run.name
    params = [json.loads((p / "metrics.json").read_text())["params"] for p in runs]
    assert params[0] > params[1] > params[2]
    assert all(list(p.glob("events.out.tfevents.*")) for p in runs)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["optim=nope"], "optim"),
        (["model.downscale=0"], "model.downscale=0"),
        (["model.downscale=2.5"], "model.downscale=2.5"),
        (["model.downscale=abc"], "model.downscale='abc'"),
        (["model.nosuch=1"], "model.nosuch"),
    ],
)
def test_bad_overrides_fail_in_one_clear_line(tmp_path, args, expected):
    result = run_train([*args, *tiny_overrides(tmp_path), f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "raw").exists(), "no data should be generated for a config that cannot run"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "empty", "one_class"])
def test_bad_raw_dir_fails_in_one_clear_line(tmp_path, make_raw, case):
    raw = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "one_class": make_raw({"cat": 5})}[case]
    if case == "empty":
        raw.mkdir()
    before = sorted((p, p.stat().st_mtime_ns) for p in raw.rglob("*")) if raw.exists() else None
    result = run_train(
        [
            "data=folder",
            f"data.raw_dir={raw}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.image_size=64",
            "trainer.max_epochs=1",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(raw) in errors[0] and "Traceback" not in result.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"
    if before is not None:
        assert sorted((p, p.stat().st_mtime_ns) for p in raw.rglob("*")) == before


@pytest.mark.slow
def test_four_known_digests_on_the_command_line_make_a_run_not_a_crash(tmp_path):
    # as the README suggests passing them; before, the run dir's name outgrew the file system's 255 bytes
    digests = ",".join(f"{i:x}" * 64 for i in range(10, 14))
    result = run_train([*tiny_overrides(tmp_path), f"data.discard.known_digests=[{digests}]"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert len(run_dir.name.encode()) < 255 and "data.discard.known_digests=[aaaa" in run_dir.name
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "ok"
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert all(f"{i:x}" * 64 in overrides for i in range(10, 14))  # the full overrides stay in .hydra/
