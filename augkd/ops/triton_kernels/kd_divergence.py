"""KD divergence family (kl, reverse_kl, jsd, tvd): forward and backward kernels.

Math (docs/ops-design.md, "KD divergences"; kernels/kd_divergence_math.h holds the same per-class formulas for
CPU / CUDA). Per row, u = s / T, v = t / T, q = softmax(u), p = softmax(v):
    sweep 1 (online over blocks): m_s, d_s, m_t, d_t, E = d_t - d_s (through expm1), m_1, d_1 for CE at T != 1
    sweep 2: rho_j = (v_j - m_t) - (u_j - m_s) - L, L = log1p(E / d_s); D and the backward sums S_s, S_t
    stats = [m_s, log d_s, m_t, log d_t, L, D, CE, S_s, S_t, m_1, log d_1]
Backward: one elementwise pass over (row, column block) tiles from the stats.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import _common as cm

STATS = 11
KL: tl.constexpr = tl.constexpr(0)
REVERSE_KL: tl.constexpr = tl.constexpr(1)
JSD: tl.constexpr = tl.constexpr(2)
SERIES_MAX: tl.constexpr = tl.constexpr(0.125)


@triton.jit
def _log1p(x):
    """log1p(x) to a few roundings for x >= -1: log(u) x / (u - 1) with u = 1 + x (x itself where u == 1)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _series(y, K_SERIES: tl.constexpr, FP64: tl.constexpr):
    """y^2 sum_{n=2..N} c(n) y^(n-2), c(n) = 1 / (n (n - 1)) (k) or 1 / n (j); N = 19 (fp64) or 9 (fp32)."""
    N: tl.constexpr = 19 if FP64 else 9
    one = tl.full([], 1.0, y.dtype)
    if K_SERIES:
        poly = one / (N * (N - 1))
    else:
        poly = one / N
    for i in tl.static_range(N - 2):
        n: tl.constexpr = N - 1 - i
        if K_SERIES:
            poly = poly * y + one / (n * (n - 1))
        else:
            poly = poly * y + one / n
    return y * y * poly


@triton.jit
def _k(x, l, FP64: tl.constexpr):
    """k(x) = (1 + x) log1p(x) - x on [-1, 0] given l = log1p(x); k(-1) = 1."""
    y = -x
    small = y <= SERIES_MAX
    s = _series(tl.where(small, y, 0.0), True, FP64)
    return tl.where(small, s, (1.0 + x) * tl.where(x == -1.0, 0.0, l) - x)


@triton.jit
def _k_rho(x, r, FP64: tl.constexpr):
    """k(x) for x = expm1(-r), r >= 0: -x - r (1 + x), as log1p(x) = -r exactly (0 where 1 + x == 0)."""
    y = -x
    small = y <= SERIES_MAX
    s = _series(tl.where(small, y, 0.0), True, FP64)
    e = 1.0 + x
    return tl.where(small, s, y - tl.where(small | (e == 0), 0.0, r * e))


@triton.jit
def _j_rho(x, r, FP64: tl.constexpr):
    """j(x) = x - log1p(x) = x + r for x = expm1(-r), r >= 0."""
    y = -x
    small = y <= SERIES_MAX
    s = _series(tl.where(small, y, 0.0), False, FP64)
    return tl.where(small, s, x + r)


@triton.jit
def _log_ratio(a, b):
    """b - a, 0 where both are -inf (a class absent from both)."""
    return tl.where((a == float("-inf")) & (b == float("-inf")), 0.0, b - a)


@triton.jit
def _classes(s_ptr, t_ptr, offs, mask, temp, cs, ct, log_ds, log_dt, ell, ACC: tl.constexpr):
    s = tl.load(s_ptr + offs, mask=mask, other=float("-inf")).to(ACC)
    t = tl.load(t_ptr + offs, mask=mask, other=float("-inf")).to(ACC)
    a = s / temp - cs
    b = t / temp - ct
    q = tl.exp(a - log_ds)
    p = tl.exp(b - log_dt)
    rho = _log_ratio(a, b) - ell
    return s, q, p, rho


