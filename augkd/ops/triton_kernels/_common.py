"""Shared helpers of the Triton backend: block sizes, warps, dtypes, op registration.

The op schemas are the ones of ``augkd.ops.specs`` (namespace ``augkd`` in C++), registered again under
``augkd_triton``; the math lives in docs/ops-design.md.
"""

from __future__ import annotations

import contextlib
import math
import struct
import threading
from typing import Callable, Iterator, Optional

import torch
import triton
import triton.language as tl

from ..specs import SCHEMAS

NAMESPACE = "augkd_triton"


def _interpreting() -> bool:
    """True when TRITON_INTERPRET made @triton.jit return interpreter functions."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old triton
        return False

    @triton.jit
    def _probe():
        pass

    return isinstance(_probe, InterpretedFunction)


INTERPRET = _interpreting()

# ---------------------------------------------------------------------------------------------
# block sizes

MIN_BLOCK = 16
ROW_BLOCK = 4096  # columns per step of the row kernels (online softmax sweeps)
TILE = 4096  # elements per program of the elementwise kernels

_state = threading.local()


@contextlib.contextmanager
def max_block(n: int) -> Iterator[None]:
    """Cap every block size (tests use it to force the multi-block online updates on small C)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"max_block needs a power of two, got {n}")
    prev = getattr(_state, "max_block", None)
    _state.max_block = n
    try:
        yield
    finally:
        _state.max_block = prev


def block_size(n: int, cap: int) -> int:
    """min(next_pow2(n), cap), at least MIN_BLOCK, at most a forced max_block()."""
    b = max(MIN_BLOCK, min(triton.next_power_of_2(max(int(n), 1)), cap))
    forced = getattr(_state, "max_block", None)
    return b if forced is None else min(b, forced)


