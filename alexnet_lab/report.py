"""Sweep report: a verdict per run, one table per sweep, every run's curves on shared axes.

A *run dir* is what ``python train.py`` writes (``metrics.json``, ``.hydra/``); a *sweep dir*
holds run dirs (``python train.py -m ...``). :func:`write_report` writes ``report.md``,
``report.csv``, ``curves.png`` and ``report.html`` into either; :func:`plot_training_stats`
returns the interactive figure, so a notebook shows it as the user's notebook did:
``iplot(plot_training_stats("outputs/multirun/..."))``.

What names a run, which runs are the same and what differs between two runs is
:mod:`alexnet_lab.identity`'s; this module reads run dirs and draws. Runs that share a config
except for ``seed`` form one *experiment*: the report gives the mean and spread of its
metrics, and the curves draw its mean with a band of one standard deviation. matplotlib and
plotly are imported only when a figure is drawn, so that importing this module (the Hydra
callback does, in every sweep) stays cheap.
"""

from __future__ import annotations

import csv
import html
import io
import itertools
import json
import math
import shlex
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from alexnet_lab import effects as effects_module
from alexnet_lab import stats
from alexnet_lab.config import VerdictThresholds
from alexnet_lab.errors import LabError, from_mapping, one_line
from alexnet_lab.identity import (
    config_diff,
    experiment_key,
    flatten,
    override_key,
    read_overrides,
    recorded_config,
    run_identity,
    run_name,
    strip_common,
    without_seed,
)
from alexnet_lab.runs import DIR_PREFIX, Experiment, Run
from alexnet_lab.verdicts import VERDICTS, describe_verdicts, phases, verdicts

if TYPE_CHECKING:
    import plotly.graph_objects as go

#: {key in metrics.json and in the report rows: column header}: the numbers every run reports.
METRICS = {
    "val_acc_best": "best val acc",
    "val_acc": "final val acc",
    "val_balanced_acc": "final val bal. acc",
    "test_acc": "test acc",
    "test_balanced_acc": "test bal. acc",
    "epochs": "epochs",
    "wall_s": "wall s",
}
#: The metrics with a 95 % interval: a run's from its test images (metrics.json), an experiment's over seeds.
WITH_INTERVAL = ("test_acc", "test_balanced_acc")
#: A run's learning phases (:func:`alexnet_lab.verdicts.phases`) as its row and the CSV carry them.
PHASE_KEYS = ("collapsed_epochs", "left_chance_epoch", "best_epoch")
#: The run table's {key: header}; the CSV uses the keys (then the intervals, phases, ``error`` and ``dir``).
RUN_COLUMNS = {
    "run": "run",
    "differs": "what differs from the previous run",
    **METRICS,
    "learning": "learning phases",
    "verdicts": "verdicts",
    "status": "status",
}
#: The effects table's {key of effects.Effect: header}; ``simultaneous`` is named with the family's size.
EFFECT_COLUMNS = {
    "experiment": "experiment",
    "baseline": "compared with",
    "differs": "what differs",
    "seeds": "seeds",
    "difference": "difference [95 %: seeds and test images]",
    "seeds_only": "seeds only",
    "simultaneous": "all steps together",
    "verdict": "verdict",
    "needs": "to settle it",
    "method": "how",
}
#: The per-experiment table's {key in :func:`experiment_rows`: header}; each metric shows mean ± std.
EXPERIMENT_COLUMNS = {
    "experiment": "experiment",
    "runs": "runs",
    "differs": "what differs from the previous experiment",
    **METRICS,
    "verdicts": "verdicts",
}


class ReportError(LabError):
    """A path that holds no runs to report on; the message is one line naming it."""


# --------------------------------------------------------------------------- loading runs


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / ".hydra").is_dir()


def find_run_dirs(path: str | Path) -> list[Path]:
    """The run dirs of ``path``: itself if it is a run dir (or its metrics.json), else its subdirs that are."""
    path = Path(path)
    if path.is_file() and path.name == "metrics.json":
        return [path.parent]
    if not path.is_dir():
        raise ReportError(f"{path}: no such directory; pass a run dir or a sweep dir (outputs/multirun/...)")
    if is_run_dir(path):
        return [path]
    runs = sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p))
    if not runs:
        raise ReportError(f"{path}: holds no run dirs (a run dir has metrics.json or .hydra/); pass a run or sweep dir")
    return runs


