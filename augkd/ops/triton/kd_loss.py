"""KD loss: fused KL(teacher || student) at temperature T + hard-label CE, forward and backward.

Math (docs/ops-design.md section 1), per row i, u = s / T, w = v / T (v = t for logits and
log-probabilities, v = log t for probabilities):
    KL_i   = sum_j p_t (log p_t - log p_s),   CE_i = logsumexp(s) - s_y
    loss_i = alpha * c * KL_i + (1 - alpha) * CE_i   (c = T^2 if t2_scale), 0 for ignored rows;
             a term whose weight is exactly 0 (alpha = 0 or 1) is left out, like the torch reference
Forward: one sweep per row with online maxima/sums, stats = [lse_s, lse_t, lse_1, KL].
Backward: recompute p_s, p_t, p_1 from the stats (one read of s and t), write the gradients.
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
    a = cm.scalar(alpha, alpha_lo, ACC)
    neg_inf = float("-inf")
    t_other = 0.0 if FORMAT == 2 else neg_inf  # masked lanes: v = -inf either way

    zero = tl.zeros([], dtype=ACC)
    m_s = zero + neg_inf  # running max of u; d_s = sum exp(u - m_s)
    d_s = zero
    m_t = zero + neg_inf  # running max of w; d_t = sum exp(w - m_t)
    d_t = zero
    acc_a = zero  # A = sum exp(w - m_t) * ((w - m_t) - (u - m_s))
    m_1 = zero + neg_inf  # online logsumexp(s) for the CE term when T != 1
    d_1 = zero

    cols = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        offs = start + cols
        inb = offs < C
        s = tl.load(s_row + offs, mask=inb, other=neg_inf).to(ACC)
        t = tl.load(t_row + offs, mask=inb, other=t_other).to(ACC)
        u = s / temp
        w = _teacher_logits(t, FORMAT) / temp

        # new maxima; a sum that is still 0 belongs to a max of -inf: rescale it to 0, never
        # exp(-inf - -inf). Comparing d == 0 (not m == -inf) keeps a NaN sum NaN.
        ms_new = tl.maximum(m_s, tl.max(u, axis=0))
        mt_new = tl.maximum(m_t, tl.max(w, axis=0))
        ds = tl.where(ms_new == m_s, 0.0, ms_new - m_s)
        dt = tl.where(mt_new == m_t, 0.0, mt_new - m_t)
        r_t = tl.exp(-dt)
        acc_a = tl.where(d_t == 0, 0.0, r_t * (acc_a + d_t * (ds - dt)))
        d_t = tl.where(d_t == 0, 0.0, r_t * d_t)
        d_s = tl.where(d_s == 0, 0.0, tl.exp(-ds) * d_s)
        m_s = ms_new
        m_t = mt_new

        u_rel = tl.where(u == neg_inf, neg_inf, u - m_s)  # -inf even while m_s is still -inf
        e_s = tl.where(u == neg_inf, 0.0, tl.exp(u_rel))
        e_t = tl.where(w == neg_inf, 0.0, tl.exp(w - m_t))
        a_terms = tl.where(w == neg_inf, 0.0, e_t * ((w - m_t) - u_rel))  # p_s = 0 < p_t: KL = inf
        d_s += tl.sum(e_s, axis=0)
        d_t += tl.sum(e_t, axis=0)
        acc_a += tl.sum(a_terms, axis=0)

        if SEPARATE_LSE1:
            m1_new = tl.maximum(m_1, tl.max(s, axis=0))
            d1 = tl.where(m1_new == m_1, 0.0, m1_new - m_1)
            d_1 = tl.where(d_1 == 0, 0.0, tl.exp(-d1) * d_1)
            m_1 = m1_new
            d_1 += tl.sum(tl.where(s == neg_inf, 0.0, tl.exp(s - m_1)), axis=0)

    log_ds = tl.log(d_s)
    log_dt = tl.log(d_t)
    lse_s = m_s + log_ds
    lse_t = m_t + log_dt
    kl = acc_a / d_t - log_dt + log_ds
    # a term whose weight is exactly 0 is left out (no 0 * inf = NaN), as in the torch reference
    if T2_SCALE:
        loss = tl.where(a == 0, 0.0, a * temp * temp * kl)
    else:
        loss = tl.where(a == 0, 0.0, a * kl)

    lse_1 = zero
    if HAS_TARGET:
        if SEPARATE_LSE1:
            lse_1 = m_1 + tl.log(d_1)
        else:
            lse_1 = lse_s
        y = tl.load(y_ptr + row)
        in_range = (y >= 0) & (y < C)
        s_y = tl.load(s_row + tl.where(in_range, y, 0)).to(ACC)  # clamped: never out of bounds
        ce = tl.where(in_range, lse_1 - s_y, float("nan"))
        loss = loss + tl.where(a == 1, 0.0, (1.0 - a) * ce)
        loss = tl.where(y == ignore_index, 0.0, loss)

    tl.store(loss_ptr + row, loss)
    st = stats_ptr + row * 4
    tl.store(st + 0, lse_s)
    tl.store(st + 1, lse_t)
    tl.store(st + 2, lse_1)
    tl.store(st + 3, kl)


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
    a = cm.scalar(alpha, alpha_lo, ACC)
    if T2_SCALE:
        ac = a * temp * temp
    else:
        ac = a

    g = tl.load(gl_ptr + row).to(ACC)
    st = stats_ptr + row * 4
    lse_s = tl.load(st + 0).to(ACC)
    lse_t = tl.load(st + 1).to(ACC)
    lse_1 = tl.load(st + 2).to(ACC)
    kl = tl.load(st + 3).to(ACC)

    s = tl.load(s_ptr + base + offs, mask=inb, other=0.0).to(ACC)
    t = tl.load(t_ptr + base + offs, mask=inb, other=0.0).to(ACC)
    u = s / temp
    w = _teacher_logits(t, FORMAT) / temp
    log_ps = u - lse_s
    log_pt = w - lse_t
    p_s = tl.exp(log_ps)
    p_t = tl.exp(log_pt)

    keep = tl.full([], 1, tl.int1)  # row not ignored
    if HAS_TARGET:
        y = tl.load(y_ptr + row)
        keep = y != ignore_index

    # zero-weight terms are left out, as in the forward
    if STUDENT_GRAD:
        gs = tl.where(a == 0, 0.0, ac / temp * (p_s - p_t))
        if HAS_TARGET:
            p_1 = tl.exp(s - lse_1)
            # p_1_y - 1 formed in the compute dtype, rounded once at the store
            ce = tl.where(offs == y, p_1 - 1.0, p_1)
            # out-of-range target: the forward loss is NaN, so is its gradient
            ce = tl.where((y >= 0) & (y < C), ce, float("nan"))
            gs = gs + tl.where(a == 1, 0.0, (1.0 - a) * ce)
        gs = tl.where(keep, g * gs, 0.0)
        tl.store(gs_ptr + base + offs, gs.to(gs_ptr.dtype.element_ty), mask=inb)

    if TEACHER_GRAD:
        glse = tl.load(glse_ptr + row).to(ACC)
        dkl = tl.where(p_t == 0, 0.0, p_t * (log_pt - log_ps - kl))
        dw = tl.where(keep & (a != 0), g * ac * dkl, 0.0) + glse * p_t
        if FORMAT == 2:
            gt = tl.where(t == 0, 0.0, dw / (temp * t))
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
    stats = student.new_empty((B, 4), dtype=acc)
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
