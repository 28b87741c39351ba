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


# Numerics of the KD loss shared by every backend (docs/ops-design.md, "Precision"):
# the forward keeps the maximum and the log-sum of each distribution apart, and computes KL from
# rho_j = log p_t,j - log p_s,j as sum_j p_s,j phi(rho_j), phi(x) = 1 + (x - 1) e^x >= 0 (no cancellation).
PHI_SERIES_MAX = 0.25  # |rho| <= this: phi by its Taylor series (the closed form cancels there)
# phi(x) = x^2 * sum_k PHI_COEFFS[k] x^k, coefficient of x^n = (n - 1) / n!, n = 2 .. 12
PHI_COEFFS = (1 / 2, 1 / 3, 1 / 8, 1 / 30, 1 / 144, 1 / 840, 1 / 5760, 1 / 45360, 1 / 403200, 1 / 3991680,
              1 / 43545600)
# The kernels keep their one-pass KL (A / d_t - log d_t + log d_s) when it exceeds this fraction of the
# magnitude of its terms (relative error < ~64 roundings), and otherwise recompute it in a second sweep.
REFINE_RATIO = 1 / 64
# The temperatures for which every backend is tested against float64 (kd_loss): outside, T^2, 1/T or the KL
# leave the fp32 range for ordinary logits, so such a temperature is rejected.
TEMPERATURE_RANGE = (1e-15, 1e10)


def check_kd_temperature(op: str, temperature: float) -> float:
    lo, hi = TEMPERATURE_RANGE
    if not lo <= temperature <= hi:
        raise ValueError(f"{op}: temperature must be in [{lo:g}, {hi:g}] (the range where every backend is "
                         f"tested against float64), got {temperature!r}")
    return temperature


