"""How sure a number is: 95 % intervals for one run's test results and for differences between experiments.

Two sources of noise. The test set is a sample: a run's test accuracy has a Wilson interval,
its balanced accuracy a bootstrap interval over the test images, and McNemar's exact test says
whether two runs err on different images more than chance would have it. Training is random
too: with several seeds per experiment, the mean has a t interval, and two experiments differ
by a :class:`Difference` that holds both noises: the seeds' (paired by seed where both sides
ran the same seeds, else Welch's) and the test images' (a bootstrap that scores every run on the
same resample). It also says how many seeds an interval of a given width needs (Stein's
two-stage rule). scipy does the distributions; the bootstraps are seeded, so a report is the
same every time it is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
BOOTSTRAP_REPS = 2000  # resamples; the interval's ends move by about 0.002 between seeds of the bootstrap
BOOTSTRAP_SEED = 0

Metric = Callable[[np.ndarray, np.ndarray], Any]  # (true, predicted) class indices (..., N) -> a number per row


def accuracy(true: np.ndarray, pred: np.ndarray) -> Any:
    """Share of right answers over the last axis: a float for (N,) classes, one per row for (R, N)."""
    return np.mean(true == pred, axis=-1) if true.shape[-1] else math.nan


def balanced_accuracy(true: np.ndarray, pred: np.ndarray) -> Any:
    """Mean recall over the classes present in ``true`` (as alexnet_lab.metrics computes it), over the last axis.

    ``true``, ``pred``: (N,) class indices (a float), or (R, N), one resample of the images per row
    (one value per row; a class a row lacks is left out of that row's mean).
    """
    if not true.shape[-1]:
        return math.nan
    with np.errstate(invalid="ignore", divide="ignore"):  # a class absent from a resample: left out (NaN)
        recalls = [np.sum((true == c) & (pred == c), axis=-1) / np.sum(true == c, axis=-1) for c in np.unique(true)]
    return np.nanmean(recalls, axis=0)


METRICS: dict[str, Metric] = {"test_acc": accuracy, "test_balanced_acc": balanced_accuracy}


@dataclass(frozen=True)
class Interval:
    """A number and its 95 % interval."""

    value: float
    low: float
    high: float

    def excludes(self, x: float) -> bool:
        return not self.low <= x <= self.high

    def as_list(self) -> list[float]:
        return [self.low, self.high]

    def signed(self) -> str:
        """``+0.123 [+0.050, +0.200]``; the value alone where its ends are unknown, ``—`` for no value."""
        if not math.isfinite(self.low):
            return f"{self.value:+.3f}" if math.isfinite(self.value) else "—"
        return f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def wilson(correct: int, total: int) -> Interval:
    """Accuracy ``correct / total`` with its Wilson score interval (good at 0, 1 and small totals)."""
    if total == 0:
        return Interval(math.nan, math.nan, math.nan)
    ci = scipy_stats.binomtest(correct, total).proportion_ci(CONFIDENCE, method="wilson")
    return Interval(correct / total, float(ci.low), float(ci.high))


def _resamples(size: int) -> np.ndarray:
    """(BOOTSTRAP_REPS, size) image indices drawn with replacement, the same every time."""
    return np.random.default_rng(BOOTSTRAP_SEED).integers(0, size, size=(BOOTSTRAP_REPS, size))


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return math.nan, math.nan
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap(metric: Metric, true: Sequence[int], pred: Sequence[int]) -> Interval:
    """A metric of one run's test predictions with its bootstrap interval over the test images."""
    true_, pred_ = np.asarray(true), np.asarray(pred)
    if not len(true_):
        return Interval(math.nan, math.nan, math.nan)
    rows = _resamples(len(true_))  # (R, N): every resample at once
    return Interval(float(metric(true_, pred_)), *_percentiles(metric(true_[rows], pred_[rows])))


def image_variance(
    metric: Metric,
    true: Sequence[int],
    preds_a: Sequence[Sequence[int]],
    preds_b: Sequence[Sequence[int]],
    seeds_a: Sequence[str] = (),
    seeds_b: Sequence[str] = (),
) -> float:
    """The variance of ``mean(b) - mean(a)`` of the runs' metric that comes from the test images and that no
    number of seeds averages away: the images' noise that all runs of a side share.

    ``preds_a``, ``preds_b``: each run's predictions on the same test images ``true``, its seed in
    ``seeds_a``, ``seeds_b``. Every run is scored on the same resamples of the images (a bootstrap;
    what the images do to both sides alike cancels, as in the difference itself). A test set is
    crossed with the seeds: the part of the images' noise particular to one net already varies
    from seed to seed, so the seeds' spread holds it; what they share is the covariance over the
    resamples between runs of different seeds, ``cov(b, b') + cov(a, a') - 2 cov(a, b')``. With one
    run a side that cannot be told apart: the whole variance over the resamples.
    """
    true_ = np.asarray(true)
    rows = _resamples(len(true_))  # (R, N)
    drawn = true_[rows]
    # (R, runs): every run's metric on every resample, a's runs first
    scores = np.stack([metric(drawn, np.asarray(pred)[rows]) for pred in [*preds_a, *preds_b]], axis=1)
    scores = scores[np.isfinite(scores).all(axis=1)]
    n_a = len(preds_a)
    if n_a < 2 or len(preds_b) < 2:
        return float(np.var(scores[:, n_a:].mean(axis=1) - scores[:, :n_a].mean(axis=1), ddof=1))
    cov = np.cov(scores, rowvar=False)  # (runs, runs) over the resamples
    seeds = [*seeds_a, *seeds_b] if len(seeds_a) + len(seeds_b) == cov.shape[0] else [str(i) for i in range(len(cov))]
    side = np.arange(len(cov)) >= n_a  # True: b's run
    apart = np.array([[x != y for y in seeds] for x in seeds])  # runs of different seeds

    def mean(within: np.ndarray) -> float:
        return float(cov[within & apart].mean())

    shared = mean(np.outer(side, side)) + mean(np.outer(~side, ~side)) - 2 * mean(np.outer(~side, side))
    return max(shared, 0.0)


def mcnemar(true: Sequence[int], pred_a: Sequence[int], pred_b: Sequence[int]) -> float:
    """McNemar's exact p-value: do a and b err on different images more than chance would have it?"""
    right_a, right_b = np.asarray(pred_a) == np.asarray(true), np.asarray(pred_b) == np.asarray(true)
    only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a))
    if only_a + only_b == 0:
        return 1.0
    return float(scipy_stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def mean_interval(values: Sequence[float]) -> Interval:
    """The mean over seeds with its t interval (NaN ends with fewer than two values)."""
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if finite.size < 2:
        return Interval(float(finite.mean()) if finite.size else math.nan, math.nan, math.nan)
    half = scipy_stats.t.ppf((1 + CONFIDENCE) / 2, finite.size - 1) * finite.std(ddof=1) / math.sqrt(finite.size)
    return Interval(float(finite.mean()), float(finite.mean() - half), float(finite.mean() + half))


def _t(confidence: float, df: float) -> float:
    """Student's two-sided quantile; the normal's where the degrees of freedom are unbounded."""
    return float(
        scipy_stats.t.ppf((1 + confidence) / 2, df) if math.isfinite(df) else scipy_stats.norm.ppf((1 + confidence) / 2)
    )


@dataclass(frozen=True)
class Difference:
    """``mean(b) - mean(a)`` of a metric over two experiments' seeds, and the noise it carries, as variances.

    The seeds' (``seed_var``, with ``seed_df`` degrees of freedom): Student's t over the seed pairs
    when both sides ran the same seeds (seed s of one against seed s of the other: the same
    initial weights and data order where the step does not change them), else Welch's. ``spread``
    is what more seeds divide: ``seed_var = spread / n`` at n seeds a side. The test images'
    (``image_var``, from ``images`` images: :func:`image_variance`): the part of their noise that
    all seeds share and more seeds do not remove; NaN where the runs do not share one test set.
    Both add: the interval then speaks of images the nets have not seen, not of this test set alone.
    """

    value: float
    paired: bool
    seeds: tuple[int, int]  # finished seeds of (a, b)
    seed_var: float = math.nan
    seed_df: float = math.nan
    spread: float = math.nan
    image_var: float = math.nan
    images: int = 0

    def interval(self, confidence: float = CONFIDENCE, *, images: bool = True) -> Interval:
        """The interval from the seeds and (``images``, where known) the test images.

        Each noise's half-width at its own t quantile (the seeds' few degrees of freedom, the
        images' many), added in quadrature: never narrower than either alone, close to Student's
        with many seeds, and the same sum :meth:`seeds_for` sizes. With one seed a side it is the
        images' alone; NaN ends where neither is known.
        """
        parts = [(self.seed_var, self.seed_df)] if math.isfinite(self.seed_var) else []
        if images and math.isfinite(self.image_var):
            parts.append((self.image_var, self.images - 1.0))
        if not parts:
            return Interval(self.value, math.nan, math.nan)
        # a part without variance (every seed alike on both sides, e.g. all at chance) adds nothing
        half = math.sqrt(sum(_t(confidence, df) ** 2 * v for v, df in parts if v > 0))
        return Interval(self.value, self.value - half, self.value + half)

    def images_half_width(self, confidence: float = CONFIDENCE) -> float:
        """The interval's half-width that no number of seeds removes: the test images' own (0 where unknown)."""
        return _t(confidence, self.images - 1.0) * math.sqrt(self.image_var) if math.isfinite(self.image_var) else 0.0

    def seeds_for(self, half_width: float, confidence: float = CONFIDENCE) -> int | None:
        """Seeds a side for an interval of ``half_width``: Stein's two-stage rule, from the spread of the seeds at hand.

        The size comes from the pilot seeds' variance and their t quantile, never from the effect
        seen, so the interval keeps its coverage. None where no number of seeds would do: the seeds'
        spread is unknown (one seed a side), or the test images alone are that noisy.
        """
        if not math.isfinite(self.spread):
            return None
        t = _t(confidence, self.seed_df)  # the half-width at n seeds: sqrt(t^2 spread / n + images' half-width^2)
        room = half_width**2 - self.images_half_width(confidence) ** 2
        if room <= 0:
            return None
        return max(max(self.seeds) + 1, math.ceil(t * t * self.spread / room))


def difference(
    a: Sequence[float], b: Sequence[float], *, paired: bool, image_var: float = math.nan, images: int = 0
) -> Difference:
    """The :class:`Difference` of ``b``'s seeds against ``a``'s; ``paired``: ``a[i]`` and ``b[i]`` ran one seed."""
    if paired:
        pairs = [(x, y) for x, y in zip(a, b, strict=True) if math.isfinite(x) and math.isfinite(y)]
        a, b = [x for x, _ in pairs], [y for _, y in pairs]
    a_, b_ = (np.asarray([v for v in side if math.isfinite(v)], dtype=float) for side in (a, b))
    value = float(b_.mean() - a_.mean()) if a_.size and b_.size else math.nan
    found = Difference(value, paired, (int(a_.size), int(b_.size)), image_var=image_var, images=images)
    if paired and a_.size >= 2:
        spread = float(np.var(b_ - a_, ddof=1))
        return replace(found, seed_var=spread / a_.size, seed_df=a_.size - 1.0, spread=spread)
    if paired or a_.size < 2 or b_.size < 2:
        return found
    va, vb = float(np.var(a_, ddof=1)) / a_.size, float(np.var(b_, ddof=1)) / b_.size
    seed_var = va + vb
    # Welch-Satterthwaite; with no spread at all the interval is a point and any df will do
    df = seed_var**2 / (va**2 / (a_.size - 1) + vb**2 / (b_.size - 1)) if seed_var else a_.size + b_.size - 2.0
    return replace(found, seed_var=seed_var, seed_df=df, spread=va * a_.size + vb * b_.size)
