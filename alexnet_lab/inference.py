"""Use a trained checkpoint: load it safely, evaluate it, predict the class of new images.

``load_trained(ckpt)`` reads a checkpoint with ``torch.load(..., weights_only=True)`` (only
tensors and plain data are unpickled, so a downloaded checkpoint cannot run code), checks
that its weights fit the AlexNet its hyperparameters describe and builds the module from
them. Images are preprocessed as in training, at the image size and colour mode stored
in the checkpoint. Everything runs through Lightning, with the module's own metric code:
``evaluate_split`` and ``evaluate_folder`` are ``Trainer.test`` (or ``validate``), ``predict``
is ``Trainer.predict``; ``eval_main`` and ``predict_main`` are what ``eval.py`` and
``predict.py`` run.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import logging
import math
import os
import pickle
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from alexnet_lab.config import DataConfig, DiscardRules, EvalConfig, PredictConfig, load
from alexnet_lab.data import preprocess
from alexnet_lab.data.datamodule import CacheBatches, ImageFolderDataModule
from alexnet_lab.errors import CheckpointError, ConfigError, DataError, one_line
from alexnet_lab.identity import write_json
from alexnet_lab.metrics import confusion_summary
from alexnet_lab.module import AlexNetClassifier

log = logging.getLogger(__name__)

BEST_IN_RUN_DIR = Path("checkpoints") / "best.ckpt"  # what a run dir given as ckpt_path stands for
RUN_CONFIG = Path(".hydra") / "config.yaml"  # the resolved config Hydra stores in every run dir


def _describe(error: BaseException) -> str:
    """``Type: message`` in one short line (a file's reason, or the cause inside a CheckpointError)."""
    text = one_line(error)
    if len(text) > 150:
        text = text.split(". ")[0]  # torch's messages go on for sentences
    return f"{type(error).__name__}: {text[:200]}"


# ----------------------------------------------------------------------------- loading


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint file ``path`` names: itself, or ``checkpoints/best.ckpt`` of a run dir."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / BEST_IN_RUN_DIR, path / "best.ckpt"):
            if candidate.is_file():
                return candidate
        found = sorted(p.relative_to(path).as_posix() for p in (*path.glob("*.ckpt"), *path.glob("*/*.ckpt")))
        hint = f"it has {', '.join(found)}: pass one of them" if found else "is it a run dir of train.py?"
        raise CheckpointError(f"ckpt_path={path}: no {BEST_IN_RUN_DIR.as_posix()} in this folder ({hint})")
    if not path.exists():
        raise CheckpointError(f"ckpt_path={path} does not exist: pass a .ckpt file or a run dir (outputs/runs/...)")
    return path


def _read_checkpoint(ckpt: str | Path) -> tuple[Path, dict[str, Any]]:
    """The file ``ckpt`` names and ``torch.load(weights_only=True)`` of it, every failure one CheckpointError line."""
    path = find_checkpoint(ckpt)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            raise CheckpointError(
                f"{path} refers to {refused.group(1)}, which is not plain data: refused, since loading it could "
                "run code (weights_only); use a checkpoint written by alexnet_lab's train.py"
            ) from None
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (cannot unpickle it): pass a .ckpt from a run dir"
        ) from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path} ({_describe(err)}): check the path and its permissions") from None
    except Exception as err:  # truncated zip (RuntimeError), empty file (EOFError), garbage (KeyError, ValueError)
        raise CheckpointError(
            f"{path} is corrupted or not a checkpoint ({_describe(err)}): copy it again or use another checkpoint"
        ) from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= set(checkpoint):
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint of alexnet_lab (no state_dict and hyper_parameters in it): "
            "pass a .ckpt written by train.py"
        )
    return path, checkpoint


