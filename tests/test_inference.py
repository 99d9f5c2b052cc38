"""Using a trained checkpoint: eval, predict, safe loading, and what TensorBoard shows of a run."""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import ROOT, compose_config, tiny_overrides
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from alexnet_lab import inference
from alexnet_lab.callbacks import keep_most_confident_wrong
from alexnet_lab.cli import split_path_arguments
from alexnet_lab.data.datamodule import ImageFolderDataModule
from alexnet_lab.errors import CheckpointError, ConfigError, DataError
from alexnet_lab.inference import (
    evaluate_folder,
    evaluate_split,
    find_checkpoint,
    format_predictions,
    load_trained,
    predict,
    run_data_config,
    write_predictions_csv,
)
from alexnet_lab.train import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A run dir as `python train.py` leaves it: one epoch on tiny data, with .hydra/config.yaml."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = compose_config(*tiny_overrides(tmp, epochs=1, counts="{cat:30,dog:20}"))
    run_dir = tmp / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # what Hydra writes into every run dir
    train(cfg, run_dir)
    return run_dir


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _break_files(raw: Path) -> list[Path]:
    """A non-image (its name not UTF-8: POSIX allows any bytes) and an empty file among the good ones."""
    broken = raw / "dog" / os.fsdecode(b"broken_caf\xe9.jpg")
    broken.write_bytes(b"this is not a JPEG")
    empty = raw / "cat" / "empty.png"
    empty.write_bytes(b"")
    return [broken, empty]


def test_eval_of_the_own_splits_equals_the_runs_metrics(trained_run):
    metrics = _metrics(trained_run)
    result = evaluate_split(trained_run, "test", device="cpu")
    assert result.checkpoint.endswith("checkpoints/best.ckpt")
    assert result.images == round(0.15 * 30) + round(0.15 * 20)  # the stratified test split: 4 cats, 3 dogs
    assert result.acc == pytest.approx(metrics["test_acc"], abs=1e-6)
    assert result.balanced_acc == pytest.approx(metrics["test_balanced_acc"], abs=1e-6)
    assert result.per_class_recall == pytest.approx(metrics["per_class_recall"], abs=1e-6)
    assert result.pred_frac == pytest.approx(metrics["test_pred_frac"], abs=1e-6)
    # one epoch: best.ckpt is the weights that epoch's validation saw, loss included
    val = evaluate_split(trained_run, "val", device="cpu")
    row = metrics["history"][-1]
    assert val.acc == pytest.approx(row["val/acc"], abs=1e-6)
    assert val.loss == pytest.approx(row["val/loss"], rel=1e-5)
    assert val.per_class_recall["dog"] == pytest.approx(row["val/recall/dog"], abs=1e-6)
    assert result.note == val.note == ""


