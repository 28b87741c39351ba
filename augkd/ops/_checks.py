"""Argument checks shared by the op front-ends. Each error names the argument and what was expected."""

from __future__ import annotations

import math

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
