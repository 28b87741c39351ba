"""Argument checks shared by the op front-ends. Each error names the argument and what was expected."""

from __future__ import annotations

import math
import operator

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(op: str, name: str, value, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor (float16, bfloat16, float32 or float64), "
                        f"got {value.dtype}")
    return value


def same(op: str, name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor, *,
         shape: bool = True, dtype: bool = True) -> None:
    if value.device != ref.device:
        raise ValueError(f"{op}: {name} must be on the same device as {ref_name} ({ref.device}), "
                         f"got {value.device}")
    if dtype and value.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} must have the same dtype as {ref_name} ({ref.dtype}), got {value.dtype}")
    if shape and value.shape != ref.shape:
        raise ValueError(f"{op}: {name} must have the same shape as {ref_name} {tuple(ref.shape)}, "
                         f"got {tuple(value.shape)}")


INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def ignore_index(op: str, value) -> tuple[int, bool]:
    """(the int64 the kernels compare labels with, whether `value` was outside int64). Labels are int64, so
    an ignore_index outside that range matches no row: it is passed on as INT64_MIN, a label no valid
    target can hold (the front ends reject negative labels on CPU)."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: ignore_index must be an int, got bool")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: ignore_index must be an int, got {type(value).__name__}") from None
    if INT64_MIN <= number <= INT64_MAX:
        return number, False
    return INT64_MIN, True


def hard_target(op: str, target, alpha, lead, device, *, what: str = "class indices", hint: str = "") -> None:
    """The hard-label target of a KD loss: None only when alpha = 1 (no CE term), else an integer tensor
    of shape `lead` on `device`."""
    if target is None:
        if isinstance(alpha, torch.Tensor):
            raise ValueError(f"{op}: an alpha that requires grad needs a target: its gradient is the KL term "
                             "minus the hard-label CE; pass target=... or a float alpha=1.0")
        if alpha != 1.0:
            raise ValueError(f"{op}: alpha={alpha} mixes in the hard-label CE, which needs a target; "
                             "pass target=... or alpha=1.0")
        return
    tensor(op, "target", target, floating=False)
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{op}: target must be an integer tensor of {what}, got {target.dtype}")
    if target.shape != lead:
        raise ValueError(f"{op}: target must have shape {tuple(lead)}{hint}, got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"{op}: target must be on {device}, got {target.device}")


def labels_in_range(op: str, target: torch.Tensor, classes: int, ignore: int, shown_ignore, what: str) -> None:
    """Reject labels outside [0, classes) that are not `ignore`. Reading them is a host sync on GPUs, so
    only CPU tensors in eager mode are read (elsewhere the kernels give such a row NaN)."""
    if not (eager() and not transformed() and target.device.type == "cpu" and target.numel()):
        return
    y = target.detach().reshape(-1).to(torch.int64)
    bad = ((y < 0) | (y >= classes)) & (y != ignore)
    if bool(bad.any()):
        raise ValueError(f"{op}: target holds {what} {int(y[bad][0])}, outside [0, {classes}) "
                         f"(and not ignore_index={shown_ignore})")


def transformed() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, ...) is active around this call."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def scalar_parameter(op: str, name: str, value, check):
    """A float hyper-parameter that may also come as a one-element tensor. `check(op, name, number)`
    validates the number and returns it as a float.

    A tensor that requires grad (or any tensor under a torch.func transform, which may be differentiating
    through it) is returned as a 0-dim tensor, so the op can be differentiated with respect to it; any
    other tensor becomes a float. Never a silent detach."""
    if not isinstance(value, torch.Tensor):
        return check(op, name, value)
    if value.numel() != 1:
        raise ValueError(f"{op}: {name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
    if not (value.requires_grad or transformed()):
        return check(op, name, value.item())
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor to take a gradient, got {value.dtype}")
    if eager() and not transformed():
        check(op, name, value.detach().item())  # the range check reads the value
    return value.reshape(())


def positive_float(op: str, name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value!r}")
    return number


def unit_float(op: str, name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}") from None
    if not (0.0 <= number <= 1.0):
        raise ValueError(f"{op}: {name} must be in [0, 1], got {value!r}")
    return number


def choice(op: str, name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{op}: {name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def eager() -> bool:
    """Value checks read tensor contents (a host sync): only in eager mode, never while compiling."""
    return not torch.compiler.is_compiling()