def _label(path: Path, metrics: Mapping[str, Any]) -> str:
    """The run's name as identity gives it from its overrides; else metrics.json's; else the dir name's."""
    overrides = read_overrides(path)
    if overrides is not None:
        return run_name(overrides)
    name = metrics.get("run_name")
    if isinstance(name, str) and name and "${" not in name:
        return name
    return DIR_PREFIX.sub("", path.name) or path.name


def load_run(path: str | Path) -> Run:
    """Read one run dir; a missing or damaged ``metrics.json`` becomes the run's status, not an error."""
    path = Path(path)
    config, choices = recorded_config(path)
    try:
        metrics = json.loads((path / "metrics.json").read_text())
        if not isinstance(metrics, dict):
            raise TypeError("not a JSON object")
        status, error = str(metrics.get("status", "ok")), str(metrics.get("error", ""))
    except FileNotFoundError:
        metrics, status, error = {}, "no metrics.json", ""
    except (OSError, ValueError, TypeError) as err:
        metrics, status, error = {}, "unreadable metrics.json", one_line(err)
    try:
        thresholds = from_mapping(VerdictThresholds, config.get("verdicts"), "verdicts")
    except (TypeError, ValueError):  # a damaged thresholds block: judge by the defaults
        thresholds = VerdictThresholds()
    run = Run(
        path=path,
        label=_label(path, metrics),
        status=status,
        error=error,
        metrics=metrics,
        config=flatten(config),
        choices=choices,
        thresholds=thresholds,
    )
    # recomputed with the run's own thresholds, so that every run of a report follows today's
    # rules; metrics.json's list stands in only where there is no history to judge
    stored = metrics.get("verdicts")
    if not run.history and isinstance(stored, list):
        run.verdicts = [str(v) for v in stored]
    else:
        run.verdicts = verdicts(run.history, thresholds)
    if run.status == "diverged" and "diverged" not in run.verdicts:  # stopped by train.py's guard
        run.verdicts = [name for name in VERDICTS if name in run.verdicts or name == "diverged"]
    run.phases = phases(run.history, thresholds)
    return run


def one_per_seed(runs: Sequence[Run]) -> list[Run]:
    """Drop repeats (same experiment, same ``seed``: one run done twice), keeping the finished, else the later one.

    Runs whose config is unknown are all kept: nothing says they are the same.
    """
    chosen: dict[Any, Run] = {}
    for run in runs:
        key = run_identity(run) if run.config else id(run)
        if key not in chosen or run.finished or not chosen[key].finished:
            chosen[key] = run
    kept = {id(run) for run in chosen.values()}
    return [run for run in runs if id(run) in kept]


def load_runs(path: str | Path) -> list[Run]:
    """Every run under ``path`` (a run dir, a sweep dir, or a metrics.json) once, in :attr:`Run.order`."""
    return one_per_seed(sorted((load_run(p) for p in find_run_dirs(path)), key=lambda run: run.order))


# --------------------------------------------------------------------------- tables


def _spans(epochs: Sequence[int]) -> list[tuple[int, int]]:
    """``[0, 1, 2, 5]`` -> ``[(0, 2), (5, 5)]``: runs of consecutive epochs, first and last."""
    # consecutive epochs have the same epoch - position
    streaks = [[epoch for _, epoch in group] for _, group in groupby(enumerate(epochs), lambda p: p[1] - p[0])]
    return [(streak[0], streak[-1]) for streak in streaks]


def learning_text(run_phases: Mapping[str, Any]) -> str:
    """A run's learning phases in a few words: ``one class 0-3; left chance 4; best 12``."""
    if run_phases.get("best_epoch") is None:
        return ""
    left = run_phases["left_chance_epoch"]
    spans = _spans(run_phases["collapsed_epochs"])
    collapsed = ", ".join(f"{first}-{last}" if last > first else f"{first}" for first, last in spans)
    parts = [f"one class {collapsed}"] if collapsed else []  # epochs [0, 1, 2, 5]: "one class 0-2, 5"
    parts.append("never left chance" if left is None else f"left chance {left}")
    return "; ".join([*parts, f"best {run_phases['best_epoch']}"])


