"""Build (or find) the preprocessed cache of a raw folder and print a report.

    python scripts/preprocess.py                                   # the embedded data set
    python scripts/preprocess.py data=folder data.raw_dir=PATH     # your own download
    python scripts/preprocess.py data=folder data.raw_dir=PATH data.image_size=128 data.discard.min_copies=10

Training does the same on its first run (same `data` config, same cache); this shows what
was kept and discarded, and why, before any training. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from alexnet_lab.data.preprocess import Cache, DataError, build_cache, format_report
from alexnet_lab.data.synthetic import ensure_from_config


def preprocess(data: dict[str, Any]) -> Cache:
    """Generate the embedded data set if `data` asks for it, then build or reuse the cache."""
    if data.get("synthetic"):
        ensure_from_config(data["raw_dir"], data["synthetic"], progress=data.get("progress", True))
    return build_cache(
        data["raw_dir"],
        data["cache_dir"],
        image_size=data["image_size"],
        grayscale=data["grayscale"],
        workers=data.get("workers"),
        progress=data.get("progress", True),
        discard=data.get("discard"),
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="preprocess")
def main(cfg: DictConfig) -> None:
    started = time.perf_counter()
    # Warnings (folders that are not classes, unreadable files) on stderr; the report on stdout.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        data = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)
        cache = preprocess(data)  # type: ignore[arg-type]
    except MissingMandatoryValue as err:
        print(f"error: {err.full_key} is not set: pass {err.full_key}=PATH on the command line", file=sys.stderr)
        sys.exit(2)
    except (DataError, ValueError, FileExistsError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    print(format_report(cache, seconds=time.perf_counter() - started))


if __name__ == "__main__":
    main()
