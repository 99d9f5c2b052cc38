"""Sweeps that survive: divergence, crashes, kills and interrupts, resume, launchers, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config, run_train, tiny_overrides

from alexnet_lab.callbacks import history_from_checkpoint
from alexnet_lab.train import reset_job_state

# long enough (about a second of training) that a signal lands mid-run
# last.ckpt after epochs 3, 6 and 8: a kill as soon as the first exists lands between two saves
LONG_RUN = [
    "trainer.max_epochs=8",
    "checkpoint_every=3",
    "data.synthetic.counts={cat:60,dog:40}",
    "data.augment=true",
    "model.dropout=0.5",
]


def comparable(metrics: dict) -> dict:
    """What must be equal between two runs of one config and seed (timings and paths may differ)."""
    keys = ("status", "epochs", "val_acc", "val_acc_best", "test_acc", "test_balanced_acc", "per_class_recall")
    history = [{k: v for k, v in row.items() if k != "epoch_s"} for row in metrics["history"]]
    return {**{k: metrics[k] for k in keys}, "history": history}


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def sweep_runs(sweep: Path) -> dict[str, Path]:
    return {p.name: p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")}


def test_seed_zero_is_a_seed():
    reset_job_state(compose_config("seed=0").seed)
    assert os.environ["PL_GLOBAL_SEED"] == "0" and torch.initial_seed() == 0


def test_joblib_jobs_share_the_cores():
    cores = len(os.sched_getaffinity(0))
    reset_job_state(0, parallel_jobs=2)
    assert torch.get_num_threads() == max(1, cores // 2)
    reset_job_state(0)
    assert torch.get_num_threads() >= max(1, cores // 2)


@pytest.mark.slow
def test_diverging_and_crashing_jobs_do_not_stop_the_sweep(tmp_path):
    not_a_dir = tmp_path / "cache_is_a_file"
    not_a_dir.write_text("a file where the cache folder should be\n")
    sweep = tmp_path / "sweep"
    result = run_train(
        [
            "-m",
            "optim.lr=1e-3,1e6",
            f"data.cache_dir={tmp_path / 'cache'},{not_a_dir}",
            *[
                item
                for item in tiny_overrides(tmp_path, epochs=4)
                if not item.startswith(("data.raw_dir", "data.cache_dir"))
            ],
            f"data.raw_dir={tmp_path / 'raw'}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode != 0, "a failed job must make the multirun exit non-zero"
    runs = sweep_runs(sweep)
    assert len(runs) == 4
    statuses, crashed_dirs = {}, []
    for run in runs.values():
        metrics = read_metrics(run)
        overrides = " ".join(metrics["overrides"])
        crashed = str(not_a_dir) in overrides
        statuses[("optim.lr=0.001" not in overrides, crashed)] = metrics
        if crashed:
            crashed_dirs.append(run)
    assert statuses[(False, False)]["status"] == "ok" and statuses[(False, False)]["epochs"] == 4
    diverged = statuses[(True, False)]
    assert diverged["status"] == "diverged" and diverged["epochs"] < 4
    assert diverged["diverged"]["epoch"] == diverged["epochs"] - 1
    for crashed in (statuses[(False, True)], statuses[(True, True)]):
        assert crashed["status"] == "failed" and crashed["error"] and "\n" not in crashed["error"]
    assert all("Traceback" in (run / "train.log").read_text() for run in crashed_dirs)


@pytest.mark.slow
def test_a_diverging_single_run_ends_early_and_exits_zero(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(["optim.lr=1e6", *tiny_overrides(tmp_path, epochs=6), f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "diverged" and metrics["epochs"] < 6
    assert "diverged at epoch" in result.stdout + result.stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict]:
    tmp_path = tmp_path_factory.mktemp("baseline")
    run_dir = tmp_path / "run"
    result = run_train([*tiny_overrides(tmp_path), *LONG_RUN, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp_path, read_metrics(run_dir)


def start_and_signal(tmp_path: Path, run_dir: Path, signum: int) -> subprocess.Popen:
    """Start a long run, send ``signum`` once its first end-of-epoch checkpoint exists, and wait."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *tiny_overrides(tmp_path), *LONG_RUN, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as a terminal's job gets it: a shell's background job (`.ci/run &`) starts with SIGINT
        # ignored, and Python then never raises KeyboardInterrupt, so the run would just finish
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signum)
    process.communicate(timeout=120)
    return process


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_metrics(uninterrupted):
    tmp_path, expected = uninterrupted
    run_dir = tmp_path / "killed"
    process = start_and_signal(tmp_path, run_dir, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists(), "the run finished before the kill: make LONG_RUN longer"
    saved = history_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert len(saved) in (3, 6)  # killed after a save, before the next: the epochs since are trained again
    result = run_train([*tiny_overrides(tmp_path), *LONG_RUN, "resume=true", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from" in result.stdout + result.stderr
    assert comparable(read_metrics(run_dir)) == comparable(expected)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_cleanly_and_resumes_exactly(uninterrupted, signum):
    tmp_path, expected = uninterrupted
    run_dir = tmp_path / f"stopped_{signum}"
    process = start_and_signal(tmp_path, run_dir, signum)
    assert process.returncode == 130
    stopped = read_metrics(run_dir)
    assert stopped["status"] == "interrupted" and 1 <= stopped["epochs"] < 8
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    result = run_train([*tiny_overrides(tmp_path), *LONG_RUN, "resume=true", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert comparable(read_metrics(run_dir)) == comparable(expected)
    # a finished run is skipped, not trained again
    again = run_train([*tiny_overrides(tmp_path), *LONG_RUN, "resume=true", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert again.returncode == 0 and "already finished" in again.stdout + again.stderr


def files_of(sweep: Path) -> dict[str, int]:
    """Every file of every job of a sweep (but its log) and its mtime."""
    return {
        str(path.relative_to(sweep)): path.stat().st_mtime_ns
        for path in sweep.glob("*_*/**/*")
        if path.is_file() and path.name != "train.log"
    }


@pytest.mark.slow
def test_the_readme_resume_flow_skips_finished_jobs_and_leaves_them_alone(tmp_path):
    # as the README says: a sweep, then the same command with resume=true
    sweep = tmp_path / "sweep"
    args = ["-m", "model.downscale=16,8", *tiny_overrides(tmp_path), f"hydra.sweep.dir={sweep}"]
    assert run_train(args, cwd=tmp_path).returncode == 0
    finished = files_of(sweep)
    assert len(sweep_runs(sweep)) == 2 and any(name.endswith("metrics.json") for name in finished)
    result = run_train([*args, "resume=true"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("already finished") == 2
    assert len(sweep_runs(sweep)) == 2, f"no new job dirs: {sorted(sweep_runs(sweep))}"
    assert files_of(sweep) == finished  # metrics, checkpoints, events and .hydra/ untouched
    report = (sweep / "report.csv").read_text().splitlines()
    assert len(report) == 1 + 2, "the report shows each run once"


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], ["hydra/launcher=submitit_local"]]
)
def test_parallel_launchers_run_a_two_job_sweep(tmp_path, launcher):
    # build the data once first, so the two jobs only read it
    assert run_train([*tiny_overrides(tmp_path), f"hydra.run.dir={tmp_path / 'warmup'}"], cwd=tmp_path).returncode == 0
    sweep = tmp_path / "sweep"
    result = run_train(
        ["-m", "seed=0,1", *launcher, *tiny_overrides(tmp_path), f"hydra.sweep.dir={sweep}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sweep_runs(sweep)
    metrics = [read_metrics(run) for run in runs.values()]
    assert len(metrics) == 2 and all(m["status"] == "ok" for m in metrics)
    assert sorted(m["seed"] for m in metrics) == [0, 1]
    if "hydra/launcher=joblib" in launcher:
        assert all(m["threads"] == max(1, len(os.sched_getaffinity(0)) // 2) for m in metrics)


@pytest.mark.slow
def test_ddp_spawn_with_two_cpu_processes_inside_a_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train(
        [
            "-m",
            "seed=0,1",
            "trainer.strategy=ddp_spawn",
            "trainer.devices=2",
            *tiny_overrides(tmp_path, epochs=2),
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sweep_runs(sweep)
    assert len(runs) == 2, f"one run dir per job, not a re-launched sweep: {sorted(runs)}"
    for run in runs.values():
        metrics = read_metrics(run)
        assert metrics["status"] == "ok" and metrics["epochs"] == 2 and len(metrics["history"]) == 2
        assert 0 <= metrics["test_acc"] <= 1


@pytest.mark.slow
def test_two_runs_started_together_get_their_own_dirs(tmp_path):
    args = [sys.executable, str(ROOT / "train.py"), *tiny_overrides(tmp_path), "trainer.max_epochs=1"]
    assert run_train(args[2:], cwd=tmp_path).returncode == 0  # data built once
    processes = [
        subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)
    ]
    assert [p.wait(timeout=180) for p in processes] == [0, 0]
    assert len(list((tmp_path / "outputs" / "runs").iterdir())) == 3


def test_slurm_preset_composes_with_resume_settings():
    from hydra import compose, initialize_config_dir

    import alexnet_lab.cli  # noqa: F401  (registers the config schema)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.timeout_min > 0 and launcher.max_num_timeout > 0
