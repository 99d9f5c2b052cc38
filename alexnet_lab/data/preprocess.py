"""Raw image folder -> uint8 cache, built once and reused.

A raw folder has one subfolder per class (ImageFolder layout: ``raw/cat/*.jpg``,
``raw/dog/*.png``). Every image is decoded, EXIF-transposed, converted to gray (or
RGB) and letterboxed to ``image_size x image_size``; files that cannot be decoded are
skipped and recorded. The result is a cache folder::

    <cache_dir>/<raw_dir.name>-<fingerprint>/
        images.npy     uint8 (N, C, S, S), opened memory-mapped and read-only
        labels.npy     int64 (N,), label i = classes[i]
        meta.json      classes, settings, count per class, fingerprint, raw_dir
        manifest.csv   path,label,status,reason,index: one row per file seen
        done           written last; a folder without it is not a cache

The fingerprint covers every scanned file (relative path, size, mtime) and the
settings, so a changed file or setting builds a new cache instead of reusing a stale
one. A cache is built in a hidden temporary folder and renamed into place, so a
crashed or concurrent build never leaves a half-written cache at the final path.
The raw folder is only ever read.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import secrets
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

__all__ = [
    "PREPROCESS_VERSION",
    "IMAGE_EXTENSIONS",
    "DataError",
    "Cache",
    "letterbox",
    "load_image",
    "scan_folder",
    "build_cache",
    "load_cache",
]

log = logging.getLogger(__name__)

# Bump when decoding or layout changes, so that caches built by older code are rebuilt.
PREPROCESS_VERSION = 1
# Matched case-insensitively; anything else in a class folder is ignored.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# None = the platform's default (multiprocessing.set_start_method applies); "spawn" also works.
START_METHOD: str | None = None
CACHE_FILES = ("images.npy", "labels.npy", "meta.json", "manifest.csv", "done")

_FILL = 0  # letterbox padding and the background behind transparent pixels: black
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class DataError(ValueError):
    """Bad input data; message is one line naming the path and what to do."""


@dataclass(frozen=True, eq=False)
class Cache:
    """A built cache: arrays, class names and where every kept image came from."""

    path: Path  # the cache folder
    images: np.ndarray  # uint8 (N, C, S, S), memory-mapped read-only
    labels: np.ndarray  # int64 (N,), label i = classes[i]
    classes: list[str]  # class names, sorted
    files: list[str]  # relative path (posix) in the raw folder of images[i]
    image_size: int  # S, pixels
    grayscale: bool  # C = 1 if True else 3
    fingerprint: str  # sha256 hex prefix of files and settings
    discarded: int  # files seen but not decodable

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[1]


# ----------------------------------------------------------------------------- images


def letterbox(image: Image.Image, size: int, fill: int = _FILL) -> Image.Image:
    """Resize keeping the aspect ratio so the long side is `size`, then pad (centred) to size x size."""
    width, height = image.size
    long_side = max(width, height)
    new_size = (max(1, round(width * size / long_side)), max(1, round(height * size / long_side)))
    if new_size != image.size:
        # Pillow's BILINEAR widens its kernel when shrinking, so it does not alias.
        image = image.resize(new_size, Image.Resampling.BILINEAR)
    if new_size == (size, size):
        return image
    bands = len(image.getbands())
    canvas = Image.new(image.mode, (size, size), fill if bands == 1 else (fill,) * bands)
    canvas.paste(image, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas


def _draft_request(width: int, height: int, size: int) -> tuple[int, int]:
    """The size to ask JPEG draft for so that the long side after it is still >= size.

    Draft divides both sides by the largest of 8, 4, 2, 1 that is <= min(w // rw, h // rh);
    asking for the letterboxed size (long side = size) keeps that divisor <= long / size.
    """
    scale = size / max(width, height)
    return max(1, int(np.ceil(width * scale))), max(1, int(np.ceil(height * scale)))


def _to_8bit(image: Image.Image, mode: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit "L" or "RGB" (16-bit scaled, alpha composited on black)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # convert("L") would clip 16-bit values at 255; scale 0..65535 to 0..255 instead.
        values = np.asarray(image).astype(np.float32)
        values = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(values, "L")
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32))
        if values.size and values.max() <= 1.0:  # float images are usually 0..1
            values = values * 255.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # The colour under fully transparent pixels is arbitrary; show the background instead.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (_FILL, _FILL, _FILL, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode == mode:
        return image
    if image.mode not in ("L", "RGB", "1"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...: via RGB
    return image.convert(mode)


def load_image(path: Path, size: int, grayscale: bool = True) -> np.ndarray:
    """Decode -> EXIF transpose -> gray ("L") or RGB -> letterbox; returns uint8 (C, S, S).

    Raises (OSError, ValueError, ...) on files that cannot be decoded.
    """
    mode = "L" if grayscale else "RGB"
    with Image.open(path) as image:
        # JPEG (and MPO) decode at 1/2, 1/4 or 1/8 scale, straight to gray, when the target is
        # small enough; other formats ignore draft.
        image.draft(mode, _draft_request(*image.size, size))
        image.load()  # decode now, so a truncated file fails here
        try:
            image = ImageOps.exif_transpose(image)
        except Exception as exc:  # broken EXIF must not throw away good pixels
            log.debug("%s: EXIF ignored (%s)", path, exc)
        image = letterbox(_to_8bit(image, mode), size)
    pixels = np.asarray(image, dtype=np.uint8)  # (S, S) or (S, S, 3)
    if pixels.ndim == 2:
        return pixels[None].copy()  # (1, S, S)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (3, S, S)


def _discard_reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text}"


def _decode_chunk(
    jobs: Sequence[tuple[str, int]], size: int, grayscale: bool
) -> list[tuple[np.ndarray | None, str]]:
    """Decode (path, file size) pairs; (pixels, "") or (None, reason) each. Top level: spawn-safe."""
    results: list[tuple[np.ndarray | None, str]] = []
    for path, file_size in jobs:
        if file_size == 0:
            results.append((None, "empty file (0 bytes)"))
            continue
        try:
            results.append((load_image(Path(path), size, grayscale), ""))
        except Exception as exc:  # any decoder failure: skip the file, never crash the build
            results.append((None, _discard_reason(exc)))
    return results


# ----------------------------------------------------------------------------- scan


def _image_files(class_dir: Path) -> list[Path]:
    """Image files under class_dir (recursively, following links once), hidden ones skipped."""
    found: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()
    stack = [class_dir]
    while stack:
        folder = stack.pop()
        stat = folder.stat()
        if (stat.st_dev, stat.st_ino) in seen_dirs:
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise DataError(f"cannot list {folder} ({exc.strerror}): make it readable") from exc
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                stack.append(Path(entry.path))
            elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(entry.path))
    return found


def scan_folder(raw_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted subfolders, hidden ones skipped) and (file, label) pairs (hidden files skipped, sorted).

    A subfolder without image files is not a class (a warning says so); files at the top
    level of raw_dir are ignored. Raises DataError for a missing or empty folder and for
    fewer than two classes.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.exists():
        raise DataError(
            f"data.raw_dir={raw_dir} does not exist: point data.raw_dir at a folder with one subfolder per class"
        )
    if not raw_dir.is_dir():
        raise DataError(
            f"data.raw_dir={raw_dir} is not a folder: point data.raw_dir at a folder with one subfolder per class"
        )
    subfolders = sorted(
        entry.name for entry in os.scandir(raw_dir) if entry.is_dir() and not entry.name.startswith(".")
    )
    per_class: dict[str, list[Path]] = {}
    for name in subfolders:
        files = _image_files(raw_dir / name)
        if files:
            per_class[name] = sorted(files, key=lambda p: p.relative_to(raw_dir).as_posix())
        else:
            log.warning("ignoring %s: no image files (%s)", raw_dir / name, " ".join(sorted(IMAGE_EXTENSIONS)))
    if not per_class:
        raise DataError(
            f"data.raw_dir={raw_dir} is empty (no class subfolders with image files): "
            "put images in one subfolder per class, e.g. cat/*.jpg and dog/*.jpg"
        )
    if len(per_class) < 2:
        (only,) = per_class
        raise DataError(
            f"data.raw_dir={raw_dir} has only one class ({only!r}): a classifier needs at least two class subfolders"
        )
    classes = sorted(per_class)
    samples = [(path, label) for label, name in enumerate(classes) for path in per_class[name]]
    return classes, samples


def _fingerprint(
    raw_dir: Path, samples: Sequence[tuple[Path, int]], image_size: int, grayscale: bool
) -> tuple[str, list[int]]:
    """sha256 (first 16 hex) of every file's (relative path, size, mtime_ns) and the settings; also the sizes."""
    entries = []
    sizes = []
    for path, _ in samples:
        stat = path.stat()
        entries.append((path.relative_to(raw_dir).as_posix(), stat.st_size, stat.st_mtime_ns))
        sizes.append(stat.st_size)
    key = {
        "files": sorted(entries),
        "image_size": image_size,
        "grayscale": grayscale,
        "version": PREPROCESS_VERSION,
    }
    digest = hashlib.sha256(json.dumps(key, separators=(",", ":")).encode()).hexdigest()
    return digest[:16], sizes


# ----------------------------------------------------------------------------- cache


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in CACHE_FILES)


