"""Anchor-masked latent mixup and pixel mixup, forward and backward.

Math (docs/ops-design.md section 3):
    latent_mixup(z, m, psi, s) = z + (1 - s_i) * m_ij * (psi_ij - z_ij)
    pixel_mixup(g, r, s)      = (g + s_i * (r - g) - mean_c) / std_c
Both kernels sweep 2-D tiles (rows x columns) of a (rows, cols) view: latent (B, L), pixel
(B * C, H * W) whose rows are (sample, channel) planes. Reductions in the backward (grad_s over a
sample, grad_mask over rows for a (1, L) mask) are two-stage and deterministic: each tile writes its
partial sums (fp32, fp64 for fp64 input) and a torch sum over the few partials finishes them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import _common as cm


@triton.jit
def _row_scalar(s_ptr, rows, rmask, s_scalar, s_scalar_lo, ACC: tl.constexpr, HAS_S: tl.constexpr,
                BLOCK_R: tl.constexpr):
    # s_i per row of the tile: the (B,) tensor when given, else the Python float
    if HAS_S:
        return tl.load(s_ptr + rows, mask=rmask, other=0.0).to(ACC)
    else:
        return tl.zeros([BLOCK_R], dtype=ACC) + cm.scalar(s_scalar, s_scalar_lo, ACC)


@triton.jit
def _latent_mixup_kernel(
    g_ptr, z_ptr, m_ptr, psi_ptr, s_ptr, out_ptr, gz_ptr, gm_ptr, gpsi_ptr, gs_part_ptr,
    B, L, s_scalar, s_scalar_lo,
    FP64: tl.constexpr, HAS_S: tl.constexpr, MASK_BCAST: tl.constexpr, BACKWARD: tl.constexpr,
    GZ: tl.constexpr, GM: tl.constexpr, GP: tl.constexpr, GS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # backward: GZ/GM/GP/GS say which gradients are wanted; the others are neither computed nor stored
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32  # compute dtype
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < B
    cmask = cols < L
    inb = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * L + cols[None, :]

    z = tl.load(z_ptr + offs, mask=inb, other=0.0).to(ACC)
    psi = tl.load(psi_ptr + offs, mask=inb, other=0.0).to(ACC)
    if MASK_BCAST:  # (1, L) mask shared by every row
        m = tl.load(m_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    else:
        m = tl.load(m_ptr + offs, mask=inb, other=0.0).to(ACC)
    one_minus_s = (1.0 - _row_scalar(s_ptr, rows, rmask, s_scalar, s_scalar_lo, ACC, HAS_S, BLOCK_R))[:, None]
    k = one_minus_s * m
    dlt = psi - z

    if not BACKWARD:
        out = z + k * dlt
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inb)
    else:
        g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(ACC)
        if GZ:
            tl.store(gz_ptr + offs, (g * (1.0 - k)).to(gz_ptr.dtype.element_ty), mask=inb)
        if GP:
            tl.store(gpsi_ptr + offs, (g * k).to(gpsi_ptr.dtype.element_ty), mask=inb)
        if GM:
            gm = g * one_minus_s * dlt
            if MASK_BCAST:  # partial column sums of this row block: gm_part[pid_r, cols]
                tl.store(gm_ptr + pid_r.to(tl.int64) * L + cols, tl.sum(gm, axis=0), mask=cmask)
            else:
                tl.store(gm_ptr + offs, gm.to(gm_ptr.dtype.element_ty), mask=inb)
        if GS:  # partial row sums of this column block: gs_part[rows, pid_c]
            gs = -tl.sum(g * m * dlt, axis=1)
            tl.store(gs_part_ptr + rows * tl.num_programs(1) + pid_c, gs, mask=rmask)


@triton.jit
def _pixel_mixup_kernel(
    g_ptr, gen_ptr, real_ptr, s_ptr, mean_ptr, std_ptr, out_ptr, ggen_ptr, greal_ptr, gs_part_ptr,
    P, HW, NC, s_scalar, s_scalar_lo,
    FP64: tl.constexpr, HAS_S: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_STD: tl.constexpr,
    BACKWARD: tl.constexpr, GG: tl.constexpr, GR: tl.constexpr, GS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # backward: GG/GR/GS say which gradients are wanted; gen and real are read only for grad_s
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32  # compute dtype
    # rows: planes p = b * NC + c of the (B * NC, HW) view; columns: pixels of a plane
    pid_c = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < P
    inb = rmask[:, None] & (cols < HW)[None, :]
    offs = rows[:, None] * HW + cols[None, :]
    sample = rows // NC
    chan = rows % NC

    s = _row_scalar(s_ptr, sample, rmask, s_scalar, s_scalar_lo, ACC, HAS_S, BLOCK_R)[:, None]
    if HAS_STD:
        inv_std = 1.0 / tl.load(std_ptr + chan, mask=rmask, other=1.0).to(ACC)[:, None]

    if not BACKWARD:
        gen = tl.load(gen_ptr + offs, mask=inb, other=0.0).to(ACC)
        real = tl.load(real_ptr + offs, mask=inb, other=0.0).to(ACC)
        out = gen + s * (real - gen)
        if HAS_MEAN:
            out = out - tl.load(mean_ptr + chan, mask=rmask, other=0.0).to(ACC)[:, None]
        if HAS_STD:
            out = out * inv_std
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inb)
    else:
        g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(ACC)
        if HAS_STD:
            g = g * inv_std
        if GG:
            tl.store(ggen_ptr + offs, (g * (1.0 - s)).to(ggen_ptr.dtype.element_ty), mask=inb)
        if GR:
            tl.store(greal_ptr + offs, (g * s).to(greal_ptr.dtype.element_ty), mask=inb)
        if GS:  # partial sums of this (plane block, column block): gs_part[rows, pid_c]
            gen = tl.load(gen_ptr + offs, mask=inb, other=0.0).to(ACC)
            real = tl.load(real_ptr + offs, mask=inb, other=0.0).to(ACC)
            gs = tl.sum(g * (real - gen), axis=1)
            tl.store(gs_part_ptr + rows * tl.num_programs(1) + pid_c, gs, mask=rmask)


def _latent_launch(grad_out, z, mask, psi, s, s_scalar, outs, backward: bool):
    """Launch the latent kernel over (B, L) tiles; outs = (out, gz, gm, gpsi, gs_part), None where not
    wanted (in the backward, a None gradient is not computed)."""
    B, L = z.shape
    br, bc = cm.tile_shape(B, L)
    out, gz, gm, gpsi, gs_part = (cm.opt(o, z) for o in outs)
    wrap_triton(_latent_mixup_kernel)[(triton.cdiv(B, br), triton.cdiv(L, bc))](
        cm.opt(grad_out, z), z, mask, psi, cm.opt(s, z), out, gz, gm, gpsi, gs_part,
        B, L, *cm.split_f32(s_scalar),
        FP64=z.dtype == torch.float64, HAS_S=s is not None, MASK_BCAST=mask.shape[0] != B,
        BACKWARD=backward, GZ=outs[1] is not None, GM=outs[2] is not None, GP=outs[3] is not None,
        GS=outs[4] is not None, BLOCK_R=br, BLOCK_C=bc, num_warps=cm.warps(br * bc),
    )


def _latent_mixup_fwd(z: Tensor, mask: Tensor, psi: Tensor, s: Optional[Tensor], s_scalar: float) -> Tensor:
    z, mask, psi, s = cm.contig(z, mask, psi, s)
    out = torch.empty_like(z)
    if z.numel() > 0 and cm.launch_enabled():
        _latent_launch(None, z, mask, psi, s, s_scalar, (out, None, None, None, None), False)
    return out


def _latent_mixup_bwd(
    grad_out: Tensor, z: Tensor, mask: Tensor, psi: Tensor, s: Optional[Tensor], s_scalar: float,
    z_grad: bool, mask_grad: bool, psi_grad: bool, s_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grad_out, z, mask, psi, s = cm.contig(grad_out, z, mask, psi, s)
    B, L = z.shape
    br, bc = cm.tile_shape(B, L)
    acc = cm.acc_dtype(z.dtype)
    bcast = mask.shape[0] != B
    s_grad = s_grad and s is not None
    grad_z = torch.empty_like(z) if z_grad else None
    grad_psi = torch.empty_like(psi) if psi_grad else None
    gm = gs_part = None
    if mask_grad:  # partial column sums (row blocks, L) for a (1, L) mask, else the (B, L) gradient itself
        gm = z.new_empty((triton.cdiv(B, br), L), dtype=acc) if bcast else torch.empty_like(mask)
    if s_grad:
        gs_part = z.new_empty((B, triton.cdiv(L, bc)), dtype=acc)
    if z.numel() > 0 and cm.launch_enabled():
        _latent_launch(grad_out, z, mask, psi, s, s_scalar, (None, grad_z, gm, grad_psi, gs_part), True)
    # empty inputs leave empty partials, whose sums are the zeros wanted
    grad_mask = cm.empty0(z) if gm is None else gm.sum(0, keepdim=True).to(mask.dtype) if bcast else gm
    grad_s = gs_part.sum(1).to(s.dtype) if s_grad else cm.empty0(z)
    return cm.or_empty0(grad_z, z), grad_mask, cm.or_empty0(grad_psi, z), grad_s


def _pixel_launch(grad_out, gen, real, s, s_scalar, mean, std, outs, backward: bool):
    """Launch the pixel kernel over (B * C, H * W) tiles; outs = (out, ggen, greal, gs_part), None where
    not wanted."""
    B, NC = gen.shape[0], gen.shape[1]
    P, HW = B * NC, math.prod(gen.shape[2:])
    br, bc = cm.tile_shape(P, HW)
    out, ggen, greal, gs_part = (cm.opt(o, gen) for o in outs)
    wrap_triton(_pixel_mixup_kernel)[(triton.cdiv(P, br), triton.cdiv(HW, bc))](
        cm.opt(grad_out, gen), gen, real, cm.opt(s, gen), cm.opt(mean, gen), cm.opt(std, gen),
        out, ggen, greal, gs_part,
        P, HW, NC, *cm.split_f32(s_scalar),
        FP64=gen.dtype == torch.float64, HAS_S=s is not None, HAS_MEAN=mean is not None,
        HAS_STD=std is not None, BACKWARD=backward, GG=outs[1] is not None, GR=outs[2] is not None,
        GS=outs[3] is not None, BLOCK_R=br, BLOCK_C=bc,
        num_warps=cm.warps(br * bc),
    )


def _pixel_mixup_fwd(generated: Tensor, real: Tensor, s: Optional[Tensor], s_scalar: float, mean: Optional[Tensor],
                     std: Optional[Tensor]) -> Tensor:
    generated, real, s, mean, std = cm.contig(generated, real, s, mean, std)
    out = torch.empty_like(generated)
    if generated.numel() > 0 and cm.launch_enabled():
        _pixel_launch(None, generated, real, s, s_scalar, mean, std, (out, None, None, None), False)
    return out


def _pixel_mixup_bwd(grad_out: Tensor, generated: Tensor, real: Tensor, s: Optional[Tensor], s_scalar: float,
                     mean: Optional[Tensor], std: Optional[Tensor], generated_grad: bool, real_grad: bool,
                     s_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    grad_out, generated, real, s, mean, std = cm.contig(grad_out, generated, real, s, mean, std)
    B, NC = generated.shape[0], generated.shape[1]
    HW = math.prod(generated.shape[2:])
    _, bc = cm.tile_shape(B * NC, HW)
    s_grad = s_grad and s is not None
    grad_gen = torch.empty_like(generated) if generated_grad else None
    grad_real = torch.empty_like(real) if real_grad else None
    gs_part = None
    if s_grad:  # (B * C, column blocks): every entry written by exactly one tile
        gs_part = generated.new_empty((B * NC, triton.cdiv(HW, bc)), dtype=cm.acc_dtype(generated.dtype))
    if generated.numel() > 0 and cm.launch_enabled():
        _pixel_launch(grad_out, generated, real, s, s_scalar, mean, std, (None, grad_gen, grad_real, gs_part), True)
    grad_s = gs_part.sum(1).view(B, NC).sum(1).to(s.dtype) if s_grad else cm.empty0(generated)
    return cm.or_empty0(grad_gen, generated), cm.or_empty0(grad_real, generated), grad_s


latent_mixup_fwd = cm.register("latent_mixup_fwd", _latent_mixup_fwd)
latent_mixup_bwd = cm.register("latent_mixup_bwd", _latent_mixup_bwd)
pixel_mixup_fwd = cm.register("pixel_mixup_fwd", _pixel_mixup_fwd)
pixel_mixup_bwd = cm.register("pixel_mixup_bwd", _pixel_mixup_bwd)
