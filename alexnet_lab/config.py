"""The config schema: every key of the lab, its default, its allowed values and its meaning, once.

Plain typed dataclasses (no Hydra here: the model and data modules import them), and
:func:`load`, which turns a composed config into them. cli.py registers them with Hydra's
ConfigStore under ``schema/``; the YAML groups in conf/ extend them (``defaults:
[/schema/optim/sgd@_here_, _self_]``) and set only what a preset changes, so a default is
written once. A value of the wrong type fails when Hydra composes the
config; a value out of range fails in its dataclass's ``__post_init__``
(``errors.check_fields``), which :func:`load` runs for the whole tree before any work.
``python train.py --cfg job`` prints the composed config.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from alexnet_lab.errors import ConfigError, T, check_fields, check_value, from_mapping, one_line, setting

MISSING: Any = "???"  # OmegaConf's mark of a value the user must set (Any: it stands in for any type)
SYNTHETIC_RAW_DIR = "${paths.data_dir}/synthetic/raw"  # where the embedded data set is generated

if TYPE_CHECKING:
    from omegaconf import DictConfig, ListConfig


@dataclass
class PathsConfig:
    """The ``paths`` group: where data and outputs go, relative to the working directory unless absolute."""

    data_dir: str = "data"  # the embedded data set and every preprocessed cache
    output_dir: str = "outputs"  # runs/ and multirun/: every run's dir; `tensorboard --logdir outputs`

    def __post_init__(self) -> None:
        check_fields(self, "paths")


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

# ----------------------------------------------------------------------------- learning-rate schedules


@dataclass
class SchedulerConfig:
    """The ``scheduler`` group: how the rate changes from epoch to epoch (built in module.lr_schedule).

    ``none`` keeps the notebook's constant rate. A warm-up, where it applies, raises the rate
    linearly from ``warmup_start_factor`` x lr to lr over the first ``warmup_epochs`` epochs.
    """

    name: str = setting("none", choices=("none",), hint="choose a schedule with scheduler=cosine, step or plateau")
    warmup_epochs: int = setting(0, ge=0, hint="0 = no warm-up")
    warmup_start_factor: float = setting(0.1, gt=0.0, le=1.0)

    def __post_init__(self) -> None:
        check_fields(self, "scheduler")


@dataclass
class CosineConfig(SchedulerConfig):
    """Cosine annealing from lr to ``eta_min`` over the epochs after the warm-up (trainer.max_epochs)."""

    name: str = setting("cosine", choices=("cosine",), hint="choose another with scheduler=step")
    eta_min: float = setting(0.0, ge=0.0)  # the rate the last epoch ends at


@dataclass
class StepConfig(SchedulerConfig):
    """The rate times ``gamma`` every ``step_size`` epochs (after the warm-up)."""

    name: str = setting("step", choices=("step",), hint="choose another with scheduler=cosine")
    step_size: int = setting(10, ge=1)
    gamma: float = setting(0.1, gt=0.0, le=1.0)


@dataclass
class PlateauConfig(SchedulerConfig):
    """The rate times ``factor`` once ``monitor`` has not improved for ``patience`` epochs (no warm-up)."""

    name: str = setting("plateau", choices=("plateau",), hint="choose another with scheduler=cosine")
    monitor: str = setting("val/loss", choices=("val/loss", "val/acc", "val/balanced_acc", "train/loss"))
    factor: float = setting(0.1, gt=0.0, lt=1.0)
    patience: int = setting(5, ge=0)  # epochs without improvement before the rate drops
    threshold: float = setting(1e-4, ge=0.0)  # relative change that counts as an improvement
    min_lr: float = setting(0.0, ge=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup_epochs:  # torch's SequentialLR cannot hold a ReduceLROnPlateau
            raise ConfigError("scheduler.warmup_epochs: plateau has no warm-up; use scheduler=cosine or step for one")


#: The ``scheduler`` group: a name for the command line (``scheduler=cosine``) -> its schema.
SCHEDULERS: dict[str, type[SchedulerConfig]] = {
    "none": SchedulerConfig,
    "cosine": CosineConfig,
    "step": StepConfig,
    "plateau": PlateauConfig,
}


def chosen(group: str, values: Any, registry: Mapping[str, type[T]]) -> T:
    """A group's choice (plain data naming its schema in ``name``) as that schema, checked."""
    if not isinstance(values, Mapping):
        return cast(T, values)
    name = values.get("name")
    schema = next((s for s in registry.values() if getattr(s, "name", None) == name), None)
    if schema is None:
        known = ", ".join(str(getattr(s, "name", "")) for s in registry.values())
        raise ConfigError(
            f"{group}.name={name!r}: must be one of {known}; choose one with {group}={next(iter(registry))}, ..."
        )
    return from_mapping(schema, values, group)


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
    cache_dir: str = "${paths.data_dir}/cache"  # preprocessed uint8 caches, one per (files, settings) fingerprint
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
        for key in ("raw_dir", "cache_dir"):
            if "${" in str(getattr(self, key)):  # built in Python, not composed by Hydra: nothing fills it in
                raise ConfigError(f"data.{key}={getattr(self, key)!r} names a config path: pass data.{key}=DIR")
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

    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: Any = MISSING  # an OptimConfig, chosen by the optim group
    scheduler: Any = field(default_factory=SchedulerConfig)  # a SchedulerConfig, chosen by the scheduler group
    data: DataConfig = MISSING
    trainer: dict[str, Any] = field(default_factory=dict)  # pytorch_lightning.Trainer arguments
    # the logger and callbacks groups: name -> what hydra.utils.instantiate builds (null: off); the
    # callbacks a run depends on (checkpoints, divergence guard, resume state) are added in train.py
    logger: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    # start from these weights (a .ckpt, or a run dir: its best.ckpt) as a new run; resume=true continues one
    ckpt_path: str | None = None
    seed: int = 0  # seeds weights, sampling, augmentation and dropout (0 is a seed)
    run_name: str = "${run_name:${hydra:overrides.task}}"  # what differs from the defaults; names the run dir
    resume: bool = False  # true: skip runs whose metrics.json says finished, continue others from last.ckpt
    # epochs between saves of last.ckpt (also saved after the last epoch; best.ckpt whenever val/acc improves):
    # a resume replays the epochs since the save, to the same numbers; fewer saves, less time per epoch
    checkpoint_every: int = setting(5, ge=1, hint="epochs between saves of last.ckpt; 1 = every epoch")
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    verdicts: VerdictThresholds = field(default_factory=VerdictThresholds)  # into metrics.json and the report
    pack: str | None = None  # set by hydra/sweeper=packed: this job trains the runs listed in this pack file

    def __post_init__(self) -> None:
        check_fields(self, "")
        self.optim = chosen("optim", self.optim, OPTIMIZERS)  # the group's choice, as plain data: its schema
        self.scheduler = chosen("scheduler", self.scheduler, SCHEDULERS)
        for group in ("logger", "callbacks"):  # what hydra.utils.instantiate builds: a _target_ each, or null
            for key, spec in getattr(self, group).items():
                if spec is not None and not (isinstance(spec, Mapping) and "_target_" in spec):
                    raise ConfigError(f"{group}.{key}={spec!r}: must name a class in _target_ (or be null: off)")
        for key, rule in TRAINER_RULES.items():  # their types: train.check_trainer_args, from Lightning's own
            if key in self.trainer:
                check_value(f"trainer.{key}", self.trainer[key], int, rule)


@dataclass
class CheckpointUse:
    """What eval.py and predict.py share: which checkpoint, and how to run it."""

    ckpt_path: str = MISSING  # a .ckpt file, or a run dir (then its checkpoints/best.ckpt)
    paths: PathsConfig = field(default_factory=PathsConfig)
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
    paths: PathsConfig = field(default_factory=PathsConfig)


def load(cfg: DictConfig | ListConfig, schema: type[T], prefix: str = "") -> T:
    """The composed config as checked objects (``LabConfig`` holding ``ModelConfig``, ``DataConfig``, ...).

    Raises :class:`ConfigError` with one line naming the key: a required value left unset
    (``???``), an interpolation that fails, a value of the wrong type or out of range.
    """
    # here, not at the top: the model imports this module and no config tooling (tests/test_model.py)
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        plain = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    except MissingMandatoryValue as err:
        key = ".".join(part for part in (prefix, err.full_key) if part)
        raise ConfigError(f"{key} is not set: pass {key}=... on the command line") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{getattr(err, 'full_key', None) or prefix or 'config'}: {one_line(err)}") from None
    return from_mapping(schema, plain, prefix)