def _build_module(path: Path, checkpoint: dict[str, Any]) -> AlexNetClassifier:
    """The module described by the checkpoint's hyperparameters, with its weights loaded (strict)."""
    hparams = checkpoint["hyper_parameters"]
    try:
        model, classes = dict(hparams["model"]), list(hparams["classes"])
        module = AlexNetClassifier(
            model=model, optim=dict(hparams["optim"]), classes=classes, in_channels=int(hparams.get("in_channels", 1))
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: its hyperparameters do not describe an alexnet_lab model ({_describe(err)}): "
            "pass a .ckpt written by train.py"
        ) from None
    problem = _weights_problem(module, checkpoint["state_dict"])
    if problem is not None:
        described = ", ".join(f"{key}={value}" for key, value in model.items())
        raise CheckpointError(
            f"{path}: its weights do not fit the AlexNet its hyperparameters describe ({described}, "
            f"{module.net.config.in_channels} channel(s), {len(classes)} classes): {problem[:200]}; "
            "was it saved by another architecture or edited?"
        )
    return module


def _weights_problem(module: AlexNetClassifier, state_dict: Mapping[str, Any]) -> str | None:
    """Load ``state_dict`` into ``module`` (strict); None if every weight fits, else torch's first complaint."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError) as err:  # torch lists every missing, unexpected or misshapen weight
        return ([line.strip() for line in str(err).splitlines()[1:]] or [str(err)])[0]
    return None


def load_weights(module: AlexNetClassifier, ckpt: str | Path) -> Path:
    """Copy a checkpoint's weights into ``module`` (train.py's ``ckpt_path=``); returns the file read.

    The checkpoint must hold the same net for the same classes: a mismatch is one line naming
    what differs, so that a fine-tuning run never starts from half-loaded weights.
    """
    path, checkpoint = _read_checkpoint(ckpt)
    trained = checkpoint["hyper_parameters"]
    classes = list(trained.get("classes") or [])
    if classes != module.classes:
        raise CheckpointError(f"ckpt_path={path}: trained on classes {classes}, this data has {module.classes}")
    problem = _weights_problem(module, checkpoint["state_dict"])
    if problem is not None:
        described = ", ".join(f"model.{key}={value}" for key, value in dict(trained.get("model") or {}).items())
        raise CheckpointError(
            f"ckpt_path={path}: its weights do not fit this model ({problem[:150]}); it was trained with {described}"
        )
    return path


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's info lines (GPU available, tips) and its worker-count hint off: the commands print results."""
    logger = logging.getLogger("pytorch_lightning")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # batches are sliced from a memory-mapped cache, and predict's files are decoded in this
            # process, which keeps each file's error (ImageFiles.errors)
            warnings.filterwarnings("ignore", message=".*does not have many workers")
            yield
    finally:
        logger.setLevel(level)


@dataclass
class TrainedModel:
    """A checkpoint ready for inference: the module, how to preprocess images for it, and where to run it."""

    module: AlexNetClassifier
    checkpoint: Path  # the .ckpt file
    run_dir: Path | None  # the run dir it came from, when it has one (with .hydra/config.yaml)
    run_config: DictConfig | None  # that run's resolved config
    image_size: int  # px: images are letterboxed to image_size x image_size
    grayscale: bool  # 1 channel if True, else RGB
    device: str  # auto, cpu, cuda or cuda:N (Lightning's accelerator, and the GPU's index)
    precision: str | None  # a Lightning precision, as the run trained (or as asked); None: Lightning's default
    data_fingerprint: str | None = None  # fingerprint of the data cache it was trained on, if recorded

    @property
    def classes(self) -> list[str]:
        return self.module.classes

    def trainer(self) -> pl.Trainer:
        """A fresh Trainer for test/predict only: no logger, checkpoints, summary or progress bar."""
        accelerator, _, index = self.device.partition(":")
        with _quiet():
            return pl.Trainer(
                accelerator=accelerator,
                devices=[int(index)] if index.isdigit() else index or 1,
                precision=self.precision,  # type: ignore[arg-type]  # a str Lightning checks itself (its Literal type is private)
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=False,
            )


