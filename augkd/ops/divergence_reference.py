"""Torch formulas of the KD divergence family (docs/ops-design.md, "KD divergences"): the torch backend of the
`kd_divergence` op, and the plain textbook formulas the tests (in float64) and the benchmarks compare against.

Teacher p = softmax(t / T), student q = softmax(s / T), rho_j = log p_j - log q_j. Every divergence is written
per class from x_j = expm1(-|rho_j|) in [-1, 0] and the larger of p_j, q_j (the "base"), so no term overflows,
none is 0 * inf where a class is masked (-inf) on one side, and none cancels when p and q are close:

    kl          KL(p || q):   base q: k(x)  (p <= q),       base p: j(x)  (p > q)
    reverse_kl  KL(q || p):   base q: j(x),                 base p: k(x)
    jsd         beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q:
                              base q: F_beta(x),            base p: F_(1-beta)(x)
    tvd         1/2 sum |p - q|:  -x / 2 on either base

with k(x) = (1 + x) log1p(x) - x, j(x) = x - log1p(x), F_b(x) = b k(x) - k(b x) (all >= 0, taken from their
series near 0). The offset L = log d_t - log d_s inside rho is formed as log1p((d_t - d_s) / d_s), with
d_t - d_s summed per class through expm1 (accurate when T is large and every rho is tiny).
"""

from __future__ import annotations

import torch

from .reference import _row_max, compute_dtype

