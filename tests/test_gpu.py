"""What only a GPU shows: torch.compile (Inductor) around the GPU backends, and CUDA-graph capture (which fails
on any host synchronisation inside the ops). The numerics of the triton and cuda backends on CUDA tensors
run in the shared matrix (tests/matrix.py: BACKEND_DEVICES), with the same cases as every other backend.

Without a CUDA device every test here skips with that reason; scripts/gpu_check.sh runs them on one.
"""

from __future__ import annotations

import pytest
import torch

import augkd.ops as ops
from augkd.ops import backends, use_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)")

GPU_BACKENDS = ["triton", "cuda"]


def _ready(backend):
    reason = backends.why_unavailable(backend, torch.device("cuda"))
    if reason:
        pytest.skip(f"{backend} unavailable on this GPU machine: {reason}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph_on_gpu(backend):
    _ready(backend)
    torch._dynamo.reset()
    s = torch.randn(64, 1000, device="cuda", requires_grad=True)
    t = torch.randn(64, 1000, device="cuda")
    y = torch.randint(0, 1000, (64,), device="cuda")
    fn = lambda a, b, c: ops.kd_loss(a, b, c, temperature=4.0, alpha=0.5) + ops.energy(b).mean()
    with use_backend(backend):
        out = torch.compile(fn, fullgraph=True)(s, t, y)
        ref = fn(s, t, y)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture(backend):
    """A host synchronisation inside the op would make capture fail."""
    _ready(backend)
    s = torch.randn(32, 500, device="cuda", requires_grad=True)
    t = torch.randn(32, 500, device="cuda")
    y = torch.randint(0, 500, (32,), device="cuda")
    with use_backend(backend):
        for _ in range(2):  # warm up (autotuning, lazy init) outside the capture
            ops.kd_loss(s, t, y, alpha=0.5).backward()
        graph = torch.cuda.CUDAGraph()
        s.grad = None
        with torch.cuda.graph(graph):
            loss = ops.kd_loss(s, t, y, alpha=0.5)
            loss.backward()
        graph.replay()
        torch.cuda.synchronize()
    assert torch.isfinite(loss) and s.grad is not None
