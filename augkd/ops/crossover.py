"""Size crossovers: where a fused kernel costs more per call than the torch backend, "auto" runs torch.

At a few hundred elements a call's cost is fixed overhead (Python front end, autograd node, dispatch,
allocation), not the sweep over the data, and the fused path's fixed cost can exceed that of the few
torch ops it replaces. ``CROSSOVERS`` holds, per op and device type, the element count below which the
torch backend was measured cheaper, forward+backward (``python -m benchmarks.small_shapes``; the table
is in docs/profile.md). Both backends are tested against float64 references, so a choice made here
changes results by fp32 rounding at most. Only "auto" consults it: an explicitly requested backend runs.
"""
from __future__ import annotations

import math

from . import backends

# op -> kernel backend -> elements (rows x columns) below which the torch backend is cheaper; absent:
# the kernel at every size. Measured on CPU, one thread, forward+backward (docs/profile.md):
#   latent_mixup (L = 32): the torch backend 1.2x cheaper at 3,200 and 8,192 elements, even at 32,768
#   (0.98-1.10x), the kernel 1.2x cheaper at 65,536 and 1.4x at 131,072 -> crossover 16,384.
#   kd_loss, uncertainty and pixel_mixup: the kernel is cheaper at every size measured (from 640
#   elements), so they have no entry.
CROSSOVERS: dict[str, dict[str, int]] = {"latent_mixup": {"cpu": 16384}}


def cheaper_backend(op: str, shape, backend: str) -> str:
    """``backend`` (what "auto" picked for the device), or "torch" when the op's input of ``shape`` is
    below the measured crossover. A backend requested explicitly (AUGKD_BACKEND, use_backend) stays."""
    if backends.requested() != "auto":
        return backend
    limit = CROSSOVERS.get(op, {}).get(backend)
    if limit is None:
        return backend
    return "torch" if math.prod(shape) < limit else backend
