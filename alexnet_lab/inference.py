"""Use a trained checkpoint: load it safely, evaluate it, predict the class of new images.

``load_trained(ckpt)`` reads a checkpoint with ``torch.load(..., weights_only=True)`` (only
tensors and plain data are unpickled, so a downloaded checkpoint cannot run code), checks
that its weights fit the AlexNet its hyperparameters describe and builds the module from
them. Images are preprocessed as in training, at the image size and colour mode stored
in the checkpoint.

``evaluate_split`` evaluates on a split (test by default) of the run's own data, rebuilt
from the run dir's ``.hydra/config.yaml`` the way training built it, so its numbers equal
the run's ``metrics.json``. ``evaluate_folder`` evaluates on any folder in the ImageFolder
layout, preprocessed by training's own cache builder (placeholders and unreadable files
left out the same way), its class folders matched to the checkpoint's classes by name.
``predict`` gives the class and its probability per image file, each decoded by
training's ``load_image`` (placeholder detection, which needs a whole folder, is not
applied); files that cannot be read are reported, never raised. ``eval_main`` and ``predict_main`` are the Hydra glue of
``eval.py`` and ``predict.py``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import logging
import math
import os
import pickle
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf

from alexnet_lab.data.augment import to_float
from alexnet_lab.data.preprocess import IMAGE_EXTENSIONS, PREPROCESS_VERSION, DataError, build_cache, load_image
from alexnet_lab.metrics import confusion_summary
from alexnet_lab.module import AlexNetClassifier
from alexnet_lab.train import ConfigError, build_datamodule, check_all_set, write_json

__all__ = [
    "CheckpointError",
    "TrainedModel",
    "Evaluation",
    "Prediction",
    "find_checkpoint",
    "load_trained",
    "evaluate",
    "evaluate_split",
    "evaluate_folder",
    "predict",
    "image_paths",
    "write_predictions_csv",
    "format_predictions",
    "split_path_arguments",
    "eval_main",
    "predict_main",
]

log = logging.getLogger(__name__)

BEST_IN_RUN_DIR = Path("checkpoints") / "best.ckpt"  # what a run dir given as ckpt_path stands for
RUN_CONFIG = Path(".hydra") / "config.yaml"  # the resolved config Hydra stores in every run dir
SPLITS = ("test", "val")  # the held-out splits of a run's own data

# Lightning precision names -> (autocast?, dtype); "-true" casts the module and the inputs.
_PRECISIONS: dict[str, tuple[bool, torch.dtype]] = {
    "32-true": (False, torch.float32),
    "64-true": (False, torch.float64),
    "16-true": (False, torch.float16),
    "bf16-true": (False, torch.bfloat16),
    "16-mixed": (True, torch.float16),
    "bf16-mixed": (True, torch.bfloat16),
}
_PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and what to do."""


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split("\n")[0].split()) or "no message"
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


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run dir a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` or ``<run>/x.ckpt``), if it has a config."""
    for folder in (checkpoint.parent.parent, checkpoint.parent):
        if (folder / RUN_CONFIG).is_file():
            return folder
    return None


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with every failure turned into one CheckpointError line."""
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
        raise CheckpointError(
            f"cannot read {path} ({_first_line(err)}): check the path and its permissions"
        ) from None
    except Exception as err:  # truncated zip (RuntimeError), empty file (EOFError), garbage (KeyError, ValueError)
        raise CheckpointError(
            f"{path} is corrupted or not a checkpoint ({_first_line(err)}): copy it again or use another checkpoint"
        ) from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= set(checkpoint):
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint of alexnet_lab (no state_dict and hyper_parameters in it): "
            "pass a .ckpt written by train.py"
        )
    return checkpoint


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
            f"{path}: its hyperparameters do not describe an alexnet_lab model ({_first_line(err)}): "
            "pass a .ckpt written by train.py"
        ) from None
    state = checkpoint["state_dict"]
    expected = module.state_dict()
    if not isinstance(state, dict):
        state = {}
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [
        f"{key} is {tuple(state[key].shape)} in the file but {tuple(expected[key].shape)} in that model"
        for key in expected
        if key in state and (not isinstance(state[key], torch.Tensor) or state[key].shape != expected[key].shape)
    ]
    if missing or unexpected or wrong_shape:
        problems = wrong_shape[:1]
        if missing:
            problems.append(f"{len(missing)} weights missing (first {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} weights it does not have (first {unexpected[0]})")
        described = ", ".join(f"{key}={value}" for key, value in model.items())
        raise CheckpointError(
            f"{path}: its weights do not fit the AlexNet its hyperparameters describe ({described}, "
            f"{module.net.config.in_channels} channel(s), {len(classes)} classes): {'; '.join(problems)}; "
            "was it saved by another architecture or edited?"
        )
    module.load_state_dict(state, strict=True)
    return module


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: no GPU is visible to torch here; use device=cpu or device=auto")
    return resolved


def _resolve_precision(precision: Any) -> str:
    name = _PRECISION_ALIASES.get(str(precision), str(precision))
    if name not in _PRECISIONS:
        raise ConfigError(f"precision={precision!r}: use one of {', '.join(_PRECISIONS)} (or null: as trained)")
    return name


@dataclass
class TrainedModel:
    """A checkpoint ready for inference: the module in eval mode and how to preprocess images for it."""

    module: AlexNetClassifier
    checkpoint: Path  # the .ckpt file
    run_dir: Path | None  # the run dir it came from, when it has one (with .hydra/config.yaml)
    run_config: DictConfig | None  # that run's resolved config
    image_size: int  # px: images are letterboxed to image_size x image_size
    grayscale: bool  # 1 channel if True, else RGB
    device: torch.device
    precision: str  # a Lightning precision name, as the run trained (or as asked)
    epoch: int | None = None  # epoch the checkpoint was saved at (0-based), if recorded
    data_fingerprint: str | None = None  # fingerprint of the data cache it was trained on, if recorded

    @property
    def classes(self) -> list[str]:
        return self.module.classes

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, S, S) on any device -> float32 logits (B, num_classes) on the model's device."""
        autocast, dtype = _PRECISIONS[self.precision]
        images = to_float(images.to(self.device, non_blocking=True))  # (B, C, S, S) in [0, 1], as in training
        if not autocast:
            images = images.to(dtype)
        context = torch.autocast(self.device.type, dtype=dtype) if autocast else contextlib.nullcontext()
        with torch.inference_mode(), context:
            return self.module(images).float()

    def preprocess(self, path: str | Path) -> np.ndarray:
        """One image file preprocessed for this model: uint8 (C, S, S). Raises on undecodable files."""
        return load_image(Path(path), self.image_size, self.grayscale)


def load_trained(
    ckpt: str | Path,
    *,
    device: str | torch.device = "auto",
    image_size: int | None = None,
    precision: str | None = None,
) -> TrainedModel:
    """Load a checkpoint (a .ckpt file or a run dir) for inference; raises :class:`CheckpointError`.

    ``image_size`` and ``precision`` default to what the run used (stored in the checkpoint,
    else in the run dir's config).
    """
    bad_size = isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 64
    if image_size is not None and bad_size:
        raise ConfigError(f"image_size={image_size!r}: must be an integer >= 64 (or null: as trained)")
    path = find_checkpoint(ckpt)
    checkpoint = _read_checkpoint(path)
    module = _build_module(path, checkpoint)
    run_dir = run_dir_of(path)
    run_config: DictConfig | None = None
    if run_dir is not None:
        try:
            loaded = OmegaConf.load(run_dir / RUN_CONFIG)
        except Exception as err:  # yaml or OmegaConf errors, whatever their class
            raise CheckpointError(
                f"{run_dir / RUN_CONFIG} is unreadable ({_first_line(err)}): repair or remove it"
            ) from None
        run_config = loaded if isinstance(loaded, DictConfig) else None

    stored = checkpoint.get("preprocessing")
    data_cfg = run_config.get("data") if run_config is not None else None
    if isinstance(stored, dict) and "image_size" in stored:
        trained_size, grayscale = int(stored["image_size"]), bool(stored["grayscale"])
        if stored.get("preprocess_version", PREPROCESS_VERSION) != PREPROCESS_VERSION:
            log.warning("%s was preprocessed by another version of alexnet_lab; results may differ", path)
    elif isinstance(data_cfg, DictConfig) and "image_size" in data_cfg:
        trained_size, grayscale = int(data_cfg.image_size), bool(data_cfg.grayscale)
    elif image_size is not None:
        trained_size, grayscale = int(image_size), module.net.config.in_channels == 1
    else:
        raise CheckpointError(
            f"{path} records no image size and has no run dir config beside it: pass image_size=N, "
            "the data.image_size it was trained with"
        )
    if (1 if grayscale else 3) != module.net.config.in_channels:
        raise CheckpointError(
            f"{path}: grayscale={grayscale} does not fit its {module.net.config.in_channels}-channel first layer"
        )
    if image_size is not None and image_size != trained_size:
        log.warning("using %d px images; %s was trained at %d px", image_size, path, trained_size)
    if precision is None:
        trained = OmegaConf.select(run_config, "trainer.precision") if run_config is not None else None
        precision = str(trained) if trained is not None else "32-true"
    precision = _resolve_precision(precision)
    resolved = _resolve_device(device)
    autocast, dtype = _PRECISIONS[precision]
    module = module.to(resolved, dtype=torch.float32 if autocast else dtype).eval()
    epoch = checkpoint.get("epoch")
    fingerprint = stored.get("data_fingerprint") if isinstance(stored, dict) else None
    return TrainedModel(
        module=module,
        checkpoint=path,
        run_dir=run_dir,
        run_config=run_config,
        image_size=image_size or trained_size,
        grayscale=grayscale,
        device=resolved,
        precision=precision,
        epoch=int(epoch) if isinstance(epoch, int) else None,
        data_fingerprint=fingerprint if isinstance(fingerprint, str) else None,
    )


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

    def _summary(self) -> dict[str, float]:
        values = confusion_summary(torch.from_numpy(self.confusion), self.classes)  # the module's own definitions
        return {name: float(value) for name, value in values.items()}

    @property
    def images(self) -> int:
        return int(self.confusion.sum())

    @property
    def acc(self) -> float:
        return self._summary()["acc"]

    @property
    def balanced_acc(self) -> float:
        """Mean recall over the classes present in the data."""
        return self._summary()["balanced_acc"]

    @property
    def per_class_recall(self) -> dict[str, float | None]:
        """Recall of each class; None for a class with no image in the data."""
        present = self.confusion.sum(axis=1) > 0
        summary = self._summary()
        return {name: summary[f"recall/{name}"] if present[i] else None for i, name in enumerate(self.classes)}

    @property
    def pred_frac(self) -> dict[str, float]:
        summary = self._summary()
        return {name: summary[f"pred_frac/{name}"] for name in self.classes}

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (NaN-free: an absent class has recall null)."""
        return {
            "checkpoint": self.checkpoint,
            "data": self.data,
            "images": self.images,
            "classes": self.classes,
            "acc": self.acc,
            "balanced_acc": self.balanced_acc,
            "loss": self.loss,
            "per_class_recall": self.per_class_recall,
            "pred_frac": self.pred_frac,
            "confusion_matrix": self.confusion.tolist(),
            "confusion_matrix_axes": "rows: true class, columns: predicted class, in the order of classes",
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
            "note": self.note,
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
        for name, row in zip(self.classes, self.confusion):
            lines.append(f"  {name:<{width}}" + "".join(f"{int(count):>{width + 2}}" for count in row))
        if self.skipped:
            kinds = Counter(reason.split(" (")[0] for _, reason in self.skipped)
            listed = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
            lines.append(f"skipped {len(self.skipped)} files ({listed}); each with its reason in the JSON")
        if self.note:
            lines.append(f"note: {self.note}")
        return "\n".join(lines)


class _Accumulator:
    """Confusion matrix and summed loss over batches, on the device; read once at the end."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.to(logits.device)
        cells = labels * self.num_classes + logits.argmax(dim=1)  # (B,) flat index into (true, predicted)
        self.confusion += torch.bincount(cells, minlength=self.num_classes**2)
        self.loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()

    def result(self) -> tuple[np.ndarray, float]:
        confusion = self.confusion.view(self.num_classes, self.num_classes).cpu().numpy()
        return confusion, float(self.loss_sum) / max(int(confusion.sum()), 1)


def evaluate_split(
    ckpt: str | Path | TrainedModel, split: str = "test", run_config: DictConfig | None = None, **options: Any
) -> Evaluation:
    """Evaluate on a split of the run's own data, rebuilt as in training (same cache, same seeded split).

    ``run_config`` defaults to the run dir's ``.hydra/config.yaml``. With an unchanged data
    folder the numbers equal the run's ``metrics.json`` (test split, best checkpoint).
    """
    model = _as_model(ckpt, **options)
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: use one of {', '.join(SPLITS)}")
    source = run_config if run_config is not None else model.run_config
    if source is None or "data" not in source:
        raise CheckpointError(
            f"{model.checkpoint} has no run dir with {RUN_CONFIG.as_posix()} to find its data: "
            "evaluate it on a folder with data=folder data.raw_dir=DIR"
        )
    cfg = copy.deepcopy(source)  # only cfg.data is resolved: run_name needs Hydra's resolvers
    cfg.data.image_size, cfg.data.grayscale = model.image_size, model.grayscale
    datamodule = build_datamodule(cfg)  # the very datamodule training built
    datamodule.prepare_data()
    datamodule.setup("test")
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
    batches = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    totals = _Accumulator(len(model.classes), model.device)
    for images, labels in batches:  # uint8 (B, C, S, S), int64 (B,)
        totals.update(model.logits(images), labels)
    confusion, loss = totals.result()
    return Evaluation(
        checkpoint=str(model.checkpoint),
        data=f"{split} split of {datamodule.raw_dir}",
        classes=model.classes,
        confusion=confusion,
        loss=loss,
        note=note,
    )


def _folder_images(folder: Path) -> list[Path]:
    """Image files under folder, recursively, hidden files and folders skipped, sorted."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        found += [
            Path(root) / name
            for name in files
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        ]
    return sorted(found)


def evaluate_folder(
    ckpt: str | Path | TrainedModel,
    raw_dir: str | Path,
    *,
    cache_dir: str | Path = "data/cache",
    discard: Mapping[str, Any] | None = None,
    workers: int | None = None,
    progress: bool = False,
    batch_size: int = 256,
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
    if not raw_dir.is_dir():
        raise DataError(f"data.raw_dir={raw_dir} is not a folder: point it at a folder with one subfolder per class")
    # checked before any decoding: a wrong folder should fail in a second, not after the cache is built
    class_folders = [
        entry.name
        for entry in sorted(os.scandir(raw_dir), key=lambda entry: entry.name)
        if entry.is_dir() and not entry.name.startswith(".") and _folder_images(Path(entry.path))
    ]
    _check_folder_classes(raw_dir, class_folders, model)
    cache = build_cache(
        raw_dir,
        cache_dir,
        image_size=model.image_size,
        grayscale=model.grayscale,
        workers=workers,
        progress=progress,
        discard=discard,
    )
    _check_folder_classes(raw_dir, cache.classes, model)  # the cache's own scan is the authority
    to_checkpoint = torch.tensor([model.classes.index(name) for name in cache.classes])  # cache label -> ours

    totals = _Accumulator(len(model.classes), model.device)
    for start in range(0, len(cache), batch_size):
        images = torch.from_numpy(np.array(cache.images[start : start + batch_size]))  # read into RAM: (B, C, S, S)
        labels = to_checkpoint[torch.from_numpy(cache.labels[start : start + batch_size])]
        totals.update(model.logits(images), labels)
    confusion, loss = totals.result()
    return Evaluation(
        checkpoint=str(model.checkpoint),
        data=str(raw_dir),
        classes=model.classes,
        confusion=confusion,
        loss=loss,
        skipped=_discarded_files(cache.path, raw_dir),
    )


def _check_folder_classes(raw_dir: Path, names: Sequence[str], model: TrainedModel) -> None:
    unknown = [name for name in names if name not in model.classes]
    if unknown:
        raise DataError(
            f"data.raw_dir={raw_dir} has class folder {unknown[0]!r}, which {model.checkpoint} does not know "
            f"(its classes: {', '.join(model.classes)}): rename or remove that folder"
        )
    if len(names) < 2:
        found = f"only {names[0]!r}" if names else "no class folder with images"
        raise DataError(
            f"data.raw_dir={raw_dir} has {found}: evaluation preprocesses a folder as training does, which needs "
            "two or more class folders; for one class, see what the model says with predict.py"
        )


def _discarded_files(cache_path: Path, raw_dir: Path) -> list[tuple[str, str]]:
    """(file, reason) of every file the cache left out, from its manifest."""
    with open(cache_path / "manifest.csv", newline="") as handle:
        return [(str(raw_dir / row["path"]), row["reason"]) for row in csv.DictReader(handle) if row["status"] != "kept"]


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

    A folder stands for its image files (recursively); a file is taken whatever its
    extension (it is reported if it does not decode).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    found: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = _folder_images(path)
            found += [(file, "") for file in files] or [(path, "no image files in this folder")]
        elif path.exists():
            found.append((path, ""))
        else:
            found.append((path, "no such file or folder"))
    return found


def _decode(model: TrainedModel, paths: Sequence[Path]) -> tuple[list[int], list[np.ndarray], list[tuple[int, str]]]:
    """Preprocess files: (positions decoded, their pixels, (position, reason) of the rest)."""
    kept, pixels, failed = [], [], []
    for position, path in enumerate(paths):
        try:
            if path.is_file() and path.stat().st_size == 0:
                raise ValueError("empty file (0 bytes)")
            pixels.append(model.preprocess(path))
            kept.append(position)
        except Exception as err:  # any decoder failure: report this file, go on with the others
            failed.append((position, _first_line(err)))
    return kept, pixels, failed


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict(
    ckpt: str | Path | TrainedModel,
    images: str | Path | Iterable[str | Path],
    *,
    batch_size: int = 64,
    **options: Any,
) -> list[Prediction]:
    """Predicted class and its probability for each image file (folders expand to their images).

    ``ckpt`` is a .ckpt file, a run dir or a :class:`TrainedModel`; ``options`` go to
    :func:`load_trained` (device, image_size, precision). A file that cannot be read gives
    a Prediction with ``error`` set; this never raises for bad images.
    """
    model = _as_model(ckpt, **options)
    entries = image_paths(images)
    results: list[Prediction | None] = [None] * len(entries)
    for position, (path, reason) in enumerate(entries):
        if reason:
            results[position] = Prediction(str(path), None, math.nan, {}, reason)
    readable = [position for position, (_, reason) in enumerate(entries) if not reason]
    for chunk in _chunks(readable, batch_size):
        kept, pixels, failed = _decode(model, [entries[position][0] for position in chunk])
        for index, reason in failed:
            results[chunk[index]] = Prediction(str(entries[chunk[index]][0]), None, math.nan, {}, reason)
        if not kept:
            continue
        probabilities = model.logits(torch.from_numpy(np.stack(pixels))).softmax(dim=1).cpu().numpy()
        for index, row in zip(kept, probabilities):
            best = int(row.argmax())
            results[chunk[index]] = Prediction(
                path=str(entries[chunk[index]][0]),
                label=model.classes[best],
                probability=float(row[best]),
                probabilities={name: float(p) for name, p in zip(model.classes, row)},
            )
    return [result for result in results if result is not None]


def write_predictions_csv(predictions: Sequence[Prediction], out: str | Path, classes: Sequence[str]) -> Path:
    """CSV with path, prediction, probability, p_<class> for every class, error; written atomically."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "prediction", "probability", *(f"p_{name}" for name in classes), "error"])
        for row in predictions:
            if row.ok:
                writer.writerow(
                    [row.path, row.label, f"{row.probability:.6f}",
                     *(f"{row.probabilities[name]:.6f}" for name in classes), ""]
                )
            else:
                writer.writerow([row.path, "", "", *([""] * len(classes)), row.error])
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
    counts: dict[str, int] = {}
    for row in predictions:
        if row.ok:
            counts[row.label] = counts.get(row.label, 0) + 1  # type: ignore[index]
    done = sum(counts.values())
    per_class = ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
    lines.append(f"{done} of {len(predictions)} files predicted" + (f" ({per_class})" if per_class else "")
                 + (f", {len(predictions) - done} skipped" if done < len(predictions) else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command lines

#: Hydra's own options that take the next argument as their value.
_HYDRA_VALUE_OPTIONS = frozenset(
    {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
     "--experimental-rerun"}
)
_HYDRA_INFO_VALUES = frozenset({"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"})


def split_path_arguments(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split a command line into Hydra's arguments and plain paths (no ``=``, not an option).

    ``predict.py ckpt_path=run photos/*.jpg`` then works with the shell's glob; a path with
    ``=`` in its name must be passed as ``inputs='[...]'`` instead.
    """
    hydra_args: list[str] = []
    paths: list[str] = []
    previous = ""
    for argument in argv:
        is_info_value = previous in ("--info", "-i") and argument in _HYDRA_INFO_VALUES
        is_value = previous in _HYDRA_VALUE_OPTIONS or is_info_value
        if is_value or argument.startswith("-") or "=" in argument:
            hydra_args.append(argument)
        else:
            paths.append(argument)
        previous = "" if is_value else argument
    return hydra_args, paths


def _check_options(cfg: DictConfig) -> None:
    """Unset required keys and bad numbers as one ConfigError line naming the key."""
    check_all_set(cfg)
    size = cfg.get("batch_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"batch_size={size!r}: must be an integer >= 1")


def _load_from_cfg(cfg: DictConfig) -> TrainedModel:
    return load_trained(cfg.ckpt_path, device=cfg.device, image_size=cfg.image_size, precision=cfg.precision)


def default_eval_path(model: TrainedModel, data_name: str) -> Path:
    """eval_<checkpoint>_<data>.json in the run dir, or beside the checkpoint without one."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", data_name).strip("_") or "data"
    return (model.run_dir or model.checkpoint.parent) / f"eval_{model.checkpoint.stem}_{safe}.json"


def eval_main(cfg: DictConfig) -> Evaluation:
    """``python eval.py ckpt_path=PATH [data=folder data.raw_dir=DIR]``: print the results, write them as JSON."""
    try:
        _check_options(cfg)
        model = _load_from_cfg(cfg)
        data = cfg.get("data")
        if data is not None:
            discard = data.get("discard")
            result = evaluate_folder(
                model,
                data.raw_dir,
                cache_dir=data.cache_dir,
                discard=OmegaConf.to_container(discard, resolve=True) if discard is not None else None,
                workers=data.get("workers"),
                progress=bool(data.get("progress", False)),
                batch_size=cfg.batch_size,
            )
            name = Path(data.raw_dir).name
        else:
            result = evaluate_split(model, cfg.split)
            name = cfg.split
        print(result.report())
        out = Path(cfg.out).expanduser() if cfg.out else default_eval_path(model, name)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json(out, result.to_dict())
        except OSError as err:
            raise DataError(
                f"cannot write {out} ({_first_line(err)}): pass out=PATH somewhere writable"
            ) from None
        print(f"wrote {out}")
        return result
    except (CheckpointError, ConfigError, DataError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


def predict_main(cfg: DictConfig, extra_paths: Sequence[str] = ()) -> list[Prediction]:
    """``python predict.py ckpt_path=PATH IMAGES_OR_FOLDERS... [out=preds.csv]``: a table, and a CSV with ``out``.

    Exits 1 when no file could be predicted (each is listed with its reason), 2 on a bad
    checkpoint or option.
    """
    try:
        _check_options(cfg)
        inputs = cfg.inputs
        if isinstance(inputs, ListConfig):
            paths = [str(item) for item in inputs]
        else:
            paths = [str(inputs)] if inputs else []
        paths += list(extra_paths)
        if not paths:
            raise ConfigError(
                "no images given: pass files or folders, e.g. predict.py ckpt_path=RUN photo.jpg photos/"
            )
        model = _load_from_cfg(cfg)
        predictions = predict(model, paths, batch_size=cfg.batch_size)
        print(format_predictions(predictions))
        if cfg.out:
            try:
                out = write_predictions_csv(predictions, cfg.out, model.classes)
            except OSError as err:
                raise DataError(
                    f"cannot write {cfg.out} ({_first_line(err)}): pass out=PATH somewhere writable"
                ) from None
            print(f"wrote {out}")
    except (CheckpointError, ConfigError, DataError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    if not any(row.ok for row in predictions):
        sys.exit(1)
    return predictions
