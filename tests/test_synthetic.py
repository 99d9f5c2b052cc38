"""The embedded synthetic data set: layout, formats, determinism, folder safety, class signal."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from PIL import Image

from alexnet_lab.data import synthetic
from alexnet_lab.data.preprocess import build_cache
from alexnet_lab.data.synthetic import MARKER_NAME, SyntheticConfig, ear_styles, ensure_synthetic, generate, spread
from alexnet_lab.errors import ConfigError, DataError, from_mapping

COUNTS = {"cat": 40, "dog": 30}  # enough for both formats in both classes with seed 0
SMALL = {"cat": 12, "dog": 8}
CLEAN = {"placeholders": 0, "broken": 0}  # photos only
DEFAULTS = SyntheticConfig()
# what the default run adds: 80 placeholder copies and 6 broken files, spread like the photos
DEBRIS = {name: spread(DEFAULTS.placeholders, COUNTS)[name] + spread(DEFAULTS.broken, COUNTS)[name] for name in COUNTS}


def spec(counts: dict[str, int], seed: int = 0, **extra: int) -> SyntheticConfig:
    return SyntheticConfig(seed=seed, counts=counts, **extra)


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


def entries(folder: Path) -> list[str]:
    """Names in folder other than lock files (the lock file of a build stays, by design)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic") / "raw", spec(COUNTS), workers=2, progress=False)


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
    one = generate(tmp_path / "one", spec(SMALL, seed=7), workers=1, progress=False)
    two = generate(tmp_path / "two", spec(SMALL, seed=7), workers=2, progress=False)
    assert digests(one) == digests(two)
    assert len(digests(one)) == sum(SMALL.values()) + 80 + 6 + 1


def test_placeholders_and_broken_files_are_added_on_top_of_the_same_photos(tmp_path: Path) -> None:
    clean = digests(generate(tmp_path / "clean", spec(SMALL, seed=3, **CLEAN), progress=False))
    dirty = digests(generate(tmp_path / "dirty", spec(SMALL, seed=3, placeholders=9, broken=4), progress=False))
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
    a = digests(generate(tmp_path / "a", spec(SMALL, seed=1, **CLEAN), workers=1, progress=False))
    b = digests(generate(tmp_path / "b", spec(SMALL, seed=2, **CLEAN), workers=1, progress=False))
    images_a = {h for p, h in a.items() if p != MARKER_NAME}
    images_b = {h for p, h in b.items() if p != MARKER_NAME}
    assert not images_a & images_b


def test_ensure_keeps_a_complete_folder_and_regenerates_a_stale_one(tmp_path: Path) -> None:
    raw = ensure_synthetic(tmp_path / "raw", spec(SMALL), progress=False)
    before = mtimes(raw)
    assert ensure_synthetic(tmp_path / "raw", spec(dict(reversed(SMALL.items()))), progress=False) == raw
    assert mtimes(raw) == before

    bigger = {"cat": 5, "dog": 9, "fox": 2}
    ensure_synthetic(raw, spec(bigger, **CLEAN), progress=False)
    assert {d.name: len(list(d.iterdir())) for d in raw.iterdir() if d.is_dir()} == bigger
    assert json.loads((raw / MARKER_NAME).read_text())["counts"] == bigger
    assert entries(tmp_path) == ["raw"]  # no temp or old dirs left

    ensure_synthetic(raw, spec(bigger, seed=1, **CLEAN), progress=False)  # a changed seed also regenerates
    assert json.loads((raw / MARKER_NAME).read_text())["seed"] == 1


def test_folder_without_marker_is_never_touched(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "cat").mkdir(parents=True)
    (raw / "cat" / "mine.jpg").write_bytes(b"user data")
    before = digests(raw)
    with pytest.raises(FileExistsError, match="raw"):
        generate(raw, spec(SMALL), progress=False)
    with pytest.raises(DataError, match=f"data.raw_dir={raw}: .* will not touch"):
        ensure_synthetic(raw, spec(SMALL), progress=False)
    assert digests(raw) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_empty_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    raw = ensure_synthetic(tmp_path / "raw", spec(SMALL, **CLEAN), progress=False)
    assert len(digests(raw)) == sum(SMALL.values()) + 1


def test_config_block_regenerates_when_the_debris_changes(tmp_path: Path) -> None:
    config = {"seed": 0, "counts": SMALL, "placeholders": 6, "broken": 2}  # the config's data.synthetic

    def from_config(**changes: object) -> SyntheticConfig:
        return from_mapping(SyntheticConfig, {**config, **changes}, "data.synthetic")

    raw = ensure_synthetic(tmp_path / "raw", from_config(), progress=False)
    assert len(digests(raw)) == 20 + 8 + 1
    before = mtimes(raw)
    assert ensure_synthetic(raw, from_config(), progress=False) == raw and mtimes(raw) == before
    ensure_synthetic(raw, from_config(broken=0), progress=False)
    assert len(digests(raw)) == 20 + 6 + 1
    with pytest.raises(ConfigError, match="data.synthetic.colour"):
        from_config(colour=1)
    with pytest.raises(ConfigError, match="data.synthetic.broken=-2: must be an integer >= 0"):
        from_config(broken=-2)
    mine = tmp_path / "mine"
    (mine / "cat").mkdir(parents=True)
    (mine / "cat" / "photo.jpg").write_bytes(b"user data")
    with pytest.raises(DataError, match=f"data.raw_dir={mine}: .* will not touch") as error:
        ensure_synthetic(mine, from_config(), progress=False)
    assert "\n" not in str(error.value) and (mine / "cat" / "photo.jpg").read_bytes() == b"user data"


def test_dead_builds_are_cleaned_and_a_running_one_is_waited_for(tmp_path: Path) -> None:
    # Whoever holds the lock is the only builder, so these are dead builds' folders, whatever their
    # pid says (this one names a live process: an id reused since): a build and a parked old set.
    dead = [tmp_path / f".raw.tmp-{os.getppid()}", tmp_path / ".raw.tmp-12345-0badf00d-old"]
    for folder in dead:
        (folder / "cat").mkdir(parents=True)
        (folder / "cat" / "cat_00000.jpg").write_bytes(b"half written")
    running = FileLock(tmp_path / ".raw.lock")  # another run, building the same folder
    running.acquire()
    live = tmp_path / ".raw.tmp-1-00000000"
    live.mkdir()
    made: list[Path] = []

    def ensure() -> None:
        made.append(ensure_synthetic(tmp_path / "raw", spec(SMALL), progress=False))

    waiting = threading.Thread(target=ensure)
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive() and live.is_dir() and all(folder.exists() for folder in dead)  # waits, touches nothing
    live.rmdir()  # the other run fails, cleans up and lets go
    running.release()
    waiting.join(60)
    assert made == [tmp_path / "raw"] and entries(tmp_path) == ["raw"]  # the dead builds' folders are gone
    assert digests(made[0]) == digests(generate(tmp_path / "ref", spec(SMALL), workers=1, progress=False))


def test_bad_arguments_are_refused() -> None:
    for counts in ({}, {"cat": -1}, {".hidden": 3}, {"a/b": 3}, {"cat": 2.5}):
        with pytest.raises(ConfigError, match="data.synthetic.counts"):
            spec(counts)
    with pytest.raises(ConfigError, match="data.synthetic.seed"):
        spec(SMALL, seed=-1)
    for extra in ({"placeholders": -1}, {"broken": 1.5}, {"broken": True}):
        with pytest.raises(ConfigError, match=f"data.synthetic.{next(iter(extra))}"):
            spec(SMALL, **extra)


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
