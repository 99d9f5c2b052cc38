"""Which runs are the same, what tells them apart, and which are done: one run identity.

One list, :data:`NOT_LEARNED`, names the config keys that do not change what a run learns
(paths, progress bars, ``resume``, device placement, loggers, verdict thresholds). Run dir names
(:func:`run_name`, from the command-line overrides), the report's grouping of runs into
experiments (:func:`experiment_key`) and its "what differs" column (:func:`config_diff`) all
leave those keys out, so ``resume=true`` or another cache folder never makes a run look new.
A run's results are read (:func:`finished_metrics`) and written (:func:`write_json`) here too.
Which dir of a sweep already holds a run (:func:`home_of`) is decided here by that identity too.
Nothing here imports more than the standard library, PyYAML, OmegaConf (to read what Hydra
wrote) and the lab's error classes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from alexnet_lab.errors import LabError

#: Config keys (glob patterns) that do not change what is learned.
NOT_LEARNED = (
    "run_name",
    "resume",
    "checkpoint_every",  # when last.ckpt is written; a resume replays the epochs since, exactly
    "data.raw_dir",
    "data.cache_dir",
    "data.progress",
    "data.workers",
    "data.on_device",
    "trainer.enable_progress_bar",
    "trainer.accelerator",
    "verdicts.*",
    "paths.*",
    "logger.*",
    "hparams_search",  # a search's trials differ by the values it sampled, which name them
    "pack",  # a packed sweep's job that trains other runs: those runs have their own names
    "hydra.*",
    "hydra/*",
)
#: metrics.json statuses of a run that is over: ``resume=true`` skips it and its numbers count.
FINISHED = ("ok", "diverged")
#: Longest run name in bytes: a run dir is ``<job>_<name>`` or ``<date>_<time>_<name>``, and file
#: systems allow 255 bytes per name; longer names end in a hash of the overrides instead.
MAX_NAME_BYTES = 160


def is_learned(key: str) -> bool:
    """Whether a config key can change what a run learns (not in :data:`NOT_LEARNED`)."""
    return not any(fnmatch.fnmatchcase(key, pattern) for pattern in NOT_LEARNED)


def override_key(override: str) -> str:
    """The key an override sets: ``+trainer.x=1`` -> ``trainer.x``, ``~seed`` -> ``seed``."""
    return override.split("=", 1)[0].lstrip("+~")


def run_name(overrides: Sequence[str]) -> str:
    """A run's name: its overrides that change what is learned, readable and short enough for a dir name.

    ``["experiment=ablation_2_dropout", "seed=1", "resume=true"]`` -> ``ablation_2_dropout,seed=1``;
    no overrides -> ``default``. A name over :data:`MAX_NAME_BYTES` is cut and ends in a short
    hash of the whole list (the full overrides stay in the run's ``.hydra/overrides.yaml``).
    """
    learned = [override for override in overrides if is_learned(override_key(override))]
    name = ",".join(override.removeprefix("experiment=") for override in learned).replace("/", "_") or "default"
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256("\n".join(learned).encode()).hexdigest()[:8]
    return name.encode()[: MAX_NAME_BYTES - 9].decode(errors="ignore") + "-" + digest


def read_overrides(run_dir: Path) -> list[str] | None:
    """The command-line overrides Hydra stored in a run dir (``.hydra/overrides.yaml``), if readable."""
    try:
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return [str(item) for item in overrides] if isinstance(overrides, list) else None


def finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run dir's metrics.json if it records a finished run (ok or diverged), else None."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("status") in FINISHED else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` (a run's metrics.json, an evaluation) as JSON via a temporary file: no reader sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    tmp.replace(path)


def record_failure(
    run_dir: Path, error: BaseException, message: str, overrides: Sequence[str], log_files: Sequence[Any] | None = None
) -> None:
    """A failed run: metrics.json says ``failed`` and why; the message and traceback go to its log file(s) only.

    ``log_files``: the logging handlers that are the run's log (default: every file handler of the
    root logger, which Hydra points at the job's train.log); the terminal gets one line elsewhere.
    """
    logger = logging.getLogger(__name__)
    text = f"{'error' if isinstance(error, LabError) else 'run failed'}: {message}"
    record = logger.makeRecord(
        logger.name, logging.ERROR, __file__, 0, text, (), (type(error), error, error.__traceback__)
    )
    if log_files is None:
        log_files = [handler for handler in logging.getLogger().handlers if isinstance(handler, logging.FileHandler)]
    for handler in log_files:
        handler.handle(record)
    write_json(run_dir / "metrics.json", {"status": "failed", "error": message, "overrides": list(overrides)})


# ----------------------------------------------------------------------------- comparing runs


class Comparable(Protocol):
    """A run as far as identity is concerned: its flattened config and its config group choices."""

    config: dict[str, Any]  # {"model.downscale": 16, ...}
    choices: dict[str, str]  # {"optim": "adam", ...}


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"downscale": 16}}`` -> ``{"model.downscale": 16}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def format_value(value: Any) -> str:
    """A config value as an override writes it: ``true``, ``0.001``, ``[1,2]``."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def config_diff(previous: Comparable | None, run: Comparable, *, ignore: Sequence[str] = ()) -> str:
    """What differs in ``run``'s config from ``previous``'s, as overrides: ``data.balance=true, optim=sgd``."""
    return ", ".join(differences(previous, run, ignore=ignore))


def differences(previous: Comparable | None, run: Comparable, *, ignore: Sequence[str] = ()) -> list[str]:
    """What differs in ``run``'s config from ``previous``'s, one override each: ``["data.balance=true", ...]``.

    A changed config group shows as ``group=choice``; the keys that come with it (present on
    one side only, or the group's ``name``) are implied by it and left out.
    """
    if previous is None or not previous.config or not run.config:
        return []  # the first run, or a run whose .hydra/config.yaml is missing: nothing to compare
    changed_groups = [
        group
        for group in sorted(set(previous.choices) | set(run.choices))
        if group != "experiment" and previous.choices.get(group) != run.choices.get(group)
    ]
    parts = [f"{group}={run.choices.get(group)}" for group in changed_groups]
    missing = object()
    for key in sorted(set(previous.config) | set(run.config)):
        if not is_learned(key) or key in ignore:
            continue
        old, new = previous.config.get(key, missing), run.config.get(key, missing)
        if old == new and type(old) is type(new):
            continue
        in_changed_group = any(key.startswith(f"{group}.") for group in changed_groups)
        if in_changed_group and (old is missing or new is missing or key.rsplit(".", 1)[-1] == "name"):
            continue
        parts.append(f"~{key}" if new is missing else f"{key}={format_value(new)}")
    return parts


def experiment_key(run: Comparable) -> tuple[Any, ...]:
    """What runs of one experiment share: every learned key but ``seed``, and the group choices."""
    learned = sorted((key, repr(value)) for key, value in run.config.items() if is_learned(key) and key != "seed")
    return (*learned, *sorted(run.choices.items()))


def run_identity(run: Comparable) -> tuple[Any, ...]:
    """What one run is, whatever its dir is called: its experiment and its seed."""
    return experiment_key(run), repr(run.config.get("seed"))


# ----------------------------------------------------------------------------- what a run dir holds


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML file of Hydra's as plain data, interpolations left as written; empty if missing or damaged."""
    from omegaconf import OmegaConf  # as Hydra wrote it: OmegaConf reads its floats (1e-05) as floats

    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # run_name needs Hydra's runtime
    except Exception:  # a missing or damaged .hydra file leaves the config unknown, nothing worse
        return {}
    return {str(key): value for key, value in loaded.items()} if isinstance(loaded, dict) else {}


def group_choices(choices: Mapping[Any, Any]) -> dict[str, str]:
    """Hydra's ``runtime.choices`` as they tell runs apart: groups left unchosen (``null``) and Hydra's own left out."""
    return {str(k): str(v) for k, v in choices.items() if v is not None and not str(k).startswith("hydra/")}


def recorded_config(run_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A run dir's config and config group choices, as Hydra saved them in ``.hydra/`` (empty where unreadable)."""
    config = load_yaml(run_dir / ".hydra" / "config.yaml")
    hydra = load_yaml(run_dir / ".hydra" / "hydra.yaml").get("hydra") or {}  # a torn file may end at "hydra:"
    return config, group_choices((hydra.get("runtime") or {}).get("choices") or {})


#: Sweep job dirs: ``<job number>_<run name>``.
JOB_DIR = re.compile(r"^\d+_")


@dataclass
class _Recorded:
    config: dict[str, Any]
    choices: dict[str, str]


#: {run dir: (mtime of its .hydra/config.yaml, its run_identity)}: a sweep's jobs each look for their home
_identities: dict[Path, tuple[int, tuple[Any, ...]]] = {}


def home_of(sweep_dir: Path, config: Mapping[str, Any], choices: Mapping[Any, Any]) -> str | None:
    """The job dir of ``sweep_dir`` that already holds the run of this config and seed, if one does.

    So that more seeds (or more steps) run into a sweep dir find their finished runs by what
    they are, not by a job number that the longer sweep gave to another run. Where two dirs hold
    it (left by an older lab), the finished one, else the first.
    """
    wanted = run_identity(_Recorded(flatten(config), group_choices(choices)))
    # Hydra writes multirun.yaml as a sweep starts: a dir whose config is newer is one of this sweep's own jobs
    # (e.g. -m logger=csv,none: two jobs of one run identity), never an older run to continue
    started = (sweep_dir / "multirun.yaml").stat().st_mtime_ns if (sweep_dir / "multirun.yaml").is_file() else None
    found = []
    for run_dir in sorted(sweep_dir.iterdir(), key=lambda p: natural_key(p.name)) if sweep_dir.is_dir() else []:
        saved = run_dir / ".hydra" / "config.yaml"
        if not JOB_DIR.match(run_dir.name) or not saved.is_file():
            continue
        stamp = saved.stat().st_mtime_ns
        if started is not None and stamp >= started:
            continue
        if run_dir not in _identities or _identities[run_dir][0] != stamp:
            stored, stored_choices = recorded_config(run_dir)
            _identities[run_dir] = (stamp, run_identity(_Recorded(flatten(stored), stored_choices)))
        if _identities[run_dir][1] == wanted:
            found.append(run_dir)
    chosen = [run_dir for run_dir in found if finished_metrics(run_dir) is not None] or found
    return chosen[0].name if chosen else None


# ----------------------------------------------------------------------------- names


def split_name(name: str) -> list[str]:
    """Split a run name at the commas between overrides, not those inside ``{...}`` or ``[...]``."""
    parts, depth, current = [], 0, ""
    for char in name:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part for part in parts if part]


def strip_common(names: Sequence[str]) -> list[str]:
    """Drop the overrides that every name shares (``trainer.max_epochs=1`` on a whole sweep)."""
    if len(names) < 2:
        return list(names)
    split = [split_name(name) for name in names]
    common = set(split[0]).intersection(*split[1:])
    return [",".join(p for p in parts if p not in common) or name for parts, name in zip(split, names, strict=True)]


def without_seed(name: str) -> str:
    return ",".join(part for part in split_name(name) if not part.startswith("seed=")) or "default"


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort key that puts ``ablation_2`` before ``ablation_10`` (numbers compare as numbers)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))
