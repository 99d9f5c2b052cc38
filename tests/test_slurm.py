"""A real Slurm: the preset's sweeps, requeue and resume, failed and lost jobs, scripts/slurm_local.sh.

The Slurm tests run against the one-node Slurm that scripts/slurm_local.sh starts for the
session (it installs the Debian packages if missing: root and apt-get, as CI has) and stops
at the end. That cluster has no accounting (sacct), as the script sets it up: job states
come from squeue (alexnet_lab/slurm.py). Also here, with the GPUs faked: one GPU per job of
a parallel sweep.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, ROOT, compose_config, run_train, tiny_overrides

import alexnet_lab.train
from alexnet_lab.train import own_gpu

SCRIPT = ROOT / "scripts" / "slurm_local.sh"
#: the Slurm preset on the local cluster: its partition, no GPU, sizes that fit a machine of 2 cores
ON_LOCAL_SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
]
#: a run long enough (10 epochs, about 3 s on 2 cores) that a signal lands mid-run
# last.ckpt after every epoch, so the requeue signal comes early in the run, whatever the default policy
LONG_RUN = [
    "trainer.max_epochs=10",
    "checkpoint_every=1",
    "data.synthetic.counts={cat:60,dog:40}",
    "data.augment=true",
    "model.dropout=0.5",
]
#: what the script starts and stop must leave behind no more of
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmstepd")


def why_not() -> str | None:
    """Why a local Slurm cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root: scripts/slurm_local.sh installs and starts Slurm (CI runs as root)"
    installed = all(shutil.which(name) for name in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not installed and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it (scripts/slurm_local.sh)"
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        return 'needs hydra-submitit-launcher: pip install -e ".[launchers]"'
    return None


#: the tests that run against the local Slurm
on_local_slurm = pytest.mark.skipif(why_not() is not None, reason=str(why_not()))


def live_pids(name: str) -> set[int]:
    """Processes called ``name`` that are not zombies (a daemon's first fork can linger as one)."""
    found = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True, check=False).stdout.split()
    live = set()
    for pid in found:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                live.add(int(pid))
        except OSError:
            pass  # gone meanwhile
    return live


def script(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), command], capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="session")
def slurm() -> Iterator[dict[str, set[int]]]:
    """The local Slurm, up for the session; yields the daemons that ran before it started."""
    before = {name: live_pids(name) for name in DAEMONS}
    started = script("start")
    if started.returncode == 3:  # cannot here: packages not installable, a slurm.conf or slurmctld not ours
        pytest.skip(f"scripts/slurm_local.sh start: {started.stderr.strip()}")
    assert started.returncode == 0, started.stdout + started.stderr
    yield before
    script("stop")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """One data folder for the module's runs (each job builds or finds the cache under its lock)."""
    return tmp_path_factory.mktemp("slurm_data")


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def comparable(metrics: dict) -> dict:
    """What must be equal between two runs of one config and seed: every number of the history, the results."""
    keys = ("status", "epochs", "val_acc", "val_acc_best", "test_acc", "test_balanced_acc", "per_class_recall")
    history = [{k: v for k, v in row.items() if k != "epoch_s"} for row in metrics["history"]]
    return {**{k: metrics[k] for k in keys}, "history": history}


def job_ids(sweep: Path) -> list[str]:
    """The Slurm ids of a sweep's jobs (12, or 12_0, 12_1 for an array), from submitit's folders."""
    return sorted(path.parent.name for path in sweep.glob(".submitit/*/*_submitted.pkl"))


