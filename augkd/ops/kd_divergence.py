"""The divergence family of :func:`augkd.ops.kd_loss` (``divergence=`` "reverse_kl", "jsd", "tvd", and "kl" when
the per-row parts are asked for): the per-row terms from the `kd_divergence` op of the chosen backend
(docs/ops-design.md, "KD divergences").

The op returns the per-row loss and statistics whose columns D (the divergence) and CE (the hard-label term) are
the parts; its backward takes a gradient on each, so the parts are differentiable on every backend.
"""

from __future__ import annotations

from . import _checks, _registration, backends
from .divergence_reference import DIVERGENCES, kd_divergence_rows
from .specs.kd_divergence import STATS_CE, STATS_D


def divergence_code(op: str, divergence, beta) -> tuple[int, float]:
    """(the op's divergence code, beta as a float), checked. TRL's generalized_jsd_loss takes beta = 0 as
    KL(teacher || student) and beta = 1 as KL(student || teacher) (the mixture formula itself is 0 at both
    ends), and so does this op."""
    _checks.choice(op, "divergence", divergence, tuple(DIVERGENCES))
    beta = _checks.unit_float(op, "beta", beta)
    if divergence == "jsd" and beta == 0.0:
        return DIVERGENCES["kl"], beta
    if divergence == "jsd" and beta == 1.0:
        return DIVERGENCES["reverse_kl"], beta
    return DIVERGENCES[divergence], beta


def per_row(backend: str, student, teacher, target, temperature, alpha, ignore_index: int, t2_scale: bool,
            code: int, beta: float):
    """(loss, soft, hard) per row: loss = alpha soft + (1 - alpha) hard, soft = c D (c = T^2 with t2_scale),
    hard = CE at temperature 1 (0 without a target); all 0 on ignored rows."""
    c = temperature * temperature if t2_scale else 1.0
    if backend == "torch":
        loss, div, ce = kd_divergence_rows(student, teacher, target, temperature, alpha, ignore_index, t2_scale,
                                           code, beta)
        return loss, c * div, ce
    loss, stats = _registration.call(backends.namespace(backend), "kd_divergence", student.contiguous(),
                                     teacher.contiguous(), target, temperature, alpha, ignore_index, t2_scale,
                                     code, beta)
    return loss, c * stats[:, STATS_D], stats[:, STATS_CE]
