"""alexnet_lab: a reproducible ablation lab for a downscaled AlexNet (Krizhevsky et al., 2012)."""

__version__ = "0.1.0"
