"""The config schema: every key of the lab, its default, its allowed values and its meaning, once.

Plain typed dataclasses (no Hydra here: the model and data modules import them). cli.py
registers them with Hydra's ConfigStore under ``schema/``; the YAML groups in conf/ extend
them (``defaults: [/schema/optim/sgd@_here_, _self_]``) and set only what a preset changes,
so a default is written once. A value of the wrong type fails when Hydra composes the
config; a value out of range fails in its dataclass's ``__post_init__``
(``errors.check_fields``), which ``cli.load`` runs for the whole tree before any work.
``python train.py --cfg job`` prints the composed config.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from alexnet_lab.errors import ConfigError, check_fields, check_value, from_mapping, setting

MISSING: Any = "???"  # OmegaConf's mark of a value the user must set (Any: it stands in for any type)

# ----------------------------------------------------------------------------- the model


@dataclass
class ModelConfig:
    """The ``model`` group: which AlexNet (alexnet_lab/model.py), how wide, how regularised."""

    # "notebook" (the user's four-conv net) or "paper" (Fig. 2 of Krizhevsky et al. 2012)
    arch: str = setting("notebook", choices=("notebook", "paper"))
    # every width = the paper's width // downscale; 1 = the paper, 16 = the notebook's first run; both
    # architectures start with 96 channels, so 96 is the most that leaves every layer a channel
    downscale: int = setting(16, ge=1, le=96, hint="1 = the paper's widths, 16 = the notebook's first run")
    # p of dropout before each of the last two dense layers; the paper used 0.5
    dropout: float = setting(0.0, ge=0.0, lt=1.0, hint="0 = off, 0.5 = the paper")
    lrn: bool = False  # local response normalisation after conv1 and conv2, as in the paper

    def __post_init__(self) -> None:
        check_fields(self, "model")


# ----------------------------------------------------------------------------- optimizers


@dataclass
class OptimConfig:
    """A torch.optim optimizer: ``name`` is its class, every other field one of its keyword arguments."""

    name: str = setting("Adam", choices=("Adam",), hint="the torch.optim class; choose another with optim=sgd")
    lr: float = setting(1e-3, gt=0.0)  # the notebook's default (TensorFlow's Adam default)

    def __post_init__(self) -> None:
        check_fields(self, "optim")


@dataclass
class AdamConfig(OptimConfig):
    betas: tuple[float, float] = (0.9, 0.999)  # decay of the running means of the gradient and its square
    eps: float = setting(1e-8, ge=0.0)  # torch's default (TensorFlow's is 1e-7; immaterial here)
    weight_decay: float = setting(0.0, ge=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.betas = tuple(float(beta) for beta in self.betas)  # type: ignore[assignment]  # YAML hands lists
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)}: must be two numbers in [0, 1)")


@dataclass
class AdamWConfig(AdamConfig):
    """Adam with decoupled weight decay."""

    name: str = setting("AdamW", choices=("AdamW",), hint="the torch.optim class; choose another with optim=adam")
    weight_decay: float = setting(1e-2, ge=0.0)


@dataclass
class SGDConfig(OptimConfig):
    """Plain gradient descent (the notebook's tf.train.GradientDescentOptimizer) unless momentum > 0."""

    name: str = setting("SGD", choices=("SGD",), hint="the torch.optim class; choose another with optim=adam")
    lr: float = setting(1e-2, gt=0.0)  # per-step size; the notebook did not record its SGD learning rate
    momentum: float = setting(0.0, ge=0.0, hint="0 = plain gradient descent; 0.9 is the paper's value")
    nesterov: bool = False
    weight_decay: float = setting(0.0, ge=0.0)  # the paper used 5e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nesterov and self.momentum == 0:
            raise ConfigError("optim.nesterov=true needs optim.momentum > 0 (e.g. 0.9)")


#: The ``optim`` group: a name for the command line (``optim=sgd``) -> its schema.
OPTIMIZERS: dict[str, type[OptimConfig]] = {"adam": AdamConfig, "adamw": AdamWConfig, "sgd": SGDConfig}

# ----------------------------------------------------------------------------- data


@dataclass
class AugmentConfig:
    """``data.augmentation``: magnitudes (alexnet_lab/data/augment.py); all zero and scale [1, 1] is the identity."""

    flip: float = setting(0.5, ge=0.0, le=1.0)  # probability of a horizontal flip
    max_shift: float = setting(0.1, ge=0.0, le=1.0)  # max translation per axis, fraction of image width/height
    max_rotate_deg: float = setting(10.0, ge=0.0, le=180.0)  # max rotation either way, degrees
    scale: tuple[float, float] = (0.9, 1.1)  # zoom range [low, high]; > 1 magnifies the content
    brightness: float = setting(0.2, ge=0.0, le=1.0)  # max additive change, fraction of the [0, 1] range
    # max relative change of deviations from each image's mean; above 1 a factor could be negative (inverted)
    contrast: float = setting(0.2, ge=0.0, le=1.0)

    def __post_init__(self) -> None:
        check_fields(self, "data.augmentation")
        self.scale = tuple(float(s) for s in self.scale)  # type: ignore[assignment]  # Hydra/YAML hands lists
        if len(self.scale) != 2 or not 0.0 < self.scale[0] <= self.scale[1] < math.inf:
            raise ConfigError(f"data.augmentation.scale={list(self.scale)}: must be [low, high] with 0 < low <= high")


@dataclass
class DiscardRules:
    """What preprocessing throws away besides files that cannot be decoded (config: ``data.discard``)."""

    # the same bytes in this many files or more: a "No image available" placeholder download (0 = off)
    min_copies: int = setting(5, ge=0, hint="at least 2, or 0 to keep repeated files")
    # sha256 (hex) of known placeholder files (the report prints them), discarded even as a single copy
    known_digests: list[str] = setting(factory=list)
    min_std: float = setting(2.0, ge=0, lt=128)  # grey levels; a picture flatter than this is blank (0 = off)
    # larger images are refused before decoding (decompression bombs); Pillow's own limit
    max_image_pixels: int = setting(89_478_485, ge=1)

    def __post_init__(self) -> None:
        given: Any = self.known_digests  # a list; one digest as a plain string (from Python) is taken too
        self.known_digests = [given] if isinstance(given, str) else given
        check_fields(self, "data.discard")
        if self.min_copies == 1:
            raise ConfigError("data.discard.min_copies=1: must be at least 2 (or 0 to keep repeated files)")
        checked = []
        for digest in self.known_digests:
            text = str(digest).strip().lower()
            if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
                raise ConfigError(
                    f"data.discard.known_digests: {digest!r} is not a sha256 hex digest (64 hex digits; "
                    "the report and `sha256sum FILE` print them)"
                )
            checked.append(text)
        self.known_digests = sorted(set(checked))


@dataclass
class SyntheticConfig:
    """What the embedded data set holds (config: ``data.synthetic``)."""

    seed: int = setting(0, ge=0)  # generator seed; a different seed is a different data set
    # photos per class: the notebook's ImageNet download, 1127 cats vs 791 dogs
    counts: dict[str, int] = setting(factory=lambda: {"cat": 1127, "dog": 791})
    # byte-identical "No image available" downloads, spread over the classes like the photos (discarded)
    placeholders: int = setting(80, ge=0)
    broken: int = setting(6, ge=0)  # truncated, empty, HTML-error-page and random-byte "downloads" (discarded)

    def __post_init__(self) -> None:
        check_fields(self, "data.synthetic")
        if not self.counts:
            raise ConfigError("data.synthetic.counts is empty: give at least one class, e.g. {cat: 1127, dog: 791}")
        for name, n in self.counts.items():
            if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or os.sep in name:
                raise ConfigError(f"data.synthetic.counts: class name {name!r} is not a plain folder name")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ConfigError(f"data.synthetic.counts.{name}={n!r}: must be an integer >= 0")
        self.counts = {name: int(n) for name, n in sorted(self.counts.items())}


@dataclass
class DataConfig:
    """The ``data`` group: which raw folder, how it is preprocessed, split, sampled and augmented."""

    name: str = "folder"  # folder: any raw folder; synthetic: the embedded data set
    raw_dir: str = MISSING  # one subfolder per class (raw/cat/*.jpg); only ever read
    cache_dir: str = "data/cache"  # preprocessed uint8 caches, one per (files, settings) fingerprint
    image_size: int = setting(256, ge=64, hint="px; 64 is the least the AlexNet stem accepts")
    grayscale: bool = True  # the notebook trained on gray images
    balance: bool = False  # the notebook's balance_sample: as many images of every class each epoch
    augment: bool = False  # random flip, shift, rotation, scale, brightness, contrast on the device
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)  # magnitudes used when augment is true
    batch_size: int = setting(64, ge=1)  # images per training step
    # cache held on the GPU and batches gathered there; auto: on CUDA if it fits in half its free memory
    on_device: Any = setting("auto", choices=("auto", True, False))
    val_fraction: float = setting(0.15, gt=0.0, lt=1.0)  # stratified: this fraction of every class
    test_fraction: float = setting(0.15, gt=0.0, lt=1.0)  # and this to the held-out test split
    split_seed: int = 0  # the split is fixed by this, not by `seed`, so seeds compare on one split
    workers: int | None = setting(None, ge=1, hint="preprocessing processes; null = all cores")
    progress: bool = True  # progress bars for generation and preprocessing
    discard: DiscardRules = field(default_factory=DiscardRules)  # what preprocessing throws away
    synthetic: SyntheticConfig | None = None  # set: the embedded data set is generated into raw_dir first

    def __post_init__(self) -> None:
        check_fields(self, "data")
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"data.val_fraction={self.val_fraction}, data.test_fraction={self.test_fraction}: "
                "together they must be below 1"
            )