def _preprocessing(
    path: Path, checkpoint: dict[str, Any], run_config: DictConfig | None, image_size: int | None, in_channels: int
) -> tuple[int, bool]:
    """(image size, grayscale) the checkpoint was trained with: stored in it, else in its run dir's config."""
    stored = checkpoint.get("preprocessing")
    data = run_config.get("data") if run_config is not None else None
    if isinstance(stored, dict) and "image_size" in stored:
        if stored.get("preprocess_version", preprocess.PREPROCESS_VERSION) != preprocess.PREPROCESS_VERSION:
            log.warning("%s was preprocessed by another version of alexnet_lab; results may differ", path)
        trained_size, grayscale = int(stored["image_size"]), bool(stored["grayscale"])
    elif isinstance(data, DictConfig) and "image_size" in data:
        trained_size, grayscale = int(data.image_size), bool(data.grayscale)
    elif image_size is not None:
        trained_size, grayscale = image_size, in_channels == 1
    else:
        raise CheckpointError(
            f"{path} records no image size and has no run dir config beside it: pass image_size=N, "
            "the data.image_size it was trained with"
        )
    if (1 if grayscale else 3) != in_channels:
        raise CheckpointError(f"{path}: grayscale={grayscale} does not fit its {in_channels}-channel first layer")
    if image_size is not None and image_size != trained_size:
        log.warning("using %d px images; %s was trained at %d px", image_size, path, trained_size)
    return image_size or trained_size, grayscale


def load_trained(
    ckpt: str | Path, *, device: str = "auto", image_size: int | None = None, precision: str | None = None
) -> TrainedModel:
    """Load a checkpoint (a .ckpt file or a run dir) for inference; raises :class:`CheckpointError`.

    ``image_size`` and ``precision`` default to what the run used (stored in the checkpoint,
    else in the run dir's config); an impossible ``device`` or ``precision`` is a ConfigError.
    """
    path, checkpoint = _read_checkpoint(ckpt)
    module = _build_module(path, checkpoint)
    # the run dir it belongs to (<run>/checkpoints/x.ckpt or <run>/x.ckpt), if it has a config
    run_dir = next((folder for folder in (path.parent.parent, path.parent) if (folder / RUN_CONFIG).is_file()), None)
    run_config: DictConfig | None = None
    if run_dir is not None:
        try:
            loaded = OmegaConf.load(run_dir / RUN_CONFIG)
        except Exception as err:  # yaml or OmegaConf errors, whatever their class
            raise CheckpointError(
                f"{run_dir / RUN_CONFIG} is unreadable ({_describe(err)}): repair or remove it"
            ) from None
        run_config = loaded if isinstance(loaded, DictConfig) else None
    size, grayscale = _preprocessing(path, checkpoint, run_config, image_size, module.net.config.in_channels)
    if precision is None and run_config is not None:
        precision = OmegaConf.select(run_config, "trainer.precision")  # as trained; else Lightning's default
    stored = checkpoint.get("preprocessing")
    fingerprint = stored.get("data_fingerprint") if isinstance(stored, dict) else None
    fingerprint = fingerprint if isinstance(fingerprint, str) else None
    model = TrainedModel(module.eval(), path, run_dir, run_config, size, grayscale, str(device), precision, fingerprint)
    try:  # an impossible device or precision fails here, in one line
        model.precision = model.trainer().precision  # as Lightning took it (16-mixed is bf16-mixed on a CPU)
    except Exception as err:  # Lightning's MisconfigurationException, ValueError or TypeError
        if model.device.partition(":")[0] in ("cuda", "gpu") and not torch.cuda.is_available():
            raise ConfigError(f"device={device}: no GPU here; use device=auto or cpu") from None
        key, value = ("precision", precision) if "precision" in str(err).lower() else ("device", device)
        raise ConfigError(f"{key}={value}: {one_line(err)}") from None
    return model


