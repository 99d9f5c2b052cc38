"""preprocess: raw folder -> uint8 cache (discard reasons, conversions, manifest, reuse, atomicity, concurrency)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import run_train, tiny_overrides
from filelock import FileLock
from PIL import Image

from alexnet_lab.data import preprocess
from alexnet_lab.data.folders import build_folder
from alexnet_lab.data.preprocess import (
    DiscardRules,
    build_cache,
    format_report,
    letterbox,
    load_cache,
    load_image,
    scan_folder,
)
from alexnet_lab.errors import ConfigError, DataError, from_mapping

SIZE = 64  # the least the AlexNet stem accepts
KEPT = "kept"


def gradient(width: int, height: int, seed: int) -> Image.Image:
    """A small RGB image that differs per seed (so arrays can be told apart)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    pixels = (base + 120 * x + 60 * y) % 256
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def make_raw(root: Path, per_class: dict[str, int] = {"cat": 4, "dog": 3}) -> Path:  # noqa: B006 (read-only)
    """raw/<class>/ with JPEGs and PNGs of mixed aspect ratio, plus a stray top-level file."""
    raw = root / "raw"
    seed = 0
    for name, count in per_class.items():
        (raw / name).mkdir(parents=True)
        for i in range(count):
            size = (80, 50) if i % 2 == 0 else (40, 120)
            ext = ".jpg" if i % 3 else ".PNG"  # extensions are matched case-insensitively
            gradient(*size, seed).save(raw / name / f"{i:03d}{ext}")
            seed += 1
    (raw / "README.txt").write_text("stray file at the top level: not data")
    return raw


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime_ns of every file under folder (links: their target)."""
    return {
        path.relative_to(folder).as_posix(): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        if path.exists()
        else ("dangling", 0)
        for path in sorted(folder.rglob("*"))
        if path.is_file() or path.is_symlink()
    }


def read_manifest(cache_path: Path) -> list[dict[str, str]]:
    with open(cache_path / "manifest.csv", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        return list(csv.DictReader(handle))


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims width x height gray pixels, followed by almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(bytes(64))  # far fewer than claimed
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header is edited to claim width x height."""
    data = bytearray(encoded(gradient(40, 30, 7), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# ----------------------------------------------------------------------------- the dirty folder


class DirtyFolder:
    """A raw folder being filled with test cases, and the fate expected for each manifest path."""

    def __init__(self, raw: Path) -> None:
        self.raw = raw
        self.expected: dict[str, str] = {}  # manifest path -> "kept" or its discard reason kind

    def add(self, relative: str, content: bytes | Image.Image, expect: str, **params) -> Path:
        path = self.raw / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Image.Image):
            fmt = params.pop("format", None) or Image.registered_extensions()[path.suffix.lower()]
            content = encoded(content, fmt, **params)
        path.write_bytes(content)
        self.expected[relative] = expect
        return path


def make_dirty_raw(root: Path) -> tuple[Path, dict[str, str], str]:
    """A raw folder with every case preprocessing must handle.

    Returns (raw_dir, expected, known_digest): expected maps each manifest path to "kept" or
    its discard reason kind; known_digest is the sha256 of the file to pass as a known placeholder.
    """
    folder = DirtyFolder(root / "raw")
    add_usable_images(folder)
    known = add_placeholders(folder)
    add_unreadable_files(folder)
    add_files_that_are_not_data(folder)
    return folder.raw, folder.expected, hashlib.sha256(known.read_bytes()).hexdigest()


def add_usable_images(folder: DirtyFolder) -> None:
    """Images that are kept: ordinary photos, then valid but unusual ones."""
    add = folder.add
    for i in range(4):
        add(f"cat/{i:03d}.jpg", gradient(80, 50, i), KEPT)
        add(f"dog/{i:03d}.png", gradient(50, 80, 10 + i), KEPT)
    add("dog/more/nested.jpg", gradient(60, 60, 9), KEPT)  # class folders are searched recursively
    # valid but unusual: all kept, converted
    add("cat/cmyk.jpg", gradient(80, 50, 40).convert("CMYK"), KEPT)
    palette = np.ones((50, 80), np.uint8)  # 0 = transparent (left half), 1 = white, 2 = red block
    palette[:, :40] = 0
    palette[10:20, 50:60] = 2
    p_image = Image.fromarray(palette, "P")
    p_image.putpalette([0, 255, 0, 255, 255, 255, 200, 30, 30])  # transparent pixels are green underneath
    add("cat/palette.png", p_image, KEPT, transparency=0)
    rgba = np.zeros((50, 80, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, 40:, 3] = 255  # left half fully transparent
    add("cat/rgba.png", Image.fromarray(rgba, "RGBA"), KEPT)
    add("cat/gray16.png", Image.fromarray(np.tile(np.linspace(0, 65535, 80).astype(np.uint16), (50, 1))), KEPT)
    stored = np.zeros((40, 80), np.uint8)  # stored wide, with a white marker in its top-left corner
    stored[:10, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    add("cat/rotated.jpg", Image.fromarray(stored, "L").convert("RGB"), KEPT, quality=95, exif=exif)
    frames = [Image.new("L", (80, 50), value) for value in (220, 30, 120)]
    for frame in frames:
        frame.paste(0, (0, 0, 10, 10))  # a dark corner, so that no frame is blank
    add("cat/animated.gif", frames[0], KEPT, save_all=True, append_images=frames[1:], duration=100, loop=0)
    add("cat/photo.webp", gradient(70, 50, 20), KEPT)
    add("cat/photo.bmp", gradient(70, 50, 21), KEPT)
    add("cat/UPPER.JPG", gradient(70, 50, 22), KEPT)
    add("cat/no_extension", gradient(70, 50, 23), KEPT, format="JPEG")
    add("cat/name with spaces é.png", gradient(70, 50, 24), KEPT)
    add("dog/狗 1.jpg", gradient(70, 50, 25), KEPT)
    add("dog/" + os.fsdecode(b"latin1_caf\xe9.jpg"), gradient(70, 50, 34), KEPT)  # a name that is not UTF-8
    add("cat/wide.png", gradient(1200, 12, 26), KEPT)  # 100:1
    add("dog/tall.jpg", gradient(9, 900, 27), KEPT)  # 1:100
    duplicate = encoded(gradient(64, 64, 29), "PNG")  # two copies: below min_copies, both kept
    add("cat/dup_a.png", duplicate, KEPT)
    add("dog/dup_b.png", duplicate, KEPT)


def add_placeholders(folder: DirtyFolder) -> Path:
    """Repeated content, a known digest, a blank picture; returns the file whose digest is "known"."""
    add = folder.add
    placeholder = encoded(gradient(90, 60, 28), "JPEG")
    for i in range(3):  # 6 copies across both classes >= min_copies 5
        add(f"cat/dl_{i}.jpg", placeholder, "placeholder: repeated content")
        add(f"dog/dl_{i}.jpg", placeholder, "placeholder: repeated content")
    known = add("dog/known.png", gradient(64, 48, 30), "placeholder: known digest")
    flat = np.full((60, 90), 200, np.uint8)
    flat[::7, ::5] = 201  # not exactly constant, still blank
    add("dog/blank.png", Image.fromarray(flat), "placeholder: near-constant image")
    return known


def add_unreadable_files(folder: DirtyFolder) -> None:
    """Broken downloads: empty, truncated, corrupt, not an image, unsupported, decompression bombs."""
    add, raw = folder.add, folder.raw
    add("cat/empty.jpg", b"", "unreadable: empty file")
    whole_jpeg, whole_png = (raw / "cat/000.jpg").read_bytes(), (raw / "dog/000.png").read_bytes()
    add("cat/truncated.jpg", whole_jpeg[: len(whole_jpeg) // 2], "unreadable: truncated")
    add("dog/truncated.png", whole_png[: len(whole_png) // 2], "unreadable: truncated")
    add("cat/bad_header.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "unreadable: corrupt")
    add(
        "dog/garbage.jpg",
        np.random.default_rng(1).integers(0, 256, 3000, np.uint8).tobytes(),
        "unreadable: not an image",
    )
    add(
        "dog/error_page.jpg",
        b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n",
        "unreadable: not an image",
    )
    add(
        "dog/photo.heic",
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200),
        "unreadable: unsupported format",
    )
    add(
        "dog/drawing.svg",
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>\n',
        "unreadable: unsupported format",
    )
    add("cat/bomb.png", png_claiming(100_000, 100_000), "unreadable: decompression bomb")  # 10 G pixels
    add("dog/bomb.jpg", jpeg_claiming(60_000, 60_000), "unreadable: decompression bomb")
    # 100 M pixels: above the limit (89.5 M) but below twice it, where Pillow only warns
    add("dog/bomb_small.png", png_claiming(10_000, 10_000), "unreadable: decompression bomb")


def add_files_that_are_not_data(folder: DirtyFolder) -> None:
    """Hidden and system files, text, files outside a class folder, a dangling link."""
    add, raw, expected = folder.add, folder.raw, folder.expected
    add("cat/.DS_Store", b"\x00\x00\x00\x01Bud1", "not data: hidden")
    add("cat/.hidden.jpg", gradient(30, 30, 31), "not data: hidden")
    add("cat/.thumbnails/t.jpg", gradient(30, 30, 32), "")  # inside a hidden folder: not seen
    del expected["cat/.thumbnails/t.jpg"]
    expected["cat/.thumbnails/"] = "not data: hidden"
    add("cat/Thumbs.db", b"\xd0\xcf\x11\xe0" + bytes(100), "not data: system file")
    add("dog/desktop.ini", b"[.ShellClassInfo]\n", "not data: system file")
    add("cat/notes.txt", b"downloaded 2012", "not data: text file")
    add("dog/README", b"dog pictures from ImageNet\n", "not data: text file")  # no extension, text inside
    add("notes/todo.txt", b"check the dogs", "not data: text file")  # a folder without images: not a class
    (raw / "empty_folder").mkdir()
    add("README.txt", b"stray", "not data: outside a class folder")
    add("urls.csv", b"url\n", "not data: outside a class folder")
    add("stray.jpg", gradient(30, 30, 33), "not data: outside a class folder")
    add(".DS_Store", b"x", "not data: hidden")
    os.symlink(raw / "nowhere.jpg", raw / "cat" / "dangling.jpg")
    expected["cat/dangling.jpg"] = "not data: not a regular file"


@pytest.fixture(scope="module")
def dirty(tmp_path_factory: pytest.TempPathFactory):
    """The dirty folder, its snapshot before the build, and its cache built once with 2 processes."""
    root = tmp_path_factory.mktemp("dirty")
    raw, expected, known = make_dirty_raw(root)
    before = snapshot(raw)
    started = time.perf_counter()
    cache = build_cache(
        raw, root / "cache", image_size=SIZE, workers=2, progress=False, discard={"known_digests": [known]}
    )
    seconds = time.perf_counter() - started
    return raw, expected, known, before, cache, seconds


def test_dirty_folder_every_file_has_the_expected_fate(dirty) -> None:
    raw, expected, _, _, cache, seconds = dirty
    rows = read_manifest(cache.path)
    got = {row["path"]: KEPT if row["status"] == "kept" else row["reason"].split(" (")[0] for row in rows}
    assert got == expected
    assert len(rows) == len(expected)  # one row per file seen, none twice
    assert seconds < 10  # the bombs were refused, not decoded

    assert cache.classes == ["cat", "dog"]
    kept = [path for path, fate in expected.items() if fate == KEPT]
    assert len(cache) == len(kept) == 26 and sorted(cache.files) == sorted(kept)
    assert len(cache.discarded) == len(expected) - len(kept)
    assert dict(cache.discarded) == {row["path"]: row["reason"] for row in rows if row["status"] != "kept"}
    for row in rows:
        top = row["path"].split("/")[0]
        assert row["label"] == (top if top in ("cat", "dog") else "")
        assert (row["status"] == "kept") == (row["index"] != "") == (row["reason"] == "")
    assert sorted(int(row["index"]) for row in rows if row["index"]) == list(range(len(cache)))
    assert [cache.classes[label] for label in cache.labels] == [name.split("/")[0] for name in cache.files]

    meta = cache.meta
    assert meta["count"] == {"cat": 17, "dog": 9}
    assert meta["files_seen"] == len(expected)
    fates = Counter(fate for fate in expected.values() if fate != KEPT)
    assert meta["discarded_by_reason"] == dict(fates)
    groups = {group["sha256"][:12]: group for group in meta["placeholder_groups"]}
    assert len(groups) == 2
    repeated = next(group for group in groups.values() if not group["known"])
    assert repeated["files"] == 6 and repeated["per_class"] == {"cat": 3, "dog": 3}
    known = next(group for group in groups.values() if group["known"])
    assert known["files"] == 1 and known["example"] == "dog/known.png"


def test_dirty_folder_reasons_carry_details(dirty) -> None:
    _, _, known, _, cache, _ = dirty
    reasons = {row["path"]: row["reason"] for row in read_manifest(cache.path)}
    assert "10000000000 pixels > the limit of 89478485" in reasons["cat/bomb.png"]
    assert "10000 x 10000" in reasons["dog/bomb_small.png"]
    assert known[:12] in reasons["dog/known.png"]
    assert "HTML" in reasons["dog/error_page.jpg"]
    assert "(HEIC)" in reasons["dog/photo.heic"] and "(SVG)" in reasons["dog/drawing.svg"]
    assert "JPEG" in reasons["cat/bad_header.jpg"]
    assert "6 in this folder" in reasons["cat/dl_0.jpg"]


def test_dirty_folder_raw_bytes_unchanged_and_nothing_added(dirty) -> None:
    raw, _, _, before, cache, _ = dirty
    assert snapshot(raw) == before
    assert not cache.path.is_relative_to(raw)


def test_dirty_folder_images_are_converted_right(dirty) -> None:
    raw, _, _, _, cache, _ = dirty
    image = {name: cache.images[i, 0].astype(int) for i, name in enumerate(cache.files)}  # (S, S) each

    rotated = image["cat/rotated.jpg"]  # displayed 40 x 80 (tall): padding left and right
    assert rotated[:, :14].max() < 30 and rotated[:, 50:].max() < 30
    assert rotated[1:7, 41:47].min() > 200  # stored top-left marker is now top-right: upright
    assert rotated[57:63, 17:23].max() < 30

    gray16 = image["cat/gray16.png"]  # 0..65535 left to right, scaled, not clipped at 255
    band = gray16[20:44]
    assert band[:, :3].max() < 15 and band[:, -3:].min() > 240
    assert 110 < band[:, 32].mean() < 146

    palette = image["cat/palette.png"]  # 80 x 50 -> 64 x 40, rows 12..51
    assert palette[32, 5] < 10  # transparent: black background, not the green underneath
    assert palette[44, 36] > 245  # white
    assert abs(palette[24, 44] - 81) < 8  # red (200, 30, 30) -> luma 81
    rgba = image["cat/rgba.png"]
    assert rgba[32, 5] < 10 and rgba[32, 60] > 245

    assert abs(image["cat/animated.gif"][32, 32] - 220) <= 3  # the first frame

    cmyk = image["cat/cmyk.jpg"]
    reference = np.asarray(letterbox(gradient(80, 50, 40).convert("L"), SIZE)).astype(int)
    assert np.abs(cmyk - reference).mean() < 6

    wide = image["cat/wide.png"]  # 1200 x 12 -> 64 x 1 in row 31
    assert wide[31].min() > 0 and np.delete(wide, 31, axis=0).max() == 0
    tall = image["dog/tall.jpg"]
    assert tall[:, 31].min() > 0 and np.delete(tall, 31, axis=1).max() == 0

    as_jpeg = load_image(raw / "cat" / "no_extension", SIZE)[0]
    assert np.array_equal(image["cat/no_extension"], as_jpeg)
    for name in (
        "cat/photo.webp",
        "cat/photo.bmp",
        "cat/UPPER.JPG",
        "cat/name with spaces é.png",
        "dog/狗 1.jpg",
        "dog/" + os.fsdecode(b"latin1_caf\xe9.jpg"),
    ):
        assert image[name][12:52].std() > 5, name  # a real picture, not padding


def test_dirty_folder_report(dirty) -> None:
    _, expected, _, _, cache, _ = dirty
    report = format_report(cache, seconds=0.5)
    assert str(cache.path) in report and "this run took 0.50 s" in report
    assert f"files seen: {len(expected)}" in report
    assert "kept: 26 (cat 17, dog 9)" in report
    assert "placeholder groups: 2" in report and "6 files (cat 3, dog 3; repeated)" in report
    for reason, count in (
        ("unreadable: decompression bomb", 3),
        ("placeholder: repeated content", 6),
        ("not data: hidden", 4),
    ):
        assert re.search(rf"\n    {reason} +{count}\n", report), reason
    reused = build_cache(
        cache.meta["raw_dir"],
        cache.path.parent,
        image_size=SIZE,
        workers=1,
        progress=False,
        discard=cache.meta["discard"],
    )
    assert reused.path == cache.path and not reused.built
    assert "reused, nothing decoded" in format_report(reused)


def test_unreadable_files_give_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = make_raw(tmp_path)
    (raw / "cat" / "empty.png").write_bytes(b"")
    (raw / "dog" / "noise.jpg").write_bytes(np.random.default_rng(1).integers(0, 256, 2000, np.uint8).tobytes())
    with caplog.at_level(logging.INFO, logger=preprocess.__name__):
        cache = build_cache(raw, tmp_path / "cache", image_size=SIZE, workers=1, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 unreadable files (empty file 1, not an image 1)" in warnings[0]
    assert "cat/empty.png" in warnings[0] and str(raw) in warnings[0]
    info = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert str(cache.path) in info and "kept: 7 (cat 4, dog 3)" in info  # the report, once built


# ----------------------------------------------------------------------------- letterbox


def test_letterbox_wide_image_pads_top_and_bottom() -> None:
    out = np.asarray(letterbox(Image.new("L", (200, 100), 255), SIZE))
    assert out.shape == (SIZE, SIZE)
    rows = out.mean(axis=1)
    assert np.all(rows[16:48] == 255)  # white band of height 32, centred
    assert np.all(rows[:16] == 0) and np.all(rows[48:] == 0)  # black padding


def test_letterbox_tall_image_pads_left_and_right() -> None:
    out = np.asarray(letterbox(Image.new("RGB", (100, 200), (255, 255, 255)), SIZE))
    assert out.shape == (SIZE, SIZE, 3)
    cols = out.mean(axis=(0, 2))
    assert np.all(cols[16:48] == 255)
    assert np.all(cols[:16] == 0) and np.all(cols[48:] == 0)


def test_letterbox_upscales_small_image() -> None:
    out = letterbox(Image.new("L", (20, 10), 200), SIZE)
    assert out.size == (SIZE, SIZE)
    assert np.asarray(out)[SIZE // 2, SIZE // 2] == 200


# ----------------------------------------------------------------------------- load_image


@pytest.mark.parametrize("orientation", [6, 8])
def test_load_image_applies_exif_orientation(tmp_path: Path, orientation: int) -> None:
    # Stored wide (80 x 40), black, with a white marker in the stored top-left corner.
    stored = np.zeros((40, 80), np.uint8)
    stored[:10, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored, "L").convert("RGB").save(path, quality=95, exif=exif)

    out = load_image(path, SIZE)  # (1, 64, 64); displayed tall (40 x 80) -> content in columns 16..47
    assert out.shape == (1, SIZE, SIZE) and out.dtype == np.uint8
    image = out[0]
    assert image[:, :14].max() < 30 and image[:, 50:].max() < 30  # left/right padding: taller than wide
    # 6 = rotate 90 degrees clockwise to display: stored top-left goes to the top-right.
    # 8 = rotate 90 degrees counter-clockwise: stored top-left goes to the bottom-left.
    # The 10 x 10 marker becomes 8 x 8 after scaling by 64 / 80.
    top_right, bottom_left = (slice(1, 7), slice(41, 47)), (slice(57, 63), slice(17, 23))
    marker, opposite = (top_right, bottom_left) if orientation == 6 else (bottom_left, top_right)
    assert image[marker].min() > 200
    assert image[opposite].max() < 30
    assert image.mean() < 20  # only the marker is bright


def test_load_image_scales_16_bit_gray(tmp_path: Path) -> None:
    path = tmp_path / "mid_grey_16bit.png"
    Image.fromarray(np.full((50, 80), 32768, np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")  # really 16-bit on disk
    out = load_image(path, SIZE)
    assert abs(int(out[0, SIZE // 2, SIZE // 2]) - 128) <= 1  # not saturated to 255


def test_load_image_converts_rgba_palette_and_rgb(tmp_path: Path) -> None:
    Image.new("RGB", (80, 50), (200, 30, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.gif")
    gray = load_image(tmp_path / "p.gif", SIZE)
    assert gray.shape == (1, SIZE, SIZE) and 70 < gray[0, 32, 32] < 90  # luma of (200, 30, 30) ~ 77

    color = load_image(tmp_path / "p.gif", SIZE, grayscale=False)
    assert color.shape == (3, SIZE, SIZE) and color.dtype == np.uint8
    assert tuple(color[:, 32, 32]) == pytest.approx((200, 30, 30), abs=8)

    Image.new("CMYK", (80, 50), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red
    cmyk = load_image(tmp_path / "cmyk.jpg", SIZE, grayscale=False)
    assert cmyk[0, 32, 32] > 200 and cmyk[1, 32, 32] < 60


def test_load_image_jpeg_draft_keeps_quality(tmp_path: Path) -> None:
    # A large JPEG is decoded at reduced scale; the result must match a full decode closely.
    path = tmp_path / "big.jpg"
    gradient(1000, 750, seed=3).save(path, quality=95)
    fast = load_image(path, SIZE).astype(np.int16)
    with Image.open(path) as image:
        full = np.asarray(letterbox(image.convert("L"), SIZE)).astype(np.int16)
    assert np.abs(fast[0] - full).mean() < 3


def test_load_image_refuses_garbage_and_bombs_without_decoding(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(OSError):
        load_image(path, SIZE)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(50_000, 50_000))
    started = time.perf_counter()
    with pytest.raises(Image.DecompressionBombError):
        load_image(bomb, SIZE)
    assert time.perf_counter() - started < 1  # 2.5 G pixels were not allocated, let alone decoded
    small = tmp_path / "small.png"
    gradient(100, 100, 1).save(small)
    with pytest.raises(Image.DecompressionBombError, match="100 x 100"):
        load_image(small, SIZE, max_image_pixels=5000)


# ----------------------------------------------------------------------------- scan_folder


def test_scan_folder_classes_samples_and_not_data(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    (raw / ".hidden_class").mkdir()
    gradient(30, 30, 0).save(raw / ".hidden_class" / "x.jpg")
    gradient(30, 30, 0).save(raw / "cat" / ".hidden.jpg")
    (raw / "cat" / "notes.txt").write_text("not an image")
    (raw / "only_text").mkdir()
    (raw / "only_text" / "a.txt").write_text("not a class")
    scan = scan_folder(raw)
    assert scan.classes == ["cat", "dog"]
    names = [raw_file.relative for raw_file, _ in scan.samples]
    assert names == sorted(names) and len(names) == 7
    assert [label for _, label in scan.samples] == [0] * 4 + [1] * 3
    skipped = {raw_file.relative: raw_file.skip for raw_file in scan.files if raw_file.skip}
    assert skipped == {
        ".hidden_class/": "not data: hidden (hidden folder)",
        "README.txt": "not data: outside a class folder",
        "cat/.hidden.jpg": "not data: hidden (hidden file)",
        "cat/notes.txt": "not data: text file",
        "only_text/a.txt": "not data: text file",
    }


# ----------------------------------------------------------------------------- build_cache


def test_build_cache_shapes_labels_and_memmap(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    cache = build_cache(raw, tmp_path / "cache", image_size=SIZE, workers=1, progress=False)
    assert cache.built
    assert cache.images.shape == (7, 1, SIZE, SIZE) and cache.images.dtype == np.uint8
    assert isinstance(cache.images, np.memmap) and not cache.images.flags.writeable
    assert cache.labels.dtype == np.int64 and cache.labels.tolist() == [0] * 4 + [1] * 3
    assert np.load(cache.path / "images.npy").shape == (7, 1, SIZE, SIZE)
    assert np.array_equal(cache.images[0], load_image(raw / cache.files[0], SIZE))
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["count"] == {"cat": 4, "dog": 3} and meta["image_size"] == SIZE and meta["grayscale"] is True


def test_build_cache_rgb(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    cache = build_cache(raw, tmp_path / "cache", image_size=SIZE, grayscale=False, progress=False, workers=1)
    assert cache.images.shape == (7, 3, SIZE, SIZE)


def test_reuse_does_not_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = make_raw(tmp_path)
    first = build_cache(raw, tmp_path / "cache", image_size=SIZE, workers=1, progress=False)
    stamp = (first.path / "images.npy").stat().st_mtime_ns

    def no_decoding(*args, **kwargs):
        raise AssertionError("an unchanged folder must not be decoded again")

    monkeypatch.setattr(preprocess, "_decode_chunk", no_decoding)
    monkeypatch.setattr(preprocess, "_sha256", no_decoding)
    start = time.perf_counter()
    second = build_cache(raw, tmp_path / "cache", image_size=SIZE, workers=1, progress=False)
    assert time.perf_counter() - start < 0.5
    assert second.path == first.path and not second.built
    assert (second.path / "images.npy").stat().st_mtime_ns == stamp
    assert np.array_equal(second.images, first.images)


def test_changed_setting_or_file_gives_new_cache(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    cache_dir = tmp_path / "cache"

    def build(**settings) -> Path:
        return build_cache(raw, cache_dir, **{"image_size": SIZE, "workers": 1, "progress": False, **settings}).path

    base = build()
    paths = [
        base,
        build(image_size=SIZE + 8),
        build(grayscale=False),
        build(discard={"min_std": 5.0}),
        build(discard={"max_image_pixels": 10**6}),
    ]
    assert build() == base  # unchanged: the same cache
    touched = raw / "cat" / "001.jpg"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    paths.append(build())
    gradient(50, 50, 99).save(raw / "dog" / "new.jpg")
    paths.append(build())
    assert len(set(paths)) == len(paths) == 7
    assert all(path.name.startswith("raw-") for path in paths)
    assert len(load_cache(paths[-1])) == 8


def test_discard_settings_change_what_is_kept(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    copy = encoded(gradient(60, 40, 50), "PNG")
    for i in range(3):
        (raw / "cat" / f"copy_{i}.png").write_bytes(copy)
    Image.new("L", (60, 40), 90).save(raw / "dog" / "flat.png")
    cache_dir = tmp_path / "cache"
    default = build_cache(raw, cache_dir, image_size=SIZE, workers=1, progress=False)
    assert len(default) == 10 and default.meta["discarded_by_reason"]["placeholder: near-constant image"] == 1
    strict = build_cache(raw, cache_dir, image_size=SIZE, workers=1, progress=False, discard={"min_copies": 3})
    assert len(strict) == 7 and strict.meta["discarded_by_reason"]["placeholder: repeated content"] == 3
    off = build_cache(
        raw, cache_dir, image_size=SIZE, workers=1, progress=False, discard={"min_copies": 0, "min_std": 0}
    )
    assert len(off) == 11 and "placeholder: near-constant image" not in off.meta["discarded_by_reason"]


@pytest.mark.parametrize(
    ("discard", "key"),
    [
        ({"min_copies": 1}, "data.discard.min_copies=1"),
        ({"min_copies": 2.5}, "data.discard.min_copies"),
        ({"min_std": -1}, "data.discard.min_std"),
        ({"max_image_pixels": 0}, "data.discard.max_image_pixels"),
        ({"known_digests": ["abc"]}, "data.discard.known_digests"),
        ({"min_copy": 3}, "data.discard.min_copy"),
    ],
)
def test_bad_discard_settings_are_refused_in_one_line(tmp_path: Path, discard: dict, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_cache(make_raw(tmp_path), tmp_path / "cache", image_size=SIZE, progress=False, discard=discard)
    assert key in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "cache").exists()


def test_discard_rules_accept_digests_in_any_case() -> None:
    digest = "AB" * 32
    assert from_mapping(DiscardRules, {"known_digests": [digest]}, "data.discard").known_digests == ["ab" * 32]
    assert DiscardRules(known_digests=f" {digest}\n").known_digests == ["ab" * 32]  # one digest, as a string
    assert from_mapping(DiscardRules, None, "data.discard") == DiscardRules()


def test_workers_give_identical_arrays(tmp_path: Path) -> None:
    raw = make_raw(tmp_path, {"cat": 9, "dog": 8})
    (raw / "cat" / "bad.jpg").write_bytes(b"not an image at all")
    one = build_cache(raw, tmp_path / "one", image_size=SIZE, workers=1, progress=False)
    two = build_cache(raw, tmp_path / "two", image_size=SIZE, workers=2, progress=False)
    assert one.path.name == two.path.name
    assert np.array_equal(one.images, two.images)
    assert np.array_equal(one.labels, two.labels)
    assert one.files == two.files
    assert (one.path / "manifest.csv").read_text() == (two.path / "manifest.csv").read_text()


# ----------------------------------------------------------------------------- errors


def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert str(path) in message and "\n" not in message


def test_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as error:
        build_cache(missing, tmp_path / "cache", image_size=SIZE, progress=False)
    assert_one_line_naming(error, missing)


def test_empty_dir(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)  # a class folder without images is still empty
    (empty / "stray.jpg").write_bytes(b"")  # top-level files are not a class
    with pytest.raises(DataError, match="is empty") as error:
        build_cache(empty, tmp_path / "cache", image_size=SIZE, progress=False)
    assert_one_line_naming(error, empty)


def test_one_class_dir(tmp_path: Path) -> None:
    raw = make_raw(tmp_path, {"cat": 2})
    (raw / "dog").mkdir()  # no images: not a class
    with pytest.raises(DataError, match="only one class \\('cat'\\)") as error:
        build_cache(raw, tmp_path / "cache", image_size=SIZE, progress=False)
    assert_one_line_naming(error, raw)


def test_class_with_nothing_kept(tmp_path: Path) -> None:
    raw = make_raw(tmp_path, {"cat": 2})
    (raw / "dog").mkdir()
    (raw / "dog" / "a.jpg").write_bytes(b"garbage")
    cache_dir = tmp_path / "cache"
    with pytest.raises(DataError, match="'dog'") as error:
        build_cache(raw, cache_dir, image_size=SIZE, workers=1, progress=False)
    assert_one_line_naming(error, raw)
    assert [p for p in cache_dir.iterdir() if not p.name.endswith(".lock")] == []  # nothing half-built left


def test_cache_inside_raw_dir_is_refused(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    before = snapshot(raw)
    with pytest.raises(DataError, match="inside"):
        build_cache(raw, raw / "cache", image_size=SIZE, progress=False)
    assert snapshot(raw) == before


# ----------------------------------------------------------------------------- atomicity and concurrency


def cache_entries(cache_dir: Path) -> list[str]:
    """Names in cache_dir other than lock files."""
    return sorted(p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock"))


def test_leftover_tmp_folder_is_not_a_cache_and_is_cleaned(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    cache_dir = tmp_path / "cache"
    probe = build_cache(raw, tmp_path / "probe", image_size=SIZE, workers=1, progress=False)
    # A crashed build left a complete-looking tmp folder with wrong contents.
    leftover = cache_dir / f".{probe.path.name}.tmp-999999-deadbeef"
    leftover.mkdir(parents=True)
    for name in preprocess.CACHE_FILES:
        (leftover / name).write_bytes(b"junk")

    cache = build_cache(raw, cache_dir, image_size=SIZE, workers=1, progress=False)
    assert cache.path == cache_dir / probe.path.name and cache.built
    assert np.array_equal(cache.images, probe.images)
    assert cache_entries(cache_dir) == [probe.path.name]  # the dead build's folder is gone


def test_exception_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = make_raw(tmp_path)
    cache_dir = tmp_path / "cache"

    def disk_full(path: Path, data: dict) -> None:
        assert (path.parent / "images.npy").stat().st_size > 0  # images were already written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(preprocess, "_write_json", disk_full)
    with pytest.raises(OSError, match="No space"):
        build_cache(raw, cache_dir, image_size=SIZE, workers=1, progress=False)
    assert cache_entries(cache_dir) == []
    monkeypatch.undo()
    assert len(build_cache(raw, cache_dir, image_size=SIZE, workers=1, progress=False)) == 7


BUILD_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from alexnet_lab.data import preprocess

    raw, cache_dir, signal_dir, role, pause = sys.argv[1:6]
    real, calls = preprocess._decode_chunk, []

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        if role == "killed" and len(calls) == 3:
            Path(signal_dir, "mid-build").touch()  # the parent kills us now
        time.sleep(float(pause))
        return real(*args, **kwargs)

    preprocess._decode_chunk = counted
    Path(signal_dir, role).touch()  # start together: wait until every builder is ready
    while len(list(Path(signal_dir).glob("builder*"))) < 2 and role != "killed":
        time.sleep(0.01)
    cache = preprocess.build_cache(raw, cache_dir, image_size=64, workers=1, progress=False)
    print(json.dumps({"path": str(cache.path), "built": cache.built, "decoded": sum(calls), "n": len(cache)}))
    """
)


def start_builder(raw: Path, cache_dir: Path, signals: Path, role: str, pause: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", BUILD_SCRIPT, str(raw), str(cache_dir), str(signals), role, str(pause)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_killed_build_leaves_no_loadable_cache(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    cache_dir, signals = tmp_path / "cache", tmp_path / "signals"
    signals.mkdir()
    builder = start_builder(raw, cache_dir, signals, "killed", pause=0.05)
    deadline = time.monotonic() + 60
    while not (signals / "mid-build").exists():
        assert builder.poll() is None, builder.communicate()
        assert time.monotonic() < deadline, "the builder never got to the middle of its build"
        time.sleep(0.01)
    builder.send_signal(signal.SIGKILL)
    builder.wait()

    partial = [p for p in cache_dir.iterdir() if ".tmp-" in p.name]
    assert len(partial) == 1 and cache_entries(cache_dir) == [partial[0].name]  # only the hidden tmp folder
    with pytest.raises(DataError, match="incomplete"):
        load_cache(partial[0])
    cache = build_cache(raw, cache_dir, image_size=SIZE, workers=1, progress=False)  # not blocked by the dead
    assert cache.built and len(cache) == 7
    assert cache_entries(cache_dir) == [cache.path.name]
    assert np.array_equal(cache.images[0], load_image(raw / cache.files[0], SIZE))


def test_two_concurrent_builds_build_once(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    cache_dir, signals = tmp_path / "cache", tmp_path / "signals"
    signals.mkdir()
    builders = [start_builder(raw, cache_dir, signals, f"builder{i}", pause=0.1) for i in range(2)]
    results = []
    for builder in builders:
        out, err = builder.communicate(timeout=120)
        assert builder.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["path"] == results[1]["path"]
    assert sorted(result["built"] for result in results) == [False, True]
    assert sorted(result["decoded"] for result in results) == [0, 7]  # the second one decoded nothing
    assert cache_entries(cache_dir) == [Path(results[0]["path"]).name]
    cache = load_cache(Path(results[0]["path"]))
    reference = build_cache(raw, tmp_path / "reference", image_size=SIZE, workers=1, progress=False)
    assert np.array_equal(cache.images, reference.images) and cache.files == reference.files


def test_a_cache_finished_while_waiting_for_the_lock_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = make_raw(tmp_path)
    cache_dir = tmp_path / "cache"
    theirs = build_cache(raw, tmp_path / "theirs", image_size=SIZE, workers=1, progress=False)
    winner = cache_dir / theirs.path.name

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cache another process finished must not be built again")

    monkeypatch.setattr(preprocess, "_decode_chunk", no_decoding)
    monkeypatch.setattr(preprocess, "_sha256", no_decoding)
    cache_dir.mkdir()
    other = FileLock(cache_dir / f".{winner.name}.lock")  # another process is building this cache
    other.acquire()
    found: list[preprocess.Cache] = []
    waiting = threading.Thread(
        target=lambda: found.append(build_cache(raw, cache_dir, image_size=SIZE, workers=1, progress=False))
    )
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive()  # waits for the lock instead of building alongside
    shutil.copytree(theirs.path, winner)  # the other process's rename lands
    other.release()
    waiting.join(60)
    (cache,) = found
    assert cache.path == winner and not cache.built
    assert np.array_equal(cache.images, theirs.images)
    assert cache_entries(cache_dir) == [winner.name]  # no temporary folder of ours


def test_incomplete_final_folder_is_reported(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    cache = build_cache(raw, tmp_path / "cache", image_size=SIZE, workers=1, progress=False)
    (cache.path / "done").unlink()
    with pytest.raises(DataError, match="incomplete") as error:
        build_cache(raw, tmp_path / "cache", image_size=SIZE, workers=1, progress=False)
    assert_one_line_naming(error, cache.path)
    with pytest.raises(DataError, match="incomplete"):
        load_cache(cache.path)


def test_build_folder_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def fails(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"half written")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        build_folder(tmp_path / "target", fails, is_complete=lambda path: (path / "done").exists())
    assert cache_entries(tmp_path) == []  # no target, no temporary folder


def test_build_folder_second_caller_waits_and_reuses(tmp_path: Path) -> None:
    target = tmp_path / "target"
    building, finish = threading.Event(), threading.Event()
    second_built: list[Path] = []
    results: dict[str, bool] = {}

    def slow(tmp: Path) -> None:
        (tmp / "part").write_text("first")
        building.set()
        assert finish.wait(60)
        (tmp / "done").write_text("complete")

    def run(name: str, build) -> None:
        results[name] = build_folder(target, build, is_complete=lambda path: (path / "done").exists())

    first = threading.Thread(target=run, args=("first", slow))
    first.start()
    assert building.wait(60)
    second = threading.Thread(target=run, args=("second", second_built.append))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting for the lock
    (tmp,) = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert (tmp / "part").read_text() == "first"  # the running build is left alone
    finish.set()
    first.join(60)
    second.join(60)
    assert results == {"first": True, "second": False} and second_built == []
    assert cache_entries(tmp_path) == ["target"] and (target / "done").exists()


def test_build_folder_cleans_dead_builds_and_replaces_only_what_it_may(tmp_path: Path) -> None:
    target = tmp_path / "target"
    dead = [tmp_path / ".target.tmp-1-deadbeef", tmp_path / ".target.tmp-2-cafef00d-old"]  # a build, a parked old
    for folder in [*dead, target]:
        folder.mkdir()
        (folder / "file").write_text("old")

    def build(tmp: Path) -> None:
        (tmp / "file").write_text("new")

    def is_complete(path: Path) -> bool:
        return (path / "file").is_file() and (path / "file").read_text() == "new"

    with pytest.raises(FileExistsError, match="target"):  # not complete, and nobody said it may be replaced
        build_folder(target, build, is_complete)
    assert (target / "file").read_text() == "old" and all(folder.exists() for folder in dead)
    assert build_folder(target, build, is_complete, replace_old=lambda path: True)
    assert (target / "file").read_text() == "new" and cache_entries(tmp_path) == ["target"]
    assert not build_folder(target, build, is_complete, replace_old=lambda path: True)  # complete: left as it is
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_folder(empty, build, is_complete) and (empty / "file").read_text() == "new"


def test_images_npy_is_cut_to_the_kept_rows(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    (raw / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + bytes(100))  # a row reserved for it, not kept
    cache = build_cache(raw, tmp_path / "cache", image_size=SIZE, workers=1, progress=False)
    path = cache.path / "images.npy"
    with open(path, "rb") as handle:  # the header was written for 8 rows, then rewritten in place for 7
        assert np.lib.format.read_magic(handle) == (1, 0)
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
        data_start = handle.tell()
    assert (shape, fortran_order, dtype) == ((7, 1, SIZE, SIZE), False, np.uint8)
    assert path.stat().st_size == data_start + 7 * SIZE * SIZE  # no bytes of a reserved row left behind
    assert np.array_equal(np.load(path)[6], load_image(raw / cache.files[6], SIZE))


# ----------------------------------------------------------------------------- scripts/preprocess.py

ROOT = Path(__file__).resolve().parents[1]


def run_preprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "preprocess.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_preprocess_script_reports_and_writes_only_the_cache(tmp_path: Path) -> None:
    raw = make_raw(tmp_path, {"cat": 5, "dog": 4})
    placeholder = encoded(gradient(60, 40, 60), "JPEG")
    for i in range(5):
        (raw / ("cat" if i % 2 else "dog") / f"gone_{i}.jpg").write_bytes(placeholder)
    (raw / "dog" / "cut.jpg").write_bytes((raw / "cat" / "001.jpg").read_bytes()[:300])
    work = tmp_path / "work"
    work.mkdir()
    args = ["data=folder", f"data.raw_dir={raw}", "data.cache_dir=cache", "data.image_size=64", "data.progress=false"]
    result = run_preprocess(args, work)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "files seen: 16" in out and "kept: 9 (cat 5, dog 4)" in out and "discarded: 7" in out
    assert re.search(r"placeholder: repeated content +5\n", out) and re.search(r"unreadable: truncated +1\n", out)
    assert "5 files (cat 2, dog 3; repeated)" in out
    assert "built in" in out and str(work / "cache") in out
    assert "skipped 1 unreadable files (truncated 1), e.g. dog/cut.jpg" in result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["cache"]  # no outputs/, .hydra/ or log file

    again = run_preprocess(args, work)
    assert again.returncode == 0 and "reused, nothing decoded" in again.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["data=folder"], "error: data.raw_dir is not set"),
        (["data=folder", "data.raw_dir=/no/such/folder"], "error: data.raw_dir=/no/such/folder does not exist"),
    ],
)
def test_preprocess_script_bad_input_is_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    result = run_preprocess(args, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith(expected)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_training_reuses_the_cache_the_script_built(tmp_path: Path) -> None:
    overrides = tiny_overrides(tmp_path)
    data = [arg for arg in overrides if arg.startswith("data.")]
    built = run_preprocess(data, tmp_path)
    assert built.returncode == 0, built.stderr
    (cache,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    stamp = (cache / "done").stat().st_mtime_ns
    trained = run_train([*overrides, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [cache]
    assert (cache / "done").stat().st_mtime_ns == stamp
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["classes"] == ["cat", "dog"]
