"""kd_loss: fused KL(teacher || student) at temperature T + hard-label CE per row (docs/ops-design.md, 1)."""

from __future__ import annotations

import torch

from .. import reference
from ..reference import compute_dtype
from ._spec import OpSpec, graph_grads, zeros_rows

# Columns of kd_loss_fwd's stats: [M_s, lse_t, M_t, log d_s, log d_t, log d_1, mu, L] (docs/ops-design.md);
# column 1 (lse_t) is the one the front-end returns (teacher energy) and differentiates.
KD_STATS = 8
KD_STATS_LSE_T = 1


def fake_fwd(student, teacher, target, temperature, alpha, ignore_index, t2_scale, teacher_format):
    acc = compute_dtype(student.dtype)
    rows = student.shape[0]
    return student.new_empty((rows,), dtype=acc), student.new_empty((rows, KD_STATS), dtype=acc)


def fake_bwd(grad_loss, grad_lse_t, student, teacher, target, stats, temperature, alpha,
             ignore_index, t2_scale, teacher_format, student_grad, teacher_grad):
    gs = torch.empty_like(student) if student_grad else student.new_empty((0,))
    gt = torch.empty_like(teacher) if teacher_grad else teacher.new_empty((0,))
    return gs, gt


def setup_context(ctx, inputs, output):
    student, teacher, target, temperature, alpha, ignore_index, t2_scale, teacher_format = inputs
    ctx.save_for_backward(student, teacher, target, output[1])
    ctx.args = (temperature, alpha, ignore_index, t2_scale, teacher_format)


def _graph_backward(ctx, grad_loss, grad_stats):
    student, teacher, target, _ = ctx.saved_tensors
    grad_lse_t = None if grad_stats is None else grad_stats[:, KD_STATS_LSE_T]
    gs, gt = graph_grads(lambda: reference.kd_loss_rows(student, teacher, target, *ctx.args), (student, teacher),
                         ctx.needs_input_grad[:2], (grad_loss, grad_lse_t))
    return (gs, gt) + (None,) * 6


def backward_for(bwd):
    def backward(ctx, grad_loss, grad_stats):
        if grad_loss is None and grad_stats is None:
            return (None,) * 8
        if torch.is_grad_enabled():
            return _graph_backward(ctx, grad_loss, grad_stats)
        student, teacher, target, stats = ctx.saved_tensors
        rows = stats.shape[0]
        grad_loss = zeros_rows(stats, rows) if grad_loss is None else grad_loss.contiguous()
        grad_lse_t = (zeros_rows(stats, rows) if grad_stats is None
                      else grad_stats[:, KD_STATS_LSE_T].contiguous())
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gs, gt = bwd(grad_loss, grad_lse_t, student, teacher, target, stats, *ctx.args, need_s, need_t)
        return (gs if need_s else None, gt if need_t else None) + (None,) * 6
    return backward


def samples(grad: bool) -> list:
    s = torch.randn(5, 13, requires_grad=grad)
    t = torch.randn(5, 13, requires_grad=grad)
    y = torch.tensor([0, 3, -100, 12, 7])
    return [(s, t, y, 2.0, 0.5, -100, True, 0), (s, t, None, 1.0, 1.0, -100, False, 1)]


SPEC = OpSpec(
    family="kd_loss",
    fwd_schema="(Tensor student, Tensor teacher, Tensor? target, float temperature, float alpha, "
    "int ignore_index, bool t2_scale, int teacher_format) -> (Tensor loss, Tensor stats)",
    bwd_schema="(Tensor grad_loss, Tensor grad_lse_t, Tensor student, Tensor teacher, Tensor? target, "
    "Tensor stats, float temperature, float alpha, int ignore_index, bool t2_scale, int teacher_format, "
    "bool student_grad, bool teacher_grad) -> (Tensor grad_student, Tensor grad_teacher)",
    grad_inputs=("student", "teacher"),
    reference="augkd.ops.reference:kd_loss_rows",
    fake_fwd=fake_fwd, fake_bwd=fake_bwd, setup_context=setup_context, backward_for=backward_for,
    samples=samples,
)
