"""Effect or noise: intervals against known answers, verdicts on sweeps whose truth the test wrote."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from conftest import CONF_DIR, compose_config, tiny_overrides
from hydra import initialize_config_dir
from omegaconf import OmegaConf
from scipy import stats as scipy_stats
from test_report import history, make_run, with_changes

from alexnet_lab import stats
from alexnet_lab.callbacks import _sweep_size
from alexnet_lab.effects import effects, summary, verdict
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
    found = stats.difference(a, b, paired=False)
    interval = found.interval()
    assert interval.value == pytest.approx(0.22) and found.seed_df == pytest.approx(df)
    assert interval.low == pytest.approx(0.22 - half) and interval.high == pytest.approx(0.22 + half)
    ci = scipy_stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)  # scipy's own Welch
    assert (interval.low, interval.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert found.spread == pytest.approx(np.var(a, ddof=1) + np.var(b, ddof=1))  # seed_var = spread / n a side


def test_paired_interval_of_a_known_case():
    # seed s of b against seed s of a: the differences 0.05, 0.06, 0.04 carry the noise, not the seeds' levels
    a, b = [0.60, 0.70, 0.80], [0.65, 0.76, 0.84]
    d = np.array([0.05, 0.06, 0.04])
    half = 4.302652729911275 * d.std(ddof=1) / math.sqrt(3)  # t(0.975, 2 df) * s_d / sqrt(n)
    found = stats.difference(a, b, paired=True)
    interval = found.interval()
    assert interval.value == pytest.approx(d.mean()) and found.seed_df == 2
    assert interval.low == pytest.approx(d.mean() - half) and interval.high == pytest.approx(d.mean() + half)
    assert interval.low > 0  # the pairs agree: better, where Welch over the same numbers cannot tell
    assert stats.difference(a, b, paired=False).interval().low < 0


def right_per_image(true: list[int], preds: list[list[int]]) -> np.ndarray:
    """(runs, images): 1 where a run got the image right."""
    return np.array([np.equal(p, true) for p in preds], dtype=float)


def test_the_images_noise_that_seeds_share_against_a_hand_computation():
    # a small fixed set: 12 test images, two seeds a side; b's nets get images 0-3 right where a's get them wrong
    true = [0, 1] * 6
    flip = lambda pred, images: [1 - p if i in images else p for i, p in enumerate(pred)]  # noqa: E731
    preds_a = [flip(true, {0, 1, 2, 3, 5}), flip(true, {0, 1, 2, 3, 8})]
    preds_b = [flip(true, {7}), flip(true, {10, 11})]
    a, b = right_per_image(true, preds_a), right_per_image(true, preds_b)
    n = len(true)
    cov = lambda x, y: np.mean((x - x.mean()) * (y - y.mean())) / n  # noqa: E731  (of two means over resampled images)
    shared = cov(b[0], b[1]) + cov(a[0], a[1]) - (cov(a[0], b[1]) + cov(a[1], b[0]))  # seeds 0, 1 a side
    got = stats.image_variance(stats.accuracy, true, preds_a, preds_b, ["0", "1"], ["0", "1"])
    assert got == pytest.approx(shared, rel=0.1)  # 2000 resamples: a few % off
    # one run a side: the shared part cannot be told from the rest, all of it counts
    whole = np.var(b[0] - a[0]) / n
    assert stats.image_variance(stats.accuracy, true, preds_a[:1], preds_b[:1]) == pytest.approx(whole, rel=0.1)
    assert stats.image_variance(stats.accuracy, true, preds_a, preds_a, ["0", "1"], ["0", "1"]) == 0


def test_images_each_net_gets_wrong_on_its_own_are_the_seeds_noise_not_the_test_sets():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 2, 300).tolist()
    own = lambda share: [[t if rng.random() < share else 1 - t for t in true] for _ in range(4)]  # noqa: E731
    naive = stats.image_variance(stats.accuracy, true, own(0.8)[:1], own(0.8)[:1])  # one pair: all of it
    shared = stats.image_variance(stats.accuracy, true, own(0.8), own(0.8), list("0123"), list("0123"))
    assert naive > 0.0008 and shared < naive / 10  # independent errors: nothing that more seeds would not average


def test_seeds_and_test_images_add_their_half_widths_in_quadrature():
    found = stats.difference([0.70, 0.80], [0.85, 0.90], paired=True, image_var=0.0004, images=288)
    vs = found.seed_var
    assert vs == pytest.approx(np.var([0.15, 0.10], ddof=1) / 2) and found.seed_df == 1
    seeds_half = 12.706204736174696 * math.sqrt(vs)  # t(0.975, 1 df): the seeds'
    images_half = scipy_stats.t.ppf(0.975, 287) * 0.02  # t(0.975, 287 df) * sqrt(0.0004): the images'
    assert found.interval().high - 0.125 == pytest.approx(math.hypot(seeds_half, images_half))
    assert found.interval(images=False).high - 0.125 == pytest.approx(seeds_half)
    assert found.interval().low < found.interval(images=False).low  # the images' noise only ever widens it
    point = stats.difference([0.75, 0.75], [0.875, 0.875], paired=True, image_var=0.0004, images=288)
    assert point.interval().high - 0.125 == pytest.approx(images_half)  # seeds all alike: the images' alone
    assert point.interval(images=False) == stats.Interval(0.125, 0.125, 0.125)


def test_the_seeds_a_step_needs_follow_steins_rule():
    # pilot: 10 seeds, spread 0.02 per pair: t(0.975, 9) = 2.262; an interval of +-0.01 needs t^2 s^2 / h^2 seeds
    found = stats.Difference(0.01, True, (10, 10), seed_var=0.0004 / 10, seed_df=9, spread=0.0004)
    assert found.seeds_for(0.01) == math.ceil(2.2621571627409915**2 * 0.0004 / 0.0001) == 21
    with_images = stats.Difference(0.01, True, (10, 10), 0.0004 / 10, 9, 0.0004, image_var=0.00001, images=288)
    room = 0.01**2 - scipy_stats.t.ppf(0.975, 287) ** 2 * 0.00001  # the images' part never shrinks
    assert with_images.seeds_for(0.01) == math.ceil(2.2621571627409915**2 * 0.0004 / room) == 34
    noisy = stats.Difference(0.01, True, (10, 10), 0.0004 / 10, 9, 0.0004, image_var=0.0001, images=288)
    assert noisy.seeds_for(0.01) is None  # the test images alone are wider than +-0.01: no number of seeds will do
    assert stats.Difference(0.01, False, (1, 1)).seeds_for(0.01) is None  # one seed a side: no spread to size from
    assert found.seeds_for(0.5) == 11  # already narrow enough: at least one seed more than it has


@pytest.mark.parametrize(
    ("low", "high", "seeds_known", "expected"),
    [
        (0.01, 0.05, True, "better"),
        (-0.05, -0.001, True, "worse"),
        (-0.016, 0.019, True, "no effect beyond ±0.02"),  # the whole interval inside +-delta
        (-0.039, 0.008, True, "unsettled"),  # could still be 0.039 worse
        (-0.016, 0.019, False, "unsettled"),  # inside, but the seeds' noise is unknown: nothing to claim
        (math.nan, math.nan, True, "unsettled"),
    ],
)
def test_each_verdict_claims_what_its_interval_supports(low, high, seeds_known, expected):
    value = (low + high) / 2 if math.isfinite(low) else math.nan
    assert verdict(stats.Interval(value, low, high), 0.02, seeds_known) == expected


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


def seeds_sweep(tmp_path, values: dict[str, list[float]], overrides: list[str] | None = None) -> list:
    """One experiment per step, one run per seed, test balanced accuracy as given; ``overrides``: the command
    line's besides the step and the seed, written to each run's .hydra/overrides.yaml (none written if None)."""
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
                overrides=None if overrides is None else [f"experiment={step}", f"seed={seed}", *overrides],
            )
            job += 1
    return group_runs(load_runs(tmp_path))


def test_same_seeds_pair_up_a_real_effect_is_better_and_noise_is_unsettled_with_its_seed_count(tmp_path):
    experiments = seeds_sweep(
        tmp_path,
        {
            "s0_bare": [0.70, 0.72, 0.71],
            "s1_dropout": [0.80, 0.81, 0.82],  # +0.10, far beyond the seed noise
            "s2_augment": [0.79, 0.83, 0.80],  # the same as dropout, within noise
        },
    )
    found = effects(experiments)
    assert [(e.experiment, e.verdict) for e in found] == [("s1_dropout", "better"), ("s2_augment", "unsettled")]
    assert all(e.method.startswith("paired by seed, 3 seeds") and "no test images" in e.method for e in found)
    assert (
        found[0].baseline == "s0_bare" and found[1].baseline == "s1_dropout" and found[0].differs == "model.dropout=0.5"
    )
    d = np.array([0.79, 0.83, 0.80]) - np.array([0.80, 0.81, 0.82])
    # Stein: t(0.975, 2 df)^2 s_d^2 / h^2 seeds a side; h = delta tells an effect beyond delta from none,
    # h = delta / 2 settles it whatever the effect
    needed, settles = (math.ceil(4.302652729911275**2 * np.var(d, ddof=1) / h**2) for h in (0.02, 0.01))
    assert found[1].seeds_needed == needed == 21
    assert found[1].needs == f"{needed} seeds a side for ±0.02 (has 3); {settles} settle it whatever the effect"
    assert found[0].seeds_needed is None and found[0].needs == ""
    assert found[1].family == 2 and found[1].simultaneous.high - found[1].simultaneous.low > (
        found[1].difference.high - found[1].difference.low
    )


def test_unequal_seed_sets_fall_back_to_welch(tmp_path):
    experiments = seeds_sweep(tmp_path, {"s0_bare": [0.70, 0.72, 0.71, 0.69], "s1_dropout": [0.80, 0.81, 0.82]})
    (effect,) = effects(experiments)
    assert effect.method.startswith("Welch, 3 vs 4 seeds") and effect.seeds == (4, 3)
    welch = stats.difference([0.70, 0.72, 0.71, 0.69], [0.80, 0.81, 0.82], paired=False).interval()
    assert effect.difference == welch and effect.verdict == "better"


def test_no_effect_beyond_delta_needs_the_whole_interval_inside(tmp_path):
    close = {"s0_bare": [0.700, 0.720, 0.710, 0.705], "s1_dropout": [0.702, 0.721, 0.709, 0.707]}
    (effect,) = effects(seeds_sweep(tmp_path / "a", close))
    assert (
        effect.verdict == "no effect beyond ±0.02" and -0.02 <= effect.difference.low < effect.difference.high <= 0.02
    )
    (strict,) = effects(seeds_sweep(tmp_path / "b", close), delta=0.001)
    assert strict.verdict == "unsettled" and strict.seeds_needed is not None  # delta is the report's to choose
    sentences = summary(seeds_sweep(tmp_path / "c", close), [effect])
    assert any(s.startswith("No effect beyond ±0.02 on test_balanced_acc: s1_dropout (") for s in sentences)


def test_a_step_that_helps_on_some_images_carries_their_noise_in_its_interval(tmp_path):
    rng = np.random.default_rng(3)
    true = rng.integers(0, 2, 200).tolist()
    helped = set(range(30))  # images the step's nets get right and the baseline's get wrong, whatever the seed
    job = 0
    for step, changes in (("s0_bare", {}), ("s1_dropout", {"model": {"dropout": 0.5}})):
        for seed in range(3):
            pred = [t if rng.random() < 0.8 else 1 - t for t in true]
            pred = [
                (t if step == "s1_dropout" else 1 - t) if i in helped else p
                for i, (t, p) in enumerate(zip(true, pred, strict=True))
            ]
            accuracy = stats.balanced_accuracy(np.array(true), np.array(pred))
            make_run(
                tmp_path,
                f"{job}_{step},seed={seed}",
                config=with_changes(seed=seed, **changes),
                experiment=step,
                metrics={"test_balanced_acc": accuracy, "test_set": shared_test_set(true, pred)},
            )
            job += 1
    (effect,) = effects(group_runs(load_runs(tmp_path)))
    assert effect.method == "paired by seed, 3 seeds; and 200 test images" and effect.noise == "seeds and test images"
    assert effect.difference.value == effect.seeds_only.value and effect.verdict == "better"
    # other images would have held other helped ones: the interval is wider than the seeds' on this set alone
    assert effect.difference.high - effect.difference.low > effect.seeds_only.high - effect.seeds_only.low


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
    # the images alone: a small change of the same net is not "no effect" (its seeds' noise is unknown)
    assert [e.verdict for e in found] == ["better", "unsettled"]
    assert all("300 test images only" in e.method and "seed noise unknown" in e.method for e in found)
    assert found[1].seeds_needed == 3 and "seed noise unknown" in found[1].needs
    sentences = summary(group_runs(load_runs(tmp_path)), found)
    assert any("test-set noise only" in sentence for sentence in sentences)
    assert any(s.startswith("s1_dropout") and "test images only: seed noise unknown" in s for s in sentences)


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
    assert effect.verdict == "unsettled" and "no test images shared" in effect.method
    assert math.isnan(effect.difference.low)


def test_a_finding_that_does_not_hold_for_the_family_is_said_to_be_chance(tmp_path):
    # two steps; one just clears 0 at 95 % but not at the 97.5 % that two comparisons ask of each
    values = {
        "s0_bare": [0.700, 0.710, 0.720],
        "s1_dropout": [0.714, 0.730, 0.746],
        "s2_augment": [0.714, 0.730, 0.746],
    }
    experiments = seeds_sweep(tmp_path, values)
    found = effects(experiments)
    first = found[0]
    assert first.verdict == "better" and first.difference.low > 0
    assert first.family == 2 and first.simultaneous.low < 0 < first.simultaneous.high
    assert first.family_verdict == "unsettled"
    (sentence,) = [s for s in summary(experiments, found) if s.startswith("s1_dropout")]
    assert "better" in sentence and "may be chance" in sentence


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
    assert any(s.startswith("Unsettled: s2_augment (") and "seeds a side" in s for s in sentences)
    assert any(s.startswith("2 steps compared.") for s in sentences)
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


# --------------------------------------------------------------------------- more seeds into a sweep dir


def test_the_report_gives_the_command_that_adds_the_seeds_unsettled_steps_need(tmp_path):
    sweep = tmp_path / "sweep"
    values = {"s0_bare": [0.70, 0.72, 0.71], "s1_dropout": [0.71, 0.73, 0.70], "s2_augment": [0.80, 0.82, 0.81]}
    seeds_sweep(sweep, values, ["trainer.max_epochs=15", "resume=true"])
    experiments = group_runs(load_runs(sweep))
    found = effects(experiments)
    assert [e.verdict for e in found] == ["unsettled", "better"]
    report = write_report(sweep)["report.md"].read_text()
    needed = found[0].seeds_needed
    command = (
        f"python train.py -m experiment=s0_bare,s1_dropout 'seed=range({needed})' trainer.max_epochs=15 "
        f"hydra/sweeper=packed hydra.sweep.dir={sweep} resume=true"
    )
    assert report.split("## More seeds", 1)[1].count("python train.py") == 1 and command in report
    assert "| s1_dropout | s0_bare | model.dropout=0.5 | 3 vs 3 |" in report
    assert (
        f"| unsettled | {needed} seeds a side for ±0.02 (has 3)" in report
        and "all 2 steps together (Bonferroni)" in report
    )
    settled = write_report(sweep, delta=0.5)["report.md"].read_text()  # every step settled: nothing to add
    assert "## More seeds" not in settled and "no effect beyond ±0.5" in settled


def test_a_step_out_of_reach_says_so_and_gets_no_command(tmp_path):
    (effect,) = effects(seeds_sweep(tmp_path, {"s0_bare": [0.5, 0.9, 0.7], "s1_dropout": [0.9, 0.5, 0.7]}))
    needed = math.ceil(4.302652729911275**2 * np.var([0.4, -0.4, 0.0], ddof=1) / 0.02**2)
    assert effect.verdict == "unsettled" and effect.seeds_needed is None
    assert effect.needs == f"{needed} seeds a side for ±0.02: out of reach (a larger delta, or less seed noise)"
    assert "## More seeds" not in write_report(tmp_path)["report.md"].read_text()


def test_a_sweep_job_finds_the_dir_that_already_holds_its_run(tmp_path):
    from alexnet_lab.identity import home_of

    sweep = tmp_path / "sweep"
    make_run(sweep, "0_a,seed=0", config=with_changes(seed=0), experiment="a")
    make_run(sweep, "1_a,seed=1", config=with_changes(seed=1), experiment="a")
    make_run(sweep, "5_a,seed=1", config=with_changes(seed=1), experiment="a", metrics={"status": "failed"})
    choices = {"model": "alexnet", "optim": "adam", "data": "synthetic", "experiment": "a", "hydra/sweeper": "packed"}
    job = {**with_changes(seed=1), "resume": True}  # resume, the sweeper: nothing learned
    assert home_of(sweep, job, choices) == "1_a,seed=1"  # by config and seed, the finished one of two
    assert home_of(sweep, with_changes(seed=2), choices) is None  # a new seed: a new dir
    assert home_of(sweep, with_changes(seed=1, model={"dropout": 0.5}), choices) is None
    assert home_of(sweep, with_changes(seed=1), {**choices, "experiment": "b"}) is None
    assert home_of(tmp_path / "nowhere", job, choices) is None
    # a sweep's own jobs, made since it started (its multirun.yaml), are not older runs to continue
    for old in sweep.glob("*/.hydra/config.yaml"):  # written well before the sweep (file times are coarse)
        os.utime(old, ns=(old.stat().st_mtime_ns - 10**9,) * 2)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    make_run(sweep, "7_a,seed=2,logger=csv", config=with_changes(seed=2), experiment="a")  # this sweep's job 7
    assert home_of(sweep, job, choices) == "1_a,seed=1"
    assert home_of(sweep, with_changes(seed=2), choices) is None  # job 8 (logger=none): a dir of its own


def test_two_jobs_of_one_run_identity_in_one_sweep_keep_their_own_dirs(tmp_path):
    from conftest import run_in_process

    # when last.ckpt is saved does not change what is learned: to the run identity these two jobs are one run
    sweep = tmp_path / "sweep"
    args = ["-m", *tiny_overrides(tmp_path), "checkpoint_every=1,5", "resume=true", f"hydra.sweep.dir={sweep}"]
    code, _, err = run_in_process(args)
    assert code == 0, err
    runs = sorted(p.name for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert [name.split("_", 1)[0] for name in runs] == ["0", "1"], runs  # not both in job 0's dir


@pytest.mark.slow
def test_a_sweep_extended_from_two_to_four_seeds_retrains_nothing_that_finished(tmp_path):
    from conftest import run_in_process

    sweep = tmp_path / "sweep"
    common = [*tiny_overrides(tmp_path), "model.dropout=0,0.5", f"hydra.sweep.dir={sweep}"]
    code, _, err = run_in_process(["-m", *common, "seed=0,1"])
    assert code == 0, err
    first = {p.name: (p / "metrics.json").read_bytes() for p in sweep.iterdir() if (p / "metrics.json").is_file()}
    assert len(first) == 4
    # the same sweep with more seeds, packed: job numbers shift (dropout=0.5,seed=0 was job 2, is job 4 now)
    code, _, err = run_in_process(["-m", *common, "seed=0,1,2,3", "resume=true", "hydra/sweeper=packed"])
    assert code == 0, err
    runs = sorted(p.name for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert len(runs) == 8, runs  # never two dirs of one run
    assert all((sweep / name / "metrics.json").read_bytes() == data for name, data in first.items())  # not retrained
    experiments = group_runs(load_runs(sweep))
    assert [len(e.finished) for e in experiments] == [4, 4]
    (effect,) = effects(experiments)
    assert effect.seeds == (4, 4) and effect.method.startswith("paired by seed, 4 seeds")
    assert "4 vs 4" in (sweep / "report.md").read_text()  # the sweep's own report pools them all


def test_the_sweep_report_counts_this_sweeps_jobs_when_more_seeds_join_its_dir(tmp_path):
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode

    from alexnet_lab.callbacks import SweepReport

    make_run(tmp_path, "0_bare,seed=0", config=with_changes(seed=0))  # finished by the sweep before
    config = OmegaConf.create(
        {
            "hydra": {
                "sweep": {"dir": str(tmp_path)},
                "mode": RunMode.MULTIRUN,
                "sweeper": {"params": None},
                "overrides": {"task": ["seed=0,1,2"]},
            }
        }
    )
    callback = SweepReport(html=False, every_s=0.0)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        callback.on_multirun_start(config=config)
    make_run(tmp_path, "1_bare,seed=1", config=with_changes(seed=1))
    callback.on_job_end(config=config, job_return=JobReturn(status=JobStatus.COMPLETED))
    assert "In progress (1 of 3 jobs)" in (tmp_path / "report.md").read_text()  # not "2 of 3": seed 0 was there


def test_the_sweep_reports_settings_default_as_the_effects_do_and_refuse_a_bad_delta(tmp_path, capsys):
    from alexnet_lab.callbacks import SweepReport
    from alexnet_lab.cli import report_command
    from alexnet_lab.effects import DEFAULT_DELTA, DEFAULT_METRIC
    from alexnet_lab.errors import ConfigError

    block = OmegaConf.load(CONF_DIR / "config.yaml").hydra.callbacks.sweep_report
    assert (block.delta, block.metric) == (DEFAULT_DELTA, DEFAULT_METRIC)
    with pytest.raises(ConfigError, match=r"hydra\.callbacks\.sweep_report\.delta=0: must be a number > 0"):
        SweepReport(delta=0)
    make_run(tmp_path, "0_bare")
    with pytest.raises(SystemExit) as stop:
        report_command([str(tmp_path), "--delta", "-0.1"])
    assert (
        stop.value.code == 2
        and capsys.readouterr().err == "error: --delta=-0.1: must be a number > 0 (e.g. 0.02 of an accuracy)\n"
    )