def load_cache(path: Path) -> Cache:
    """Open a complete cache folder; images are memory-mapped read-only."""
    path = Path(path)
    if not _is_complete(path):
        missing = [name for name in CACHE_FILES if not (path / name).is_file()]
        raise DataError(
            f"cache {path} is incomplete (missing {', '.join(missing)}): delete that folder and build it again"
        )
    try:
        meta = json.loads((path / "meta.json").read_text())
        images = np.load(path / "images.npy", mmap_mode="r")
        labels = np.load(path / "labels.npy")
        with open(path / "manifest.csv", newline="") as handle:
            kept = [row for row in csv.DictReader(handle) if row["status"] == "kept"]
        kept.sort(key=lambda row: int(row["index"]))
        size = int(meta["image_size"])
        channels = 1 if meta["grayscale"] else 3
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"cache {path} is unreadable ({_discard_reason(exc)}): delete that folder and build it again"
        ) from exc
    if (
        images.dtype != np.uint8
        or images.shape[1:] != (channels, size, size)
        or labels.shape != (images.shape[0],)
        or len(kept) != images.shape[0]
    ):
        raise DataError(
            f"cache {path} is inconsistent (images {images.shape}, labels {labels.shape}, {len(kept)} kept rows): "
            "delete that folder and build it again"
        )
    return Cache(
        path=path,
        images=images,
        labels=labels.astype(np.int64, copy=False),
        classes=list(meta["classes"]),
        files=[row["path"] for row in kept],
        image_size=size,
        grayscale=bool(meta["grayscale"]),
        fingerprint=str(meta["fingerprint"]),
        discarded=int(meta["discarded"]),
    )


