"""GPU numerics of the LLM-distillation ops (topk_kd_loss on the triton and cuda backends, fused_linear_kd_loss
with GPU heads) against float64 CPU references, and CUDA-graph capture of topk_kd_loss (no host sync inside).

Without a CUDA device every test here skips with that reason; scripts/gpu_check.sh runs them on one.
"""

from __future__ import annotations

import pytest
import torch

import augkd.ops as ops
from augkd.ops import use_backend

from .matrix import assert_close as _close  # the shared tolerance table of every backend test
from .test_gpu import _ready

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)")


def _topk_inputs(rows, vocab, k, seed):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 3
    lp = (torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 3).log_softmax(-1)
    top = lp.topk(k, -1)
    y = torch.randint(0, vocab, (rows,), generator=gen)
    y[::3] = -100
    return s, top.indices, top.values, y


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab,k", [(1, 3, 1), (7, 31, 5), (64, 1000, 64), (8, 32000, 64), (4, 128256, 64)])
@pytest.mark.parametrize("tail,divergence", [("renormalize", "kl"), ("bucket", "kl"), ("bucket", "reverse_kl"),
                                             ("renormalize", "reverse_kl")])
def test_topk_kd_loss(backend, dtype, rows, vocab, k, tail, divergence):
    _ready(backend)
    s, idx, val, y = _topk_inputs(rows, vocab, k, rows + vocab)
    cfg = dict(tail=tail, divergence=divergence, temperature=2.0, alpha=0.5, reduction="sum")

    def run(device, dt, name):
        s_ = s.to(device, dt).requires_grad_()
        with use_backend(name):
            loss = ops.topk_kd_loss(s_, idx.to(device), val.to(device), y.to(device), **cfg)
        (g,) = torch.autograd.grad(loss, [s_])
        return loss, g

    loss, g = run("cuda", dtype, backend)
    ref, rg = run("cpu", torch.float64, "torch")
    _close(loss, ref, dtype, "loss")
    _close(g, rg, dtype, "grad")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_topk_kd_loss_cuda_graph_capture(backend):
    _ready(backend)
    s, idx, val, y = _topk_inputs(16, 5000, 32, 3)
    s_ = s.float().cuda().requires_grad_()
    idx, val, y = idx.cuda(), val.float().cuda(), y.cuda()
    with use_backend(backend):
        for _ in range(2):  # warm-up (Triton compiles) outside the capture
            loss = ops.topk_kd_loss(s_, idx, val, y, tail="bucket", alpha=0.5, temperature=2.0)
            loss.backward()
        graph = torch.cuda.CUDAGraph()
        s_.grad = None
        with torch.cuda.graph(graph):
            loss = ops.topk_kd_loss(s_, idx, val, y, tail="bucket", alpha=0.5, temperature=2.0)
            loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(s_.grad).all()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_kd_loss_vocab_blocks_on_gpu(dtype, divergence, backend):
    """Vocabulary blocks on CUDA tensors: the gradient sweep through the CUDA C++ backward kernel (backend
    "cuda") or as torch formulas (backend "triton", whose kernels the blocks do not use)."""
    _ready(backend)
    gen = torch.Generator().manual_seed(1)
    n, h, v = 200, 64, 3000
    xs = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype).double()
    ws = (torch.randn(v, h, generator=gen, dtype=torch.float64) / 8).to(dtype).double()
    xt, wt = torch.randn(n, h, generator=gen, dtype=torch.float64), torch.randn(v, h, generator=gen, dtype=torch.float64) / 8
    y = torch.randint(0, v, (n,), generator=gen)
    y[::5] = -100

    def run(device, dt_s, backend_name, **kw):
        a = xs.to(device, dt_s).requires_grad_()
        b = ws.to(device, dt_s).requires_grad_()
        t_dtype = torch.float32 if dt_s != torch.float64 else dt_s
        with use_backend(backend_name):
            loss = ops.fused_linear_kd_loss(a, b, xt.to(device, t_dtype), wt.to(device, t_dtype), y.to(device),
                                            temperature=2.0, alpha=0.5, divergence=divergence, beta=0.3,
                                            reduction="token_mean", **kw)
            return (loss, *torch.autograd.grad(loss, [a, b]))

    got = run("cuda", dtype, backend, chunk_size=64, vocab_chunk_size=700)
    want = run("cpu", torch.float64, "torch")
    for name, a, b in zip(("loss", "grad x", "grad W"), got, want):
        _close(a, b, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_kd_loss_on_gpu(dtype):
    gen = torch.Generator().manual_seed(0)
    n, h, v = 300, 64, 5000
    xs, xt = torch.randn(n, h, generator=gen, dtype=torch.float64), torch.randn(n, h, generator=gen, dtype=torch.float64)
    ws = torch.randn(v, h, generator=gen, dtype=torch.float64) / 8
    wt = torch.randn(v, h, generator=gen, dtype=torch.float64) / 8
    y = torch.randint(0, v, (n,), generator=gen)
    y[::4] = -100
    xs, ws = xs.to(dtype).double(), ws.to(dtype).double()  # the same rounded inputs for the reference

    def run(device, dt_s, chunk):
        a = xs.to(device, dt_s).requires_grad_()
        b = ws.to(device, dt_s).requires_grad_()
        loss = ops.fused_linear_kd_loss(a, b, xt.to(device, torch.float32 if dt_s != torch.float64 else dt_s),
                                        wt.to(device, torch.float32 if dt_s != torch.float64 else dt_s),
                                        y.to(device), temperature=2.0, alpha=0.5, reduction="token_mean",
                                        chunk_size=chunk)
        return (loss, *torch.autograd.grad(loss, [a, b]))

    got = run("cuda", dtype, 64)
    with use_backend("torch"):
        want = run("cpu", torch.float64, None)
    for name, a, b in zip(("loss", "grad x", "grad W"), got, want):
        _close(a, b, dtype, name)
