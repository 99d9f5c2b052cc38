"""The embedded synthetic data set: layout, formats, determinism, folder safety, class signal."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexnet_lab.data import synthetic
from alexnet_lab.data.preprocess import DataError, build_cache
from alexnet_lab.data.synthetic import MARKER_NAME, ear_styles, ensure_from_config, ensure_synthetic, generate, spread

COUNTS = {"cat": 40, "dog": 30}  # enough for both formats in both classes with seed 0
SMALL = {"cat": 12, "dog": 8}
CLEAN = {"placeholders": 0, "broken": 0}  # photos only
# what the default run adds: 80 placeholder copies and 6 broken files, spread like the photos
DEBRIS = {name: spread(synthetic.DEFAULT_PLACEHOLDERS, COUNTS)[name] + spread(synthetic.DEFAULT_BROKEN, COUNTS)[name]
          for name in COUNTS}


def photos(folder: Path, n: int) -> list[Path]:
    """The first n files of a class folder (the photos; placeholders and broken files come after)."""
    return sorted(folder.iterdir())[:n]


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path (hidden marker included)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


def dead_pid() -> int:
    """The id of a process that has already exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic") / "raw", COUNTS, seed=0, workers=2, progress=False)


def test_layout_counts_and_marker(raw: Path) -> None:
    assert sorted(p.name for p in raw.iterdir()) == [MARKER_NAME, "cat", "dog"]
    for name, n in COUNTS.items():
        files = sorted((raw / name).iterdir())
        assert len(files) == n + DEBRIS[name]
        assert [f.stem for f in files] == [f"{name}_{i:05d}" for i in range(n + DEBRIS[name])]
    marker = json.loads((raw / MARKER_NAME).read_text())
    assert marker["counts"] == COUNTS and marker["seed"] == 0
    assert marker["placeholders"] == 80 and marker["broken"] == 6
    assert marker["generator_version"] == synthetic.GENERATOR_VERSION
    assert not [p for p in raw.parent.iterdir() if ".tmp-" in p.name]


def test_formats_sizes_and_aspect_do_not_depend_on_class(raw: Path) -> None:
    for name, n in COUNTS.items():
        suffixes = {f.suffix for f in photos(raw / name, n)}
        assert suffixes == {".jpg", ".png"}, name
        for f in photos(raw / name, n):
            with Image.open(f) as im:
                assert im.format == {".jpg": "JPEG", ".png": "PNG"}[f.suffix]
                assert im.mode == "RGB"
                w, h = im.size
                im.load()  # the whole file decodes
            assert 100 <= min(w, h) and max(w, h) <= 800, (f, im.size)
            assert max(w, h) / min(w, h) <= 3.2, (f, im.size)


def test_same_seed_is_byte_identical_whatever_the_workers(tmp_path: Path) -> None:
    one = generate(tmp_path / "one", SMALL, seed=7, workers=1, progress=False)
    two = generate(tmp_path / "two", SMALL, seed=7, workers=2, progress=False)
    assert digests(one) == digests(two)
    assert len(digests(one)) == sum(SMALL.values()) + 80 + 6 + 1


def test_placeholders_and_broken_files_are_added_on_top_of_the_same_photos(tmp_path: Path) -> None:
    clean = digests(generate(tmp_path / "clean", SMALL, seed=3, progress=False, **CLEAN))
    dirty = digests(generate(tmp_path / "dirty", SMALL, seed=3, progress=False, placeholders=9, broken=4))
    assert {path: digest for path, digest in dirty.items() if path in clean and path != MARKER_NAME} == {
        path: digest for path, digest in clean.items() if path != MARKER_NAME
    }  # the photos do not change
    extra = {path: digest for path, digest in dirty.items() if path not in clean}
    assert len(extra) == 13
    placeholder_files = [path for path, digest in extra.items() if list(extra.values()).count(digest) == 9]
    assert Counter(path.split("/")[0] for path in placeholder_files) == spread(9, SMALL) == {"cat": 5, "dog": 4}
    assert all(path.endswith(".jpg") for path in extra)  # named like the photos
    with Image.open(tmp_path / "dirty" / placeholder_files[0]) as image:
        assert image.size == synthetic.PLACEHOLDER_SIZE