def _as_model(ckpt: str | Path | TrainedModel, **options: Any) -> TrainedModel:
    return ckpt if isinstance(ckpt, TrainedModel) else load_trained(ckpt, **options)


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """Results of a checkpoint on a set of labelled images."""

    checkpoint: str
    data: str  # what was evaluated, in words
    classes: list[str]  # the checkpoint's classes; index i of the confusion matrix is classes[i]
    confusion: np.ndarray  # int64 (K, K): rows true class, columns predicted class
    loss: float  # mean cross-entropy, nats
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) not decodable
    note: str = ""  # a caveat, e.g. that the data changed since training
    # read off ``confusion`` once, by the module's own definitions (metrics.confusion_summary)
    images: int = field(init=False)
    acc: float = field(init=False)
    balanced_acc: float = field(init=False)  # mean recall over the classes present in the data
    per_class_recall: dict[str, float | None] = field(init=False)  # None for a class with no image in the data
    pred_frac: dict[str, float] = field(init=False)  # fraction of the predictions that go to each class

    def __post_init__(self) -> None:
        values = confusion_summary(torch.from_numpy(self.confusion), self.classes)
        summary = {name: float(value) for name, value in values.items()}
        present = self.confusion.sum(axis=1) > 0
        self.images = int(self.confusion.sum())
        self.acc = summary["acc"]
        self.balanced_acc = summary["balanced_acc"]
        self.per_class_recall = {
            name: summary[f"recall/{name}"] if present[i] else None for i, name in enumerate(self.classes)
        }
        self.pred_frac = {name: summary[f"pred_frac/{name}"] for name in self.classes}

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain data for JSON (NaN-free: an absent class has recall null), the long lists last."""
        lists = ("confusion", "skipped")  # written last, as plain lists
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in lists}
        return {
            **plain,
            "confusion_matrix": self.confusion.tolist(),
            "confusion_matrix_axes": "rows: true class, columns: predicted class, in the order of classes",
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
        }

    def report(self) -> str:
        """The results as a few lines of text for the terminal."""
        width = max(8, *(len(name) for name in self.classes))
        recalls = "  ".join(
            f"{name} {'-' if value is None else f'{value:.3f}'}" for name, value in self.per_class_recall.items()
        )
        lines = [
            f"checkpoint: {self.checkpoint}",
            f"data:       {self.data}: {self.images} images"
            + (f", {len(self.skipped)} skipped" if self.skipped else ""),
            f"accuracy {self.acc:.4f}   balanced accuracy {self.balanced_acc:.4f}   loss {self.loss:.4f}",
            f"recall per class: {recalls}",
            "confusion matrix (rows: true, columns: predicted):",
            " " * (width + 2) + "".join(f"{name:>{width + 2}}" for name in self.classes),
        ]
        for name, row in zip(self.classes, self.confusion, strict=True):
            lines.append(f"  {name:<{width}}" + "".join(f"{int(count):>{width + 2}}" for count in row))
        if self.skipped:
            kinds = Counter(reason.split(" (")[0] for _, reason in self.skipped)
            listed = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
            lines.append(f"skipped {len(self.skipped)} files ({listed}); each with its reason in the JSON")
        if self.note:
            lines.append(f"note: {self.note}")
        return "\n".join(lines)


def _run_stage(model: TrainedModel, stage: str, **data: Any) -> tuple[np.ndarray, float]:
    """``Trainer.test`` (stage "test") or ``Trainer.validate`` ("val"): the module's confusion matrix and mean loss."""
    trainer = model.trainer()
    with _quiet():
        (trainer.test if stage == "test" else trainer.validate)(model.module, verbose=False, **data)
    confusion = model.module.last_confusion[stage].cpu().numpy()  # (K, K) int64, rows true class
    return confusion, float(trainer.callback_metrics[f"{stage}/loss"])


def run_data_config(model: TrainedModel, run_config: DictConfig | None = None) -> DataConfig:
    """The run's ``data`` config (from its run dir's .hydra/config.yaml) at the checkpoint's image size and colour."""
    source = run_config if run_config is not None else model.run_config
    if source is None or "data" not in source:
        raise CheckpointError(
            f"{model.checkpoint} has no run dir with {RUN_CONFIG.as_posix()} to find its data: "
            "evaluate it on a folder with data=folder data.raw_dir=DIR"
        )
    try:  # only the data block is resolved (its ${paths.data_dir}): the rest (run_name) needs Hydra's resolvers
        data = OmegaConf.to_container(source.data, resolve=True)
        assert isinstance(data, dict)
        data.update(image_size=model.image_size, grayscale=model.grayscale)
    except OmegaConfBaseException as err:
        raise ConfigError(f"the data block of {model.checkpoint}'s run config does not fit: {one_line(err)}") from None
    run_cwd = None  # where the run was started (Hydra's runtime.cwd in its .hydra/hydra.yaml), if recorded
    if run_config is None and model.run_dir is not None:
        with contextlib.suppress(OSError, OmegaConfBaseException):
            run_cwd = OmegaConf.select(OmegaConf.load(model.run_dir / ".hydra" / "hydra.yaml"), "hydra.runtime.cwd")
    for key in ("raw_dir", "cache_dir"):  # relative to where training ran, not to where this runs
        if isinstance(run_cwd, str) and isinstance(data.get(key), str):
            data[key] = str(Path(run_cwd) / data[key])
    return load(OmegaConf.create(data), DataConfig, "data")