def run_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run (keys: those of :data:`RUN_COLUMNS`, the intervals, phases, ``error``, ``dir``), in order."""
    labels = strip_common([run.label for run in runs])
    rows = []
    for index, (run, label) in enumerate(zip(runs, labels, strict=True)):
        row = {
            "run": label,
            "differs": config_diff(runs[index - 1] if index else None, run),
            **{key: run.number(key) for key in METRICS},
            "learning": learning_text(run.phases),
            "verdicts": ", ".join(run.verdicts),
            "status": run.status,
            "error": run.error,
            "dir": run.path.name,
        }
        for key in WITH_INTERVAL:  # metrics.json's [low, high]
            ends = run.metrics.get(f"{key}_ci")
            if not isinstance(ends, list) or len(ends) != 2:
                ends = [math.nan, math.nan]
            row[f"{key}_low"], row[f"{key}_high"] = float(ends[0]), float(ends[1])
        row.update({key: run.phases.get(key) for key in PHASE_KEYS})
        rows.append(row)
    return rows


def group_runs(runs: Sequence[Run]) -> list[Experiment]:
    """Group runs whose configs differ only in ``seed`` (and unlearned keys), in order of first appearance."""
    groups: dict[Any, Experiment] = {}
    for run in runs:
        key = experiment_key(run) if run.config else without_seed(run.label)  # no resolved config: by name
        groups.setdefault(key, Experiment(label=without_seed(run.label), runs=[])).runs.append(run)
    experiments = list(groups.values())
    for experiment, label in zip(experiments, strip_common([e.label for e in experiments]), strict=True):
        experiment.label = label
    return experiments


def experiment_rows(experiments: Sequence[Experiment]) -> list[dict[str, Any]]:
    """One row per experiment: mean and sample standard deviation of each metric over its finished runs."""
    rows = []
    for index, experiment in enumerate(experiments):
        finished = experiment.finished
        previous = experiments[index - 1].runs[0] if index else None
        row: dict[str, Any] = {
            "experiment": experiment.label,
            "runs": len(experiment.runs),
            "finished": len(finished),
            "differs": config_diff(previous, experiment.runs[0], ignore=("seed",)),
        }
        table = np.array([[run.number(key) for key in METRICS] for run in finished])  # (runs, keys)
        means, stds = _mean_std(table.reshape(-1, len(METRICS)))
        for key, mean, std in zip(METRICS, means, stds, strict=True):
            row[f"{key}_mean"], row[f"{key}_std"] = float(mean), float(std)
        for key in WITH_INTERVAL:  # the mean over seeds with its t interval
            interval = stats.mean_interval([run.number(key) for run in finished])
            row[f"{key}_low"], row[f"{key}_high"] = interval.low, interval.high
        counts = {name: sum(name in run.verdicts for run in finished) for name in VERDICTS}
        row["verdicts"] = ", ".join(
            f"{name} {count}/{len(finished)}" if len(finished) > 1 else name for name, count in counts.items() if count
        )
        rows.append(row)
    return rows


def _mean_std(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation over runs (axis 0) of the finite values of a (runs, N) table.

    NaN where no run has a finite value (std: fewer than two); an inf loss would swamp the
    mean, and its verdict reports it anyway.
    """
    table = np.where(np.isfinite(table), table, np.nan)
    with warnings.catch_warnings():
        # a column with no finite value has no mean, one with fewer than two no std (ddof=1): NaN, as it should
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(table, axis=0), np.nanstd(table, axis=0, ddof=1)


# --------------------------------------------------------------------------- the report's content


