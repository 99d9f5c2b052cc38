"""Effect or noise: intervals against known answers, verdicts on sweeps whose truth the test wrote."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import CONF_DIR, compose_config, tiny_overrides
from hydra import initialize_config_dir
from omegaconf import OmegaConf
from scipy import stats as scipy_stats
from test_report import history, make_run, with_changes

from alexnet_lab import stats
from alexnet_lab.callbacks import _sweep_size
from alexnet_lab.effects import effects, summary
from alexnet_lab.report import group_runs, load_runs, write_report
from alexnet_lab.train import train
from alexnet_lab.verdicts import phases

# --------------------------------------------------------------------------- intervals, known answers


def test_wilson_interval_of_a_known_case():
    # 85 right of 100: p = 0.85, z = 1.96; Wilson's formula written out
    z, n, p = scipy_stats.norm.ppf(0.975), 100, 0.85
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    interval = stats.wilson(85, 100)
    assert interval.value == 0.85
    assert interval.low == pytest.approx(centre - half, abs=1e-9) and interval.high == pytest.approx(centre + half)
    assert 0.76 < interval.low < 0.77 and 0.90 < interval.high < 0.91
    assert stats.wilson(0, 20).low == 0.0 and stats.wilson(20, 20).high == 1.0  # stays inside [0, 1]


def test_mcnemar_of_two_known_prediction_vectors():
    true = np.zeros(30, dtype=int)
    a = np.zeros(30, dtype=int)
    b = np.zeros(30, dtype=int)
    b[:10] = 1  # a right, b wrong on 10 images
    a[10:12] = 1  # b right, a wrong on 2
    # exact two-sided binomial: 2 * P(X <= 2 | n = 12, p = 1/2) = 2 * (1 + 12 + 66) / 4096
    assert stats.mcnemar(true, a, b) == pytest.approx(2 * 79 / 4096)
    assert stats.mcnemar(true, a, a) == 1.0  # never disagree


def test_the_mean_over_seeds_has_a_t_interval():
    interval = stats.mean_interval([0.6, 0.7, 0.8])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2 degrees of freedom) * s / sqrt(n)
    assert interval.value == pytest.approx(0.7) and interval.low == pytest.approx(0.7 - half)
    assert interval.high == pytest.approx(0.7 + half)
    assert math.isnan(stats.mean_interval([0.7]).low)  # one seed: no interval


def test_welch_interval_of_a_known_case():
    a, b = [0.60, 0.70, 0.80], [0.90, 0.92, 0.94]
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)  # Welch-Satterthwaite
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    interval = stats.welch(a, b)
    assert interval.value == pytest.approx(0.22)
    assert interval.low == pytest.approx(0.22 - half) and interval.high == pytest.approx(0.22 + half)


def test_bootstraps_cover_the_value_and_narrow_with_more_images():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 2, 400)
    pred = np.where(rng.random(400) < 0.8, true, 1 - true)
    small, large = (
        stats.bootstrap(stats.balanced_accuracy, true[:100], pred[:100]),
        stats.bootstrap(stats.balanced_accuracy, true, pred),
    )
    assert small.low < small.value < small.high and large.low < large.value < large.high
    assert large.high - large.low < small.high - small.low
    assert stats.bootstrap(stats.balanced_accuracy, true, pred) == large  # seeded: the same every time


# --------------------------------------------------------------------------- learning phases


def test_learning_phases_of_a_hand_written_history():
    # the notebook's first run: one class for 3 epochs, a peak, back to chance, then it learns for good
    bal = [0.50, 0.50, 0.50, 0.80, 0.52, 0.60, 0.70, 0.75]
    cat = [1.00, 0.99, 0.97, 0.55, 0.60, 0.55, 0.50, 0.52]
    acc = [0.59, 0.59, 0.60, 0.81, 0.60, 0.65, 0.72, 0.76]
    rows = [
        {"epoch": e, "val/balanced_acc": b, "val/acc": a, "val/pred_frac/cat": c, "val/pred_frac/dog": 1 - c}
        for e, (b, c, a) in enumerate(zip(bal, cat, acc, strict=True))
    ]
    assert phases(rows) == {"collapsed_epochs": [0, 1, 2], "left_chance_epoch": 5, "best_epoch": 3}
    assert phases(rows[:5])["left_chance_epoch"] is None  # ends at chance: never left it for good
    assert phases([]) == {"collapsed_epochs": [], "left_chance_epoch": None, "best_epoch": None}


# --------------------------------------------------------------------------- verdicts on written sweeps


def shared_test_set(true: list[int], pred: list[int]) -> dict:
    return {"data": "abc", "split_seed": 0, "true": true, "pred": pred}


def seeds_sweep(tmp_path, values: dict[str, list[float]]) -> list:
    """One experiment per step, one run per seed, test balanced accuracy as given."""
    job = 0
    steps = {
        "s0_bare": {},
        "s1_dropout": {"model": {"dropout": 0.5}},
        "s2_augment": {"model": {"dropout": 0.5}, "data": {"augment": True}},
    }
    for step, accs in values.items():
        for seed, acc in enumerate(accs):
            make_run(
                tmp_path,
                f"{job}_{step},seed={seed}",
                config=with_changes(seed=seed, **steps[step]),
                metrics={"test_balanced_acc": acc},
                experiment=step,
            )
            job += 1
    return group_runs(load_runs(tmp_path))


def test_with_seeds_a_real_effect_is_better_and_noise_is_no_clear_difference(tmp_path):
    experiments = seeds_sweep(
        tmp_path,
        {
            "s0_bare": [0.70, 0.72, 0.71],
            "s1_dropout": [0.80, 0.81, 0.82],  # +0.10, far beyond the seed noise
            "s2_augment": [0.79, 0.83, 0.80],  # the same as dropout, within noise
        },
    )
    found = effects(experiments)
    assert [(e.experiment, e.verdict) for e in found] == [
        ("s1_dropout", "better"),
        ("s2_augment", "no clear difference"),
    ]
    assert found[0].difference.low > 0 and found[1].difference.low < 0 < found[1].difference.high
    assert all(e.method.startswith("Welch's interval over 3 vs 3 seeds") for e in found)
    assert (
        found[0].baseline == "s0_bare" and found[1].baseline == "s1_dropout" and found[0].differs == "model.dropout=0.5"
    )


def test_with_one_seed_the_test_images_are_paired_and_seed_noise_is_unknown(tmp_path):
    rng = np.random.default_rng(1)
    true = rng.integers(0, 2, 300).tolist()
    flip = lambda share: [t if rng.random() < share else 1 - t for t in true]  # noqa: E731
    pred = {"s0_bare": flip(0.70), "s1_dropout": flip(0.90)}
    # the same model but for 5 images it now gets right and 5 it now gets wrong: noise, not an effect
    right = [i for i, (t, p) in enumerate(zip(true, pred["s1_dropout"], strict=True)) if t == p]
    wrong = [i for i, (t, p) in enumerate(zip(true, pred["s1_dropout"], strict=True)) if t != p]
    pred["s2_augment"] = list(pred["s1_dropout"])
    for i in right[:5] + wrong[:5]:
        pred["s2_augment"][i] = 1 - pred["s2_augment"][i]
    for job, step in enumerate(("s0_bare", "s1_dropout", "s2_augment")):
        changes = {
            "s0_bare": {},
            "s1_dropout": {"model": {"dropout": 0.5}},
            "s2_augment": {"model": {"dropout": 0.5}, "data": {"augment": True}},
        }[step]
        accuracy = stats.balanced_accuracy(np.array(true), np.array(pred[step]))
        make_run(
            tmp_path,
            f"{job}_{step}",
            config=with_changes(**changes),
            experiment=step,
            metrics={"test_balanced_acc": accuracy, "test_set": shared_test_set(true, pred[step])},
        )
    found = effects(group_runs(load_runs(tmp_path)))
    assert [e.verdict for e in found] == ["better", "no clear difference"]
    assert all("paired bootstrap over 300 test images" in e.method and "seed noise unknown" in e.method for e in found)
    sentences = summary(group_runs(load_runs(tmp_path)), found)
    assert any("test-set noise only" in sentence for sentence in sentences)


def test_runs_on_other_test_images_are_not_paired(tmp_path):
    make_run(tmp_path, "0_a", metrics={"test_set": shared_test_set([0, 1], [0, 1])}, experiment="a")
    make_run(
        tmp_path,
        "1_b",
        config=with_changes(seed=3, model={"dropout": 0.5}),
        experiment="b",
        metrics={"test_set": {**shared_test_set([0, 1], [1, 1]), "data": "other"}},
    )
    (effect,) = effects(group_runs(load_runs(tmp_path)))
    assert effect.verdict == "unknown" and effect.method.startswith("no interval")


def test_summary_sentences_never_claim_more_than_the_intervals(tmp_path):
    experiments = seeds_sweep(
        tmp_path, {"s0_bare": [0.70, 0.72, 0.71], "s1_dropout": [0.80, 0.81, 0.82], "s2_augment": [0.79, 0.83, 0.80]}
    )
    found = effects(experiments)
    sentences = summary(experiments, found)
    assert 3 <= len(sentences) <= 6
    for effect in found:
        claims = [s for s in sentences if s.startswith(f"{effect.experiment} ") and ("better" in s or "worse" in s)]
        assert bool(claims) == effect.difference.excludes(0.0)
    assert any(s.startswith("No clear difference") and "s2_augment" in s for s in sentences)
    assert any("seed noise measured" in s for s in sentences)
    report = write_report(tmp_path)["report.md"].read_text()
    assert report.index("s1_dropout (model.dropout=0.5): better") < report.index("## Runs")  # the answer first


def test_a_run_that_never_left_chance_is_said_so(tmp_path):
    flat = history(val_acc=(0.5, 0.5))
    for row in flat:
        row["val/balanced_acc"] = 0.5
    make_run(tmp_path, "0_sgd", rows=flat, experiment="sgd")
    (sentence,) = [s for s in summary(group_runs(load_runs(tmp_path)), []) if s.startswith("Never left chance")]
    assert "sgd" in sentence


# --------------------------------------------------------------------------- what a run and a sweep record


def test_a_run_records_its_test_intervals_phases_and_test_images(tmp_path):
    metrics = train(compose_config(*tiny_overrides(tmp_path, epochs=2)), tmp_path / "run")
    low, high = metrics["test_acc_ci"]
    assert low <= metrics["test_acc"] <= high and 0 <= low < high <= 1
    low, high = metrics["test_balanced_acc_ci"]
    assert low <= metrics["test_balanced_acc"] <= high
    test_set = metrics["test_set"]
    assert len(test_set["true"]) == len(test_set["pred"]) and test_set["data"]
    right = sum(t == p for t, p in zip(test_set["true"], test_set["pred"], strict=True))
    assert right / len(test_set["true"]) == pytest.approx(metrics["test_acc"])  # the very predictions tested
    assert set(metrics["phases"]) == {"collapsed_epochs", "left_chance_epoch", "best_epoch"}


@pytest.mark.parametrize(
    ("overrides", "jobs"),
    [(["seed=0,1,2"], 3), (["seed=0,1,2", "model.downscale=8,16"], 6), (["experiment=glob(ablation_*)"], 9)],
)
def test_the_report_knows_how_many_jobs_a_sweep_has(overrides, jobs):
    config = OmegaConf.create({"hydra": {"sweeper": {"params": None}, "overrides": {"task": overrides}}})
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        assert _sweep_size(config) == jobs
