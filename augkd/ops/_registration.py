"""Attach the fakes and autograd formulas of `specs` to every namespace that implements the schemas:
`augkd` (C++ CPU/CUDA) and `augkd_triton` (Triton), and call the ops with autograd.

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

from .specs import SPECS

_registered: set[tuple[str, str]] = set()


def register(namespace: str, *, fakes: bool) -> None:
    """Attach autograd (and, for opaque ops, fakes) to `torch.ops.<namespace>`; idempotent."""
    ns = getattr(torch.ops, namespace)
    for spec in SPECS.values():
        if fakes:
            for name, fake in spec.fakes.items():
                if (namespace, "fake:" + name) not in _registered:
                    torch.library.register_fake(f"{namespace}::{name}", fake)
                    _registered.add((namespace, "fake:" + name))
        if (namespace, spec.family) in _registered:
            continue
        bwd = getattr(ns, spec.bwd).default
        torch.library.register_autograd(f"{namespace}::{spec.fwd}", spec.backward_for(bwd),
                                        setup_context=spec.setup_context)
        _registered.add((namespace, spec.family))


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
        spec = SPECS[family]
        setup = spec.setup_context
        backward_impl = spec.backward_for(getattr(ns, spec.bwd).default)

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