def _default_workers() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))  # respects CPU pinning in containers
    return os.cpu_count() or 1


def _decode_all(
    jobs: Sequence[tuple[str, int]], size: int, grayscale: bool, workers: int
) -> Iterator[list[tuple[np.ndarray | None, str]]]:
    """Decoded chunks, in input order; at most a few chunks per worker in flight (bounded memory)."""
    chunk = max(1, min(32, len(jobs) // (workers * 8) or 1))
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    workers = min(workers, len(chunks))
    if workers <= 1:
        for part in chunks:
            yield _decode_chunk(part, size, grayscale)
        return
    # The platform's start method (fork on Linux up to Python 3.13: cheap, and a script without
    # a __main__ guard still works; forkserver/spawn elsewhere, which the top-level worker allows).
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(START_METHOD))
    try:
        remaining = iter(chunks)
        pending: deque[concurrent.futures.Future] = deque()
        for part in itertools.islice(remaining, workers * 3):
            pending.append(pool.submit(_decode_chunk, part, size, grayscale))
        while pending:
            done = pending.popleft().result()
            part = next(remaining, None)
            if part is not None:
                pending.append(pool.submit(_decode_chunk, part, size, grayscale))
            yield done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _shrink_npy(path: Path, rows: int) -> None:
    """Cut a C-order .npy file (format 1.0) written for more rows down to its first `rows` rows.

    numpy pads .npy headers so that the length of axis 0 can change in place without
    moving the data; if this numpy did not, copy instead.
    """
    with open(path, "r+b") as handle:
        np.lib.format.read_magic(handle)
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
        offset = handle.tell()
        header = io.BytesIO()
        descr = np.lib.format.dtype_to_descr(dtype)
        np.lib.format.write_array_header_1_0(
            header, {"descr": descr, "fortran_order": fortran_order, "shape": (rows, *shape[1:])}
        )
        if len(header.getvalue()) == offset:
            handle.seek(0)
            handle.write(header.getvalue())
            handle.truncate(offset + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
            return
    old = np.load(path, mmap_mode="r")
    np.save(path.with_suffix(".shrink.npy"), old[:rows])
    del old
    os.replace(path.with_suffix(".shrink.npy"), path)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def build_cache(
    raw_dir: str | Path,
    cache_dir: str | Path,
    image_size: int = 256,
    grayscale: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> Cache:
    """Return the cache of raw_dir for these settings, building it first if needed.

    An unchanged folder with unchanged settings loads the existing cache without
    decoding anything. workers: decoding processes (default: the usable CPUs; 1 = none).
    """
    raw_dir = Path(raw_dir).expanduser().absolute()
    cache_dir = Path(cache_dir).expanduser().absolute()
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise DataError(f"data.image_size={image_size!r} is not a positive integer: set it to e.g. 256")
    if workers is not None and workers < 1:
        raise DataError(f"workers={workers!r} must be >= 1 (or None for one per CPU)")
    workers = workers or _default_workers()
    grayscale = bool(grayscale)

    classes, samples = scan_folder(raw_dir)
    if cache_dir.resolve().is_relative_to(raw_dir.resolve()):
        raise DataError(
            f"data.cache_dir={cache_dir} is inside data.raw_dir={raw_dir}: put the cache outside the raw folder"
        )
    fingerprint, sizes = _fingerprint(raw_dir, samples, image_size, grayscale)
    name = f"{raw_dir.name}-{fingerprint}"
    final = cache_dir / name
    if _is_complete(final):
        cache = load_cache(final)
        log.info("reusing cache %s (%d images)", final, len(cache))
        return cache
    if final.exists():
        raise DataError(f"cache {final} is incomplete (no 'done' marker): delete that folder and build it again")

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        summary = _build_into(
            tmp, raw_dir, classes, samples, sizes, image_size, grayscale, workers, progress, fingerprint
        )
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):
                raise
            log.info("another process built %s first; using theirs", final)
            return load_cache(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("preprocessed %s: %s -> %s", raw_dir, summary, final)
    return load_cache(final)


def _build_into(
    tmp: Path,
    raw_dir: Path,
    classes: list[str],
    samples: list[tuple[Path, int]],
    sizes: list[int],
    image_size: int,
    grayscale: bool,
    workers: int,
    progress: bool,
    fingerprint: str,
) -> str:
    """Decode every sample into a complete cache folder at tmp ('done' written last); returns a summary."""
    start = time.perf_counter()
    channels = 1 if grayscale else 3
    images = np.lib.format.open_memmap(
        tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(samples), channels, image_size, image_size),
        version=(1, 0),
    )
    labels: list[int] = []
    manifest: list[tuple[str, int, str, str, str]] = []  # path, label, status, reason, index
    jobs = [(str(path), size) for (path, _), size in zip(samples, sizes)]
    kept = 0
    bar = tqdm(total=len(jobs), desc=f"preprocessing {raw_dir.name}", unit="img", disable=not progress)
    # Warnings go through tqdm.write while the bar is shown, so they do not break it.
    redirect = logging_redirect_tqdm() if progress else contextlib.nullcontext()
    with redirect, bar, contextlib.closing(_decode_all(jobs, image_size, grayscale, workers)) as decoded:
        position = 0
        for results in decoded:
            for pixels, reason in results:
                path, label = samples[position]
                relative = path.relative_to(raw_dir).as_posix()
                if pixels is None:
                    log.warning("skipping %s: %s", path, reason)
                    manifest.append((relative, label, "discarded", reason, ""))
                else:
                    images[kept] = pixels
                    labels.append(label)
                    manifest.append((relative, label, "kept", "", str(kept)))
                    kept += 1
                position += 1
            bar.update(len(results))
    images.flush()
    del images
    if kept < len(samples):
        _shrink_npy(tmp / "images.npy", kept)

    label_array = np.asarray(labels, dtype=np.int64)
    counts = {name: int((label_array == index).sum()) for index, name in enumerate(classes)}
    for name, count in counts.items():
        if count == 0:
            raise DataError(
                f"every file of class {name!r} in data.raw_dir={raw_dir} failed to decode: "
                f"check or remove {raw_dir / name} (reasons in the warnings above)"
            )
    np.save(tmp / "labels.npy", label_array)
    with open(tmp / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("path", "label", "status", "reason", "index"))
        writer.writerows(manifest)
    discarded = len(samples) - kept
    seconds = time.perf_counter() - start
    _write_json(
        tmp / "meta.json",
        {
            "classes": classes,
            "image_size": image_size,
            "grayscale": grayscale,
            "channels": channels,
            "count": counts,
            "discarded": discarded,
            "files_seen": len(samples),
            "fingerprint": fingerprint,
            "raw_dir": str(raw_dir),
            "preprocess_version": PREPROCESS_VERSION,
            "build_seconds": round(seconds, 3),
        },
    )
    with open(tmp / "images.npy", "rb+") as handle:
        os.fsync(handle.fileno())  # data on disk before 'done' says it is
    (tmp / "done").write_text("complete\n")
    kept_per_class = ", ".join(f"{name}={count}" for name, count in counts.items())
    return f"{len(samples)} files seen, kept {kept_per_class}, {discarded} discarded, {seconds:.1f} s"
