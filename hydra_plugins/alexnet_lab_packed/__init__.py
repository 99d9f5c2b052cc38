"""alexnet_lab's packed sweeper, where Hydra looks for sweepers: ``hydra/sweeper=packed``.

conf/hydra/sweeper/packed.yaml names it. It expands the sweep as Hydra's basic sweeper does, makes
every job's run dir, ``.hydra/`` and checked config through Hydra's own ``run_job``
(:func:`alexnet_lab.cli.prepare_job`: a bad value is one line and recorded, as for any job), groups
the jobs into packs (alexnet_lab/packing.py), prints the plan, and hands each pack to the launcher
beneath as one job (its first job's overrides and ``pack=FILE``, into ``<sweep dir>/packs/<k>``), which trains it
(alexnet_lab/packed.py). Each job's result comes back as the basic sweeper's would. The lab's
modules are imported only when a sweep runs: Hydra imports this one on every start.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

log = logging.getLogger(__name__)


class PackedSweeper(BasicSweeper):
    """Hydra's basic sweeper whose jobs train in packs: ``max_size`` runs side by side at most."""

    def __init__(self, max_size: Any = 16, form: Any = "auto", max_batch_size: Any = None, params: Any = None) -> None:
        super().__init__(max_batch_size=None, params=params)  # one batch: the plan needs every job
        self.max_size, self.form = max_size, form

    def sweep(self, arguments: list[str]) -> Any:
        from hydra._internal.callbacks import Callbacks
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.core.utils import JobStatus, configure_log, run_job
        from hydra.types import HydraContext
        from omegaconf import OmegaConf, open_dict

        from alexnet_lab.cli import prepare_job
        from alexnet_lab.errors import LabError, fail
        from alexnet_lab.packing import FORMS, PackJob, describe, plan, write_pack

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        if isinstance(self.max_size, bool) or not isinstance(self.max_size, int) or self.max_size < 1:
            fail(f"hydra.sweeper.max_size={self.max_size!r}: must be an integer >= 1 (the most runs one pack trains)")
        if self.form not in FORMS:
            fail(f"hydra.sweeper.form={self.form}: must be one of {', '.join(FORMS)} (how a pack runs its members)")
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        (jobs,) = self.split_arguments(parser.parse_overrides([*self._parse_config(), *arguments]), None)
        sweep_dir = Path(self.config.hydra.sweep.dir).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        self.validate_batch_is_legal(jobs)

        # 1. every job's run dir, .hydra/ and checked config, as the basic launcher makes them (no callbacks:
        # the jobs have not run; Hydra's callbacks see the packs run)
        quiet = HydraContext(config_loader=self.hydra_context.config_loader, callbacks=Callbacks())
        prepared = []
        for number, overrides in enumerate(jobs):
            job_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(job_config):
                job_config.hydra.job.id = job_config.hydra.job.num = number
            prepared.append(
                run_job(
                    hydra_context=quiet,
                    task_function=prepare_job,
                    config=job_config,
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                )
            )
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        to_train = [r.return_value for r in prepared if r.status == JobStatus.COMPLETED]
        packs = plan([job for job in to_train if isinstance(job, PackJob)], self.max_size, self.form)
        for line in describe(packs, self.max_size):
            log.info(line)

        # 2. each pack as one job of the launcher beneath, in <sweep dir>/packs/<k>
        pack_jobs = []
        for index, pack in enumerate(packs):
            file = str(write_pack(pack, sweep_dir / "packs" / str(index) / "pack.json")).replace("'", "\\'")
            # the first member's overrides: the pack job's Hydra settings (sweep dir, logging) are the sweep's
            pack_jobs.append([*pack.jobs[0].overrides, f"pack='{file}'", f"hydra.sweep.subdir=packs/{index}"])
        launched = self.launcher.launch(pack_jobs, initial_job_idx=len(jobs)) if pack_jobs else []

        # 3. each job's result, as the basic sweeper returns it: a failed job raises once every job has run
        heard: dict[int, tuple[Any, dict[str, Any] | None]] = {}
        for pack, pack_return in zip(packs, launched, strict=True):
            for job in pack.jobs:
                if pack_return.status != JobStatus.COMPLETED:
                    heard[job.job] = (pack_return._return_value, None)
                else:
                    heard[job.job] = (None, pack_return.return_value.get(job.job))
        for number, job_return in enumerate(prepared):
            if job_return.status != JobStatus.COMPLETED:
                continue
            value = job_return.return_value
            if isinstance(value, dict):  # resume=true found it finished
                job_return.return_value = value.get("val_acc_best")
                continue
            error, ended = heard.get(number, (RuntimeError("not trained"), None))
            if ended is not None and ended.get("status") != "failed":
                job_return.return_value = ended.get("val_acc_best")
            else:
                job_return.status = JobStatus.FAILED
                job_return.return_value = error or LabError(str((ended or {}).get("error")))
        for job_return in prepared:
            _ = job_return.return_value  # raises the first failure, as the basic sweeper does
        return [prepared]
