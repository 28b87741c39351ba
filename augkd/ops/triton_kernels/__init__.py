"""Triton backend of the augkd ops: fused forward / backward kernels registered as
``augkd_triton::<name>`` with the schemas of ``augkd.ops.specs`` (math: docs/ops-design.md).

``AVAILABLE`` says whether the ops are registered; ``WHY_UNAVAILABLE`` gives the reason when not
(importing this package never raises); ``OPS`` maps op names to ``torch.ops.augkd_triton.<name>``.
Under TRITON_INTERPRET=1 (set before importing triton) the ops also run on CPU tensors.
"""

from __future__ import annotations

from ..specs import OP_NAMES

AVAILABLE = False
WHY_UNAVAILABLE = ""
OPS: dict = {}
INTERPRET = False  # TRITON_INTERPRET=1: kernels run in the interpreter, on CPU tensors too

try:
    import torch

    from . import kd_divergence, kd_loss, mixup, topk_kd_loss, uncertainty  # noqa: F401  (registers the ops)
    from ._common import INTERPRET

    OPS = {name: getattr(torch.ops.augkd_triton, name) for name in OP_NAMES}
    AVAILABLE = True
except Exception as exc:  # triton missing or broken, or an incompatible torch
    WHY_UNAVAILABLE = f"{type(exc).__name__}: {exc}"

__all__ = ["AVAILABLE", "WHY_UNAVAILABLE", "OPS", "OP_NAMES", "INTERPRET"]