# ----------------------------------------------------------------------------- the task


@dataclass
class VerdictThresholds:
    """``verdicts``: thresholds of verdicts.verdicts. Fractions are of 1 (0.05 = five percentage points)."""

    # epochs: end-of-run values are averaged over the last `window` epochs (fewer if the run is shorter)
    window: int = setting(5, ge=1)
    # collapsed: one class gets at least this fraction of val predictions (the notebook's "always cat")
    collapsed_pred_frac: float = setting(0.95, ge=0.0)
    chance_margin: float = setting(0.05, ge=0.0)  # chance: val balanced accuracy at most 1/classes + this
    overfit_gap: float = setting(0.15, ge=0.0)  # overfit: train accuracy above val accuracy by at least this, or...
    # ...from the epoch of least val loss to the end, val loss rises and train loss falls, each by a
    # factor of at least 1 + this (`window`-epoch means)
    overfit_val_loss_rise: float = setting(0.25, ge=0.0)
    diverged_factor: float = setting(
        10.0, ge=0.0
    )  # diverged: a loss is NaN/inf, or ends at least this many times its first value

    def __post_init__(self) -> None:
        check_fields(self, "verdicts")


@dataclass
class DivergenceConfig:
    # nats; an epoch's mean train loss above this (or nan/inf) stops the run as diverged
    max_train_loss: float = setting(20.0, gt=0.0, hint="nats; chance is ln 2 = 0.69")

    def __post_init__(self) -> None:
        check_fields(self, "divergence")


