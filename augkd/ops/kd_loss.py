"""Fused knowledge-distillation loss: temperature softmax, KL(teacher || student) * T^2, hard-label CE,
per-sample weights, ignored rows, in one pass over the logits (see docs/ops-design.md, section 1)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import _checks, _registration, backends, reference

REDUCTIONS = ("none", "sum", "mean", "batchmean")
OP = "kd_loss"


def _validate(student, teacher, target, weight, temperature, alpha, reduction, teacher_format, ignore_index,
              check_range=True):
    _checks.tensor(OP, "student_logits", student)
    _checks.tensor(OP, "teacher_logits", teacher)
    if student.dim() < 1 or student.shape[-1] < 1:
        raise ValueError(f"{OP}: student_logits must have shape (..., C) with C >= 1 classes, "
                         f"got {tuple(student.shape)}")
    _checks.same(OP, "teacher_logits", teacher, "student_logits", student)
    temperature = reference.check_kd_temperature(OP, _checks.positive_float(OP, "temperature", temperature))
    alpha = _checks.unit_float(OP, "alpha", alpha)
    _checks.choice(OP, "reduction", reduction, REDUCTIONS)
    _checks.choice(OP, "teacher_format", teacher_format, tuple(reference.TEACHER_FORMATS))
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"{OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    lead = student.shape[:-1]
    if target is None:
        if alpha != 1.0:
            raise ValueError(f"{OP}: alpha={alpha} mixes in the hard-label CE, which needs a target; "
                             "pass target=... or alpha=1.0")
    else:
        _checks.tensor(OP, "target", target, floating=False)
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"{OP}: target must be an integer tensor of class indices, got {target.dtype}")
        if target.shape != lead:
            raise ValueError(f"{OP}: target must have shape {tuple(lead)} (the logits without the class "
                             f"dimension), got {tuple(target.shape)}")
        if target.device != student.device:
            raise ValueError(f"{OP}: target must be on {student.device}, got {target.device}")
        # A range check reads the labels (a host sync on GPUs): CPU tensors in eager mode only, and not for
        # the C++ CPU backend, whose kernel raises the same error while it reads the labels anyway.
        # Elsewhere the kernels turn an out-of-range label into a NaN row instead of reading out of bounds.
        if check_range and _checks.eager() and target.device.type == "cpu" and target.numel():
            classes = student.shape[-1]
            labels = target.detach().reshape(-1).to(torch.int64).numpy()
            # as unsigned, a negative label is huge: one comparison finds labels < 0 and >= C (numpy: a few
            # microseconds, where the same test as torch ops costs ~10 us on small batches)
            bad = (labels.view(np.uint64) >= classes) & (labels != ignore_index)
            if bad.any():
                raise ValueError(f"{OP}: target holds class index {int(labels[bad][0])}, outside [0, {classes}) "
                                 f"(and not ignore_index={ignore_index})")
    if weight is not None:
        _checks.tensor(OP, "weight", weight)
        if weight.shape != lead:
            raise ValueError(f"{OP}: weight must have shape {tuple(lead)} (one weight per row), "
                             f"got {tuple(weight.shape)}")
        if weight.device != student.device:
            raise ValueError(f"{OP}: weight must be on {student.device}, got {weight.device}")
    return temperature, alpha


def _per_row(backend, student, teacher, target, temperature, alpha, ignore_index, t2_scale, fmt, want_lse_t):
    """(loss rows, lse_t rows or None) from `backend`."""
    if backend == "torch":
        return reference.kd_loss_rows(student, teacher, target, temperature, alpha, ignore_index, t2_scale, fmt)
    loss, stats = _registration.call(backends.namespace_name(backend), "kd_loss", student.contiguous(),
                                     teacher.contiguous(), target, temperature, alpha, ignore_index, t2_scale, fmt)
    return loss, (stats[:, 1] if want_lse_t else None)  # slicing only when asked: each op costs us


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None = None, *,
            temperature: float = 1.0, alpha: float = 1.0, weight: torch.Tensor | None = None,
            ignore_index: int = -100, reduction: str = "batchmean", t2_scale: bool = True,
            teacher_format: str = "logits", return_teacher_energy: bool = False):
    """Knowledge-distillation loss, fused.

    Per row i (the last dimension holds the C classes; leading dimensions are rows)::

        loss_i = weight_i * (alpha * T^2 * KL(softmax(t_i / T) || softmax(s_i / T))
                             + (1 - alpha) * CE(s_i, target_i))

    CE is taken at temperature 1. Rows whose target is ``ignore_index`` contribute 0.

    Args:
        student_logits: (..., C) float16/bfloat16/float32/float64. Prediction first, teacher second
            (the torch loss order; the math reads KL(teacher || student)).
        teacher_logits: same shape, dtype and device. Gradients flow into it too when it requires grad
            (AuG-KD's generator backpropagates -KL through both networks).
        target: (...) integer class indices, or None (then ``alpha`` must be 1).
        temperature: T in [1e-15, 1e10], applied to both distributions of the KL term (outside that range
            T^2, 1/T or the KL leave the fp32 range: a ValueError).
        alpha: weight of the KL term in [0, 1]; a term whose weight is exactly 0 is left out.
        weight: optional (...) per-row weights multiplying each row's loss (gets a gradient too).
        ignore_index: target value marking rows to skip.
        reduction: ``"none"`` (per row), ``"sum"``, ``"mean"`` (sum / number of rows not ignored),
            ``"batchmean"`` (sum / number of rows, as torch's KLDivLoss). All rows ignored: 0, zero grads.
        t2_scale: multiply the KL term by T^2 (Hinton et al.); False drops it.
        teacher_format: ``"logits"``, ``"log_probs"`` or ``"probs"`` (offline soft labels). The teacher
            distribution is softmax(log(p) / T): probabilities are re-tempered by T.
        return_teacher_energy: also return the per-row teacher energy ``-T * logsumexp(t / T)`` computed in
            the same pass (meaningful for ``"logits"``; differentiable).

    Returns:
        The loss (fp32; fp64 for fp64 inputs): a scalar, or per row for ``"none"``; with
        ``return_teacher_energy`` a pair ``(loss, energy)``.
    """
    backend = backends.select(student_logits.device) if isinstance(student_logits, torch.Tensor) else "torch"
    temperature, alpha = _validate(student_logits, teacher_logits, target, weight, temperature, alpha,
                                   reduction, teacher_format, ignore_index, check_range=backend != "cpu")
    lead = student_logits.shape[:-1]
    classes = student_logits.shape[-1]
    student = student_logits.reshape(-1, classes)
    teacher = teacher_logits.reshape(-1, classes)
    flat_target = None if target is None else target.reshape(-1).to(torch.int64)
    fmt = reference.TEACHER_FORMATS[teacher_format]
    rows, lse_t = _per_row(backend, student, teacher, flat_target, temperature, alpha, int(ignore_index),
                           bool(t2_scale), fmt, return_teacher_energy)
    if weight is not None:
        rows = rows * weight.reshape(-1).to(rows.dtype)
    if reduction == "none":
        loss = rows.reshape(lead)
    elif reduction == "sum":
        loss = rows.sum()
    elif reduction == "batchmean":
        loss = rows.mean() if rows.shape[0] else rows.sum()  # sum / B; 0 (not NaN) for an empty batch
    else:  # mean over rows not ignored; counted on the device (no host sync), never 0/0
        if flat_target is None:
            loss = rows.mean() if rows.shape[0] else rows.sum()
        else:
            count = (flat_target != ignore_index).sum().clamp_min(1)
            loss = rows.sum() / count.to(rows.dtype)
    if return_teacher_energy:
        return loss, (-temperature * lse_t).reshape(lead)
    return loss


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`; the hyper-parameters live on the module.

    >>> criterion = KDLoss(temperature=4.0, alpha=0.5)
    >>> loss = criterion(student_logits, teacher_logits, target)
    """

    def __init__(self, *, temperature: float = 1.0, alpha: float = 1.0, ignore_index: int = -100,
                 reduction: str = "batchmean", t2_scale: bool = True, teacher_format: str = "logits"):
        super().__init__()
        reference.check_kd_temperature("KDLoss", _checks.positive_float("KDLoss", "temperature", temperature))
        _checks.unit_float("KDLoss", "alpha", alpha)
        _checks.choice("KDLoss", "reduction", reduction, REDUCTIONS)
        _checks.choice("KDLoss", "teacher_format", teacher_format, tuple(reference.TEACHER_FORMATS))
        self.temperature, self.alpha, self.ignore_index = float(temperature), float(alpha), ignore_index
        self.reduction, self.t2_scale, self.teacher_format = reduction, t2_scale, teacher_format

    def forward(self, student_logits, teacher_logits, target=None, weight=None):
        return kd_loss(student_logits, teacher_logits, target, temperature=self.temperature, alpha=self.alpha,
                       weight=weight, ignore_index=self.ignore_index, reduction=self.reduction,
                       t2_scale=self.t2_scale, teacher_format=self.teacher_format)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, reduction={self.reduction!r}, "
                f"t2_scale={self.t2_scale}, teacher_format={self.teacher_format!r}")
