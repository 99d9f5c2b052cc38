"""Raw image folder -> uint8 cache, built once and reused; every file kept or discarded with a reason.

A raw folder has one subfolder per class (ImageFolder layout: ``raw/cat/*.jpg``,
``raw/dog/*.png``), as a download of image URLs leaves it: mostly photos, plus
"No image available" placeholders (the same file, byte for byte, many times), broken
downloads and stray files. Every file seen ends in one of three places:

- kept: decoded (JPEG at reduced scale, straight to gray, when the target is smaller),
  EXIF-transposed, made gray (or RGB) and letterboxed to ``image_size x image_size``;
- discarded, ``placeholder: ...``: content repeated in ``min_copies`` files or more, a known
  placeholder digest, or a near-constant picture;
- discarded, ``unreadable: ...`` (empty, truncated, corrupt, not an image, an unsupported
  format, a decompression bomb) or ``not data: ...`` (hidden and system files, text files,
  files outside a class folder).

The result is a cache folder::

    <cache_dir>/<raw_dir.name>-<fingerprint>/
        images.npy     uint8 (N, C, S, S), opened memory-mapped and read-only
        labels.npy     int64 (N,), label i = classes[i]
        meta.json      classes, settings, counts per class and per discard reason, placeholder groups, timings
        manifest.csv   path,label,status,reason,index: one row per file seen (label = class name)
        done           written last; a folder without it is not a cache

The fingerprint covers every file seen (relative path, size, mtime) and the settings, so
a changed file or setting builds a new cache and an unchanged folder reuses the old one
without decoding anything. A cache is written by ``folders.build_folder``: built in a hidden
temporary folder and renamed into place, so a killed build never leaves a cache that a later
run would load, under a lock file in ``cache_dir``, so two runs started together build it
once (the second waits, then reuses it). The raw folder is only ever read.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import time
import warnings
from collections import Counter, defaultdict, deque
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from alexnet_lab.config import DiscardRules
from alexnet_lab.data.folders import build_folder, exit_with_parent
from alexnet_lab.errors import DataError, from_mapping

log = logging.getLogger(__name__)

# Bump when decoding, discarding or layout changes, so that caches built by older code are rebuilt.
PREPROCESS_VERSION = 2
# Extensions that name an image; a file with another (or no) extension is still decoded if its
# content is an image, but text content in it is then "not data" rather than a broken download.
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .bmp .gif .webp .tif .tiff .ppm .pgm .ico .jp2 .j2k .avif".split()
)
# Pillow formats a file may be decoded as. Others are left out on purpose: some (TGA, PCD, ...)
# have no magic bytes and would "recognise" random garbage as a picture.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "DIB", "WEBP", "TIFF", "PPM", "ICO", "JPEG2000", "AVIF")
TEXT_EXTENSIONS = frozenset(
    ".txt .md .rst .csv .tsv .json .jsonl .xml .html .htm .log .yaml .yml .ini .cfg .py .sh .url".split()
)
SYSTEM_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"})  # lower case
# None = the platform's default (multiprocessing.set_start_method applies); "spawn" also works.
START_METHOD: str | None = None
CACHE_FILES = ("images.npy", "labels.npy", "meta.json", "manifest.csv", "done")

_FILL = 0  # letterbox padding and the background behind transparent pixels: black
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HASH_BLOCK = 1 << 20  # bytes read at a time when hashing
# manifest.csv and meta.json: UTF-8; a file name that is not valid UTF-8 (POSIX allows any bytes)
# round-trips through the surrogates Python decodes it to, instead of failing the build.
_ERRORS = "surrogateescape"

# Discard reasons: the manifest's `reason` is one of these, then details in parentheses.
REPEATED = "placeholder: repeated content"
KNOWN_DIGEST = "placeholder: known digest"
NEAR_CONSTANT = "placeholder: near-constant image"
EMPTY = "unreadable: empty file"
TRUNCATED = "unreadable: truncated"
CORRUPT = "unreadable: corrupt"
NOT_AN_IMAGE = "unreadable: not an image"
UNSUPPORTED = "unreadable: unsupported format"
BOMB = "unreadable: decompression bomb"
CANNOT_READ = "unreadable: cannot read"
HIDDEN = "not data: hidden"
SYSTEM = "not data: system file"
TEXT = "not data: text file"
OUTSIDE = "not data: outside a class folder"
SPECIAL = "not data: not a regular file"


@dataclass(frozen=True)
class RawFile:
    """One entry seen in the raw folder."""

    path: Path  # absolute
    relative: str  # posix path relative to raw_dir; a folder ends with "/"
    class_name: str  # "" outside a class folder
    size: int  # bytes
    mtime_ns: int
    skip: str = ""  # "" = decode it; else why it is not data (a reason above)


@dataclass(frozen=True)
class Scan:
    """What `scan_folder` found: the classes and every entry, in path order."""

    classes: list[str]  # sorted class folder names
    files: list[RawFile]  # every file seen (and hidden folders, not descended into)

    @property
    def samples(self) -> list[tuple[RawFile, int]]:
        """Files to decode with their labels, class by class, each class in path order."""
        label = {name: index for index, name in enumerate(self.classes)}
        picked = [(raw, label[raw.class_name]) for raw in self.files if not raw.skip and raw.class_name in label]
        return sorted(picked, key=lambda pair: (pair[1], pair[0].relative))


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
    discarded: list[tuple[str, str]]  # (relative path, reason) of every file seen but not kept, from the manifest
    meta: dict[str, Any] = field(default_factory=dict)  # meta.json: counts, reasons, groups, timings
    built: bool = False  # True if this call built it, False if it was there already

    def __len__(self) -> int:
        return len(self.labels)


# ----------------------------------------------------------------------------- images


def _fit(image: Image.Image, size: int) -> Image.Image:
    """Resize keeping the aspect ratio so that the long side is `size`."""
    width, height = image.size
    long_side = max(width, height)
    new_size = (max(1, round(width * size / long_side)), max(1, round(height * size / long_side)))
    if new_size == image.size:
        return image
    # Pillow's BILINEAR widens its kernel when shrinking, so it does not alias.
    return image.resize(new_size, Image.Resampling.BILINEAR)


def _pad(image: Image.Image, size: int, fill: int = _FILL) -> Image.Image:
    """Centre `image` (long side == size) on a size x size canvas of `fill`."""
    left, top = (size - image.width) // 2, (size - image.height) // 2
    border = (left, top, size - image.width - left, size - image.height - top)
    return ImageOps.expand(image, border, (fill,) * len(image.getbands()))


def letterbox(image: Image.Image, size: int, fill: int = _FILL) -> Image.Image:
    """Resize keeping the aspect ratio so the long side is `size`, then pad (centred) to size x size."""
    return _pad(_fit(image, size), size, fill)


def _to_8bit(image: Image.Image, mode: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit "L" or "RGB" (16-bit scaled, alpha composited on black)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32))
        if image.mode != "F":  # convert("L") would clip 16-bit values at 255; scale 0..65535 to 0..255 instead
            values = values / 257.0
        elif values.size and values.max() <= 1.0:  # float images are usually 0..1
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


@contextlib.contextmanager
def _pillow_limits(max_image_pixels: int) -> Iterator[None]:
    """Pillow's bomb limit set to ours, truncated files refused (both are process-wide globals)."""
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_image_pixels, False
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x the limit Pillow only warns; _open_upright refuses those itself.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _open_upright(path: Path, size: int, mode: str, max_image_pixels: int) -> Image.Image:
    """Decode (JPEG drafted towards `size`), EXIF-transpose, convert to 8-bit `mode`; not resized."""
    with Image.open(path, formats=_IMAGE_FORMATS) as image:
        width, height = image.size
        if width * height > max_image_pixels:  # only the header was read so far
            raise Image.DecompressionBombError(
                f"{width} x {height} = {width * height} pixels > the limit of {max_image_pixels}"
            )
        # JPEG (and MPO) decode at 1/2, 1/4 or 1/8 scale, straight to gray, when the target is
        # small enough; other formats ignore draft. Animated files decode their first frame.
        # Draft divides both sides by the largest of 8, 4, 2, 1 that is <= min(w // rw, h // rh);
        # asking for the letterboxed size (long side = size) keeps that divisor <= long / size,
        # so the long side after it is still >= size.
        scale = size / max(width, height)
        image.draft(mode, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))
        image.load()  # decode now, so a truncated file fails here
        upright: Image.Image = image
        try:
            if image.getexif().get(ExifTags.Base.Orientation, 1) not in (0, 1):
                upright = ImageOps.exif_transpose(image)
        except Exception as exc:  # broken EXIF must not throw away good pixels
            log.debug("%s: EXIF ignored (%s)", path, exc)
        return _to_8bit(upright, mode)  # leaving `with` closes the file only; the pixels stay


