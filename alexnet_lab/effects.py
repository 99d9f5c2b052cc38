"""Effect or noise: did a step of a sweep change the outcome by more than chance?

Each experiment is compared with the one it builds on: in an ablation replay (experiments
chosen by the ``experiment`` group) the step before it; in any other sweep the experiment
before it that differs in the fewest keys. The difference of one metric (default: test
balanced accuracy) gets a 95 % interval, from the seeds when both sides have several (Welch),
else from the test images both were tested on (a paired bootstrap, with McNemar's exact test;
seed noise is then unknown), and a verdict: ``better``, ``worse``, or ``no clear difference``
when the interval holds 0. :func:`summary` turns the effects and the runs' learning phases into
a few sentences that claim no more than the intervals do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alexnet_lab import stats
from alexnet_lab.identity import differences
from alexnet_lab.runs import Experiment, Run

DEFAULT_METRIC = "test_balanced_acc"


@dataclass(frozen=True)
class Effect:
    """How an experiment's metric differs from its baseline's."""

    experiment: str
    baseline: str
    differs: str  # what differs from the baseline, as overrides
    metric: str
    difference: stats.Interval  # experiment - baseline, with its 95 % interval (NaN ends: unknown)
    verdict: str  # better, worse, no clear difference, or unknown
    method: str  # how the interval was made, and which noise it holds


def baseline_of(experiments: Sequence[Experiment], index: int) -> int | None:
    """The experiment ``index`` builds on: the step before it in an ablation, else the closest earlier one."""
    if index == 0:
        return None
    if all("experiment" in e.runs[0].choices for e in experiments[: index + 1]):
        return index - 1
    run = experiments[index].runs[0]
    counts = [len(differences(e.runs[0], run, ignore=("seed",))) for e in experiments[:index]]
    return max(range(index), key=lambda j: (-counts[j], j))  # fewest differences; the later one on a tie


def _pairable(a: Run, b: Run, metric: str) -> dict[str, Any] | None:
    """The test set both runs were tested on (same data, split and images), if the metric can be paired on it."""
    set_a, set_b = a.metrics.get("test_set"), b.metrics.get("test_set")
    if metric not in stats.METRICS or not isinstance(set_a, dict) or not isinstance(set_b, dict):
        return None
    same = all(set_a.get(key) == set_b.get(key) for key in ("data", "split_seed", "true"))
    return set_a if same and len(set_a.get("pred", [])) == len(set_b.get("pred", [])) else None


def compare(baseline: Experiment, experiment: Experiment, metric: str = DEFAULT_METRIC) -> Effect:
    """The effect of ``experiment`` against ``baseline`` on ``metric``, by the best noise estimate at hand."""
    a, b = baseline.finished, experiment.finished
    if len(a) >= 2 and len(b) >= 2:
        difference = stats.welch([r.number(metric) for r in a], [r.number(metric) for r in b])
        method = f"Welch's interval over {len(b)} vs {len(a)} seeds"
    elif a and b and (test_set := _pairable(a[0], b[0], metric)) is not None:
        true, pred_a, pred_b = test_set["true"], a[0].metrics["test_set"]["pred"], b[0].metrics["test_set"]["pred"]
        difference = stats.paired_difference(stats.METRICS[metric], true, pred_a, pred_b)
        p = stats.mcnemar(true, pred_a, pred_b)
        seeds = "one seed each: seed noise unknown" if len(a) == len(b) == 1 else "the first seed of each"
        method = f"paired bootstrap over {len(true)} test images, McNemar p={p:.2g}; {seeds}"
    else:
        mean = b[0].number(metric) - a[0].number(metric) if a and b else math.nan
        difference = stats.Interval(mean, math.nan, math.nan)
        method = "no interval: too few seeds, and no shared test images to pair"
    if not math.isfinite(difference.low) or not math.isfinite(difference.high):
        verdict = "unknown"
    elif difference.excludes(0.0):
        verdict = "better" if difference.value > 0 else "worse"
    else:
        verdict = "no clear difference"
    differs = ", ".join(differences(baseline.runs[0], experiment.runs[0], ignore=("seed",)))
    return Effect(experiment.label, baseline.label, differs, metric, difference, verdict, method)


def effects(experiments: Sequence[Experiment], metric: str = DEFAULT_METRIC) -> list[Effect]:
    """The effect of every experiment but the first against its baseline (:func:`baseline_of`)."""
    found = []
    for index, experiment in enumerate(experiments):
        base = baseline_of(experiments, index)
        if base is not None and experiment.finished and experiments[base].finished:
            found.append(compare(experiments[base], experiment, metric))
    return found


def summary(experiments: Sequence[Experiment], found: Sequence[Effect]) -> list[str]:
    """Three to six plain sentences: which steps mattered, which did not, which never learned; and the noise used."""
    sentences = []
    for effect in [e for e in found if e.verdict in ("better", "worse")][:3]:
        seeds = "seeds" if effect.method.startswith("Welch") else "test images, one seed"
        sentences.append(
            f"{effect.experiment} ({effect.differs or 'vs ' + effect.baseline}): {effect.verdict} on "
            f"{effect.metric} ({effect.difference.signed()}, interval from {seeds})."
        )
    unclear = [e.experiment for e in found if e.verdict == "no clear difference"]
    if unclear:
        sentences.append(f"No clear difference from the step before: {', '.join(unclear)}.")
    never = [e.label for e in experiments if e.finished and all(_never_left_chance(r) for r in e.finished)]
    if never:
        sentences.append(f"Never left chance: {', '.join(never)}.")
    multi = any(len(e.finished) > 1 for e in experiments)
    sentences.append(
        "Intervals are 95 %; seed noise measured where an experiment ran several seeds."
        if multi
        else "Intervals are 95 % and hold test-set noise only (one seed each): add seed=0,1,2 to measure seed noise."
    )
    if len(sentences) < 3 and not found:
        sentences.insert(0, f"{len(experiments)} experiment(s); nothing to compare yet.")
    return sentences[:6]


def _never_left_chance(run: Run) -> bool:
    return bool(run.history) and run.phases.get("left_chance_epoch") is None
