"""A hyperparameter search (``hparams_search=alexnet_optuna``) samples only valid configs and survives being stopped.

A search is long, so it gets killed (Ctrl-C, a lost SSH session, a time limit); the same
command with the same ``hydra.sweep.dir`` must then continue the study (alexnet_lab/search.py):
``n_trials`` is the total the study reaches, earlier trials count once and keep their job dirs,
new trials get new job numbers, and a trial that was running when the sweep died is settled
rather than left ``RUNNING`` forever.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from conftest import ROOT, tiny_overrides
from filelock import FileLock
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep
from omegaconf import OmegaConf
from optuna.trial import TrialState

from alexnet_lab import config, search
from alexnet_lab.errors import LabError, check_value

SEARCH_YAML = ROOT / "alexnet_lab" / "conf" / "hparams_search" / "alexnet_optuna.yaml"
STUDY = "alexnet_optuna"


def declared_space() -> dict[str, list[float]]:
    """The search's keys and the values that bound them: every choice, an interval's two ends."""
    params = OmegaConf.load(SEARCH_YAML).hydra.sweeper.params
    parser = OverridesParser.create()
    space = {}
    for key, text in params.items():
        sweep = parser.parse_override(f"{key}={text}").value()
        if isinstance(sweep, ChoiceSweep):
            space[str(key)] = list(sweep.list)
        else:
            assert isinstance(sweep, IntervalSweep), f"{key}: {text}"
            space[str(key)] = [sweep.start, sweep.end]
    return space


def test_the_search_space_lies_inside_the_config_schema():
    """Every value the search can sample passes the schema's own check (alexnet_lab/config.py).

    So no trial is wasted on a config that fails before training (a dropout of 1, a downscale
    of 0), for any optimizer ``optim=`` may choose alongside the search.
    """
    space = declared_space()
    assert set(space) == {"optim.lr", "model.dropout", "model.downscale", "data.batch_size"}
    schemas = {"model": [config.ModelConfig], "data": [config.DataConfig], "optim": list(config.OPTIMIZERS.values())}
    for key, values in space.items():
        group, name = key.split(".")
        for schema in schemas[group]:
            field = next(f for f in dataclasses.fields(schema) if f.name == name)
            kind = typing.get_type_hints(schema)[name]
            for value in values:
                check_value(key, value, kind, dict(field.metadata))


def test_a_stopped_studys_running_trials_are_settled_and_the_rest_continues(tmp_path):
    """continue_study on a study a killed sweep left behind, without training anything.

    Trial 1's job finished (metrics.json ok) but the sweep died before telling the study: it
    becomes COMPLETE with the job's val_acc_best. Trial 2's job was killed: FAIL. With
    ``n_trials=5`` and two complete trials three are left; new jobs are numbered from 3 (=
    the next trial number); the seeded sampler is reseeded with seed + 3, so a continued search
    does not ask trial 0's values again.
    """
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize")
    trials = [study.ask() for _ in range(3)]
    for trial in trials:
        trial.suggest_float("optim.lr", 1e-5, 1e-2, log=True)
    study.tell(trials[0], 0.6)
    finished = tmp_path / "1_finished_but_not_told"
    finished.mkdir()
    overrides = [f"optim.lr={trials[1].params['optim.lr']}", "trainer.max_epochs=1"]  # as the plugin writes them
    (finished / "metrics.json").write_text(json.dumps({"status": "ok", "val_acc_best": 0.8, "overrides": overrides}))
    (tmp_path / "2_killed").mkdir()  # no metrics.json

    sampler = {"_target_": "optuna.samplers.TPESampler", "seed": 7}
    impl = SimpleNamespace(
        storage=storage,
        study_name=STUDY,
        sweep_dir=str(tmp_path),
        n_trials=5,
        job_idx=0,
        sampler=None,
        config=OmegaConf.create({"hydra": {"sweeper": {"sampler": sampler}}}),
    )
    search.continue_study(impl)

    settled = optuna.load_study(study_name=STUDY, storage=storage).trials
    assert [t.state for t in settled] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    assert settled[1].value == 0.8
    assert impl.n_trials == 3 and impl.job_idx == 3

    def first_value(sampler: optuna.samplers.BaseSampler) -> float:
        return optuna.create_study(sampler=sampler).ask().suggest_float("x", 0, 1)

    assert first_value(impl.sampler) == first_value(optuna.samplers.TPESampler(seed=7 + 3))
    assert first_value(impl.sampler) != first_value(optuna.samplers.TPESampler(seed=7))

    with FileLock(tmp_path / ".search.lock"), pytest.raises(LabError, match="another search is running"):
        search.sweep(impl, [])  # a second sweep on the same dir


def search_command(tmp_path: Path, sweep: Path) -> list[str]:
    """``python train.py -m hparams_search=alexnet_optuna`` on tiny data, 5 trials in ``sweep``."""
    tiny = [o for o in tiny_overrides(tmp_path) if not o.startswith("data.batch_size=")]  # a searched key
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "hparams_search=alexnet_optuna",
        *tiny,
        f"hydra.sweep.dir={sweep}",
        "hydra.sweeper.n_trials=5",
    ]


def finished_jobs(sweep: Path) -> list[Path]:
    """The sweep's job dirs whose metrics.json says ok, by job number."""
    done = []
    for job in sweep.iterdir() if sweep.is_dir() else ():
        try:
            if json.loads((job / "metrics.json").read_text())["status"] == "ok":
                done.append(job)
        except (OSError, ValueError, KeyError):  # not a job dir, not finished, or being written
            continue
    return sorted(done, key=lambda job: int(job.name.split("_")[0]))