def _pixels(image: Image.Image) -> np.ndarray:
    """(S, S) or (S, S, 3) Pillow image -> uint8 (C, S, S), a writable C-contiguous copy."""
    return np.array(np.atleast_3d(np.asarray(image, dtype=np.uint8)).transpose(2, 0, 1), order="C")


def load_image(
    path: Path, size: int, grayscale: bool = True, max_image_pixels: int = DiscardRules.max_image_pixels
) -> np.ndarray:
    """Decode -> EXIF transpose -> gray ("L") or RGB -> letterbox; returns uint8 (C, S, S).

    Raises (OSError, ValueError, Image.DecompressionBombError, ...) on files that cannot be decoded.
    """
    with _pillow_limits(max_image_pixels):
        image = _open_upright(Path(path), size, "L" if grayscale else "RGB", max_image_pixels)
    return _pixels(letterbox(image, size))


def _grey_level_std(image: Image.Image) -> float:
    """Largest per-band standard deviation, in grey levels, from the histogram (no pixel copy)."""
    counts = np.asarray(image.histogram(), dtype=np.float64).reshape(-1, 256)  # (bands, 256)
    levels = np.arange(256, dtype=np.float64)
    total = counts.sum(axis=1)
    mean = counts @ levels / total
    variance = counts @ (levels**2) / total - mean**2
    return float(np.sqrt(max(float(variance.max()), 0.0)))


