"""Sweep report: a verdict per run, one table per sweep, every run's curves on shared axes.

A *run dir* is what ``python train.py`` writes (``metrics.json``, ``.hydra/``); a *sweep dir*
holds run dirs (``python train.py -m ...``). :func:`write_report` writes ``report.md``,
``report.csv``, ``curves.png`` and ``report.html`` into either; :func:`plot_training_stats`
returns the interactive figure, so a notebook shows it as the user's notebook did:
``iplot(plot_training_stats("outputs/multirun/..."))``.

Runs that share a config except for ``seed`` form one *experiment*: the report gives the
mean and spread of its metrics, and the curves draw its mean with a band of one standard
deviation. matplotlib and plotly are imported only when a figure is drawn, so that the
training process can import :func:`verdicts` cheaply.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alexnet_lab.verdicts import VERDICTS, VerdictThresholds, describe_verdicts, verdicts

if TYPE_CHECKING:
    import plotly.graph_objects as go

#: Config keys that do not change what is learned (names, paths, progress switches); left out of
#: "what differs" and of grouping runs into experiments. ``verdicts.*`` and ``hydra.*`` likewise.
IGNORED_KEYS = frozenset(
    {
        "run_name", "resume", "data.raw_dir", "data.cache_dir", "data.progress", "data.workers",
        "trainer.enable_progress_bar",
    }
)
IGNORED_PREFIXES = ("verdicts.", "hydra.")

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
#: metrics.json statuses of runs whose numbers count (train.py stops a blown-up run as "diverged").
FINISHED_STATUSES = ("ok", "diverged")
METRIC_KEYS = ("val_acc_best", "val_acc", "val_balanced_acc", "test_acc", "test_balanced_acc", "epochs", "wall_s")


class ReportError(ValueError):
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
    verdicts: list[str] = field(default_factory=list)

    @property
    def history(self) -> list[dict[str, float]]:
        history = self.metrics.get("history")
        return history if isinstance(history, list) else []

    @property
    def finished(self) -> bool:
        """Trained to the end (``ok``, or stopped as ``diverged``) with its numbers in metrics.json."""
        return self.status in FINISHED_STATUSES and "history" in self.metrics


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"downscale": 16}}`` -> ``{"model.downscale": 16}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / ".hydra").is_dir()


def _run_order(path: Path) -> tuple[int, int, str]:
    # sweep job dirs start with Hydra's job number ("10_..." after "9_..."); run dirs with a date
    match = re.match(r"(\d+)_", path.name)
    return (0, int(match.group(1)), path.name) if match else (1, 0, path.name)


def find_run_dirs(path: str | Path) -> list[Path]:
    """The run dirs of ``path``: itself if it is a run dir (or its metrics.json), else its subdirs that are."""
    path = Path(path)
    if path.is_file() and path.name == "metrics.json":
        return [path.parent]
    if not path.is_dir():
        raise ReportError(f"{path}: no such directory; pass a run dir or a sweep dir (outputs/multirun/...)")
    if is_run_dir(path):
        return [path]
    runs = sorted((p for p in path.iterdir() if p.is_dir() and is_run_dir(p)), key=_run_order)
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


def _label_from_dir(name: str) -> str:
    # "3_ablation_3_augmented" (sweep job) or "2024-05-01_12-00-00-123456_default" (single run)
    return re.sub(r"^(\d+_|\d{4}-\d\d-\d\d_[\d-]+_)", "", name) or name


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
    name = metrics.get("run_name") or config.get("run_name")
    label = name if isinstance(name, str) and "${" not in name else _label_from_dir(path.name)
    run = Run(
        path=path,
        label=label,
        status=status,
        error=error,
        metrics=metrics,
        config=flatten(config),
        choices={str(k): str(v) for k, v in choices.items() if not str(k).startswith("hydra/")},
    )
    # recomputed with the run's own thresholds, so that every run of a report follows today's
    # rules; metrics.json's list stands in only where there is no history to judge
    stored = metrics.get("verdicts")
    if not run.history and isinstance(stored, list):
        run.verdicts = [str(v) for v in stored]
    else:
        try:
            run.verdicts = verdicts(run.history, config.get("verdicts"))
        except ValueError:  # a damaged thresholds block: judge by the defaults
            run.verdicts = verdicts(run.history)
    if run.status == "diverged" and "diverged" not in run.verdicts:  # stopped by train.py's guard
        run.verdicts = [name for name in VERDICTS if name in run.verdicts or name == "diverged"]
    return run


def load_runs(path: str | Path) -> list[Run]:
    """Every run under ``path`` (a run dir, a sweep dir, or a metrics.json), in job order."""
    return [load_run(p) for p in find_run_dirs(path)]


# --------------------------------------------------------------------------- tables


def split_label(label: str) -> list[str]:
    """Split a run name at the commas between overrides, not those inside ``{...}`` or ``[...]``."""
    parts, depth, current = [], 0, ""
    for char in label:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part for part in parts if part]


def strip_common(labels: Sequence[str]) -> list[str]:
    """Drop the overrides that every label shares (``trainer.max_epochs=1`` on a whole sweep)."""
    if len(labels) < 2:
        return list(labels)
    split = [split_label(label) for label in labels]
    common = set(split[0]).intersection(*split[1:])
    return [",".join(p for p in parts if p not in common) or label for parts, label in zip(split, labels)]


def _without_seed(label: str) -> str:
    return ",".join(part for part in split_label(label) if not part.startswith("seed=")) or "default"


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def config_diff(previous: Run | None, run: Run, *, ignore: Sequence[str] = ()) -> str:
    """What differs in ``run``'s config from ``previous``'s, as overrides: ``data.balance=true, optim=sgd``.

    A changed config group shows as ``group=choice``; the keys that come with it (present on
    one side only, or the group's ``name``) are implied by it and left out.
    """
    if previous is None or not previous.config or not run.config:
        return ""  # the first run, or a run whose .hydra/config.yaml is missing: nothing to compare
    changed_groups = [
        group
        for group in sorted(set(previous.choices) | set(run.choices))
        if group != "experiment" and previous.choices.get(group) != run.choices.get(group)
    ]
    parts = [f"{group}={run.choices.get(group)}" for group in changed_groups]
    missing = object()
    for key in sorted(set(previous.config) | set(run.config)):
        if _ignored(key) or key in ignore:
            continue
        old, new = previous.config.get(key, missing), run.config.get(key, missing)
        if old == new and type(old) is type(new):
            continue
        in_changed_group = any(key.startswith(f"{group}.") for group in changed_groups)
        if in_changed_group and (old is missing or new is missing or key.rsplit(".", 1)[-1] == "name"):
            continue
        parts.append(f"~{key}" if new is missing else f"{key}={_format_value(new)}")
    return ", ".join(parts)


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


def group_runs(runs: Sequence[Run]) -> list[Experiment]:
    """Group runs whose configs differ only in ``seed`` (and ignored keys), in order of first appearance."""
    groups: dict[Any, Experiment] = {}
    for run in runs:
        if run.config:
            key: Any = tuple(
                sorted((k, repr(v)) for k, v in run.config.items() if not _ignored(k) and k != "seed")
            ) + tuple(sorted(run.choices.items()))
        else:  # no resolved config: fall back on the name
            key = _without_seed(run.label)
        groups.setdefault(key, Experiment(label=_without_seed(run.label), runs=[])).runs.append(run)
    experiments = list(groups.values())
    for experiment, label in zip(experiments, strip_common([e.label for e in experiments])):
        experiment.label = label
    return experiments


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = np.array([v for v in values if math.isfinite(v)], dtype=float)
    if not finite.size:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else math.nan


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
        for key in METRIC_KEYS:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([_number(run.metrics, key) for run in finished])
        counts = {name: sum(name in run.verdicts for run in finished) for name in VERDICTS}
        row["verdicts"] = ", ".join(
            f"{name} {count}/{len(finished)}" if len(finished) > 1 else name for name, count in counts.items() if count
        )
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- writers


def _cell(value: Any, key: str = "") -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:.0f}" if key in ("wall_s", "epochs") else f"{value:.3f}"
    return str(value).replace("|", "\\|") or "—"


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


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


def report_markdown(runs: Sequence[Run], title: str = "") -> str:
    """report.md: the run table, the per-experiment table when there are seeds, the curves, the verdict rules."""
    rows = run_rows(runs)
    experiments = group_runs(runs)
    parts = [f"# Sweep report: {title}" if title else "# Sweep report", ""]
    parts += [f"{len(runs)} runs, {sum(run.finished for run in runs)} finished.", ""]
    parts += [_markdown_table(*_run_table_cells(rows)), ""]
    if any(len(e.runs) > 1 for e in experiments):
        parts += ["## Per experiment: mean ± standard deviation over seeds", ""]
        parts += [_markdown_table(*_experiment_table_cells(experiment_rows(experiments))), ""]
    parts += ["![loss and accuracy per epoch](curves.png)", "", "Interactive curves: report.html.", ""]
    parts += ["## Verdicts", ""]
    thresholds = _thresholds_of(runs)
    parts += [f"- `{name}`: {text}" for name, text in describe_verdicts(thresholds).items()]
    return "\n".join(parts) + "\n"


def _thresholds_of(runs: Sequence[Run]) -> VerdictThresholds:
    config = runs[0].config if runs else {}
    block = {key.removeprefix("verdicts."): value for key, value in config.items() if key.startswith("verdicts.")}
    try:
        return VerdictThresholds.from_mapping(block)
    except ValueError:
        return VerdictThresholds()


def report_csv(runs: Sequence[Run]) -> str:
    """report.csv: one row per run, full precision, empty cells for missing numbers."""
    buffer = io.StringIO()
    keys = [key for key, _ in RUN_COLUMNS] + ["error", "dir"]
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in run_rows(runs):
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


def report_html(runs: Sequence[Run], title: str = "") -> str:
    """report.html: the tables and the interactive curves, plotly.js embedded so it opens offline."""
    experiments = group_runs(runs)
    tables = _html_table(*_run_table_cells(run_rows(runs)))
    if any(len(e.runs) > 1 for e in experiments):
        tables += "<h2>Per experiment: mean ± standard deviation over seeds</h2>"
        tables += _html_table(*_experiment_table_cells(experiment_rows(experiments)))
    figure = plot_training_stats(runs).to_html(full_html=False, include_plotlyjs=True)
    rules = describe_verdicts(_thresholds_of(runs))
    rules_html = "".join(f"<li><code>{name}</code>: {html.escape(text)}</li>" for name, text in rules.items())
    style = (
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>Sweep report: {html.escape(title)}</h1>"
        f"{tables}{figure}<h2>Verdicts</h2><ul>{rules_html}</ul></body></html>\n"
    )


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


def experiment_curve(experiment: Experiment, key: str) -> Curve:
    """Mean and spread over the experiment's runs of ``key`` per epoch; runs of different length pad with NaN."""
    series = [[float(row.get(key, math.nan)) for row in run.history] for run in experiment.runs if run.history]
    length = max((len(s) for s in series), default=0)
    table = np.full((len(series), length), np.nan)  # (runs, epochs)
    for i, values in enumerate(series):
        table[i, : len(values)] = values
    table[~np.isfinite(table)] = np.nan  # an inf loss would swamp the mean; the verdict reports it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN epochs give NaN, as they should
        mean = np.nanmean(table, axis=0) if length else np.zeros(0)
        counts = np.isfinite(table).sum(axis=0)
        std = np.where(counts > 1, np.nanstd(table, axis=0, ddof=1), np.nan) if length else np.zeros(0)
    return Curve(epochs=np.arange(1, length + 1), mean=mean, std=std)


def _legend_label(experiment: Experiment) -> str:
    finished = experiment.finished
    if not finished:
        return f"{experiment.label} ({experiment.runs[0].status})"
    shared = [name for name in VERDICTS if sum(name in run.verdicts for run in finished) * 2 > len(finished)]
    seeds = f" ×{len(experiment.runs)}" if len(experiment.runs) > 1 else ""
    return f"{experiment.label}{seeds}" + (f": {', '.join(shared)}" if shared else "")


def _as_runs(source: str | Path | Sequence[Run]) -> list[Run]:
    return load_runs(source) if isinstance(source, (str, Path)) else list(source)


def plot_training_stats(source: str | Path | Sequence[Run]) -> go.Figure:
    """Interactive loss and accuracy per epoch, train dashed and val solid, one colour per experiment.

    ``source`` is a run dir, a sweep dir, a metrics.json, or runs from :func:`load_runs`.
    Seeds of one experiment draw as their mean with a band of one standard deviation.
    In a notebook: ``plotly.offline.iplot(plot_training_stats(path))`` or just the figure.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    experiments = group_runs(_as_runs(source))
    figure = make_subplots(rows=1, cols=2, subplot_titles=("loss (log scale)", "accuracy"), horizontal_spacing=0.08)
    for index, experiment in enumerate(experiments):
        color = PALETTE[index % len(PALETTE)]
        label = _legend_label(experiment)
        for col, (panel, suffix) in enumerate(PANELS, start=1):
            for split, _, dash in SPLITS:
                curve = experiment_curve(experiment, f"{split}/{suffix}")
                finite = np.isfinite(curve.std)
                if finite.any():
                    x = curve.epochs[finite]
                    upper, lower = (curve.mean + curve.std)[finite], (curve.mean - curve.std)[finite]
                    figure.add_trace(
                        go.Scatter(
                            x=np.concatenate([x, x[::-1]]),
                            y=np.concatenate([upper, lower[::-1]]),
                            fill="toself",
                            fillcolor=_rgba(color, 0.12),
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
    figure.update_yaxes(range=[_accuracy_floor(experiments), 1.02], row=1, col=2)
    figure.update_layout(
        title="train dashed, val solid; click a legend entry to hide a run",
        template="plotly_white",
        height=560,
        legend={"orientation": "h", "yanchor": "top", "y": -0.15, "x": 0},
        margin={"t": 70, "b": 40},
    )
    return figure


def _accuracy_floor(experiments: Sequence[Experiment]) -> float:
    """Bottom of the accuracy axis: 0.4 (just under a coin toss) unless some curve goes lower."""
    lowest = [
        float(np.nanmin(curve.mean))
        for experiment in experiments
        for split, _, _ in SPLITS
        if (curve := experiment_curve(experiment, f"{split}/acc")).mean.size and np.isfinite(curve.mean).any()
    ]
    return max(0.0, math.floor(min([0.45, *lowest]) * 10 - 0.5) / 10)


def _rgba(hex_color: str, alpha: float) -> str:
    red, green, blue = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red},{green},{blue},{alpha})"


def plot_curves_png(source: str | Path | Sequence[Run], path: str | Path, dpi: int = 100) -> Path:
    """curves.png: the same two panels as :func:`plot_training_stats`, legend below, drawn without a display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    experiments = group_runs(_as_runs(source))
    legend_columns = 3
    legend_rows = math.ceil((len(experiments) + 2) / legend_columns)
    figure = Figure(figsize=(12, 4.2 + 0.28 * legend_rows), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, whatever backend pyplot uses: writing a PNG needs no display
    axes = figure.subplots(1, 2)
    handles = []
    for index, experiment in enumerate(experiments):
        color = PALETTE[index % len(PALETTE)]
        for ax, (_, suffix) in zip(axes, PANELS):
            for split, style, _ in SPLITS:
                curve = experiment_curve(experiment, f"{split}/{suffix}")
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
    axes[1].set(ylim=(_accuracy_floor(experiments), 1.02), xlabel="epoch", title="accuracy")
    axes[1].axhline(0.5, color="grey", linewidth=0.8, linestyle=":")  # a coin toss on two classes
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    figure.legend(handles=handles, loc="outside lower center", ncols=legend_columns, fontsize=9, frameon=False)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, dpi=dpi, format="png")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- the report


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary file, so a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_report(path: str | Path, *, html_report: bool = True) -> dict[str, Path]:
    """Write report.md, report.csv, curves.png (and report.html) into ``path``, a run or sweep dir.

    Returns the written files by name. Runs that failed or have no metrics.json appear with
    that status. Raises :class:`ReportError` if ``path`` holds no runs.
    """
    out = Path(path)
    if out.is_file():
        out = out.parent
    runs = load_runs(out)
    title = out.name
    written = {"report.md": out / "report.md", "report.csv": out / "report.csv", "curves.png": out / "curves.png"}
    _write_text(written["report.md"], report_markdown(runs, title))
    _write_text(written["report.csv"], report_csv(runs))
    plot_curves_png(runs, written["curves.png"])
    if html_report:
        written["report.html"] = out / "report.html"
        _write_text(written["report.html"], report_html(runs, title))
    return written
