"""A hyperparameter search that continues: ``python train.py -m hparams_search=alexnet_optuna``.

:func:`sweep` runs Hydra's Optuna sweeper (hydra-optuna-sweeper 1.2/1.3: ``OptunaSweeperImpl``)
so that a study persisted in the sweep dir (conf/hparams_search/alexnet_optuna.yaml) continues
where a stopped search left off when the same command runs with the same ``hydra.sweep.dir``.
Hydra finds it as ``hydra_plugins.alexnet_lab_search.ResumableOptunaSweeper``. The plugin alone,
started again on the same study, would

- fail to create the study: its SQLite file's folder, the sweep dir, is made by the launcher
  only after the study is created;
- run ``n_trials`` more trials, however many the study already holds; here ``n_trials`` is the
  number of complete trials the study should hold at the end;
- number its jobs from 0 again; here a trial's job is numbered as the trial (``job.num`` =
  ``trial.number``), so new job dirs never take the names of earlier ones;
- restart its seeded sampler and ask the earlier trials' values again; here the seed is
  offset by the number of trials already asked, which keeps a search reproducible;
- leave a killed sweep's trials ``RUNNING`` forever; here such a trial becomes ``COMPLETE``
  with its job's result if the job finished (metrics.json; the sweep was stopped before the
  plugin told the study) and ``FAIL`` if it did not. Neither counts twice nor runs again.

One sweep runs a study at a time: a second one on the same sweep dir stops with one line.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock, Timeout
from hydra.utils import instantiate
from optuna.trial import FrozenTrial, TrialState

from alexnet_lab.errors import LabError
from alexnet_lab.identity import finished_metrics

log = logging.getLogger(__name__)

#: the metrics.json number train.py's task returns, which the study maximises
OBJECTIVE = "val_acc_best"


def sweep(impl: Any, arguments: list[str]) -> None:
    """Run the plugin's sweeper ``impl`` (an ``OptunaSweeperImpl``, set up by Hydra), continuing its study."""
    if not isinstance(impl.storage, str) or not impl.study_name:  # in memory, or a new name each time
        impl.sweep(arguments)
        return
    with _only_sweep(Path(impl.sweep_dir)):
        _make_sqlite_folder(impl.storage)
        continue_study(impl)
        impl.sweep(arguments)


def continue_study(impl: Any) -> None:
    """Set the plugin's sweeper up to continue its study, if it exists: trials to go, job numbers, sampler seed.

    First every trial a stopped sweep left ``RUNNING`` is settled (:func:`settle`).
    """
    try:
        study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
    except KeyError:  # no such study yet: the plugin creates it
        return
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        settle(study, trial, Path(impl.sweep_dir))
    trials = study.get_trials(deepcopy=False)
    complete = sum(trial.state == TrialState.COMPLETE for trial in trials)
    target = int(impl.n_trials)
    impl.n_trials = max(0, target - complete)
    impl.job_idx = len(trials)
    sampler = impl.config.hydra.sweeper.sampler
    if sampler.get("seed") is not None and not sampler.get("_partial_"):  # a grid sampler has no seed
        impl.sampler = instantiate(sampler, seed=int(sampler.seed) + len(trials))
    log.info(
        "study %s continues: %d complete trials, %d more for hydra.sweeper.n_trials=%d",
        impl.study_name,
        complete,
        impl.n_trials,
        target,
    )


@contextmanager
def _only_sweep(sweep_dir: Path) -> Iterator[None]:
    """Hold the sweep dir's lock (released when this process ends, even killed), or stop with one line."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(sweep_dir / ".search.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise LabError(f"hydra.sweep.dir={sweep_dir}: another search is running there; wait for it to end") from None
    try:
        yield
    finally:
        lock.release()


def _make_sqlite_folder(storage: str) -> None:
    """The folder of an SQLite storage's file (``sqlite:///DIR/optuna.db``), which SQLite does not create."""
    from sqlalchemy.engine import make_url

    url = make_url(storage)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)


def settle(study: optuna.Study, trial: FrozenTrial, sweep_dir: Path) -> None:
    """A trial left running by a stopped sweep: COMPLETE with its finished job's result, else FAIL."""
    value = _finished_value(trial, sweep_dir) if len(study.directions) == 1 else None
    if value is None or math.isnan(value):  # optuna refuses nan; the plugin fails such a trial too
        log.info("trial %d did not finish: failed", trial.number)
        study.tell(trial.number, state=TrialState.FAIL)
    else:
        log.info("trial %d finished before the sweep stopped: %s=%s", trial.number, OBJECTIVE, value)
        study.tell(trial.number, value)


def _finished_value(trial: FrozenTrial, sweep_dir: Path) -> float | None:
    """The objective of the finished job dir that ran ``trial`` (its overrides hold the trial's values), or None."""
    wanted = {f"{name}={value}" for name, value in trial.params.items()}  # as the plugin writes them
    if not wanted:
        return None
    for run_dir in sorted(sweep_dir.iterdir()):
        metrics: dict[str, Any] | None = finished_metrics(run_dir) if run_dir.is_dir() else None
        if metrics is not None and wanted <= set(metrics.get("overrides") or ()) and OBJECTIVE in metrics:
            return float(metrics[OBJECTIVE])
    return None
