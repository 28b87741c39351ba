"""topk_kd_loss: KD loss against a sparse top-k teacher (k index/value pairs per row; docs/ops-design.md, 4)."""

from __future__ import annotations

import torch

from ._spec import OpSpec, loss_and_stats

STATS = 8  # columns of topk_kd_loss_fwd's per-row statistics


def fake_fwd(student, indices, values, target, temperature, alpha, ignore_index, t2_scale, values_format,
             tail, divergence):
    return loss_and_stats(student, STATS)


def fake_bwd(grad_loss, student, indices, values, target, stats, *args):
    return torch.empty_like(student)


def setup_context(ctx, inputs, output):
    student, indices, values, target = inputs[:4]
    ctx.save_for_backward(student, indices, values, target, output[1])
    ctx.args = inputs[4:]


def backward_for(bwd):
    def backward(ctx, grad_loss, grad_stats):
        if grad_loss is None or not ctx.needs_input_grad[0]:  # the stats carry no gradient
            return (None,) * 11
        student, indices, values, target, stats = ctx.saved_tensors
        return (bwd(grad_loss.contiguous(), student, indices, values, target, stats, *ctx.args),) + (None,) * 10
    return backward


def samples(grad: bool) -> list:
    s = torch.randn(5, 13, requires_grad=grad)
    y = torch.tensor([0, 3, -100, 12, 7])
    idx = torch.tensor([[0, 4, 2], [12, 1, 3], [5, 6, 7], [8, 0, 11], [9, 10, 2]])
    val = torch.log_softmax(torch.randn(5, 13), -1).gather(-1, idx)
    return [(s, idx, val, y, 2.0, 0.5, -100, True, 1, 1, 0), (s, idx, val, None, 1.0, 1.0, -100, False, 0, 0, 1)]


SPEC = OpSpec(
    family="topk_kd_loss",
    fwd_schema="(Tensor student, Tensor indices, Tensor values, Tensor? target, float temperature, "
    "float alpha, int ignore_index, bool t2_scale, int values_format, int tail, int divergence) "
    "-> (Tensor loss, Tensor stats)",
    bwd_schema="(Tensor grad_loss, Tensor student, Tensor indices, Tensor values, Tensor? target, "
    "Tensor stats, float temperature, float alpha, int ignore_index, bool t2_scale, int values_format, "
    "int tail, int divergence) -> Tensor",
    grad_inputs=("student",),
    reference="augkd.ops.topk_kd_loss:topk_kd_loss_rows",
    fake_fwd=fake_fwd, fake_bwd=fake_bwd, setup_context=setup_context, backward_for=backward_for,
    samples=samples,
)
