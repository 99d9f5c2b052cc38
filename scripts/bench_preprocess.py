"""Preprocessing speed against a naive loop, and peak memory of preprocessing and of one epoch.

    python scripts/bench_preprocess.py                          # 2000 generated images, 256 px
    python scripts/bench_preprocess.py --raw-dir PATH           # your own folder (read only)
    python scripts/bench_preprocess.py --images 10000 --memory --epoch   # peak memory (minutes)

Speed: the naive loop is what the notebook did, one image after another in one process
(open, convert("L"), resize keeping the aspect ratio, pad); ours is `build_cache` (scan,
placeholder screening, JPEG draft decoding in parallel, cache written to disk) on the same
files, with the page cache warm for both. Both resize with the same filter (bilinear), so
the only differences are draft decoding and the processes. Rates are files per second.

Memory: each step runs in its own process, sampled from /proc every 0.2 s (Linux): the
kernel's peak resident set (VmHWM), and the largest resident memory seen, split into
anonymous (heap: what a process really holds) and file-backed (libraries, and the pages of
the memory-mapped cache it has touched, which the kernel can drop at will).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from alexnet_lab.data.preprocess import build_cache, scan_folder
from alexnet_lab.data.synthetic import SyntheticConfig, generate, spread

ROOT = Path(__file__).resolve().parents[1]
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def naive_image(path: Path, size: int) -> np.ndarray:
    """The notebook's way: full decode, gray, resize (aspect kept), pad; uint8 (S, S)."""
    with Image.open(path) as image:
        gray = image.convert("L")
    width, height = gray.size
    scale = size / max(width, height)
    gray = gray.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(gray, ((size - gray.size[0]) // 2, (size - gray.size[1]) // 2))
    return np.asarray(canvas)


def naive_loop(paths: list[Path], size: int) -> tuple[np.ndarray, list[bool]]:
    images = np.zeros((len(paths), 1, size, size), np.uint8)
    ok = []
    for i, path in enumerate(paths):
        try:
            images[i, 0] = naive_image(path, size)
            ok.append(True)
        except Exception:  # the naive loop must survive broken files too
            ok.append(False)
    return images, ok


def timed(fn, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process and of its finished children)."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start, _cpu_seconds() - cpu


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def speed(raw: Path, work: Path, size: int, workers: int) -> None:
    samples = scan_folder(raw).samples
    paths = [raw_file.path for raw_file, _ in samples]
    formats = {}
    for path in paths:
        path.read_bytes()  # warm the page cache for every contender alike
        try:
            with Image.open(path) as image:
                kind = image.format
        except Exception:  # broken downloads (--dirty)
            kind = "unreadable"
        formats[kind] = formats.get(kind, 0) + 1
    n = len(paths)
    print(
        f"{n} files ({', '.join(f'{k} {v}' for k, v in sorted(formats.items()))}) in {raw}, "
        f"image_size {size}, {workers} worker processes on {CPUS} CPUs"
    )

    (naive, ok), naive_s, naive_cpu = timed(naive_loop, paths, size)
    _, one_s, one_cpu = timed(build_cache, raw, work / "cache-1", image_size=size, workers=1, progress=False)
    ours, ours_s, ours_cpu = timed(build_cache, raw, work / "cache-n", image_size=size, workers=workers, progress=False)
    rows = [
        ("naive loop, 1 process", naive_s, naive_cpu),
        ("ours, 1 process (draft decoding)", one_s, one_cpu),
        (f"ours, {workers} processes", ours_s, ours_cpu),
    ]
    for label, seconds, cpu in rows:
        print(
            f"  {label:<34} {n / seconds:7.0f} img/s  ({seconds:.2f} s)  x{naive_s / seconds:.2f}"
            f"   CPU {1000 * cpu / n:.2f} ms/img"
        )
    print(f"ratio ours / naive: {naive_s / ours_s:.2f}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"  (load average during the run: {load:.1f}; other work on the machine lowers the parallel rate)")
    stages = ours.meta["seconds"]
    print("  ours, where the time goes: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))

    # How far draft decoding moves the pixels from the naive full decode (same files, same filter).
    index = {path.relative_to(raw).as_posix(): i for i, path in enumerate(paths)}
    rows_naive = [index[name] for name in ours.files]
    diff = np.abs(ours.images[:, :1].astype(np.int16) - naive[rows_naive].astype(np.int16))
    print(f"  kept {len(ours)} of {n} (naive decoded {sum(ok)}); mean |ours - naive| = {diff.mean():.2f} grey levels")


# ----------------------------------------------------------------------------- memory


def _status(pid: int) -> dict[str, int]:
    """VmHWM (the kernel's peak RSS), VmRSS, RssAnon, RssFile of a process in kB, from /proc ({} once gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0])
    return values


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                stack.append(child)
    return found


def measure(command: list[str], cwd: Path) -> dict:
    """Run command; peak memory (MiB) of the process itself and of its largest descendant, and wall time."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"main": {}, "children": {}}
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        for role, pids in (("main", [process.pid]), ("children", _descendants(process.pid))):
            for pid in pids:
                for key, kb in _status(pid).items():
                    peaks[role][key] = max(peaks[role].get(key, 0), kb)
        time.sleep(0.2)
    reader.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{''.join(output)[-3000:]}")
    mib = {role: {key: round(kb / 1024) for key, kb in values.items()} for role, values in peaks.items()}
    return {"seconds": time.perf_counter() - start, "peak_mib": mib, "output": "".join(output)}


def memory(raw: Path, work: Path, size: int, workers: int, epoch: bool) -> None:
    cache_dir = work / "cache-memory"
    shutil.rmtree(cache_dir, ignore_errors=True)
    build = textwrap.dedent(f"""
        from alexnet_lab.data.preprocess import build_cache
        cache = build_cache({str(raw)!r}, {str(cache_dir)!r}, image_size={size}, workers={workers}, progress=False)
        print(len(cache), cache.images.nbytes)
    """)
    result = measure([sys.executable, "-c", build], ROOT)
    kept, nbytes = map(int, result["output"].split()[-2:])
    print(f"preprocess {kept} images -> cache of {nbytes / 2**20:.0f} MiB in {result['seconds']:.1f} s")
    print(
        f"  peak memory (MiB), main process: {json.dumps(result['peak_mib']['main'])}; "
        f"largest worker: {json.dumps(result['peak_mib']['children'])}"
    )
    if not epoch:
        return
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "data=folder",
        f"data.raw_dir={raw}",
        f"data.cache_dir={cache_dir}",
        f"data.image_size={size}",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "data.progress=false",
        f"hydra.run.dir={work / 'run'}",
    ]
    result = measure(command, work)
    print(f"one training epoch (train + val + test) on {kept} images: {result['seconds']:.1f} s")
    print(f"  peak memory (MiB): {json.dumps(result['peak_mib']['main'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-dir", type=Path, help="an existing raw folder (default: generate one)")
    parser.add_argument("--images", type=int, default=2000, help="photos to generate (cat:dog as 1127:791)")
    parser.add_argument("--dirty", action="store_true", help="generate placeholders and broken files too")
    parser.add_argument("--image-size", type=int, default=256, help="px, as data.image_size")
    parser.add_argument("--workers", type=int, default=CPUS, help="our decoding processes")
    parser.add_argument("--work-dir", type=Path, help="keep generated data and caches here (default: a temp dir)")
    parser.add_argument("--memory", action="store_true", help="measure peak memory of preprocessing")
    parser.add_argument("--epoch", action="store_true", help="and of one training epoch (python train.py)")
    parser.add_argument("--skip-speed", action="store_true", help="only the memory measurements")
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_preprocess-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        raw = args.raw_dir
        if raw is None:
            counts = spread(args.images, SyntheticConfig().counts)  # the default data set's class ratio
            extra = {} if args.dirty else {"placeholders": 0, "broken": 0}
            raw = work / f"raw-{args.images}{'-dirty' if args.dirty else ''}"
            if not raw.exists():
                print(f"generating {counts} into {raw} ...", flush=True)
                generate(raw, SyntheticConfig(counts=counts, **extra), progress=False)
        for name in ("cache-1", "cache-n"):
            shutil.rmtree(work / name, ignore_errors=True)
        if not args.skip_speed:
            speed(raw, work, args.image_size, args.workers)
        if args.memory or args.epoch:
            memory(raw, work, args.image_size, args.workers, args.epoch)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