#: Ranges of the Trainer arguments conf/trainer/default.yaml sets, where Lightning would take a
#: value that breaks a run (its types come from pytorch_lightning.Trainer's own annotations).
TRAINER_RULES = {
    "max_epochs": dict(ge=1, hint="the notebook trained 50"),
    "log_every_n_steps": dict(ge=1, hint="metrics are logged per epoch; this only paces step-level logging"),
    "num_sanity_val_steps": dict(ge=-1, hint="-1 = the whole val split before training, 0 = none"),
}


@dataclass
class LabConfig:
    """``python train.py``: the root of the config tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: Any = MISSING  # an OptimConfig, chosen by the optim group
    data: DataConfig = MISSING
    trainer: dict[str, Any] = field(default_factory=dict)  # pytorch_lightning.Trainer arguments
    seed: int = 0  # seeds weights, sampling, augmentation and dropout (0 is a seed)
    run_name: str = "${run_name:${hydra:overrides.task}}"  # what differs from the defaults; names the run dir
    resume: bool = False  # true: skip runs whose metrics.json says finished, continue others from last.ckpt
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    verdicts: VerdictThresholds = field(default_factory=VerdictThresholds)  # into metrics.json and the report

    def __post_init__(self) -> None:
        check_fields(self, "")
        if isinstance(self.optim, Mapping):  # the optim group's choice, as plain data: its schema by name
            name = self.optim.get("name")
            schema = next((s for s in OPTIMIZERS.values() if s.name == name), None)
            if schema is None:
                known = ", ".join(s.name for s in OPTIMIZERS.values())
                raise ConfigError(f"optim.name={name!r}: must be one of {known}; choose one with optim=adam, sgd, ...")
            self.optim = from_mapping(schema, self.optim, "optim")
        for key, rule in TRAINER_RULES.items():  # their types: train.check_trainer_args, from Lightning's own
            if key in self.trainer:
                check_value(f"trainer.{key}", self.trainer[key], int, rule)


@dataclass
class CheckpointUse:
    """What eval.py and predict.py share: which checkpoint, and how to run it."""

    ckpt_path: str = MISSING  # a .ckpt file, or a run dir (then its checkpoints/best.ckpt)
    image_size: int | None = setting(None, ge=64, hint="px; null = as trained")
    precision: str | None = None  # null = as trained (the run's trainer.precision); 32-true, bf16-mixed, ...
    device: str = "auto"  # auto = a GPU if there is one, else the CPU; or cpu, cuda, cuda:1
    batch_size: int = setting(64, ge=1)  # images per forward pass

    def __post_init__(self) -> None:
        check_fields(self, "")


@dataclass
class EvalConfig(CheckpointUse):
    """``python eval.py``: a checkpoint on its own test (or val) split, or on another folder (``data=folder``)."""

    data: DataConfig | None = None  # null: the checkpoint's own data, from its run dir's .hydra/config.yaml
    split: str = setting("test", choices=("test", "val"))  # which split of the checkpoint's own data
    batch_size: int = setting(256, ge=1)  # images per forward pass (with data=...)
    out: str | None = None  # JSON path; null = eval_<checkpoint>_<split or folder>.json in the run dir


@dataclass
class PredictConfig(CheckpointUse):
    """``python predict.py``: the class of every image given."""

    inputs: list[str] = field(default_factory=list)  # image files and folders (searched recursively)
    out: str | None = None  # CSV path (path, prediction, probability, p_<class>..., error); null = table only


@dataclass
class PreprocessConfig:
    """``python scripts/preprocess.py``: build (or find) the cache training would use."""

    data: DataConfig = MISSING