def evaluate_split(
    ckpt: str | Path | TrainedModel, split: str = "test", run_config: DictConfig | None = None, **options: Any
) -> Evaluation:
    """Evaluate on a split ("test" or "val") of the run's own data, rebuilt as in training (same cache, same split).

    ``run_config`` defaults to the run dir's ``.hydra/config.yaml``. With an unchanged data
    folder the numbers equal the run's ``metrics.json`` (test split, best checkpoint).
    """
    model = _as_model(ckpt, **options)
    datamodule = ImageFolderDataModule(run_data_config(model, run_config))  # the very datamodule training built
    datamodule.prepare_data()
    if datamodule.classes != model.classes:
        raise DataError(
            f"data.raw_dir={datamodule.raw_dir} now has classes {datamodule.classes}, but {model.checkpoint} was "
            f"trained on {model.classes}: the data changed since training; evaluate with data=folder instead"
        )
    note = ""
    fingerprint = datamodule.cache.fingerprint if datamodule.cache is not None else None
    if model.data_fingerprint and fingerprint != model.data_fingerprint:
        note = (
            f"the files in {datamodule.raw_dir} (or the preprocessing) changed since training, so this {split} "
            "split is not the one the run was tested on"
        )
        log.warning("%s", note)
    confusion, loss = _run_stage(model, split, datamodule=datamodule)
    return Evaluation(
        str(model.checkpoint), f"{split} split of {datamodule.raw_dir}", model.classes, confusion, loss, note=note
    )


def evaluate_folder(
    ckpt: str | Path | TrainedModel,
    raw_dir: str | Path,
    *,
    cache_dir: str | Path = DataConfig.cache_dir,
    discard: Mapping[str, Any] | DiscardRules | None = None,
    workers: int | None = DataConfig.workers,
    progress: bool = False,
    batch_size: int = EvalConfig.batch_size,
    **options: Any,
) -> Evaluation:
    """Evaluate on every image of a folder in the ImageFolder layout (``raw/<class>/*.jpg``).

    The folder goes through training's own preprocessing (``build_cache`` into ``cache_dir``,
    at the checkpoint's image size and colour mode, with the ``discard`` rules of
    ``data.discard``), so placeholders and unreadable files are left out exactly as in
    training; each is listed in ``skipped`` with its reason. Class folders are matched to the
    checkpoint's classes by name; a class it does not know raises :class:`DataError`.
    """
    model = _as_model(ckpt, **options)
    raw_dir = Path(raw_dir).expanduser()
    # the cache's own scan, before any decoding: a wrong folder should fail in a second, not after the cache is built
    unknown = [name for name in preprocess.scan_folder(raw_dir).classes if name not in model.classes]
    if unknown:
        raise DataError(
            f"data.raw_dir={raw_dir} has class folder {unknown[0]!r}, which {model.checkpoint} does not know "
            f"(its classes: {', '.join(model.classes)}): rename or remove that folder"
        )
    cache = preprocess.build_cache(
        raw_dir, cache_dir, model.image_size, model.grayscale, workers=workers, progress=progress, discard=discard
    )
    to_checkpoint = np.array([model.classes.index(name) for name in cache.classes])  # cache label -> ours
    images = CacheBatches(dataclasses.replace(cache, labels=to_checkpoint[cache.labels]))
    # uint8 (B, C, S, S) batches in cache order, read from the memory-mapped cache a batch at a time
    batches = DataLoader(images, sampler=BatchSampler(SequentialSampler(images), batch_size, False), batch_size=None)
    confusion, loss = _run_stage(model, "test", dataloaders=batches)
    skipped = [(str(raw_dir / path), reason) for path, reason in cache.discarded]  # every file left out, and why
    return Evaluation(str(model.checkpoint), str(raw_dir), model.classes, confusion, loss, skipped=skipped)


