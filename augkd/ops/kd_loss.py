"""Fused knowledge-distillation loss: temperature softmax, KL(teacher || student) * T^2, hard-label CE,
per-sample weights, ignored rows, in one pass over the logits (see docs/ops-design.md, section 1)."""

from __future__ import annotations

import torch

try:  # only for a faster label check; the ops run without numpy
    import numpy as np
except ImportError:
    np = None
from torch import nn

from . import _checks, _registration, backends, kd_divergence, reference
from .specs.kd_loss import KD_STATS_LSE_T

REDUCTIONS = ("none", "sum", "mean", "batchmean", "token_mean")
OP = "kd_loss"
def _kd_temperature(op: str, name: str, value) -> float:
    return reference.check_kd_temperature(op, _checks.positive_float(op, name, value))


def _validate(student, teacher, target, temperature, alpha, reduction, teacher_format):
    _checks.tensor(OP, "student_logits", student)
    _checks.tensor(OP, "teacher_logits", teacher)
    if student.dim() < 1 or student.shape[-1] < 1:
        raise ValueError(f"{OP}: student_logits must have shape (..., C) with C >= 1 classes, "
                         f"got {tuple(student.shape)}")
    _checks.same(OP, "teacher_logits", teacher, "student_logits", student, dtype=False)
    temperature = _checks.scalar_parameter(OP, "temperature", temperature, _kd_temperature)
    alpha = _checks.scalar_parameter(OP, "alpha", alpha, _checks.unit_float)
    _checks.choice(OP, "reduction", reduction, REDUCTIONS)
    _checks.choice(OP, "teacher_format", teacher_format, tuple(reference.TEACHER_FORMATS))
    _checks.hard_target(OP, target, alpha, student.shape[:-1], student.device,
                        hint=" (the logits without the class dimension)")
    return temperature, alpha


def _check_labels(flat_target, classes: int, ignore_index: int | None, original_ignore_index) -> None:
    """Reject labels outside [0, C) that are not ignore_index. Reading the labels is a host sync on GPUs:
    CPU tensors in eager mode only. The C++ CPU backend's kernel raises the same error as it reads the
    labels, so the front end skips this for it; elsewhere the kernels turn an out-of-range label into a
    NaN row instead of reading out of bounds."""
    if not (_checks.eager() and not _checks.transformed() and flat_target.device.type == "cpu"
            and flat_target.numel()):
        return
    if np is None:
        labels = flat_target.detach()
        bad = (labels < 0) | (labels >= classes)
    else:
        # as unsigned, a negative label is huge: one comparison finds labels < 0 and >= C (numpy: a few
        # microseconds, where the same test as torch ops costs ~10 us on small batches)
        labels = flat_target.detach().numpy()
        bad = labels.view(np.uint64) >= classes
    if ignore_index is not None:  # None: an ignore_index outside int64, which no label equals
        bad &= labels != ignore_index
    if bad.any():
        raise ValueError(f"{OP}: target holds class index {int(labels[bad][0])}, outside [0, {classes}) "
                         f"(and not ignore_index={original_ignore_index})")


def _row_weights(weight, sample_weight, lead, classes, device):
    """The per-row weights from `sample_weight` or its older name `weight`, shape-checked."""
    if weight is not None and sample_weight is not None:
        raise ValueError(f"{OP}: pass the per-row weights as sample_weight or weight, not both")
    name, value = ("sample_weight", sample_weight) if sample_weight is not None else ("weight", weight)
    if value is None:
        return None
    _checks.tensor(OP, name, value)
    if value.shape != lead:
        hint = ""
        if name == "weight" and value.dim() == 1 and value.shape[0] == classes:
            hint = " (kd_loss has no per-class weights: its weights are one per row)"
        raise ValueError(f"{OP}: {name} must have shape {tuple(lead)} (one weight per row), "
                         f"got {tuple(value.shape)}{hint}")
    if name == "weight" and len(lead) == 1 and lead[0] == classes:
        # torch losses take a per-class `weight` of shape (C,): with B == C the two readings cannot be told
        # apart, so the old name is refused rather than guessed
        raise ValueError(f"{OP}: weight of shape ({classes},) with {classes} rows and {classes} classes could "
                         "be per class (as in torch's losses) or per row; kd_loss weights rows: pass "
                         "sample_weight=... instead")
    if value.device != device:
        raise ValueError(f"{OP}: {name} must be on {device}, got {value.device}")
    return value


