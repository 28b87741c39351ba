"""kd_divergence: the soft term of kd_loss as reverse KL, generalized JSD or TVD (and KL with its parts), with
the hard-label CE; per-row statistics carry both parts (docs/ops-design.md, "KD divergences")."""

from __future__ import annotations

from ._spec import OpSpec, grad_or_empty, loss_and_stats, student_teacher_backward, student_teacher_target, zeros_rows

# columns of kd_divergence_fwd's statistics (kernels/kd_divergence_math.h): the divergence D and the CE are the
# per-row parts the front-end returns and differentiates; the other columns carry no gradient
STATS, STATS_D, STATS_CE = 11, 5, 6


def fake_fwd(student, teacher, target, temperature, alpha, ignore_index, t2_scale, divergence, beta):
    return loss_and_stats(student, STATS)


def fake_bwd(grad_div, grad_ce, student, teacher, target, stats, temperature, ignore_index, divergence, beta,
             student_grad, teacher_grad):
    return grad_or_empty(student_grad, student, student), grad_or_empty(teacher_grad, teacher, teacher)


def setup_context(ctx, inputs, output):
    student, teacher, target = inputs[:3]
    ctx.save_for_backward(student, teacher, target, output[1])
    ctx.args = inputs[3:]  # temperature, alpha, ignore_index, t2_scale, divergence, beta


def _row_grads(ctx, grad_loss, grad_stats, has_target):
    """The gradient on each row's D and on its CE: through the loss (alpha c D + (1 - alpha) CE, a term of
    weight exactly 0 left out) and through the stats columns D and CE (the parts)."""
    temperature, alpha, _, t2_scale, _, _ = ctx.args
    c = temperature * temperature if t2_scale else 1.0
    g_div = g_ce = None
    if grad_loss is not None:
        g_div = grad_loss * (alpha * c) if alpha != 0 else None
        g_ce = grad_loss * (1 - alpha) if has_target and alpha != 1 else None
    if grad_stats is not None:
        col_d, col_ce = grad_stats[:, STATS_D], grad_stats[:, STATS_CE]
        g_div = col_d if g_div is None else g_div + col_d
        g_ce = col_ce if g_ce is None else g_ce + col_ce
    return g_div, g_ce


def _graph_grad_outputs(grad_loss, grad_stats):
    if grad_stats is None:
        return grad_loss, None, None
    return grad_loss, grad_stats[:, STATS_D], grad_stats[:, STATS_CE]


def _run_bwd(bwd, ctx, grad_loss, grad_stats, need_s, need_t):
    student, teacher, target, stats = ctx.saved_tensors
    g_div, g_ce = _row_grads(ctx, grad_loss, grad_stats, target is not None)
    rows = stats.shape[0]
    g_div = zeros_rows(stats, rows) if g_div is None else g_div.contiguous()
    g_ce = zeros_rows(stats, rows) if g_ce is None else g_ce.contiguous()
    temperature, _, ignore_index, _, divergence, beta = ctx.args
    return bwd(g_div, g_ce, student, teacher, target, stats, temperature, ignore_index, divergence, beta,
               need_s, need_t)


def backward_for(bwd):
    return student_teacher_backward(bwd, 9, SPEC.reference, _graph_grad_outputs, _run_bwd)


def samples(grad: bool) -> list:
    s, t, y = student_teacher_target(grad)
    return [(s, t, y, 2.0, 0.5, -100, True, 2, 0.3), (s, t, None, 1.0, 1.0, -100, False, 3, 0.5),
            (s, t, y, 0.5, 0.0, -100, True, 1, 0.5)]


SPEC = OpSpec(
    family="kd_divergence",
    fwd_schema="(Tensor student, Tensor teacher, Tensor? target, float temperature, float alpha, "
    "int ignore_index, bool t2_scale, int divergence, float beta) -> (Tensor loss, Tensor stats)",
    bwd_schema="(Tensor grad_div, Tensor grad_ce, Tensor student, Tensor teacher, Tensor? target, "
    "Tensor stats, float temperature, int ignore_index, int divergence, float beta, bool student_grad, "
    "bool teacher_grad) -> (Tensor grad_student, Tensor grad_teacher)",
    grad_inputs=("student", "teacher"),
    reference="augkd.ops.divergence_reference:kd_divergence_rows",
    fake_fwd=fake_fwd, fake_bwd=fake_bwd, setup_context=setup_context, backward_for=backward_for,
    samples=samples,
    public="kd_loss",  # kd_loss(divergence=...) runs this op
)