def test_default_folder_exercises_the_discard_path(raw: Path, tmp_path: Path) -> None:
    cache = build_cache(raw, tmp_path / "cache", image_size=64, workers=2, progress=False)
    assert cache.meta["count"] == COUNTS  # exactly the photos are kept
    assert cache.meta["discarded_by_reason"] == {
        "placeholder: repeated content": 80,
        "unreadable: truncated": 2,  # broken kinds cycle: truncated, empty, html, garbage, truncated, empty
        "unreadable: empty file": 2,
        "unreadable: not an image": 2,
        "not data: hidden": 1,  # the generator's marker file
    }
    (group,) = cache.meta["placeholder_groups"]
    assert group["files"] == 80 and group["per_class"] == spread(80, COUNTS)
    assert all(Path(name).stem < f"{Path(name).parent}_{COUNTS[str(Path(name).parent)]:05d}" for name in cache.files)


def test_spread_is_proportional_and_complete() -> None:
    assert spread(80, {"cat": 1127, "dog": 791}) == {"cat": 47, "dog": 33}
    assert spread(6, {"cat": 1127, "dog": 791}) == {"cat": 4, "dog": 2}
    assert spread(5, {"a": 1, "b": 1, "c": 1}) == {"a": 2, "b": 2, "c": 1}
    assert spread(3, {"a": 0, "b": 0}) == {"a": 2, "b": 1}
    assert spread(0, {"a": 5}) == {"a": 0}


def test_other_seed_gives_other_images(tmp_path: Path) -> None:
    a = digests(generate(tmp_path / "a", SMALL, seed=1, workers=1, progress=False, **CLEAN))
    b = digests(generate(tmp_path / "b", SMALL, seed=2, workers=1, progress=False, **CLEAN))
    images_a = {h for p, h in a.items() if p != MARKER_NAME}
    images_b = {h for p, h in b.items() if p != MARKER_NAME}
    assert not images_a & images_b


def test_ensure_keeps_a_complete_folder_and_regenerates_a_stale_one(tmp_path: Path) -> None:
    raw = ensure_synthetic(tmp_path / "raw", SMALL, seed=0, progress=False)
    before = mtimes(raw)
    assert ensure_synthetic(tmp_path / "raw", dict(reversed(SMALL.items())), seed=0, progress=False) == raw
    assert mtimes(raw) == before

    bigger = {"cat": 5, "dog": 9, "fox": 2}
    ensure_synthetic(raw, bigger, seed=0, progress=False, **CLEAN)
    assert {d.name: len(list(d.iterdir())) for d in raw.iterdir() if d.is_dir()} == bigger
    assert json.loads((raw / MARKER_NAME).read_text())["counts"] == bigger
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no temp or old dirs left

    ensure_synthetic(raw, bigger, seed=1, progress=False, **CLEAN)  # a changed seed also regenerates
    assert json.loads((raw / MARKER_NAME).read_text())["seed"] == 1


def test_folder_without_marker_is_never_touched(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "cat").mkdir(parents=True)
    (raw / "cat" / "mine.jpg").write_bytes(b"user data")
    before = digests(raw)
    for make in (generate, ensure_synthetic):
        with pytest.raises(FileExistsError, match="raw"):
            make(raw, SMALL, seed=0, progress=False)
    assert digests(raw) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_empty_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    raw = ensure_synthetic(tmp_path / "raw", SMALL, seed=0, progress=False, **CLEAN)
    assert len(digests(raw)) == sum(SMALL.values()) + 1


