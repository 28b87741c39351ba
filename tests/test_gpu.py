"""GPU numerics of the triton and cuda backends against float64 CPU references, torch.compile on GPU,
and CUDA-graph capture (which fails on any host synchronisation inside the ops).

Without a CUDA device every test here skips with that reason; scripts/gpu_check.sh runs them on one.
"""

from __future__ import annotations

import math

import pytest
import torch

import augkd.ops as ops
from augkd.ops import backends, use_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)")

GPU_BACKENDS = ["triton", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# "no worse than eager torch in the same dtype" style bounds: (rtol, atol relative to the magnitude)
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 5e-3), torch.bfloat16: (8e-2, 2e-2)}


def _ready(backend):
    reason = backends.why_unavailable(backend, torch.device("cuda"))
    if reason:
        pytest.skip(f"{backend} unavailable on this GPU machine: {reason}")


def _close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    expected = expected.detach().double().cpu()
    actual = actual.detach().double().cpu()
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale + 1e-12, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,classes", [(1, 1), (7, 31), (1024, 1000), (64, 1271), (8, 32000), (4, 131072),
                                          (2, 262144)])
@pytest.mark.parametrize("fmt", ["logits", "probs"])
def test_kd_loss(backend, dtype, rows, classes, fmt):
    _ready(backend)
    gen = torch.Generator().manual_seed(rows + classes)
    s = torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 3
    t = torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 3
    if fmt == "probs":
        t = torch.softmax(t, -1)
    y = torch.randint(0, classes, (rows,), generator=gen)
    y[::3] = -100
    w = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5

    def run(device, dt, backend_name):
        s_ = s.to(device, dt).requires_grad_()
        t_ = t.to(device, dt).requires_grad_()
        with use_backend(backend_name):
            loss, energy = ops.kd_loss(s_, t_, y.to(device), temperature=4.0, alpha=0.5, sample_weight=w.to(device, dt),
                                       reduction="none", teacher_format=fmt, return_teacher_energy=True)
        g = torch.linspace(-1, 1, rows, dtype=torch.float64).to(device, loss.dtype)
        gs, gt = torch.autograd.grad((loss * g).sum() + energy.sum() * 0.1, [s_, t_])
        return loss, gs, gt

    ref = run("cpu", torch.float64, "torch")
    # the reference sees the inputs rounded to `dtype`, as the kernel does
    got = run("cuda", dtype, backend)
    for name, a, b in zip(("loss", "grad student", "grad teacher"), got, ref):
        _close(a, b, dtype, name)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_kd_loss_special_rows(backend):
    _ready(backend)
    s = torch.randn(4, 300, device="cuda")
    t = torch.randn(4, 300, device="cuda")
    s[0, 5] = math.nan
    s[1, :10] = -math.inf
    t[1, :10] = -math.inf
    t[2] += 1e4
    y = torch.full((4,), -100, device="cuda")
    with use_backend(backend):
        rows = ops.kd_loss(s, t, reduction="none")
        all_ignored = ops.kd_loss(s[1:], t[1:], y[1:], alpha=0.5, reduction="mean")
    assert torch.isnan(rows[0]) and torch.isfinite(rows[1:]).all()
    assert all_ignored.item() == 0.0


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_uncertainty_and_mixups(backend, dtype):
    _ready(backend)
    z = torch.randn(513, 1000, dtype=torch.float64) * 3
    with use_backend(backend):
        zc = z.to("cuda", dtype).requires_grad_()
        e, h = ops.uncertainty(zc, temperature=2.0)
        (gz,) = torch.autograd.grad((e + h).sum(), [zc])
    zr = z.to(dtype).double().requires_grad_()
    with use_backend("torch"):
        er, hr = ops.uncertainty(zr, temperature=2.0)
    (gr,) = torch.autograd.grad((er + hr).sum(), [zr])
    _close(e, er, dtype, "energy")
    _close(h, hr, dtype, "entropy")
    _close(gz, gr, dtype, "grad")

    lat = [torch.randn(1000, 100, dtype=torch.float64) for _ in range(2)]
    mask = torch.rand(1, 100, dtype=torch.float64)
    s = torch.rand(1000, 1, dtype=torch.float64)

    def latent(device, dt, backend_name):
        leaves = [x.to(device, dt).requires_grad_() for x in (lat[0], mask, lat[1], s)]
        with use_backend(backend_name):
            out = ops.latent_mixup(*leaves)
        return (out,) + torch.autograd.grad(out.square().sum(), leaves)

    for name, a, b in zip(("out", "z", "mask", "psi", "s"), latent("cuda", dtype, backend),
                          latent("cpu", torch.float64, "torch")):
        _close(a, b, dtype, f"latent {name}")

    g, r = torch.rand(64, 3, 32, 32, dtype=torch.float64), torch.rand(64, 3, 32, 32, dtype=torch.float64)
    s4 = torch.rand(64, 1, 1, 1, dtype=torch.float64)

    def pixel(device, dt, backend_name):
        leaves = [x.to(device, dt).requires_grad_() for x in (g, r, s4)]
        with use_backend(backend_name):
            out = ops.pixel_mixup(*leaves, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
        return (out,) + torch.autograd.grad(out.square().sum(), leaves)

    for name, a, b in zip(("out", "generated", "real", "s"), pixel("cuda", dtype, backend),
                          pixel("cpu", torch.float64, "torch")):
        _close(a, b, dtype, f"pixel {name}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mask_rows", [1000, 1])
@pytest.mark.parametrize("wanted", [("z",), ("mask",), ("psi", "s"), ("z", "mask", "psi")], ids="+".join)
def test_mixups_only_wanted_gradients(backend, mask_rows, wanted):
    """The needs-grad flags on GPU: subsets of inputs requiring grad, against float64 on the CPU."""
    _ready(backend)
    gen = torch.Generator().manual_seed(len(wanted) + mask_rows)
    values = {"z": torch.randn(1000, 100, generator=gen, dtype=torch.float64),
              "mask": torch.rand(mask_rows, 100, generator=gen, dtype=torch.float64),
              "psi": torch.randn(1000, 100, generator=gen, dtype=torch.float64),
              "s": torch.rand(1000, 1, generator=gen, dtype=torch.float64)}

    def latent(device, dt, backend_name):
        leaves = {k: v.to(device, dt).requires_grad_(k in wanted) for k, v in values.items()}
        with use_backend(backend_name):
            out = ops.latent_mixup(leaves["z"], leaves["mask"], leaves["psi"], leaves["s"])
        return (out,) + torch.autograd.grad(out.square().sum(), [leaves[k] for k in wanted])

    for name, a, b in zip(("out",) + wanted, latent("cuda", torch.float32, backend),
                          latent("cpu", torch.float64, "torch")):
        _close(a, b, torch.float32, f"latent {name}")

    g, r = torch.rand(8, 3, 9, 7, generator=gen, dtype=torch.float64), torch.rand(8, 3, 9, 7, generator=gen,
                                                                                   dtype=torch.float64)
    with use_backend(backend):
        gc = g.to("cuda").requires_grad_()
        out = ops.pixel_mixup(gc, r.to("cuda"), 0.3, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
        (grad,) = torch.autograd.grad(out.sum(), [gc])
    std = torch.tensor([0.2, 0.25, 0.3], dtype=torch.float64).view(1, 3, 1, 1)
    _close(grad, (0.7 / std).expand(8, 3, 9, 7), torch.float32, "pixel grad generated only")


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