def test_eval_and_predict_run_through_lightning_and_agree(trained_run, monkeypatch):
    calls = []

    def spy_on(name):
        run = getattr(pl.Trainer, name)

        def spy(self, *args, **kwargs):
            calls.append(name)
            return run(self, *args, **kwargs)

        return spy

    for name in ("test", "validate", "predict"):
        monkeypatch.setattr(pl.Trainer, name, spy_on(name))
    model = load_trained(trained_run, device="cpu")
    result = evaluate_split(model, "test")
    evaluate_split(model, "val")
    assert calls == ["test", "validate"]
    # the module's own metric code: its confusion matrix is the Evaluation's, its numbers metrics.json's
    assert result.confusion.tolist() == model.module.last_confusion["test"].tolist()
    metrics = _metrics(trained_run)
    assert result.acc == pytest.approx(metrics["test_acc"], abs=1e-6)
    assert result.per_class_recall == pytest.approx(metrics["per_class_recall"], abs=1e-6)

    # the same test images as files, through Trainer.predict: the same answers
    datamodule = ImageFolderDataModule(run_data_config(model))
    datamodule.setup("test")
    cache = datamodule.cache
    files = [datamodule.raw_dir / cache.files[i] for i in datamodule.test_idx]
    predictions = predict(model, files, batch_size=3)
    assert calls == ["test", "validate", "predict"] and all(row.ok for row in predictions)
    confusion = np.zeros_like(result.confusion)
    for i, row in zip(datamodule.test_idx, predictions, strict=True):
        confusion[cache.labels[i], model.classes.index(row.label)] += 1
    assert confusion.tolist() == result.confusion.tolist()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_device_or_precision_that_is_not_there_fails_in_one_line(trained_run, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_trained(trained_run, device="cuda")
    assert str(err.value) == "device=cuda: no GPU here; use device=auto or cpu"
    for options, names in (({"precision": "8-bit"}, "precision=8-bit"), ({"device": "tpu:x"}, "device=tpu:x")):
        with pytest.raises(ConfigError) as err:
            predict(trained_run, [], **options)
        assert str(err.value).startswith(names) and "\n" not in str(err.value)
    result = _run("eval.py", [f"ckpt_path={trained_run}", "device=cuda"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: device=cuda: no GPU here; use device=auto or cpu"
    ]


def test_eval_says_when_the_runs_data_changed_since_training(trained_run, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(trained_run.parent / "raw", raw)
    shutil.copy(next((raw / "dog").iterdir()), raw / "dog" / "one_more.png")
    cfg = OmegaConf.load(trained_run / ".hydra" / "config.yaml")
    cfg.data.raw_dir, cfg.data.cache_dir = str(raw), str(tmp_path / "cache")
    result = evaluate_split(trained_run, "test", run_config=cfg, device="cpu")
    assert "changed since training" in result.note and "changed since training" in result.report()


def test_folder_eval_and_predict_skip_broken_files_and_agree(trained_run, make_raw, tmp_path):
    raw = make_raw({"cat": 4, "dog": 3})
    broken = _break_files(raw)
    model = load_trained(trained_run, device="cpu")
    result = evaluate_folder(model, raw, cache_dir=tmp_path / "cache", batch_size=3)  # batches cut across classes
    assert result.images == 7
    assert sorted(Path(path).name for path, _ in result.skipped) == sorted(p.name for p in broken)
    assert all(reason for _, reason in result.skipped)
    assert result.confusion.sum(axis=1).tolist() == [4, 3]

    predictions = predict(model, [raw], batch_size=2)
    assert len(predictions) == 9 and sum(row.ok for row in predictions) == 7
    assert {Path(row.path).name for row in predictions if not row.ok} == {p.name for p in broken}
    confusion = np.zeros((2, 2), dtype=np.int64)
    for row in predictions:
        if row.ok:
            assert sum(row.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
            assert row.probability == max(row.probabilities.values())
            confusion[model.classes.index(Path(row.path).parent.name), model.classes.index(row.label)] += 1
    assert confusion.tolist() == result.confusion.tolist()


def test_folder_classes_are_matched_to_the_checkpoint_by_name(trained_run, make_raw, tmp_path):
    raw = make_raw({"cat": 3, "dog": 2})
    cache = tmp_path / "cache"
    as_trained = evaluate_folder(trained_run, raw, cache_dir=cache, device="cpu")
    # the same weights with the class list stored the other way round: logits 0 now mean "dog"
    checkpoint = torch.load(trained_run / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["classes"] = ["dog", "cat"]
    reversed_path = tmp_path / "reversed.ckpt"
    torch.save(checkpoint, reversed_path)
    reversed_eval = evaluate_folder(reversed_path, raw, cache_dir=cache, device="cpu")
    assert as_trained.confusion.sum(axis=1).tolist() == [3, 2]  # rows: cat, dog
    # a cat image is now true class 1 ("cat"), and the unchanged outputs swap their names, not their columns
    assert reversed_eval.confusion.tolist() == as_trained.confusion[::-1].tolist()
    for folders, says in (({"cat": 2, "horse": 2}, "'horse'"), ({"dog": 3}, "only one class ('dog')")):
        other = make_raw(folders, name="_".join(folders))
        with pytest.raises(DataError) as err:
            evaluate_folder(trained_run, other, cache_dir=cache, device="cpu")
        assert says in str(err.value) and str(other) in str(err.value) and "\n" not in str(err.value)
    caches = [path.name for path in cache.iterdir() if not path.name.startswith(".")]
    assert len(caches) == 1 and caches[0].startswith("raw-"), "a refused folder must not be preprocessed"


def test_predict_reports_every_bad_input_on_its_own_line(trained_run, make_raw, tmp_path):
    raw = make_raw({"cat": 2})
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    (tmp_path / "empty_dir").mkdir()
    inputs = [raw / "cat" / "cat_000.png", notes, tmp_path / "missing.jpg", tmp_path / "empty_dir", raw]
    predictions = predict(trained_run, inputs, device="cpu")
    assert [row.ok for row in predictions] == [True, False, False, False, True, True]
    assert "no such file" in predictions[2].error and "no image files" in predictions[3].error
    assert all(math.isnan(row.probability) and not row.probabilities for row in predictions if not row.ok)
    table = format_predictions(predictions).splitlines()
    assert len(table) == 1 + len(predictions) + 1
    assert "skipped" in table[2] and str(notes) in table[2]
    assert table[-1].startswith("3 of 6 files predicted")
    out = write_predictions_csv(predictions, tmp_path / "out" / "preds.csv", ["cat", "dog"])
    rows = list(csv.DictReader(out.open()))
    assert [row["path"] for row in rows] == [row.path for row in predictions]
    assert rows[0]["prediction"] in ("cat", "dog")
    assert float(rows[0]["p_cat"]) + float(rows[0]["p_dog"]) == pytest.approx(1, abs=1e-5)
    assert rows[1]["prediction"] == "" and "UnidentifiedImageError" in rows[1]["error"]


def test_a_checkpoint_alone_carries_its_preprocessing(trained_run, make_raw, tmp_path):
    alone = tmp_path / "downloaded" / "model.ckpt"
    alone.parent.mkdir()
    shutil.copy(trained_run / "checkpoints" / "best.ckpt", alone)
    model = load_trained(alone, device="cpu")
    assert (model.image_size, model.grayscale, model.run_dir) == (64, True, None)
    raw = make_raw({"cat": 2, "dog": 2})
    from_run_dir = predict(trained_run, raw, device="cpu")
    assert [row.probability for row in predict(model, raw)] == [row.probability for row in from_run_dir]
    with pytest.raises(CheckpointError, match="data=folder"):
        evaluate_split(model)


def test_run_dir_stands_for_its_best_checkpoint(trained_run, tmp_path):
    assert find_checkpoint(trained_run) == trained_run / "checkpoints" / "best.ckpt"
    with pytest.raises(CheckpointError, match=r"no checkpoints/best\.ckpt"):
        find_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "nope.ckpt")


def _variant(trained_run: Path, tmp_path: Path, case: str) -> Path:
    good = trained_run / "checkpoints" / "best.ckpt"
    path = tmp_path / f"{case}.ckpt"
    if case == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "text":
        path.write_text("hello\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        checkpoint = torch.load(good, weights_only=True)
        hparams = checkpoint["hyper_parameters"]
        if case == "other_width":
            hparams["model"]["downscale"] = 8
        elif case == "other_arch":
            hparams["model"]["arch"] = "paper"
        elif case == "other_classes":
            hparams["classes"] = ["cat", "dog", "fox"]
        elif case == "no_hparams":
            del checkpoint["hyper_parameters"]
        torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("truncated", "corrupted"),
        ("text", "corrupted"),
        ("empty", "corrupted"),
        ("tensor", "not a Lightning checkpoint"),
        ("no_hparams", "not a Lightning checkpoint"),
        ("other_width", "torch.Size([6, 1, 11, 11]) from checkpoint"),
        ("other_arch", "do not fit"),
        ("other_classes", "3 classes"),
    ],
)
def test_bad_checkpoints_fail_in_one_line_naming_the_file(trained_run, tmp_path, case, says):
    path = _variant(trained_run, tmp_path, case)
    with pytest.raises(CheckpointError) as err:
        load_trained(path, device="cpu")
    message = str(err.value)
    assert str(path) in message and says in message and "\n" not in message


class _RunsCode:
    """Pickles as a call of Path.touch: what a malicious checkpoint could do on a plain torch.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"payload": _RunsCode(marker)}}, path)
    with pytest.raises(CheckpointError, match="refused") as err:
        load_trained(path, device="cpu")
    assert str(path) in str(err.value) and not marker.exists()


def test_tensorboard_shows_confusion_matrices_wrong_images_and_prediction_fractions(trained_run):
    images, layouts = set(), []
    for path in trained_run.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags = accumulator.Tags()
        for tag in tags["images"]:
            event = accumulator.Images(tag)[-1]
            assert event.encoded_image_string.startswith(b"\x89PNG") and event.width > 100
            images.add(tag)
        if "custom_scalars__config__" in tags["tensors"]:
            proto = accumulator.Tensors("custom_scalars__config__")[0].tensor_proto
            layouts.append(layout_pb2.Layout.FromString(proto.string_val[0]))
    for stage in ("val", "test"):
        assert {f"{stage}/confusion_matrix", f"{stage}/most_confident_wrong"} <= images
    assert len(layouts) == 1
    charts = {
        (category.title.split()[0], chart.title): list(chart.multiline.tag)
        for category in layouts[0].category
        for chart in category.chart
    }
    assert charts[("prediction", "val")] == ["^val/pred_frac/cat$", "^val/pred_frac/dog$"]
    assert charts[("prediction", "train")] == ["^train/pred_frac/cat$", "^train/pred_frac/dog$"]


def test_keep_most_confident_wrong_keeps_the_top_k_wrong_across_batches():
    def batch(confidences, labels, first_id):
        p = torch.tensor(confidences)
        logits = torch.stack([torch.log(p), torch.log(1 - p)], dim=1)  # class 0 with probability p
        images = torch.arange(first_id, first_id + len(p)).float().div(255).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
        return images, logits, torch.tensor(labels)

    # ids 0..3: wrong (label 1, said 0) with p 0.9, 0.6; right ones with p 0.99; wrong said 1 (p0 0.2 -> 0.8)
    kept = keep_most_confident_wrong(None, *batch([0.9, 0.99, 0.6, 0.2], [1, 0, 1, 0], first_id=0), k=3)
    kept = keep_most_confident_wrong(kept, *batch([0.95, 0.55, 0.99], [1, 1, 0], first_id=10), k=3)
    ids = kept.images[:, 0, 0, 0].tolist()
    assert ids == [10, 0, 3]  # wrong with 0.95, 0.9, 0.8; the right 0.99s never enter
    assert kept.score.tolist() == pytest.approx([0.95, 0.9, 0.8])
    assert kept.predicted.tolist() == [0, 0, 1] and kept.true.tolist() == [1, 1, 0]
    assert kept.images.dtype == torch.uint8


def test_predict_command_line_takes_plain_paths_and_keeps_hydra_options():
    hydra_args, paths = split_path_arguments(
        [
            "ckpt_path=run",
            "a.jpg",
            "photos/",
            "out=p.csv",
            "-cn",
            "predict",
            "--info",
            "config",
            "b c.png",
            "--cfg",
            "job",
            "--info",
            "job.png",
        ]
    )
    assert paths == ["a.jpg", "photos/", "b c.png", "job.png"]
    assert hydra_args == ["ckpt_path=run", "out=p.csv", "-cn", "predict", "--info", "config", "--cfg", "job", "--info"]


def test_import_alexnet_lab_stays_cheap_and_predict_is_at_top_level():
    code = "import sys, alexnet_lab; assert 'torch' not in sys.modules and 'alexnet_lab.inference' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    from alexnet_lab import evaluate, predict

    assert predict is inference.predict and evaluate is inference.evaluate


def _run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        errors="surrogateescape",  # file names that are not UTF-8 come back as they are on disk
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},  # as on a UTF-8 terminal: no silent escaping
        timeout=300,
    )


@pytest.mark.slow
def test_eval_py_prints_and_writes_json_for_the_split_and_a_folder(trained_run, make_raw, tmp_path):
    result = _run("eval.py", [f"ckpt_path={trained_run}", "device=cpu"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accuracy" in result.stdout and "confusion matrix" in result.stdout
    written = json.loads((trained_run / "eval_best_test.json").read_text())
    assert written["acc"] == pytest.approx(_metrics(trained_run)["test_acc"], abs=1e-6)
    assert np.array(written["confusion_matrix"]).sum() == written["images"] == 7

    raw = make_raw({"cat": 3, "dog": 3}, name="photos")
    broken = _break_files(raw)
    out = tmp_path / "folder_eval.json"
    cache = tmp_path / "cache"
    args = [f"ckpt_path={trained_run}", "data=folder", f"data.raw_dir={raw}", f"data.cache_dir={cache}", f"out={out}"]
    result = _run("eval.py", args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 2 files" in result.stdout
    written = json.loads(out.read_text())
    assert written["images"] == 6
    assert sorted(item["path"] for item in written["skipped"]) == sorted(str(path) for path in broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "folder_eval.json", "photos"]  # no run dir, no log


@pytest.mark.slow
def test_eval_py_multirun_evaluates_every_checkpoint_it_can_and_names_the_bad_one(trained_run, tmp_path):
    (trained_run / "eval_best_test.json").unlink(missing_ok=True)
    missing = tmp_path / "missing"
    result = _run("eval.py", ["-m", f"ckpt_path={missing},{trained_run}"], cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, result.stderr[-3000:]  # a job failed, as in a training sweep
    assert errors and all(str(missing) in line for line in errors) and "Traceback" not in result.stderr
    written = json.loads((trained_run / "eval_best_test.json").read_text())  # the good job still ran
    assert written["acc"] == pytest.approx(_metrics(trained_run)["test_acc"], abs=1e-6)


@pytest.mark.slow
def test_predict_py_prints_a_table_writes_csv_and_fails_clearly_on_a_bad_checkpoint(trained_run, make_raw, tmp_path):
    raw = make_raw({"cat": 2, "dog": 1})
    images = sorted(str(p) for p in (raw / "cat").glob("*.png"))
    _break_files(raw)
    args = [f"ckpt_path={trained_run}", *images, str(raw / "dog"), "out=preds.csv"]
    result = _run("predict.py", args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped: " in result.stdout and "broken_caf" in result.stdout and "Traceback" not in result.stderr
    with (tmp_path / "preds.csv").open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        rows = list(csv.DictReader(handle))
    assert [os.fsencode(row["path"]).endswith(b"broken_caf\xe9.jpg") for row in rows] == [False, False, True, False]
    assert [row["error"] == "" for row in rows] == [True, True, False, True]

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00" * 64)
    result = _run("predict.py", [f"ckpt_path={bad}", *images], cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and str(bad) in errors[0] and "Traceback" not in result.stderr


def test_eval_from_another_directory_reads_the_data_where_training_ran(tmp_path, monkeypatch):
    """A run's data paths are relative to where it trained (paths.data_dir=data), not to where eval runs."""
    from conftest import run_in_process

    trained_in, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    trained_in.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(trained_in)
    code, _, err = run_in_process(["debug=tiny", "data.progress=false", "hydra.run.dir=run"])
    assert code == 0, err[-2000:]
    metrics = json.loads((trained_in / "run" / "metrics.json").read_text())
    monkeypatch.chdir(elsewhere)
    result = evaluate_split(trained_in / "run", "test", device="cpu")
    assert result.acc == pytest.approx(metrics["test_acc"], abs=1e-6) and result.note == ""  # the same data
    assert list(elsewhere.iterdir()) == []  # nothing generated or cached here
