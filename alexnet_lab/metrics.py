"""The numbers a run reports, from a confusion matrix (rows: true class, columns: predicted).

One definition, used by training's per-epoch metrics and by evaluation alike.
"""

from __future__ import annotations

import torch


def confusion_summary(confusion: torch.Tensor, classes: list[str]) -> dict[str, torch.Tensor]:
    """Metrics from a confusion matrix (rows: true class, columns: predicted), as 0-d tensors."""
    confusion = confusion.float()
    total = confusion.sum().clamp(min=1)
    true_counts = confusion.sum(dim=1)
    recall = confusion.diag() / true_counts.clamp(min=1)
    present = (true_counts > 0).float()  # a class absent from the split has no recall
    out = {
        "acc": confusion.diag().sum() / total,
        # mean recall over the classes present; 0 / 0 = nan when none is, and no host sync on a GPU
        "balanced_acc": (recall * present).sum() / present.sum(),
    }
    pred_frac = confusion.sum(dim=0) / total
    for i, name in enumerate(classes):
        out[f"recall/{name}"] = recall[i]
        out[f"pred_frac/{name}"] = pred_frac[i]
    return out
