"""Top-k KD loss: KD against k (index, value) teacher entries per row, forward and backward.

Math (docs/ops-design.md section 4; kernels/topk_kd.h holds the same per-row formulas for CPU / CUDA). Per row,
u = s / T over the vocabulary (max m_s, d_s = sum exp(u - m_s)), a_k = u[idx_k] - m_s, e_k = v_k / T:
    log q_k = a_k - log d_s;  bucket: q_r = (d_s - sum_k exp(a_k)) / d_s, e_r = log(1 - sum_k exp(v_k)) / T
    log p_o = e_o - m_t - log d_t over the teacher outcomes (the k entries, and r for bucket)
    D = sum_o p_o (log p_o - log q_o) (kl)  or  sum_o q_o (log q_o - log p_o) (reverse_kl; q restricted to the k
        and renormalised for renormalize)
    loss = alpha c D + (1 - alpha) CE,  stats = [m_s, log d_s, m_1, log d_1, m_t, log d_t, D, c_tail]
Backward: a dense kernel writes g (alpha c / T q_j c_tail + (1 - alpha)(p1_j - [j == y])) for every class, then
a second kernel overwrites the k teacher entries with their exact gradient.
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
def _student_log_q(a, log_ds, BUCKET: tl.constexpr):
    """log q of the student on the k entries (a = s / T - m_s, -inf on masked lanes): over the whole
    vocabulary with the bucket, renormalised over the k classes without it (docs/ops-design.md, section 4)."""
    if BUCKET:
        return a - log_ds
    ma = tl.max(a, axis=0)
    return a - (ma + tl.log(tl.sum(tl.exp(a - ma), axis=0)))


@triton.jit
def _topk_fwd_kernel(
    s_ptr, idx_ptr, val_ptr, y_ptr, loss_ptr, stats_ptr,
    C, K, temperature, temperature_lo, alpha, alpha_lo, ignore_index,
    FP64: tl.constexpr, HAS_TARGET: tl.constexpr, NEED1: tl.constexpr, T2_SCALE: tl.constexpr,
    BUCKET: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr, KBLOCK: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * C
    temp = cm.scalar(temperature, temperature_lo, ACC)
    a_w = cm.scalar(alpha, alpha_lo, ACC)
    neg_inf = float("-inf")
    zero = tl.zeros([], dtype=ACC)

    # the row sweep: m_s = max u, d_s = sum exp(u - m_s); m_1, d_1 of s itself for the CE term when T != 1
    m_s = zero + neg_inf
    d_s = zero
    m_1 = zero + neg_inf
    d_1 = zero
    cols = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        offs = start + cols
        s = tl.load(s_row + offs, mask=offs < C, other=neg_inf).to(ACC)
        u = s / temp
        m_new = tl.maximum(m_s, tl.max(u, axis=0))
        dm = tl.where(m_new == m_s, 0.0, m_new - m_s)
        d_s = tl.where(d_s == 0, 0.0, tl.exp(-dm) * d_s)
        m_s = m_new
        d_s += tl.sum(tl.where(u == neg_inf, 0.0, tl.exp(u - m_s)), axis=0)
        if NEED1:
            m1_new = tl.maximum(m_1, tl.max(s, axis=0))
            d1 = tl.where(m1_new == m_1, 0.0, m1_new - m_1)
            d_1 = tl.where(d_1 == 0, 0.0, tl.exp(-d1) * d_1)
            m_1 = m1_new
            d_1 += tl.sum(tl.where(s == neg_inf, 0.0, tl.exp(s - m_1)), axis=0)
    log_ds = tl.log(d_s)

    # the k teacher entries
    ks = tl.arange(0, KBLOCK)
    km = ks < K
    idx = tl.load(idx_ptr + row * K + ks, mask=km, other=0)
    inr = (idx >= 0) & (idx < C)
    bad = tl.sum(tl.where(km & ~inr, 1, 0), axis=0) > 0
    v = tl.load(val_ptr + row * K + ks, mask=km, other=0.0).to(ACC)
    e = tl.where(km, v / temp, neg_inf)
    a = tl.where(km, tl.load(s_row + tl.where(inr, idx, 0), mask=km, other=0.0).to(ACC) / temp - m_s, neg_inf)
    e_r = zero + neg_inf
    if BUCKET:
        sum_p = tl.sum(tl.where(km, tl.exp(v), 0.0), axis=0)
        e_r = tl.where(sum_p >= 1.0, neg_inf, tl.log(1.0 - sum_p)) / temp
    m_t = tl.maximum(tl.max(e, axis=0), e_r)
    d_t = tl.sum(tl.where(km, tl.exp(e - m_t), 0.0), axis=0) + tl.where(e_r == neg_inf, 0.0, tl.exp(e_r - m_t))
    log_dt = tl.log(d_t)
    lp = e - m_t - log_dt
    if REVERSE:
        lq = _student_log_q(a, log_ds, BUCKET)
        q = tl.exp(lq)
        div = tl.sum(tl.where(q == 0, 0.0, q * (lq - lp)), axis=0)
        c_tail = zero
    else:
        p = tl.exp(lp)
        div = tl.sum(tl.where(p == 0, 0.0, p * (lp - (a - log_ds))), axis=0)
        c_tail = zero + 1.0
    if BUCKET:
        tail_d = d_s - tl.sum(tl.exp(a), axis=0)
        lq_r = tl.where(tail_d > 0, tl.log(tl.maximum(tail_d, 0.0)), neg_inf) - log_ds
        lp_r = e_r - m_t - log_dt
        p_r = tl.exp(lp_r)
        q_r = tl.exp(lq_r)
        if REVERSE:
            div += tl.where(q_r == 0, 0.0, q_r * (lq_r - lp_r))
            c_tail = lq_r - lp_r - div
        else:
            div += tl.where(p_r == 0, 0.0, p_r * (lp_r - lq_r))
            c_tail = 1.0 - p_r / q_r
    div = tl.where(bad, float("nan"), div)  # an index outside [0, C): a NaN row, nothing read out of bounds

    if T2_SCALE:
        loss = tl.where(a_w == 0, 0.0, a_w * temp * temp * div)
    else:
        loss = tl.where(a_w == 0, 0.0, a_w * div)
    m1_out = zero
    ld1_out = zero
    if HAS_TARGET:
        if NEED1:
            m1_out = m_1
            ld1_out = tl.log(d_1)
        else:
            m1_out = m_s
            ld1_out = log_ds
        y = tl.load(y_ptr + row)
        in_range = (y >= 0) & (y < C)
        s_y = tl.load(s_row + tl.where(in_range, y, 0)).to(ACC)
        ce = tl.where(in_range, (m1_out - s_y) + ld1_out, float("nan"))
        loss = loss + tl.where(a_w == 1, 0.0, (1.0 - a_w) * ce)
        loss = tl.where(y == ignore_index, 0.0, loss)

    tl.store(loss_ptr + row, loss)
    st = stats_ptr + row * 8
    tl.store(st + 0, m_s)
    tl.store(st + 1, log_ds)
    tl.store(st + 2, m1_out)
    tl.store(st + 3, ld1_out)
    tl.store(st + 4, m_t)
    tl.store(st + 5, log_dt)
    tl.store(st + 6, div)
    tl.store(st + 7, c_tail)


@triton.jit
def _dense_grad(gl_ptr, y_ptr, stats_ptr, row, C, temp, a_w, ignore_index, s, offs,
                HAS_TARGET: tl.constexpr, T2_SCALE: tl.constexpr, ACC: tl.constexpr, USE_TAIL: tl.constexpr):
    """g (alpha c / T q_j c_tail + (1 - alpha)(p1_j - [j == y])) at the columns offs (USE_TAIL: the tail term)."""
    st = stats_ptr + row * 8
    g = tl.load(gl_ptr + row).to(ACC)
    if T2_SCALE:
        ks = a_w * temp
    else:
        ks = a_w / temp
    grad = tl.zeros(offs.shape, dtype=ACC)
    if USE_TAIL:
        q = tl.exp((s / temp - tl.load(st + 0).to(ACC)) - tl.load(st + 1).to(ACC))
        grad = tl.where(q == 0, 0.0, ks * q * tl.load(st + 7).to(ACC))
        grad = tl.where(a_w == 0, 0.0, grad)
    keep = tl.full([], 1, tl.int1)
    if HAS_TARGET:
        y = tl.load(y_ptr + row)
        keep = y != ignore_index
        p1 = tl.exp((s - tl.load(st + 2).to(ACC)) - tl.load(st + 3).to(ACC))
        ce = tl.where(offs == y, p1 - 1.0, p1)  # p1_y - 1 formed in the compute dtype
        ce = tl.where((y >= 0) & (y < C), ce, float("nan"))
        grad = grad + tl.where(a_w == 1, 0.0, (1.0 - a_w) * ce)
    return tl.where(keep, g * grad, 0.0), keep


@triton.jit
def _topk_bwd_dense_kernel(
    gl_ptr, s_ptr, y_ptr, stats_ptr, gs_ptr,
    C, temperature, temperature_lo, alpha, alpha_lo, ignore_index,
    FP64: tl.constexpr, HAS_TARGET: tl.constexpr, T2_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < C
    temp = cm.scalar(temperature, temperature_lo, ACC)
    a_w = cm.scalar(alpha, alpha_lo, ACC)
    s = tl.load(s_ptr + row * C + offs, mask=inb, other=0.0).to(ACC)
    grad, keep = _dense_grad(gl_ptr, y_ptr, stats_ptr, row, C, temp, a_w, ignore_index, s, offs,
                             HAS_TARGET, T2_SCALE, ACC, True)
    tl.store(gs_ptr + row * C + offs, grad.to(gs_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _topk_bwd_entries_kernel(
    gl_ptr, s_ptr, idx_ptr, val_ptr, y_ptr, stats_ptr, gs_ptr,
    C, K, temperature, temperature_lo, alpha, alpha_lo, ignore_index,
    FP64: tl.constexpr, HAS_TARGET: tl.constexpr, T2_SCALE: tl.constexpr, BUCKET: tl.constexpr,
    REVERSE: tl.constexpr, KBLOCK: tl.constexpr,
):
    """Overwrites the k teacher entries of a row with their exact gradient (after the dense kernel)."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    temp = cm.scalar(temperature, temperature_lo, ACC)
    a_w = cm.scalar(alpha, alpha_lo, ACC)
    st = stats_ptr + row * 8
    m_s, log_ds, m_t, log_dt = cm.load_softmax_stats(st, 0, 4, ACC)
    div = tl.load(st + 6).to(ACC)
    ks = tl.arange(0, KBLOCK)
    km = ks < K
    idx = tl.load(idx_ptr + row * K + ks, mask=km, other=0)
    inr = (idx >= 0) & (idx < C)
    safe = tl.where(inr, idx, 0)
    s = tl.load(s_ptr + row * C + safe, mask=km, other=0.0).to(ACC)
    a = tl.where(km, s / temp - m_s, float("-inf"))
    lp = tl.load(val_ptr + row * K + ks, mask=km, other=0.0).to(ACC) / temp - m_t - log_dt
    if REVERSE:
        lq = _student_log_q(a, log_ds, BUCKET)
        q = tl.exp(lq)
        dd = tl.where(q == 0, 0.0, q * (lq - lp - div))
    else:
        dd = tl.exp(a - log_ds) - tl.exp(lp)
    if T2_SCALE:
        kd = a_w * temp
    else:
        kd = a_w / temp
    grad, keep = _dense_grad(gl_ptr, y_ptr, stats_ptr, row, C, temp, a_w, ignore_index, s, safe,
                             HAS_TARGET, T2_SCALE, ACC, False)
    g = tl.load(gl_ptr + row).to(ACC)
    grad = grad + tl.where(keep, g * kd * dd, 0.0)
    grad = tl.where(inr, grad, float("nan"))
    tl.store(gs_ptr + row * C + safe, grad.to(gs_ptr.dtype.element_ty), mask=km & inr)