@dataclass
class Report:
    """What every renderer shows (markdown, CSV, HTML, the figures), computed once by :func:`build_report`."""

    title: str
    runs: list[Run]
    rows: list[dict[str, Any]]  # run_rows(runs)
    experiments: list[Experiment]  # group_runs(runs)
    experiment_rows: list[dict[str, Any]]
    effects: list[effects_module.Effect]  # every experiment against the one it builds on
    summary: list[str]  # the first screen: which steps mattered, in a few sentences
    progress: tuple[int, int] | None = None  # (jobs done, jobs in the sweep) while a sweep runs; None: complete
    more_seeds: list[str] = field(default_factory=list)  # the commands that add the seeds unsettled steps need

    @property
    def rules(self) -> dict[str, str]:
        """The verdict rules, with the first run's thresholds filled in."""
        return describe_verdicts(self.runs[0].thresholds if self.runs else None)

    @property
    def status_line(self) -> str:
        done = f"{len(self.runs)} runs, {sum(run.finished for run in self.runs)} finished."
        if self.progress is None:
            return done
        return f"**In progress ({self.progress[0]} of {self.progress[1]} jobs)**: rewritten as jobs end. {done}"

    @property
    def tables(self) -> list[tuple[str, list[str], list[list[str]]]]:
        """(heading, headers, cells) of each table of report.md and report.html.

        Every run; when some experiment has several seeds, every experiment with mean ± std and
        the 95 % interval of the mean; the effect of each step.
        """
        tables: list[tuple[str, dict[str, str], list[dict[str, Any]]]] = [("Runs", RUN_COLUMNS, self.rows)]
        if any(len(experiment.runs) > 1 for experiment in self.experiments):
            heading = "Per experiment: mean ± standard deviation [95 % interval of the mean] over seeds"
            tables.append((heading, EXPERIMENT_COLUMNS, self.experiment_rows))
        if self.effects:
            rows = [
                {
                    **vars(effect),
                    "seeds": f"{effect.seeds[1]} vs {effect.seeds[0]}",
                    **{key: getattr(effect, key).signed() for key in ("difference", "seeds_only", "simultaneous")},
                }
                for effect in self.effects
            ]
            columns = {**EFFECT_COLUMNS, "simultaneous": f"all {self.effects[0].family} steps together (Bonferroni)"}
            tables.append((f"Effect of each step on {self.effects[0].metric}", columns, rows))
        return [
            (heading, list(columns.values()), [[_cell(row, key) for key in columns] for row in rows])
            for heading, columns, rows in tables
        ]


def build_report(
    source: str | Path | Sequence[Run] | Report,
    title: str = "",
    *,
    metric: str = effects_module.DEFAULT_METRIC,
    delta: float = effects_module.DEFAULT_DELTA,
    progress: tuple[int, int] | None = None,
) -> Report:
    """The report on ``source``: a run dir, a sweep dir, a metrics.json, or runs from :func:`load_runs`.

    ``metric``: what the effect of each step is measured on; ``delta``: the smallest difference
    in it worth telling from none (:mod:`alexnet_lab.effects`).
    """
    if isinstance(source, Report):
        return source
    runs = load_runs(source) if isinstance(source, (str, Path)) else list(source)
    experiments = group_runs(runs)
    found = effects_module.effects(experiments, metric, delta)
    summary = effects_module.summary(experiments, found)
    rows = experiment_rows(experiments)
    commands = more_seeds(experiments, found)
    return Report(title, runs, run_rows(runs), experiments, rows, found, summary, progress, commands)


def _seed_list(seeds: set[Any], count: int) -> str | None:
    """``seed=range(24)`` or ``seed=0,3,5,...``: ``seeds`` and the smallest others, ``count`` in all.

    None if a seed is unknown (a run without its config).
    """
    known = {seed for seed in seeds if isinstance(seed, int) and not isinstance(seed, bool)}
    if len(known) < len(seeds):
        return None
    extra = (n for n in itertools.count() if n not in known)
    listed = sorted(known | set(itertools.islice(extra, max(0, count - len(known)))))
    return f"seed=range({len(listed)})" if listed == list(range(len(listed))) else "seed=" + ",".join(map(str, listed))


