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
import json
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alexnet_lab.errors import LabError, from_mapping
from alexnet_lab.identity import (
    FINISHED, config_diff, experiment_key, flatten, natural_key, read_overrides, run_name, strip_common, without_seed
)
from alexnet_lab.verdicts import VERDICTS, VerdictThresholds, describe_verdicts, verdicts

if TYPE_CHECKING:
    import plotly.graph_objects as go

#: What Hydra puts before the run name in a run dir's name: a sweep job's number ("3_"), or
#: the date and time of a single run ("2024-05-01_12-00-00-123456_").
DIR_PREFIX = re.compile(r"^(?:(\d+)|\d{4}-\d\d-\d\d_[\d-]+)_")

#: tab10, then tab20's lighter shades: 20 colours that stay apart on a white background.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)

#: (key in the report rows, column header); the CSV uses the keys, report.md the headers.
RUN_COLUMNS = (
    ("run", "run"),
    ("differs", "what differs from the previous run"),
    ("val_acc_best", "best val acc"),
    ("val_acc", "final val acc"),
    ("val_balanced_acc", "final val bal. acc"),
    ("test_acc", "test acc"),
    ("test_balanced_acc", "test bal. acc"),
    ("epochs", "epochs"),
    ("wall_s", "wall s"),
    ("verdicts", "verdicts"),
    ("status", "status"),
)
METRIC_KEYS = ("val_acc_best", "val_acc", "val_balanced_acc", "test_acc", "test_balanced_acc", "epochs", "wall_s")


class ReportError(LabError):
    """A path that holds no runs to report on; the message is one line naming it."""


# --------------------------------------------------------------------------- loading runs


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

    @property
    def history(self) -> list[dict[str, float]]:
        history = self.metrics.get("history")
        return history if isinstance(history, list) else []

    @property
    def finished(self) -> bool:
        """Trained to the end (``ok``, or stopped as ``diverged``) with its numbers in metrics.json."""
        return self.status in FINISHED and "history" in self.metrics

    @property
    def order(self) -> tuple[Any, ...]:
        """Report order: the ablation step, then Hydra's job number (single run dirs last)."""
        # the step first: Hydra numbers a glob(ablation_*) sweep's jobs in string order, ablation_10 before ablation_2
        job = DIR_PREFIX.match(self.path.name)
        number = int(job.group(1)) if job and job.group(1) else math.inf
        return natural_key(self.choices.get("experiment", "")), number, self.path.name


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


def _load_yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        # unresolved: run_name is an interpolation that needs Hydra's runtime
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # a missing or damaged .hydra file leaves the config unknown, nothing worse
        return {}
    return loaded if isinstance(loaded, dict) else {}


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
    config = _load_yaml(path / ".hydra" / "config.yaml")
    hydra_cfg = _load_yaml(path / ".hydra" / "hydra.yaml").get("hydra", {})
    choices = (hydra_cfg.get("runtime") or {}).get("choices") or {}
    metrics: dict[str, Any] = {}
    error = ""
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        status = "no metrics.json"
    else:
        try:
            metrics = json.loads(metrics_file.read_text())
            if not isinstance(metrics, dict):
                raise ValueError("not a JSON object")
            status = str(metrics.get("status", "ok"))
            error = str(metrics.get("error", ""))
        except (OSError, ValueError) as err:
            metrics, status, error = {}, "unreadable metrics.json", str(err).splitlines()[0]
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
        # a group left unchosen (``experiment: null``) is no choice
        choices={str(k): str(v) for k, v in choices.items() if v is not None and not str(k).startswith("hydra/")},
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
    return run


def one_per_seed(runs: Sequence[Run]) -> list[Run]:
    """Drop repeats (same experiment, same ``seed``: one run done twice), keeping the finished, else the later one.

    Runs whose config is unknown are all kept: nothing says they are the same.
    """
    chosen: dict[Any, Run] = {}
    for run in runs:
        key = (experiment_key(run), repr(run.config.get("seed"))) if run.config else id(run)
        if key not in chosen or run.finished or not chosen[key].finished:
            chosen[key] = run
    kept = {id(run) for run in chosen.values()}
    return [run for run in runs if id(run) in kept]


