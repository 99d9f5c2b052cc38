"""Waiting on a sweep's Slurm jobs, with or without accounting: the work of ``hydra/launcher=slurm``.

hydra-submitit-launcher submits the sweep as one job array and waits for each job's result
file; when a job ends without one (cancelled, killed for memory, out of requeues) only the
job's state tells, and submitit asks ``sacct`` for it. On a cluster without accounting
(``AccountingStorageType=accounting_storage/none``, as scripts/slurm_local.sh) sacct fails:
submitit warns on every poll and waits forever for such a job. :class:`QueueWatcher` asks
``squeue`` instead there (it lists jobs until MinJobAge after they end; a job it no longer
lists is over), and :func:`launch` turns submitit's many-line report of a job that ended
without a result into one line. A requeued job (preempted or timed out) is pending, not
over, and its result arrives when it finishes. The launcher class is
``hydra_plugins.alexnet_lab_slurm.SlurmLauncher`` (Hydra finds launchers only there).
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from submitit.core.utils import FailedJobError, UncompletedJobError
from submitit.slurm import slurm

from alexnet_lab.errors import LabError

log = logging.getLogger(__name__)

#: Slurm's job states after which a job never runs again (squeue --states=all lists them until MinJobAge)
FINAL_STATES = frozenset(
    {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT"}
)
#: the state given to a job squeue no longer lists: it ended more than MinJobAge ago
GONE = "ENDED_UNKNOWN"
#: seconds between two state queries at most (submitit's own: 600); results are seen within a second anyway
POLL_S = 60


class SlurmJobError(RuntimeError):
    """A job of the sweep ended without a result: killed, cancelled, or failed outside the run."""


class SlurmRefused(LabError):
    """sbatch refused the sweep's job array: bad input, in the launcher's settings."""


#: what :class:`SlurmRefused` says to check
LAUNCHER_KEYS = "hydra.launcher.partition, gpus_per_node, cpus_per_task, mem_gb, timeout_min"


class QueueWatcher(slurm.SlurmInfoWatcher):
    """submitit's job-state watcher, asking squeue where sacct cannot answer (no accounting)."""

    def __init__(self, delay_s: int = POLL_S) -> None:
        super().__init__(delay_s=delay_s)
        self.accounting: bool | None = None  # known after the first query

    def update(self) -> None:
        if self.accounting is None:  # sacct fails at once without accounting ("accounting storage is disabled")
            probe = subprocess.run(["sacct", "--noheader", "-j", "1"], capture_output=True, check=False)
            self.accounting = probe.returncode == 0
            if not self.accounting:
                log.info("no Slurm accounting (sacct): job states from squeue")
        if self.accounting:
            super().update()
            return
        asked = self._registered - self._finished
        if not asked:
            return
        self._num_calls += 1
        ids = ",".join(sorted({job.split("_")[0] for job in asked}))
        command = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", f"--jobs={ids}"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        # squeue fails when none of the jobs is known any more; any other failure (controller down) tells nothing
        if done.returncode == 0 or "Invalid job id" in done.stderr:
            listed = dict(line.split("|", 1) for line in done.stdout.split() if "|" in line)
            for job in asked:
                state = listed.get(job, GONE).split()[0]
                # states submitit does not know (CONFIGURING, SUSPENDED, REQUEUE_HOLD, ...) are not over
                running = state not in FINAL_STATES and state != GONE
                self._info_dict[job] = {"JobID": job, "State": "RUNNING" if running else state}
        else:
            log.warning("squeue failed (%s): job states unknown until the next try", done.stderr.strip()[:200])
        self._last_status_check = time.time()
        for job in asked:
            if self.is_done(job, mode="cache"):
                self._finished.add(job)


def one_line_report(error: UncompletedJobError) -> str:
    """submitit's report of a job that ended without a result, as one line: the job, why, and its log."""
    text = str(error)
    logs = re.findall(r"^\s*- (\S+\.err)$", text, flags=re.MULTILINE)
    if isinstance(error, FailedJobError):
        trace = re.search(r"-{10,}\n(.*?)\n-{10,}", text, flags=re.DOTALL)  # between submitit's rules
        if trace is None:  # sbatch's own error: a partition, GPUs, cores or memory the cluster does not have
            return f"Slurm refused the sweep ({LAUNCHER_KEYS}?): " + " ".join(text.split())[:300]
        # Python failed outside the run (a run's own errors come back as they are)
        lines = [line.strip() for line in trace.group(1).splitlines() if line.strip()]
        cause = lines[-1] if lines else "failed"
        return f"a Slurm job failed: {cause}" + (f"; its log: {logs[0]}" if logs else "")
    found = re.search(r"Job (\S+) \(task: \S+\) with path (\S+)\s+has not produced any output \(state: ([^)]*)\)", text)
    if found is None:
        return " ".join(text.split())[:300]
    job, result, state = found.groups()
    log_file = result.replace("_result.pkl", "_log.err")
    return f"Slurm job {job} ended without a result (state {state}): killed or cancelled? its log: {log_file}"


def launch(base_launch: Callable[..., Sequence[Any]], *args: Any) -> Sequence[Any]:
    """hydra-submitit-launcher's ``launch``, waiting through :class:`QueueWatcher`; a lost job is one line."""
    # the jobs submitit creates during this call take the watcher from their class
    if not isinstance(slurm.SlurmJob.watcher, QueueWatcher):
        slurm.SlurmJob.watcher = QueueWatcher()
    try:
        return base_launch(*args)
    except UncompletedJobError as error:
        refused = isinstance(error, FailedJobError) and "-" * 10 not in str(error)
        raise (SlurmRefused if refused else SlurmJobError)(one_line_report(error)) from None
