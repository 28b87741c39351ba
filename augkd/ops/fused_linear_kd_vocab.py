"""Fused linear KD over vocabulary chunks: for vocabularies so large that even a minimal row chunk's full-V
logits exceed the memory budget, each row chunk is swept over blocks of vocabulary entries (docs/ops-design.md,
"Fused linear KD", "Vocabulary chunks").

Nothing here holds a row's logits over the whole vocabulary, so the per-row statistics are built online:

  sweep 1   per row: running maxima and sums of exp of u = s / T and v = t / T (and of s for the CE term when
            T != 1), the target's logit, and for kl / reverse_kl the divergence itself (its online sum)
  sweep 2   jsd, tvd only: with both normalisers known, the divergence and the per-row sums S_s, S_t that the
            softmax Jacobian needs (they cannot be formed before the normalisers are)
  last      (when gradients are wanted) the gradient of the block's logits, then its matmuls

Every sweep recomputes the block's logits (both heads). Under the C++ backends (CPU, CUDA) sweep 1 is
kd_divergence's forward kernel per block (block statistics merged across blocks); sweep 2 and the last sweep are
its backward kernel fed with the whole rows' statistics, the flash-attention pattern: its per-class formulas only
read the row's normalisers, D and S_s, S_t (sweep 2 passes S = 0 and sums the per-class gradients into S).
Under the torch or Triton backend every sweep runs as torch ops in the compute dtype (fp32; fp64 for an fp64
student).
"""

from __future__ import annotations

import math

import torch

from . import backends
from .specs.kd_divergence import STATS

KL, REVERSE_KL, JSD, TVD = 0, 1, 2, 3  # kd_divergence's codes (jsd at beta 0 / 1 arrives as kl / reverse_kl)


