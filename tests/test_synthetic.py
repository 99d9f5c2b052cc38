"""The embedded synthetic data set: layout, formats, determinism, folder safety, class signal."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexnet_lab.data import synthetic
from alexnet_lab.data.synthetic import MARKER_NAME, ear_styles, ensure_synthetic, generate

COUNTS = {"cat": 40, "dog": 30}  # enough for both formats in both classes with seed 0
SMALL = {"cat": 12, "dog": 8}


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
        assert len(files) == n
        assert [f.stem for f in files] == [f"{name}_{i:05d}" for i in range(n)]
    marker = json.loads((raw / MARKER_NAME).read_text())
    assert marker["counts"] == COUNTS and marker["seed"] == 0
    assert marker["generator_version"] == synthetic.GENERATOR_VERSION
    assert not [p for p in raw.parent.iterdir() if ".tmp-" in p.name]


def test_formats_sizes_and_aspect_do_not_depend_on_class(raw: Path) -> None:
    for name in COUNTS:
        suffixes = {f.suffix for f in (raw / name).iterdir()}
        assert suffixes == {".jpg", ".png"}, name
        for f in (raw / name).iterdir():
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
    assert len(digests(one)) == sum(SMALL.values()) + 1


def test_other_seed_gives_other_images(tmp_path: Path) -> None:
    a = digests(generate(tmp_path / "a", SMALL, seed=1, workers=1, progress=False))
    b = digests(generate(tmp_path / "b", SMALL, seed=2, workers=1, progress=False))
    images_a = {h for p, h in a.items() if p != MARKER_NAME}
    images_b = {h for p, h in b.items() if p != MARKER_NAME}
    assert not images_a & images_b


def test_ensure_keeps_a_complete_folder_and_regenerates_a_stale_one(tmp_path: Path) -> None:
    raw = ensure_synthetic(tmp_path / "raw", SMALL, seed=0, progress=False)
    before = mtimes(raw)
    assert ensure_synthetic(tmp_path / "raw", dict(reversed(SMALL.items())), seed=0, progress=False) == raw
    assert mtimes(raw) == before

    bigger = {"cat": 5, "dog": 9, "fox": 2}
    ensure_synthetic(raw, bigger, seed=0, progress=False)
    assert {d.name: len(list(d.iterdir())) for d in raw.iterdir() if d.is_dir()} == bigger
    assert json.loads((raw / MARKER_NAME).read_text())["counts"] == bigger
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no temp or old dirs left

    ensure_synthetic(raw, bigger, seed=1, progress=False)  # a changed seed also regenerates
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
    raw = ensure_synthetic(tmp_path / "raw", SMALL, seed=0, progress=False)
    assert len(digests(raw)) == sum(SMALL.values()) + 1


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
