"""How long ``--help`` takes: the console script and ``python train.py``, against the imports it must not pay for.

    python scripts/bench_help.py             # the table (about a minute on 2 CPU cores)
    python scripts/bench_help.py -n 10       # more runs of each command
    python scripts/bench_help.py --json      # one JSON object on stdout (the table goes to stderr)
    python scripts/bench_help.py --check     # exit 1 when the console script's median is over the limit

The issue's bound: ``--help`` returns in under 2 s (``--limit``). Each command runs ``-n`` times
(5) in a fresh interpreter, in an empty temporary directory, after one warm-up run that is not
counted, interleaved (A B C ..., A B C ...) because these machines are noisy; the table shows
the median and the minimum wall seconds of each side by side.

- ``alexnet-lab-train --help``: the console script of the active venv (next to this Python);
  where it is not installed, the same call as ``python -c`` (what the script does).
- ``python train.py --help``: the checkout's entry point.
- ``python -c pass``, ``python -c "import torch"``, ``python -c "import pytorch_lightning"``: the
  interpreter's own start, and what ``--help`` would cost if it imported torch or Lightning.

Then one ``python -X importtime`` run of the console script's ``--help``: the 10 slowest imports,
by cumulative time (a package with what it imports) and by self time, and whether any heavy
package (``HEAVY``) was imported at all. Other processes' CPU use during the bench is shown, as
in scripts/bench.py: above about 0.2 cores the figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Packages ``--help`` must not import: seconds each (Optuna is the search's, imported when a search runs).
HEAVY = ("torch", "pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics", "optuna", "matplotlib", "scipy")
#: One line of ``python -X importtime``: self and cumulative microseconds, the module indented by its depth.
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)\s*$")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_seconds_of_others() -> float:
    """CPU seconds the whole machine has been busy, less this process's and its children's; Linux.

    From /proc/stat, so work of processes that have ended meanwhile counts too; 0 where it is missing.
    scripts/bench.py uses it too (this file imports only the standard library).
    """
    try:
        busy = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in busy[:8])
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return (user + nice + system + irq + softirq + steal) / ticks - mine


def console_script() -> tuple[str, list[str]]:
    """The name and command line of ``alexnet-lab-train``: the active venv's script, else the same call via -c."""
    script = Path(sys.executable).parent / "alexnet-lab-train"
    if not script.is_file():
        found = shutil.which("alexnet-lab-train")
        script = Path(found) if found else script
    if script.is_file():
        return "alexnet-lab-train --help", [sys.executable, str(script), "--help"]
    call = "import sys; from alexnet_lab.cli import train_command; sys.exit(train_command())"
    return "python -c train_command --help (no script)", [sys.executable, "-c", call, "--help"]


