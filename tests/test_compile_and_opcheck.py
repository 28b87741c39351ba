"""torch.library.opcheck of the kernel ops (schema, fake, autograd registration, AOT dispatch) and
torch.compile(fullgraph=True) of functions that call the public ops."""

from __future__ import annotations

import pytest
import torch

import augkd.ops as ops
from augkd.ops import _extension, use_backend

from .matrix import BACKENDS_HERE

needs_extension = pytest.mark.skipif(not _extension.LOADED,
                                     reason=f"extension not loaded: {_extension.WHY_NOT_LOADED}")


def _samples(grad: bool):
    s = torch.randn(5, 13, requires_grad=grad)
    t = torch.randn(5, 13, requires_grad=grad)
    y = torch.tensor([0, 3, -100, 12, 7])
    z, psi = torch.randn(4, 6, requires_grad=grad), torch.randn(4, 6, requires_grad=grad)
    m = torch.rand(1, 6, requires_grad=grad)
    sv = torch.rand(4, requires_grad=grad)
    g, r = torch.rand(3, 2, 4, 4, requires_grad=grad), torch.rand(3, 2, 4, 4, requires_grad=grad)
    mean, std = torch.tensor([0.4, 0.5]), torch.tensor([0.2, 0.3])
    idx = torch.tensor([[0, 4, 2], [12, 1, 3], [5, 6, 7], [8, 0, 11], [9, 10, 2]])
    val = torch.log_softmax(torch.randn(5, 13), -1).gather(-1, idx)
    return {
        "topk_kd_loss_fwd": [(s, idx, val, y, 2.0, 0.5, -100, True, 1, 1, 0), (s, idx, val, None, 1.0, 1.0, -100, False, 0, 0, 1)],
        "kd_loss_fwd": [(s, t, y, 2.0, 0.5, -100, True, 0), (s, t, None, 1.0, 1.0, -100, False, 1)],
        "kd_divergence_fwd": [(s, t, y, 2.0, 0.5, -100, True, 2, 0.3), (s, t, None, 1.0, 1.0, -100, False, 3, 0.5),
                              (s, t, y, 0.5, 0.0, -100, True, 1, 0.5)],
        "uncertainty_fwd": [(s, 1.5)],
        "latent_mixup_fwd": [(z, m, psi, sv, 0.0), (z, m.expand(4, 6).contiguous(), psi, None, 0.3)],
        "pixel_mixup_fwd": [(g, r, sv[:3].detach().clone().requires_grad_(grad), 0.0, mean, std),
                            (g, r, None, 0.25, None, None)],
    }


@needs_extension
@pytest.mark.parametrize("name", ["kd_loss_fwd", "uncertainty_fwd", "latent_mixup_fwd", "pixel_mixup_fwd",
                                  "topk_kd_loss_fwd", "kd_divergence_fwd"])
def test_opcheck_cpp_ops(name):
    op = getattr(torch.ops.augkd, name).default
    for args in _samples(grad=True)[name]:
        torch.library.opcheck(op, args)


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
