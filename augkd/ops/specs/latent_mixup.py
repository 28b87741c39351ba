"""latent_mixup: (1 - s) * (mask * psi + (1 - mask) * z) + s * z in one sweep (docs/ops-design.md, 3)."""

from __future__ import annotations

import torch

from .. import reference
from ._spec import OpSpec, grad_or_empty, graph_grads, only


def fake_fwd(z, mask, psi, s, s_scalar):
    return torch.empty_like(z)


def fake_bwd(grad_out, z, mask, psi, s, s_scalar, z_grad, mask_grad, psi_grad, s_grad):
    gs = grad_or_empty(s_grad and s is not None, s if s is not None else z, z)
    return (grad_or_empty(z_grad, z, z), grad_or_empty(mask_grad, mask, mask),
            grad_or_empty(psi_grad, psi, psi), gs)


def setup_context(ctx, inputs, output):
    z, mask, psi, s, s_scalar = inputs
    ctx.save_for_backward(z, mask, psi, s)
    ctx.s_scalar = s_scalar


def backward_for(bwd):
    def backward(ctx, grad_out):
        if grad_out is None:  # the output took no part in the loss
            return (None,) * 5
        z, mask, psi, s = ctx.saved_tensors
        want = ctx.needs_input_grad[:4]
        want_s = want[3] and s is not None
        if torch.is_grad_enabled():
            mix = ctx.s_scalar if s is None else s.unsqueeze(1)
            grads = graph_grads(lambda: (reference.latent_mixup(z, mask, psi, mix),), (z, mask, psi, s),
                                (*want[:3], want_s), (grad_out,))
            return (*grads, None)
        gz, gm, gp, gs = bwd(grad_out.contiguous(), z, mask, psi, s, ctx.s_scalar, *want[:3], want_s)
        return only(want[0], gz), only(want[1], gm), only(want[2], gp), only(want_s, gs), None
    return backward


def samples(grad: bool) -> list:
    z, psi = torch.randn(4, 6, requires_grad=grad), torch.randn(4, 6, requires_grad=grad)
    m = torch.rand(1, 6, requires_grad=grad)
    s = torch.rand(4, requires_grad=grad)
    return [(z, m, psi, s, 0.0), (z, m.detach().expand(4, 6).contiguous().requires_grad_(grad), psi, None, 0.3)]


SPEC = OpSpec(
    family="latent_mixup",
    fwd_schema="(Tensor z, Tensor mask, Tensor psi, Tensor? s, float s_scalar) -> Tensor",
    bwd_schema="(Tensor grad_out, Tensor z, Tensor mask, Tensor psi, Tensor? s, float s_scalar, "
    "bool z_grad, bool mask_grad, bool psi_grad, bool s_grad) "
    "-> (Tensor grad_z, Tensor grad_mask, Tensor grad_psi, Tensor grad_s)",
    grad_inputs=("z", "mask", "psi", "s"),
    reference="augkd.ops.reference:latent_mixup",
    fake_fwd=fake_fwd, fake_bwd=fake_bwd, setup_context=setup_context, backward_for=backward_for,
    samples=samples,
)