def evaluate(
    ckpt: str | Path | TrainedModel, raw_dir: str | Path | None = None, *, split: str = "test", **options: Any
) -> Evaluation:
    """``evaluate_folder`` when ``raw_dir`` is given, else ``evaluate_split`` on the run's own data."""
    if raw_dir is not None:
        return evaluate_folder(ckpt, raw_dir, **options)
    return evaluate_split(ckpt, split, **options)


# ----------------------------------------------------------------------------- prediction


@dataclass(frozen=True)
class Prediction:
    """The class a checkpoint predicts for one file, or why the file could not be read."""

    path: str
    label: str | None  # the predicted class; None when the file was skipped
    probability: float  # softmax probability of ``label``; nan when skipped
    probabilities: dict[str, float]  # every class's probability; empty when skipped
    error: str = ""  # why the file was skipped

    @property
    def ok(self) -> bool:
        return self.label is not None


def image_paths(inputs: str | Path | Iterable[str | Path]) -> list[tuple[Path, str]]:
    """Files to predict, in order: (path, "") per image, (path, reason) for an input that is not there.

    A folder stands for its image files (recursively, following links; hidden files and folders
    skipped); a file is taken whatever its extension (it is reported if it does not decode).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    found: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            names = glob.glob("**", root_dir=path, recursive=True)  # "**" skips hidden names
            images = [name for name in names if os.path.splitext(name)[1].lower() in preprocess.IMAGE_EXTENSIONS]
            files = sorted(path / name for name in images if not (path / name).is_dir())
            found += [(file, "") for file in files] or [(path, "no image files in this folder")]
        else:
            found.append((path, "" if path.exists() else "no such file or folder"))
    return found


class ImageFiles(Dataset[torch.Tensor]):
    """Image files decoded as training decodes them: uint8 (C, S, S) each.

    A file that cannot be decoded gives a black image and its reason in ``errors``; read in
    this process (num_workers=0), so ``errors`` is filled as the loader goes.
    """

    def __init__(self, paths: Sequence[Path], image_size: int, grayscale: bool) -> None:
        self.paths, self.image_size, self.grayscale = list(paths), image_size, grayscale
        self.errors: dict[Path, str] = {}  # file -> why it was not read

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            if path.is_file() and path.stat().st_size == 0:
                raise ValueError("empty file (0 bytes)")
            return torch.from_numpy(preprocess.load_image(path, self.image_size, self.grayscale))
        except Exception as err:  # any decoder failure: report this file, go on with the others
            self.errors[path] = _describe(err)
            return torch.zeros((1 if self.grayscale else 3, self.image_size, self.image_size), dtype=torch.uint8)


def predict(
    ckpt: str | Path | TrainedModel,
    images: str | Path | Iterable[str | Path],
    *,
    batch_size: int = PredictConfig.batch_size,
    **options: Any,
) -> list[Prediction]:
    """Predicted class and its probability for each image file (folders expand to their images).

    ``ckpt`` is a .ckpt file, a run dir or a :class:`TrainedModel`; ``options`` go to
    :func:`load_trained` (device, image_size, precision). Each file is decoded by training's
    ``load_image`` (placeholder detection, which needs a whole folder, is not applied); a file
    that cannot be read gives a Prediction with ``error`` set; this never raises for bad images.
    """
    model = _as_model(ckpt, **options)
    entries = image_paths(images)
    files = ImageFiles([path for path, reason in entries if not reason], model.image_size, model.grayscale)
    rows: dict[Path, np.ndarray] = {}  # file -> (num_classes,) probabilities
    if len(files):
        loader = DataLoader(files, batch_size=batch_size)
        with _quiet():
            batches = cast(list[torch.Tensor], model.trainer().predict(model.module, loader))
        rows = dict(zip(files.paths, torch.cat(batches).numpy(), strict=True))
    results = []
    for path, reason in entries:
        reason = reason or files.errors.get(path, "")
        if reason:
            results.append(Prediction(str(path), None, math.nan, {}, reason))
            continue
        row = rows[path]
        best = int(row.argmax())
        probabilities = {name: float(p) for name, p in zip(model.classes, row, strict=True)}
        results.append(Prediction(str(path), model.classes[best], float(row[best]), probabilities))
    return results


def write_predictions_csv(predictions: Sequence[Prediction], out: str | Path, classes: Sequence[str]) -> Path:
    """CSV with path, prediction, probability, p_<class> for every class, error; written atomically."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:  # names as on disk
        writer = csv.writer(handle)
        writer.writerow(["path", "prediction", "probability", *(f"p_{name}" for name in classes), "error"])
        for row in predictions:  # a skipped file: its path and error, the other cells empty
            numbers = [row.probability, *(row.probabilities[name] for name in classes)] if row.ok else []
            cells = [f"{number:.6f}" for number in numbers] or [""] * (1 + len(classes))
            writer.writerow([row.path, row.label or "", *cells, "" if row.ok else row.error])
    tmp.replace(out)
    return out


