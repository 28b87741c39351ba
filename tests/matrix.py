"""The shared test matrix: which backends run here, and one way to compare against float64.

Every op's tests take `backend` from BACKENDS_HERE (CPU tensors), so a new backend is tested by the
same cases as the others. GPU-only cases live in test_gpu.py and skip with a reason without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from augkd.ops import _extension, backends


def _cpu_backends() -> list:
    names = ["torch"]
    names.append(pytest.param("cpu", marks=pytest.mark.skipif(
        not _extension.LOADED, reason=f"extension augkd._C not loaded: {_extension.WHY_NOT_LOADED}")))
    triton_reason = backends.why_unavailable("triton", torch.device("cpu"))
    names.append(pytest.param("triton", marks=pytest.mark.skipif(
        triton_reason is not None, reason=f"triton backend unavailable on CPU: {triton_reason}")))
    return names


BACKENDS_HERE = _cpu_backends()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def small_enough(backend: str, numel: int, limit: int = 40_000) -> None:
    """The Triton interpreter runs kernels in numpy one program at a time: keep its shapes tiny."""
    if backend == "triton" and INTERPRETED and numel > limit:
        pytest.skip(f"{numel} elements is too large for the Triton interpreter (limit {limit}); "
                    "covered on GPU by test_gpu.py")


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol relative to the expected tensor's largest magnitude)."""
    return {torch.float64: (1e-9, 1e-10), torch.float32: (2e-4, 2e-5),
            torch.float16: (2e-2, 5e-3), torch.bfloat16: (8e-2, 2e-2)}[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Compare to a float64 expectation; atol scales with the expectation's magnitude (plus a floor of a
    few epsilons of `dtype`, for expectations that are exactly 0), NaN must match NaN, infinities exactly."""
    rtol, atol = tolerance(dtype)
    expected = expected.detach().to(torch.float64)
    actual = actual.detach().to(torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale + 4 * torch.finfo(dtype).eps,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def as_leaf(x: torch.Tensor, dtype: torch.dtype, requires_grad: bool = True) -> torch.Tensor:
    return x.detach().to(dtype).requires_grad_(requires_grad)


def _backends_with_devices() -> list:
    """(backend, device) for every backend on every device type: the CPU ones here (as BACKENDS_HERE),
    and torch, cuda and triton on a GPU when one is present (skipped with the reason otherwise)."""
    cases = []
    for case in BACKENDS_HERE:
        name, marks = (case, ()) if isinstance(case, str) else (case.values[0], case.marks)
        cases.append(pytest.param(name, "cpu", marks=marks, id=f"{name}-cpu"))
    gpu = torch.cuda.is_available()
    for name in ("torch", "cuda", "triton"):
        reason = "no CUDA device visible" if not gpu else backends.why_unavailable(name, torch.device("cuda"))
        cases.append(pytest.param(name, "cuda", id=f"{name}-cuda", marks=pytest.mark.skipif(
            reason is not None, reason=f"{name} backend on CUDA unavailable: {reason}")))
    return cases


BACKEND_DEVICES = _backends_with_devices()
