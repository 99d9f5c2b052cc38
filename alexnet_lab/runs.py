"""A sweep's records: a run dir as the report reads it (:class:`Run`) and runs that differ only in seed.

The report (alexnet_lab/report.py) loads them and draws them; the effects
(alexnet_lab/effects.py) compare them. Both read these records, so they live below both.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alexnet_lab.config import VerdictThresholds
from alexnet_lab.identity import FINISHED, natural_key

#: What Hydra puts before the run name in a run dir's name: a sweep job's number ("3_"), or
#: the date and time of a single run ("2024-05-01_12-00-00-123456_").
DIR_PREFIX = re.compile(r"^(?:(\d+)|\d{4}-\d\d-\d\d_[\d-]+)_")


@dataclass
class Run:
    """One run dir as the report sees it."""

    path: Path
    label: str  # run name: what differs from the defaults, e.g. "ablation_2_dropout,seed=1"
    status: str  # "ok", "failed", "no metrics.json", "unreadable metrics.json" (or metrics.json's own status)
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # flattened config: {"model.downscale": 16, ...}
    choices: dict[str, str] = field(default_factory=dict)  # config group choices: {"optim": "adam", ...}
    thresholds: VerdictThresholds = field(default_factory=VerdictThresholds)  # the run's own ``verdicts`` block
    verdicts: list[str] = field(default_factory=list)
    phases: dict[str, Any] = field(default_factory=dict)  # verdicts.phases: collapsed epochs, left chance, best

    @property
    def history(self) -> list[dict[str, float]]:
        history = self.metrics.get("history")
        return history if isinstance(history, list) else []

    @property
    def finished(self) -> bool:
        """Trained to the end (``ok``, or stopped as ``diverged``) with its numbers in metrics.json."""
        return self.status in FINISHED and "history" in self.metrics

    def number(self, key: str) -> float:
        """metrics.json's number ``key``; NaN where it is missing or not a number."""
        value = self.metrics.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan

    @property
    def order(self) -> tuple[Any, ...]:
        """Report order: the ablation step, then Hydra's job number (single run dirs last)."""
        # the step first: Hydra numbers a glob(ablation_*) sweep's jobs in string order, ablation_10 before ablation_2
        job = DIR_PREFIX.match(self.path.name)
        number = int(job.group(1)) if job and job.group(1) else math.inf
        return natural_key(self.choices.get("experiment", "")), number, self.path.name


@dataclass
class Experiment:
    """Runs that share a config except for ``seed``."""

    label: str
    runs: list[Run]

    @property
    def finished(self) -> list[Run]:
        return [run for run in self.runs if run.finished]
