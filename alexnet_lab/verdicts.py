"""Verdicts on a run's outcome from its per-epoch history: collapsed, chance, overfit, diverged.

Training writes them into metrics.json; the sweep report shows them (recomputed with each
run's own thresholds). Pure numpy: cheap to import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from alexnet_lab.config import VerdictThresholds
from alexnet_lab.errors import from_mapping

VERDICTS = ("collapsed", "chance", "overfit", "diverged")


def describe_verdicts(thresholds: VerdictThresholds | None = None) -> dict[str, str]:
    """One line per verdict saying when it is given, with the thresholds filled in."""
    t = thresholds or VerdictThresholds()
    end = f"over the last {t.window} epochs"
    return {
        "collapsed": (
            f"one class gets >= {t.collapsed_pred_frac:.0%} of val predictions {end} (the notebook's 'always cat')"
        ),
        "chance": f"val balanced accuracy <= 1/classes + {t.chance_margin:g} {end} (a coin toss)",
        "overfit": (
            f"train accuracy >= val accuracy + {t.overfit_gap:g} {end}, or val loss rises while train loss "
            f"falls, each by a factor >= {1 + t.overfit_val_loss_rise:g} from the val loss minimum to the end "
            f"({t.window}-epoch means)"
        ),
        "diverged": f"a loss is NaN or infinite, or ends (mean {end}) >= {t.diverged_factor:g} x its first-epoch value",
    }


def _column(history: Sequence[Mapping[str, float]], *keys: str) -> np.ndarray:
    """(epochs, len(keys)) array of the rows that have every key; rows missing one are skipped."""
    rows = [[float(row[key]) for key in keys] for row in history if all(key in row for key in keys)]
    return np.array(rows, dtype=float).reshape(-1, len(keys))


def _rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """(epochs - w + 1,) means of every ``w`` consecutive epochs, w = min(window, epochs); NaN spreads."""
    width = max(1, min(window, len(values)))
    return np.convolve(values, np.full(width, 1 / width), mode="valid")


def _end_mean(values: np.ndarray, window: int) -> float:
    """Mean of the finite values among the last ``window``; NaN if there are none."""
    tail = values[-window:]
    tail = tail[np.isfinite(tail)]
    return float(tail.mean()) if tail.size else math.nan


def verdicts(
    history: Sequence[Mapping[str, float]], thresholds: Mapping[str, Any] | VerdictThresholds | None = None
) -> list[str]:
    """What went wrong in a run, from its per-epoch history (``metrics.json``'s ``history``).

    Returns a sublist of :data:`VERDICTS`, in that order; ``[]`` for a healthy run or an
    empty history. ``thresholds`` is conf/config.yaml's ``verdicts`` block or
    :class:`VerdictThresholds`; see :func:`describe_verdicts` for each rule.
    """
    t = from_mapping(VerdictThresholds, thresholds, "verdicts")
    if not history:
        return []
    found: set[str] = set()
    classes = sorted(key.removeprefix("val/pred_frac/") for key in history[-1] if key.startswith("val/pred_frac/"))

    if classes:
        pred_frac = _column(history, *(f"val/pred_frac/{c}" for c in classes))  # (epochs, classes)
        if _end_mean(pred_frac.max(axis=1), t.window) >= t.collapsed_pred_frac:  # no rows: NaN, no verdict
            found.add("collapsed")
        balanced = _column(history, "val/balanced_acc")[:, 0]
        if _end_mean(balanced, t.window) <= 1 / len(classes) + t.chance_margin:
            found.add("chance")

    acc = _column(history, "train/acc", "val/acc")  # (epochs, 2)
    if _end_mean(acc[:, 0] - acc[:, 1], t.window) >= t.overfit_gap:
        found.add("overfit")
    loss = _column(history, "train/loss", "val/loss")  # (epochs, 2)
    if len(loss):
        # window means, so that one lucky epoch of a noisy val loss is not taken for its minimum
        train_loss, val_loss = _rolling_mean(loss[:, 0], t.window), _rolling_mean(loss[:, 1], t.window)
        usable = np.isfinite(train_loss) & np.isfinite(val_loss)
        if usable.any() and usable[-1]:
            best = int(np.argmin(np.where(usable, val_loss, np.inf)))
            rise = 1 + t.overfit_val_loss_rise
            if val_loss[-1] >= rise * val_loss[best] and train_loss[-1] * rise <= train_loss[best]:
                found.add("overfit")

    for key in ("train/loss", "val/loss"):
        values = _column(history, key)[:, 0]
        if not np.isfinite(values).all():
            found.add("diverged")
        elif values.size and values[0] > 0 and _end_mean(values, t.window) >= t.diverged_factor * values[0]:
            found.add("diverged")
    return [name for name in VERDICTS if name in found]


def phases(
    history: Sequence[Mapping[str, float]], thresholds: Mapping[str, Any] | VerdictThresholds | None = None
) -> dict[str, Any]:
    """When a run learned what: the notebook's "first a peak, then a coin toss", as epochs (0-based).

    ``collapsed_epochs``: epochs whose val predictions went (almost) all to one class (at least
    ``collapsed_pred_frac``); ``left_chance_epoch``: the first epoch from which val balanced
    accuracy stayed above chance (1/classes + ``chance_margin``) to the end, None if it never
    did; ``best_epoch``: the epoch of the best val accuracy.
    """
    t = from_mapping(VerdictThresholds, thresholds, "verdicts")
    collapsed, above = [], []
    for row in history:
        shares = [value for key, value in row.items() if key.startswith("val/pred_frac/")]
        if shares and max(shares) >= t.collapsed_pred_frac:
            collapsed.append(int(row["epoch"]))
        chance = 1 / max(len(shares), 2) + t.chance_margin
        above.append(row.get("val/balanced_acc", math.nan) > chance)
    left = next((i for i in range(len(above)) if all(above[i:])), None)
    accs = [row.get("val/acc", math.nan) for row in history]
    best = int(np.nanargmax(accs)) if np.isfinite(accs).any() else None
    return {
        "collapsed_epochs": collapsed,
        "left_chance_epoch": int(history[left]["epoch"]) if left is not None else None,
        "best_epoch": int(history[best]["epoch"]) if best is not None else None,
    }