DIVERGENCES = {"kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3}
# |x| below which k and j are taken from their series (the closed forms cancel there). fp32 needs the terms
# up to x^9, fp64 up to x^19 (the next term is below one rounding of the sum at |x| = SERIES_MAX).
SERIES_MAX = 0.125
SERIES_TERMS = {torch.float32: 9, torch.float64: 19}


def _series(y: torch.Tensor, coeff, terms: int) -> torch.Tensor:
    """y^2 * sum_{n=2..terms} coeff(n) y^(n-2) by Horner (y = -x >= 0, every term positive)."""
    poly = torch.full_like(y, coeff(terms))
    for n in range(terms - 1, 1, -1):
        poly = poly * y + coeff(n)
    return y * y * poly


def _small(x: torch.Tensor):
    return -x <= SERIES_MAX


def k_fn(x: torch.Tensor) -> torch.Tensor:
    """k(x) = (1 + x) log1p(x) - x for x in [-1, 0]; k(-1) = 1."""
    small = _small(x)
    series = _series(torch.where(small, -x, 0.0), lambda n: 1.0 / (n * (n - 1)), SERIES_TERMS.get(x.dtype, 9))
    edge = x == -1
    xl = torch.where(small | edge, -0.5, x)
    closed = (1 + xl) * torch.log1p(xl) - xl
    return torch.where(small, series, torch.where(edge, 1.0, closed))


def k_rho(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """k(x) for x = expm1(-r), r >= 0: log1p(x) = -r exactly, so k = -x - r (1 + x) (0 * inf read as 0). Where
    x is within a rounding of -1 (r beyond ~17 in fp32), log1p(x) itself would be far off."""
    small = _small(x)
    series = _series(torch.where(small, -x, 0.0), lambda n: 1.0 / (n * (n - 1)), SERIES_TERMS.get(x.dtype, 9))
    e = 1 + x
    closed = -x - torch.where(small | (e == 0), 0.0, r) * e
    return torch.where(small, series, closed)


def j_rho(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """j(x) = x - log1p(x) = x + r for x = expm1(-r), r >= 0 (+inf at r = inf)."""
    small = _small(x)
    series = _series(torch.where(small, -x, 0.0), lambda n: 1.0 / n, SERIES_TERMS.get(x.dtype, 9))
    return torch.where(small, series, x + torch.where(small, 0.0, r))


def _centered(logits: torch.Tensor, temperature) -> torch.Tensor:
    return (logits - _row_max(logits)) / temperature


def divergence_rows(a: torch.Tensor, b: torch.Tensor, divergence: int, beta: float) -> torch.Tensor:
    """D(teacher, student) per row from a = student, b = teacher tempered logits minus their row maxima."""
    log_ds = torch.logsumexp(a, -1, keepdim=True)
    log_dt = torch.logsumexp(b, -1, keepdim=True)
    both_absent = (a == -torch.inf) & (b == -torch.inf)
    diff = torch.where(both_absent, 0.0, b - a)
    # d_t - d_s = sum_j e^a_j expm1(b_j - a_j), each term through expm1 of a non-positive argument
    neg = diff <= 0
    e_neg = torch.expm1(torch.where(neg, diff, -diff))
    e_a, e_b = torch.exp(a), torch.exp(b)
    delta = torch.where(neg, e_a * e_neg, -e_b * e_neg).sum(-1, keepdim=True)
    ell = torch.log1p(delta / e_a.sum(-1, keepdim=True))  # log d_t - log d_s
    rho = diff - ell
    q = torch.exp(a - log_ds)
    p = torch.exp(b - log_dt)
    neg = rho <= 0
    r = torch.where(neg, -rho, rho)  # |rho|, with the gradient of each side
    x = torch.expm1(-r)
    base = torch.where(neg, q, p)
    if divergence == DIVERGENCES["kl"]:
        f = torch.where(neg, k_rho(x, r), j_rho(x, r))
    elif divergence == DIVERGENCES["reverse_kl"]:
        f = torch.where(neg, j_rho(x, r), k_rho(x, r))
    elif divergence == DIVERGENCES["jsd"]:
        w = torch.where(neg, torch.full_like(x, beta), torch.full_like(x, 1 - beta))  # in x's dtype
        f = w * k_rho(x, r) - k_fn(w * x)
    elif divergence == DIVERGENCES["tvd"]:
        f = -0.5 * x
    else:
        raise ValueError(f"kd_divergence: divergence code {divergence} is not one of {sorted(DIVERGENCES.values())}")
    # base == 0: the class is absent from both distributions (base is the larger), it adds nothing
    return torch.where(base == 0, 0.0, base * f).sum(-1)


def kd_divergence_rows(student, teacher, target, temperature, alpha, ignore_index: int, t2_scale: bool,
                       divergence: int, beta: float):
    """(loss, D, CE) per row, differentiable: loss = alpha c D + (1 - alpha) CE with c = T^2 (t2_scale) or 1,
    CE = cross-entropy of s at temperature 1 against target (0 without a target); all three are 0 for a row
    whose target is ignore_index. A term whose weight is exactly 0 is left out of the loss (never 0 * inf)."""
    acc = compute_dtype(student.dtype)
    s = student.to(acc)
    t = teacher.to(acc)
    valid = None
    if target is not None:
        valid = target != ignore_index
        keep = valid.unsqueeze(-1)
        # an ignored row contributes exactly 0 whatever it holds: its inputs never reach the loss or gradients
        s = torch.where(keep, s, torch.zeros_like(s))
        t = torch.where(keep, t, torch.zeros_like(t))
    div = divergence_rows(_centered(s, temperature), _centered(t, temperature), divergence, beta)
    c = temperature * temperature if t2_scale else 1.0
    zero_alpha = isinstance(alpha, float) and alpha == 0
    loss = torch.zeros_like(div) if zero_alpha else alpha * c * div
    ce = torch.zeros_like(div)
    if target is not None:
        m_s = _row_max(s)
        safe_target = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(-1)
        ce = ((m_s - s.gather(-1, safe_target)) + torch.logsumexp(s - m_s, -1, keepdim=True)).squeeze(-1)
        if not (isinstance(alpha, float) and alpha == 1):
            loss = loss + (1 - alpha) * ce
        zero = torch.zeros_like(loss)
        loss, div, ce = (torch.where(valid, v, zero) for v in (loss, div, ce))
    return loss, div, ce


# ---------------------------------------------------------------- the plain formulas (oracle, benchmarks)

def _plogq(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q), 0 where p == 0. Both logs are replaced where p == 0, so that neither the value
    nor the gradient meets 0 * inf; NaN stays NaN."""
    absent = p == 0
    return torch.where(absent, 0.0, p * (torch.where(absent, 0.0, log_p) - torch.where(absent, 0.0, log_q))).sum(-1)


def plain_divergence(student_logits, teacher_logits, divergence: str, beta: float = 0.5,
                     temperature: float = 1.0) -> torch.Tensor:
    """The textbook per-row formulas on log_softmax (TRL's and Liger's definitions; no T^2 factor)."""
    log_q = torch.log_softmax(student_logits / temperature, -1)
    log_p = torch.log_softmax(teacher_logits / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "kl" or (divergence == "jsd" and beta == 0):  # TRL: beta = 0 is KL(teacher || student)
        return _plogq(p, log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):  # beta = 1: KL(student || teacher)
        return _plogq(q, log_q, log_p)
    if divergence == "jsd":
        # m = beta p + (1 - beta) q (TRL forms log m as a logsumexp of the two log-probabilities: the same value);
        # log 1 where m == 0, a class absent from both, whose terms _plogq drops
        m = beta * p + (1 - beta) * q
        log_m = torch.log(torch.where(m == 0, 1.0, m))
        return beta * _plogq(p, log_p, log_m) + (1 - beta) * _plogq(q, log_q, log_m)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")
