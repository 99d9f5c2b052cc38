"""alexnet_lab's Slurm launcher where Hydra looks for launchers: the ``hydra_plugins`` namespace.

conf/hydra/launcher/slurm.yaml names it. It is hydra-submitit-launcher's, waiting on its jobs
through squeue where the cluster has no accounting (sacct), and reporting a job that ended
without a result in one line: see alexnet_lab/slurm.py, imported only when a sweep launches.
Hydra imports every module here on every start; without the launchers extra
(``pip install -e ".[launchers]"``) this one defines nothing and warns about nothing.
"""

from typing import Any

try:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher
except ImportError:  # hydra-submitit-launcher is not installed
    pass
else:

    class SlurmLauncher(submitit_launcher.SlurmLauncher):
        """hydra-submitit-launcher's Slurm launcher that works without accounting: see alexnet_lab/slurm.py."""

        def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
            from alexnet_lab.slurm import launch

            return launch(super().launch, job_overrides, initial_job_idx)
