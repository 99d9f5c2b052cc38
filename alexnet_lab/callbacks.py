"""Hydra callbacks: the sweep report, written into the sweep dir when a multirun ends.

Registered in conf/config.yaml under ``hydra.callbacks``. A report that cannot be written
is a warning in the log, never a failed sweep: the runs themselves are what matters.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepReport(Callback):
    """Write report.md, report.csv, curves.png and report.html into the sweep dir.

    Normally once, in ``on_multirun_end``. Hydra 1.3 skips that hook when a job raised (its
    sweeper re-raises the job's error after the last job), so once a job has failed the
    report is rewritten after every later job instead; the last one leaves it complete.
    """

    def __init__(self, html: bool = True) -> None:
        self.html = html
        self._job_failed = False

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.FAILED:
            self._job_failed = True
        if self._job_failed and _is_multirun(config):
            self._write(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write(Path(config.hydra.sweep.dir))

    def _write(self, sweep_dir: Path) -> None:
        try:
            from alexnet_lab.report import write_report

            written = write_report(sweep_dir, html_report=self.html)
            log.info("sweep report: %s", written["report.md"])
        except Exception as err:  # noqa: BLE001  (a report problem must never fail the sweep)
            log.warning("sweep report not written for %s: %s: %s", sweep_dir, type(err).__name__, err)


def _is_multirun(config: DictConfig) -> bool:
    from hydra.types import RunMode

    return config.hydra.get("mode") in (RunMode.MULTIRUN, "MULTIRUN")