def snapshot(job: Path) -> dict[str, tuple[int, int]]:
    """Every file of a job dir with its size and modification time."""
    return {str(p.relative_to(job)): (p.stat().st_size, p.stat().st_mtime_ns) for p in job.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_killed_search_continues_to_n_trials_with_the_same_command(tmp_path):
    """Kill a 5-trial search after 3 finished trials, rerun the same command: 5 complete trials in all.

    The 3 earlier job dirs are left as they were, the sweep dir holds 5 finished job dirs whose
    job numbers are the complete trials' numbers (no dir overwritten, none numbered twice), the
    sweep's report lists all 5, every sampled value lies in the declared space and was the one
    the job trained with, and the study's best value is the best of the jobs' val_acc_best.
    """
    sweep = tmp_path / "sweep"
    command = search_command(tmp_path, sweep)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 180
        while len(finished_jobs(sweep)) < 3 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGKILL)  # as a lost session or `kill -9` would: nothing gets to clean up
        first.wait()
    earlier = finished_jobs(sweep)
    assert len(earlier) == 3, (tmp_path / "first.log").read_text()[-3000:]
    before = {job.name: snapshot(job) for job in earlier}

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]

    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{sweep / 'optuna.db'}")
    complete = {t.number: t for t in study.trials if t.state == TrialState.COMPLETE}
    assert len(complete) == 5
    assert not [t.number for t in study.trials if t.state == TrialState.RUNNING]
    jobs = finished_jobs(sweep)
    assert {int(job.name.split("_")[0]) for job in jobs} == set(complete)
    assert {job.name: snapshot(job) for job in jobs if job.name in before} == before

    space = declared_space()
    report = (sweep / "report.md").read_text()
    values = []
    for job in jobs:
        trial = complete[int(job.name.split("_")[0])]
        trained = OmegaConf.load(job / ".hydra" / "config.yaml")
        for key, value in trial.params.items():
            low, high = min(space[key]), max(space[key])
            assert low <= value <= high and (key not in ("model.downscale", "data.batch_size") or value in space[key])
            assert OmegaConf.select(trained, key) == value, (job.name, key)
        assert f"optim.lr={trial.params['optim.lr']}," in report, "every trial is a row of the report"
        values.append(json.loads((job / "metrics.json").read_text())["val_acc_best"])
    assert "In progress" not in report
    assert study.best_value == max(values)
