"""Autograd beyond the first derivative, on every backend: double backward (create_graph=True,
gradgradcheck), torch.func transforms (grad, vmap of grad, jacrev) and a temperature that requires grad.

The kernels' `*_bwd` ops are not differentiable; a backward that must build a graph recomputes the
gradient through the torch formulas. These tests compare each backend against the torch backend in
float64 (an independent formula for second derivatives: plain autograd of the reference).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import augkd.ops as ops
from augkd.ops import backends, use_backend

from .matrix import BACKEND_DEVICES, INTERPRETED

F64 = torch.float64


def _leaf(shape, device, gen, *, positive=False, scale=1.0):
    x = torch.randn(shape, generator=gen, dtype=F64) * scale
    if positive:
        x = torch.rand(shape, generator=gen, dtype=F64) * 0.8 + 0.1
    return x.to(device).requires_grad_(True)


def _kd_case(device, gen):
    s, t = _leaf((3, 4), device, gen, scale=2.0), _leaf((3, 4), device, gen, scale=2.0)
    w = _leaf((3,), device, gen, positive=True)
    y = torch.tensor([1, -100, 3], device=device)

    def fn(s, t, w):
        loss, energy = ops.kd_loss(s, t, y, temperature=2.0, alpha=0.3, sample_weight=w, reduction="mean",
                                   return_teacher_energy=True)
        return loss + 0.1 * energy.sum()  # the teacher energy reaches the stats' lse_t column
    return fn, (s, t, w)


def _kd_probs_case(device, gen):
    s = _leaf((2, 5), device, gen)
    p = torch.softmax(torch.randn(2, 5, generator=gen, dtype=F64), -1).to(device).requires_grad_(True)
    return (lambda s, p: ops.kd_loss(s, p, temperature=3.0, teacher_format="probs", reduction="sum")), (s, p)


def _uncertainty_case(device, gen):
    z = _leaf((3, 4), device, gen, scale=2.0)

    def fn(z):
        energy, entropy = ops.uncertainty(z, temperature=1.5)
        return energy, entropy
    return fn, (z,)


def _latent_case(device, gen):
    z, psi = _leaf((2, 4), device, gen), _leaf((2, 4), device, gen)
    m, s = _leaf((1, 4), device, gen, positive=True), _leaf((2,), device, gen, positive=True)
    # the mixup is linear in each input: square it so the second derivative is not trivially 0
    return (lambda z, m, psi, s: ops.latent_mixup(z, m, psi, s).square()), (z, m, psi, s)


def _pixel_case(device, gen):
    g, r = _leaf((2, 2, 2, 2), device, gen), _leaf((2, 2, 2, 2), device, gen)
    s = _leaf((2,), device, gen, positive=True)
    return (lambda g, r, s: ops.pixel_mixup(g, r, s, mean=[0.4, 0.5], std=[0.2, 0.3]).square()), (g, r, s)


CASES = {"kd_loss": _kd_case, "kd_loss_probs": _kd_probs_case, "uncertainty": _uncertainty_case,
         "latent_mixup": _latent_case, "pixel_mixup": _pixel_case}


def _outputs(fn, inputs):
    out = fn(*inputs)
    return out if isinstance(out, tuple) else (out,)


def _second_order(fn, inputs, gen):
    """Gradients of sum <v, grad fn> (a Hessian-vector product-like quantity) w.r.t. every input."""
    outs = _outputs(fn, inputs)
    grad_outs = [torch.randn(o.shape, generator=gen, dtype=F64).to(o.device, o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, inputs, grad_outs, create_graph=True)
    probes = [torch.randn(g.shape, generator=gen, dtype=F64).to(g.device, g.dtype) for g in grads]
    scalar = sum((g * p).sum() for g, p in zip(grads, probes))
    return [g.detach() for g in grads], torch.autograd.grad(scalar, inputs, allow_unused=True)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_second_derivatives_match_the_reference(backend, device, case):
    """create_graph=True then a second backward: every backend gives the float64 torch result, never a
    silent zero or None (the C++ kernels left s.grad = None before)."""
    results = {}
    for name in (backend, "torch"):
        gen = torch.Generator().manual_seed(7)
        fn, inputs = CASES[case](device, gen)
        with use_backend(name):
            results[name] = _second_order(fn, inputs, gen)
    (first, second), (ref_first, ref_second) = results[backend], results["torch"]
    for a, b in zip(first, ref_first):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for i, (a, b) in enumerate(zip(second, ref_second)):
        assert a is not None, f"input {i}: no second derivative (None)"
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"input {i}: {m}")
    assert any(float(b.abs().max()) > 1e-6 for b in ref_second), "the case has no second derivative to test"


def test_the_issue_example_gives_the_gradient_of_the_gradient_norm():
    """kd_loss(s, t, T=2); g = dL/ds with create_graph; (g**2).sum().backward(): s.grad against an
    independent float64 formula (torch.nn.functional), on the default backend of this machine."""
    gen = torch.Generator().manual_seed(3)
    s0, t = torch.randn(5, 9, generator=gen, dtype=F64), torch.randn(5, 9, generator=gen, dtype=F64)
    s = s0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ops.kd_loss(s, t, temperature=2.0), s, create_graph=True)
    (g ** 2).sum().backward()
    ref_s = s0.clone().requires_grad_(True)
    kl = F.kl_div(F.log_softmax(ref_s / 2, -1), F.log_softmax(t / 2, -1), reduction="batchmean", log_target=True)
    (ref_g,) = torch.autograd.grad(kl * 4, ref_s, create_graph=True)
    (ref_g ** 2).sum().backward()
    assert s.grad is not None, "double backward left s.grad = None"
    torch.testing.assert_close(s.grad, ref_s.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_gradgradcheck(backend, device, case):
    gen = torch.Generator().manual_seed(11)
    fn, inputs = CASES[case](device, gen)
    with use_backend(backend):
        assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=_fast(backend))


def _fast(backend: str) -> bool:
    """The Triton interpreter costs tens of ms a launch: check random projections of the Jacobians there
    (gradcheck's fast mode) rather than every column."""
    return backend == "triton" and INTERPRETED


@pytest.mark.parametrize("backend,device", [c for c in BACKEND_DEVICES if c.values[0] != "torch"])
def test_registered_op_double_backward(backend, device):
    """The torch.library autograd of the kernel op (what torch.compile uses), called directly: its backward
    is differentiable too."""
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(3, 4, generator=gen, dtype=F64).to(device).requires_grad_(True)
    t = torch.randn(3, 4, generator=gen, dtype=F64).to(device).requires_grad_(True)
    y = torch.tensor([0, 3, -100], device=device)
    op = backends.load(backend).kd_loss_fwd
    assert torch.autograd.gradgradcheck(lambda a, b: op(a, b, y, 2.0, 0.5, -100, True, 0)[0], (s, t),
                                        eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=_fast(backend))
    z = torch.randn(2, 4, generator=gen, dtype=F64).to(device).requires_grad_(True)
    unc = backends.load(backend).uncertainty_fwd
    assert torch.autograd.gradgradcheck(lambda a: unc(a, 2.0), (z,), eps=1e-6, atol=1e-5, rtol=1e-4,
                                        fast_mode=_fast(backend))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_first_order_gradient_is_the_same_with_create_graph(backend, device):
    """The fused backward (create_graph=False) and the graph-building one agree in fp32."""
    gen = torch.Generator().manual_seed(9)
    s = torch.randn(6, 50, generator=gen).to(device).requires_grad_(True)
    t = torch.randn(6, 50, generator=gen).to(device).requires_grad_(True)
    y = torch.tensor([0, 5, -100, 2, 49, 7], device=device)
    with use_backend(backend):
        plain = torch.autograd.grad(ops.kd_loss(s, t, y, temperature=3.0, alpha=0.5), (s, t))
        graph = torch.autograd.grad(ops.kd_loss(s, t, y, temperature=3.0, alpha=0.5), (s, t), create_graph=True)
    for a, b in zip(plain, graph):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- torch.func

def _kd_per_example(s, t, y):
    return ops.kd_loss(s, t, y, temperature=2.0, alpha=0.5, reduction="sum")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_torch_func_grad_and_vmap(backend, device):
    """torch.func.grad, vmap(grad) (per-example gradients) and jacrev give the float64 autograd result."""
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(4, 3, 8, generator=gen, dtype=F64).to(device)
    t = torch.randn(4, 3, 8, generator=gen, dtype=F64).to(device)
    y = torch.randint(0, 8, (4, 3), generator=gen).to(device)
    y[1, 2] = -100
    with use_backend("torch"):
        ref = torch.stack([_reference_grad(s[i], t[i], y[i]) for i in range(4)])
    with use_backend(backend):
        one = torch.func.grad(_kd_per_example)(s[0], t[0], y[0])
        per_example = torch.func.vmap(torch.func.grad(_kd_per_example))(s, t, y)
        both = torch.func.grad(_kd_per_example, argnums=(0, 1))(s[0], t[0], y[0])
        energy_jac = torch.func.jacrev(lambda z: ops.energy(z, temperature=2.0))(s[0])
    torch.testing.assert_close(one, ref[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(per_example, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(both[0], ref[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(energy_jac, _energy_jacobian(s[0], 2.0), rtol=1e-9, atol=1e-12)


def _reference_grad(s, t, y):
    leaf = s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_kd_per_example(leaf, t, y), leaf)
    return g


def _energy_jacobian(z, temperature):
    rows, classes = z.shape
    jac = torch.zeros(rows, rows, classes, dtype=z.dtype, device=z.device)
    for i in range(rows):
        jac[i, i] = -torch.softmax(z[i] / temperature, -1)
    return jac


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_torch_func_on_mixups(backend, device):
    gen = torch.Generator().manual_seed(4)
    z, psi = (torch.randn(3, 5, generator=gen, dtype=F64).to(device) for _ in range(2))
    m, s = torch.rand(1, 5, generator=gen, dtype=F64).to(device), torch.rand(3, generator=gen, dtype=F64).to(device)
    with use_backend(backend):
        gz = torch.func.grad(lambda z: ops.latent_mixup(z, m, psi, s).square().sum())(z)
    expected = 2 * ops.latent_mixup(z, m, psi, s) * (1 - (1 - s)[:, None] * m)  # d/dz of the square-sum
    torch.testing.assert_close(gz, expected, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- differentiable temperature

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_temperature_tensor_gets_its_gradient(backend, device):
    """A temperature that requires grad is never silently detached: dL/dT against a float64 central
    difference of the float64 loss."""
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(5, 11, generator=gen, dtype=F64).to(device)
    t = torch.randn(5, 11, generator=gen, dtype=F64).to(device)
    y = torch.tensor([3, -100, 0, 10, 4], device=device)

    def loss(T):
        return ops.kd_loss(s, t, y, temperature=T, alpha=0.5, reduction="mean")

    def unc(T):
        energy, entropy = ops.uncertainty(s, temperature=T)
        return energy.sum() + 2 * entropy.sum() + ops.max_softmax(s, temperature=T).sum()

    for fn in (loss, unc):
        T = torch.tensor(2.5, dtype=F64, device=device, requires_grad=True)
        with use_backend(backend):
            value = fn(T)
        (g,) = torch.autograd.grad(value, T)
        h = 1e-5
        with use_backend("torch"):
            numeric = (fn(torch.tensor(2.5 + h, dtype=F64)) - fn(torch.tensor(2.5 - h, dtype=F64))) / (2 * h)
            with_float = fn(2.5)
        torch.testing.assert_close(value, with_float, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g, numeric.to(device), rtol=1e-6, atol=1e-8)


def test_alpha_tensor_gets_its_gradient():
    s, t = torch.randn(4, 6, dtype=F64), torch.randn(4, 6, dtype=F64)
    y = torch.tensor([1, 2, 3, 4])
    a = torch.tensor(0.3, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(ops.kd_loss(s, t, y, temperature=2.0, alpha=a, reduction="sum"), a)
    kl = ops.kd_loss(s, t, y, temperature=2.0, alpha=1.0, reduction="sum")
    ce = ops.kd_loss(s, t, y, temperature=2.0, alpha=0.0, reduction="sum")
    torch.testing.assert_close(g, kl - ce, rtol=1e-12, atol=1e-12)  # loss = a * KL_term + (1 - a) * CE


@pytest.mark.parametrize("call,error,message", [
    (lambda s: ops.kd_loss(s, s, temperature=torch.ones(2, requires_grad=True)), ValueError,
     "temperature must be a number or a one-element tensor"),
    (lambda s: ops.kd_loss(s, s, temperature=-torch.ones((), requires_grad=True)), ValueError,
     "temperature must be a finite number > 0"),
    (lambda s: ops.uncertainty(s, temperature=torch.tensor(float("nan"), requires_grad=True)), ValueError,
     "temperature must be a finite number > 0"),
    (lambda s: ops.kd_loss(s, s, torch.zeros(3, dtype=torch.long), alpha=torch.tensor(1.5, requires_grad=True)),
     ValueError, r"alpha must be in \[0, 1\]"),
    (lambda s: ops.kd_loss(s, s, alpha=torch.tensor(1.0, requires_grad=True)), ValueError,
     "an alpha that requires grad needs a target"),
])
def test_bad_tensor_hyperparameters(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.randn(3, 4))


def test_plain_temperature_tensor_still_works_on_the_kernels():
    """A temperature tensor that does not require grad is a number: the fused kernels still run it."""
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(ops.kd_loss(s, t, temperature=torch.tensor(3.0)), ops.kd_loss(s, t, temperature=3.0))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_double_backward_inside_torch_compile_raises(backend, device):
    """torch.compile's backward is first-order only (AOTAutograd): a second derivative through a compiled
    call raises; it never returns a silent zero."""
    torch._dynamo.reset()
    s = torch.randn(3, 5, dtype=F64, device=device, requires_grad=True)
    t = torch.randn(3, 5, dtype=F64, device=device)
    with use_backend(backend):
        fn = torch.compile(lambda a, b: ops.kd_loss(a, b, temperature=2.0), fullgraph=True, backend="aot_eager")
        loss = fn(s, t)
    with pytest.raises(RuntimeError, match="create_graph|double backward"):
        (g,) = torch.autograd.grad(loss, s, create_graph=True)
        (g ** 2).sum().backward()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_forward_mode_ad(backend, device):
    """Dual tensors (torch.autograd.forward_ad) and torch.func.jvp: the tangent of the loss is the
    directional derivative <grad, v> of the float64 reference."""
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(8)
    s, t, v = (torch.randn(4, 6, generator=gen, dtype=F64).to(device) for _ in range(3))
    y = torch.tensor([0, 5, -100, 2], device=device)
    leaf = s.clone().requires_grad_(True)
    with use_backend("torch"):
        (g,) = torch.autograd.grad(ops.kd_loss(leaf, t, y, temperature=2.0, alpha=0.5), leaf)
    expected = (g * v).sum()
    with use_backend(backend):
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(ops.kd_loss(fwAD.make_dual(s, v), t, y, temperature=2.0, alpha=0.5)).tangent
        _, jvp = torch.func.jvp(lambda a: ops.kd_loss(a, t, y, temperature=2.0, alpha=0.5), (s,), (v,))
    torch.testing.assert_close(tangent, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(jvp, expected, rtol=1e-9, atol=1e-12)
