"""fused_linear_kd_loss under torch.compile: the chunked sweep as two opaque custom ops (forward with the
gradients, and the per-row backward of reduction "none"), so that a compiled graph holds the whole loss with no
graph break. The compiler sees only their shapes (the fakes below); the chunk loop runs as in eager mode.

(No ``from __future__ import annotations`` here: torch.library.custom_op reads the annotations as types.)
"""

from typing import Optional

import torch
from torch import Tensor

from .fused_linear_kd import _Config, _scale, _sweep

NAMESPACE = "augkd_fused"


def _config(x_s: Tensor, temperature, alpha, ignore_index, t2_scale, divergence, beta, reduction, chunk,
            vocab_chunk, want):
    acc = torch.float64 if x_s.dtype == torch.float64 else torch.float32
    return _Config(temperature, alpha, ignore_index, t2_scale, divergence, beta, reduction, chunk, vocab_chunk, acc,
                   tuple(want))


def _with_autograd(fn):
    """Run fn with autograd dispatch back on: a custom op's body runs below the autograd keys, but the sweep
    differentiates each chunk's loss w.r.t. its logits with torch.autograd (the logits are leaves made inside,
    so nothing outside the op is recorded)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    exclude = exclude.remove(torch._C.DispatchKey.AutogradFunctionality).remove(torch._C.DispatchKey.ADInplaceOrView)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        return fn()


def _or_empty(grads, like: Tensor) -> list:
    return [like.new_empty((0,)) if g is None else g for g in grads]


@torch.library.custom_op(f"{NAMESPACE}::fused_linear_kd_fwd", mutates_args=())
def fused_linear_kd_fwd(x_s: Tensor, w_s: Tensor, b_s: Optional[Tensor], x_t: Tensor, w_t: Tensor,
                        b_t: Optional[Tensor], target: Optional[Tensor], temperature: float, alpha: float,
                        ignore_index: int, t2_scale: bool, divergence: str, beta: float, reduction: str, chunk: int,
                        vocab_chunk: int, want: list[bool], batch: int) -> list[Tensor]:
    """[loss, then the gradients of (x_s, w_s, b_s, x_t, w_t, b_t) that `want` asks for (scalar reductions;
    (0,) otherwise)]: the loss is the rows for "none", else their reduction."""
    cfg = _config(x_s, temperature, alpha, ignore_index, t2_scale, divergence, beta, reduction, chunk, vocab_chunk,
                  want)
    if reduction == "none" or not any(want):
        rows, _ = _sweep(cfg, x_s, w_s, b_s, x_t, w_t, b_t, target, None)
        loss = rows if reduction == "none" else rows.sum() * _scale(cfg, x_s.shape[0], batch, target)
        return [loss] + _or_empty((None,) * 6, x_s)
    scale = _scale(cfg, x_s.shape[0], batch, target)
    row_grad = scale if isinstance(scale, Tensor) else torch.tensor(scale, dtype=cfg.acc, device=x_s.device)
    rows, grads = _with_autograd(lambda: _sweep(cfg, x_s, w_s, b_s, x_t, w_t, b_t, target, row_grad))
    return [rows.sum() * row_grad] + _or_empty(grads, x_s)


@fused_linear_kd_fwd.register_fake
def _fwd_fake(x_s, w_s, b_s, x_t, w_t, b_t, target, temperature, alpha, ignore_index, t2_scale, divergence, beta,
              reduction, chunk, vocab_chunk, want, batch):
    acc = torch.float64 if x_s.dtype == torch.float64 else torch.float32
    loss = x_s.new_empty((x_s.shape[0],) if reduction == "none" else (), dtype=acc)
    grads = [torch.empty_like(t) if w and t is not None and reduction != "none" else x_s.new_empty((0,))
             for t, w in zip((x_s, w_s, b_s, x_t, w_t, b_t), want)]
    return [loss] + grads


@torch.library.custom_op(f"{NAMESPACE}::fused_linear_kd_bwd_rows", mutates_args=())
def fused_linear_kd_bwd_rows(row_grad: Tensor, x_s: Tensor, w_s: Tensor, b_s: Optional[Tensor], x_t: Tensor,
                             w_t: Tensor, b_t: Optional[Tensor], target: Optional[Tensor], temperature: float,
                             alpha: float, ignore_index: int, t2_scale: bool, divergence: str, beta: float,
                             reduction: str, chunk: int, vocab_chunk: int, want: list[bool]) -> list[Tensor]:
    """The gradients that `want` asks for, given dL/dloss_i per row (reduction "none"): the sweep again."""
    cfg = _config(x_s, temperature, alpha, ignore_index, t2_scale, divergence, beta, reduction, chunk, vocab_chunk,
                  want)
    _, grads = _with_autograd(lambda: _sweep(cfg, x_s, w_s, b_s, x_t, w_t, b_t, target, row_grad))
    return _or_empty(grads, x_s)


@fused_linear_kd_bwd_rows.register_fake
def _bwd_rows_fake(row_grad, x_s, w_s, b_s, x_t, w_t, b_t, target, *args):
    want = args[-1]
    return [torch.empty_like(t) if w and t is not None else x_s.new_empty((0,))
            for t, w in zip((x_s, w_s, b_s, x_t, w_t, b_t), want)]


def _setup(ctx, inputs, output):
    ctx.args = inputs[7:]  # temperature .. batch
    if inputs[13] == "none":
        ctx.save_for_backward(*inputs[:7])
    else:
        ctx.save_for_backward(*output[1:])


def _backward(ctx, grads):
    g = grads[0]
    want = ctx.args[9]
    if ctx.args[6] == "none":
        out = fused_linear_kd_bwd_rows(g.contiguous(), *ctx.saved_tensors, *ctx.args[:10])
    else:
        out = [t * g for t in ctx.saved_tensors]
    return tuple(o if w else None for o, w in zip(out, want)) + (None,) * 12


fused_linear_kd_fwd.register_autograd(_backward, setup_context=_setup)


def call(x_s, w_s, b_s, x_t, w_t, b_t, target, cfg: _Config, batch: int) -> Tensor:
    """The loss of fused_linear_kd_loss (flattened inputs) through the custom op, for traced code."""
    return fused_linear_kd_fwd(x_s, w_s, b_s, x_t, w_t, b_t, target, cfg.temperature, cfg.alpha, cfg.ignore_index,
                               cfg.t2_scale, cfg.divergence, cfg.beta, cfg.reduction, cfg.chunk, cfg.vocab_chunk,
                               list(cfg.want),
                               batch)[0]