def commands() -> dict[str, list[str]]:
    """Every command timed, by the name the table shows. The console script runs as ``python SCRIPT``:
    the same interpreter and file its shebang names, without relying on the shebang."""
    name, script = console_script()
    return {
        name: script,
        "python train.py --help": [sys.executable, str(ROOT / "train.py"), "--help"],
        "python -c pass": [sys.executable, "-c", "pass"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        'python -c "import pytorch_lightning"': [sys.executable, "-c", "import pytorch_lightning"],
    }


def run_once(command: list[str], cwd: Path) -> float:
    """Wall seconds of one run; a failed run stops the bench with its output."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} exited {result.returncode}:\n{result.stderr[-2000:]}")
    return seconds


def time_commands(named: dict[str, list[str]], runs: int, cwd: Path) -> dict[str, dict[str, Any]]:
    """Median and min wall seconds of each command, runs interleaved, after one uncounted warm-up each."""
    for name, command in named.items():
        log(f"warm-up: {name} ...")
        run_once(command, cwd)
    seconds: dict[str, list[float]] = {name: [] for name in named}
    for round_ in range(runs):
        log(f"round {round_ + 1}/{runs} ...")
        for name, command in named.items():
            seconds[name].append(run_once(command, cwd))
    return {
        name: {"median_s": statistics.median(values), "min_s": min(values), "runs_s": values}
        for name, values in seconds.items()
    }


def import_profile(command: list[str], cwd: Path, top: int = 10) -> dict[str, Any]:
    """``python -X importtime`` of one run: the ``top`` slowest imports and the heavy packages imported.

    Slowest by cumulative time (a module with everything it imports) and by self time (its own
    code): the first shows which import chain costs, the second where the time is actually spent.
    """
    result = subprocess.run(
        [command[0], "-X", "importtime", *command[1:]], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    imports = []
    for line in result.stderr.splitlines():
        match = IMPORT_LINE.match(line)
        if match:
            own, cumulative, indent, module = match.groups()
            depth = (len(indent) - 1) // 2  # one space after the bar, then two per level
            imports.append(
                {"module": module, "depth": depth, "self_s": int(own) / 1e6, "cumulative_s": int(cumulative) / 1e6}
            )
    modules = {entry["module"] for entry in imports}
    return {
        "slowest_cumulative": sorted(imports, key=lambda entry: -entry["cumulative_s"])[:top],
        "slowest_self": sorted(imports, key=lambda entry: -entry["self_s"])[:top],
        "all_imports_s": sum(entry["self_s"] for entry in imports),
        "modules": len(imports),
        "heavy_imported": [name for name in HEAVY if name in modules],
    }


def table(result: dict[str, Any]) -> str:
    limit, timings, profile = result["limit_s"], result["timings"], result["imports"]
    bytecode = " | PYTHONDONTWRITEBYTECODE set: uncached modules compile on every start" if result["no_pyc"] else ""
    lines = [
        f"{result['python']} | {result['cpus']} CPUs | {result['runs']} runs each, interleaved, after a warm-up"
        f"{bytecode}",
        f"{'command':<42} {'median s':>9} {'min s':>7}",
    ]
    lines += [f"{name:<42} {found['median_s']:>9.3f} {found['min_s']:>7.3f}" for name, found in timings.items()]
    script = next(iter(timings))
    median = timings[script]["median_s"]
    lines.append(f"{script} under {limit:g} s: {'yes' if median < limit else 'NO'} (median {median:.2f} s)")
    lines.append(
        f"other processes used {result['other_processes_cores']:.2f} cores on average (above ~0.2: noisy figures); "
        f"{result['seconds']:.0f} s in all"
    )
    lines.append("")
    lines.append(
        f"python -X importtime {script}: {profile['modules']} modules, {profile['all_imports_s']:.3f} s of imports"
        f" (the rest of its {median:.2f} s: the interpreter's start and Hydra's own work)"
    )
    for title, key in (("cumulative", "slowest_cumulative"), ("self", "slowest_self")):
        lines.append(f"  the {len(profile[key])} slowest by {title} time")
        lines.append(f"  {'cumulative s':>12} {'self s':>7} {'depth':>5}  module")
        for entry in profile[key]:
            lines.append(
                f"  {entry['cumulative_s']:>12.3f} {entry['self_s']:>7.3f} {entry['depth']:>5}  {entry['module']}"
            )
    heavy = ", ".join(profile["heavy_imported"]) or "none"
    lines.append(f"heavy packages imported by --help ({', '.join(HEAVY)}): {heavy}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=5, help="counted runs of each command (default 5)")
    parser.add_argument("--limit", type=float, default=2.0, help="the bound on --help, in seconds (default 2)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the console script's median is over it")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table on stderr)")
    parser.add_argument("--out", type=Path, help="also write the JSON object to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started, others_started = time.perf_counter(), cpu_seconds_of_others()
    named = commands()
    with tempfile.TemporaryDirectory(prefix="bench-help-") as empty:  # --help writes nothing; if it did: not here
        cwd = Path(empty)
        timings = time_commands(named, args.runs, cwd)
        log("python -X importtime ...")
        imports = import_profile(next(iter(named.values())), cwd)
        written = sorted(path.name for path in cwd.iterdir())
    result = {
        "python": f"Python {platform.python_version()} ({sys.executable})",
        "cpus": os.cpu_count(),
        "runs": args.runs,
        "limit_s": args.limit,
        "timings": timings,
        "imports": imports,
        "written_by_help": written,
        "no_pyc": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
    }
    result["seconds"] = time.perf_counter() - started
    result["other_processes_cores"] = (cpu_seconds_of_others() - others_started) / result["seconds"]
    print(table(result), file=sys.stderr if args.json else sys.stdout, flush=True)
    if written:
        log(f"warning: --help wrote {written} into the directory it ran in")
    if args.json:
        print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.check and next(iter(timings.values()))["median_s"] >= args.limit:
        sys.exit(1)


if __name__ == "__main__":
    main()
