"""Uncertainty: energy and softmax entropy of tempered logits, forward and backward.

Math (docs/ops-design.md section 2), per row, u = z / T, p = softmax(u):
    energy  = -T * logsumexp(u)
    entropy = -sum_j p_j log p_j = log d - S / d,  S = sum_j exp(u_j - m) (u_j - m), d = sum exp(u_j - m)
Backward (lse = -energy / T, H = entropy):
    grad_z_j = -gE * p_j - gH * p_j * (u_j - lse + H) / T     (second term 0 where p_j == 0)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import _common as cm


@triton.jit
def _uncertainty_fwd_kernel(
    z_ptr, energy_ptr, entropy_ptr, C, temperature, temperature_lo,
    FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32  # compute dtype
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * C
    temp = cm.scalar(temperature, temperature_lo, ACC)
    neg_inf = float("-inf")

    zero = tl.zeros([], dtype=ACC)
    m = zero + neg_inf  # running max of u
    d = zero  # sum exp(u - m)
    acc_s = zero  # S = sum exp(u - m) * (u - m)
    cols = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        offs = start + cols
        u = tl.load(z_row + offs, mask=offs < C, other=neg_inf).to(ACC) / temp
        m_new = tl.maximum(m, tl.max(u, axis=0))
        dm = tl.where(m_new == m, 0.0, m_new - m)
        r = tl.exp(-dm)
        # S <- r (S - d dm), d <- r d; a zero sum (max still -inf) stays 0, a NaN one stays NaN
        acc_s = tl.where(d == 0, 0.0, r * (acc_s - d * dm))
        d = tl.where(d == 0, 0.0, r * d)
        m = m_new
        e = tl.where(u == neg_inf, 0.0, tl.exp(u - m))
        d += tl.sum(e, axis=0)
        acc_s += tl.sum(tl.where(u == neg_inf, 0.0, e * (u - m)), axis=0)

    log_d = tl.log(d)
    tl.store(energy_ptr + row, -temp * (m + log_d))
    tl.store(entropy_ptr + row, log_d - acc_s / d)


@triton.jit
def _uncertainty_bwd_kernel(
    ge_ptr, gh_ptr, z_ptr, energy_ptr, entropy_ptr, gz_ptr, C, temperature, temperature_lo,
    FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32  # compute dtype
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < C
    temp = cm.scalar(temperature, temperature_lo, ACC)
    g_e = tl.load(ge_ptr + row).to(ACC)
    g_h = tl.load(gh_ptr + row).to(ACC)
    lse = -tl.load(energy_ptr + row).to(ACC) / temp
    h = tl.load(entropy_ptr + row).to(ACC)

    u = tl.load(z_ptr + row * C + offs, mask=inb, other=0.0).to(ACC) / temp
    p = tl.exp(u - lse)
    d_h = tl.where(p == 0, 0.0, p * (u - lse + h) / temp)
    gz = -g_e * p - g_h * d_h
    tl.store(gz_ptr + row * C + offs, gz.to(gz_ptr.dtype.element_ty), mask=inb)


def _uncertainty_fwd(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    (logits,) = cm.contig(logits)
    B, C = logits.shape
    acc = cm.acc_dtype(logits.dtype)
    energy = logits.new_empty((B,), dtype=acc)
    entropy = logits.new_empty((B,), dtype=acc)
    if B > 0 and cm.launch_enabled():
        block = cm.block_size(C, cm.ROW_BLOCK)
        wrap_triton(_uncertainty_fwd_kernel)[(B,)](
            logits, energy, entropy, C, *cm.split_f32(temperature),
            FP64=logits.dtype == torch.float64, BLOCK=block, num_warps=cm.warps(block),
        )
    return energy, entropy


def _uncertainty_bwd(
    grad_energy: Tensor,
    grad_entropy: Tensor,
    logits: Tensor,
    energy: Tensor,
    entropy: Tensor,
    temperature: float,
) -> Tensor:
    grad_energy, grad_entropy, logits, energy, entropy = cm.contig(grad_energy, grad_entropy, logits, energy, entropy)
    B, C = logits.shape
    grad = torch.empty_like(logits)
    if B > 0 and C > 0 and cm.launch_enabled():
        block = cm.block_size(C, cm.ROW_BLOCK)
        wrap_triton(_uncertainty_bwd_kernel)[(B, triton.cdiv(C, block))](
            grad_energy, grad_entropy, logits, energy, entropy, grad, C, *cm.split_f32(temperature),
            FP64=logits.dtype == torch.float64, BLOCK=block, num_warps=cm.warps(block),
        )
    return grad


uncertainty_fwd = cm.register("uncertainty_fwd", _uncertainty_fwd)
uncertainty_bwd = cm.register("uncertainty_bwd", _uncertainty_bwd)
