"""The commands: Hydra glue, the config schema's registration, and the one error policy.

``python train.py``, ``eval.py``, ``predict.py`` and ``scripts/preprocess.py`` each call one
``*_command`` function here. The policy, in one place (:func:`error_policy` and
:func:`run_command`): bad input (a config value, a file, a checkpoint, a mistake in the
command line itself) is one ``error:`` line naming the key or file and what to do, exit 2;
in a multirun the job's run dir records it and the other jobs go on; any other failure is
recorded in the run dir with its traceback in the run's log, and re-raised.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import hydra
from hydra._internal.utils import get_args_parser
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from alexnet_lab import config
from alexnet_lab.config import load
from alexnet_lab.errors import LabError, defaults, fail, one_line
from alexnet_lab.identity import finished_metrics, home_of, record_failure, run_name

log = logging.getLogger(__name__)

CONF = str(Path(__file__).resolve().parent / "conf")  # the config tree ships inside the package


#: The config a command's YAML (conf/<name>.yaml) extends, and the dataclass :func:`load` checks it against.
COMMANDS: dict[str, type[Any]] = {
    "lab": config.LabConfig,
    "eval": config.EvalConfig,
    "predict": config.PredictConfig,
    "preprocess": config.PreprocessConfig,
}


def _register() -> None:
    """The schema's defaults (alexnet_lab/config.py) as the Hydra configs the YAML files in conf/ extend.

    Stored as plain data, not as typed nodes: Hydra then composes any value, and a wrong one
    fails in :func:`load`, inside the job, as one line naming the key, so that in a multirun
    the job records it and the other jobs still run.
    """
    store = ConfigStore.instance()  # not in groups: `--help` lists only what a user chooses from
    store.store(name="schema_model_alexnet", node=defaults(config.ModelConfig))
    for name, schema in config.OPTIMIZERS.items():
        store.store(name=f"schema_optim_{name}", node=defaults(schema))
    for name, schedule in config.SCHEDULERS.items():
        store.store(name=f"schema_scheduler_{name}", node=defaults(schedule))
    store.store(name="schema_paths", node=defaults(config.PathsConfig))
    store.store(name="schema_data_folder", node=defaults(config.DataConfig))
    synthetic = {
        "name": "synthetic",
        "raw_dir": config.SYNTHETIC_RAW_DIR,
        "synthetic": defaults(config.SyntheticConfig),
    }
    store.store(name="schema_data_synthetic", node={**defaults(config.DataConfig), **synthetic})
    for name, schema in COMMANDS.items():
        store.store(name=f"{name}_schema", node=defaults(schema))
    OmegaConf.register_new_resolver("run_name", lambda overrides: run_name(list(overrides)), replace=True)
    OmegaConf.register_new_resolver("config_subdir", _config_subdir, replace=True)
    OmegaConf.register_new_resolver("sweep_subdir", _sweep_subdir, replace=True)
    OmegaConf.register_new_resolver("wandb_offline", _wandb_offline, replace=True)


def _wandb_offline() -> bool:
    """Whether the wandb logger runs offline: unless the user is logged in (WANDB_API_KEY or ``wandb login``)."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None  # where `wandb login` keeps the key
    except (OSError, netrc.NetrcParseError):
        return True


def _config_subdir(resume: bool) -> str | None:
    """Where Hydra saves a job's config: ``.hydra``, or nowhere (None) for a finished run that ``resume`` skips.

    So a resumed sweep leaves the files of its finished jobs as they were.
    """
    if resume and finished_metrics(Path(HydraConfig.get().runtime.output_dir)) is not None:
        return None
    return ".hydra"


def _sweep_subdir(job: Any, name: str, *, _root_: DictConfig) -> str:
    """A sweep job's dir: ``<job>_<name>``; with ``resume=true``, the dir of the sweep dir that already holds this
    very run (config and seed), if one does.

    So a sweep rerun into its sweep dir with more seeds (``hydra.sweep.dir=... resume=true``)
    finds its finished runs whatever job numbers the longer sweep gives them, and never leaves
    two dirs of one run. Without resume a sweep's jobs keep their own dirs: a search may draw one
    setting twice, and a rerun that does not resume trains every job again anyway.
    """
    if not _root_.get("resume"):
        return f"{job}_{name}"
    config = OmegaConf.to_container(_root_, resolve=False)
    assert isinstance(config, dict)
    task = {str(key): value for key, value in config.items() if key != "hydra"}  # what Hydra saves as config.yaml
    choices = OmegaConf.to_container(_root_.hydra.runtime.choices)
    assert isinstance(choices, dict)
    return home_of(Path(str(_root_.hydra.sweep.dir)), task, choices) or f"{job}_{name}"


_register()


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