# ----------------------------------------------------------------------------- why a file fails

_MAGIC = (  # (first bytes, format name, whether we can decode it)
    ((b"\xff\xd8\xff",), "JPEG", True),
    ((b"\x89PNG\r\n\x1a\n",), "PNG", True),
    ((b"GIF87a", b"GIF89a"), "GIF", True),
    ((b"II*\x00", b"MM\x00*"), "TIFF", True),
    ((b"%PDF",), "PDF", False),
    ((b"8BPS",), "PSD", False),
    ((b"%!PS", b"\xc5\xd0\xd3\xc6"), "EPS", False),
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}


def _sniff(head: bytes) -> tuple[str, bool]:
    """(format name, whether we could decode it) from a file's first bytes; ("", False) if unknown."""
    for magics, name, decodable in _MAGIC:
        if head.startswith(magics):
            return name, decodable
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP", True
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return "HEIC", False
        if brand in (b"avif", b"avis"):
            return "AVIF", "AVIF" in _IMAGE_FORMATS
    text = head.lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "SVG", False
    return "", False


def _looks_like_text(head: bytes) -> bool:
    """No NUL bytes and valid UTF-8 (allowing a character cut at the end): HTML pages, notes, CSV."""
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3
    return True


def _oneline(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text}"


def _failure_reason(path: Path, exc: BaseException, max_image_pixels: int) -> str:
    """The manifest reason for a file that `_open_upright` could not decode."""
    message = str(exc).lower()
    if isinstance(exc, Image.DecompressionBombError):
        claimed = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow's own message, past twice its limit
        if claimed:
            return f"{BOMB} ({claimed.group(1)} pixels > the limit of {max_image_pixels})"
        return f"{BOMB} ({exc})"
    if "decompressed data too large" in message:  # a PNG text chunk that inflates without bound
        return f"{BOMB} ({_oneline(exc)})"
    if isinstance(exc, MemoryError):
        return f"{BOMB} (MemoryError: too large to decode)"
    if isinstance(exc, UnidentifiedImageError):
        try:
            with open(path, "rb") as handle:
                head = handle.read(1024)
        except OSError as read_error:
            return f"{CANNOT_READ} ({_oneline(read_error)})"
        name, decodable = _sniff(head)
        if name and decodable:
            return f"{CORRUPT} (a {name} header that cannot be parsed)"
        if name:
            return f"{UNSUPPORTED} ({name})"
        if _looks_like_text(head):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                return f"{NOT_AN_IMAGE} (text, e.g. an HTML error page saved under an image name)"
            return f"{TEXT} (text content)"
        return f"{NOT_AN_IMAGE} (no known image format)"
    if isinstance(exc, (PermissionError, IsADirectoryError, FileNotFoundError)):
        return f"{CANNOT_READ} ({_oneline(exc)})"
    if isinstance(exc, EOFError) or any(word in message for word in ("truncated", "broken data stream", "premature")):
        return f"{TRUNCATED} ({_oneline(exc)})"
    if any(words in message for words in ("not available", "not supported", "unsupported", "unknown raw mode")):
        return f"{UNSUPPORTED} ({_oneline(exc)})"
    return f"{CORRUPT} ({_oneline(exc)})"


