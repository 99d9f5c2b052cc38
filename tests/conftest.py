"""Shared fixtures: the real config composed in-process, tiny raw folders made in the test."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


def compose_config(*overrides: str):
    """The real config tree with overrides, as `python train.py` would see it (run_name fixed)."""
    from hydra import compose, initialize_config_dir

    import alexnet_lab.cli  # noqa: F401  (registers the config schema and the run_name resolver)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["run_name=test", *overrides])


def tiny_overrides(tmp_path: Path, *, epochs: int = 1, counts: str | None = None) -> list[str]:
    """Overrides for a seconds-long run on a small generated data set in tmp_path.

    The settings are conf/debug/tiny.yaml's (``debug=tiny``, their one home), as overrides so
    that a test can combine them with another debug preset; data and cache go to tmp_path.
    """
    tiny = yaml.safe_load((CONF_DIR / "debug" / "tiny.yaml").read_text())

    def flat(node: dict, prefix: str) -> list[str]:
        return [
            item
            for key, value in node.items()
            for item in (flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}={value}"])
        ]

    settings = [
        item
        for group in ("data", "model", "trainer")
        for item in flat(tiny.get(group, {}), f"{group}.")
        if not item.startswith(("data.raw_dir", "data.cache_dir", "trainer.max_epochs"))
        and not (counts and item.startswith("data.synthetic.counts"))
    ]
    return [
        *settings,
        f"data.raw_dir={tmp_path / 'raw'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        *([f"data.synthetic.counts={counts}"] if counts else []),
        "data.progress=false",
        "data.workers=1",
        f"trainer.max_epochs={epochs}",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
    ]


def small_data(raw: Path, tmp_path: Path, **settings):
    """The ``data`` config of a small raw folder: 64 px, one worker, quiet, the cache in tmp_path."""
    from alexnet_lab.config import DataConfig

    return DataConfig(
        raw_dir=str(raw),
        cache_dir=str(tmp_path / "cache"),
        **{"image_size": 64, "workers": 1, "progress": False, **settings},
    )


def run_train(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess, the way a user runs it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_in_process(args: list[str]) -> tuple[int, str, str]:
    """``python train.py ARGS`` through the real entry point in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, [str(ROOT / "train.py"), *args]
    code: Any = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            from alexnet_lab import cli

            cli.train_command()
    except SystemExit as stop:
        code = stop.code
    finally:
        sys.argv = argv
    return int(code or 0), out.getvalue(), err.getvalue()


def draw_image(path: Path, label: int, size: tuple[int, int], seed: int) -> None:
    """A small RGB picture whose class is a bright square (0) or disc (1) on noise."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 80, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    (draw.rectangle if label == 0 else draw.ellipse)(box, fill=(230, 230, 230))
    image.save(path)


@pytest.fixture
def make_raw(tmp_path: Path):
    """make_raw({"cat": 10, "dog": 6}) -> a raw folder in the ImageFolder layout."""

    def make(counts: dict[str, int], name: str = "raw") -> Path:
        raw = tmp_path / name
        for label, (cls, n) in enumerate(counts.items()):
            (raw / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = (64 + 7 * (i % 5), 64 + 11 * (i % 3))
                draw_image(raw / cls / f"{cls}_{i:03d}.png", label, size, seed=1000 * label + i)
        return raw

    return make
