"""Packed sweeps: a pack's members learn what they would alone, each is a run like any other, the plan says why.

The engine tests write a pack file as the packed sweeper does (a PackJob per job: its run dir,
overrides and resolved config) and train it with ``train_pack``; the command tests run
``python train.py -m ... hydra/sweeper=packed`` as a user does.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_config, run_in_process, run_train, tiny_overrides
from omegaconf import OmegaConf

from alexnet_lab import packed
from alexnet_lab.config import DataConfig, LabConfig, load
from alexnet_lab.data.datamodule import ImageFolderDataModule
from alexnet_lab.data.sampling import epoch_order
from alexnet_lab.module import AlexNetClassifier
from alexnet_lab.packed import optimizer_merge, optimizer_slice, train_pack
from alexnet_lab.packing import (
    FUSED_AT_LEAST,
    Pack,
    PackJob,
    alone_reason,
    describe,
    pack_key,
    plan,
    read_pack,
    write_pack,
)
from alexnet_lab.train import lab_trainer, train

#: val and test of different sizes (cat 18, dog 12: val 4 + 2, test 2 + 1), so a loader that served
#: the wrong split would show
SPLITS = ["data.val_fraction=0.2", "data.test_fraction=0.1"]


def overrides_of(tmp_path: Path, variant: list[str], epochs: int = 2) -> list[str]:
    return [*tiny_overrides(tmp_path, epochs=epochs), *SPLITS, *variant]


def pack_file(tmp_path: Path, variants: list[list[str]], name: str, epochs: int = 2, form: str = "in_turn") -> Path:
    """A pack of one job per variant, written as the packed sweeper writes it; run dirs in tmp_path/name.

    ``form`` in_turn by default: bit for bit the runs alone, which most tests compare with.
    """
    jobs = []
    for number, variant in enumerate(variants):
        overrides = overrides_of(tmp_path, variant, epochs)
        config = OmegaConf.to_container(compose_config(*overrides), resolve=True)
        jobs.append(PackJob(number, str(tmp_path / name / f"{number}_run"), overrides, config))
    return write_pack(Pack(jobs, max_size=16, form=form), tmp_path / name / "packs" / "0" / "pack.json")


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def history(metrics: dict) -> list[dict]:
    """The per-epoch numbers (wall-clock times left out)."""
    return [{k: v for k, v in row.items() if k != "epoch_s"} for row in metrics["history"]]


@pytest.fixture
def seen(monkeypatch):
    """Every training, validation and test batch each module saw: {module id: {stage: [(images, loss)]}}."""
    batches: dict[int, dict[str, list]] = {}
    original = AlexNetClassifier._step

    def step(self, batch, key, logits=None):
        loss, logits = original(self, batch, key, logits)
        batches.setdefault(id(self), {}).setdefault(key, []).append((batch[0].detach().clone(), float(loss.detach())))
        return loss, logits

    monkeypatch.setattr(AlexNetClassifier, "_step", step)
    return batches


# ----------------------------------------------------------------------------- the engine


def test_members_learn_exactly_what_they_learn_alone_and_see_only_their_splits(tmp_path, seen):
    # three seeds, one balanced: members of different epoch lengths in one pack; no dropout, no augmentation
    variants = [["seed=0"], ["seed=1", "data.balance=true"], ["seed=2"]]
    results = train_pack(pack_file(tmp_path, variants, "packed"))
    assert [r["status"] for r in results.values()] == ["ok"] * 3
    packed = [seen[key] for key in list(seen)]  # in the order the members were built
    seen.clear()
    alone = []
    for number, variant in enumerate(variants):
        overrides = overrides_of(tmp_path, variant)
        train(compose_config(*overrides), tmp_path / "alone" / str(number), overrides)
        alone.append(seen.pop(next(iter(seen))))
    for number in range(3):
        first_epoch = len(packed[number]["fit"]) // 2  # two epochs
        losses = np.array([loss for _, loss in packed[number]["fit"][:first_epoch]])
        expected = np.array([loss for _, loss in alone[number]["fit"][:first_epoch]])
        assert len(losses) == len(expected) > 1
        np.testing.assert_allclose(losses, expected, rtol=1e-4)  # the target; on a CPU they are equal
        assert history(read_metrics(tmp_path / "packed" / f"{number}_run")) == history(
            read_metrics(tmp_path / "alone" / str(number))
        )
    # by index: the images each member trained, validated and tested on are its split's, in its own order
    cfg = compose_config(*overrides_of(tmp_path, []))
    dm = ImageFolderDataModule(load(cfg.data, DataConfig, "data"))
    dm.setup("fit")
    index = {dm.cache.images[i].tobytes(): i for i in range(len(dm.cache))}

    def indices(batches):
        return [index[img.tobytes()] for images, _ in batches for img in (images * 255).round().to(torch.uint8).numpy()]

    assert len(dm.val_idx) != len(dm.test_idx)
    for number, (_, seed, balance) in enumerate([(0, 0, False), (1, 1, True), (2, 2, False)]):
        order = epoch_order(dm.train_idx, dm.cache.labels, epoch=0, seed=seed, balance=balance)
        fit = indices(packed[number]["fit"])
        assert fit[: len(order)] == order.tolist()
        assert indices(packed[number]["val"]) == dm.val_idx.tolist() * 2  # after each of the two epochs
        assert indices(packed[number]["test"]) == dm.test_idx.tolist()


def test_fused_members_learn_what_they_learn_alone_within_float_tolerance(tmp_path, seen):
    # dropout (each member's own masks), augmentation, balancing, another rate: all in one fused pack
    variants = [["seed=0", "model.dropout=0.5"], ["seed=1", "data.balance=true", "data.augment=true"], ["seed=2"]]
    variants[2].append("optim.lr=0.003")
    train_pack(pack_file(tmp_path, variants, "fused", form="fused"))
    fused = [seen[key]["fit"] for key in list(seen)]
    seen.clear()
    for number, variant in enumerate(variants):
        overrides = overrides_of(tmp_path, variant)
        train(compose_config(*overrides), tmp_path / "alone" / str(number), overrides)
        alone = seen.pop(next(iter(seen)))["fit"]
        steps = len(alone) // 2  # the first epoch's steps
        np.testing.assert_allclose(
            [loss for _, loss in fused[number][:steps]], [loss for _, loss in alone[:steps]], rtol=1e-4
        )
        got, expected = (read_metrics(tmp_path / name) for name in (f"fused/{number}_run", f"alone/{number}"))
        assert got["pack"]["form"] == "fused" and got["verdicts"] == expected["verdicts"]
        assert got["test_set"]["pred"] == expected["test_set"]["pred"]  # the same test predictions
        for row, other in zip(got["history"], expected["history"], strict=True):
            assert row["train/loss"] == pytest.approx(other["train/loss"], rel=1e-4)
            assert row["val/acc"] == pytest.approx(other["val/acc"], abs=1e-6)


@pytest.mark.parametrize("form", ["in_turn", "fused"])
def test_a_stopped_member_is_never_trained_again(tmp_path, monkeypatch, form):
    # member 0 diverges with a finite loss (its own divergence.max_train_loss), member 1 stops early at epoch 1,
    # member 2 trains all 4 epochs: the stopped ones' weights, optimizer state and steps stay as they stopped
    early = ["callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=0"]
    variants = [
        ["seed=0", "divergence.max_train_loss=0.1", *early, "callbacks.early_stopping.min_delta=-100"],
        ["seed=1", *early, "callbacks.early_stopping.min_delta=100"],  # no epoch improves by 100: stops at 1
        ["seed=2", *early, "callbacks.early_stopping.min_delta=-100"],  # every epoch "improves"
    ]
    kept = {}
    original = packed.PackedClassifier.on_train_end

    def on_train_end(self):
        state = self.trainer.optimizers[0].state_dict()
        for member in self.members:
            weights = {k: v.clone() for k, v in member.module.state_dict().items()}
            kept[member.index] = (weights, optimizer_slice(state, member.index), member.steps)
        original(self)

    monkeypatch.setattr(packed.PackedClassifier, "on_train_end", on_train_end)
    train_pack(pack_file(tmp_path, variants, "pack", epochs=4, form=form))
    runs = [read_metrics(tmp_path / "pack" / f"{n}_run") for n in range(3)]
    assert [(r["status"], r["epochs"]) for r in runs] == [("diverged", 1), ("ok", 2), ("ok", 4)]
    assert math.isfinite(runs[0]["history"][0]["train/loss"])  # a finite loss above its threshold
    for number in (0, 1):
        last = torch.load(tmp_path / "pack" / f"{number}_run" / "checkpoints" / "last.ckpt", weights_only=True)
        weights, optimizer, steps = kept[number]
        assert last["global_step"] == steps and last["epoch"] == runs[number]["epochs"] - 1
        assert all(torch.equal(weights[k], v) for k, v in last["state_dict"].items()), f"member {number} trained on"
        saved = last["optimizer_states"][0]["state"]
        assert saved.keys() == optimizer["state"].keys()
        for index, entry in saved.items():
            assert all(
                torch.equal(torch.as_tensor(v), torch.as_tensor(optimizer["state"][index][k])) for k, v in entry.items()
            )
    assert kept[2][2] > kept[1][2] > kept[0][2]  # the one that trained on took more steps
    # each member's wall time is its share of the pack's, by the epochs it trained (1, 2, 4 of 7)
    pack_wall = runs[0]["pack"]["wall_s"]
    assert all(r["pack"]["wall_s"] == pack_wall for r in runs) and pack_wall > 0
    assert [r["wall_s"] for r in runs] == [round(pack_wall * e / 7, 2) for e in (1, 2, 4)]
    alone = overrides_of(tmp_path, variants[1], epochs=4)
    expected = train(compose_config(*alone), tmp_path / "alone", alone)
    assert expected["epochs"] == 2  # early stopping in a pack stops a member where it stops the run alone
    if form == "in_turn":
        assert history(runs[1]) == history(expected)


def test_auto_takes_the_form_its_own_timing_finds_faster_and_says_so(tmp_path, monkeypatch, caplog):
    timed = []

    def fake(members, datamodule, trainer, steps=packed.FORM_STEPS):
        timed.append(len(members))
        return ratios.pop(0)

    monkeypatch.setattr(packed, "time_forms", fake)
    ratios = [1.7, 0.6, FUSED_AT_LEAST - 0.05]
    for name in ("faster", "slower", "near_even"):
        with caplog.at_level(logging.INFO, logger="alexnet_lab.packed"):  # as Hydra's job logging has it
            train_pack(pack_file(tmp_path, [["seed=0"], ["seed=1"]], name, epochs=1, form="auto"))
    assert timed == [2, 2, 2]
    near = FUSED_AT_LEAST - 0.05  # a little faster is not enough: a choice near even would flip run to run
    for name, form, ratio in (("faster", "fused", 1.7), ("slower", "in_turn", 0.6), ("near_even", "in_turn", near)):
        pack = read_metrics(tmp_path / name / "0_run")["pack"]
        assert (pack["form"], pack["form_ratio"]) == (form, ratio)
        assert f"pack form: {form}" in (tmp_path / name / "1_run" / "train.log").read_text()


def test_a_resumed_pack_goes_on_in_the_form_it_trained_in_without_timing_again(tmp_path, monkeypatch):
    monkeypatch.setattr(packed, "time_forms", lambda *args, **kwargs: 1.7)
    file = pack_file(tmp_path, [["seed=0", "resume=true"], ["seed=1", "resume=true"]], "pack", form="auto")
    train_pack(file)
    for number in (0, 1):  # as if killed after its last checkpoint: not finished
        (tmp_path / "pack" / f"{number}_run" / "metrics.json").unlink()

    def no_timing(*args, **kwargs):
        raise AssertionError("a resumed pack timed the forms again")

    monkeypatch.setattr(packed, "time_forms", no_timing)
    train_pack(file)
    pack = read_metrics(tmp_path / "pack" / "1_run")["pack"]
    assert (pack["form"], pack["form_ratio"]) == ("fused", 1.7)


def test_time_forms_measures_both_forms_on_the_device(tmp_path):
    from alexnet_lab.packed import PackedData, build_member, time_forms

    job = read_pack(pack_file(tmp_path, [["seed=0"], ["seed=1"]], "timed")).jobs
    labs = [load(OmegaConf.create(j.config), LabConfig) for j in job]
    data = PackedData([(lab.data, lab.seed) for lab in labs])
    data.prepare_data()
    data.setup("fit")
    members = [
        build_member(i, j, logging.NullHandler(), lab, False, data)
        for i, (j, lab) in enumerate(zip(job, labs, strict=True))
    ]
    before = [p.clone() for p in members[0].module.parameters()]
    state = torch.get_rng_state()
    ratio = time_forms(
        members, data, lab_trainer(labs[0], tmp_path / "timed", [], [], enable_checkpointing=False), steps=1
    )
    assert math.isfinite(ratio) and ratio > 0
    assert torch.equal(torch.get_rng_state(), state), "timing drew from the run's random numbers"
    assert all(torch.equal(a, b) for a, b in zip(before, members[0].module.parameters(), strict=True))


def test_changing_one_member_leaves_the_others_bit_identical(tmp_path):
    base = [["seed=0", "model.dropout=0.5", "data.augment=true"], ["seed=1"], ["seed=2", "model.dropout=0.5"]]
    train_pack(pack_file(tmp_path, base, "base"))
    expected = [history(read_metrics(tmp_path / "base" / f"{n}_run")) for n in range(3)]
    for name, change in (("lr", "optim.lr=0.01"), ("seed", "seed=7")):
        variants = [base[0], base[1], [*base[2], change]]
        train_pack(pack_file(tmp_path, variants, name))
        got = [history(read_metrics(tmp_path / name / f"{n}_run")) for n in range(3)]
        assert got[:2] == expected[:2], f"changing member 2's {name} changed another member"
        assert got[2] != expected[2], f"member 2's {name} made no difference: the change did not reach it"


def test_a_member_that_diverges_stops_alone(tmp_path):
    results = train_pack(pack_file(tmp_path, [["optim.lr=1e6"], ["seed=0"]], "pack", epochs=3))
    diverged, healthy = (read_metrics(tmp_path / "pack" / f"{n}_run") for n in range(2))
    assert diverged["status"] == "diverged" and diverged["epochs"] == 1 and "diverged" in diverged["verdicts"]
    assert not math.isfinite(diverged["history"][0]["train/loss"])
    assert healthy["status"] == "ok" and healthy["epochs"] == 3
    assert [r["status"] for r in results.values()] == ["diverged", "ok"]
    # its weights stopped where it stopped: last.ckpt of epoch 0, its history ends there
    last = torch.load(tmp_path / "pack" / "0_run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and len(last["callbacks"]["RunState"]["history"]) == 1
    log = (tmp_path / "pack" / "0_run" / "train.log").read_text()
    assert "diverged at epoch 0" in log
    assert "diverged at epoch" not in (tmp_path / "pack" / "1_run" / "train.log").read_text()


def test_a_member_checkpoint_holds_its_own_weights_and_optimizer_state(tmp_path):
    train_pack(pack_file(tmp_path, [["seed=0"], ["seed=1", "optim.lr=0.01"]], "pack"))
    checkpoints = [
        torch.load(tmp_path / "pack" / f"{n}_run" / "checkpoints" / "last.ckpt", weights_only=True) for n in range(2)
    ]
    for number, checkpoint in enumerate(checkpoints):
        module = AlexNetClassifier(**checkpoint["hyper_parameters"])
        module.load_state_dict(checkpoint["state_dict"])  # strict: exactly one run's weights
        (group,) = checkpoint["optimizer_states"][0]["param_groups"]
        assert group["lr"] == (0.001, 0.01)[number]
        assert len(group["params"]) == len(list(module.parameters()))
        torch.optim.Adam(module.parameters()).load_state_dict(checkpoint["optimizer_states"][0])
        assert checkpoint["pack"]["member"] == number and checkpoint["pack"]["size"] == 2
        assert checkpoint["preprocessing"]["image_size"] == 64
    assert not torch.equal(
        checkpoints[0]["state_dict"]["net.classifier.fc6.weight"],
        checkpoints[1]["state_dict"]["net.classifier.fc6.weight"],
    )


def test_optimizer_states_slice_and_merge_back():
    nets = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)]
    optimizer = torch.optim.Adam(
        [{"params": list(n.parameters()), "lr": lr} for n, lr in zip(nets, (0.1, 0.2), strict=True)]
    )
    for net in nets:
        net(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    parts = [optimizer_slice(state, group) for group in range(2)]
    assert [p["param_groups"][0]["lr"] for p in parts] == [0.1, 0.2]
    assert parts[1]["param_groups"][0]["params"] == [0, 1]
    merged = optimizer_merge(parts)
    assert merged["param_groups"] == state["param_groups"]
    assert all(torch.equal(merged["state"][k]["exp_avg"], state["state"][k]["exp_avg"]) for k in state["state"])


# ----------------------------------------------------------------------------- the plan


def job(number: int, *overrides: str) -> PackJob:
    config = OmegaConf.to_container(compose_config(*overrides), resolve=True)
    return PackJob(number, f"/runs/{number}", list(overrides), config)


def test_jobs_that_differ_in_shape_optimizer_or_epochs_do_not_share_a_pack():
    jobs = [job(n, f"model.downscale={d}", f"seed={s}") for n, (d, s) in enumerate([(8, 0), (8, 1), (16, 0), (16, 1)])]
    packs = plan(jobs, max_size=16)
    assert [[j.job for j in p.jobs] for p in packs] == [[0, 1], [2, 3]]
    lines = describe(packs, 16)
    assert lines[0] == (
        "packed sweep: 4 jobs in 2 packs (at most 16 members a pack; "
        "each pack times fused against in turn, fused if 1.2x as fast)"
    )
    assert "pack 0: 2 jobs (#0-1): members differ in seed" in lines[1]
    assert "cannot share a pack with pack 0: model.downscale=16" in lines[2]
    for apart in (
        "optim=sgd",
        "trainer.max_epochs=3",
        "data.image_size=128",
        "data.batch_size=32",
        "data.split_seed=1",
    ):
        assert pack_key(job(0).config) != pack_key(job(1, apart).config), apart
    for together in (
        "seed=3",
        "model.dropout=0.5",
        "optim.lr=0.1",
        "data.balance=true",
        "data.augment=true",
        "data.augmentation.flip=0.9",
        "verdicts.window=3",
        "divergence.max_train_loss=5",
        "resume=true",
    ):
        assert pack_key(job(0).config) == pack_key(job(1, together).config), together


def test_a_large_group_splits_into_even_packs_and_what_cannot_pack_trains_alone():
    jobs = [job(n, f"seed={n}") for n in range(5)] + [job(5, "scheduler=cosine")]
    packs = plan(jobs, max_size=2)
    assert [len(p.jobs) for p in packs] == [2, 2, 1, 1]
    assert packs[3].alone == "scheduler=cosine: a pack steps no learning-rate schedule"
    lines = describe(packs, 2)
    assert "split from pack 0: at most 2 members a pack" in lines[2]
    assert "pack 3: 1 job (#5) trains alone: scheduler=cosine" in lines[4]
    assert alone_reason(job(0, "trainer.devices=2").config) == "trainer.devices=2: a pack trains on one device"
    assert alone_reason(job(0, "callbacks=[default,lr_monitor]").config).startswith(
        "callbacks.lr_monitor: a pack keeps only"
    )
    assert alone_reason(job(0, "callbacks=[default,early_stopping]").config) is None


# ----------------------------------------------------------------------------- the command


def test_a_packed_sweep_prints_its_plan_and_gives_runs_every_command_takes(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "seed=0,1,2,3",
        *overrides_of(tmp_path, [], epochs=2),
        "hydra/sweeper=packed",
        f"hydra.sweep.dir={sweep}",
    ]
    code, out, err = run_in_process(args)
    assert code == 0, err[-3000:]
    assert "packed sweep: 4 jobs in 1 packs" in out and "pack 0: 4 jobs (#0-3): members differ in seed" in out
    runs = sorted(p for p in sweep.iterdir() if p.name[0].isdigit())
    assert [r.name.split("_")[0] for r in runs] == ["0", "1", "2", "3"]
    metrics = [read_metrics(run) for run in runs]
    assert [(m["status"], m["seed"], m["epochs"], m["pack"]["member"], m["pack"]["size"]) for m in metrics] == [
        ("ok", seed, 2, seed, 4) for seed in range(4)
    ]
    assert all((run / ".hydra" / "config.yaml").exists() and list(run.glob("events.out.tfevents.*")) for run in runs)
    assert len({json.dumps(history(m)) for m in metrics}) == 4, "four seeds, four histories"
    # the report, eval and predict take them as any runs
    report = (sweep / "report.md").read_text()
    assert "4 runs, 4 finished" in report
    evaluated = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"ckpt_path={runs[2]}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    result = json.loads(next(runs[2].glob("eval_*.json")).read_text())
    assert result["acc"] == pytest.approx(metrics[2]["test_acc"]) and result["images"] == len(
        metrics[2]["test_set"]["true"]
    )
    image = next((tmp_path / "raw" / "cat").glob("*"))
    predicted = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), f"ckpt_path={runs[1]}", str(image)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert predicted.returncode == 0 and image.name in predicted.stdout, predicted.stderr[-2000:]
    # resume=true: every member finished, none trained again
    code, out, err = run_in_process([*args, "resume=true"])
    assert code == 0 and (out + err).count("already finished") == 4, err[-2000:]


@pytest.mark.parametrize(
    "setting, says",
    [
        ("max_size=0", "max_size=0: must be an integer >= 1 (the most runs one pack trains)"),
        ("form=fast", "form=fast: must be one of auto, fused, in_turn (how a pack runs its members)"),
    ],
)
def test_a_bad_pack_setting_is_one_line(tmp_path, setting, says):
    code, out, err = run_in_process(
        [
            "-m",
            "seed=0,1",
            *overrides_of(tmp_path, []),
            "hydra/sweeper=packed",
            f"hydra.sweeper.{setting}",
            f"hydra.sweep.dir={tmp_path / 's'}",
        ]
    )
    assert code == 2
    assert err.strip() == f"error: hydra.sweeper.{says}"
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").glob("*/metrics.json")), "nothing trained"


def test_a_job_with_a_bad_value_fails_alone_and_the_pack_trains(tmp_path):
    sweep = tmp_path / "sweep"
    code, out, err = run_in_process(
        [
            "-m",
            "model.downscale=16,0",
            "seed=0,1",
            *overrides_of(tmp_path, [], epochs=1),
            "hydra/sweeper=packed",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert code == 1
    assert "error: model.downscale=0: must be an integer in [1, 96]" in err
    statuses = {p.name: read_metrics(p)["status"] for p in sweep.iterdir() if p.name[0].isdigit()}
    assert sorted(statuses.values()) == ["failed", "failed", "ok", "ok"]
    assert "packed sweep: 2 jobs in 1 packs" in out


# ----------------------------------------------------------------------------- interrupted packs


LONG = ["data.synthetic.counts={cat:60,dog:40}", "data.augment=true", "model.dropout=0.5", "checkpoint_every=3"]


@pytest.mark.slow
def test_kill_9_in_a_pack_then_resume_gives_the_uninterrupted_figures(tmp_path):
    # fused (auto would time the forms afresh for the uninterrupted sweep, and might choose the other one)
    args = ["-m", "seed=0,1,2", *tiny_overrides(tmp_path, epochs=8), *LONG, "hydra/sweeper=packed"]
    args.append("hydra.sweeper.form=fused")
    whole = run_train([*args, f"hydra.sweep.dir={tmp_path / 'whole'}"], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args, f"hydra.sweep.dir={killed}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(killed.glob("2_*/checkpoints/last.ckpt")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not list(killed.glob("*/metrics.json")), "the pack finished before the kill"
    resumed = run_train([*args, f"hydra.sweep.dir={killed}", "resume=true"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from epoch 3" in resumed.stdout + resumed.stderr
    for seed in range(3):
        (a,), (b,) = (tmp_path / "whole").glob(f"{seed}_*"), killed.glob(f"{seed}_*")
        assert history(read_metrics(b)) == history(read_metrics(a))
        assert read_metrics(b)["test_set"] == read_metrics(a)["test_set"]
        assert read_metrics(b)["pack"]["form"] == "fused"


@pytest.mark.slow
def test_ctrl_c_stops_a_pack_cleanly_and_it_resumes(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "seed=0,1",
        *tiny_overrides(tmp_path, epochs=8),
        *LONG,
        "hydra/sweeper=packed",
        f"hydra.sweep.dir={sweep}",
    ]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not list(sweep.glob("1_*/checkpoints/last.ckpt")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    stopped = [read_metrics(run) for run in sorted(sweep.glob("[01]_*"))]
    assert [m["status"] for m in stopped] == ["interrupted", "interrupted"] and all(m["epochs"] >= 3 for m in stopped)
    resumed = run_train([*args, "resume=true"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [read_metrics(run)["status"] for run in sorted(sweep.glob("[01]_*"))] == ["ok", "ok"]


def test_out_of_memory_is_one_line_naming_the_limit_and_every_member_records_it(tmp_path, monkeypatch):
    from alexnet_lab.errors import LabError
    from alexnet_lab.packed import PackedClassifier

    def out_of_memory(self, batch, batch_idx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(PackedClassifier, "training_step", out_of_memory)
    with pytest.raises(LabError, match=r"^out of memory training a pack of 2 runs .*: lower hydra.sweeper.max_size$"):
        train_pack(pack_file(tmp_path, [["seed=0"], ["seed=1"]], "pack"))
    for number in range(2):
        failed = read_metrics(tmp_path / "pack" / f"{number}_run")
        assert failed["status"] == "failed" and "lower hydra.sweeper.max_size" in failed["error"]


def test_a_pack_larger_than_the_gpu_holds_trains_in_parts(monkeypatch):
    from alexnet_lab import packed

    members = [type("M", (), {"lab": type("L", (), {"trainer": {"accelerator": "auto"}})()})() for _ in range(5)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(2.6 * 2**30), 80 * 2**30))
    monkeypatch.setattr(packed, "member_bytes", lambda member, data: 2**30)  # 1 GiB each: 2 fit in 80 % of 2.6
    assert [len(part) for part in packed.fitting(members, None)] == [2, 2, 1]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 2**30, 80 * 2**30))
    assert [len(part) for part in packed.fitting(members, None)] == [5]


def test_a_member_needs_more_memory_the_wider_and_larger_it_is(tmp_path):
    from alexnet_lab import packed

    sizes = {}
    for downscale, image_size in ((16, 64), (16, 128), (4, 64)):
        data = type("D", (), {"data": type("C", (), {"image_size": image_size, "batch_size": 8})(), "in_channels": 1})()
        model = {"arch": "notebook", "downscale": downscale, "dropout": 0.0, "lrn": False}
        module = type("Mod", (), {"hparams": {"model": model, "classes": ["a", "b"]}})()
        sizes[downscale, image_size] = packed.member_bytes(type("M", (), {"module": module})(), data)
    assert sizes[16, 64] < sizes[16, 128] and sizes[16, 64] < sizes[4, 64]
    assert sizes[16, 128] > 3 * sizes[16, 64] // 2  # activations grow with the image's area


@pytest.mark.parametrize("setting", ["+trainer.accumulate_grad_batches=2", "+trainer.gradient_clip_val=0.05"])
def test_lightning_settings_act_on_each_member_as_on_the_run_alone(tmp_path, setting):
    # accumulation and clipping by norm are per member: the same numbers as each job alone
    variants = [[setting, "seed=0"], [setting, "seed=1", "model.dropout=0.5"]]
    train_pack(pack_file(tmp_path, variants, "packed"))
    for number, variant in enumerate(variants):
        overrides = overrides_of(tmp_path, variant)
        train(compose_config(*overrides), tmp_path / "alone" / str(number), overrides)
        packed, alone = (read_metrics(tmp_path / name) for name in (f"packed/{number}_run", f"alone/{number}"))
        assert history(packed) == history(alone)