@triton.jit
def _div_fwd_kernel(
    s_ptr, t_ptr, y_ptr, loss_ptr, stats_ptr,
    C, temperature, temperature_lo, alpha, alpha_lo, beta, beta_lo, ignore_index,
    FP64: tl.constexpr, HAS_TARGET: tl.constexpr, NEED1: tl.constexpr, T2_SCALE: tl.constexpr,
    DIV: tl.constexpr, BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * C
    t_row = t_ptr + row * C
    st = stats_ptr + row * 11
    temp = cm.scalar(temperature, temperature_lo, ACC)
    a_w = cm.scalar(alpha, alpha_lo, ACC)
    bw = cm.scalar(beta, beta_lo, ACC)
    neg_inf = float("-inf")
    zero = tl.zeros([], dtype=ACC)
    ignored = False
    y = 0
    if HAS_TARGET:
        y = tl.load(y_ptr + row)
        ignored = y == ignore_index
    cols = tl.arange(0, BLOCK)
    if ignored:  # exactly 0, whatever the row holds
        for k in tl.static_range(11):
            tl.store(st + k, zero)
        tl.store(loss_ptr + row, zero)
    else:
        # sweep 1: online maxima and sums of both rows, and E = d_t - d_s
        m_s = zero + neg_inf
        m_t = zero + neg_inf
        d_s = zero
        d_t = zero
        gap = zero
        m_1 = zero + neg_inf
        d_1 = zero
        for start in range(0, C, BLOCK):
            offs = start + cols
            msk = offs < C
            s = tl.load(s_row + offs, mask=msk, other=neg_inf).to(ACC)
            t = tl.load(t_row + offs, mask=msk, other=neg_inf).to(ACC)
            u = s / temp
            v = t / temp
            ns = tl.maximum(m_s, tl.max(u, axis=0))
            nt = tl.maximum(m_t, tl.max(v, axis=0))
            rs = tl.where(m_s == neg_inf, 0.0, tl.exp(m_s - ns))
            rt = tl.where(m_t == neg_inf, 0.0, tl.exp(m_t - nt))
            lr = tl.where((m_s == neg_inf) | (m_t == neg_inf), 0.0, (m_t - nt) - (m_s - ns))
            gap = tl.where(d_s == 0, rt * gap, tl.where(rt == 0, -rs * d_s, rt * gap + rs * cm.expm1(lr) * d_s))
            d_s = d_s * rs
            d_t = d_t * rt
            m_s = ns
            m_t = nt
            cs = tl.where(m_s == neg_inf, 0.0, m_s)
            ct = tl.where(m_t == neg_inf, 0.0, m_t)
            a = u - cs
            b = v - ct
            ea = tl.exp(a)
            eb = tl.exp(b)
            diff = _log_ratio(a, b)
            neg = diff <= 0
            z = tl.where(neg, diff, -diff)
            far = z < -0.25  # |e^b - e^a| >= 0.22 max(e^a, e^b): the difference itself does not cancel
            em = cm.expm1(tl.where(far, 0.0, z))
            d_s += tl.sum(ea, axis=0)
            d_t += tl.sum(eb, axis=0)
            gap += tl.sum(tl.where(far, eb - ea, tl.where(neg, ea * em, -eb * em)), axis=0)
            if NEED1:
                n1 = tl.maximum(m_1, tl.max(s, axis=0))
                d_1 = tl.where(m_1 == neg_inf, 0.0, tl.exp(m_1 - n1) * d_1)
                m_1 = n1
                d_1 += tl.sum(tl.exp(s - tl.where(m_1 == neg_inf, 0.0, m_1)), axis=0)
        log_ds = tl.log(d_s)
        log_dt = tl.log(d_t)
        ell = _log1p(gap / d_s)
        cs = tl.where(m_s == neg_inf, 0.0, m_s)
        ct = tl.where(m_t == neg_inf, 0.0, m_t)
        # sweep 2: the divergence and the backward sums
        acc_d = tl.zeros([BLOCK], dtype=ACC)
        acc_s = tl.zeros([BLOCK], dtype=ACC)
        acc_t = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, C, BLOCK):
            offs = start + cols
            _, q, p, rho = _classes(s_row, t_row, offs, offs < C, temp, cs, ct, log_ds, log_dt, ell, ACC)
            neg = rho <= 0
            r = tl.where(neg, -rho, rho)
            x = cm.expm1(-r)
            base = tl.where(neg, q, p)
            if DIV == KL:
                f = tl.where(neg, _k_rho(x, r, FP64), _j_rho(x, r, FP64))
            elif DIV == REVERSE_KL:
                f = tl.where(neg, _j_rho(x, r, FP64), _k_rho(x, r, FP64))
            elif DIV == JSD:
                w = tl.where(neg, bw, 1.0 - bw)
                lw = _log1p(w * x)
                f = w * _k_rho(x, r, FP64) - _k(w * x, lw, FP64)
                acc_s += tl.where(q == 0, 0.0, q * tl.where(neg, lw, rho + lw))
                acc_t += tl.where(p == 0, 0.0, p * tl.where(neg, lw - rho, lw))
            else:
                f = -0.5 * x
                sg = tl.where(rho > 0, 1.0, tl.where(rho < 0, -1.0, 0.0))
                acc_s += q * sg
                acc_t += p * sg
            acc_d += tl.where(base == 0, 0.0, base * f)
        d = tl.sum(acc_d, axis=0)
        ce = zero
        if NEED1:
            ld1 = tl.log(d_1)
        else:
            m_1 = m_s
            ld1 = log_ds
        if HAS_TARGET:
            sy = tl.load(s_row + y).to(ACC)
            ce = (m_1 + ld1) - sy
        if DIV == REVERSE_KL:
            ss = d
        else:
            ss = tl.sum(acc_s, axis=0)
        if DIV == KL:
            stt = d
        else:
            stt = tl.sum(acc_t, axis=0)
        tl.store(st + 0, m_s)
        tl.store(st + 1, log_ds)
        tl.store(st + 2, m_t)
        tl.store(st + 3, log_dt)
        tl.store(st + 4, ell)
        tl.store(st + 5, d)
        tl.store(st + 6, ce)
        tl.store(st + 7, ss)
        tl.store(st + 8, stt)
        tl.store(st + 9, m_1)
        tl.store(st + 10, ld1)
        if T2_SCALE:
            c = temp * temp
        else:
            c = tl.full([], 1.0, ACC)
        loss = tl.where(a_w != 0, a_w * c * d, 0.0)
        if HAS_TARGET:
            loss += tl.where(a_w != 1, (1.0 - a_w) * ce, 0.0)
        tl.store(loss_ptr + row, loss)


