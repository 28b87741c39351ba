"""KD loss against a sparse teacher: the k (index, value) pairs per token that offline distillation datasets
store, instead of the teacher's full logits (docs/ops-design.md, section 4).

A student row is read in one sweep (its max and log-sum), then only the k gathered entries; the backward writes
the dense gradient in one sweep and overwrites the k entries. No B x V teacher tensor is ever built.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _checks, _registration, backends
from .reference import compute_dtype

OP = "topk_kd_loss"
REDUCTIONS = ("none", "sum", "mean", "token_mean", "batchmean")
VALUES = {"logits": 0, "log_probs": 1}
TAILS = {"renormalize": 0, "bucket": 1}
DIVERGENCES = {"kl": 0, "reverse_kl": 1}


def _safe(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x where p != 0, else 0 (no 0 * inf in the value or the gradient; NaN stays NaN)."""
    return torch.where(p == 0, torch.zeros_like(x), x)


def topk_kd_loss_rows(student, indices, values, target, temperature: float, alpha: float, ignore_index: int,
                      t2_scale: bool, values_format: int, tail: int, divergence: int):
    """Per-row loss (B,), differentiable in student and values: the torch backend and the tests' oracle.

    Teacher outcomes: the k entries (renormalize), or the k entries and the missing mass 1 - sum_k exp(v_k) of
    log-probabilities v (bucket), tempered as softmax(log P / T). Student: softmax(s / T) over the vocabulary
    at the k indices, plus its mass outside them (bucket); restricted to the k and renormalised for reverse KL
    with renormalize (the dense reverse KL of a k-supported teacher is infinite).
    """
    acc = compute_dtype(student.dtype)
    s = student.to(acc)
    v = values.to(acc)
    log_q = torch.log_softmax(s / temperature, -1)
    lq = log_q.gather(-1, indices)
    if tail == TAILS["bucket"]:
        missing = 1 - v.exp().sum(-1, keepdim=True)
        log_missing = torch.where(missing > 0, torch.log(missing.clamp_min(torch.finfo(acc).tiny)),
                                  torch.full_like(missing, -torch.inf))
        lp = torch.log_softmax(torch.cat([v, log_missing], -1) / temperature, -1)
        outside = torch.ones_like(log_q, dtype=torch.bool).scatter(-1, indices, False)
        q_rest = torch.where(outside, log_q.exp(), torch.zeros_like(log_q)).sum(-1, keepdim=True)
        lq = torch.cat([lq, torch.log(q_rest)], -1)
    else:
        lp = torch.log_softmax(v / temperature, -1)
        if divergence == DIVERGENCES["reverse_kl"]:
            lq = torch.log_softmax(lq, -1)
    if divergence == DIVERGENCES["kl"]:
        p = lp.exp()
        div = (p * (_safe(p, lp) - _safe(p, lq))).sum(-1)
    else:
        q = lq.exp()
        div = (q * (_safe(q, lq) - _safe(q, lp))).sum(-1)
    c = temperature * temperature if t2_scale else 1.0
    loss = alpha * c * div if alpha != 0 else torch.zeros_like(div)
    if target is not None:
        valid = target != ignore_index
        if alpha != 1:
            safe_target = torch.where(valid, target, torch.zeros_like(target))
            ce = torch.logsumexp(s, -1) - s.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
            loss = loss + (1 - alpha) * ce
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss


