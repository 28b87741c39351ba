"""The size crossover of "auto" dispatch: below the measured size the torch backend runs, above it the
kernel; an explicitly requested backend always runs; both give the float64 reference's values."""
import pytest
import torch

import augkd.ops as ops
from augkd.ops import _extension, backends, crossover, reference

needs_cpu_kernels = pytest.mark.skipif(not _extension.LOADED, reason="augkd._C not built: no kernel to cross over from")


def _spy(monkeypatch):
    calls = []
    original = reference.latent_mixup

    def spy(*args, **kwargs):
        calls.append("torch")
        return original(*args, **kwargs)
    monkeypatch.setattr(reference, "latent_mixup", spy)
    return calls


def _inputs(rows, width=32):
    g = torch.Generator().manual_seed(rows)
    z, psi = (torch.randn(rows, width, generator=g, dtype=torch.float64) for _ in range(2))
    m = torch.rand(rows, width, generator=g, dtype=torch.float64)
    return z, m, psi


@needs_cpu_kernels
@pytest.mark.parametrize("rows,expect_torch", [(100, True), (256, True), (1024, False)])
def test_auto_runs_torch_below_the_latent_mixup_crossover(monkeypatch, rows, expect_torch):
    limit = crossover.CROSSOVERS["latent_mixup"]["cpu"]
    assert (rows * 32 < limit) == expect_torch
    calls = _spy(monkeypatch)
    z, m, psi = _inputs(rows)
    leaves = [t.float().requires_grad_() for t in (z, m, psi)]
    with backends.use_backend("auto"):
        out = ops.latent_mixup(*leaves, 0.3)
    assert bool(calls) == expect_torch
    want = (0.7 * (m * psi + (1 - m) * z) + 0.3 * z)  # float64 reference
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    torch.testing.assert_close(leaves[0].grad.double(), 0.7 * (1 - m) + 0.3, rtol=1e-6, atol=1e-6)


@needs_cpu_kernels
def test_an_explicit_backend_is_never_overridden(monkeypatch):
    calls = _spy(monkeypatch)
    z, m, psi = (t.float() for t in _inputs(100))
    with backends.use_backend("cpu"):
        ops.latent_mixup(z, m, psi, 0.3)
    assert calls == []
    assert crossover.cheaper_backend("latent_mixup", (100, 32), "cpu") == "torch"  # auto outside the block
    with backends.use_backend("cpu"):
        assert crossover.cheaper_backend("latent_mixup", (100, 32), "cpu") == "cpu"


def test_ops_without_a_crossover_keep_their_backend():
    for op in ("kd_loss", "uncertainty", "pixel_mixup"):
        assert crossover.cheaper_backend(op, (2, 2), "cpu") == "cpu"
    assert crossover.cheaper_backend("latent_mixup", (2, 2), "cuda") == "cuda"  # measured on CPU only
