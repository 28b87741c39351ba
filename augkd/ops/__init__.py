"""Fused ops for distillation: KD loss, uncertainty (energy, entropy) and anchor-masked mixup.

Each op has one schema and four backends side by side (Triton, CUDA C++, CPU C++, torch); see
`augkd.ops.backends` for how one is chosen and `python -m augkd.ops` for what this machine has.
"""

from . import _extension, _registration
from .backends import BackendUnavailable, use_backend
from .fused_linear_kd import FusedLinearKDLoss, fused_linear_kd_loss
from .kd_loss import KDLoss, kd_loss
from .mixup import anchor_mix, latent_mixup, pixel_mixup
from .topk_kd_loss import TopKKDLoss, topk_kd_loss
from .uncertainty import energy, entropy, max_softmax, uncertainty

if _extension.LOADED:
    _registration.register("augkd", fakes=True)

__all__ = [
    "kd_loss", "KDLoss", "uncertainty", "energy", "entropy", "max_softmax",
    "latent_mixup", "anchor_mix", "pixel_mixup", "use_backend", "BackendUnavailable",
    "fused_linear_kd_loss", "FusedLinearKDLoss", "topk_kd_loss", "TopKKDLoss",
]
