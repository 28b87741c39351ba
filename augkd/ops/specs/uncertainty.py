"""uncertainty: per-row energy -T logsumexp(z / T) and softmax entropy in one pass (docs/ops-design.md, 2)."""

from __future__ import annotations

import torch

from .. import reference
from ..reference import compute_dtype
from ._spec import OpSpec, graph_grads, zeros_rows


def fake_fwd(logits, temperature):
    acc = compute_dtype(logits.dtype)
    rows = logits.shape[0]
    return logits.new_empty((rows,), dtype=acc), logits.new_empty((rows,), dtype=acc)


def fake_bwd(grad_energy, grad_entropy, logits, energy, entropy, temperature):
    return torch.empty_like(logits)


def setup_context(ctx, inputs, output):
    logits, temperature = inputs
    ctx.save_for_backward(logits, output[0], output[1])
    ctx.temperature = temperature


def backward_for(bwd):
    def backward(ctx, grad_energy, grad_entropy):
        if grad_energy is None and grad_entropy is None:
            return None, None
        logits, energy, entropy = ctx.saved_tensors
        if torch.is_grad_enabled():
            (gz,) = graph_grads(lambda: reference.uncertainty(logits, ctx.temperature), (logits,),
                                ctx.needs_input_grad[:1], (grad_energy, grad_entropy))
            return gz, None
        rows = energy.shape[0]
        ge = zeros_rows(energy, rows) if grad_energy is None else grad_energy.contiguous()
        gh = zeros_rows(entropy, rows) if grad_entropy is None else grad_entropy.contiguous()
        return bwd(ge, gh, logits, energy, entropy, ctx.temperature), None
    return backward


def samples(grad: bool) -> list:
    return [(torch.randn(5, 13, requires_grad=grad), 1.5)]


SPEC = OpSpec(
    family="uncertainty",
    fwd_schema="(Tensor logits, float temperature) -> (Tensor energy, Tensor entropy)",
    bwd_schema="(Tensor grad_energy, Tensor grad_entropy, Tensor logits, Tensor energy, "
    "Tensor entropy, float temperature) -> Tensor",
    grad_inputs=("logits",),
    reference="augkd.ops.reference:uncertainty",
    fake_fwd=fake_fwd, fake_bwd=fake_bwd, setup_context=setup_context, backward_for=backward_for,
    samples=samples,
)
