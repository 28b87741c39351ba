"""kd_loss: fused KL(teacher || student) at temperature T + hard-label CE per row (docs/ops-design.md, 1)."""

from __future__ import annotations

from ._spec import OpSpec, grad_or_empty, loss_and_stats, student_teacher_backward, student_teacher_target, zeros_rows

# Columns of kd_loss_fwd's stats: [M_s, lse_t, M_t, log d_s, log d_t, log d_1, mu, L] (docs/ops-design.md);
# column 1 (lse_t) is the one the front-end returns (teacher energy) and differentiates.
KD_STATS = 8
KD_STATS_LSE_T = 1


def fake_fwd(student, teacher, target, temperature, alpha, ignore_index, t2_scale, teacher_format):
    return loss_and_stats(student, KD_STATS)


def fake_bwd(grad_loss, grad_lse_t, student, teacher, target, stats, temperature, alpha,
             ignore_index, t2_scale, teacher_format, student_grad, teacher_grad):
    return grad_or_empty(student_grad, student, student), grad_or_empty(teacher_grad, teacher, teacher)


def setup_context(ctx, inputs, output):
    student, teacher, target, temperature, alpha, ignore_index, t2_scale, teacher_format = inputs
    ctx.save_for_backward(student, teacher, target, output[1])
    ctx.args = (temperature, alpha, ignore_index, t2_scale, teacher_format)


def _graph_grad_outputs(grad_loss, grad_stats):
    return grad_loss, None if grad_stats is None else grad_stats[:, KD_STATS_LSE_T]


def _run_bwd(bwd, ctx, grad_loss, grad_stats, need_s, need_t):
    student, teacher, target, stats = ctx.saved_tensors
    rows = stats.shape[0]
    grad_loss = zeros_rows(stats, rows) if grad_loss is None else grad_loss.contiguous()
    grad_lse_t = (zeros_rows(stats, rows) if grad_stats is None
                  else grad_stats[:, KD_STATS_LSE_T].contiguous())
    return bwd(grad_loss, grad_lse_t, student, teacher, target, stats, *ctx.args, need_s, need_t)


def backward_for(bwd):
    return student_teacher_backward(bwd, 8, SPEC.reference, _graph_grad_outputs, _run_bwd)


def samples(grad: bool) -> list:
    s, t, y = student_teacher_target(grad)
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

# kd_loss_fwd then kd_loss_bwd of teacher logits in one sweep, each gradient written over the logits it belongs to
# (csrc/schemas.cpp): the row chunks of fused_linear_kd_loss. Not differentiable and implemented by the C++ CPU
# backend only; where it is absent the chunks run the two ops above.
GRAD_IN_PLACE_SCHEMA = ("(Tensor(a!) student, Tensor(b!) teacher, Tensor? target, Tensor grad_loss, float temperature, "
                        "float alpha, int ignore_index, bool t2_scale, bool student_grad, bool teacher_grad) "
                        "-> Tensor loss")
