"""KD loss: fused KL(teacher || student) at temperature T + hard-label CE, forward and backward.

Math (docs/ops-design.md section 1), per row i, u = s / T, w = v / T (v = t for logits and
log-probabilities, v = log t for probabilities):
    KL_i   = sum_j p_t (log p_t - log p_s),   CE_i = logsumexp(s) - s_y
    loss_i = alpha * c * KL_i + (1 - alpha) * CE_i   (c = T^2 if t2_scale), 0 for ignored rows;
             a term whose weight is exactly 0 (alpha = 0 or 1) is left out, like the torch reference
Every exponent is measured from a raw row maximum, a = (v - M_t) / T, b = (s - M_s) / T, so that logits
with a large common offset keep their accuracy (docs/ops-design.md, "Precision").
Forward: one sweep per row with online maxima/sums; the one-pass KL = E_pt[a - b] - log d_t + log d_s is
kept when well conditioned, else a second sweep computes KL = sum p_s phi(rho) (large T, close
distributions). stats = [M_s, lse_t, M_t, log d_s, log d_t, log d_1, mu, L]: mu = E_pt[a - b] (one pass),
L = log d_t - log d_s (refined), KL = mu - L; the backward uses rho - KL = (a - b) - mu.
Backward: recompute p_s, p_t, rho = (a - b) - L and p_1 from the stats (one read of s and t), with
p_s - p_t = -p_s expm1(rho) or p_t expm1(-rho), and write the gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import _common as cm


@triton.jit
def _teacher_logits(t, FORMAT: tl.constexpr):
    # v = t for logits (0) / log-probabilities (1), log t for probabilities (2): log 0 = -inf.
    if FORMAT == 2:
        return tl.log(t)
    else:
        return t


@triton.jit
def _center(m):
    # the shift used for a running maximum: 0 while it is -inf (no -inf - -inf)
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _load_block(s_row, t_row, start, C, ACC: tl.constexpr, FORMAT: tl.constexpr, BLOCK: tl.constexpr):
    """Columns [start, start + BLOCK) of a row: the student's s and the teacher's v in the compute dtype;
    lanes past C read -inf for both (they add nothing to any sum)."""
    offs = start + tl.arange(0, BLOCK)
    inb = offs < C
    s = tl.load(s_row + offs, mask=inb, other=float("-inf")).to(ACC)
    t_other = 0.0 if FORMAT == 2 else float("-inf")  # log 0 = -inf for probabilities
    t = tl.load(t_row + offs, mask=inb, other=t_other).to(ACC)
    return s, _teacher_logits(t, FORMAT)


@triton.jit
def _refine_kl(s_row, t_row, C, temp, m_s, m_t, log_ds, log_dt,
               ACC: tl.constexpr, FORMAT: tl.constexpr, BLOCK: tl.constexpr):
    """Second sweep (docs/ops-design.md, "Precision"): with rho = (a - b) - L_hat,
    S0 = sum (p_t - p_s), S2 = sum p_s phi(rho) (every term >= 0); KL = S2 / (1 + S0) + h(S0) (clamped at 0
    against rounding) and L = L_hat + log1p(S0), exact for any L_hat."""
    cs = _center(m_s)
    ct = _center(m_t)
    l_hat = log_dt - log_ds
    s0 = tl.zeros([], dtype=ACC)
    s2 = tl.zeros([], dtype=ACC)
    for start in range(0, C, BLOCK):
        s, v = _load_block(s_row, t_row, start, C, ACC, FORMAT, BLOCK)
        b = (s - cs) / temp
        a = (v - ct) / temp
        p_s = tl.exp(b - log_ds)
        p_t = tl.exp(a - log_dt)
        absent = (p_s + p_t) == 0
        rho = (a - b) - l_hat
        e = cm.expm1(-tl.abs(rho))
        t0 = tl.where(rho <= 0, p_s * e, -p_t * e)  # p_t - p_s
        small = tl.abs(rho) <= cm.PHI_SERIES_MAX
        big = p_s + tl.where(p_t == 0, 0.0, p_t * (rho - 1.0))
        t2 = tl.where(small, p_s * cm.phi_series(tl.where(small, rho, 0.0)), big)
        s0 += tl.sum(tl.where(absent, 0.0, t0), axis=0)
        s2 += tl.sum(tl.where(absent, 0.0, t2), axis=0)
    kl = s2 / (1.0 + s0) + cm.h_term(s0)
    kl = tl.where(kl < 0, 0.0, kl)
    return kl, l_hat + cm.log1p_small(s0)


@triton.jit
def _kd_loss_fwd_kernel(
    s_ptr, t_ptr, y_ptr, loss_ptr, stats_ptr,
    C, temperature, temperature_lo, alpha, alpha_lo, ignore_index,
    FP64: tl.constexpr, HAS_TARGET: tl.constexpr, SEPARATE_LSE1: tl.constexpr,
    T2_SCALE: tl.constexpr, FORMAT: tl.constexpr, BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32  # compute dtype
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * C
    t_row = t_ptr + row * C
    temp = cm.scalar(temperature, temperature_lo, ACC)
    a_w = cm.scalar(alpha, alpha_lo, ACC)
    neg_inf = float("-inf")

    zero = tl.zeros([], dtype=ACC)
    m_s = zero + neg_inf  # running max of s; d_s = sum exp((s - M_s) / T)
    d_s = zero
    m_t = zero + neg_inf  # running max of v; d_t = sum exp((v - M_t) / T)
    d_t = zero
    acc_a = zero  # A = sum exp(a) (a - b)
    d_1 = zero  # sum exp(s - M_s) for the CE term when T != 1

    for start in range(0, C, BLOCK):
        s, v = _load_block(s_row, t_row, start, C, ACC, FORMAT, BLOCK)

        # new maxima; a sum that is still 0 belongs to a max of -inf: rescale it to 0. Comparing d == 0
        # (not m == -inf) keeps a NaN sum NaN.
        ms_new = tl.maximum(m_s, tl.max(s, axis=0))
        mt_new = tl.maximum(m_t, tl.max(v, axis=0))
        cs = _center(ms_new)
        ct = _center(mt_new)
        raw_ds = cs - _center(m_s)
        shift_s = raw_ds / temp
        shift_t = (ct - _center(m_t)) / temp
        r_t = tl.exp(-shift_t)
        acc_a = tl.where(d_t == 0, 0.0, r_t * (acc_a + d_t * (shift_s - shift_t)))
        d_t = tl.where(d_t == 0, 0.0, r_t * d_t)
        d_s = tl.where(d_s == 0, 0.0, tl.exp(-shift_s) * d_s)
        m_s = ms_new
        m_t = mt_new

        xs = s - cs
        b = xs / temp
        a = (v - ct) / temp
        e_t = tl.exp(a)
        d_s += tl.sum(tl.exp(b), axis=0)
        d_t += tl.sum(e_t, axis=0)
        acc_a += tl.sum(tl.where(a == neg_inf, 0.0, e_t * (a - b)), axis=0)  # p_s = 0 < p_t: KL = inf

        if SEPARATE_LSE1:
            d_1 = tl.where(d_1 == 0, 0.0, tl.exp(-raw_ds) * d_1)
            d_1 += tl.sum(tl.exp(xs), axis=0)

    log_ds = tl.log(d_s)
    log_dt = tl.log(d_t)
    mean_delta = acc_a / d_t
    kl = mean_delta - log_dt + log_ds
    l_c = log_dt - log_ds
    # the one-pass KL is a difference of terms of this size: recompute it when they nearly cancel
    magnitude = tl.abs(mean_delta) + tl.abs(log_dt) + tl.abs(log_ds) + 1.0
    if kl < magnitude * cm.REFINE_RATIO:
        kl, l_c = _refine_kl(s_row, t_row, C, temp, m_s, m_t, log_ds, log_dt, ACC, FORMAT, BLOCK)
    # a term whose weight is exactly 0 is left out (no 0 * inf = NaN), as in the torch reference
    if T2_SCALE:
        loss = tl.where(a_w == 0, 0.0, a_w * temp * temp * kl)
    else:
        loss = tl.where(a_w == 0, 0.0, a_w * kl)

    log_d1 = log_ds
    if SEPARATE_LSE1:
        log_d1 = tl.log(d_1)
    if HAS_TARGET:
        y = tl.load(y_ptr + row)
        in_range = (y >= 0) & (y < C)
        s_y = tl.load(s_row + tl.where(in_range, y, 0)).to(ACC)  # clamped: never out of bounds
        ce = tl.where(in_range, (m_s - s_y) + log_d1, float("nan"))  # no rounding of a large logsumexp
        loss = loss + tl.where(a_w == 1, 0.0, (1.0 - a_w) * ce)
        loss = tl.where(y == ignore_index, 0.0, loss)

    tl.store(loss_ptr + row, loss)
    st = stats_ptr + row * 8
    tl.store(st + 0, m_s)
    tl.store(st + 1, _center(m_t) / temp + log_dt)
    tl.store(st + 2, m_t)
    tl.store(st + 3, log_ds)
    tl.store(st + 4, log_dt)
    tl.store(st + 5, log_d1)
    tl.store(st + 6, tl.where(log_ds != log_ds, log_ds, mean_delta))  # a NaN student reaches mu
    tl.store(st + 7, l_c)


@triton.jit
def _kd_loss_bwd_kernel(
    gl_ptr, glse_ptr, s_ptr, t_ptr, y_ptr, stats_ptr, gs_ptr, gt_ptr,
    C, temperature, temperature_lo, alpha, alpha_lo, ignore_index,
    FP64: tl.constexpr, HAS_TARGET: tl.constexpr, T2_SCALE: tl.constexpr, FORMAT: tl.constexpr,
    STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32  # compute dtype
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < C
    base = row * C
    temp = cm.scalar(temperature, temperature_lo, ACC)
    a_w = cm.scalar(alpha, alpha_lo, ACC)
    if T2_SCALE:
        ac = a_w * temp * temp
    else:
        ac = a_w

    g = tl.load(gl_ptr + row).to(ACC)
    st = stats_ptr + row * 8
    cs = _center(tl.load(st + 0).to(ACC))
    ct = _center(tl.load(st + 2).to(ACC))
    log_ds = tl.load(st + 3).to(ACC)
    log_dt = tl.load(st + 4).to(ACC)
    log_d1 = tl.load(st + 5).to(ACC)
    mu = tl.load(st + 6).to(ACC)
    l_c = tl.load(st + 7).to(ACC)

    s = tl.load(s_ptr + base + offs, mask=inb, other=0.0).to(ACC)
    t = tl.load(t_ptr + base + offs, mask=inb, other=1.0).to(ACC)
    xs = s - cs
    b = xs / temp
    a = (_teacher_logits(t, FORMAT) - ct) / temp
    p_s = tl.exp(b - log_ds)
    p_t = tl.exp(a - log_dt)
    delta = a - b
    rho = delta - l_c  # log p_t - log p_s

    keep = tl.full([], 1, tl.int1)  # row not ignored
    if HAS_TARGET:
        y = tl.load(y_ptr + row)
        keep = y != ignore_index

    # zero-weight terms are left out, as in the forward
    if STUDENT_GRAD:
        e = cm.expm1(-tl.abs(rho))
        diff = tl.where(rho <= 0, -p_s * e, p_t * e)  # p_s - p_t without cancellation
        diff = tl.where((p_s + p_t) == 0, 0.0, diff)
        gs = tl.where(a_w == 0, 0.0, ac / temp * diff)
        if HAS_TARGET:
            p_1 = tl.exp(xs - log_d1)
            # p_1_y - 1 formed in the compute dtype, rounded once at the store
            ce = tl.where(offs == y, p_1 - 1.0, p_1)
            # out-of-range target: the forward loss is NaN, so is its gradient
            ce = tl.where((y >= 0) & (y < C), ce, float("nan"))
            gs = gs + tl.where(a_w == 1, 0.0, (1.0 - a_w) * ce)
        gs = tl.where(keep, g * gs, 0.0)
        tl.store(gs_ptr + base + offs, gs.to(gs_ptr.dtype.element_ty), mask=inb)

    if TEACHER_GRAD:
        glse = tl.load(glse_ptr + row).to(ACC)
        dkl = tl.where(p_t == 0, 0.0, p_t * (delta - mu))  # p_t (rho - KL), KL = mu - L
        # an ignored row gets only the energy's gradient (none without one, whatever the row holds)
        dw = tl.where(keep & (a_w != 0), g * ac * dkl, 0.0) + tl.where(glse == 0, 0.0, glse * p_t)
        if FORMAT == 2:
            # 0 where t == 0 (an absent class) or where nothing flows (an ignored row, whatever t holds)
            gt = tl.where((t == 0) | (dw == 0), 0.0, dw / (temp * t))
        else:
            gt = dw / temp
        tl.store(gt_ptr + base + offs, gt.to(gt_ptr.dtype.element_ty), mask=inb)


def _kd_loss_fwd(
    student: Tensor,
    teacher: Tensor,
    target: Optional[Tensor],
    temperature: float,
    alpha: float,
    ignore_index: int,
    t2_scale: bool,
    teacher_format: int,
) -> tuple[Tensor, Tensor]:
    student, teacher, target = cm.contig(student, teacher, target)
    B, C = student.shape
    acc = cm.acc_dtype(student.dtype)
    loss = student.new_empty((B,), dtype=acc)
    stats = student.new_empty((B, 8), dtype=acc)
    if B > 0 and cm.launch_enabled():
        block = cm.block_size(C, cm.ROW_BLOCK)
        has_target = target is not None
        wrap_triton(_kd_loss_fwd_kernel)[(B,)](
            student, teacher, cm.opt(target, student), loss, stats,
            C, *cm.split_f32(temperature), *cm.split_f32(alpha), ignore_index,
            FP64=student.dtype == torch.float64, HAS_TARGET=has_target,
            SEPARATE_LSE1=has_target and float(temperature) != 1.0,
            T2_SCALE=bool(t2_scale), FORMAT=int(teacher_format), BLOCK=block,
            num_warps=cm.warps(block),
        )
    return loss, stats


def _kd_loss_bwd(
    grad_loss: Tensor,
    grad_lse_t: Tensor,
    student: Tensor,
    teacher: Tensor,
    target: Optional[Tensor],
    stats: Tensor,
    temperature: float,
    alpha: float,
    ignore_index: int,
    t2_scale: bool,
    teacher_format: int,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[Tensor, Tensor]:
    grad_loss, grad_lse_t, student, teacher, target, stats = cm.contig(
        grad_loss, grad_lse_t, student, teacher, target, stats
    )
    B, C = student.shape
    grad_s = torch.empty_like(student) if student_grad else cm.empty0(student)
    grad_t = torch.empty_like(teacher) if teacher_grad else cm.empty0(teacher)
    if B > 0 and C > 0 and (student_grad or teacher_grad) and cm.launch_enabled():
        block = cm.block_size(C, cm.ROW_BLOCK)
        wrap_triton(_kd_loss_bwd_kernel)[(B, triton.cdiv(C, block))](
            grad_loss, grad_lse_t, student, teacher, cm.opt(target, student), stats,
            cm.opt(grad_s if student_grad else None, student),
            cm.opt(grad_t if teacher_grad else None, teacher),
            C, *cm.split_f32(temperature), *cm.split_f32(alpha), ignore_index,
            FP64=student.dtype == torch.float64, HAS_TARGET=target is not None,
            T2_SCALE=bool(t2_scale), FORMAT=int(teacher_format),
            STUDENT_GRAD=bool(student_grad), TEACHER_GRAD=bool(teacher_grad), BLOCK=block,
            num_warps=cm.warps(block),
        )
    return grad_s, grad_t


kd_loss_fwd = cm.register("kd_loss_fwd", _kd_loss_fwd)
kd_loss_bwd = cm.register("kd_loss_bwd", _kd_loss_bwd)
