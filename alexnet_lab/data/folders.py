"""Build a folder once, atomically, under a lock: how the cache and the embedded data set are written.

A killed or failed build never leaves a folder that a later run would take for finished, a
dead build never blocks the next (the OS releases its lock, its workers die with it), and two
runs started together build it once.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


def build_folder(
    target: Path,
    build: Callable[[Path], None],
    is_complete: Callable[[Path], bool],
    replace_old: Callable[[Path], bool] | None = None,
) -> bool:
    """Make `target` with `build(tmp)` unless it is complete already; True if this call built it.

    Under a lock on ``.<name>.lock`` next to it: a complete `target` is left as it is (a
    second caller waits, then finds it complete); temporary folders of `target` are removed
    (only lock holders build, so any found now is a dead build's); `build` fills a fresh
    hidden folder, renamed to `target` when it returns, removed if it raises. A `target` that
    exists, is not complete and is not an empty folder is replaced (parked, the new one
    renamed in, then deleted) only if ``replace_old(target)`` returns True; it may raise its
    own error instead (without it: FileExistsError).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    lock = FileLock(target.parent / f".{target.name}.lock")
    try:
        held = lock.acquire(blocking=False)
    except Timeout:
        log.info("waiting for another process that is building %s", target)
        held = lock.acquire()
    with held:  # released on leaving, whatever happens inside
        if is_complete(target):
            return False
        replace = os.path.lexists(target) and not (target.is_dir() and not any(target.iterdir()))
        if replace and not (replace_old and replace_old(target)):
            raise FileExistsError(f"{target} exists and is not complete: will not replace it")
        for stale in target.parent.iterdir():
            if stale.name.startswith(prefix):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = target.parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            build(tmp)
            _move_into_place(tmp, target, replace)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a failed build's otherwise
    return True


def _move_into_place(tmp: Path, target: Path, replace: bool) -> None:
    """Rename tmp to target (an old target parked, then deleted); the rename made durable."""
    if not replace:
        if target.is_dir():  # empty (checked by the caller); a rename over a folder is not portable
            target.rmdir()
        os.rename(tmp, target)
    else:
        old = tmp.with_name(tmp.name + "-old")  # a temporary name: cleaned as stale if we die now
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):  # no-op where folders cannot be opened
        handle = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def exit_with_parent() -> None:
    """Pool initializer for a build's worker processes: die with the builder (Linux), not linger.

    An orphan would hold on to memory and, where a forked worker keeps the builder's lock
    (filelock 3.12 does not close it after a fork; 4.x does), to the lock: the next build
    would wait for it forever. Works with every start method (a forkserver exits with the
    builder, and its workers with it).
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    builder = multiprocessing.parent_process()  # its pipe, not os.getppid(): a forkserver is the parent
    if builder is not None and not builder.is_alive():  # it died before prctl took effect
        os._exit(1)
