"""Module 3's mixup factor f(e), the CE weight u(e), the optimiser and the learning-rate schedulers.

f is the share of the REAL sample in the mix: f = b at epoch 0, rising to 1 at epoch a*E and staying
there. At f = 1 the "mixed" image is the real image itself.
"""
from __future__ import annotations

import math

import torch

from .flat_adam import FlatAdam


def mixup_factor(epoch: int, total_epochs: int, a: float, b: float, kind: str = "linear") -> float:
    """linear: min(1, b + (1-b) e/(aE));  step: min(1, b + (1-b) trunc(10 e/(aE))/10)  (utils/scheduler.py)."""
    if total_epochs <= 0:
        return 1.0
    progress = epoch / (a * total_epochs)
    if kind == "linear":
        value = b + (1.0 - b) * progress
    elif kind == "step":
        value = b + (1.0 - b) * math.trunc(10.0 * progress) / 10.0
    else:
        raise ValueError(f"kind: expected 'linear' or 'step', got {kind!r}")
    return min(1.0, value)


def ce_weight(f: float, schedule: str = "tied", constant: float = 0.5) -> float:
    """u, the weight of the CE term (the KD term gets 1 - u). "tied": u = f; "constant": u = ``constant``."""
    if schedule == "tied":
        return float(f)
    if schedule == "constant":
        return float(constant)
    raise ValueError(f"schedule: expected 'tied' or 'constant', got {schedule!r}")


def adam(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam as every stage uses it: ``FlatAdam``, torch's foreach Adam with a one-pass CPU step over each
    group's tensors. Both compute the numbers of torch's CPU default, the per-tensor loop, bit for bit
    (tested), with fewer operator calls per step."""
    return FlatAdam(params, lr=lr, weight_decay=weight_decay, foreach=True)


def cosine(optimizer: torch.optim.Optimizer, t_max: int) -> torch.optim.lr_scheduler.LRScheduler:
    # T_max = 0 would divide by zero inside PyTorch; a zero-epoch stage never steps it anyway.
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, t_max))


def constant_warmup(optimizer: torch.optim.Optimizer, steps: int, factor: float) -> torch.optim.lr_scheduler.LRScheduler:
    """PyTorch's ConstantLR: lr * factor for the first ``steps`` scheduler steps, then lr."""
    if steps <= 0:
        factor, steps = 1.0, 0
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=factor, total_iters=steps)