@contextlib.contextmanager
def error_policy(
    run_dir: Path | None = None, overrides: Sequence[str] = (), multirun: bool | None = None
) -> Iterator[None]:
    """Bad input: one ``error:`` line and exit 2; in a multirun, one line and re-raised so the sweep goes on.

    With a ``run_dir``, every failure is recorded there (``metrics.json``: ``failed`` and the
    error's first line; the traceback in the run's log file, never on the terminal) before it
    is re-raised. ``multirun``: whether this is a job of ``-m`` (None: as Hydra says).
    """
    if multirun is None:
        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        yield
    except Exception as err:
        bad_input = isinstance(err, LabError)
        message = one_line(err) if bad_input else f"{type(err).__name__}: {one_line(err)}"
        if run_dir is not None:  # the message and its traceback into the run's log file only
            record_failure(run_dir, err, message, overrides)
        if bad_input and not multirun:
            fail(message)  # once, on stderr: Hydra's log handler writes to stdout
        if run_dir is not None or multirun:
            print(f"error: {message}", file=sys.stderr)  # this job's one line; a sweep goes on
        raise


def run_command(main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function under the policy, the command line's own mistakes included.

    A value of the wrong type, an unknown key or a bad override is one ``error:`` line and
    exit 2; a failed job of a multirun (recorded in its run dir) is one line and exit 1. With
    ``HYDRA_FULL_ERROR=1`` set by the user, Hydra's full report is shown instead.
    """
    sys.argv[1:] = quote_paths(sys.argv[1:])
    user_setting = os.environ.get("HYDRA_FULL_ERROR")
    wants_traceback = user_setting == "1"  # as Hydra reads it
    keep_freed_host_memory()
    # a file name that is not UTF-8 (POSIX allows any bytes) is printed as it is on disk, not a crash
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="surrogateescape")
    # pytorch-lightning 2.6 on torch >= 2.10 warns about its own use of torch's pytree API on every run
    warnings.filterwarnings("ignore", message=".*LeafSpec.* is deprecated")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own report
    try:
        main()
    except Exception as error:
        if wants_traceback:
            raise
        if isinstance(error, LabError):  # a job of a multirun had bad input; its run dir records it
            fail(one_line(error), status=1)
        # a mistake in the command line itself: Hydra or OmegaConf rejected it
        cause = error.__cause__
        if isinstance(cause, LabError):  # a bad setting of something Hydra builds itself (a callback's)
            fail(one_line(cause))
        if isinstance(cause, OmegaConfBaseException):  # an override of the wrong type, or an unknown key
            first = one_line(error)
            where = first.removeprefix("Error merging override ")  # the override, as typed
            if where == first:  # not an override: the key OmegaConf names
                where = getattr(cause, "full_key", None) or first
            fail(f"{where}: {one_line(cause)}")
        if isinstance(error, (HydraException, OmegaConfBaseException)):
            fail(" ".join(str(error).split()).split(" Config search path:")[0])
        # a job of a multirun failed (recorded in its run dir), or something broke outside any run
        fail(f"{type(error).__name__}: {one_line(error)} (the run's log has the traceback)", status=1)
    finally:  # as the user had it: a later command in this process (a notebook, a test) reads theirs
        if user_setting is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_setting


# ----------------------------------------------------------------------------- command lines

#: What Hydra's override grammar takes in a value without quotes.
_BARE_VALUE = re.compile(r"[\w/.\-\\+:$%*@?|~ ]*")


def quote_paths(argv: Sequence[str]) -> list[str]:
    """``key=PATH`` -> ``key='PATH'`` where PATH exists and holds what Hydra cannot take bare (``=``, ``,``, ...).

    So every path the lab prints can be passed back as printed, unquoted: a sweep job's run dir
    is named after its overrides (``.../0_model.downscale=4,optim=sgd``), and ``eval.py
    ckpt_path=$RUN`` or ``hydra.run.dir=$RUN resume=true`` must work as typed. A value that
    names no existing file or folder is left alone: ``seed=0,1`` stays a sweep.
    """
    quoted = []
    for argument in argv:
        key, equals, value = argument.partition("=")
        if equals and not key.startswith("-") and not _BARE_VALUE.fullmatch(value) and os.path.exists(value):
            argument = key + "='" + value.replace("'", "\\'") + "'"
        quoted.append(argument)
    return quoted


def split_path_arguments(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split a command line into Hydra's arguments and plain paths (no ``=``, not an option).

    ``predict.py ckpt_path=run photos/*.jpg`` then works with the shell's glob. An argument
    naming a file or folder that exists is a path, even with ``=`` in its name (a run dir).
    """
    # Hydra's own options that take a value (--info an optional one: only a name it knows)
    options = {name: action for action in get_args_parser()._actions for name in action.option_strings}
    hydra_args: list[str] = []
    paths: list[str] = []
    previous = ""
    for argument in argv:
        option = options.get(previous)
        is_value = option is not None and (option.nargs is None or argument in (option.choices or ()))
        if is_value or argument.startswith("-") or ("=" in argument and not os.path.exists(argument)):
            hydra_args.append(argument)
        else:
            paths.append(argument)
        previous = "" if is_value else argument
    return hydra_args, paths


# ----------------------------------------------------------------------------- commands


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def _train(cfg: DictConfig) -> Any:
    job = HydraConfig.get()  # whatever happens, the job's run dir records it
    with error_policy(Path(job.runtime.output_dir), list(job.overrides.task)):
        if cfg.get("pack"):  # a job of hydra/sweeper=packed: the runs of one pack
            from alexnet_lab.packed import pack_job

            return pack_job(cfg)
        from alexnet_lab.train import train_job

        return train_job(cfg)


def prepare_job(cfg: DictConfig) -> Any:
    """A job of hydra/sweeper=packed before it trains: its config checked (one line if bad) and resolved.

    Hydra's ``run_job`` has made its run dir and ``.hydra/`` as for any job; a bad value is
    recorded there as for any job. Returns its :class:`~alexnet_lab.packing.PackJob`, or its
    metrics.json if ``resume=true`` finds it finished.
    """
    from alexnet_lab.packing import PackJob
    from alexnet_lab.train import check_optimizer, trainer_arguments

    job = HydraConfig.get()
    run_dir, overrides = Path(job.runtime.output_dir), list(job.overrides.task)
    with error_policy(run_dir, overrides):
        if (cfg.get("resume") or False) and (done := finished_metrics(run_dir)) is not None:
            log.info("%s already finished (%s): skipped", run_dir, done["status"])
            return done
        lab = load(cfg, config.LabConfig)
        check_optimizer(lab)
        trainer_arguments(lab.trainer)
        resolved = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
        return PackJob(int(job.job.num), str(run_dir), overrides, resolved)


def train_command() -> None:
    """``python train.py [overrides]``, ``python train.py -m ...``."""
    run_command(_train)


@hydra.main(version_base="1.3", config_path=CONF, config_name="eval")
def _eval(cfg: DictConfig) -> None:
    from alexnet_lab.inference import eval_main

    with error_policy():
        eval_main(load(cfg, config.EvalConfig))


def eval_command() -> None:
    """``python eval.py ckpt_path=RUN [split=val | data=folder data.raw_dir=DIR]``."""
    run_command(_eval)


def predict_command() -> None:
    """``python predict.py ckpt_path=RUN photo.jpg photos/ [out=preds.csv]``: paths need no ``key=``."""
    sys.argv[1:], paths = split_path_arguments(sys.argv[1:])  # Hydra only takes key=value arguments

    @hydra.main(version_base="1.3", config_path=CONF, config_name="predict")
    def _predict(cfg: DictConfig) -> None:
        from alexnet_lab.inference import predict_main

        with error_policy():
            predict_main(load(cfg, config.PredictConfig), paths)

    run_command(_predict)


@hydra.main(version_base="1.3", config_path=CONF, config_name="preprocess")
def _preprocess(cfg: DictConfig) -> None:
    from alexnet_lab.data.datamodule import ImageFolderDataModule
    from alexnet_lab.data.preprocess import format_report

    started = time.perf_counter()
    with error_policy():
        datamodule = ImageFolderDataModule(load(cfg, config.PreprocessConfig).data)
        datamodule.prepare_data()  # the very cache training would build or find
    assert datamodule.cache is not None
    print(format_report(datamodule.cache, seconds=time.perf_counter() - started))


def preprocess_command() -> None:
    """``python scripts/preprocess.py [data=folder data.raw_dir=DIR]``: build or find the cache, print a report."""
    # warnings (folders that are not classes, unreadable files) on stderr; the report on stdout
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    run_command(_preprocess)


def report_command(argv: list[str] | None = None) -> int:
    """``alexnet-lab-report SWEEP_OR_RUN_DIR``: (re)write a sweep's or a run's report and print it."""
    from alexnet_lab.effects import DEFAULT_DELTA, DEFAULT_METRIC
    from alexnet_lab.report import write_report

    parser = argparse.ArgumentParser(prog="alexnet-lab-report", description=report_command.__doc__)
    parser.add_argument("path", help="a sweep dir (outputs/multirun/...), a run dir, or a run's metrics.json")
    parser.add_argument("--no-html", action="store_true", help="skip report.html (about 5 MB: plotly.js is embedded)")
    parser.add_argument(
        "--metric", default=DEFAULT_METRIC, help="what the effect of each step is measured on (a metrics.json key)"
    )
    parser.add_argument(
        "--delta",
        type=float,
        default=DEFAULT_DELTA,
        help=f"the smallest effect worth telling from none, in the metric's units (default {DEFAULT_DELTA})",
    )
    args = parser.parse_args(argv)
    if not args.delta > 0:
        fail(f"--delta={args.delta}: must be a number > 0 (e.g. {DEFAULT_DELTA} of an accuracy)")
    try:
        written = write_report(args.path, html_report=not args.no_html, metric=args.metric, delta=args.delta)
    except (LabError, OSError) as err:  # no runs there, or a report file that cannot be written
        fail(one_line(err))
    print(written["report.md"].read_text(encoding="utf-8"))
    for path in written.values():
        print(f"wrote {path}")
    return 0