def _decode_chunk(jobs: Sequence[str], size: int, grayscale: bool, rules: DiscardRules) -> tuple[np.ndarray, list[str]]:
    """Decode files: (kept pixels uint8 (K, C, S, S) in job order, a reason per job, "" = kept).

    One array per chunk, so that a worker sends its results back in one piece. Top level: spawn-safe.
    """
    mode = "L" if grayscale else "RGB"
    pixels = np.empty((len(jobs), 1 if grayscale else 3, size, size), np.uint8)
    kept = 0
    reasons: list[str] = []
    with _pillow_limits(rules.max_image_pixels):
        for path_text in jobs:
            path = Path(path_text)
            try:
                fitted = _fit(_open_upright(path, size, mode, rules.max_image_pixels), size)
            except Exception as exc:  # any decoder failure: discard the file, never crash the build
                reasons.append(_failure_reason(path, exc, rules.max_image_pixels))
                continue
            if rules.min_std > 0:
                spread = _grey_level_std(fitted)  # of the picture itself, before the padding
                if spread < rules.min_std:
                    reasons.append(f"{NEAR_CONSTANT} (std {spread:.2f} < {rules.min_std:g} grey levels)")
                    continue
            pixels[kept] = _pixels(_pad(fitted, size))
            kept += 1
            reasons.append("")
    return pixels[:kept], reasons


Image.init()  # load every Pillow plugin, so that Image.OPEN lists the formats this Pillow can decode
_IMAGE_FORMATS = tuple(name for name in IMAGE_FORMATS if name in Image.OPEN)  # Image.open fails on others


# ----------------------------------------------------------------------------- scan


def _not_data_reason(name: str) -> str:
    """Why a file is not data from its name alone, or "" if it should be decoded."""
    if name.startswith("."):
        return f"{HIDDEN} (hidden file)"
    if name.lower() in SYSTEM_FILES:
        return f"{SYSTEM} ({name.strip()})"
    if os.path.splitext(name)[1].lower() in TEXT_EXTENSIONS:
        return TEXT
    return ""


def _entries(folder: Path, name: str) -> list[os.DirEntry[str]]:
    """The entries of `folder` by name; a DataError naming it `name` if it cannot be listed."""
    try:
        return sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as exc:
        raise DataError(f"cannot list {name} ({exc.strerror}): make it readable") from exc


def _raw_file(raw_dir: Path, entry: os.DirEntry[str], class_name: str, skip: str = "") -> RawFile:
    """An entry with its size and mtime; a folder (only hidden ones come here), a link to nowhere,
    a pipe or a device is not data."""
    path = Path(entry.path)
    relative = path.relative_to(raw_dir).as_posix()
    if entry.is_dir():
        return RawFile(path, relative + "/", class_name, 0, 0, f"{HIDDEN} (hidden folder)")
    try:
        stat = entry.stat() if entry.is_file() else None  # follows links
    except OSError:
        stat = None
    if stat is None:
        return RawFile(path, relative, class_name, 0, 0, skip or f"{SPECIAL} (a link to nowhere, a pipe or a device)")
    return RawFile(path, relative, class_name, stat.st_size, stat.st_mtime_ns, skip)


def _class_files(raw_dir: Path, class_dir: Path) -> list[RawFile]:
    """Every entry under class_dir (recursively, following links once); hidden folders not entered."""
    found: list[RawFile] = []
    seen_dirs: set[tuple[int, int]] = set()
    stack = [class_dir]
    while stack:
        folder = stack.pop()
        stat = folder.stat()
        if (stat.st_dev, stat.st_ino) in seen_dirs:
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        for entry in _entries(folder, str(folder)):
            if entry.is_dir() and not entry.name.startswith("."):
                stack.append(Path(entry.path))
            else:
                found.append(_raw_file(raw_dir, entry, class_dir.name, _not_data_reason(entry.name)))
    return found