def load_runs(path: str | Path) -> list[Run]:
    """Every run under ``path`` (a run dir, a sweep dir, or a metrics.json) once, in :attr:`Run.order`."""
    return one_per_seed(sorted((load_run(p) for p in find_run_dirs(path)), key=lambda run: run.order))


# --------------------------------------------------------------------------- tables


def _number(metrics: Mapping[str, Any], key: str) -> float:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def run_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run (keys: :data:`RUN_COLUMNS` + ``error``, ``dir``), in the order given."""
    labels = strip_common([run.label for run in runs])
    rows = []
    for index, (run, label) in enumerate(zip(runs, labels)):
        row: dict[str, Any] = {
            "run": label,
            "differs": config_diff(runs[index - 1] if index else None, run),
            **{key: _number(run.metrics, key) for key in METRIC_KEYS},
            "verdicts": ", ".join(run.verdicts),
            "status": run.status,
            "error": run.error,
            "dir": run.path.name,
        }
        rows.append(row)
    return rows


@dataclass
class Experiment:
    """Runs that share a config except for ``seed``."""

    label: str
    runs: list[Run]

    @property
    def finished(self) -> list[Run]:
        return [run for run in self.runs if run.finished]

    @cached_property
    def curves(self) -> dict[str, Curve]:
        """The curve of every plotted history key (``train/loss``, ``val/acc``, ...), computed once for all figures."""
        keys = [f"{split}/{suffix}" for _, suffix in PANELS for split, _, _ in SPLITS]
        return {key: experiment_curve(self, key) for key in keys}


def group_runs(runs: Sequence[Run]) -> list[Experiment]:
    """Group runs whose configs differ only in ``seed`` (and unlearned keys), in order of first appearance."""
    groups: dict[Any, Experiment] = {}
    for run in runs:
        key = experiment_key(run) if run.config else without_seed(run.label)  # no resolved config: by name
        groups.setdefault(key, Experiment(label=without_seed(run.label), runs=[])).runs.append(run)
    experiments = list(groups.values())
    for experiment, label in zip(experiments, strip_common([e.label for e in experiments])):
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
        table = np.array([[_number(run.metrics, key) for key in METRIC_KEYS] for run in finished])  # (runs, keys)
        means, stds = _mean_std(table.reshape(-1, len(METRIC_KEYS)))
        for key, mean, std in zip(METRIC_KEYS, means, stds):
            row[f"{key}_mean"], row[f"{key}_std"] = float(mean), float(std)
        counts = {name: sum(name in run.verdicts for run in finished) for name in VERDICTS}
        row["verdicts"] = ", ".join(
            f"{name} {count}/{len(finished)}" if len(finished) > 1 else name for name, count in counts.items() if count
        )
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- curves

#: (panel, history key suffix); each panel shows train (dashed) and val (solid).
PANELS = (("loss", "loss"), ("accuracy", "acc"))
SPLITS = (("train", "--", "dash"), ("val", "-", "solid"))  # (split, matplotlib style, plotly dash)


@dataclass
class Curve:
    """One experiment's per-epoch mean (and std over seeds) of one history key."""

    epochs: np.ndarray  # (E,) 1-based
    mean: np.ndarray  # (E,)
    std: np.ndarray  # (E,) NaN where fewer than two runs