def format_predictions(predictions: Sequence[Prediction]) -> str:
    """A table for the terminal: one line per file, skipped files with their reason, then a count."""
    width = max([len("path"), *(len(row.path) for row in predictions)])
    label_width = max([len("prediction"), *(len(row.label or "") for row in predictions)])
    lines = [f"{'path':<{width}}  {'prediction':<{label_width}}  probability"]
    for row in predictions:
        if row.ok:
            lines.append(f"{row.path:<{width}}  {row.label:<{label_width}}  {row.probability:.3f}")
        else:
            lines.append(f"{row.path:<{width}}  {'-':<{label_width}}  -      skipped: {row.error}")
    counts = Counter(row.label for row in predictions if row.ok)
    done = sum(counts.values())
    per_class = ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
    skipped = f", {len(predictions) - done} skipped" if done < len(predictions) else ""
    lines.append(f"{done} of {len(predictions)} files predicted" + (f" ({per_class})" if per_class else "") + skipped)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command lines


def _load_for(cfg: EvalConfig | PredictConfig) -> TrainedModel:
    return load_trained(cfg.ckpt_path, device=cfg.device, image_size=cfg.image_size, precision=cfg.precision)


def _write_out(out: Path, write: Callable[[Path], Any]) -> None:
    """``write(out)`` into a folder made if needed, then say so; an OSError is one DataError line."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write(out)
    except OSError as err:
        raise DataError(f"cannot write {out} ({_describe(err)}): pass out=PATH somewhere writable") from None
    print(f"wrote {out}")


def eval_main(cfg: EvalConfig) -> Evaluation:
    """``python eval.py ckpt_path=PATH [data=folder data.raw_dir=DIR]``: print the results, write them as JSON."""
    model = _load_for(cfg)
    if cfg.data is not None:
        data = cfg.data
        folder = {key: getattr(data, key) for key in ("cache_dir", "discard", "workers", "progress")}
        result = evaluate_folder(model, data.raw_dir, batch_size=cfg.batch_size, **folder)
        name = Path(data.raw_dir).name
    else:
        result, name = evaluate_split(model, cfg.split), cfg.split
    print(result.report())
    # by default eval_<checkpoint>_<data>.json in the run dir, or beside the checkpoint without one
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "data"
    default = (model.run_dir or model.checkpoint.parent) / f"eval_{model.checkpoint.stem}_{safe}.json"
    out = Path(cfg.out).expanduser() if cfg.out else default
    _write_out(out, lambda path: write_json(path, result.to_dict()))
    return result


def predict_main(cfg: PredictConfig, extra_paths: Sequence[str] = ()) -> list[Prediction]:
    """``python predict.py ckpt_path=PATH IMAGES_OR_FOLDERS... [out=preds.csv]``: a table, and a CSV with ``out``.

    Exits 1 when no file could be predicted (each is listed with its reason); a bad
    checkpoint or option raises (``cli.error_policy``: exit 2).
    """
    paths = [*cfg.inputs, *extra_paths]
    if not paths:
        raise ConfigError("no images given: pass files or folders, e.g. predict.py ckpt_path=RUN photo.jpg photos/")
    model = _load_for(cfg)
    predictions = predict(model, paths, batch_size=cfg.batch_size)
    print(format_predictions(predictions))
    if cfg.out:
        _write_out(Path(cfg.out).expanduser(), lambda path: write_predictions_csv(predictions, path, model.classes))
    if not any(row.ok for row in predictions):
        sys.exit(1)
    return predictions