def _validate(student, indices, values, target, temperature, alpha, values_fmt, tail, divergence, ignore_index,
              reduction, check_range):
    _checks.tensor(OP, "student_logits", student)
    if student.dim() < 1 or student.shape[-1] < 1:
        raise ValueError(f"{OP}: student_logits must have shape (..., V) with V >= 1, got {tuple(student.shape)}")
    lead, vocab = student.shape[:-1], student.shape[-1]
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point or indices.dtype.is_complex \
            or indices.dtype == torch.bool:
        got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise TypeError(f"{OP}: teacher_indices must be an integer tensor of class indices, got {got}")
    if indices.dim() != student.dim() or indices.shape[:-1] != lead or not 1 <= indices.shape[-1] <= vocab:
        raise ValueError(f"{OP}: teacher_indices must have shape {tuple(lead) + ('k',)} with 1 <= k <= {vocab}, "
                         f"got {tuple(indices.shape)}")
    _checks.tensor(OP, "teacher_values", values)
    if values.shape != indices.shape:
        raise ValueError(f"{OP}: teacher_values must have the shape of teacher_indices {tuple(indices.shape)}, "
                         f"got {tuple(values.shape)}")
    for name, t in (("teacher_indices", indices), ("teacher_values", values)):
        if t.device != student.device:
            raise ValueError(f"{OP}: {name} must be on {student.device}, got {t.device}")
    temperature = _checks.positive_float(OP, "temperature", temperature)
    alpha = _checks.unit_float(OP, "alpha", alpha)
    _checks.choice(OP, "values", values_fmt, tuple(VALUES))
    _checks.choice(OP, "tail", tail, tuple(TAILS))
    _checks.choice(OP, "divergence", divergence, tuple(DIVERGENCES))
    _checks.choice(OP, "reduction", reduction, REDUCTIONS)
    if tail == "bucket" and values_fmt != "log_probs":
        raise ValueError(f"{OP}: tail='bucket' needs values='log_probs': logits of k classes say nothing about the "
                         "mass of the others")
    kernel_ignore, _ = _checks.ignore_index(OP, ignore_index)
    _checks.hard_target(OP, target, alpha, lead, student.device)
    # Reading indices and labels is a host sync on GPUs: CPU tensors in eager mode only. The C++ CPU kernel
    # checks the ranges itself while it reads them; duplicates are checked here for every CPU backend.
    if _checks.eager() and student.device.type == "cpu" and indices.numel():
        flat = indices.detach().reshape(-1, indices.shape[-1]).to(torch.int64)
        if check_range:
            bad = (flat < 0) | (flat >= vocab)
            if bool(bad.any()):
                raise ValueError(f"{OP}: teacher_indices holds class index {int(flat[bad][0])}, outside [0, {vocab})")
            if target is not None:
                _checks.labels_in_range(OP, target, vocab, kernel_ignore, ignore_index, "class index")
        if flat.shape[-1] > 1:
            ordered = flat.sort(-1).values
            dup = ordered[:, 1:] == ordered[:, :-1]
            if bool(dup.any()):
                row = int(dup.any(-1).nonzero()[0])
                raise ValueError(f"{OP}: teacher_indices row {row} repeats class {int(ordered[row, 1:][dup[row]][0])}; "
                                 "the k indices of a row must be distinct")
    return temperature, alpha, kernel_ignore


