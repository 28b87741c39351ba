"""Plain containers that every training stage receives.

They hold tensors already in memory: the benchmarks here are small (a few thousand 32x32 images), so
one eager copy is simpler and faster than a Dataset/DataLoader pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Split:
    """One split (train, val or test) of one domain."""

    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1], NOT normalised
    labels: torch.Tensor  # (N,) int64

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise ValueError(f"images: expected a (N, C, H, W) tensor, got shape {tuple(self.images.shape)}")
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"labels: expected shape ({self.images.shape[0]},) to match images, got {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Domain:
    """The three splits of one domain (teacher domain or student domain)."""

    name: str
    train: Split
    val: Split
    test: Split


@dataclass
class DomainShift:
    """Everything a stage needs to know about the data of one OOD-KD setting."""

    name: str  # "digits-shift", "digits-shift-rev" or "folders:<root>"
    teacher: Domain
    student: Domain
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    # Per-channel normalisation applied to every network input. Computed from the teacher TRAIN split:
    # the teacher was trained with these statistics, and the student/generator pipeline must feed the
    # teacher inputs it was trained on (the official code uses fixed ImageNet statistics for the same
    # reason: its teacher was ImageNet-pretrained).
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    splits: dict = field(default_factory=dict)  # JSON-serialisable index lists (save in the run dir)
