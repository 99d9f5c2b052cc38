"""Packed sweeps: which jobs of a sweep can train side by side as one packed model, and why others cannot.

``python train.py -m ... hydra/sweeper=packed`` (hydra_plugins/alexnet_lab_packed) makes every job's
run dir and checked config as Hydra would, then :func:`plan` groups the jobs: jobs whose resolved
configs agree on every key but those in :data:`MAY_DIFFER` share a pack (at most ``max_size`` of
them), so the shapes, the optimizer class, the epoch count, the data set and its split are one per
pack. A job whose settings the packed engine cannot keep per run (:func:`alone_reason`) trains
alone, the ordinary way. Each pack is written to a pack file (:func:`write_pack`) and given to the
launcher beneath as one job, which trains it with :func:`alexnet_lab.packed.train_pack`.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alexnet_lab.errors import ConfigError
from alexnet_lab.identity import flatten, format_value

#: Config keys (glob patterns) whose values may differ between the members of one pack: each
#: member has its own weights, seed (initialisation, data order, augmentation, dropout), sampler,
#: augmentation, dropout and optimizer parameter group. ``optim.name`` (the optimizer class) is one
#: per pack: see :data:`ONE_PER_PACK`.
VARIED = ("seed", "model.dropout", "optim.*", "data.balance", "data.augment", "data.augmentation.*", "ckpt_path")
#: Keys that may differ too but change nothing a pack shares: thresholds, loggers, names, paths.
PER_RUN = (
    "verdicts.*",
    "divergence.*",
    "logger.*",
    "run_name",
    "resume",
    "pack",
    "paths.*",
    "data.progress",
    "data.workers",
)
MAY_DIFFER = VARIED + PER_RUN
#: Keys that a pattern of :data:`MAY_DIFFER` covers but that must agree within a pack.
ONE_PER_PACK = ("optim.name",)

#: Lightning settings a pack cannot keep per member: a job with one of them trains alone.
#: {trainer key: (the values a pack takes: Lightning's or the lab's default, why another cannot be)}
TRAINER_ALONE: dict[str, tuple[tuple[Any, ...], str]] = {
    "strategy": (("auto",), "one process trains a pack"),
    "devices": ((1, "1", "auto", [0]), "a pack trains on one device"),
    "num_nodes": ((1,), "a pack trains on one device"),
    "overfit_batches": ((0, 0.0), "a pack draws every member's own batches"),
    "fast_dev_run": ((False, 0), "a pack's checkpoints are per member"),
    "max_steps": ((-1,), "a pack's steps are not its members' steps"),
    "min_steps": ((None,), "a pack's steps are not its members' steps"),
    "min_epochs": ((None,), "each member of a pack stops on its own"),
    "max_time": ((None,), "each member of a pack stops on its own"),
}
#: Callbacks (their ``_target_``) a pack keeps per member, or once for the pack (progress bars, summaries).
PACK_CALLBACKS = (
    "alexnet_lab.callbacks.TensorBoardInspection",
    "pytorch_lightning.callbacks.EarlyStopping",
    "pytorch_lightning.callbacks.RichProgressBar",
    "pytorch_lightning.callbacks.TQDMProgressBar",
    "pytorch_lightning.callbacks.RichModelSummary",
    "pytorch_lightning.callbacks.ModelSummary",
)


#: How a pack's training step runs its members (hydra.sweeper.form): ``fused`` as one stacked net
#: (alexnet_lab.model.AlexNetStack: grouped convolutions, batched matmuls), ``in_turn`` each member's own
#: net one after another (bit for bit the run alone, on a CPU), ``auto`` whichever a few timed steps of
#: each on the device at hand say is faster.
FORMS = ("auto", "fused", "in_turn")
#: auto trains fused only where a fused step measured at least this much faster: the two forms' numbers agree to
#: float rounding only, which many epochs can grow into another run, so a choice near even (2 CPU cores,
#: 12 members at 64 px: 1.11-1.17) must not flip between two runs of one command; clear wins are 1.3-1.6 (8 at
#: 64 px, downscale 16) and clear losses 0.4-0.8 (256 px, or downscale 4)
FUSED_AT_LEAST = 1.2


@dataclass
class PackJob:
    """One job of the sweep as the pack sees it: Hydra's job number, its run dir, overrides and resolved config."""

    job: int
    run_dir: str
    overrides: list[str]
    config: dict[str, Any]  # resolved, plain: what train() would load


@dataclass
class Pack:
    """Jobs trained side by side as one packed model; ``alone``: why this one job trains the ordinary way."""

    jobs: list[PackJob]
    alone: str | None = None
    max_size: int = 0  # the limit the plan was made with (named by an out-of-memory error)
    differs: list[str] = field(default_factory=list)  # what tells this pack's settings from the first pack's
    group: int = 0  # packs of one group share every setting: a group larger than max_size is split
    form: str = "auto"  # one of FORMS

    def to_json(self) -> dict[str, Any]:
        jobs = [asdict(job) for job in self.jobs]
        return {"jobs": jobs, "alone": self.alone, "max_size": self.max_size, "form": self.form}


def may_differ(key: str) -> bool:
    """Whether members of one pack may have different values of config key ``key``."""
    return key not in ONE_PER_PACK and any(fnmatch.fnmatchcase(key, pattern) for pattern in MAY_DIFFER)


def pack_key(config: Mapping[str, Any]) -> dict[str, Any]:
    """What every member of a pack shares: the flattened config without the keys that may differ."""
    return {key: value for key, value in sorted(flatten(config).items()) if not may_differ(key)}