def more_seeds(experiments: Sequence[Experiment], found: Sequence[effects_module.Effect]) -> list[str]:
    """The commands that train the seeds the unsettled steps need into their sweep dir, packed; finished runs skipped.

    Experiments joined by unsettled steps get one seed list (the most any of those steps needs),
    so that their steps stay paired by seed. One command per such group and shared overrides:
    each run's own overrides (``.hydra/overrides.yaml``), ``experiment=`` joined, ``seed=`` the list.
    """
    by_label = {experiment.label: experiment for experiment in experiments}
    group: dict[str, str] = {}  # experiment label -> the label that stands for its group

    def root(label: str) -> str:
        while group.setdefault(label, label) != label:
            label = group[label]
        return label

    need: dict[str, int] = {}
    for effect in found:
        if effect.seeds_needed is not None:
            group[root(effect.experiment)] = root(effect.baseline)
            for label in (effect.baseline, effect.experiment):
                need[label] = max(need.get(label, 0), effect.seeds_needed)
    groups: dict[str, list[Experiment]] = {}
    for label in need:
        groups.setdefault(root(label), []).append(by_label[label])
    commands = []
    for members in groups.values():
        seeds = _seed_list(
            {run.config.get("seed") for e in members for run in e.runs}, max(need[e.label] for e in members)
        )
        if seeds is None:
            continue  # a run whose config (and so its seed) is unknown: no command can name its seeds
        lines: dict[tuple[str, ...], list[str]] = {}  # the overrides but experiment= -> the command line
        for experiment in members:
            overrides = read_overrides(experiment.runs[0].path)
            if overrides is None:
                continue
            kept = [o for o in overrides if override_key(o) not in ("seed", "resume", "pack")]
            line = lines.setdefault(tuple(o for o in kept if override_key(o) != "experiment"), kept)
            chosen = [o for o in kept if override_key(o) == "experiment"]
            if line is not kept and chosen:  # another step of the same command: experiment=a,b
                at = next(i for i, o in enumerate(line) if override_key(o) == "experiment")
                line[at] += "," + chosen[0].split("=", 1)[1]
        tail = ["hydra/sweeper=packed", f"hydra.sweep.dir={members[0].runs[0].path.parent}", "resume=true"]
        for line in lines.values():
            at = next((i + 1 for i, o in enumerate(line) if override_key(o) == "experiment"), len(line))
            commands.append(shlex.join(["python", "train.py", "-m", *line[:at], seeds, *line[at:], *tail]))
    return commands


# --------------------------------------------------------------------------- tables as text


def _text(value: Any, key: str) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:.0f}" if key in ("wall_s", "epochs") else f"{value:.3f}"
    return str(value) or "—"


def _cell(row: Mapping[str, Any], key: str) -> str:
    """A table cell of report.md and report.html: three decimals (epochs and seconds whole), a dash for nothing."""
    if key == "status" and row.get("error"):
        return f"{row['status']}: {row['error']}"
    if key == "runs" and row["finished"] != row["runs"]:
        return f"{row['finished']} of {row['runs']} finished"
    interval = ""
    if math.isfinite(row.get(f"{key}_low", math.nan)):  # a metric with its 95 % interval
        interval = f" [{row[f'{key}_low']:.3f}, {row[f'{key}_high']:.3f}]"
    if f"{key}_mean" in row:  # an experiment's metric: mean ± std over its finished runs
        mean, std = row[f"{key}_mean"], row[f"{key}_std"]
        return _text(mean, key) + (f" ± {_text(std, key)}" if math.isfinite(std) else "") + interval
    return _text(row[key], key) + interval


PHASES_RULE = (
    "Learning phases (epochs from 0): `one class`, epochs whose val predictions went (almost) all to one "
    "class; `left chance`, the first epoch from which val balanced accuracy stayed above chance to the end; "
    "`best`, the epoch of the best val accuracy. Intervals are 95 %: a run's test accuracy by Wilson's "
    "formula, its balanced accuracy by a bootstrap over the test images."
)


MORE_SEEDS = (
    "The unsettled steps' seeds, trained packed into this sweep dir; runs that finished are skipped, "
    "and the report then pools every run of an experiment:"
)