def logged_at(log: str, text: str) -> float:
    """When the first line of a run's log holding ``text`` was written (seconds since the epoch)."""
    line = next(line for line in log.splitlines() if text in line)
    return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def wait_for(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def long_run(data: Path) -> list[str]:
    return [*tiny_overrides(data), *LONG_RUN]


def long_sweep(sweep: Path, data: Path, *params: str) -> list[str]:
    """``-m PARAMS`` of LONG_RUN on the local Slurm, into ``sweep``."""
    return ["-m", *params, *long_run(data), *ON_LOCAL_SLURM, f"hydra.sweep.dir={sweep}"]


@contextlib.contextmanager
def long_sweep_running(sweep: Path, data: Path, *params: str) -> Iterator[subprocess.Popen]:
    """A sweep of LONG_RUN (``params``; default: one job, seed 0) on the local Slurm, in the background."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    args = long_sweep(sweep, data, *(params or ("seed=0",)))
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=data,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        process.kill()


def readme_commands() -> list[list[str]]:
    """The ``python train.py`` commands of the README's "Try it locally", as words (a trailing ``&`` dropped)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("#### Try it locally", 1)[1].split("```", 2)[1].replace("\\\n", " ")
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    return [line.removesuffix("&").split() for line in lines if line.startswith("python train.py")]


@pytest.mark.slow
@on_local_slurm
def test_the_readme_sweep_runs_as_one_job_array_with_both_run_dirs_and_the_report(slurm, tmp_path):
    words = readme_commands()[0]  # two tiny runs side by side, as the README has it
    assert "hydra/launcher=slurm" in words and "-m" in words
    began = time.monotonic()
    result = run_train(words[2:], cwd=tmp_path)
    print(f"the README's two-job sweep through Slurm: {time.monotonic() - began:.1f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "debug" / "multirun").iterdir()
    runs = sorted(path for path in sweep.iterdir() if path.is_dir() and not path.name.startswith("."))
    assert [run.name for run in runs] == ["0_seed=0,debug=tiny", "1_seed=1,debug=tiny"]
    metrics = [read_metrics(run) for run in runs]
    assert [(m["status"], m["seed"], m["epochs"]) for m in metrics] == [("ok", 0, 1), ("ok", 1, 1)]
    jobs = job_ids(sweep)
    assert len(jobs) == 2 and len({job.split("_")[0] for job in jobs}) == 1, f"one job array: {jobs}"
    report = (sweep / "report.md").read_text()
    assert "2 runs, 2 finished" in report and "in progress" not in report
    assert len((sweep / "report.csv").read_text().splitlines()) == 1 + 2


@pytest.mark.slow
@on_local_slurm
def test_a_preempted_job_is_requeued_and_ends_as_if_never_stopped(slurm, data, tmp_path):
    sweep = tmp_path / "sweep"
    with long_sweep_running(sweep, data) as process:
        wait_for(lambda: any(sweep.glob("0_*/checkpoints/last.ckpt")) or process.poll() is not None, what="an epoch")
        assert process.poll() is None, "the run finished before the signal: make LONG_RUN longer"
        (job,) = job_ids(sweep)
        subprocess.run(["scancel", "--signal=USR2", job], check=True)  # submitit's checkpoint signal
        # while the job waits to start again: the same config uninterrupted, on this machine (as many threads)
        baseline = run_train(["seed=0", *long_run(data), f"hydra.run.dir={tmp_path / 'baseline'}"], data)
        assert baseline.returncode == 0, baseline.stderr[-3000:]
        _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    (run,) = sweep.glob("0_*")
    log = (run / "train.log").read_text()
    assert "Requeued job" in log, "no requeue: did the run finish before the signal? make LONG_RUN longer"
    assert "resuming from" in log, "the requeued job continues from last.ckpt"
    print(f"signal to resumed training: {logged_at(log, 'resuming from') - logged_at(log, 'Caught signal'):.1f} s")
    assert comparable(read_metrics(run)) == comparable(read_metrics(tmp_path / "baseline"))


@pytest.mark.slow
@on_local_slurm
def test_a_job_with_a_bad_config_fails_the_sweep_with_its_one_line_error(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train(
        ["-m", "optim.lr=0.001,-1", *tiny_overrides(tmp_path), *ON_LOCAL_SLURM, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: optim.lr=-1: must be a number > 0"
    good, bad = sorted(path for path in sweep.iterdir() if path.is_dir() and not path.name.startswith("."))
    assert read_metrics(good)["status"] == "ok", "the other job of the sweep still ran"
    assert read_metrics(bad)["status"] == "failed" and read_metrics(bad)["error"].startswith("optim.lr=-1")


@pytest.mark.slow
@on_local_slurm
def test_a_job_cancelled_before_its_result_fails_the_sweep_instead_of_hanging(slurm, data, tmp_path):
    # without accounting submitit would wait for this job's result forever; squeue says it is over
    sweep = tmp_path / "sweep"
    with long_sweep_running(sweep, data) as process:
        wait_for(lambda: job_ids(sweep) or process.poll() is not None, what="the job's submission")
        subprocess.run(["scancel", *job_ids(sweep)], check=True)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    last = stderr.strip().splitlines()[-1]
    assert "ended without a result (state CANCELLED)" in last and "_log.err" in last, last


@pytest.mark.slow
@on_local_slurm
def test_a_pack_is_one_slurm_job_and_a_preempted_pack_resumes_every_member(slurm, data, tmp_path):
    sweep = tmp_path / "sweep"
    # in turn: bit for bit the runs alone (auto times the forms on a busy machine and may train fused)
    packed_in_turn = ("hydra/sweeper=packed", "hydra.sweeper.form=in_turn")
    with long_sweep_running(sweep, data, "seed=0,1", *packed_in_turn) as process:
        wait_for(lambda: any(sweep.glob("1_*/checkpoints/last.ckpt")) or process.poll() is not None, what="an epoch")
        assert process.poll() is None, "the pack finished before the signal: make LONG_RUN longer"
        (job,) = job_ids(sweep)  # the two runs are one Slurm job
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        # while the pack waits to start again: each seed alone, uninterrupted, on this machine
        for seed in (0, 1):
            alone = run_train([f"seed={seed}", *long_run(data), f"hydra.run.dir={tmp_path / str(seed)}"], data)
            assert alone.returncode == 0, alone.stderr[-3000:]
        stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    assert "packed sweep: 2 jobs in 1 packs" in stdout + stderr
    for seed in (0, 1):
        (run,) = sweep.glob(f"{seed}_*")
        assert "resuming from" in (run / "train.log").read_text(), "the requeued pack continues from last.ckpt"
        packed = read_metrics(run)
        assert (packed["pack"]["size"], packed["pack"]["form"]) == (2, "in_turn")
        assert comparable(packed) == comparable(read_metrics(tmp_path / str(seed)))


@pytest.mark.slow
@on_local_slurm
def test_the_script_starts_idempotently_and_stops_all_it_started(slurm):
    running = {name: live_pids(name) for name in ("munged", "slurmctld", "slurmd")}
    again = script("start")
    assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
    assert {name: live_pids(name) for name in running} == running, "a second start starts nothing"
    assert "idle" in script("status").stdout
    stopped = script("stop")
    assert stopped.returncode == 0, stopped.stderr

    def only_what_ran_before() -> bool:
        return all(live_pids(name) <= slurm[name] for name in DAEMONS)

    wait_for(only_what_ran_before, timeout=15, what="the daemons to exit")
    # a pid file naming a process the script did not start (a reused pid): stop leaves that process alone
    bystander = subprocess.Popen(["sleep", "60"])
    pid_file = Path(os.environ.get("SLURM_LOCAL_DIR", "/tmp/alexnet_lab_slurm")) / "slurmctld.pid"
    try:
        pid_file.write_text(f"{bystander.pid}\n")
        assert script("stop").returncode == 0, "stop again: nothing to do"
        assert bystander.poll() is None, "stop signalled a process it did not start"
    finally:
        bystander.kill()
        pid_file.unlink(missing_ok=True)


def test_a_requeued_job_resumes_its_run_dir_without_resume_true(tmp_path, monkeypatch):
    # Slurm counts a job's restarts in SLURM_RESTART_COUNT: a requeued job's run dir counts as with resume=true
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    finished = {"status": "ok", "val_acc_best": 0.75}
    (run_dir / "metrics.json").write_text(json.dumps(finished))
    cfg = compose_config(*tiny_overrides(tmp_path))
    assert not cfg.resume
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert alexnet_lab.train.train(cfg, run_dir) == finished, "skipped as finished, not trained again"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert not alexnet_lab.train.requeued()
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    assert not alexnet_lab.train.requeued()


def test_without_accounting_the_job_states_come_from_squeue(monkeypatch):
    from alexnet_lab import slurm

    answers = {
        "sacct": (1, "", "sacct: error: Slurm accounting storage is disabled"),
        "squeue": (0, "7_0|RUNNING\n7_1|COMPLETED\n8|REQUEUE_HOLD\n", ""),
    }

    def run(command, **kwargs):
        code, out, err = answers[command[0]]
        return subprocess.CompletedProcess(command, code, out, err)

    monkeypatch.setattr(slurm.subprocess, "run", run)
    watcher = slurm.QueueWatcher()
    jobs = ("7_0", "7_1", "8", "9")
    for job in jobs:
        watcher.register_job(job)
    watcher.update()
    assert watcher.accounting is False
    assert [watcher.get_state(job, mode="cache") for job in jobs] == ["RUNNING", "COMPLETED", "RUNNING", slurm.GONE]
    assert [watcher.is_done(job, mode="cache") for job in jobs] == [False, True, False, True]  # 9: no longer listed
    answers["squeue"] = (1, "", "slurm_load_controller: Unable to contact slurm controller")
    watcher.update()  # tells nothing: 8 stays pending
    assert not watcher.is_done("8", mode="cache")
    answers["squeue"] = (1, "", "slurm_load_jobs error: Invalid job id specified")
    watcher.update()  # none of them is known any more: over
    assert watcher.is_done("8", mode="cache") and watcher.is_done("7_0", mode="cache")


def test_a_job_that_ended_without_a_result_is_one_line():
    from submitit.core.utils import FailedJobError, UncompletedJobError

    from alexnet_lab.slurm import one_line_report

    # submitit's own report (submitit/core/core.py: _get_outcome_and_result)
    lost = UncompletedJobError(
        "Job 12_1 (task: 0) with path /s/.submitit/12_1/12_1_0_result.pkl\n"
        "has not produced any output (state: CANCELLED by 0)\nError stream produced:\n----\nsrun: error: ..."
    )
    assert one_line_report(lost) == (
        "Slurm job 12_1 ended without a result (state CANCELLED by 0): killed or cancelled? "
        "its log: /s/.submitit/12_1/12_1_0_log.err"
    )
    rule = "-" * 22
    failed = FailedJobError(  # submitit/core/core.py: exception(), Python failing outside the run
        f"Job (task=0) failed during processing with trace:\n{rule}\nTraceback (most recent call last):\n"
        f'  File "x.py", line 1\nMemoryError: out of memory\n\n{rule}\n'
        "You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n"
        "  - /s/.submitit/12_0/12_0_0_log.err\n  - /s/.submitit/12_0/12_0_0_log.out"
    )
    assert one_line_report(failed) == (
        "a Slurm job failed: MemoryError: out of memory; its log: /s/.submitit/12_0/12_0_0_log.err"
    )
    refused = FailedJobError("sbatch: error: Invalid generic resource (gres) specification")  # sbatch's stderr
    assert one_line_report(refused).startswith("Slurm refused the sweep (hydra.launcher.partition, ")
    assert one_line_report(refused).endswith("?): " + str(refused))


# ----------------------------------------------------------------------------- one GPU per parallel job


@pytest.fixture
def three_gpus(monkeypatch):
    """torch sees three CUDA devices (none is used: only the choice is tested)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)


def test_jobs_side_by_side_take_the_gpus_round_robin(three_gpus, monkeypatch):
    auto = {"accelerator": "auto", "devices": 1}  # conf/trainer/default.yaml
    assert [own_gpu(auto, job, 2, []) for job in range(5)] == [[0], [1], [2], [0], [1]]
    assert own_gpu({"accelerator": "gpu", "devices": 1}, 4, -1, []) == [1]  # n_jobs=-1: as many as cores
    assert own_gpu(auto, 1, 1, []) is None, "one job at a time: the Trainer's choice"
    assert own_gpu(auto, 1, 2, ["seed=1", "trainer.devices=1"]) is None, "an explicit trainer.devices wins"
    assert own_gpu({"accelerator": "auto", "devices": 2}, 1, 2, []) is None, "so does one from a config file"
    assert own_gpu({"accelerator": "cpu", "devices": 1}, 1, 2, []) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert own_gpu(auto, 1, 2, []) is None


def test_each_job_of_a_parallel_sweep_is_given_its_gpu(three_gpus, monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    given = {}

    def train(cfg, run_dir, overrides=None, parallel_jobs=1):  # what train_job hands the run; no training
        given[int(cfg.seed)] = (list(cfg.trainer.devices), parallel_jobs, str(run_dir))
        return {"val_acc_best": 0.5}

    monkeypatch.setattr(alexnet_lab.train, "train", train)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)  # restored afterwards
    for job in range(4):  # job k of `-m seed=0,1,2,3 hydra/launcher=joblib hydra.launcher.n_jobs=2`
        overrides = [f"seed={job}", "run_name=test"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", [*overrides, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], True)
        with open_dict(cfg):
            cfg.hydra.mode, cfg.hydra.job.num = RunMode.MULTIRUN, job
            cfg.hydra.runtime.output_dir, cfg.hydra.overrides.task = str(tmp_path / str(job)), overrides
        HydraConfig.instance().set_config(cfg)
        alexnet_lab.train.train_job(cfg)
    assert {seed: devices for seed, (devices, _, _) in given.items()} == {0: [0], 1: [1], 2: [2], 3: [0]}
    assert all(jobs == 2 and run_dir.startswith(str(tmp_path)) for _, jobs, run_dir in given.values())
