"""uncertainty / energy / entropy / max_softmax on every (backend, device) here against float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from augkd.ops import energy, entropy, max_softmax, uncertainty, use_backend

from .matrix import BACKEND_DEVICES, as_leaf, assert_close, interpreted, small_enough

SHAPES = [(1, 1), (7, 2), (64, 31), (33, 1000), (8, 1271), (4, 32000), (1, 131072)]


def run(backend, z, temperature, dtype, seed=1, device="cpu"):
    z_ = as_leaf(z, dtype, device=device)
    with use_backend(backend):
        e, h = uncertainty(z_, temperature=temperature)
    gen = torch.Generator().manual_seed(seed)
    ge = torch.randn(e.shape, generator=gen, dtype=torch.float64).to(device, e.dtype)
    gh = torch.randn(h.shape, generator=gen, dtype=torch.float64).to(device, h.dtype)
    (gz,) = torch.autograd.grad([e, h], [z_], [ge, gh])
    return e, h, gz


def independent(z, temperature):
    """Energy and entropy from torch's softmax in float64, and the doc's closed-form gradient."""
    u = z / temperature
    lse = torch.logsumexp(u, -1)
    p = torch.softmax(u, -1)
    ent = torch.special.entr(p).sum(-1)
    return -temperature * lse, ent, p, u, lse


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("rows,classes", SHAPES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_matrix(backend, device, rows, classes, temperature):
    small_enough(backend, rows, classes)
    gen = torch.Generator().manual_seed(rows * 31 + classes)
    z = torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 4
    e, h, gz = run(backend, z, temperature, torch.float32, device=device)
    e_ref, h_ref, gz_ref = run("torch", z, temperature, torch.float64)
    assert e.dtype == torch.float32 and gz.dtype == torch.float32
    assert_close(e, e_ref, torch.float32, "energy")
    assert_close(h, h_ref, torch.float32, "entropy")
    assert_close(gz, gz_ref, torch.float32, "grad logits")


def test_torch_backend_against_closed_forms():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(5, 19, generator=gen, dtype=torch.float64) * 3
    T = 2.0
    e, h, gz = run("torch", z, T, torch.float64, seed=3)
    e_ind, h_ind, p, u, lse = independent(z, T)
    torch.testing.assert_close(e, e_ind)
    torch.testing.assert_close(h, h_ind)
    gen = torch.Generator().manual_seed(3)
    ge = torch.randn(5, generator=gen, dtype=torch.float64).unsqueeze(1)
    gh = torch.randn(5, generator=gen, dtype=torch.float64).unsqueeze(1)
    closed = -ge * p - gh * p * (u - lse.unsqueeze(1) + h_ind.unsqueeze(1)) / T
    torch.testing.assert_close(gz, closed)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(backend, device, dtype):
    if interpreted(backend, device) and dtype != torch.float32:
        pytest.skip("the Triton interpreter supports float32 only; the GPU matrix runs half precision")
    z = torch.randn(64, 1000, dtype=torch.float64) * 3
    e, h, gz = run(backend, z, 2.0, dtype, device=device)
    e_ref, h_ref, gz_ref = run("torch", z.to(dtype).double(), 2.0, torch.float64)
    assert gz.dtype == dtype
    assert_close(e, e_ref, dtype, "energy")
    assert_close(h, h_ref, dtype, "entropy")
    assert_close(gz, gz_ref, dtype, "grad")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_masked_classes_and_nan_rows(backend, device):
    """A row with -inf classes equals the row without them (values and gradient); a NaN row stays NaN and
    leaves the other rows alone."""
    z = torch.randn(4, 30, dtype=torch.float64)
    z[0, [2, 9]] = -math.inf          # masked classes: same as dropping them
    z[1, 5] = math.nan                # NaN row stays NaN
    e, h, gz = run(backend, z, 1.5, torch.float32, seed=1, device=device)
    gen = torch.Generator().manual_seed(1)  # the upstream gradients `run` drew
    ge, gh = torch.randn(4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    keep = torch.ones(30, dtype=torch.bool)
    keep[[2, 9]] = False
    z0 = z[0:1, keep].clone().requires_grad_(True)
    with use_backend("torch"):
        e0, h0 = uncertainty(z0, temperature=1.5)
    (g0,) = torch.autograd.grad([e0, h0], [z0], [ge[0:1].float().double(), gh[0:1].float().double()])
    assert_close(e[0:1], e0, torch.float32, "energy with -inf")
    assert_close(h[0:1], h0, torch.float32, "entropy with -inf")
    assert_close(gz[0:1, keep], g0, torch.float32, "grad with -inf")
    assert torch.all(gz[0, ~keep.to(gz.device)] == 0)
    assert torch.isnan(e[1]) and torch.isnan(h[1]) and torch.isnan(gz[1]).all()
    rest = z[[2, 3]].clone().requires_grad_(True)
    with use_backend("torch"):
        e_r, h_r = uncertainty(rest, temperature=1.5)
    (g_r,) = torch.autograd.grad([e_r, h_r], [rest], [ge[[2, 3]].float().double(), gh[[2, 3]].float().double()])
    assert_close(e[[2, 3]], e_r, torch.float32, "energy of the other rows")
    assert_close(h[[2, 3]], h_r, torch.float32, "entropy of the other rows")
    assert_close(gz[[2, 3]], g_r, torch.float32, "grad of the other rows")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_large_logits_finite(backend, device):
    z = torch.randn(3, 50, dtype=torch.float64) + 1e4
    e, h, gz = run(backend, z, 1.0, torch.float32, device=device)
    assert torch.isfinite(e).all() and torch.isfinite(h).all() and torch.isfinite(gz).all()
    e_ref, h_ref, _ = run("torch", z, 1.0, torch.float64)
    torch.testing.assert_close(h.double().cpu(), h_ref, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_helpers_and_max_softmax(backend, device):
    z = torch.randn(6, 11, device=device, requires_grad=True)
    with use_backend(backend):
        e, h = uncertainty(z, temperature=2.0)
        torch.testing.assert_close(energy(z, temperature=2.0), e)
        torch.testing.assert_close(entropy(z, temperature=2.0), h)
        msp = max_softmax(z, temperature=2.0)
    torch.testing.assert_close(msp, torch.softmax(z / 2.0, -1).amax(-1), rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(msp.sum(), [z])
    (g_ref,) = torch.autograd.grad(torch.softmax(z / 2.0, -1).amax(-1).sum(), [z])
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_gradcheck_float64():
    z = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    from augkd.ops import _extension
    for backend in ("torch",) + (("cpu",) if _extension.LOADED else ()):
        with use_backend(backend):
            assert torch.autograd.gradcheck(lambda x: uncertainty(x, temperature=1.7), (z,)), backend


@pytest.mark.parametrize("call,error,message", [
    (lambda z: uncertainty(z, temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (lambda z: uncertainty(z.long()), TypeError, "logits must be a floating"),
    (lambda z: uncertainty(z[:, :0]), ValueError, "C >= 1"),
    (lambda z: uncertainty([1.0, 2.0]), TypeError, "logits must be a torch.Tensor"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.randn(3, 4))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_empty_batch(backend, device):
    with use_backend(backend):
        e, h = uncertainty(torch.randn(0, 5, device=device))
    assert e.shape == (0,) and h.shape == (0,)
