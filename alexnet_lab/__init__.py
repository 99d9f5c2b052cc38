"""alexnet_lab: a reproducible ablation lab for a downscaled AlexNet (Krizhevsky et al., 2012)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time they are imported on first use
    from alexnet_lab.inference import evaluate, load_trained, predict

__version__ = "0.1.0"
__all__ = ["evaluate", "load_trained", "predict"]


def __getattr__(name: str) -> Any:
    """``alexnet_lab.predict``, ``.evaluate``, ``.load_trained``: imported from inference.py on first use.

    So that ``import alexnet_lab`` (which every command does) stays cheap: no torch, no Lightning.
    """
    if name in __all__:
        from alexnet_lab import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'alexnet_lab' has no attribute {name!r}")