def phi_series(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = 1 + (x - 1) e^x = x e^x - expm1(x) by its Taylor series, for |x| <= PHI_SERIES_MAX (where
    the closed form cancels). fp32 needs the series to x^8 only (the next term is < 1e-8 of phi there)."""
    coeffs = PHI_COEFFS if x.dtype == torch.float64 else PHI_COEFFS[:7]
    poly = x * coeffs[-1] + coeffs[-2]
    for c in reversed(coeffs[:-2]):
        poly = poly * x + c
    return x * x * poly


def _h(x: torch.Tensor) -> torch.Tensor:
    """x / (1 + x) - log1p(x) (<= 0), by its series near 0 where the closed form cancels."""
    small = x.abs() < 1e-3
    xs = torch.where(small, x, torch.zeros_like(x))
    xl = torch.where(small, torch.ones_like(x), x)
    series = xs * xs * (-0.5 + xs * (2 / 3 - 0.75 * xs))
    return torch.where(small, series, xl / (1 + xl) - torch.log1p(xl))


def _row_max(x: torch.Tensor) -> torch.Tensor:
    """Per-row maximum as a constant (B, 1); 0 for a row of -inf (so x - max never computes -inf - -inf)."""
    m = x.detach().amax(-1, keepdim=True) if x.shape[-1] else x.new_zeros(x.shape[:-1] + (1,))
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def kd_kl_rows(a: torch.Tensor, b: torch.Tensor):
    """KL(softmax(a) || softmax(b)) per row, and L = logsumexp(a) - logsumexp(b), both accurate to a few
    roundings for any scale of a and b (a, b: the tempered teacher / student logits minus their row maxima).

    With log d = logsumexp, rho_j = (a_j - b_j) - L_hat, L_hat = log d_t - log d_s (as rounded):
        S0 = sum_j (p_t,j - p_s,j)     (p_t,j = p_s,j e^rho_j; ~ the rounding of L_hat, formed with expm1)
        S2 = sum_j p_s,j phi(rho_j)
        KL = S2 / (1 + S0) + h(S0),   L = L_hat + log1p(S0),   h(x) = x / (1 + x) - log1p(x)
    exactly (any L_hat); every term of S2 is >= 0, so nothing cancels at large T or for nearly equal
    distributions. A tiny negative result of rounding is clamped to 0.
    """
    log_ds = torch.logsumexp(b, dim=-1, keepdim=True)
    log_dt = torch.logsumexp(a, dim=-1, keepdim=True)
    l_hat = log_dt - log_ds
    p_s = torch.exp(b - log_ds)
    p_t = torch.exp(a - log_dt)
    either = (p_s + p_t) != 0  # both 0: the class is absent from both, it adds nothing
    rho = torch.where(either, a - b, 0.0) - l_hat
    # p_t - p_s = p_s expm1(rho) (rho <= 0) or -p_t expm1(-rho) (rho > 0): |expm1| <= 1, no overflow.
    # (expm1 of -|rho| written as a where: the autograd of |rho| would see a slope 0 at rho = 0, which a
    # large T makes common)
    neg = rho <= 0
    e = torch.expm1(torch.where(neg, rho, -rho))
    s0_terms = torch.where(either, torch.where(neg, p_s, -p_t) * e, 0.0)
    big = p_s + p_t * (torch.where(p_t == 0, 0.0, rho) - 1)  # p_t = 0: phi = 1, p_s phi = p_s
    small = rho.abs() <= PHI_SERIES_MAX
    s2_terms = torch.where(either, torch.where(small, p_s * phi_series(torch.where(small, rho, 0.0)), big), 0.0)
    s0 = s0_terms.sum(-1)
    s2 = s2_terms.sum(-1)
    kl = (s2 / (1 + s0) + _h(s0)).clamp_min(0)
    return kl, l_hat.squeeze(-1) + torch.log1p(s0)


def _teacher_logits(teacher: torch.Tensor, teacher_format: int) -> torch.Tensor:
    if teacher_format != TEACHER_FORMATS["probs"]:
        return teacher
    # log(0) = -inf: an absent class, with a zero gradient (not 0 * inf = NaN); NaN stays NaN
    zero = teacher == 0
    safe = torch.log(torch.where(zero, torch.ones_like(teacher), teacher))
    return torch.where(zero, torch.full_like(safe, float("-inf")), safe)


def kd_loss_rows(student, teacher, target, temperature: float, alpha: float, ignore_index: int,
                 t2_scale: bool, teacher_format: int):
    """Per-row KD loss (B,) and the teacher's lse_t = logsumexp(v / T) (B,), both differentiable.

    loss_i = alpha * c * KL(softmax(v/T) || softmax(s/T)) + (1 - alpha) * CE(s, y), c = T^2 or 1;
    exactly 0, with zero gradients, for rows whose target is ignore_index (whatever they hold). A term
    whose weight is exactly 0 is left out, so an infinite KL or CE does not turn into 0 * inf = NaN.
    Every logsumexp is taken from the row maximum ((x - max) / T, then max / T + log-sum where a total is
    needed), so logits offset by a large constant keep their accuracy.
    """
    acc = compute_dtype(student.dtype)
    s = student.to(acc)
    t = teacher.to(acc)
    v = _teacher_logits(t, teacher_format)
    m_t = _row_max(v)
    lse_t = (m_t / temperature + torch.logsumexp((v - m_t) / temperature, dim=-1, keepdim=True)).squeeze(-1)
    valid = None
    if target is not None:
        valid = target != ignore_index
        keep = valid.unsqueeze(-1)
        # an ignored row contributes exactly 0 whatever it holds: its inputs never reach the loss or gradients
        s = torch.where(keep, s, torch.zeros_like(s))
        v = _teacher_logits(torch.where(keep, t, torch.ones_like(t)), teacher_format)
        m_t = _row_max(v)
    m_s = _row_max(s)
    c = temperature * temperature if t2_scale else 1.0
    if alpha != 0:
        a, b = (v - m_t) / temperature, (s - m_s) / temperature
        kl, _ = kd_kl_rows(a, b)
        # The value is kl everywhere. Its autograd is accurate while KL is small (large T, close
        # distributions), but sums terms of size KL for a large KL (small T), where the textbook form's
        # gradient (p_s - p_t through log_softmax) is the accurate one: rows with KL >= 1 take that.
        log_ps, log_pt = torch.log_softmax(b, dim=-1), torch.log_softmax(a, dim=-1)
        p_t = torch.exp(log_pt)
        textbook = (p_t * (_safe_where_zero(p_t, log_pt) - _safe_where_zero(p_t, log_ps))).sum(-1)
        kl = torch.where(kl.detach() >= 1, textbook - textbook.detach() + kl.detach(), kl)
        loss = alpha * c * kl
    else:
        loss = s.new_zeros(s.shape[:-1])
    if target is not None:
        if alpha != 1:
            safe_target = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(-1)
            # CE = (max - s_y) + logsumexp(s - max): no rounding of a large logsumexp
            ce = ((m_s - s.gather(-1, safe_target)) + torch.logsumexp(s - m_s, dim=-1, keepdim=True)).squeeze(-1)
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

