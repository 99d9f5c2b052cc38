"""What a run needs to survive a kill: its per-epoch history in every checkpoint, and
random numbers that depend only on (seed, epoch).

Lightning's checkpoints hold weights, optimizer, loop progress and callback states, but
not our metrics history, and not the global RNG that dropout draws from. Restoring the RNG
is not enough either: Lightning creates the first epoch's data iterator (which draws from
the RNG) before a resumed run's states are restored. So :class:`RunState` keeps the
history in its callback state and reseeds the global RNG from (seed, epoch) at the first
batch of every epoch (the augmentations have their own generator, seeded the same way in
the datamodule). A run resumed from an end-of-epoch ``last.ckpt`` then continues exactly
as if it had never stopped (same seed, CPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from alexnet_lab.data.sampling import epoch_seed

#: metrics.json statuses of a run that is over and must not be run again by ``resume=true``
FINISHED = ("ok", "diverged")


class RunState(pl.Callback):
    """Saves the module's ``history`` in checkpoints and restores it on resume; reseeds each epoch."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._module: pl.LightningModule | None = None
        self._restored_history: list[dict[str, float]] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._module = pl_module

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(getattr(self._module, "history", []))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_history = list(state_dict["history"])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored_history is not None:
            pl_module.history = self._restored_history
            self._restored_history = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:  # dropout's random numbers: a function of (seed, epoch) only
            torch.manual_seed(epoch_seed(self.seed, trainer.current_epoch))


def history_from_checkpoint(path: str | Path) -> list[dict[str, float]]:
    """The history stored in a checkpoint by :class:`RunState` (empty if it has none)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("RunState"):
            return list(state["history"])
    return []


def finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run dir's metrics.json if it records a finished run (ok or diverged), else None."""
    path = run_dir / "metrics.json"
    if not path.exists():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return metrics if metrics.get("status") in FINISHED else None
