"""Write a sweep's (or one run's) report: `python scripts/plot_training_stats.py SWEEP_OR_RUN_DIR`.

Writes report.md, report.csv, curves.png and report.html into that dir and prints the table.
The same happens automatically at the end of `python train.py -m ...`; this rewrites it,
for example for a sweep that was interrupted. In a notebook, use the library function:
`iplot(alexnet_lab.report.plot_training_stats(path))`.
"""

from __future__ import annotations

import argparse
import sys

from alexnet_lab.errors import LabError, fail, one_line
from alexnet_lab.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a sweep dir (outputs/multirun/...), a run dir, or a run's metrics.json")
    parser.add_argument("--no-html", action="store_true", help="skip report.html (about 5 MB: plotly.js is embedded)")
    parser.add_argument(
        "--metric", default="test_balanced_acc", help="what the effect of each step is measured on (a metrics.json key)"
    )
    args = parser.parse_args(argv)
    try:
        written = write_report(args.path, html_report=not args.no_html, metric=args.metric)
    except (LabError, OSError) as err:  # no runs there, or a report file that cannot be written
        fail(one_line(err))
    print(written["report.md"].read_text(encoding="utf-8"))
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