def _flags(target, temperature, t2_scale, tail, divergence):
    return dict(HAS_TARGET=target is not None, T2_SCALE=bool(t2_scale), BUCKET=int(tail) == 1,
                REVERSE=int(divergence) == 1)


def _topk_kd_loss_fwd(student: Tensor, indices: Tensor, values: Tensor, target: Optional[Tensor],
                      temperature: float, alpha: float, ignore_index: int, t2_scale: bool, values_format: int,
                      tail: int, divergence: int) -> tuple[Tensor, Tensor]:
    student, indices, values, target = cm.contig(student, indices, values, target)
    B, C = student.shape
    K = indices.shape[1]
    acc = cm.acc_dtype(student.dtype)
    loss = student.new_empty((B,), dtype=acc)
    stats = student.new_empty((B, 8), dtype=acc)
    if B > 0 and cm.launch_enabled():
        block = cm.block_size(C, cm.ROW_BLOCK)
        wrap_triton(_topk_fwd_kernel)[(B,)](
            student, indices, values, cm.opt(target, student), loss, stats,
            C, K, *cm.split_f32(temperature), *cm.split_f32(alpha), ignore_index,
            FP64=student.dtype == torch.float64, NEED1=target is not None and float(temperature) != 1.0,
            BLOCK=block, KBLOCK=max(cm.MIN_BLOCK, triton.next_power_of_2(K)),
            num_warps=cm.warps(block), **_flags(target, temperature, t2_scale, tail, divergence),
        )
    return loss, stats


