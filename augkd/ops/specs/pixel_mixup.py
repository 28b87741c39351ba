"""pixel_mixup: normalize((1 - s) * generated + s * real) per channel in one sweep (docs/ops-design.md, 3)."""

from __future__ import annotations

import torch

from .. import reference
from ._spec import OpSpec, grad_or_empty, graph_grads, only


def fake_fwd(generated, real, s, s_scalar, mean, std):
    return torch.empty_like(generated)


def fake_bwd(grad_out, generated, real, s, s_scalar, mean, std, generated_grad, real_grad, s_grad):
    gs = grad_or_empty(s_grad and s is not None, s if s is not None else generated, generated)
    return grad_or_empty(generated_grad, generated, generated), grad_or_empty(real_grad, real, real), gs


def setup_context(ctx, inputs, output):
    generated, real, s, s_scalar, mean, std = inputs
    ctx.save_for_backward(generated, real, s, mean, std)
    ctx.s_scalar = s_scalar


def backward_for(bwd):
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 6
        generated, real, s, mean, std = ctx.saved_tensors
        want_g, want_r, want_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        want_s = want_s and s is not None
        if torch.is_grad_enabled():
            mix = ctx.s_scalar if s is None else s.view(-1, 1, 1, 1)
            gg, gr, gs = graph_grads(lambda: (reference.pixel_mixup(generated, real, mix, mean, std),),
                                     (generated, real, s), (want_g, want_r, want_s), (grad_out,))
            return gg, gr, gs, None, None, None
        gg, gr, gs = bwd(grad_out.contiguous(), generated, real, s, ctx.s_scalar, mean, std, want_g, want_r, want_s)
        return only(want_g, gg), only(want_r, gr), only(want_s, gs), None, None, None
    return backward


def samples(grad: bool) -> list:
    g, r = torch.rand(3, 2, 4, 4, requires_grad=grad), torch.rand(3, 2, 4, 4, requires_grad=grad)
    mean, std = torch.tensor([0.4, 0.5]), torch.tensor([0.2, 0.3])
    return [(g, r, torch.rand(3, requires_grad=grad), 0.0, mean, std), (g, r, None, 0.25, None, None)]


SPEC = OpSpec(
    family="pixel_mixup",
    fwd_schema="(Tensor generated, Tensor real, Tensor? s, float s_scalar, Tensor? mean, "
    "Tensor? std) -> Tensor",
    bwd_schema="(Tensor grad_out, Tensor generated, Tensor real, Tensor? s, float s_scalar, "
    "Tensor? mean, Tensor? std, bool generated_grad, bool real_grad, bool s_grad) "
    "-> (Tensor grad_generated, Tensor grad_real, Tensor grad_s)",
    grad_inputs=("generated", "real", "s"),
    reference="augkd.ops.reference:pixel_mixup",
    fake_fwd=fake_fwd, fake_bwd=fake_bwd, setup_context=setup_context, backward_for=backward_for,
    samples=samples,
)
