"""Plain torch formulas of every op: the torch backend, and (in float64) the tests' reference.

Each function mirrors one kernel contract of docs/ops-design.md but returns differentiable tensors,
so autograd provides the backward. Inputs are upcast to fp32 (fp64 stays fp64): the same precision
policy as the kernels.
"""

from __future__ import annotations

import torch

TEACHER_FORMATS = {"logits": 0, "log_probs": 1, "probs": 2}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _safe_where_zero(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # x where p != 0, else 0. Written so that neither the value nor the gradient sees 0 * (-inf);
    # `p == 0` (not `p > 0`) keeps NaN rows NaN.
    return torch.where(p == 0, torch.zeros_like(x), x)


def kd_loss_rows(student, teacher, target, temperature: float, alpha: float, ignore_index: int,
                 t2_scale: bool, teacher_format: int):
    """Per-row KD loss (B,) and the teacher's lse_t = logsumexp(v / T) (B,), both differentiable.

    loss_i = alpha * c * KL(softmax(v/T) || softmax(s/T)) + (1 - alpha) * CE(s, y), c = T^2 or 1;
    0 for rows whose target is ignore_index. A term whose weight is exactly 0 is left out, so an
    infinite KL or CE does not turn into 0 * inf = NaN.
    """
    acc = compute_dtype(student.dtype)
    s = student.to(acc)
    v = teacher.to(acc)
    if teacher_format == TEACHER_FORMATS["probs"]:
        v = torch.log(v)
    u = s / temperature
    w = v / temperature
    log_ps = torch.log_softmax(u, dim=-1)
    lse_t = torch.logsumexp(w, dim=-1)
    log_pt = w - lse_t.unsqueeze(-1)
    p_t = torch.exp(log_pt)
    kl = (p_t * (_safe_where_zero(p_t, log_pt) - _safe_where_zero(p_t, log_ps))).sum(-1)
    c = temperature * temperature if t2_scale else 1.0
    loss = alpha * c * kl if alpha != 0 else torch.zeros_like(kl)
    if target is not None:
        valid = target != ignore_index
        if alpha != 1:
            safe_target = torch.where(valid, target, torch.zeros_like(target))
            ce = torch.logsumexp(s, dim=-1) - s.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
            loss = loss + (1 - alpha) * ce
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, lse_t


def uncertainty(logits, temperature: float):
    """(energy, entropy) per row: energy = -T * logsumexp(z / T), entropy of softmax(z / T) in nats."""
    u = logits.to(compute_dtype(logits.dtype)) / temperature
    lse = torch.logsumexp(u, dim=-1)
    log_p = u - lse.unsqueeze(-1)
    p = torch.exp(log_p)
    entropy = -(p * _safe_where_zero(p, log_p)).sum(-1)
    return -temperature * lse, entropy


def latent_mixup(z, mask, psi, s):
    """(1 - s) * (mask * psi + (1 - mask) * z) + s * z  =  z + (1 - s) * mask * (psi - z)."""
    acc = compute_dtype(z.dtype)
    zf, mf, pf = z.to(acc), mask.to(acc), psi.to(acc)
    sf = s.to(acc) if isinstance(s, torch.Tensor) else s
    return (zf + (1 - sf) * mf * (pf - zf)).to(z.dtype)


def pixel_mixup(generated, real, s, mean=None, std=None):
    """((1 - s) * generated + s * real - mean_c) / std_c, per channel c of (B, C, H, W)."""
    acc = compute_dtype(generated.dtype)
    g, r = generated.to(acc), real.to(acc)
    sf = s.to(acc) if isinstance(s, torch.Tensor) else s
    out = g + sf * (r - g)
    if mean is not None:
        out = out - mean.to(acc).view(1, -1, 1, 1)
    if std is not None:
        out = out / std.to(acc).view(1, -1, 1, 1)
    return out.to(generated.dtype)