def _mean_std(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation over runs (axis 0) of the finite values of a (runs, N) table.

    NaN where no run has a finite value (std: fewer than two); an inf loss would swamp the
    mean, and its verdict reports it anyway.
    """
    table = np.where(np.isfinite(table), table, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, as they should
        counts = np.isfinite(table).sum(axis=0)
        return np.nanmean(table, axis=0), np.where(counts > 1, np.nanstd(table, axis=0, ddof=1), np.nan)


def experiment_curve(experiment: Experiment, key: str) -> Curve:
    """Mean and spread over the experiment's runs of ``key`` per epoch; runs of different length pad with NaN."""
    series = [[float(row.get(key, math.nan)) for row in run.history] for run in experiment.runs if run.history]
    length = max((len(s) for s in series), default=0)
    table = np.full((len(series), length), np.nan)  # (runs, epochs)
    for i, values in enumerate(series):
        table[i, : len(values)] = values
    mean, std = _mean_std(table)
    return Curve(epochs=np.arange(1, length + 1), mean=mean, std=std)


def _accuracy_floor(experiments: Sequence[Experiment]) -> float:
    """Bottom of the accuracy axis: 0.4 (just under a coin toss) unless some curve goes lower."""
    lowest = [
        float(np.nanmin(curve.mean))
        for experiment in experiments
        for split, _, _ in SPLITS
        if (curve := experiment.curves[f"{split}/acc"]).mean.size and np.isfinite(curve.mean).any()
    ]
    return max(0.0, math.floor(min([0.45, *lowest]) * 10 - 0.5) / 10)


def _legend_label(experiment: Experiment) -> str:
    finished = experiment.finished
    if not finished:
        return f"{experiment.label} ({experiment.runs[0].status})"
    shared = [name for name in VERDICTS if sum(name in run.verdicts for run in finished) * 2 > len(finished)]
    seeds = f" ×{len(experiment.runs)}" if len(experiment.runs) > 1 else ""
    return f"{experiment.label}{seeds}" + (f": {', '.join(shared)}" if shared else "")


# --------------------------------------------------------------------------- the report's content


@dataclass
class Report:
    """What every renderer shows (markdown, CSV, HTML, PNG, plotly), computed once by :func:`build_report`."""

    title: str
    runs: list[Run]
    rows: list[dict[str, Any]]  # run_rows(runs)
    experiments: list[Experiment]  # group_runs(runs); each holds its curves
    experiment_rows: list[dict[str, Any]]
    accuracy_floor: float  # bottom of the accuracy axis in both figures

    @property
    def has_seeds(self) -> bool:
        """Whether some experiment has several runs (then the report adds the per-experiment table)."""
        return any(len(experiment.runs) > 1 for experiment in self.experiments)

    @property
    def rules(self) -> dict[str, str]:
        """The verdict rules, with the first run's thresholds filled in."""
        return describe_verdicts(self.runs[0].thresholds if self.runs else None)


def build_report(source: str | Path | Sequence[Run] | Report, title: str = "") -> Report:
    """The report on ``source``: a run dir, a sweep dir, a metrics.json, or runs from :func:`load_runs`."""
    if isinstance(source, Report):
        return source
    runs = load_runs(source) if isinstance(source, (str, Path)) else list(source)
    experiments = group_runs(runs)
    return Report(title, runs, run_rows(runs), experiments, experiment_rows(experiments), _accuracy_floor(experiments))


# --------------------------------------------------------------------------- tables as text


def _cell(value: Any, key: str = "") -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:.0f}" if key in ("wall_s", "epochs") else f"{value:.3f}"
    return str(value).replace("|", "\\|") or "—"


