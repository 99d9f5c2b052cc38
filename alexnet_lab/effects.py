"""Effect or noise: what the seeds of a sweep establish about each step, and what a step still needs.

Each experiment is compared with the one it builds on: in an ablation replay (experiments
chosen by the ``experiment`` group) the step before it; in any other sweep the experiment
before it that differs in the fewest keys. The difference of one metric (default: test
balanced accuracy) gets a 95 % interval that holds two noises (:class:`alexnet_lab.stats.Difference`):
the seeds' (paired by seed where both sides ran the same seeds, Welch's where they did not:
fixed by the sweep's design, never by which is narrower) and the test images' (every run of both
sides scored on the same resamples), so a verdict speaks of images the nets have not seen.

Four verdicts, each claiming only what its interval supports:

- ``better`` / ``worse``: the interval excludes 0;
- ``no effect beyond ±δ``: the whole interval lies inside ±δ (``delta``, in the metric's units),
  which needs the seeds' noise measured (two seeds a side or more);
- ``unsettled``: neither, with the seeds a side for an interval of half-width δ, which tells any
  effect larger than δ from none, and the seeds for half-width δ/2, which settles the step
  whatever its effect (its interval then excludes 0 or lies inside ±δ). Both are Stein's
  two-stage sizes from the seeds' spread, never from the effect seen
  (:meth:`~alexnet_lab.stats.Difference.seeds_for`).

The steps are a family: beside each interval stands the one adjusted for all of them together
(Bonferroni: each at 1 - 0.05/m), so that one step of eight resolving by chance is not read as a
finding. :func:`summary` says it all in a few plain sentences.
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
#: The smallest difference worth telling from none, in the metric's units: 0.02 of an accuracy is
#: 6 of the embedded data set's 288 test images, about the spread of one run's test accuracy over seeds.
DEFAULT_DELTA = 0.02
#: Seeds a side that measure the seeds' noise at all, where a step ran one: the first stage of two.
PILOT_SEEDS = 3
#: More seeds a side than this are out of reach for a sweep: the report says so instead of giving the command.
MAX_SEEDS = 100


@dataclass(frozen=True)
class Effect:
    """How an experiment's metric differs from its baseline's, and what that settles."""

    experiment: str
    baseline: str
    differs: str  # what differs from the baseline, as overrides
    metric: str
    difference: stats.Interval  # experiment - baseline, 95 %: seeds and test images where both are known
    verdict: str  # better, worse, no effect beyond ±δ, unsettled
    method: str  # how the interval was made, and which noise it holds
    seeds: tuple[int, int] = (0, 0)  # finished seeds of (baseline, experiment)
    seeds_only: stats.Interval = stats.Interval(math.nan, math.nan, math.nan)  # the seeds' noise alone
    simultaneous: stats.Interval = stats.Interval(math.nan, math.nan, math.nan)  # 95 % for all steps together
    family: int = 1  # the steps compared: what ``simultaneous`` is adjusted for
    family_verdict: str = ""  # the verdict ``simultaneous`` gives
    seeds_needed: int | None = None  # seeds a side that would settle an unsettled step
    needs: str = ""  # what an unsettled step needs, in words
    noise: str = ""  # what the interval holds: "seeds and test images", "seeds" or "test images"
    delta: float = DEFAULT_DELTA  # the smallest difference worth telling from none, in the metric's units


def baseline_of(experiments: Sequence[Experiment], index: int) -> int | None:
    """The experiment ``index`` builds on: the step before it in an ablation, else the closest earlier one."""
    if index == 0:
        return None
    if all("experiment" in e.runs[0].choices for e in experiments[: index + 1]):
        return index - 1
    run = experiments[index].runs[0]
    counts = [len(differences(e.runs[0], run, ignore=("seed",))) for e in experiments[:index]]
    return max(range(index), key=lambda j: (-counts[j], j))  # fewest differences; the later one on a tie


def _shared_test_set(runs: Sequence[Run], metric: str) -> dict[str, Any] | None:
    """The test set every run was tested on (same data, split and images), if the metric can be scored on it."""
    sets = [s for run in runs if isinstance(s := run.metrics.get("test_set"), dict)]
    if metric not in stats.METRICS or len(sets) < len(runs):
        return None
    first = sets[0]
    same = all(
        all(s.get(key) == first.get(key) for key in ("data", "split_seed", "true"))
        and len(s.get("pred", [])) == len(first.get("true", []))
        for s in sets
    )
    return first if same else None


def _seed(run: Run) -> str:
    """The run's seed, as text; empty where its config is unknown."""
    return repr(run.config["seed"]) if "seed" in run.config else ""