def report_markdown(report: Report) -> str:
    """report.md: the answer first (summary), then the tables, the curves, and the rules behind the words."""
    parts = [f"# Sweep report: {report.title}" if report.title else "# Sweep report", "", report.status_line, ""]
    parts += [f"- {sentence}" for sentence in report.summary] + [""]
    for heading, headers, cells in report.tables:
        parts += [f"## {heading}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        parts += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in cells] + [""]
    if report.more_seeds:
        parts += ["## More seeds", "", MORE_SEEDS, "", "```", *report.more_seeds, "```", ""]
    parts += ["![one panel per experiment: accuracy and loss per epoch](curves.png)", ""]
    parts += ["Interactive curves: report.html.", "", "## Verdicts", ""]
    parts += [f"- `{name}`: {text}" for name, text in report.rules.items()] + ["", PHASES_RULE]
    return "\n".join(parts) + "\n"


def report_csv(report: Report) -> str:
    """report.csv: one row per run, full precision, empty cells for missing numbers."""
    buffer = io.StringIO()
    intervals = [f"{key}_{end}" for key in WITH_INTERVAL for end in ("low", "high")]
    fields = [*RUN_COLUMNS, *intervals, *PHASE_KEYS, "error", "dir"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        writer.writerow({key: _csv_value(key, value) for key, value in row.items()})
    return buffer.getvalue()


def _csv_value(key: str, value: Any) -> Any:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if not isinstance(value, float):
        return value
    if not math.isfinite(value):
        return ""
    return int(value) if key == "epochs" else round(value, 6)


def report_html(report: Report, figure: go.Figure) -> str:
    """report.html: the summary, the tables and the interactive ``figure``, plotly.js embedded so it opens offline."""
    summary = "".join(f"<li>{html.escape(sentence)}</li>" for sentence in report.summary)
    tables = ""
    for heading, headers, cells in report.tables:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
        tables += f"<h2>{html.escape(heading)}</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if report.more_seeds:
        commands = html.escape("\n".join(report.more_seeds))
        tables += f"<h2>More seeds</h2><p>{html.escape(MORE_SEEDS)}</p><pre>{commands}</pre>"
    plot = figure.to_html(full_html=False, include_plotlyjs=True)
    rules = "".join(f"<li><code>{name}</code>: {html.escape(text)}</li>" for name, text in report.rules.items())
    style = (
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
    )
    title = html.escape(report.title)
    status = html.escape(report.status_line.replace("**", ""))
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{style}</style></head><body><h1>Sweep report: {title}</h1><p>{status}</p><ul>{summary}</ul>"
        f"{tables}{plot}<h2>Verdicts</h2><ul>{rules}</ul><p>{html.escape(PHASES_RULE)}</p></body></html>\n"
    )


# --------------------------------------------------------------------------- figures: one panel per experiment

#: What a panel draws: (quantity, colour, on the secondary (log-scale) axis); train dashed, val solid.
QUANTITIES = (("acc", "#1f77b4", False), ("loss", "#ff7f0e", True))
SPLITS = (("train", "dash", 1.2), ("val", "solid", 2.0))  # (split, plotly dash, line width)
#: Each curve of a panel: (history key, name, colour, on the secondary axis, plotly dash, line width).
LINES = [(f"{s}/{q}", f"{s} {q}", c, sec, d, w) for q, c, sec in QUANTITIES for s, d, w in SPLITS]
LINESTYLES: dict[str, Literal["--", "-"]] = {"dash": "--", "solid": "-"}
COLUMNS = 3  # panels side by side


def experiment_curve(experiment: Experiment, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Per epoch from 0, ``key``'s mean and std over the experiment's runs; runs of different length pad with NaN.

    Returns (mean, std), each (E,): std NaN where fewer than two runs.
    """
    series = [[float(row.get(key, math.nan)) for row in run.history] for run in experiment.runs if run.history]
    table = np.full((len(series), max(map(len, series), default=0)), np.nan)  # (runs, epochs)
    for i, values in enumerate(series):
        table[i, : len(values)] = values
    return _mean_std(table)


@dataclass
class Panel:
    """What one experiment's panel shows, the same in both figures."""

    title: str
    epochs: np.ndarray  # (E,) from 0
    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # "val/acc" -> (mean, std over seeds), each (E,)
    phases: dict[str, Any]  # verdicts.phases of the mean curves


def panels(report: Report) -> list[Panel]:
    found = []
    for experiment in report.experiments:
        keys = sorted({key for run in experiment.runs for row in run.history for key in row if "/" in key})
        curves = {key: experiment_curve(experiment, key) for key in keys}
        epochs = np.arange(len(curves[keys[0]][0]) if keys else 0)
        mean_rows = [{"epoch": e, **{key: float(curves[key][0][e]) for key in keys}} for e in range(len(epochs))]
        found.append(Panel(_title(experiment), epochs, curves, phases(mean_rows, experiment.runs[0].thresholds)))
    return found


def _grid(count: int) -> tuple[int, int]:
    """(rows, columns) of a figure of ``count`` panels, :data:`COLUMNS` side by side."""
    return max(1, math.ceil(count / COLUMNS)), min(COLUMNS, max(1, count))


def _title(experiment: Experiment) -> str:
    """A panel's title: the experiment, its number of seeds, and the verdicts most of its runs share."""
    finished = experiment.finished
    if not finished:
        return f"{experiment.label} ({experiment.runs[0].status})"
    shared = [name for name in VERDICTS if sum(name in run.verdicts for run in finished) * 2 > len(finished)]
    seeds = f" ×{len(experiment.runs)}" if len(experiment.runs) > 1 else ""
    return f"{experiment.label}{seeds}" + (f": {', '.join(shared)}" if shared else "")


def plot_training_stats(source: str | Path | Sequence[Run] | Report) -> go.Figure:
    """One panel per experiment: accuracy (left axis) and loss (right, log), train dashed and val solid.

    ``source`` is a run dir, a sweep dir, a metrics.json, runs from :func:`load_runs`, or a
    :class:`Report`. Seeds of one experiment draw as their mean with a band of one standard
    deviation; grey spans mark epochs that predicted one class, a green line the epoch the run
    left chance for good, a star its best val accuracy. In a notebook:
    ``plotly.offline.iplot(plot_training_stats(path))`` or just the figure.
    """
    from plotly.subplots import make_subplots

    found = panels(build_report(source))
    rows, cols = _grid(len(found))
    figure = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[panel.title for panel in found],
        specs=[[{"secondary_y": True}] * cols] * rows,
    )
    for index, panel in enumerate(found):
        where = {"row": index // cols + 1, "col": index % cols + 1}
        for key, name, color, secondary, dash, width in LINES:
            mean, std = panel.curves.get(key, (np.full(len(panel.epochs), np.nan),) * 2)
            known = np.isfinite(std)
            if known.any():  # the band of one standard deviation over seeds
                x = panel.epochs[known]
                figure.add_scatter(
                    x=np.concatenate([x, x[::-1]]),
                    y=np.concatenate([(mean + std)[known], (mean - std)[known][::-1]]),
                    fill="toself",
                    fillcolor=color,
                    opacity=0.15,
                    line={"width": 0},
                    hoverinfo="skip",
                    showlegend=False,
                    secondary_y=secondary,
                    **where,
                )
            figure.add_scatter(
                x=panel.epochs,
                y=mean,
                name=name,
                legendgroup=name,
                mode="lines" if len(panel.epochs) > 1 else "markers",  # one epoch is a point
                line={"color": color, "dash": dash, "width": width},
                showlegend=index == 0,
                secondary_y=secondary,
                **where,
            )
        for first, last in _spans(panel.phases["collapsed_epochs"]):
            figure.add_vrect(x0=first - 0.5, x1=last + 0.5, fillcolor="grey", opacity=0.15, line_width=0, **where)
        if panel.phases["left_chance_epoch"] is not None:
            figure.add_vline(x=panel.phases["left_chance_epoch"], line={"color": "green", "dash": "dot"}, **where)
        best = panel.phases["best_epoch"]
        if best is not None:
            figure.add_scatter(
                x=[best],
                y=[panel.curves["val/acc"][0][best]],
                mode="markers",
                marker={"symbol": "star", "size": 11, "color": "green"},
                showlegend=False,
                hovertemplate="best val acc %{y:.3f}, epoch %{x}<extra></extra>",
                **where,
            )
    figure.update_yaxes(range=[0.0, 1.02], secondary_y=False, title_text="accuracy")
    figure.update_yaxes(type="log", secondary_y=True, title_text="loss")
    figure.update_xaxes(title_text="epoch")
    figure.update_layout(
        title="train dashed, val solid; grey: one class predicted; green: left chance; star: best val accuracy",
        template="plotly_white",
        height=280 * rows + 140,
        legend={"orientation": "h", "yanchor": "top", "y": -0.6 / rows, "x": 0},
        margin={"t": 90, "b": 40},
    )
    return figure


def plot_curves_png(report: Report, path: str | Path, dpi: int = 90) -> Path:
    """curves.png: the panels of :func:`plot_training_stats`, drawn by matplotlib without a display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    found = panels(report)
    rows, cols = _grid(len(found))
    png = Figure(figsize=(5.2 * cols, 3.0 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(png)  # Agg, whatever backend pyplot uses: writing a PNG needs no display
    grid = png.subplots(rows, cols, squeeze=False)
    for ax in grid.flat[len(found) :]:
        ax.set_visible(False)
    for ax, panel in zip(grid.flat, found, strict=False):  # the grid may have more places than panels
        loss_ax = ax.twinx()
        for key, _, color, secondary, dash, width in LINES:
            mean, std = panel.curves.get(key, (np.full(len(panel.epochs), np.nan),) * 2)
            target = loss_ax if secondary else ax
            marker = "o" if len(panel.epochs) == 1 else None
            target.plot(panel.epochs, mean, LINESTYLES[dash], color=color, linewidth=width, marker=marker)
            target.fill_between(panel.epochs, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        for first, last in _spans(panel.phases["collapsed_epochs"]):
            ax.axvspan(first - 0.5, last + 0.5, color="grey", alpha=0.15, linewidth=0)
        if panel.phases["left_chance_epoch"] is not None:
            ax.axvline(panel.phases["left_chance_epoch"], color="green", linestyle=":", linewidth=1)
        if panel.phases["best_epoch"] is not None:
            best = panel.phases["best_epoch"]
            ax.plot([best], [panel.curves["val/acc"][0][best]], "*", color="green", markersize=10)
        ax.set(ylim=(0.0, 1.02), xlabel="epoch")
        ax.set_title(panel.title, fontsize=9)
        losses = np.array([value for key, (mean, _) in panel.curves.items() if key.endswith("loss") for value in mean])
        losses = losses[np.isfinite(losses) & (losses > 0)]
        if losses.size and losses.max() > 10 * losses.min():  # log only where the loss spans orders of magnitude
            loss_ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], color=color, linestyle=LINESTYLES[dash], linewidth=width, label=name)
        for _, name, color, _, dash, width in LINES
    ]
    png.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=9, frameon=False)
    return _replace(Path(path), lambda tmp: png.savefig(tmp, dpi=dpi, format="png"))


# --------------------------------------------------------------------------- the report


def _replace(path: Path, write: Callable[[Path], Any]) -> Path:
    """Write ``path`` via a temporary file, so a reader never sees half a report or picture."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)
    return path


def _write_text(path: Path, text: str) -> Path:
    return _replace(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_report(
    path: str | Path,
    *,
    html_report: bool = True,
    metric: str = effects_module.DEFAULT_METRIC,
    delta: float = effects_module.DEFAULT_DELTA,
    progress: tuple[int, int] | None = None,
) -> dict[str, Path]:
    """Write report.md, report.csv, curves.png (and report.html) into ``path``, a run or sweep dir.

    ``metric``: what the effect of each step is measured on (a metrics.json number); ``progress``:
    (jobs done, jobs in all) while a sweep is still running. Returns the written files by name.
    Runs that failed or have no metrics.json appear with that status. Raises
    :class:`ReportError` if ``path`` holds no runs.
    """
    out = Path(path)
    if out.is_file():
        out = out.parent
    report = build_report(out, out.name, metric=metric, delta=delta, progress=progress)  # computed once for all
    written = {
        "report.md": _write_text(out / "report.md", report_markdown(report)),
        "report.csv": _write_text(out / "report.csv", report_csv(report)),
        "curves.png": plot_curves_png(report, out / "curves.png"),
    }
    if html_report:
        written["report.html"] = _write_text(out / "report.html", report_html(report, plot_training_stats(report)))
    return written