def alone_reason(config: Mapping[str, Any]) -> str | None:
    """Why a job cannot train in a pack (it trains alone, the ordinary way), or None."""
    scheduler = (config.get("scheduler") or {}).get("name", "none")
    if scheduler != "none":
        return f"scheduler={scheduler}: a pack steps no learning-rate schedule"
    trainer = config.get("trainer") or {}
    for key, (packable, why) in TRAINER_ALONE.items():
        if key in trainer and trainer[key] not in packable:
            return f"trainer.{key}={format_value(trainer[key])}: {why}"
    for name, spec in (config.get("callbacks") or {}).items():
        if spec is not None and spec.get("_target_") not in PACK_CALLBACKS:
            return f"callbacks.{name}: a pack keeps only {', '.join(t.rsplit('.', 1)[1] for t in PACK_CALLBACKS)}"
    return None


def plan(jobs: Sequence[PackJob], max_size: int, form: str = "auto") -> list[Pack]:
    """The sweep's jobs as packs, in the order of their first job: one pack per shared key, split to ``max_size``.

    A group larger than ``max_size`` becomes packs of near-equal size (20 at 16: 10 and 10).
    """
    groups: dict[str, list[PackJob]] = {}
    keys: dict[str, dict[str, Any]] = {}
    alone: dict[str, str] = {}
    for job in jobs:
        reason = alone_reason(job.config)
        if reason:
            text = f"alone {job.job}"
            alone[text] = reason
        else:
            key = pack_key(job.config)
            text = json.dumps(key, sort_keys=True, default=str)
            keys[text] = key
        groups.setdefault(text, []).append(job)
    packs: list[Pack] = []
    first = next(iter(keys.values()), {})
    for group, (text, members) in enumerate(groups.items()):
        if text in alone:
            packs.append(Pack(members, alone=alone[text], max_size=max_size, group=group, form=form))
            continue
        size = math.ceil(len(members) / math.ceil(len(members) / max_size))
        differs = key_differences(first, keys[text])
        for start in range(0, len(members), size):
            pack = Pack(members[start : start + size], max_size=max_size, differs=differs, group=group, form=form)
            packs.append(pack)
    return packs


def key_differences(first: Mapping[str, Any], other: Mapping[str, Any]) -> list[str]:
    """``other``'s settings that differ from ``first``'s, as overrides: ``model.downscale=8``."""
    missing = object()
    found = []
    for key in sorted(set(first) | set(other)):
        old, new = first.get(key, missing), other.get(key, missing)
        if old != new or type(old) is not type(new):
            found.append(f"~{key}" if new is missing else f"{key}={format_value(new)}")
    return found


def job_numbers(jobs: Sequence[PackJob]) -> str:
    """``#0-3, 8, 10-11``: the jobs' numbers, runs of consecutive ones shortened."""
    numbers = sorted(job.job for job in jobs)
    spans: list[list[int]] = []
    for number in numbers:
        if spans and number == spans[-1][-1] + 1:
            spans[-1].append(number)
        else:
            spans.append([number])
    return "#" + ", ".join(f"{span[0]}-{span[-1]}" if len(span) > 1 else f"{span[0]}" for span in spans)


def describe(packs: Sequence[Pack], max_size: int) -> list[str]:
    """The plan as lines: which jobs went into which pack, what varies inside it, why packs are apart."""
    jobs = sum(len(pack.jobs) for pack in packs)
    form = packs[0].form if packs else "auto"
    how = f"each pack times fused against in turn, fused if {FUSED_AT_LEAST:g}x as fast" if form == "auto" else form
    how = how.replace("in_turn", "in turn")
    lines = [f"packed sweep: {jobs} jobs in {len(packs)} packs (at most {max_size} members a pack; {how})"]
    base = next((index for index, pack in enumerate(packs) if pack.alone is None), 0)  # the settings compared with
    for index, pack in enumerate(packs):
        head = f"  pack {index}: {len(pack.jobs)} job{'s' * (len(pack.jobs) != 1)} ({job_numbers(pack.jobs)})"
        if pack.alone is not None:
            lines.append(f"{head} trains alone: {pack.alone}")
            continue
        flat = [flatten(job.config) for job in pack.jobs]
        varied = sorted(
            key
            for key in set().union(*flat)
            if any(fnmatch.fnmatchcase(key, pattern) for pattern in VARIED)
            and len({repr(r.get(key)) for r in flat}) > 1
        )
        parts = [
            f"members differ in {', '.join(varied)}" if varied else "one job" if len(flat) == 1 else "no differences"
        ]
        if index and packs[index - 1].group == pack.group:
            parts.append(f"split from pack {index - 1}: at most {max_size} members a pack")
        elif pack.differs:
            parts.append(f"cannot share a pack with pack {base}: {', '.join(pack.differs)}")
        lines.append(f"{head}: {'; '.join(parts)}")
    return lines


def write_pack(pack: Pack, path: Path) -> Path:
    """The pack file a pack job reads (:func:`alexnet_lab.packed.train_pack`): its jobs, their configs, the limit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pack.to_json(), indent=1, default=str) + "\n")
    return path


def read_pack(path: Any) -> Pack:
    """The pack a pack file holds; a value of ``pack=`` that names none is one line (ConfigError)."""
    if not isinstance(path, (str, Path)):
        raise ConfigError(f"pack={format_value(path)}: must be a pack file's path (hydra/sweeper=packed sets it)")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"pack={path}: not a pack file ({type(err).__name__}); hydra/sweeper=packed writes them"
        ) from None
    jobs = [PackJob(**job) for job in data["jobs"]]
    return Pack(jobs, alone=data["alone"], max_size=int(data["max_size"]), form=str(data.get("form", "auto")))