def measure(baseline: Experiment, experiment: Experiment, metric: str = DEFAULT_METRIC) -> tuple[stats.Difference, str]:
    """``experiment`` - ``baseline`` on ``metric`` with its noises, and how it was measured, in words."""
    a, b = baseline.finished, experiment.finished
    seeds_a, seeds_b = [_seed(run) for run in a], [_seed(run) for run in b]
    # the design decides: the same seeds on both sides (each once) pair up, seed s against seed s
    paired = len(a) >= 2 and "" not in seeds_a and len(set(seeds_a)) == len(a) and sorted(seeds_a) == sorted(seeds_b)
    if paired:
        b = sorted(b, key=lambda run: seeds_a.index(_seed(run)))
    test_set = _shared_test_set([*a, *b], metric)
    image_var, images = math.nan, 0
    if test_set is not None:
        preds = [[run.metrics["test_set"]["pred"] for run in side] for side in (a, b)]
        seeds = [[_seed(run) or f"#{id(run)}" for run in side] for side in (a, b)]  # an unknown seed: its own
        image_var = stats.image_variance(stats.METRICS[metric], test_set["true"], *preds, *seeds)
        images = len(test_set["true"])
    found = stats.difference(
        [r.number(metric) for r in a], [r.number(metric) for r in b], paired=paired, image_var=image_var, images=images
    )
    if paired:
        method = f"paired by seed, {len(a)} seeds"
    elif len(a) >= 2 and len(b) >= 2:
        method = f"Welch, {len(b)} vs {len(a)} seeds"
    else:
        method = f"{len(b)} vs {len(a)} seeds: seed noise unknown"
    if test_set is None:
        method += "; seeds only (no test images shared)"
    elif math.isfinite(found.seed_var):
        method += f"; and {images} test images"
    else:
        p = stats.mcnemar(test_set["true"], preds[0][0], preds[1][0])
        method += f"; {images} test images only (McNemar p={p:.2g} on the first seed of each)"
    return found, method


def verdict(interval: stats.Interval, delta: float, seeds_known: bool = True) -> str:
    """What ``interval`` supports: better, worse, no effect beyond ±``delta`` (seed noise known), or unsettled."""
    if not (math.isfinite(interval.low) and math.isfinite(interval.high)):
        return "unsettled"
    if interval.excludes(0.0):
        return "better" if interval.value > 0 else "worse"
    if seeds_known and -delta <= interval.low and interval.high <= delta:
        return f"no effect beyond ±{delta:g}"
    return "unsettled"


def _needs(found: stats.Difference, delta: float) -> tuple[int | None, str]:
    """The seeds a side for an interval of ±δ (None: none that a sweep can run), and what the step needs in words."""
    if not math.isfinite(found.spread):
        return PILOT_SEEDS, f"seed noise unknown: {PILOT_SEEDS} seeds a side to measure it"
    needed, settles = found.seeds_for(delta), found.seeds_for(delta / 2)
    if needed is None:
        images = found.images_half_width()
        return None, f"more test images: theirs alone give ±{images:.3f}, wider than ±{delta:g}"
    if needed > MAX_SEEDS:
        return None, f"{needed} seeds a side for ±{delta:g}: out of reach (a larger delta, or less seed noise)"
    whatever = f"; {settles} settle it whatever the effect" if settles is not None and settles <= MAX_SEEDS else ""
    return needed, f"{needed} seeds a side for ±{delta:g} (has {min(found.seeds)}){whatever}"