def tile_shape(rows: int, cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of a 2-D tile of about TILE elements for a (rows, cols) array."""
    bc = block_size(cols, min(TILE, 1024))
    br = max(1, min(triton.next_power_of_2(max(int(rows), 1)), TILE // bc))
    forced = getattr(_state, "max_block", None)
    if forced is not None:
        br = min(br, forced)
    return br, bc


def warps(block: int) -> int:
    """4 warps up to 1024 lanes, 8 for 2048, 16 from 4096."""
    return min(16, max(4, block // 256))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Compute / per-row output dtype: fp64 for fp64 input, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_f32(x: float) -> tuple[float, float]:
    """(hi, lo) with hi = fp32(x), lo = fp32(x - hi): compiled Triton passes Python floats as fp32,
    so fp64 kernels rebuild the scalar as hi + lo (~48 bits) with scalar(); fp32 kernels get hi."""
    x = float(x)
    try:
        hi = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # beyond the fp32 range: nothing sensible to split
        return x, 0.0
    lo = x - hi
    return hi, lo if math.isfinite(lo) else 0.0


@triton.jit
def scalar(hi, lo, ACC: tl.constexpr):
    """A Python float argument in the compute dtype (Inductor passes fp64, Triton fp32)."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def load_softmax_stats(st, S_AT: tl.constexpr, T_AT: tl.constexpr, ACC: tl.constexpr):
    """A row's saved student and teacher softmax statistics as ACC: (max, log of the sum) of the student at
    st + S_AT, st + S_AT + 1 and of the teacher at st + T_AT, st + T_AT + 1 (the backward kernels rebuild the
    probabilities from them)."""
    m_s = tl.load(st + S_AT).to(ACC)
    log_ds = tl.load(st + S_AT + 1).to(ACC)
    m_t = tl.load(st + T_AT).to(ACC)
    log_dt = tl.load(st + T_AT + 1).to(ACC)
    return m_s, log_ds, m_t, log_dt


# Numerics shared with the other backends (augkd/ops/reference.py, docs/ops-design.md "Precision").
REFINE_RATIO: tl.constexpr = tl.constexpr(1.0 / 64)
PHI_SERIES_MAX: tl.constexpr = tl.constexpr(0.25)


# Taylor coefficients, highest power first. Triton makes a Python float literal an fp32 constant, so horner()
# builds each in the compute dtype with tl.full (fp64-exact in fp64 kernels).
EXPM1_TERMS: tl.constexpr = tl.constexpr(13)
EXPM1_COEFFS: tl.constexpr = tl.constexpr(tuple(1.0 / math.factorial(n) for n in range(13, 0, -1)))  # 1/n!
PHI_TERMS: tl.constexpr = tl.constexpr(11)
PHI_COEFFS: tl.constexpr = tl.constexpr(tuple((n - 1) / math.factorial(n) for n in range(12, 1, -1)))  # (n-1)/n!


@triton.jit
def horner(x, COEFFS: tl.constexpr, TERMS: tl.constexpr):
    """sum_i COEFFS[i] x^(TERMS - 1 - i) by Horner's rule, in x's dtype."""
    p = tl.full([], COEFFS[0], x.dtype)
    for i in tl.static_range(1, TERMS):
        p = p * x + tl.full([], COEFFS[i], x.dtype)
    return p


@triton.jit
def expm1(x):
    """exp(x) - 1 accurate near 0 (Taylor to x^13 for |x| < 0.35, where exp(x) - 1 would cancel)."""
    small = tl.abs(x) < 0.35
    z = tl.where(small, x, 0.0)
    return tl.where(small, z * horner(z, EXPM1_COEFFS, EXPM1_TERMS), tl.exp(x) - 1.0)


@triton.jit
def phi_series(x):
    """phi(x) = 1 + (x - 1) e^x = x^2 sum_n (n - 1) / n! x^(n - 2), n = 2 .. 12 (for |x| <= 0.25)."""
    return x * x * horner(x, PHI_COEFFS, PHI_TERMS)


@triton.jit
def log1p_small(x):
    """log1p(x): series for |x| < 1e-3 (the only range the refinement produces), log(1 + x) beyond."""
    small = tl.abs(x) < 1e-3
    z = tl.where(small, x, 0.0)
    return tl.where(small, z * (1.0 + z * (-0.5 + z * (1.0 / 3.0 - 0.25 * z))), tl.log(1.0 + x))


@triton.jit
def h_term(x):
    """x / (1 + x) - log1p(x) (<= 0), by its series near 0."""
    small = tl.abs(x) < 1e-3
    z = tl.where(small, x, 0.0)
    return tl.where(small, z * z * (-0.5 + z * (2.0 / 3.0 - 0.75 * z)), x / (1.0 + x) - tl.log(1.0 + x))


def empty0(like: torch.Tensor) -> torch.Tensor:
    """The (0,) tensor returned for a gradient that was not asked for."""
    return like.new_empty((0,))


def or_empty0(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A computed gradient, or empty0 where it was not asked for (None)."""
    return empty0(like) if grad is None else grad


# ---------------------------------------------------------------------------------------------
# registration


def launch_enabled() -> bool:
    """False while an interpreter-mode fake (shape-only) implementation runs: skip the launch."""
    return not getattr(_state, "fake", False)


def register(name: str, fn: Callable) -> object:
    """Register ``fn`` as ``augkd_triton::<name>`` with the schema of ``augkd.ops.specs``.

    Compiled Triton (the normal case): ``torch.library.triton_op``, so torch.compile traces into
    the launches (``wrap_triton``) and Inductor sees the kernels; ``fn`` doubles as the fake impl.

    TRITON_INTERPRET=1: ``wrap_triton`` hands back the raw interpreter function, which would run
    (and read data pointers) on fake tensors, and triton_op's functional decomposition would then
    drop the kernels from a compiled graph. So in that mode the same function is registered as an
    opaque ``torch.library.custom_op`` (CPU and CUDA tensors alike), with a fake impl that runs
    ``fn`` for its allocations only (launch_enabled() is False there). Same name, same schema.
    """
    qualname = f"{NAMESPACE}::{name}"
    schema = SCHEMAS[name]  # as written (an inferred schema would say SymInt for int)
    if not INTERPRET:
        return torch.library.triton_op(qualname, fn, mutates_args=(), schema=schema)

    op = torch.library.custom_op(qualname, fn, mutates_args=(), schema=schema)

    def fake(*args, **kwargs):
        prev = getattr(_state, "fake", False)
        _state.fake = True
        try:
            return fn(*args, **kwargs)
        finally:
            _state.fake = prev

    op.register_fake(fake)
    return op


def contig(*ts: Optional[torch.Tensor]) -> tuple:
    """The kernels index rows densely; the front-end passes contiguous tensors (a no-op then)."""
    return tuple(None if t is None else t.contiguous() for t in ts)


def opt(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A tensor argument for an optional input the kernel will not read (its HAS_* flag is off)."""
    return like if t is None else t