def scan_folder(raw_dir: Path) -> Scan:
    """Every entry of raw_dir, each a class sample or not data with a reason; raises DataError if unusable.

    Classes are the top-level folders (hidden ones skipped) holding at least one file that
    is not hidden, a system file or a text file; other folders are reported in a warning.
    Raises DataError for a missing or empty folder and for fewer than two classes.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        problem = "is not a folder" if raw_dir.exists() else "does not exist"
        raise DataError(f"data.raw_dir={raw_dir} {problem}: point it at a folder with one subfolder per class")
    files: list[RawFile] = []
    classes: list[str] = []
    for entry in _entries(raw_dir, f"data.raw_dir={raw_dir}"):
        if entry.is_dir() and not entry.name.startswith("."):
            members = _class_files(raw_dir, Path(entry.path))
            if any(not raw.skip for raw in members):
                classes.append(entry.name)
                files += members
            else:
                log.warning("ignoring %s: no image files in it, so it is not a class", entry.path)
                files += [dataclasses.replace(raw, class_name="") for raw in members]
        else:
            skip = _not_data_reason(entry.name) if entry.name.startswith(".") else OUTSIDE
            files.append(_raw_file(raw_dir, entry, "", skip))
    if not classes:
        raise DataError(
            f"data.raw_dir={raw_dir} is empty (no class subfolders with image files): "
            "put images in one subfolder per class, e.g. cat/*.jpg and dog/*.jpg"
        )
    if len(classes) < 2:
        raise DataError(
            f"data.raw_dir={raw_dir} has only one class ({classes[0]!r}): "
            "a classifier needs at least two class subfolders"
        )
    files.sort(key=lambda raw: raw.relative)
    return Scan(classes=classes, files=files)


def _fingerprint(scan: Scan, settings: _Settings) -> str:
    """sha256 (first 16 hex) of every entry's (relative path, size, mtime_ns) and the settings that shape a cache."""
    key = {
        "files": [(raw.relative, raw.size, raw.mtime_ns) for raw in scan.files],
        "image_size": settings.image_size,
        "grayscale": settings.grayscale,
        "discard": dataclasses.asdict(settings.rules),
        "version": PREPROCESS_VERSION,
    }
    return hashlib.sha256(json.dumps(key, separators=(",", ":")).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- placeholders


def _sha256(path: Path) -> str | None:
    """Hex digest of a file's bytes, or None if it cannot be read (decoding then says why)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while block := handle.read(_HASH_BLOCK):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _screen_without_decoding(
    samples: Sequence[tuple[RawFile, int]],
    classes: Sequence[str],
    rules: DiscardRules,
    workers: int,
    reasons: dict[str, str],
) -> list[dict[str, Any]]:
    """Add the reasons of placeholders (by content) and empty files to `reasons`; the groups for meta.json.

    Only files that can repeat often enough are hashed: those sharing their size with at
    least min_copies - 1 others (all files when known digests are configured). Empty files
    are "empty file", not grouped.
    """
    known = set(rules.known_digests)
    by_size: dict[int, list[int]] = defaultdict(list)  # size -> positions in `samples`
    for i, (raw, _) in enumerate(samples):
        if raw.size > 0:
            by_size[raw.size].append(i)
        else:
            reasons[raw.relative] = EMPTY

    def repeated(members: list[int]) -> bool:
        return bool(rules.min_copies) and len(members) >= rules.min_copies

    candidates = [i for members in by_size.values() if known or repeated(members) for i in members]
    # hashlib and file reads release the GIL: threads hash in parallel without pickling bytes around.
    with concurrent.futures.ThreadPoolExecutor(max(1, 2 * workers)) as pool:
        digests = list(pool.map(_sha256, [samples[i][0].path for i in candidates]))
    by_digest: dict[str, list[int]] = defaultdict(list)
    for i, digest in zip(candidates, digests, strict=True):
        if digest is not None:
            by_digest[digest].append(i)
    groups = [(digest, members) for digest, members in by_digest.items() if digest in known or repeated(members)]
    placeholder_groups = []
    for digest, members in sorted(groups, key=lambda group: (-len(group[1]), group[0])):
        kind = KNOWN_DIGEST if digest in known else REPEATED
        for i in members:
            reasons[samples[i][0].relative] = f"{kind} (sha256 {digest[:12]}..., {len(members)} in this folder)"
        per_class = Counter(classes[samples[i][1]] for i in members)
        placeholder_groups.append(
            {
                "sha256": digest,
                "files": len(members),
                "known": digest in known,
                "per_class": dict(sorted(per_class.items())),
                "example": samples[members[0]][0].relative,
            }
        )
    return placeholder_groups


# ----------------------------------------------------------------------------- cache


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in CACHE_FILES)


def load_cache(path: Path) -> Cache:
    """Open a complete cache folder; images are memory-mapped read-only."""
    path = Path(path)
    missing = [name for name in CACHE_FILES if not (path / name).is_file()]
    if missing:
        raise DataError(
            f"cache {path} is incomplete (missing {', '.join(missing)}): delete that folder and build it again"
        )
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8", errors=_ERRORS))
        images = np.load(path / "images.npy", mmap_mode="r")
        labels = np.load(path / "labels.npy")
        with open(path / "manifest.csv", newline="", encoding="utf-8", errors=_ERRORS) as handle:
            rows = list(csv.DictReader(handle))
        kept = sorted((row for row in rows if row["status"] == "kept"), key=lambda row: int(row["index"]))
        size = int(meta["image_size"])
        channels = 1 if meta["grayscale"] else 3
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cache {path} is unreadable ({_oneline(exc)}): delete that folder and build it again") from exc
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
        discarded=[(row["path"], row["reason"]) for row in rows if row["status"] != "kept"],
        meta=meta,
    )


def _default_workers() -> int:
    # sched_getaffinity respects CPU pinning in containers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decode_all(
    jobs: Sequence[str], size: int, grayscale: bool, rules: DiscardRules, workers: int
) -> Generator[tuple[np.ndarray, list[str]], None, None]:
    """Decoded chunks, in input order; at most a few chunks per worker in flight (bounded memory).

    Not Executor.map: before Python 3.14 it submits every chunk at once, and chunks finished
    behind a slow one wait in memory, so a data set larger than RAM would not fit.
    """
    chunk = max(1, min(32, len(jobs) // (workers * 8)))
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    workers = min(workers, len(chunks))
    if workers <= 1:
        yield from (_decode_chunk(part, size, grayscale, rules) for part in chunks)
        return
    # The platform's start method (fork on Linux up to Python 3.13: cheap, and a script without
    # a __main__ guard still works; forkserver/spawn elsewhere, which the top-level worker allows).
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context(START_METHOD), initializer=exit_with_parent
    )
    try:
        in_flight = workers * 3
        pending = deque(pool.submit(_decode_chunk, part, size, grayscale, rules) for part in chunks[:in_flight])
        for part in chunks[in_flight:]:
            done = pending.popleft().result()
            pending.append(pool.submit(_decode_chunk, part, size, grayscale, rules))
            yield done
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8", errors=_ERRORS) as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
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
    discard: Mapping[str, Any] | DiscardRules | None = None,
) -> Cache:
    """Return the cache of raw_dir for these settings, building it first if needed.

    An unchanged folder with unchanged settings loads the existing cache without decoding
    anything. workers: decoding processes (default: the usable CPUs; 1 = none). discard:
    `DiscardRules` or its fields as a mapping (the config's ``data.discard``).
    """
    raw_dir = Path(raw_dir).expanduser().absolute()
    cache_dir = Path(cache_dir).expanduser().absolute()
    rules = from_mapping(DiscardRules, discard, "data.discard")
    started = time.perf_counter()
    scan = scan_folder(raw_dir)
    if cache_dir.resolve().is_relative_to(raw_dir.resolve()):
        raise DataError(
            f"data.cache_dir={cache_dir} is inside data.raw_dir={raw_dir}: put the cache outside the raw folder"
        )
    settings = _Settings(raw_dir, image_size, bool(grayscale), rules, workers or _default_workers(), progress)
    fingerprint = _fingerprint(scan, settings)
    final = cache_dir / f"{raw_dir.name}-{fingerprint}"
    if _is_complete(final):  # no lock needed to read a finished cache (it works on a read-only cache_dir too)
        cache = load_cache(final)
        log.info("reusing cache %s (%d images)", final, len(cache))
        return cache
    built = build_folder(
        final,
        lambda tmp: _build_into(tmp, scan, settings, fingerprint, started),
        is_complete=_is_complete,
        replace_old=_refuse_incomplete,
    )
    cache = dataclasses.replace(load_cache(final), built=built)
    if built:
        log.info("%s", format_report(cache))
    else:
        log.info("reusing cache %s, built by another process meanwhile", final)
    return cache


def _refuse_incomplete(path: Path) -> bool:
    """`build_folder`'s replace_old: a cache folder without 'done' is reported, never replaced."""
    raise DataError(f"cache {path} is incomplete (no 'done' marker): delete that folder and build it again")


@dataclass(frozen=True)
class _Settings:
    """What a cache is built from besides the files: one argument instead of six."""

    raw_dir: Path
    image_size: int  # S, pixels
    grayscale: bool
    rules: DiscardRules
    workers: int  # decoding processes
    progress: bool  # show a progress bar


def _build_into(tmp: Path, scan: Scan, settings: _Settings, fingerprint: str, started: float) -> None:
    """Screen and decode every sample into a complete cache folder at tmp ('done' written last)."""
    raw_dir, rules = settings.raw_dir, settings.rules
    samples = scan.samples
    reasons: dict[str, str] = {raw.relative: raw.skip for raw in scan.files if raw.skip}  # relative -> reason
    hash_start = time.perf_counter()
    placeholder_groups = _screen_without_decoding(samples, scan.classes, rules, settings.workers, reasons)
    to_decode = [(raw, label) for raw, label in samples if raw.relative not in reasons]
    decode_start = time.perf_counter()
    kept_index, labels = _decode_into(tmp / "images.npy", to_decode, settings, reasons)
    decode_seconds = time.perf_counter() - decode_start

    counts = {name: int((labels == index).sum()) for index, name in enumerate(scan.classes)}
    for name, count in counts.items():
        if count == 0:
            raise DataError(
                f"no file of class {name!r} in data.raw_dir={raw_dir} could be kept: "
                f"check or remove {raw_dir / name} (a discarded-per-reason summary is in the log)"
            )
    np.save(tmp / "labels.npy", labels)
    _write_manifest(tmp / "manifest.csv", scan.files, kept_index, reasons)
    _warn_about_unreadable(raw_dir, reasons)
    _write_json(
        tmp / "meta.json",
        {
            "classes": scan.classes,
            "image_size": settings.image_size,
            "grayscale": settings.grayscale,
            "channels": 1 if settings.grayscale else 3,
            "count": counts,
            "kept": len(labels),
            "discarded": len(reasons),
            "files_seen": len(scan.files),
            "discarded_by_reason": dict(sorted(Counter(_reason_kind(reason) for reason in reasons.values()).items())),
            "placeholder_groups": placeholder_groups,
            "discard": dataclasses.asdict(rules),
            "fingerprint": fingerprint,
            "raw_dir": str(raw_dir),
            "preprocess_version": PREPROCESS_VERSION,
            "workers": settings.workers,
            "seconds": {
                "scan": round(hash_start - started, 3),
                "placeholders": round(decode_start - hash_start, 3),
                "decode": round(decode_seconds, 3),
                "total": round(time.perf_counter() - started, 3),
            },
        },
    )
    (tmp / "done").write_text("complete\n")


def _decode_into(
    path: Path, to_decode: Sequence[tuple[RawFile, int]], settings: _Settings, reasons: dict[str, str]
) -> tuple[dict[str, int], np.ndarray]:
    """Decode in parallel, in order, appending kept images to the .npy at path as they arrive.

    Adds the reason of every file not kept to `reasons`; returns (relative path -> row, labels int64 (N,)).
    """
    size, channels = settings.image_size, 1 if settings.grayscale else 3
    kept_index: dict[str, int] = {}
    labels: list[int] = []
    with open(path, "wb") as images:
        header = {"descr": "|u1", "fortran_order": False, "shape": (len(to_decode), channels, size, size)}
        np.lib.format.write_array_header_1_0(images, header)  # the most rows we could keep; rewritten at the end
        data_start = images.tell()
        desc = f"preprocessing {settings.raw_dir.name}"
        bar = tqdm(total=len(to_decode), desc=desc, unit="img", disable=not settings.progress)
        # Warnings go through tqdm.write while the bar is shown, so they do not break it.
        redirect = logging_redirect_tqdm() if settings.progress else contextlib.nullcontext()
        jobs = [str(raw.path) for raw, _ in to_decode]
        decoded = _decode_all(jobs, size, settings.grayscale, settings.rules, settings.workers)
        with redirect, bar, contextlib.closing(decoded):
            rows = iter(to_decode)
            for pixels, chunk_reasons in decoded:
                images.write(pixels.data)  # (K, C, S, S) C-contiguous: the next K rows, no copy
                # chunk_reasons first: zip stops on it without taking one row too many from `rows`
                for reason, (raw, label) in zip(chunk_reasons, rows, strict=False):
                    if reason:
                        reasons[raw.relative] = reason
                        log.debug("discarding %s: %s", raw.path, reason)
                    else:
                        kept_index[raw.relative] = len(labels)
                        labels.append(label)
                bar.update(len(chunk_reasons))
        # numpy (1.24 and later) pads every header so that the row count can change in place, the data unmoved
        images.seek(0)
        np.lib.format.write_array_header_1_0(images, {**header, "shape": (len(labels), channels, size, size)})
        if images.tell() != data_start:
            raise RuntimeError(f"{path}: the .npy header changed length when rewritten; numpy >= 1.24 is required")
        images.flush()
        os.fsync(images.fileno())  # data on disk before 'done' says it is
    return kept_index, np.asarray(labels, dtype=np.int64)


def _write_manifest(
    path: Path, files: Sequence[RawFile], kept_index: Mapping[str, int], reasons: Mapping[str, str]
) -> None:
    """manifest.csv: path,label,status,reason,index, one row per file seen, in path order."""
    with open(path, "w", newline="", encoding="utf-8", errors=_ERRORS) as handle:
        writer = csv.writer(handle)
        writer.writerow(("path", "label", "status", "reason", "index"))
        for raw in files:
            if raw.relative in kept_index:
                writer.writerow((raw.relative, raw.class_name, "kept", "", kept_index[raw.relative]))
            else:
                writer.writerow((raw.relative, raw.class_name, "discarded", reasons[raw.relative], ""))
        handle.flush()
        os.fsync(handle.fileno())


def _reason_kind(reason: str) -> str:
    """ "unreadable: truncated (OSError: ...)" -> "unreadable: truncated"."""
    return reason.split(" (", 1)[0]


def _warn_about_unreadable(raw_dir: Path, reasons: Mapping[str, str], shown: int = 3) -> None:
    """One warning for broken downloads: how many of each kind, a few names; all are in manifest.csv."""
    broken = sorted(path for path, reason in reasons.items() if reason.startswith("unreadable"))
    if not broken:
        return
    kinds = Counter(_reason_kind(reasons[path]).removeprefix("unreadable: ") for path in broken)
    summary = ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items()))
    examples = ", ".join(broken[:shown]) + (", ..." if len(broken) > shown else "")
    log.warning(
        "%s: skipped %d unreadable files (%s), e.g. %s; every file and reason is in the cache's manifest.csv",
        raw_dir,
        len(broken),
        summary,
        examples,
    )


