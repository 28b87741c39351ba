"""Fake (meta) implementations and autograd formulas for the kernel ops, written once and attached to
every namespace that implements the schemas: `augkd` (C++ CPU/CUDA) and `augkd_triton` (Triton).

Fakes let torch.compile / FakeTensor trace the opaque C++ ops; the autograd glue routes each forward
op's backward to the same backend's `*_bwd` op, which recomputes from the few per-row stats the
forward saved (the flash-attention pattern: no B x C buffer is kept between forward and backward).

The `*_bwd` ops are not differentiable themselves. A backward that must build a graph (grad mode on
inside backward: `create_graph=True`, gradgradcheck, Hessian-vector products) recomputes the gradient
through the torch formulas of `reference` from the saved inputs instead, so a second derivative is
exact on every backend and never a silent zero. That path reads only the saved inputs, not the
forward's statistics, so it holds whatever the kernels choose to save.
"""

from __future__ import annotations

import torch

from . import divergence_reference, reference
from .reference import compute_dtype

# Columns of kd_loss_fwd's stats: [M_s, lse_t, M_t, log d_s, log d_t, log d_1, mu, L] (docs/ops-design.md);
# column 1 (lse_t) is the one the front-end returns (teacher energy) and differentiates.
KD_STATS = 8
KD_STATS_LSE_T = 1
# kd_divergence_fwd's stats (kernels/kd_divergence_math.h): columns 5 (the divergence D) and 6 (the CE) are the
# per-row parts the front-end returns and differentiates; the other columns carry no gradient.
DIV_STATS, DIV_STATS_D, DIV_STATS_CE = 11, 5, 6

_registered: set[tuple[str, str]] = set()


