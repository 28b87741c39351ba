"""Load the compiled extension `augkd._C` once.

A missing or broken extension must not break `import augkd`: every op then runs on the torch backend,
and one warning says why (an ImportError from a stale build, a torch ABI mismatch, ...).
"""

from __future__ import annotations

import importlib
import warnings

import torch

LOADED: bool = False
WHY_NOT_LOADED: str = ""
BUILT_WITH_CUDA: bool = False
PATH: str = ""

try:
    _module = importlib.import_module("augkd._C")
    PATH = getattr(_module, "__file__", "") or ""
    LOADED = True
    BUILT_WITH_CUDA = bool(torch.ops.augkd.built_with_cuda())
except Exception as exc:  # any failure to load means "fall back", never "crash on import"
    WHY_NOT_LOADED = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "augkd: the compiled extension augkd._C could not be loaded "
        f"({WHY_NOT_LOADED}); every op falls back to the torch backend. "
        "Rebuild with `pip install --no-build-isolation -e .` to get the fused kernels.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_cuda_kernel(op_name: str) -> bool:
    """Whether the loaded extension registered a CUDA kernel for `augkd::<op_name>`."""
    if not LOADED:
        return False
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"augkd::{op_name}", "CUDA"))
