"""Write a sweep's (or one run's) report: `python scripts/plot_training_stats.py SWEEP_OR_RUN_DIR`.

Writes report.md, report.csv, curves.png and report.html into that dir and prints the report.
The same happens after every job of `python train.py -m ...`; this rewrites it, for example for
a sweep that was interrupted, or with `--metric val_acc_best` for the effects. Installed, the
same command is `alexnet-lab-report`. In a notebook, use the library function:
`iplot(alexnet_lab.report.plot_training_stats(path))`.
"""

import sys

from alexnet_lab.cli import report_command

if __name__ == "__main__":
    sys.exit(report_command())