def _zeros_rows(like: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.zeros((rows,), dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------- fakes (shapes and dtypes only)

def _fake_kd_fwd(student, teacher, target, temperature, alpha, ignore_index, t2_scale, teacher_format):
    acc = compute_dtype(student.dtype)
    rows = student.shape[0]
    return student.new_empty((rows,), dtype=acc), student.new_empty((rows, KD_STATS), dtype=acc)


def _fake_kd_bwd(grad_loss, grad_lse_t, student, teacher, target, stats, temperature, alpha,
                 ignore_index, t2_scale, teacher_format, student_grad, teacher_grad):
    gs = torch.empty_like(student) if student_grad else student.new_empty((0,))
    gt = torch.empty_like(teacher) if teacher_grad else teacher.new_empty((0,))
    return gs, gt


def _fake_unc_fwd(logits, temperature):
    acc = compute_dtype(logits.dtype)
    rows = logits.shape[0]
    return logits.new_empty((rows,), dtype=acc), logits.new_empty((rows,), dtype=acc)


def _fake_unc_bwd(grad_energy, grad_entropy, logits, energy, entropy, temperature):
    return torch.empty_like(logits)


def _fake_latent_fwd(z, mask, psi, s, s_scalar):
    return torch.empty_like(z)


def _grad_or_empty(wanted: bool, like: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    # a *_bwd op returns an empty (0,) tensor for each gradient its flags did not ask for
    return torch.empty_like(like) if wanted else fallback.new_empty((0,))


def _fake_latent_bwd(grad_out, z, mask, psi, s, s_scalar, z_grad, mask_grad, psi_grad, s_grad):
    gs = _grad_or_empty(s_grad and s is not None, s if s is not None else z, z)
    return (_grad_or_empty(z_grad, z, z), _grad_or_empty(mask_grad, mask, mask),
            _grad_or_empty(psi_grad, psi, psi), gs)


def _fake_pixel_fwd(generated, real, s, s_scalar, mean, std):
    return torch.empty_like(generated)


def _fake_pixel_bwd(grad_out, generated, real, s, s_scalar, mean, std, generated_grad, real_grad, s_grad):
    gs = _grad_or_empty(s_grad and s is not None, s if s is not None else generated, generated)
    return _grad_or_empty(generated_grad, generated, generated), _grad_or_empty(real_grad, real, real), gs


def _fake_topk_fwd(student, indices, values, target, temperature, alpha, ignore_index, t2_scale, values_format,
                   tail, divergence):
    acc = compute_dtype(student.dtype)
    rows = student.shape[0]
    return student.new_empty((rows,), dtype=acc), student.new_empty((rows, 8), dtype=acc)


def _fake_topk_bwd(grad_loss, student, indices, values, target, stats, *args):
    return torch.empty_like(student)


def _fake_div_fwd(student, teacher, target, temperature, alpha, ignore_index, t2_scale, divergence, beta):
    acc = compute_dtype(student.dtype)
    rows = student.shape[0]
    return student.new_empty((rows,), dtype=acc), student.new_empty((rows, DIV_STATS), dtype=acc)


def _fake_div_bwd(grad_div, grad_ce, student, teacher, target, stats, temperature, ignore_index, divergence, beta,
                  student_grad, teacher_grad):
    return _grad_or_empty(student_grad, student, student), _grad_or_empty(teacher_grad, teacher, teacher)


FAKES = {
    "kd_loss_fwd": _fake_kd_fwd, "kd_loss_bwd": _fake_kd_bwd,
    "uncertainty_fwd": _fake_unc_fwd, "uncertainty_bwd": _fake_unc_bwd,
    "latent_mixup_fwd": _fake_latent_fwd, "latent_mixup_bwd": _fake_latent_bwd,
    "pixel_mixup_fwd": _fake_pixel_fwd, "pixel_mixup_bwd": _fake_pixel_bwd,
    "topk_kd_loss_fwd": _fake_topk_fwd, "topk_kd_loss_bwd": _fake_topk_bwd,
    "kd_divergence_fwd": _fake_div_fwd, "kd_divergence_bwd": _fake_div_bwd,
}


# ---------------------------------------------------------------- autograd

def _graph_grads(compute, inputs, wanted, grad_outputs):
    """Gradients of `compute()`'s outputs, weighted by `grad_outputs`, w.r.t. the `wanted` `inputs`,
    recorded as a graph (the double-backward path). `compute` runs the torch formulas on the saved
    inputs, so the graph reaches the inputs' own history and the incoming gradients."""
    result = [None] * len(inputs)
    targets = [x for x, w in zip(inputs, wanted) if w]
    if not targets:
        return result
    with torch.enable_grad():
        outputs = compute()
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        grads = (torch.autograd.grad([o for o, _ in pairs], targets, [g for _, g in pairs], create_graph=True,
                                     allow_unused=True) if pairs else [None] * len(targets))
    found = iter(grads)
    for i, w in enumerate(wanted):
        if w:
            g = next(found)
            result[i] = torch.zeros_like(inputs[i]) if g is None else g
    return result


def _kd_setup(ctx, inputs, output):
    student, teacher, target, temperature, alpha, ignore_index, t2_scale, teacher_format = inputs
    ctx.save_for_backward(student, teacher, target, output[1])
    ctx.args = (temperature, alpha, ignore_index, t2_scale, teacher_format)


def _kd_graph_backward(ctx, grad_loss, grad_stats):
    student, teacher, target, _ = ctx.saved_tensors
    grad_lse_t = None if grad_stats is None else grad_stats[:, KD_STATS_LSE_T]
    gs, gt = _graph_grads(lambda: reference.kd_loss_rows(student, teacher, target, *ctx.args), (student, teacher),
                          ctx.needs_input_grad[:2], (grad_loss, grad_lse_t))
    return (gs, gt) + (None,) * 6


def _kd_backward_for(bwd):
    def backward(ctx, grad_loss, grad_stats):
        if grad_loss is None and grad_stats is None:
            return (None,) * 8
        if torch.is_grad_enabled():
            return _kd_graph_backward(ctx, grad_loss, grad_stats)
        student, teacher, target, stats = ctx.saved_tensors
        rows = stats.shape[0]
        grad_loss = _zeros_rows(stats, rows) if grad_loss is None else grad_loss.contiguous()
        grad_lse_t = (_zeros_rows(stats, rows) if grad_stats is None
                      else grad_stats[:, KD_STATS_LSE_T].contiguous())
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gs, gt = bwd(grad_loss, grad_lse_t, student, teacher, target, stats, *ctx.args, need_s, need_t)
        return (gs if need_s else None, gt if need_t else None) + (None,) * 6
    return backward


def _unc_setup(ctx, inputs, output):
    logits, temperature = inputs
    ctx.save_for_backward(logits, output[0], output[1])
    ctx.temperature = temperature


def _unc_backward_for(bwd):
    def backward(ctx, grad_energy, grad_entropy):
        if grad_energy is None and grad_entropy is None:
            return None, None
        logits, energy, entropy = ctx.saved_tensors
        if torch.is_grad_enabled():
            (gz,) = _graph_grads(lambda: reference.uncertainty(logits, ctx.temperature), (logits,),
                                 ctx.needs_input_grad[:1], (grad_energy, grad_entropy))
            return gz, None
        rows = energy.shape[0]
        ge = _zeros_rows(energy, rows) if grad_energy is None else grad_energy.contiguous()
        gh = _zeros_rows(entropy, rows) if grad_entropy is None else grad_entropy.contiguous()
        return bwd(ge, gh, logits, energy, entropy, ctx.temperature), None
    return backward


def _only(wanted: bool, grad: torch.Tensor):
    """The gradient when it was asked for, else None (the op returned an empty placeholder)."""
    return grad if wanted else None


def _latent_setup(ctx, inputs, output):
    z, mask, psi, s, s_scalar = inputs
    ctx.save_for_backward(z, mask, psi, s)
    ctx.s_scalar = s_scalar


def _latent_backward_for(bwd):
    def backward(ctx, grad_out):
        if grad_out is None:  # the output took no part in the loss
            return (None,) * 5
        z, mask, psi, s = ctx.saved_tensors
        want = ctx.needs_input_grad[:4]
        want_s = want[3] and s is not None
        if torch.is_grad_enabled():
            mix = ctx.s_scalar if s is None else s.unsqueeze(1)
            grads = _graph_grads(lambda: (reference.latent_mixup(z, mask, psi, mix),), (z, mask, psi, s),
                                 (*want[:3], want_s), (grad_out,))
            return (*grads, None)
        gz, gm, gp, gs = bwd(grad_out.contiguous(), z, mask, psi, s, ctx.s_scalar, *want[:3], want_s)
        return _only(want[0], gz), _only(want[1], gm), _only(want[2], gp), _only(want_s, gs), None
    return backward


def _pixel_setup(ctx, inputs, output):
    generated, real, s, s_scalar, mean, std = inputs
    ctx.save_for_backward(generated, real, s, mean, std)
    ctx.s_scalar = s_scalar


def _pixel_backward_for(bwd):
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 6
        generated, real, s, mean, std = ctx.saved_tensors
        want_g, want_r, want_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        want_s = want_s and s is not None
        if torch.is_grad_enabled():
            mix = ctx.s_scalar if s is None else s.view(-1, 1, 1, 1)
            gg, gr, gs = _graph_grads(lambda: (reference.pixel_mixup(generated, real, mix, mean, std),),
                                      (generated, real, s), (want_g, want_r, want_s), (grad_out,))
            return gg, gr, gs, None, None, None
        gg, gr, gs = bwd(grad_out.contiguous(), generated, real, s, ctx.s_scalar, mean, std, want_g, want_r, want_s)
        return _only(want_g, gg), _only(want_r, gr), _only(want_s, gs), None, None, None
    return backward


def _topk_setup(ctx, inputs, output):
    student, indices, values, target = inputs[:4]
    ctx.save_for_backward(student, indices, values, target, output[1])
    ctx.args = inputs[4:]


def _topk_backward_for(bwd):
    def backward(ctx, grad_loss, grad_stats):
        if grad_loss is None or not ctx.needs_input_grad[0]:  # the stats carry no gradient
            return (None,) * 11
        student, indices, values, target, stats = ctx.saved_tensors
        return (bwd(grad_loss.contiguous(), student, indices, values, target, stats, *ctx.args),) + (None,) * 10
    return backward


def _div_setup(ctx, inputs, output):
    student, teacher, target = inputs[:3]
    ctx.save_for_backward(student, teacher, target, output[1])
    ctx.args = inputs[3:]  # temperature, alpha, ignore_index, t2_scale, divergence, beta


def _div_row_grads(ctx, grad_loss, grad_stats, has_target):
    """The gradient on each row's D and on its CE: through the loss (alpha c D + (1 - alpha) CE, a term of
    weight exactly 0 left out) and through the stats columns D and CE (the parts)."""
    temperature, alpha, _, t2_scale, _, _ = ctx.args
    c = temperature * temperature if t2_scale else 1.0
    g_div = g_ce = None
    if grad_loss is not None:
        g_div = grad_loss * (alpha * c) if alpha != 0 else None
        g_ce = grad_loss * (1 - alpha) if has_target and alpha != 1 else None
    if grad_stats is not None:
        col_d, col_ce = grad_stats[:, DIV_STATS_D], grad_stats[:, DIV_STATS_CE]
        g_div = col_d if g_div is None else g_div + col_d
        g_ce = col_ce if g_ce is None else g_ce + col_ce
    return g_div, g_ce


def _div_backward_for(bwd):
    def backward(ctx, grad_loss, grad_stats):
        if grad_loss is None and grad_stats is None:
            return (None,) * 9
        student, teacher, target, stats = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            col = (lambda k: None) if grad_stats is None else (lambda k: grad_stats[:, k])
            gs, gt = _graph_grads(lambda: divergence_reference.kd_divergence_rows(student, teacher, target, *ctx.args),
                                  (student, teacher), (need_s, need_t),
                                  (grad_loss, col(DIV_STATS_D), col(DIV_STATS_CE)))
            return (gs, gt) + (None,) * 7
        g_div, g_ce = _div_row_grads(ctx, grad_loss, grad_stats, target is not None)
        rows = stats.shape[0]
        g_div = _zeros_rows(stats, rows) if g_div is None else g_div.contiguous()
        g_ce = _zeros_rows(stats, rows) if g_ce is None else g_ce.contiguous()
        temperature, _, ignore_index, _, divergence, beta = ctx.args
        gs, gt = bwd(g_div, g_ce, student, teacher, target, stats, temperature, ignore_index, divergence, beta,
                     need_s, need_t)
        return (gs if need_s else None, gt if need_t else None) + (None,) * 7
    return backward


AUTOGRAD = {
    "kd_loss": (_kd_setup, _kd_backward_for),
    "uncertainty": (_unc_setup, _unc_backward_for),
    "latent_mixup": (_latent_setup, _latent_backward_for),
    "pixel_mixup": (_pixel_setup, _pixel_backward_for),
    "topk_kd_loss": (_topk_setup, _topk_backward_for),
    "kd_divergence": (_div_setup, _div_backward_for),
}


def register(namespace: str, *, fakes: bool) -> None:
    """Attach autograd (and, for opaque ops, fakes) to `torch.ops.<namespace>`; idempotent."""
    ns = getattr(torch.ops, namespace)
    if fakes:
        for name, fake in FAKES.items():
            if (namespace, "fake:" + name) not in _registered:
                torch.library.register_fake(f"{namespace}::{name}", fake)
                _registered.add((namespace, "fake:" + name))
    for family, (setup, backward_for) in AUTOGRAD.items():
        if (namespace, family) in _registered:
            continue
        bwd = getattr(ns, f"{family}_bwd").default
        torch.library.register_autograd(f"{namespace}::{family}_fwd", backward_for(bwd), setup_context=setup)
        _registered.add((namespace, family))


# ---------------------------------------------------------------- the eager fast path

_eager_functions: dict[tuple[str, str], type] = {}


def _eager_function(namespace: str, family: str) -> type:
    """A torch.autograd.Function around the same forward op and the same backward formula as the
    registered autograd. The torch.library autograd wrapper costs ~100 us per forward+backward in eager
    mode (a third of a small KD step on CPU); an autograd.Function costs a few us."""
    key = (namespace, family)
    if key not in _eager_functions:
        ns = getattr(torch.ops, namespace)
        fwd = getattr(ns, f"{family}_fwd").default
        setup, backward_for = AUTOGRAD[family]
        backward_impl = backward_for(getattr(ns, f"{family}_bwd").default)

        class Fused(torch.autograd.Function):
            # The ctx-in-forward form, not forward + setup_context: the latter binds the arguments with
            # inspect.signature on every call (~50 us). torch.func transforms, which need setup_context,
            # never reach this class: backends.select() routes them to the torch backend.
            @staticmethod
            def forward(ctx, *inputs):
                ctx.set_materialize_grads(False)  # unused outputs (the stats) get None, not a zero tensor
                output = fwd(*inputs)
                setup(ctx, inputs, output)
                return output

            @staticmethod
            def backward(ctx, *grads):
                return backward_impl(ctx, *grads)

        Fused.__name__ = f"{namespace}_{family}"
        _eager_functions[key] = Fused
    return _eager_functions[key]


def call(namespace: str, family: str, *inputs):
    """Run `<namespace>::<family>_fwd` with autograd: the registered op while torch.compile traces (so the
    compiler sees the custom op and its registered backward), the autograd.Function in eager mode."""
    if torch.compiler.is_compiling():
        return getattr(getattr(torch.ops, namespace), f"{family}_fwd")(*inputs)
    return _eager_function(namespace, family).apply(*inputs)
