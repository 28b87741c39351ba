"""torch.library.opcheck of every kernel op of every spec on every kernel backend here (schema, fake,
autograd registration, AOT dispatch) and torch.compile(fullgraph=True) of functions that call the public
ops."""

from __future__ import annotations

import pytest
import torch

import augkd.ops as ops
from augkd.ops import _extension, backends, use_backend
from augkd.ops.specs import SPECS

from .matrix import BACKEND_DEVICES, BACKENDS_HERE

needs_extension = pytest.mark.skipif(not _extension.LOADED,
                                     reason=f"extension not loaded: {_extension.WHY_NOT_LOADED}")

KERNEL_BACKEND_DEVICES = [c for c in BACKEND_DEVICES if c.values[0] != "torch"]


def _on(device: str, args: tuple) -> tuple:
    return tuple(a.detach().to(device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)


def _bwd_calls(ns, spec, fwd_args) -> list:
    """The arguments the registered autograd passes to `<family>_bwd` in a backward of the forward on
    `fwd_args` (a random weight on every differentiable output), detached: opcheck's samples of the bwd op."""
    calls = []
    bwd_op = getattr(ns, spec.bwd).default

    def recording_bwd(*args):
        calls.append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        return bwd_op(*args)

    backward = spec.backward_for(recording_bwd)
    fwd_op = getattr(ns, spec.fwd).default

    class Recorded(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.set_materialize_grads(False)
            out = fwd_op(*inputs)
            spec.setup_context(ctx, inputs, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    out = Recorded.apply(*fwd_args)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
    leaves = [a for a in fwd_args if isinstance(a, torch.Tensor) and a.requires_grad]
    torch.autograd.grad(sum((o * torch.randn_like(o)).sum() for o in outs), leaves, allow_unused=True)
    return calls


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("family", SPECS)
def test_opcheck(backend, device, family):
    """Schema, fake, autograd registration and AOT dispatch of `<family>_fwd` and `<family>_bwd` on every
    kernel backend here (the spec's sample inputs; the bwd op's inputs as its autograd passes them)."""
    spec = SPECS[family]
    ns = backends.load(backend)
    samples = [_on(device, args) for args in spec.samples(True)]
    for args in samples:
        torch.library.opcheck(getattr(ns, spec.fwd).default, args)
        calls = _bwd_calls(ns, spec, args)
        assert calls, f"{spec.fwd}'s backward never called {spec.bwd}"
        for bwd_args in calls:
            torch.library.opcheck(getattr(ns, spec.bwd).default, bwd_args)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_compile_fullgraph_matches_eager(backend):

    def step(s, t, y, z, m, psi, g, r):
        loss = ops.kd_loss(s, t, y, temperature=4.0, alpha=0.5, reduction="mean")
        energy, entropy = ops.uncertainty(t)
        mixed = ops.latent_mixup(z, m, psi, 0.3)
        img = ops.pixel_mixup(g, r, 0.6, mean=[0.5, 0.5], std=[0.25, 0.25])
        return loss + energy.mean() + entropy.mean() + mixed.square().mean() + img.mean()

    def inputs():
        gen = torch.Generator().manual_seed(0)
        leaves = [torch.randn(6, 11, generator=gen), torch.randn(6, 11, generator=gen)]
        y = torch.randint(0, 11, (6,), generator=gen)
        more = [torch.randn(4, 8, generator=gen), torch.rand(1, 8, generator=gen), torch.randn(4, 8, generator=gen),
                torch.rand(2, 2, 3, 3, generator=gen), torch.rand(2, 2, 3, 3, generator=gen)]
        return [x.requires_grad_() for x in leaves[:2]], y, [x.requires_grad_() for x in more]

    torch._dynamo.reset()
    with use_backend(backend):
        (s, t), y, rest = inputs()
        eager = step(s, t, y, *rest)
        eager_grads = torch.autograd.grad(eager, [s, t, *rest])
        (s2, t2), y2, rest2 = inputs()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(s2, t2, y2, *rest2)
        compiled_grads = torch.autograd.grad(compiled, [s2, t2, *rest2])
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


@needs_extension
def test_compile_with_inductor_cpu():
    """The real compiler stack (inductor) around the C++ op, as users will run it."""
    torch._dynamo.reset()
    s, t = torch.randn(8, 20, requires_grad=True), torch.randn(8, 20)
    y = torch.randint(0, 20, (8,))
    fn = torch.compile(lambda a, b, c: ops.kd_loss(a * 2, b, c, alpha=0.5, temperature=2.0), fullgraph=True)
    with use_backend("cpu"):
        out = fn(s, t, y)
        (g,) = torch.autograd.grad(out, [s])
        ref = ops.kd_loss(s * 2, t, y, alpha=0.5, temperature=2.0)
        (g_ref,) = torch.autograd.grad(ref, [s])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)
