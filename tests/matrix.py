"""The shared test matrix: which (backend, device) pairs run here, and one way to compare against float64.

The op tests take `backend, device` from BACKEND_DEVICES: the CPU backends (torch, the C++ CPU kernels,
Triton under TRITON_INTERPRET=1) on CPU tensors, and torch, cuda and triton on CUDA tensors when a GPU is
present (skipped with the reason otherwise), so every backend meets the same cases and the same
assert_close. BACKENDS_HERE (CPU tensors only) remains for cases that are about the host side.
What only a GPU can show (launch configurations, CUDA graphs) lives in test_gpu.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from augkd.ops import backends


def _cases(device: str) -> list:
    """(backend, device) for every backend of the table that runs `device` tensors (Triton on CPU under
    TRITON_INTERPRET=1), skipped with the reason where it cannot run here."""
    cases = []
    for entry in backends.TABLE.values():
        if not entry.runs(device, explicit=True):
            continue
        if device == "cuda" and not torch.cuda.is_available():
            reason = "no CUDA device visible"
        else:
            reason = backends.why_unavailable(entry.name, torch.device(device))
        cases.append(pytest.param(entry.name, device, id=f"{entry.name}-{device}", marks=pytest.mark.skipif(
            reason is not None, reason=f"{entry.name} backend on {device} unavailable: {reason}")))
    return cases


BACKEND_DEVICES = _cases("cpu") + _cases("cuda")
# the backend names alone, CPU tensors: for cases about the host side; "torch" is a plain string
BACKENDS_HERE = [case.values[0] if case.values[0] == "torch" else pytest.param(case.values[0], marks=case.marks)
                 for case in BACKEND_DEVICES if case.values[1] == "cpu"]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# The Triton interpreter runs one program at a time, each a few numpy calls per step, whatever the block's
# width: its time grows with the number of program steps, not of elements (1024 rows of 1 class take as
# long as 1024 rows of 4096). A row kernel runs one program per row and one step per ROW_STEP columns.
ROW_STEP = 4096
INTERPRETER_STEPS = 64


def interpreter_steps(rows: int, cols: int) -> int:
    """Program steps of a row kernel over (rows, cols) (the tile kernels run no more: 4096-element tiles)."""
    return rows * max(1, -(-cols // ROW_STEP))


def small_enough(backend: str, rows: int, cols: int, limit: int = INTERPRETER_STEPS) -> None:
    """Skip what the Triton interpreter would take minutes over (the same cases run on GPUs)."""
    steps = interpreter_steps(rows, cols)
    if backend == "triton" and INTERPRETED and steps > limit:
        pytest.skip(f"{rows} rows x {cols} columns are {steps} program steps for the Triton interpreter "
                    f"(limit {limit}); the same case runs on the GPU matrix")


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol relative to the expected tensor's largest magnitude)."""
    return {torch.float64: (1e-9, 1e-10), torch.float32: (2e-4, 2e-5),
            torch.float16: (2e-2, 5e-3), torch.bfloat16: (8e-2, 2e-2)}[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Compare to a float64 expectation; atol scales with the expectation's magnitude (plus a floor of a
    few epsilons of `dtype`, for expectations that are exactly 0), NaN must match NaN, infinities exactly."""
    rtol, atol = tolerance(dtype)
    expected = expected.detach().to("cpu", torch.float64)
    actual = actual.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale + 4 * torch.finfo(dtype).eps,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def as_leaf(x: torch.Tensor, dtype: torch.dtype, requires_grad: bool = True, device="cpu") -> torch.Tensor:
    return x.detach().to(device, dtype).requires_grad_(requires_grad)


def on(device, x):
    """`x` on `device` (None stays None)."""
    return None if x is None else x.to(device)


def interpreted(backend: str, device: str) -> bool:
    """The Triton interpreter runs this case (numpy: float32 only, one program at a time)."""
    return backend == "triton" and device == "cpu"


def assert_fullgraph_matches_eager(step, make_inputs, n_grad: int) -> None:
    """``torch.compile(step, fullgraph=True)`` gives eager's value and the gradients of the first
    ``n_grad`` inputs; ``make_inputs()`` returns a fresh list of leaves for each of the two runs."""
    torch._dynamo.reset()
    eager_in, compiled_in = make_inputs(), make_inputs()
    eager = step(*eager_in)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled_in)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(eager_in[:n_grad], compiled_in[:n_grad]):
        torch.testing.assert_close(b.grad, a.grad)