def _per_row(backend, student, teacher, target, temperature, alpha, ignore_index, t2_scale, fmt, want_lse_t):
    """(loss rows, lse_t rows or None) from `backend`."""
    if backend == "torch":
        return reference.kd_loss_rows(student, teacher, target, temperature, alpha, ignore_index, t2_scale, fmt)
    loss, stats = _registration.call(backends.namespace(backend), "kd_loss", student.contiguous(),
                                     teacher.contiguous(), target, temperature, alpha, ignore_index, t2_scale, fmt)
    # slicing only when asked: each op costs us
    return loss, (stats[:, KD_STATS_LSE_T] if want_lse_t else None)


def _reduce(rows, lead, reduction, flat_target, ignore_index):
    if reduction == "none":
        return rows.reshape(lead)
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":  # torch's kl_div: sum / size(0) of the logits; 0 (not NaN) for no rows
        if len(lead) == 0 or lead.numel() == lead[0]:  # one row, or (B, C): the mean of the rows
            return rows.mean() if rows.shape[0] else rows.sum()
        return rows.sum() / lead[0] if lead[0] else rows.sum()
    # "mean" / "token_mean": over rows not ignored; counted on the device (no host sync), never 0/0
    if flat_target is None:
        return rows.mean() if rows.shape[0] else rows.sum()
    count = (flat_target != ignore_index).sum().clamp_min(1)
    return rows.sum() / count.to(rows.dtype)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None = None, *,
            temperature: float | torch.Tensor = 1.0, alpha: float | torch.Tensor = 1.0,
            sample_weight: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "batchmean",
            t2_scale: bool = True, teacher_format: str = "logits", return_teacher_energy: bool = False,
            weight: torch.Tensor | None = None, divergence: str = "kl", beta: float = 0.5,
            return_parts: bool = False):
    """Knowledge-distillation loss, fused.

    Per row i (the last dimension holds the C classes; leading dimensions are rows)::

        loss_i = sample_weight_i * (alpha * T^2 * KL(softmax(t_i / T) || softmax(s_i / T))
                                    + (1 - alpha) * CE(s_i, target_i))

    CE is taken at temperature 1. Rows whose target is ``ignore_index`` contribute 0.

    Args:
        student_logits: (..., C) float16/bfloat16/float32/float64. Prediction first, teacher second
            (the torch loss order; the math reads KL(teacher || student)).
        teacher_logits: same shape and device. A different floating dtype is promoted (a bf16 student
            with an fp32 teacher computes in fp32); each gradient comes back in its input's dtype.
            Gradients flow into it too when it requires grad (AuG-KD's generator backpropagates -KL
            through both networks).
        target: (...) integer class indices, or None (then ``alpha`` must be 1).
        temperature: T in [1e-15, 1e10], applied to both distributions of the KL term (outside that range
            T^2, 1/T or the KL leave the fp32 range: a ValueError). A one-element tensor that
            requires grad gets its gradient (computed by the torch backend).
        alpha: weight of the KL term in [0, 1]; a term whose weight is exactly 0 is left out. A tensor
            that requires grad gets its gradient, like ``temperature``.
        sample_weight: optional (...) per-row weights multiplying each row's loss (gets a gradient too).
        ignore_index: target value marking rows to skip (any int; one outside int64 matches no row).
        reduction: ``"none"`` (per row, leading shape), ``"sum"``, ``"batchmean"`` (sum / size(0), as
            torch's ``kl_div``: on (B, T, C) logits the sum over all B*T rows divided by B),
            ``"token_mean"`` (sum / number of rows not ignored) and ``"mean"`` (the same as
            ``"token_mean"``, like ``cross_entropy``'s mean). All rows ignored or no rows: 0, zero grads.
        t2_scale: multiply the KL term by T^2 (Hinton et al.); False drops it.
        teacher_format: ``"logits"``, ``"log_probs"`` or ``"probs"`` (offline soft labels). The teacher
            distribution is softmax(log(p) / T): probabilities are re-tempered by T.
        return_teacher_energy: also return the per-row teacher energy ``-T * logsumexp(t / T)`` computed in
            the same pass (meaningful for ``"logits"``; differentiable).
        weight: the former name of ``sample_weight``, still accepted when its shape cannot be mistaken
            for torch's per-class weight (refused when rows == classes for (B, C) logits).
        divergence: the soft term D(teacher p, student q), p = softmax(t / T), q = softmax(s / T), in place of
            KL above (docs/ops-design.md, "KD divergences"): ``"kl"`` KL(p || q); ``"reverse_kl"`` KL(q || p);
            ``"jsd"`` the generalized Jensen-Shannon divergence of TRL's ``generalized_jsd_loss``,
            beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q, where beta = 0 is
            KL(p || q) and beta = 1 is KL(q || p) as in TRL (the mixture formula would be 0 there);
            ``"tvd"`` 1/2 sum |p - q|. The T^2 factor (``t2_scale``) applies to every divergence (TRL and
            Liger do not scale: pass ``t2_scale=False`` to match them). Gradients flow into both logits.
        beta: the teacher's weight in the JSD mixture, in [0, 1] (only read for ``"jsd"``).
        return_parts: also return the soft and hard terms, each weighted and reduced like the loss:
            soft = c * D (c = T^2 with t2_scale), hard = CE (0 without a target), so that
            loss = alpha * soft + (1 - alpha) * hard (Liger's ``return_soft_hard_loss``); both differentiable.

    Returns:
        The loss (fp32; fp64 when an input is fp64): a scalar, or per row for ``"none"``; with
        ``return_teacher_energy`` a pair ``(loss, energy)``; with ``return_parts`` a triple
        ``(loss, soft, hard)``.
    """
    temperature, alpha = _validate(student_logits, teacher_logits, target, temperature, alpha, reduction,
                                   teacher_format)
    code, beta = kd_divergence.divergence_code(OP, divergence, beta)
    # the divergence op serves every divergence but today's KL, and KL when the parts are asked for
    use_divergence_op = divergence != "kl" or bool(return_parts)
    if use_divergence_op and return_teacher_energy:
        raise ValueError(f"{OP}: return_teacher_energy needs divergence='kl' and return_parts=False")
    lead = student_logits.shape[:-1]
    classes = student_logits.shape[-1]
    row_weights = _row_weights(weight, sample_weight, lead, classes, student_logits.device)
    kernel_ignore, outside_int64 = _checks.ignore_index(OP, ignore_index)
    # tensor hyper-parameters (differentiable) run the torch formulas, which autograd differentiates in them
    differentiable_params = isinstance(temperature, torch.Tensor) or isinstance(alpha, torch.Tensor)
    backend = "torch" if differentiable_params else backends.select(student_logits.device)

    if student_logits.dtype != teacher_logits.dtype:  # mixed precision: compute in the promoted dtype
        common = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
        student_logits, teacher_logits = student_logits.to(common), teacher_logits.to(common)
    student = student_logits.reshape(-1, classes)
    teacher = teacher_logits.reshape(-1, classes)
    # the C++ kernels read the labels as one contiguous int64 array (a column slice labels[:, 0] is not)
    flat_target = None if target is None else target.reshape(-1).to(torch.int64).contiguous()
    if flat_target is not None and (backend != "cpu" or outside_int64):
        _check_labels(flat_target, classes, None if outside_int64 else kernel_ignore, ignore_index)
    fmt = reference.TEACHER_FORMATS[teacher_format]
    if use_divergence_op:
        # log-probabilities are logits to softmax; probabilities become their logs (0 -> -inf, an absent class)
        teacher = reference._teacher_logits(teacher, fmt)
        parts = kd_divergence.per_row(backend, student, teacher, flat_target, temperature, alpha, kernel_ignore,
                                      bool(t2_scale), code, beta)
        if row_weights is not None:
            parts = tuple(r * row_weights.reshape(-1).to(r.dtype) for r in parts)
        reduced = tuple(_reduce(r, lead, reduction, flat_target, kernel_ignore) for r in parts)
        return reduced if return_parts else reduced[0]
    rows, lse_t = _per_row(backend, student, teacher, flat_target, temperature, alpha, kernel_ignore,
                           bool(t2_scale), fmt, return_teacher_energy)
    if row_weights is not None:
        rows = rows * row_weights.reshape(-1).to(rows.dtype)
    loss = _reduce(rows, lead, reduction, flat_target, kernel_ignore)
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
        _kd_temperature("KDLoss", "temperature", temperature)
        _checks.unit_float("KDLoss", "alpha", alpha)
        _checks.choice("KDLoss", "reduction", reduction, REDUCTIONS)
        _checks.choice("KDLoss", "teacher_format", teacher_format, tuple(reference.TEACHER_FORMATS))
        self.temperature, self.alpha, self.ignore_index = float(temperature), float(alpha), ignore_index
        self.reduction, self.t2_scale, self.teacher_format = reduction, t2_scale, teacher_format

    def forward(self, student_logits, teacher_logits, target=None, sample_weight=None, *, weight=None):
        return kd_loss(student_logits, teacher_logits, target, temperature=self.temperature, alpha=self.alpha,
                       sample_weight=sample_weight, weight=weight, ignore_index=self.ignore_index,
                       reduction=self.reduction, t2_scale=self.t2_scale, teacher_format=self.teacher_format)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, reduction={self.reduction!r}, "
                f"t2_scale={self.t2_scale}, teacher_format={self.teacher_format!r}")
