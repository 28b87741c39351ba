"""What every stage receives: the config, the device, the data (already on the device), the run paths,
the logger and the progress-bar policy."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from tqdm import tqdm

from ..config import RunConfig
from ..data import DomainShift, Split, normalize
from ..distributed import Dist

NCHW_ENV = "AUGKD_CPU_NCHW"  # 1: keep the networks in NCHW on CPU too (benchmarks compare the two layouts)


class SimulatedKill(RuntimeError):
    """Raised by the test hook AUGKD_DEBUG_KILL_AFTER=<stage>:<epoch> right after that epoch's checkpoint."""


@dataclass
class Context:
    cfg: RunConfig
    device: torch.device
    data: DomainShift
    run_dir: str
    log: logging.Logger
    quiet: bool = False
    resume: bool = False
    # Stage name -> directory for that stage's resumable state and final artefact. The pipeline points
    # shareable stages (teacher, Module 1, Module 2) at a cache when `augkd compare` runs.
    stage_dirs: dict[str, str] = field(default_factory=dict)
    dist: Dist = field(default_factory=Dist)  # data-parallel processes (torchrun); one by default
    # Stage name -> digest of the configuration its output depends on (method/digests.py); every
    # artefact records it and an artefact with another digest is refused.
    digests: dict[str, str] = field(default_factory=dict)
    lock: Any = None  # the run directory's lock (rundir.RunLock), held for the run's life
    _norm_stats: dict = field(default_factory=dict, repr=False)  # (device, dtype) -> (mean, std), see normalize

    @property
    def mean(self):
        return self.data.mean

    @property
    def std(self):
        return self.data.std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel, as ``augkd.data.normalize`` computes it, with the two
        per-channel tensors built (and std checked) once per device and dtype instead of on every call."""
        key = (x.device, x.dtype)
        stats = self._norm_stats.get(key)
        if stats is None:
            if x.dim() != 4:
                return normalize(x, self.data.mean, self.data.std)  # its error names the problem
            probe = x.new_zeros((1, x.shape[1], 1, 1))
            normalize(probe, self.data.mean, self.data.std)  # the same checks, once
            channels = x.shape[1]
            with torch.inference_mode(False):  # ordinary tensors even when first asked for in an evaluation
                mean = torch.as_tensor(self.data.mean, dtype=x.dtype, device=x.device).reshape(-1)
                std = torch.as_tensor(self.data.std, dtype=x.dtype, device=x.device).reshape(-1)
                stats = (mean.expand(channels).reshape(1, -1, 1, 1).clone(),
                         std.expand(channels).reshape(1, -1, 1, 1).clone())
            self._norm_stats[key] = stats
        if x.dim() != 4 or x.shape[1] != stats[0].shape[1]:
            return normalize(x, self.data.mean, self.data.std)
        return (x - stats[0]) / stats[1]

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move a network to the run's device in the memory format its convolutions run fastest in there.

        CPU: channels-last (NHWC). The small CNNs here run 1.5-2.5x faster forward+backward in it with
        oneDNN (and max pooling about 10x: the NCHW CPU kernel is far slower at these sizes); results
        agree with NCHW to fp32 rounding. Other devices keep the default layout (not measured here).
        A module without 4-D parameters is only moved.
        """
        fmt = torch.channels_last if self.device.type == "cpu" and os.environ.get(NCHW_ENV) != "1" else None
        if fmt is None:
            return module.to(self.device)
        return module.to(self.device, memory_format=fmt)

    def stage_dir(self, stage: str) -> str:
        d = self.stage_dirs.get(stage, os.path.join(self.run_dir, "checkpoints"))
        os.makedirs(d, exist_ok=True)
        return d

    def bar(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", leave: bool = False):
        """tqdm with ETA, silent when --quiet or when stderr is not a terminal (logs, CI)."""
        disable = self.quiet or not sys.stderr.isatty() or not self.dist.is_main
        return tqdm(iterable, total=total, desc=desc, leave=leave, disable=disable, dynamic_ncols=True)


def split_to(split: Split, device: torch.device) -> Split:
    return Split(split.images.to(device), split.labels.to(device))


def data_to(data: DomainShift, device: torch.device) -> DomainShift:
    """The whole benchmark fits in memory: move it once instead of per batch."""
    from ..data import Domain

    def dom(d: Domain) -> Domain:
        return Domain(d.name, split_to(d.train, device), split_to(d.val, device), split_to(d.test, device))

    return DomainShift(
        name=data.name,
        teacher=dom(data.teacher),
        student=dom(data.student),
        num_classes=data.num_classes,
        image_shape=tuple(data.image_shape),
        mean=tuple(data.mean),
        std=tuple(data.std),
        class_names=list(data.class_names),
        splits=data.splits,
    )