def effects(
    experiments: Sequence[Experiment], metric: str = DEFAULT_METRIC, delta: float = DEFAULT_DELTA
) -> list[Effect]:
    """The effect of every experiment but the first against its baseline (:func:`baseline_of`), judged as a family."""
    measured = []
    for index, experiment in enumerate(experiments):
        base = baseline_of(experiments, index)
        if base is not None and experiment.finished and experiments[base].finished:
            measured.append((experiments[base], experiment, *measure(experiments[base], experiment, metric)))
    family = max(1, sum(math.isfinite(found.interval().low) for *_, found, _ in measured))
    found_effects = []
    for baseline, experiment, found, method in measured:
        seeds_known = math.isfinite(found.seed_var)
        interval = found.interval()
        simultaneous = found.interval(1 - (1 - stats.CONFIDENCE) / family)
        said = verdict(interval, delta, seeds_known)
        needed, needs = _needs(found, delta) if said == "unsettled" else (None, "")
        found_effects.append(
            Effect(
                experiment=experiment.label,
                baseline=baseline.label,
                differs=", ".join(differences(baseline.runs[0], experiment.runs[0], ignore=("seed",))),
                metric=metric,
                difference=interval,
                verdict=said,
                method=method,
                seeds=found.seeds,
                seeds_only=found.interval(images=False),
                simultaneous=simultaneous,
                family=family,
                family_verdict=verdict(simultaneous, delta, seeds_known),
                seeds_needed=needed,
                needs=needs,
                noise=_noise(found),
                delta=delta,
            )
        )
    return found_effects


def _noise(found: stats.Difference) -> str:
    images = math.isfinite(found.image_var)
    if math.isfinite(found.seed_var):
        return "seeds and test images" if images else "seeds"
    return "test images" if images else ""


def summary(experiments: Sequence[Experiment], found: Sequence[Effect]) -> list[str]:
    """A few plain sentences: which steps mattered, which had no effect, which need more seeds, which never learned."""
    sentences = []
    for effect in [e for e in found if e.verdict in ("better", "worse")][:3]:
        source = effect.noise if effect.noise != "test images" else "test images only: seed noise unknown"
        held = ""
        if effect.family > 1:
            held = (
                f"; holds with all {effect.family} steps adjusted for"
                if effect.family_verdict == effect.verdict
                else f"; not once adjusted for the {effect.family} steps compared: it may be chance"
            )
        sentences.append(
            f"{effect.experiment} ({effect.differs or 'vs ' + effect.baseline}): {effect.verdict} on "
            f"{effect.metric} by {effect.difference.signed()} ({source}{held})."
        )
    none = [e for e in found if e.verdict.startswith("no effect")]
    if none:
        listed = ", ".join(f"{e.experiment} ({e.difference.signed()})" for e in none)
        sentences.append(f"{none[0].verdict.capitalize()} on {none[0].metric}: {listed}.")
    unsettled = [e for e in found if e.verdict == "unsettled"]
    if unsettled:
        # the steps more seeds would settle, each with its count; the others by what stands in the way
        delta = unsettled[0].delta
        parts = [f"{e.experiment} ({e.seeds_needed} seeds a side)" for e in unsettled if e.seeds_needed is not None]
        for reason, words in (
            ("out of reach", f"more than {MAX_SEEDS} seeds a side"),
            ("more test images", f"the test images alone are too few for ±{delta:g}"),
        ):
            blocked = [e.experiment for e in unsettled if e.seeds_needed is None and reason in e.needs]
            if blocked:
                parts.append(f"{', '.join(blocked)} ({words})")
        more = ' The command under "More seeds" adds them.' if any(e.seeds_needed for e in unsettled) else ""
        sentences.append(f"Unsettled: {'; '.join(parts)}.{more}")
    never = [e.label for e in experiments if e.finished and all(_never_left_chance(r) for r in e.finished)]
    if never:
        sentences.append(f"Never left chance: {', '.join(never)}.")
    if not found:
        sentences.insert(0, f"{len(experiments)} experiment(s); nothing to compare yet.")
    elif any(len(e.finished) > 1 for e in experiments):
        sentences.append(
            f"{len(found)} steps compared. Intervals are 95 % and hold the noise of the seeds and of the test images; "
            "the table also gives each step's interval adjusted for all steps together."
        )
    else:
        sentences.append(
            "Intervals are 95 % and hold test-set noise only (one seed each): add seed=0,1,2 to measure seed noise."
        )
    return sentences


def _never_left_chance(run: Run) -> bool:
    return bool(run.history) and run.phases.get("left_chance_epoch") is None