class _Online:
    """Running (max, sum of exp from the max) per row: log-sum-exp over the vocabulary blocks seen so far."""

    def __init__(self, rows: int, like: torch.Tensor):
        self.m = torch.full((rows,), -math.inf, dtype=like.dtype, device=like.device)
        self.d = torch.zeros(rows, dtype=like.dtype, device=like.device)

    def update(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold in block z (rows x vc); returns (the shift used for this block, the rescale of older sums)."""
        m = torch.maximum(self.m, z.amax(1))
        shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row all -inf so far: no shift
        rescale = torch.exp(self.m - shift)
        self.d = self.d * rescale + torch.exp(z - shift[:, None]).sum(1)
        self.m = m
        return shift, rescale

    def lse(self) -> torch.Tensor:
        return torch.where(torch.isfinite(self.m), self.m, torch.zeros_like(self.m)) + torch.log(self.d)


def _xlogy_terms(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """w * (a - b) where w > 0, else 0 (a class the weighting side lacks adds nothing, even against -inf)."""
    return torch.where(w > 0, w * (a - b), torch.zeros_like(w))


def sweep_row_chunk(cfg, code: int, student, teacher, lo: int, hi: int, vocab: int, vc: int, y, row_grad,
                    first: bool) -> torch.Tensor:
    """Loss rows of [lo, hi) (compute dtype) over vocabulary blocks of vc entries; with row_grad (per row
    dL/dloss_i, or None) the block gradients go straight into the heads' gradient buffers."""
    temp, alpha, beta = cfg.temperature, cfg.alpha, cfg.beta
    rows = hi - lo
    xs, xt = student.rows(lo, hi), teacher.rows(lo, hi)
    blocks = [(v0, min(vocab, v0 + vc)) for v0 in range(0, vocab, vc)]
    soft_on, hard_on = alpha != 0.0, y is not None and alpha != 1.0
    like = torch.empty(0, dtype=cfg.acc, device=xs.device)

    def logits(v0, v1):
        s = student.logits(xs, v0, v1)
        t = teacher.logits(xt, v0, v1)
        return s, t

    # sweep 1: normalisers, the target logit, and kl / reverse_kl accumulated online
    fwd_kernel = _kernel(xs.device, "kd_divergence_fwd")
    sweep1 = _stats_by_kernel if fwd_kernel is not None else _stats_by_torch
    lse_s, lse_t, lse_1, target_logit, online_div = sweep1(fwd_kernel, blocks, logits, y, rows, like, temp, beta,
                                                           code if soft_on else None, hard_on)

    # the divergence D per row, and the Jacobian sums S_s, S_t (jsd, tvd: one more sweep)
    s_sum = t_sum = None
    if not soft_on:
        div = torch.zeros(rows, dtype=cfg.acc, device=xs.device)
    elif code in (KL, REVERSE_KL):
        div = online_div
    else:
        bwd_kernel = _kernel(xs.device, "kd_divergence_bwd")
        sweep2 = _sums_by_kernel if bwd_kernel is not None else _sums_by_torch
        s_sum, t_sum, div = sweep2(bwd_kernel, blocks, logits, rows, lse_s, lse_t, temp, beta, code)

    scale_soft = temp * temp if cfg.t2_scale else 1.0
    keep = None if y is None else y != cfg.ignore_index
    loss = alpha * scale_soft * div if soft_on else torch.zeros_like(div)
    if hard_on:
        loss = loss + (1 - alpha) * (lse_1 - target_logit)
    if keep is not None:
        loss = torch.where(keep, loss, torch.zeros_like(loss))
    if row_grad is None:
        return loss

    # last sweep: dL/ds and dL/dt of each block, then its matmuls
    weight = (row_grad if row_grad.dim() else row_grad.expand(rows)).to(cfg.acc)
    if keep is not None:
        weight = torch.where(keep, weight, torch.zeros_like(weight))
    a = (weight * (alpha * scale_soft / temp))[:, None] if soft_on else None
    b = (weight * (1 - alpha))[:, None] if hard_on else None
    gx_s = _input_grad_buffer(student, lo, hi)
    gx_t = _input_grad_buffer(teacher, lo, hi)
    kernel = _kernel(xs.device, "kd_divergence_bwd")
    if kernel is not None:
        stats = _kernel_stats(rows, lse_s, lse_t, lse_1, div, s_sum, t_sum)
        g_div = (weight * (alpha * scale_soft)) if soft_on else torch.zeros_like(weight)
        g_ce = (weight * (1 - alpha)) if hard_on else torch.zeros_like(weight)
    for index, (v0, v1) in enumerate(blocks):
        if kernel is not None:
            g_s, g_t = _kernel_block_grads(kernel, *logits(v0, v1), y, v0, v1, stats, g_div, g_ce, hard_on, cfg,
                                           code, student.wants_grad, teacher.wants_grad)
        else:
            g_s, g_t = _torch_block_grads(*logits(v0, v1), y, v0, v1, lse_s, lse_t, lse_1, div, s_sum, t_sum, a, b,
                                          soft_on, hard_on, cfg, code, student.wants_grad, teacher.wants_grad)
        for head, g, xr, gx in ((student, g_s, xs, gx_s), (teacher, g_t, xt, gx_t)):
            if not head.wants_grad:
                continue
            if g is None:
                g = torch.zeros(rows, v1 - v0, dtype=cfg.acc, device=xs.device)
            if gx is not None:
                head.input_grad(g, v0, v1, out=gx, accumulate=index > 0)
            head.weight_grad(g, xr, v0, v1, first)
    for head, gx in ((student, gx_s), (teacher, gx_t)):
        if gx is not None and gx.dtype != head.grad_x.dtype:
            head.grad_x[lo:hi].copy_(gx)
    return loss


def _torch_block_grads(s, t, y, v0, v1, lse_s, lse_t, lse_1, div, s_sum, t_sum, a, b, soft_on, hard_on, cfg, code,
                       want_s, want_t):
    """(dL/ds, dL/dt) of a block as torch ops; None where not wanted (or, for the teacher, no soft term)."""
    temp = cfg.temperature
    soft1 = None
    if hard_on and want_s and temp != 1.0:  # softmax(s) at T = 1 for the CE gradient
        soft1 = torch.exp(s - lse_1[:, None])
    log_q, log_p = _log_probs(s, t, temp, lse_s, lse_t)
    q, p = torch.exp(log_q), torch.exp(log_p)
    g_s = g_t = None
    if soft_on:
        du, dv = _soft_grads(code, cfg.beta, q, p, log_q, log_p, div, s_sum, t_sum, want_s, want_t)
        g_s = None if du is None else du.mul_(a)
        g_t = None if dv is None else dv.mul_(a)
    if hard_on and want_s:
        hard = q if soft1 is None else soft1  # q is softmax(s) at T = 1; the soft gradients are formed
        hard.mul_(b)
        inside, col = _block_column(y, v0, v1)
        hard.scatter_add_(1, col[:, None], -(b * inside[:, None].to(b.dtype)))
        g_s = hard if g_s is None else g_s.add_(hard)
    return g_s, g_t


def _kernel(device: torch.device, name: str):
    """An op of kd_divergence from the selected C++ backend (CPU or CUDA), or None (torch formulas)."""
    backend = backends.select(device)
    if backend not in ("cpu", "cuda"):
        return None
    return getattr(backends.load(backend), name)


def _block_column(y, v0, v1):
    """(whether row i's target lies in [v0, v1), its column in the block: 0 for the rows whose target is elsewhere)."""
    inside = (y >= v0) & (y < v1)
    return inside, torch.where(inside, y - v0, torch.zeros_like(y))


def _target_logit(s, y, v0, v1, target_logit):
    """s[i, y_i] for the rows whose target lies in [v0, v1); the others keep `target_logit`."""
    inside, col = _block_column(y, v0, v1)
    col = col[:, None]
    return torch.where(inside, s.gather(1, col)[:, 0], target_logit)


def _stats_by_torch(_, blocks, logits, y, rows, like, temp, beta, code, hard_on):
    """Sweep 1 as torch ops: (lse_s, lse_t, lse_1, target logit, D for kl / reverse_kl else None). code: None
    without a soft term."""
    on_s, on_t = _Online(rows, like), _Online(rows, like)
    on_1 = _Online(rows, like) if hard_on and temp != 1.0 else on_s
    target_logit = torch.zeros(rows, dtype=like.dtype, device=like.device)
    acc_d = torch.zeros(rows, dtype=like.dtype, device=like.device)  # sum e^(w - m) (w - other), kl / rkl
    for v0, v1 in blocks:
        s, t = logits(v0, v1)
        if hard_on:  # CE at temperature 1 reads s before it is tempered in place
            target_logit = _target_logit(s, y, v0, v1, target_logit)
            if on_1 is not on_s:
                on_1.update(s)
        u, v = (s, t) if temp == 1.0 else (s.div_(temp), t.div_(temp))
        shift_s, rescale_s = on_s.update(u)
        shift_t, rescale_t = on_t.update(v)
        if code == KL:
            acc_d = acc_d * rescale_t + _xlogy_terms(torch.exp(v - shift_t[:, None]), v, u).sum(1)
        elif code == REVERSE_KL:
            acc_d = acc_d * rescale_s + _xlogy_terms(torch.exp(u - shift_s[:, None]), u, v).sum(1)
        del s, t, u, v
    lse_s, lse_t = on_s.lse(), on_t.lse()
    lse_1 = on_1.lse() if on_1 is not on_s else lse_s  # the same sums when T = 1
    div = None
    if code == KL:  # sum p (v - u) - lse_t + lse_s
        div = acc_d / on_t.d - lse_t + lse_s
    elif code == REVERSE_KL:
        div = acc_d / on_s.d - lse_s + lse_t
    return lse_s, lse_t, lse_1, target_logit, div


def _sums_by_torch(_, blocks, logits, rows, lse_s, lse_t, temp, beta, code):
    """Sweep 2 (jsd, tvd) as torch ops: (S_s, S_t, D)."""
    s_sum = torch.zeros_like(lse_s)
    t_sum = torch.zeros_like(lse_s)
    half = torch.zeros_like(lse_s)  # tvd: sum |p - q|
    for v0, v1 in blocks:
        log_q, log_p = _log_probs(*logits(v0, v1), temp, lse_s, lse_t)
        q, p = torch.exp(log_q), torch.exp(log_p)
        if code == JSD:
            log_m = _log_mixture(log_p, log_q, beta)
            s_sum += _xlogy_terms(q, log_m, log_q).sum(1)  # sum q log(m / q)
            t_sum += _xlogy_terms(p, log_m, log_p).sum(1)
        else:
            sign = torch.sign(p - q)
            s_sum += (q * sign).sum(1)
            t_sum += (p * sign).sum(1)
            half += (p - q).abs().sum(1)
        del log_q, log_p, q, p
    return s_sum, t_sum, (-beta * t_sum - (1 - beta) * s_sum if code == JSD else 0.5 * half)


def _sums_by_kernel(bwd, blocks, logits, rows, lse_s, lse_t, temp, beta, code):
    """Sweep 2 (jsd, tvd) through kd_divergence's backward kernel: with S_s = S_t = 0 in the statistics and a
    gradient weight of T on D, its per-class gradients are jsd du = -(1 - beta) q log(m / q),
    dv = -beta p log(m / p); tvd du = -q sign(p - q) / 2, dv = p sign(p - q) / 2, whose row sums give S_s and
    S_t; then D = -beta S_t - (1 - beta) S_s (jsd) or (S_t - S_s) / 2 (tvd: sum |p - q| = sum (p - q) sign)."""
    zeros = torch.zeros_like(lse_s)
    stats = _kernel_stats(rows, lse_s, lse_t, lse_s, zeros, zeros, zeros)
    weight = torch.full_like(lse_s, temp)
    sum_u = torch.zeros_like(lse_s)
    sum_v = torch.zeros_like(lse_s)
    for v0, v1 in blocks:
        s, t = logits(v0, v1)
        du, dv = bwd(weight, zeros, s, t, None, stats, temp, -1, code, beta, True, True)
        sum_u += du.sum(1)
        sum_v += dv.sum(1)
        del s, t, du, dv
    if code == JSD:
        s_sum, t_sum = sum_u / -(1 - beta), sum_v / -beta
        return s_sum, t_sum, -beta * t_sum - (1 - beta) * s_sum
    s_sum, t_sum = -2 * sum_u, 2 * sum_v
    return s_sum, t_sum, 0.5 * (t_sum - s_sum)


def _stats_by_kernel(fwd, blocks, logits, y, rows, like, temp, beta, code, hard_on):
    """Sweep 1 through kd_divergence's forward kernel, one call per block: its statistics give the block's
    log-sum-exps (m + log d) of u, v and (label 0 for every row, so that it computes them) s, and its D the
    block's KL(p' || q') of the block-normalised p', q', from which sum_block p' (v - u) = D' + lse_t' - lse_s';
    the blocks are merged with logaddexp, the kl sum weighted by e^(lse_t' - lse_t) (reverse KL alike)."""
    need1 = hard_on and temp != 1.0
    labels = torch.zeros(rows, dtype=torch.int64, device=like.device) if need1 else None
    fwd_code = code if code in (KL, REVERSE_KL) else KL
    neg_inf = torch.full((rows,), -math.inf, dtype=like.dtype, device=like.device)
    lse_s, lse_t, lse_1 = neg_inf, neg_inf, neg_inf
    target_logit = torch.zeros(rows, dtype=like.dtype, device=like.device)
    acc = torch.zeros(rows, dtype=like.dtype, device=like.device)  # sum p (w - other) over the blocks so far
    for v0, v1 in blocks:
        s, t = logits(v0, v1)
        if hard_on:
            target_logit = _target_logit(s, y, v0, v1, target_logit)
        _, st = fwd(s, t, labels, temp, 1.0, -1, False, fwd_code, beta)
        block_s, block_t = st[:, 0] + st[:, 1], st[:, 2] + st[:, 3]  # kMs + kLogDs, kMt + kLogDt
        if need1:
            lse_1 = torch.logaddexp(lse_1, st[:, 9] + st[:, 10])  # kM1 + kLogD1
        if code in (KL, REVERSE_KL):
            own, other, block_own, block_other = ((lse_t, lse_s, block_t, block_s) if code == KL
                                                  else (lse_s, lse_t, block_s, block_t))
            merged = torch.logaddexp(own, block_own)
            finite = torch.isfinite(merged)
            keep = torch.where(finite, torch.exp(own - merged), torch.zeros_like(merged))
            term = torch.exp(block_own - merged) * (st[:, 5] + block_own - block_other)  # kD
            acc = acc * keep + torch.where(torch.isfinite(block_own) & finite, term, torch.zeros_like(term))
        lse_s, lse_t = torch.logaddexp(lse_s, block_s), torch.logaddexp(lse_t, block_t)
        del s, t, st
    if not need1:
        lse_1 = lse_s
    div = None
    if code == KL:
        div = acc - lse_t + lse_s
    elif code == REVERSE_KL:
        div = acc - lse_s + lse_t
    return lse_s, lse_t, lse_1, target_logit, div


def _kernel_stats(rows, lse_s, lse_t, lse_1, div, s_sum, t_sum) -> torch.Tensor:
    """The kernel's per-row statistics (kernels/kd_divergence_math.h) for whole rows: each maximum column holds
    the row's log-sum-exp and each log-sum column 0, so that log q = u - lse_s, log p = v - lse_t and the CE's
    softmax is exp(s - lse_1); L = 0 accordingly."""
    stats = torch.zeros(rows, STATS, dtype=lse_s.dtype, device=lse_s.device)
    stats[:, 0], stats[:, 2], stats[:, 9] = lse_s, lse_t, lse_1  # kMs, kMt, kM1
    stats[:, 5] = div  # kD
    if s_sum is not None:
        stats[:, 7], stats[:, 8] = s_sum, t_sum  # kSs, kSt
    return stats


def _kernel_block_grads(kernel, s, t, y, v0, v1, stats, g_div, g_ce, hard_on, cfg, code, want_s, want_t):
    """(dL/ds, dL/dt) of a block from the backward kernel. The kernel subtracts the CE's onehot at the row's
    target: rows whose target lies in another block get column 0 as theirs, and that column is given back.
    Ignored rows get the label -1 and the kernel the ignore_index -1, which no block label equals."""
    block_y = outside = None
    if y is not None:
        inside, col = _block_column(y, v0, v1)
        keep = y != cfg.ignore_index
        block_y = torch.where(keep, col, torch.full_like(y, -1))
        outside = keep & ~inside
    g_s, g_t = kernel(g_div, g_ce, s, t, block_y, stats, cfg.temperature, -1, code, cfg.beta, want_s, want_t)
    if want_s and hard_on:
        g_s[:, 0] += g_ce * outside.to(g_ce.dtype)
    return (g_s if want_s else None), (g_t if want_t else None)


def _input_grad_buffer(head, lo, hi):
    """Where the row chunk's input gradient accumulates over the blocks: the gradient itself when it has the
    compute dtype, else an fp32 buffer copied (rounded) into it at the end."""
    if head.grad_x is None:
        return None
    gx = head.grad_x[lo:hi]
    return gx if gx.dtype == head.acc else torch.empty(gx.shape, dtype=head.acc, device=gx.device)


def _log_probs(s, t, temp, lse_s, lse_t):
    """(log q, log p) of a block, written over the block's logits s, t."""
    if temp != 1.0:
        s, t = s.div_(temp), t.div_(temp)
    return s.sub_(lse_s[:, None]), t.sub_(lse_t[:, None])


def _log_mixture(log_p, log_q, beta):
    """log(beta p + (1 - beta) q) from the logs (0 < beta < 1): no underflow, -inf only where both are 0."""
    return torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))


def _soft_grads(code, beta, q, p, log_q, log_p, div, s_sum, t_sum, want_u, want_v):
    """(dD/du, dD/dv) for a block (docs/ops-design.md, section 6, "Backward"); None where not wanted."""
    du = dv = None
    d = div[:, None]
    if code == KL:
        du = q - p if want_u else None
        dv = _xlogy_terms(p, log_p - log_q, d) if want_v else None
    elif code == REVERSE_KL:
        du = _xlogy_terms(q, log_q - log_p, d) if want_u else None
        dv = p - q if want_v else None
    elif code == JSD:
        log_m = _log_mixture(log_p, log_q, beta)
        if want_u:  # (1 - beta) q (S_s - log(m / q))
            du = _xlogy_terms(q, s_sum[:, None], log_m - log_q).mul_(1 - beta)
        if want_v:  # beta p (S_t - log(m / p))
            dv = _xlogy_terms(p, t_sum[:, None], log_m - log_p).mul_(beta)
    else:
        sign = torch.sign(p - q)
        du = q * (s_sum[:, None] - sign) * 0.5 if want_u else None
        dv = p * (sign - t_sum[:, None]) * 0.5 if want_v else None
    return du, dv