def test_ensure_from_config_regenerates_when_the_debris_changes(tmp_path: Path) -> None:
    config = {"seed": 0, "counts": SMALL, "placeholders": 6, "broken": 2}
    raw = ensure_from_config(tmp_path / "raw", config, progress=False)
    assert len(digests(raw)) == 20 + 8 + 1
    before = mtimes(raw)
    assert ensure_from_config(raw, dict(config), progress=False) == raw and mtimes(raw) == before
    ensure_from_config(raw, {**config, "broken": 0}, progress=False)
    assert len(digests(raw)) == 20 + 6 + 1
    with pytest.raises(DataError, match="data.synthetic.colour"):
        ensure_from_config(raw, {**config, "colour": 1}, progress=False)
    with pytest.raises(DataError, match="data.synthetic.broken must be an int >= 0"):
        ensure_from_config(raw, {**config, "broken": -2}, progress=False)
    mine = tmp_path / "mine"
    (mine / "cat").mkdir(parents=True)
    (mine / "cat" / "photo.jpg").write_bytes(b"user data")
    with pytest.raises(DataError, match=f"data.raw_dir={mine}: .* will not touch") as error:
        ensure_from_config(mine, config, progress=False)
    assert "\n" not in str(error.value) and (mine / "cat" / "photo.jpg").read_bytes() == b"user data"


def test_stale_temp_dir_is_cleaned_and_a_live_one_left_alone(tmp_path: Path) -> None:
    stale = tmp_path / f".raw.tmp-{dead_pid()}"
    (stale / "cat").mkdir(parents=True)
    (stale / "cat" / "cat_00000.jpg").write_bytes(b"half written")
    live = tmp_path / f".raw.tmp-{os.getppid()}"  # another run still working
    live.mkdir()
    raw = ensure_synthetic(tmp_path / "raw", SMALL, seed=0, progress=False)
    assert not stale.exists()
    assert live.exists()
    assert digests(raw) == digests(generate(tmp_path / "ref", SMALL, seed=0, workers=1, progress=False))


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    for counts in ({}, {"cat": -1}, {".hidden": 3}, {"a/b": 3}, {"cat": 2.5}):
        with pytest.raises(ValueError):
            generate(tmp_path / "raw", counts, progress=False)
    with pytest.raises(ValueError):
        generate(tmp_path / "raw", SMALL, seed=-1, progress=False)
    for extra in ({"placeholders": -1}, {"broken": 1.5}, {"broken": True}):
        with pytest.raises(ValueError, match=f"data.synthetic.{next(iter(extra))}"):
            generate(tmp_path / "raw", SMALL, progress=False, **extra)
    assert not (tmp_path / "raw").exists()


def test_ear_styles() -> None:
    assert ear_styles(["dog", "cat"]) == {"cat": "pointed", "dog": "floppy"}
    three = ear_styles(["fox", "cat", "dog"])
    assert len(set(three.values())) == 3 and three["cat"] == "pointed"
    assert set(ear_styles(["a", "b", "c", "d", "e"]).values()) == set(synthetic.EAR_STYLES)


@pytest.mark.parametrize("seed", range(4))
def test_only_the_ears_differ_for_the_same_random_state(seed: int) -> None:
    """The label is in the pixels: same random state, other ears -> a small part of the picture changes."""
    pictures = {
        style: np.asarray(synthetic.render_image(np.random.default_rng(seed), style), dtype=np.int16)
        for style in ("pointed", "floppy")
    }
    again = np.asarray(synthetic.render_image(np.random.default_rng(seed), "pointed"), dtype=np.int16)
    pointed, floppy = pictures["pointed"], pictures["floppy"]
    assert np.array_equal(pointed, again)
    assert pointed.shape == floppy.shape
    changed = np.abs(pointed - floppy).max(axis=2) > 0
    assert 0.005 < changed.mean() < 0.4  # the ears: neither nothing nor the whole picture
