"""alexnet_lab: a reproducible ablation lab for a downscaled AlexNet (Krizhevsky et al., 2012)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Imported on first use, so that `import alexnet_lab` stays cheap (no torch, no Lightning).
_INFERENCE = ("predict", "evaluate", "load_trained")


def __getattr__(name: str) -> Any:
    """``alexnet_lab.predict(ckpt, images)``, ``.evaluate(ckpt)``, ``.load_trained(ckpt)``: see alexnet_lab.inference."""
    if name in _INFERENCE:
        from alexnet_lab import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'alexnet_lab' has no attribute {name!r}")
