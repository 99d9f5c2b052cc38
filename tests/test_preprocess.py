"""preprocess: raw folder -> uint8 cache (letterbox, decoding, manifest, reuse, errors, atomicity)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexnet_lab.data import preprocess
from alexnet_lab.data.preprocess import DataError, build_cache, letterbox, load_cache, load_image, scan_folder

SIZE = 64  # the least the AlexNet stem accepts


def gradient(width: int, height: int, seed: int) -> Image.Image:
    """A small RGB image that differs per seed (so arrays can be told apart)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    pixels = (base + 120 * x + 60 * y) % 256
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


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
    (raw / "README.txt").write_text("stray file at the top level: ignored")
    return raw


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime_ns of every file under folder."""
    return {
        path.relative_to(folder).as_posix(): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def read_manifest(cache_path: Path) -> list[dict[str, str]]:
    with open(cache_path / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


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
    rgba = np.zeros((50, 80, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, but the left half is fully transparent
    rgba[:, 40:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png", SIZE)
    assert out.shape == (1, SIZE, SIZE)
    assert out[0, 32, 5] < 10 and out[0, 32, 60] > 245  # transparent -> black background

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


def test_load_image_raises_on_garbage(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(OSError):
        load_image(path, SIZE)


# ----------------------------------------------------------------------------- scan_folder


def test_scan_folder_skips_hidden_and_non_images(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    (raw / ".hidden_class").mkdir()
    gradient(30, 30, 0).save(raw / ".hidden_class" / "x.jpg")
    gradient(30, 30, 0).save(raw / "cat" / ".hidden.jpg")
    (raw / "cat" / "notes.txt").write_text("not an image")
    classes, samples = scan_folder(raw)
    assert classes == ["cat", "dog"]
    names = [path.relative_to(raw).as_posix() for path, _ in samples]
    assert names == sorted(names)
    assert not any("hidden" in name or name.endswith(".txt") for name in names)
    assert [label for _, label in samples] == [0] * 4 + [1] * 3


# ----------------------------------------------------------------------------- build_cache


def test_build_cache_shapes_labels_and_manifest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = make_raw(tmp_path)
    (raw / "dog" / "corrupt.jpg").write_bytes(np.random.default_rng(1).integers(0, 256, 2000, np.uint8).tobytes())
    (raw / "cat" / "empty.png").write_bytes(b"")
    whole = (raw / "cat" / "001.jpg").read_bytes()
    (raw / "dog" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    before = snapshot(raw)

    with caplog.at_level(logging.INFO, logger=preprocess.__name__):
        cache = build_cache(raw, tmp_path / "cache", image_size=SIZE, workers=1, progress=False)

    assert snapshot(raw) == before  # raw files untouched (bytes and mtimes)
    assert cache.classes == ["cat", "dog"]
    assert cache.images.shape == (7, 1, SIZE, SIZE) and cache.images.dtype == np.uint8
    assert isinstance(cache.images, np.memmap) and not cache.images.flags.writeable
    assert cache.labels.dtype == np.int64 and cache.labels.tolist() == [0] * 4 + [1] * 3
    assert cache.discarded == 3
    assert all(Path(name).parts[0] == cache.classes[label] for name, label in zip(cache.files, cache.labels))
    # The on-disk array was cut to the kept rows: a plain load agrees.
    assert np.load(cache.path / "images.npy").shape == (7, 1, SIZE, SIZE)
    assert np.array_equal(cache.images[0], load_image(raw / cache.files[0], SIZE))

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("corrupt.jpg" in message for message in warnings)
    assert any("empty.png" in message for message in warnings)
    assert any("truncated.jpg" in message for message in warnings)
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("preprocessed")]
    assert len(summary) == 1 and "10 files seen, kept cat=4, dog=3, 3 discarded" in summary[0]
    assert str(cache.path) in summary[0]

    rows = {row["path"]: row for row in read_manifest(cache.path)}
    assert len(rows) == 10
    assert rows["dog/truncated.jpg"]["status"] == "discarded"
    assert rows["dog/corrupt.jpg"]["status"] == "discarded" and rows["dog/corrupt.jpg"]["index"] == ""
    assert rows["cat/empty.png"]["status"] == "discarded" and "0 bytes" in rows["cat/empty.png"]["reason"]
    kept = [row for row in rows.values() if row["status"] == "kept"]
    assert sorted(int(row["index"]) for row in kept) == list(range(7))

    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["count"] == {"cat": 4, "dog": 3} and meta["image_size"] == SIZE and meta["grayscale"] is True


def test_build_cache_rgb(tmp_path: Path) -> None:
    cache = build_cache(make_raw(tmp_path), tmp_path / "cache", image_size=SIZE, grayscale=False, progress=False, workers=1)
    assert cache.images.shape == (7, 3, SIZE, SIZE)


def test_reuse_does_not_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = make_raw(tmp_path)
    first = build_cache(raw, tmp_path / "cache", image_size=SIZE, workers=1, progress=False)
    stamp = (first.path / "images.npy").stat().st_mtime_ns

    def no_decoding(*args, **kwargs):
        raise AssertionError("an unchanged folder must not be decoded again")

    monkeypatch.setattr(preprocess, "_decode_chunk", no_decoding)
    start = time.perf_counter()
    second = build_cache(raw, tmp_path / "cache", image_size=SIZE, workers=1, progress=False)
    assert time.perf_counter() - start < 0.5
    assert second.path == first.path
    assert (second.path / "images.npy").stat().st_mtime_ns == stamp
    assert np.array_equal(second.images, first.images)


def test_changed_setting_or_file_gives_new_cache(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    cache_dir = tmp_path / "cache"
    base = build_cache(raw, cache_dir, image_size=SIZE, workers=1, progress=False).path
    paths = {base}
    paths.add(build_cache(raw, cache_dir, image_size=SIZE + 8, workers=1, progress=False).path)
    paths.add(build_cache(raw, cache_dir, image_size=SIZE, grayscale=False, workers=1, progress=False).path)
    touched = raw / "cat" / "001.jpg"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    paths.add(build_cache(raw, cache_dir, image_size=SIZE, workers=1, progress=False).path)
    gradient(50, 50, 99).save(raw / "dog" / "new.jpg")
    added = build_cache(raw, cache_dir, image_size=SIZE, workers=1, progress=False)
    paths.add(added.path)
    assert len(paths) == 5
    assert all(path.name.startswith("raw-") for path in paths)
    assert len(added) == 8


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


def test_class_with_no_decodable_file(tmp_path: Path) -> None:
    raw = make_raw(tmp_path, {"cat": 2})
    (raw / "dog").mkdir()
    (raw / "dog" / "a.jpg").write_bytes(b"garbage")
    cache_dir = tmp_path / "cache"
    with pytest.raises(DataError, match="'dog'") as error:
        build_cache(raw, cache_dir, image_size=SIZE, workers=1, progress=False)
    assert_one_line_naming(error, raw)
    assert list(cache_dir.iterdir()) == []  # nothing half-built left behind


def test_cache_inside_raw_dir_is_refused(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    before = snapshot(raw)
    with pytest.raises(DataError, match="inside"):
        build_cache(raw, raw / "cache", image_size=SIZE, progress=False)
    assert snapshot(raw) == before


# ----------------------------------------------------------------------------- atomicity


def test_leftover_tmp_folder_is_not_a_cache(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    cache_dir = tmp_path / "cache"
    probe = build_cache(raw, tmp_path / "probe", image_size=SIZE, workers=1, progress=False)
    # A crashed build left a complete-looking tmp folder with wrong contents.
    leftover = cache_dir / f".{probe.path.name}.tmp-999999-deadbeef"
    leftover.mkdir(parents=True)
    for name in preprocess.CACHE_FILES:
        (leftover / name).write_bytes(b"junk")

    cache = build_cache(raw, cache_dir, image_size=SIZE, workers=1, progress=False)
    assert cache.path == cache_dir / probe.path.name
    assert np.array_equal(cache.images, probe.images)
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([probe.path.name, leftover.name])


def test_lost_race_uses_the_winners_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = make_raw(tmp_path)
    cache_dir = tmp_path / "cache"
    theirs = build_cache(raw, tmp_path / "theirs", image_size=SIZE, workers=1, progress=False)
    winner = cache_dir / theirs.path.name
    real_build_into = preprocess._build_into

    def another_process_finishes_first(*args, **kwargs):
        summary = real_build_into(*args, **kwargs)
        shutil.copytree(theirs.path, winner)  # the winner's rename lands while we build
        return summary

    monkeypatch.setattr(preprocess, "_build_into", another_process_finishes_first)
    cache = build_cache(raw, cache_dir, image_size=SIZE, workers=1, progress=False)
    assert cache.path == winner
    assert np.array_equal(cache.images, theirs.images)
    assert [p.name for p in cache_dir.iterdir()] == [winner.name]  # our tmp folder is gone


def test_incomplete_final_folder_is_reported(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    cache = build_cache(raw, tmp_path / "cache", image_size=SIZE, workers=1, progress=False)
    (cache.path / "done").unlink()
    with pytest.raises(DataError, match="incomplete") as error:
        build_cache(raw, tmp_path / "cache", image_size=SIZE, workers=1, progress=False)
    assert_one_line_naming(error, cache.path)
    with pytest.raises(DataError, match="incomplete"):
        load_cache(cache.path)


@pytest.mark.parametrize("pad", [True, False])
def test_shrink_npy_keeps_leading_rows(tmp_path: Path, pad: bool) -> None:
    data = np.arange(5 * 2 * 3, dtype=np.uint8).reshape(5, 2, 3)
    path = tmp_path / "a.npy"
    np.save(path, data)
    if not pad:  # an unpadded header (older numpy): the in-place rewrite does not fit
        header = b"{'descr':'|u1','fortran_order':False,'shape':(5,2,3)}"  # 64 bytes in all
        header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
        path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data.tobytes())
        assert np.array_equal(np.load(path), data) and path.stat().st_size == 64 + data.nbytes
    preprocess._shrink_npy(path, 3)
    assert np.array_equal(np.load(path), data[:3])