def format_report(cache: Cache, seconds: float | None = None) -> str:
    """A short human report: files seen, kept per class, discarded per reason, placeholder groups, time, path."""
    meta = cache.meta
    kept = ", ".join(f"{name} {count}" for name, count in meta.get("count", {}).items())
    build = meta.get("seconds", {}).get("total")
    if cache.built:
        timing = f"built in {build:.2f} s ({meta.get('workers', '?')} processes)"
    else:
        timing = "reused, nothing decoded" + (f" (built earlier in {build:.2f} s)" if build is not None else "")
    lines = [
        f"cache: {cache.path}",
        f"  {timing}" + (f"; this run took {seconds:.2f} s" if seconds is not None else ""),
        f"  files seen: {meta.get('files_seen', '?')}",
        f"  kept: {len(cache)} ({kept})",
        f"  discarded: {len(cache.discarded)}",
    ]
    by_reason = meta.get("discarded_by_reason", {})
    width = max((len(reason) for reason in by_reason), default=0)
    lines += [f"    {reason:<{width}}  {count}" for reason, count in by_reason.items()]
    groups = meta.get("placeholder_groups", [])
    lines.append(f"  placeholder groups: {len(groups)}")
    for group in groups[:10]:
        per_class = ", ".join(f"{name} {n}" for name, n in group["per_class"].items())
        tag = "known digest" if group["known"] else "repeated"
        files = f"{group['files']} file{'s' if group['files'] != 1 else ''}"
        lines.append(f"    sha256 {group['sha256']}: {files} ({per_class}; {tag}), e.g. {group['example']}")
    if len(groups) > 10:
        lines.append(f"    ... {len(groups) - 10} more groups in meta.json")
    lines.append(f"  manifest: {cache.path / 'manifest.csv'}")
    return "\n".join(lines)