def topk_kd_loss(student_logits: torch.Tensor, teacher_indices: torch.Tensor, teacher_values: torch.Tensor,
                 target: torch.Tensor | None = None, *, values: str = "log_probs", tail: str = "renormalize",
                 temperature: float = 1.0, alpha: float = 1.0, divergence: str = "kl", ignore_index: int = -100,
                 reduction: str = "batchmean", t2_scale: bool = True) -> torch.Tensor:
    """KD loss of a student against a sparse top-k teacher, fused.

    Per row i with the student's tempered distribution q = softmax(s_i / T) over all V classes::

        loss_i = alpha * T^2 * D(teacher, student) + (1 - alpha) * CE(s_i, target_i)    (0 for ignored rows)

    Args:
        student_logits: (..., V) float16/bfloat16/float32/float64.
        teacher_indices: (..., k) integer class indices, distinct within a row, 1 <= k <= V.
        teacher_values: (..., k) the teacher's values at those indices (any float dtype; used in fp32).
        target: (...) class indices for the CE term, or None (then alpha must be 1).
        values: ``"log_probs"`` (log-softmax of the teacher at temperature 1, the usual stored form) or
            ``"logits"``.
        tail: ``"renormalize"``: the teacher is softmax(values / T) over its k classes, 0 elsewhere.
            ``"bucket"``: the teacher's missing mass 1 - sum_k exp(values) is one more outcome, compared with
            the student's mass outside the k classes (needs ``values="log_probs"``); the k + 1 teacher
            outcomes are tempered as softmax(log P / T) (exact at T = 1, where nothing is tempered).
        divergence: ``"kl"``: KL(teacher || student) = sum p (log p - log q) (with renormalize: the dense KL of
            the k-supported teacher against the full student). ``"reverse_kl"``: KL(student || teacher) over
            the same outcomes; with renormalize the student is restricted to the k classes and renormalised
            (the dense reverse KL would be infinite).
        temperature, alpha, ignore_index, t2_scale: as in :func:`kd_loss`.
        reduction: ``"none"``, ``"sum"``, ``"mean"`` / ``"token_mean"`` (sum / rows not ignored),
            ``"batchmean"`` (sum / ``student_logits.shape[0]``, as torch's KLDivLoss).

    Gradients flow into student_logits (and into teacher_values when it requires grad: that case runs the
    torch backend).

    Returns:
        fp32 loss (fp64 for fp64 input): a scalar, or the leading shape for ``"none"``.
    """
    backend = backends.select(student_logits.device) if isinstance(student_logits, torch.Tensor) else "torch"
    if isinstance(teacher_values, torch.Tensor) and teacher_values.requires_grad and torch.is_grad_enabled():
        backend = "torch"  # the kernels differentiate the student only
    # an ignore_index outside int64 becomes a sentinel no label holds
    temperature, alpha, ignore_index = _validate(student_logits, teacher_indices, teacher_values, target,
                                                 temperature, alpha, values, tail, divergence, ignore_index,
                                                 reduction, check_range=backend != "cpu")
    lead, vocab, k = student_logits.shape[:-1], student_logits.shape[-1], teacher_indices.shape[-1]
    student = student_logits.reshape(-1, vocab)
    acc = compute_dtype(student.dtype)
    idx = teacher_indices.reshape(-1, k).to(torch.int64)
    val = teacher_values.reshape(-1, k).to(acc)
    flat_target = None if target is None else target.reshape(-1).to(torch.int64)
    args = (temperature, alpha, int(ignore_index), bool(t2_scale), VALUES[values], TAILS[tail],
            DIVERGENCES[divergence])
    if backend == "torch":
        rows = topk_kd_loss_rows(student, idx, val, flat_target, *args)
    else:
        rows, _ = _registration.call(backends.namespace(backend), "topk_kd_loss", student.contiguous(),
                                     idx.contiguous(), val.contiguous(), flat_target, *args)
    if reduction == "none":
        return rows.reshape(lead)
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.sum() / max(student_logits.shape[0], 1) if student_logits.dim() > 1 else rows.sum()
    if flat_target is None:
        return rows.mean() if rows.shape[0] else rows.sum()
    count = (flat_target != ignore_index).sum().clamp_min(1)
    return rows.sum() / count.to(rows.dtype)


class TopKKDLoss(nn.Module):
    """Module form of :func:`topk_kd_loss`.

    >>> criterion = TopKKDLoss(temperature=2.0, alpha=0.5, tail="bucket", reduction="token_mean")
    >>> loss = criterion(student_logits, batch["topk_indices"], batch["topk_logprobs"], labels)
    """

    def __init__(self, *, values: str = "log_probs", tail: str = "renormalize", temperature: float = 1.0,
                 alpha: float = 1.0, divergence: str = "kl", ignore_index: int = -100, reduction: str = "batchmean",
                 t2_scale: bool = True):
        super().__init__()
        name = "TopKKDLoss"
        _checks.choice(name, "values", values, tuple(VALUES))
        _checks.choice(name, "tail", tail, tuple(TAILS))
        _checks.choice(name, "divergence", divergence, tuple(DIVERGENCES))
        _checks.choice(name, "reduction", reduction, REDUCTIONS)
        _checks.positive_float(name, "temperature", temperature)
        _checks.unit_float(name, "alpha", alpha)
        self.kwargs = dict(values=values, tail=tail, temperature=float(temperature), alpha=float(alpha),
                           divergence=divergence, ignore_index=ignore_index, reduction=reduction, t2_scale=t2_scale)

    def forward(self, student_logits, teacher_indices, teacher_values, target=None):
        return topk_kd_loss(student_logits, teacher_indices, teacher_values, target, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
