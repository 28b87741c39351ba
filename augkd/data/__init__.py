"""Data for augkd: the embedded digits benchmarks and user image folders.

Public API (other modules code against these names):

- ``Split``, ``Domain``, ``DomainShift``: in-memory containers (images float32 in [0, 1], NOT normalised).
- ``load_setting(name, ...)``: build a ``DomainShift`` ("digits-shift", "digits-shift-rev", "folders").
- ``SETTINGS``: the accepted setting names.
- ``normalize(x, mean, std)``: per-channel normalisation of a (B, C, H, W) batch (differentiable).
- ``augment(x, pad=2, hflip=False, generator=None)``: random shift (and optional flip) per sample.
- ``save_splits`` / ``load_splits``: the split indices as JSON, for the run directory.
"""
from .containers import Domain, DomainShift, Split
from .settings import SETTINGS, load_setting
from .splits import load_splits, save_splits
from .transforms import augment, normalize

__all__ = [
    "Split",
    "Domain",
    "DomainShift",
    "SETTINGS",
    "load_setting",
    "normalize",
    "augment",
    "save_splits",
    "load_splits",
]
