"""How sure a number is: 95 % intervals for one run's test results and for differences between runs.

Two sources of noise. The test set is a sample: a run's test accuracy has a Wilson interval,
its balanced accuracy a bootstrap interval over the test images, and two runs tested on the
same images differ by a paired bootstrap interval (with McNemar's exact test on the images one
gets right and the other wrong). Training is random too: with several seeds per experiment, the
mean has a t interval and two experiments differ by Welch's interval. scipy does the
distributions; the bootstraps are seeded, so a report is the same every time it is written.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
BOOTSTRAP_REPS = 2000  # resamples; the interval's ends move by about 0.002 between seeds of the bootstrap
BOOTSTRAP_SEED = 0

Metric = Callable[[np.ndarray, np.ndarray], float]  # (true, predicted) class indices -> a number


def accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(true == pred)) if len(true) else math.nan


def balanced_accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``true`` (as alexnet_lab.metrics computes it)."""
    classes = np.unique(true)
    return float(np.mean([np.mean(pred[true == c] == c) for c in classes])) if len(classes) else math.nan


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


def _percentiles(values: Sequence[float]) -> tuple[float, float]:
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
    low, high = _percentiles([metric(true_[rows], pred_[rows]) for rows in _resamples(len(true_))])
    return Interval(metric(true_, pred_), low, high)


def paired_difference(metric: Metric, true: Sequence[int], pred_a: Sequence[int], pred_b: Sequence[int]) -> Interval:
    """``metric(b) - metric(a)`` of two runs tested on the same images, resampling the images for both alike."""
    true_, a, b = np.asarray(true), np.asarray(pred_a), np.asarray(pred_b)
    draws = [metric(true_[rows], b[rows]) - metric(true_[rows], a[rows]) for rows in _resamples(len(true_))]
    return Interval(metric(true_, b) - metric(true_, a), *_percentiles(draws))


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


def welch(a: Sequence[float], b: Sequence[float]) -> Interval:
    """``mean(b) - mean(a)`` over seeds with Welch's interval (no equal-variance assumption)."""
    a_, b_ = (np.asarray([v for v in side if math.isfinite(v)], dtype=float) for side in (a, b))
    diff = float(b_.mean() - a_.mean()) if a_.size and b_.size else math.nan
    if a_.size < 2 or b_.size < 2:
        return Interval(diff, math.nan, math.nan)
    if a_.std() == 0 and b_.std() == 0:  # every seed alike on both sides (e.g. all at chance): no spread at all
        return Interval(diff, diff, diff)
    with warnings.catch_warnings():  # nearly identical seeds: scipy warns of precision loss; the interval stands
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = scipy_stats.ttest_ind(b_, a_, equal_var=False).confidence_interval(CONFIDENCE)
    return Interval(diff, float(ci.low), float(ci.high))
