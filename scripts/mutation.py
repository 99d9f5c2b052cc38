"""Mutation testing of the lab's core pure functions: do the fast tests catch a small bug in them?

    pip install -e ".[dev]"
    python scripts/mutation.py             # the score and every surviving mutant (about 10 minutes on 2 cores)
    python scripts/mutation.py --diff      # ... with each survivor's diff
    python scripts/mutation.py 'alexnet_lab.verdicts.*'   # only these mutants

mutmut (configured in pyproject.toml under [tool.mutmut]) copies the package into mutants/,
changes one operator, constant or condition at a time (a "mutant"), and runs the fast
known-answer tests that reach the changed function. A mutant the tests still pass is a bug
they would miss. The goal is at least 90 % killed; a mutant that cannot change behaviour
(an equivalent mutant) is excluded in the code with ``# pragma: no mutate`` and a reason.
This is a development tool, not part of CI (it takes minutes).
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The core: metrics, splitting, sampling, seeding, verdicts, divergence, run identity, report rows.
CORE = (
    "alexnet_lab.metrics.*",
    "alexnet_lab.verdicts.*",
    "alexnet_lab.data.sampling.*",
    "alexnet_lab.identity.*",
    "alexnet_lab.report.x_run_rows*",
    "alexnet_lab.report.x_experiment_rows*",
    "alexnet_lab.report.x_group_runs*",
    "alexnet_lab.report.x_one_per_seed*",
    "alexnet_lab.report.x__mean_std*",
    "alexnet_lab.report.xǁRunǁorder*",
)
GOAL = 0.90


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="*", default=list(CORE), help="mutant names (globs); default: the core")
    parser.add_argument("--diff", action="store_true", help="print each survivor's diff")
    args = parser.parse_args(argv)
    mutmut = shutil.which("mutmut")
    if mutmut is None:
        print('error: mutmut is not installed: pip install -e ".[dev]"', file=sys.stderr)
        return 2
    shutil.rmtree(ROOT / "mutants", ignore_errors=True)  # no results cached from older code
    subprocess.run([mutmut, "run", *args.patterns], cwd=ROOT, stdout=subprocess.DEVNULL, check=False)
    listing = subprocess.run(
        [mutmut, "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    results = {
        name: status
        for name, status in re.findall(r"^\s*(\S+): (.+)$", listing, re.M)
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in args.patterns)
    }
    checked = {name: status for name, status in results.items() if status != "not checked"}
    killed = [name for name, status in checked.items() if status in ("killed", "timeout")]
    survivors = sorted(set(checked) - set(killed))
    if not checked:
        print("error: no mutant was tested (see mutants/ and `mutmut run` for why)", file=sys.stderr)
        return 2
    score = len(killed) / len(checked)
    for name in survivors:
        print(f"survived ({checked[name]}): {name}")
        if args.diff:
            diff = subprocess.run([mutmut, "show", name], cwd=ROOT, capture_output=True, text=True).stdout
            print("\n".join("    " + line for line in diff.splitlines() if line.startswith(("+", "-"))))
    print(f"mutation score: {len(killed)} of {len(checked)} mutants killed = {score:.1%} (goal {GOAL:.0%})")
    return 0 if score >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
