"""What defines one op: its schemas, fakes, autograd glue, which inputs take gradients, its torch formula
and a few small inputs. Every layer reads the op from here (the C++ schemas are checked against it by
tests/test_op_specs.py, which reads csrc/schemas.cpp as text)."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..reference import compute_dtype


@dataclass(frozen=True)
class OpSpec:
    """One op family: `<family>_fwd` computes, `<family>_bwd` is its backward (not differentiable itself)."""

    family: str
    fwd_schema: str  # "(args) -> returns" exactly as in csrc/schemas.cpp, without the op name
    bwd_schema: str
    grad_inputs: tuple[str, ...]  # forward inputs the kernels differentiate (a "<name>_grad" flag each, if any)
    reference: str  # "module:function": the torch formula of the forward (the torch backend, the tests' oracle)
    fake_fwd: Callable  # shapes and dtypes only, for torch.compile / FakeTensor
    fake_bwd: Callable
    setup_context: Callable  # (ctx, inputs, output): what the backward keeps
    backward_for: Callable  # bwd op -> backward(ctx, *grad_outputs) routing to it
    samples: Callable[[bool], list]  # (requires_grad) -> small forward argument tuples for opcheck
    public: str = ""  # the augkd.ops function users call, when it is not named after the family

    @property
    def public_name(self) -> str:
        return self.public or self.family

    @property
    def fwd(self) -> str:
        return f"{self.family}_fwd"

    @property
    def bwd(self) -> str:
        return f"{self.family}_bwd"

    @property
    def schemas(self) -> dict[str, str]:
        return {self.fwd: self.fwd_schema, self.bwd: self.bwd_schema}

    @property
    def fakes(self) -> dict[str, Callable]:
        return {self.fwd: self.fake_fwd, self.bwd: self.fake_bwd}

    def input_names(self, which: str = "fwd") -> tuple[str, ...]:
        """The argument names of the forward ("fwd") or backward ("bwd") schema."""
        schema = self.fwd_schema if which == "fwd" else self.bwd_schema
        args = schema[schema.index("(") + 1:schema.index(")")]
        return tuple(re.split(r"\s+", a.strip())[-1] for a in args.split(",") if a.strip())

    def reference_function(self) -> Callable:
        return resolve(self.reference)


def resolve(reference: str) -> Callable:
    """The function a "module:function" string names (imported on use: no import cycle with the ops)."""
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------- helpers the backward formulas share

def loss_and_stats(student: torch.Tensor, n_stats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fake forward of the row KD ops: loss (B,) and stats (B, n_stats) in the compute dtype."""
    acc, rows = compute_dtype(student.dtype), student.shape[0]
    return student.new_empty((rows,), dtype=acc), student.new_empty((rows, n_stats), dtype=acc)


def student_teacher_target(grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample inputs of the KD ops: student and teacher logits (5, 13), targets with one ignored row."""
    s = torch.randn(5, 13, requires_grad=grad)
    t = torch.randn(5, 13, requires_grad=grad)
    return s, t, torch.tensor([0, 3, -100, 12, 7])


def zeros_rows(like: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.zeros((rows,), dtype=like.dtype, device=like.device)


def grad_or_empty(wanted: bool, like: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """A fake gradient: a *_bwd op returns an empty (0,) tensor for each gradient its flags did not ask for."""
    return torch.empty_like(like) if wanted else fallback.new_empty((0,))


def only(wanted: bool, grad: torch.Tensor):
    """The gradient when it was asked for, else None (the op returned an empty placeholder)."""
    return grad if wanted else None


def graph_grads(compute, inputs, wanted, grad_outputs):
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


def student_teacher_backward(bwd, n_inputs: int, reference: str, graph_grad_outputs, run_bwd):
    """backward(ctx, grad_loss, grad_stats) of an op (student, teacher, target, *args) -> (loss, stats) whose
    setup_context saved (student, teacher, target, stats) and ctx.args, with gradients for student and
    teacher only. Under grad mode (double backward) the graph of the torch formula `reference`
    ("module:function", called on the saved inputs and ctx.args), weighted by
    graph_grad_outputs(grad_loss, grad_stats); else run_bwd(bwd, ctx, grad_loss, grad_stats, need_student,
    need_teacher) -> (grad_student, grad_teacher) calls the kernels' bwd op."""
    def backward(ctx, grad_loss, grad_stats):
        if grad_loss is None and grad_stats is None:
            return (None,) * n_inputs
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            student, teacher, target, _ = ctx.saved_tensors
            formula = resolve(reference)
            gs, gt = graph_grads(lambda: formula(student, teacher, target, *ctx.args), (student, teacher),
                                 (need_s, need_t), graph_grad_outputs(grad_loss, grad_stats))
        else:
            gs, gt = run_bwd(bwd, ctx, grad_loss, grad_stats, need_s, need_t)
        return (gs if need_s else None, gt if need_t else None) + (None,) * (n_inputs - 2)
    return backward