def _topk_kd_loss_bwd(grad_loss: Tensor, student: Tensor, indices: Tensor, values: Tensor,
                      target: Optional[Tensor], stats: Tensor, temperature: float, alpha: float, ignore_index: int,
                      t2_scale: bool, values_format: int, tail: int, divergence: int) -> Tensor:
    grad_loss, student, indices, values, target, stats = cm.contig(grad_loss, student, indices, values, target,
                                                                    stats)
    B, C = student.shape
    K = indices.shape[1]
    grad = torch.empty_like(student)
    if B > 0 and cm.launch_enabled():
        block = cm.block_size(C, cm.ROW_BLOCK)
        common = (C, *cm.split_f32(temperature), *cm.split_f32(alpha), ignore_index)
        flags = _flags(target, temperature, t2_scale, tail, divergence)
        fp64 = student.dtype == torch.float64
        tgt = cm.opt(target, student)
        wrap_triton(_topk_bwd_dense_kernel)[(B, triton.cdiv(C, block))](
            grad_loss, student, tgt, stats, grad, *common, FP64=fp64, HAS_TARGET=flags["HAS_TARGET"],
            T2_SCALE=flags["T2_SCALE"], BLOCK=block, num_warps=cm.warps(block),
        )
        if float(alpha) != 0.0:  # with alpha == 0 the dense kernel already wrote the k entries right
            wrap_triton(_topk_bwd_entries_kernel)[(B,)](
                grad_loss, student, indices, values, tgt, stats, grad, C, K, *common[1:], FP64=fp64,
                KBLOCK=max(cm.MIN_BLOCK, triton.next_power_of_2(K)), **flags,
            )
    return grad


topk_kd_loss_fwd = cm.register("topk_kd_loss_fwd", _topk_kd_loss_fwd)
topk_kd_loss_bwd = cm.register("topk_kd_loss_bwd", _topk_kd_loss_bwd)