@triton.jit
def _div_bwd_kernel(
    gd_ptr, gc_ptr, s_ptr, t_ptr, y_ptr, stats_ptr, gs_ptr, gt_ptr,
    C, temperature, temperature_lo, beta, beta_lo, ignore_index,
    FP64: tl.constexpr, HAS_TARGET: tl.constexpr, DIV: tl.constexpr, WANT_S: tl.constexpr,
    WANT_T: tl.constexpr, BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < C
    temp = cm.scalar(temperature, temperature_lo, ACC)
    bw = cm.scalar(beta, beta_lo, ACC)
    st = stats_ptr + row * 11
    m_s, log_ds, m_t, log_dt = cm.load_softmax_stats(st, 0, 2, ACC)
    ell = tl.load(st + 4).to(ACC)
    d = tl.load(st + 5).to(ACC)
    ss = tl.load(st + 7).to(ACC)
    stt = tl.load(st + 8).to(ACC)
    m_1 = tl.load(st + 9).to(ACC)
    ld1 = tl.load(st + 10).to(ACC)
    kd = tl.load(gd_ptr + row).to(ACC) / temp
    kc = tl.zeros([], dtype=ACC)
    y = -1
    if HAS_TARGET:
        y = tl.load(y_ptr + row)
        kc = tl.load(gc_ptr + row).to(ACC)
        if y == ignore_index:
            kd = tl.zeros([], dtype=ACC)
            kc = tl.zeros([], dtype=ACC)
    neg_inf = float("-inf")
    cs = tl.where(m_s == neg_inf, 0.0, m_s)
    ct = tl.where(m_t == neg_inf, 0.0, m_t)
    s, q, p, rho = _classes(s_ptr + row * C, t_ptr + row * C, offs, msk, temp, cs, ct, log_ds, log_dt, ell, ACC)
    neg = rho <= 0
    if DIV == KL or DIV == REVERSE_KL:
        x = cm.expm1(tl.where(neg, rho, -rho))
        q_minus_p = tl.where(neg, -q * x, p * x)
        if DIV == KL:
            du = q_minus_p
            dv = tl.where(p == 0, 0.0, p * (rho - d))
        else:
            du = tl.where(q == 0, 0.0, q * (-rho - d))
            dv = -q_minus_p
    elif DIV == JSD:
        x = cm.expm1(tl.where(neg, rho, -rho))
        w = tl.where(neg, bw, 1.0 - bw)
        lw = _log1p(w * x)
        du = tl.where(q == 0, 0.0, (1.0 - bw) * q * (ss - tl.where(neg, lw, rho + lw)))
        dv = tl.where(p == 0, 0.0, bw * p * (stt - tl.where(neg, lw - rho, lw)))
    else:
        sg = tl.where(rho > 0, 1.0, tl.where(rho < 0, -1.0, 0.0))
        du = 0.5 * q * (ss - sg)
        dv = 0.5 * p * (sg - stt)
    # a gradient weight of exactly 0 leaves its term out (no 0 * inf from an infinite D or CE)
    if WANT_S:
        g = tl.where(kd != 0, kd * du, 0.0)
        if HAS_TARGET:
            p1 = tl.exp((s - m_1) - ld1)
            g += tl.where(kc != 0, kc * (p1 - tl.where(offs == y, 1.0, 0.0)), 0.0)
        tl.store(gs_ptr + row * C + offs, g.to(gs_ptr.dtype.element_ty), mask=msk)
    if WANT_T:
        g = tl.where(kd != 0, kd * dv, 0.0)
        tl.store(gt_ptr + row * C + offs, g.to(gt_ptr.dtype.element_ty), mask=msk)


def _kd_divergence_fwd(student: Tensor, teacher: Tensor, target: Optional[Tensor], temperature: float, alpha: float,
                       ignore_index: int, t2_scale: bool, divergence: int, beta: float) -> tuple[Tensor, Tensor]:
    student, teacher, target = cm.contig(student, teacher, target)
    B, C = student.shape
    acc = cm.acc_dtype(student.dtype)
    loss = student.new_empty((B,), dtype=acc)
    stats = student.new_empty((B, STATS), dtype=acc)
    if B > 0 and cm.launch_enabled():
        block = cm.block_size(C, cm.ROW_BLOCK)
        wrap_triton(_div_fwd_kernel)[(B,)](
            student, teacher, cm.opt(target, student), loss, stats,
            C, *cm.split_f32(temperature), *cm.split_f32(alpha), *cm.split_f32(beta), ignore_index,
            FP64=student.dtype == torch.float64, HAS_TARGET=target is not None,
            NEED1=target is not None and float(temperature) != 1.0, T2_SCALE=bool(t2_scale), DIV=int(divergence),
            BLOCK=block, num_warps=cm.warps(block),
        )
    return loss, stats


def _kd_divergence_bwd(grad_div: Tensor, grad_ce: Tensor, student: Tensor, teacher: Tensor,
                       target: Optional[Tensor], stats: Tensor, temperature: float, ignore_index: int,
                       divergence: int, beta: float, student_grad: bool,
                       teacher_grad: bool) -> tuple[Tensor, Tensor]:
    grad_div, grad_ce, student, teacher, target, stats = cm.contig(grad_div, grad_ce, student, teacher, target,
                                                                   stats)
    B, C = student.shape
    gs = torch.empty_like(student) if student_grad else cm.empty0(student)
    gt = torch.empty_like(teacher) if teacher_grad else cm.empty0(teacher)
    if B > 0 and (student_grad or teacher_grad) and cm.launch_enabled():
        block = cm.block_size(C, cm.ROW_BLOCK)
        wrap_triton(_div_bwd_kernel)[(B, triton.cdiv(C, block))](
            grad_div, grad_ce, student, teacher, cm.opt(target, student), stats,
            gs if student_grad else student, gt if teacher_grad else teacher,
            C, *cm.split_f32(temperature), *cm.split_f32(beta), ignore_index,
            FP64=student.dtype == torch.float64, HAS_TARGET=target is not None, DIV=int(divergence),
            WANT_S=bool(student_grad), WANT_T=bool(teacher_grad), BLOCK=block, num_warps=cm.warps(block),
        )
    return gs, gt


kd_divergence_fwd = cm.register("kd_divergence_fwd", _kd_divergence_fwd)
kd_divergence_bwd = cm.register("kd_divergence_bwd", _kd_divergence_bwd)