def _run_table_cells(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = [header for _, header in RUN_COLUMNS]
    cells = []
    for row in rows:
        status = row["status"] + (f": {row['error']}" if row["error"] else "")
        cells.append([_cell(status if key == "status" else row[key], key) for key, _ in RUN_COLUMNS])
    return headers, cells


def _experiment_table_cells(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["experiment", "runs", "what differs from the previous experiment"]
    headers += [header for key, header in RUN_COLUMNS if key in METRIC_KEYS] + ["verdicts"]
    cells = []
    for row in rows:
        runs = str(row["runs"]) if row["finished"] == row["runs"] else f"{row['finished']} of {row['runs']} finished"
        line = [_cell(row["experiment"]), runs, _cell(row["differs"])]
        for key in METRIC_KEYS:
            mean, std = row[f"{key}_mean"], row[f"{key}_std"]
            line.append(_cell(mean, key) + ("" if not math.isfinite(std) else f" ± {_cell(std, key)}"))
        cells.append(line + [_cell(row["verdicts"])])
    return headers, cells


SEEDS_HEADING = "Per experiment: mean ± standard deviation over seeds"


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report_markdown(report: Report) -> str:
    """report.md: the run table, the per-experiment table when there are seeds, the curves, the verdict rules."""
    parts = [f"# Sweep report: {report.title}" if report.title else "# Sweep report", ""]
    parts += [f"{len(report.runs)} runs, {sum(run.finished for run in report.runs)} finished.", ""]
    parts += [_markdown_table(*_run_table_cells(report.rows)), ""]
    if report.has_seeds:
        parts += [f"## {SEEDS_HEADING}", "", _markdown_table(*_experiment_table_cells(report.experiment_rows)), ""]
    parts += ["![loss and accuracy per epoch](curves.png)", "", "Interactive curves: report.html.", ""]
    parts += ["## Verdicts", ""]
    parts += [f"- `{name}`: {text}" for name, text in report.rules.items()]
    return "\n".join(parts) + "\n"


def report_csv(report: Report) -> str:
    """report.csv: one row per run, full precision, empty cells for missing numbers."""
    buffer = io.StringIO()
    keys = [key for key, _ in RUN_COLUMNS] + ["error", "dir"]
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        writer.writerow({key: _csv_value(key, value) for key, value in row.items()})
    return buffer.getvalue()


def _csv_value(key: str, value: Any) -> Any:
    if not isinstance(value, float):
        return value
    if not math.isfinite(value):
        return ""
    return int(value) if key == "epochs" else round(value, 6)


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report_html(report: Report) -> str:
    """report.html: the tables and the interactive curves, plotly.js embedded so it opens offline."""
    tables = _html_table(*_run_table_cells(report.rows))
    if report.has_seeds:
        tables += f"<h2>{SEEDS_HEADING}</h2>" + _html_table(*_experiment_table_cells(report.experiment_rows))
    figure = plot_training_stats(report).to_html(full_html=False, include_plotlyjs=True)
    rules = "".join(f"<li><code>{name}</code>: {html.escape(text)}</li>" for name, text in report.rules.items())
    style = (
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
    )
    title = html.escape(report.title)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{style}</style></head><body><h1>Sweep report: {title}</h1>"
        f"{tables}{figure}<h2>Verdicts</h2><ul>{rules}</ul></body></html>\n"
    )


# --------------------------------------------------------------------------- figures


def _replace(path: Path, write: Callable[[Path], Any]) -> Path:
    """Write ``path`` via a temporary file, so a reader never sees half a report or picture."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)
    return path


def plot_training_stats(source: str | Path | Sequence[Run] | Report) -> go.Figure:
    """Interactive loss and accuracy per epoch, train dashed and val solid, one colour per experiment.

    ``source`` is a run dir, a sweep dir, a metrics.json, runs from :func:`load_runs`, or a
    :class:`Report`. Seeds of one experiment draw as their mean with a band of one standard
    deviation. In a notebook: ``plotly.offline.iplot(plot_training_stats(path))`` or just the figure.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    report = build_report(source)
    figure = make_subplots(rows=1, cols=2, subplot_titles=("loss (log scale)", "accuracy"), horizontal_spacing=0.08)
    for index, experiment in enumerate(report.experiments):
        color = PALETTE[index % len(PALETTE)]
        label = _legend_label(experiment)
        for col, (panel, suffix) in enumerate(PANELS, start=1):
            for split, _, dash in SPLITS:
                curve = experiment.curves[f"{split}/{suffix}"]
                finite = np.isfinite(curve.std)
                if finite.any():
                    x = curve.epochs[finite]
                    upper, lower = (curve.mean + curve.std)[finite], (curve.mean - curve.std)[finite]
                    figure.add_trace(
                        go.Scatter(
                            x=np.concatenate([x, x[::-1]]),
                            y=np.concatenate([upper, lower[::-1]]),
                            fill="toself",
                            fillcolor=color,
                            opacity=0.12,
                            line={"width": 0},
                            hoverinfo="skip",
                            legendgroup=experiment.label,
                            showlegend=False,
                        ),
                        row=1,
                        col=col,
                    )
                figure.add_trace(
                    go.Scatter(
                        x=curve.epochs,
                        y=curve.mean,
                        mode="lines" if len(curve.epochs) > 1 else "markers",  # one epoch is a point
                        name=label,
                        legendgroup=experiment.label,
                        showlegend=col == 1 and split == "val",
                        line={"color": color, "dash": dash, "width": 2 if split == "val" else 1.5},
                        hovertemplate=f"{html.escape(experiment.label)} {split} {panel}: %{{y:.3f}}, epoch %{{x}}"
                        "<extra></extra>",
                    ),
                    row=1,
                    col=col,
                )
    figure.update_xaxes(title_text="epoch")
    figure.update_yaxes(type="log", row=1, col=1)
    figure.update_yaxes(range=[report.accuracy_floor, 1.02], row=1, col=2)
    figure.update_layout(
        title="train dashed, val solid; click a legend entry to hide a run",
        template="plotly_white",
        height=560,
        legend={"orientation": "h", "yanchor": "top", "y": -0.15, "x": 0},
        margin={"t": 70, "b": 40},
    )
    return figure


def plot_curves_png(source: str | Path | Sequence[Run] | Report, path: str | Path, dpi: int = 100) -> Path:
    """curves.png: the same two panels as :func:`plot_training_stats`, legend below, drawn without a display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    report = build_report(source)
    legend_columns = 3
    legend_rows = math.ceil((len(report.experiments) + 2) / legend_columns)
    figure = Figure(figsize=(12, 4.2 + 0.28 * legend_rows), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, whatever backend pyplot uses: writing a PNG needs no display
    axes = figure.subplots(1, 2)
    handles = []
    for index, experiment in enumerate(report.experiments):
        color = PALETTE[index % len(PALETTE)]
        for ax, (_, suffix) in zip(axes, PANELS):
            for split, style, _ in SPLITS:
                curve = experiment.curves[f"{split}/{suffix}"]
                marker = "o" if len(curve.epochs) == 1 else None  # a one-epoch run is a point, not a line
                width = 1.8 if split == "val" else 1.2
                ax.plot(curve.epochs, curve.mean, style, color=color, marker=marker, linewidth=width)
                if np.isfinite(curve.std).any():
                    low, high = curve.mean - curve.std, curve.mean + curve.std
                    ax.fill_between(curve.epochs, low, high, color=color, alpha=0.12, linewidth=0)
        handles.append(Line2D([], [], color=color, linewidth=2, label=_legend_label(experiment)))
    handles += [
        Line2D([], [], color="black", linestyle="--", linewidth=1.2, label="train"),
        Line2D([], [], color="black", linestyle="-", linewidth=1.8, label="val"),
    ]
    axes[0].set(yscale="log", xlabel="epoch", title="loss (log scale)")
    axes[1].set(ylim=(report.accuracy_floor, 1.02), xlabel="epoch", title="accuracy")
    axes[1].axhline(0.5, color="grey", linewidth=0.8, linestyle=":")  # a coin toss on two classes
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    figure.legend(handles=handles, loc="outside lower center", ncols=legend_columns, fontsize=9, frameon=False)
    return _replace(Path(path), lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"))


# --------------------------------------------------------------------------- the report


def _write_text(path: Path, text: str) -> None:
    _replace(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_report(path: str | Path, *, html_report: bool = True) -> dict[str, Path]:
    """Write report.md, report.csv, curves.png (and report.html) into ``path``, a run or sweep dir.

    Returns the written files by name. Runs that failed or have no metrics.json appear with
    that status. Raises :class:`ReportError` if ``path`` holds no runs.
    """
    out = Path(path)
    if out.is_file():
        out = out.parent
    report = build_report(load_runs(out), out.name)  # tables and curves once, for every file below
    written = {"report.md": out / "report.md", "report.csv": out / "report.csv", "curves.png": out / "curves.png"}
    _write_text(written["report.md"], report_markdown(report))
    _write_text(written["report.csv"], report_csv(report))
    plot_curves_png(report, written["curves.png"])
    if html_report:
        written["report.html"] = out / "report.html"
        _write_text(written["report.html"], report_html(report))
    return written
