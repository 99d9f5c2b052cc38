"""The commands: Hydra glue, the config schema's registration, and the one error policy.

``python train.py``, ``eval.py``, ``predict.py`` and ``scripts/preprocess.py`` each call one
``*_command`` function here. The policy, in one place (:func:`error_policy` and
:func:`run_command`): bad input (a config value, a file, a checkpoint, a mistake in the
command line itself) is one ``error:`` line naming the key or file and what to do, exit 2;
in a multirun the job's run dir records it and the other jobs go on; any other failure is
recorded in the run dir with its traceback in the run's log, and re-raised.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from alexnet_lab import config
from alexnet_lab.errors import ConfigError, LabError, fail, one_line
from alexnet_lab.identity import finished_metrics, run_name

log = logging.getLogger(__name__)

CONF = str(Path(__file__).resolve().parents[1] / "conf")  # the config tree


def _register() -> None:
    """The schema (alexnet_lab/config.py) as Hydra configs the YAML files in conf/ extend."""
    store = ConfigStore.instance()
    store.store(group="schema/model", name="alexnet", node=config.ModelConfig)
    for name, schema in config.OPTIMIZERS.items():
        store.store(group="schema/optim", name=name, node=schema)
    store.store(group="schema/data", name="folder", node=config.DataConfig)
    synthetic = config.DataConfig(name="synthetic", raw_dir="data/synthetic/raw", synthetic=config.SyntheticConfig())
    store.store(group="schema/data", name="synthetic", node=synthetic)
    roots = {
        "lab": config.LabConfig,
        "eval": config.EvalConfig,
        "predict": config.PredictConfig,
        "preprocess": config.PreprocessConfig,
    }
    for name, schema in roots.items():
        store.store(name=f"{name}_schema", node=schema)  # conf/<command>.yaml extends it
    OmegaConf.register_new_resolver("run_name", lambda overrides: run_name(list(overrides)), replace=True)
    OmegaConf.register_new_resolver("config_subdir", _config_subdir, replace=True)


def _config_subdir(resume: bool) -> str | None:
    """Where Hydra saves a job's config: ``.hydra``, or nowhere (None) for a finished run that ``resume`` skips.

    So a resumed sweep leaves the files of its finished jobs as they were.
    """
    from hydra.core.hydra_config import HydraConfig

    if resume and finished_metrics(Path(HydraConfig.get().runtime.output_dir)) is not None:
        return None
    return ".hydra"


_register()


def load(cfg: DictConfig | ListConfig) -> Any:
    """The composed config as checked objects (``LabConfig`` holding ``ModelConfig``, ``DataConfig``, ...).

    Raises :class:`ConfigError` with one line naming the key: a required value left unset
    (``???``), an interpolation that fails, a value out of range.
    """
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} is not set: pass {err.full_key}=... on the command line") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{getattr(err, 'full_key', None) or 'config'}: {one_line(err)}") from None


def keep_freed_host_memory(trim_threshold_bytes: int = 256 * 2**20) -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the OS after every step.

    With glibc's default, adaptive thresholds a training step's activations on a CPU (24 MB for
    conv1 at downscale 4, 64 images of 256 px) are often mapped afresh from the OS and
    page-faulted in every step: 370k-580k faults an epoch, 1.2-1.3x slower at downscale 4
    (scripts/bench.py). Fixed thresholds keep blocks up to 32 MB (glibc's largest mmap
    threshold) on the heap and up to ``trim_threshold_bytes`` of freed memory with the
    process; peak memory is the same. Process-wide; returns False where the C library is not
    glibc (nothing changes there).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, trim_threshold_bytes))


# ----------------------------------------------------------------------------- the policy


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON via a temporary file, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def error_policy(run_dir: Path | None = None, overrides: Sequence[str] = (), multirun: bool = False) -> Iterator[None]:
    """Bad input: one ``error:`` line and exit 2; in a multirun, recorded and re-raised so the sweep goes on.

    With a ``run_dir``, every failure is recorded there (``metrics.json``: ``failed`` and the
    error's first line; the traceback in the run's log) before it is re-raised.
    """
    try:
        yield
    except LabError as err:
        message = one_line(err)
        if run_dir is not None:
            write_json(run_dir / "metrics.json", {"status": "failed", "error": message, "overrides": list(overrides)})
        if multirun:
            log.error("error: %s", message)
            raise
        fail(message)  # once, on stderr: Hydra's log handler writes to stdout
    except Exception as err:
        if run_dir is not None:
            message = f"{type(err).__name__}: {one_line(err)}"
            log.exception("run failed: %s", message)  # the traceback goes to the run's log file
            write_json(run_dir / "metrics.json", {"status": "failed", "error": message, "overrides": list(overrides)})
        raise


def _command_line_error(error: BaseException) -> str | None:
    """One line for an error in the command line itself (Hydra or OmegaConf rejected it), else None."""
    from hydra.errors import HydraException

    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException):  # an override of the wrong type, or an unknown key
        first = one_line(error)
        where = (
            first.removeprefix("Error merging override ")
            if first.startswith("Error merging override ")
            else (getattr(cause, "full_key", None) or first)
        )
        return f"{where}: {one_line(cause)}"
    if isinstance(error, (HydraException, OmegaConfBaseException)):
        return " ".join(str(error).split()).split(" Config search path:")[0]
    return None


def run_command(main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function under the policy, the command line's own mistakes included.

    A value of the wrong type, an unknown key or a bad override is one ``error:`` line and
    exit 2; a failed job of a multirun (recorded in its run dir) is one line and exit 1. With
    ``HYDRA_FULL_ERROR=1`` set by the user, Hydra's full report is shown instead.
    """
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"  # as Hydra reads it
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own report
    keep_freed_host_memory()
    # pytorch-lightning 2.6 on torch >= 2.10 warns about its own use of torch's pytree API on every run
    warnings.filterwarnings("ignore", message=".*LeafSpec.* is deprecated")
    try:
        main()
    except Exception as error:
        if wants_traceback:
            raise
        if isinstance(error, LabError):  # a job of a multirun had bad input; its run dir records it
            print(f"error: {one_line(error)}", file=sys.stderr)
            sys.exit(1)
        message = _command_line_error(error)
        if message is not None:
            fail(message)
        # a job of a multirun failed (recorded in its run dir), or something broke outside any run
        print(f"error: {type(error).__name__}: {one_line(error)} (the run's log has the traceback)", file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------- commands


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def _train(cfg: DictConfig) -> float:
    from alexnet_lab.train import train_job

    return train_job(cfg)


def train_command() -> None:
    """``python train.py [overrides]``, ``python train.py -m ...``."""
    run_command(_train)


@hydra.main(version_base="1.3", config_path=CONF, config_name="eval")
def _eval(cfg: DictConfig) -> None:
    from alexnet_lab.inference import eval_main

    with error_policy():
        eval_main(load(cfg))


def eval_command() -> None:
    """``python eval.py ckpt_path=RUN [split=val | data=folder data.raw_dir=DIR]``."""
    run_command(_eval)


_PREDICT_PATHS: list[str] = []  # predict.py's plain path arguments, taken off the command line before Hydra


@hydra.main(version_base="1.3", config_path=CONF, config_name="predict")
def _predict(cfg: DictConfig) -> None:
    from alexnet_lab.inference import predict_main

    with error_policy():
        predict_main(load(cfg), _PREDICT_PATHS)


def predict_command() -> None:
    """``python predict.py ckpt_path=RUN photo.jpg photos/ [out=preds.csv]``: paths need no ``key=``."""
    from alexnet_lab.inference import split_path_arguments

    sys.argv[1:], _PREDICT_PATHS[:] = split_path_arguments(sys.argv[1:])  # Hydra only takes key=value arguments
    run_command(_predict)


@hydra.main(version_base="1.3", config_path=CONF, config_name="preprocess")
def _preprocess(cfg: DictConfig) -> None:
    from alexnet_lab.data.datamodule import ImageFolderDataModule
    from alexnet_lab.data.preprocess import format_report

    started = time.perf_counter()
    with error_policy():
        datamodule = ImageFolderDataModule(load(cfg).data)
        datamodule.prepare_data()  # the very cache training would build or find
    assert datamodule.cache is not None
    print(format_report(datamodule.cache, seconds=time.perf_counter() - started))


def preprocess_command() -> None:
    """``python scripts/preprocess.py [data=folder data.raw_dir=DIR]``: build or find the cache, print a report."""
    # warnings (folders that are not classes, unreadable files) on stderr; the report on stdout
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    run_command(_preprocess)
