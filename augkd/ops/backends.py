"""Backend selection for the fused ops.

Backends (one schema, several implementations side by side):
  triton  Triton kernels (CUDA tensors; CPU tensors too under TRITON_INTERPRET=1, for testing)
  cuda    CUDA C++ kernels from the extension (CUDA tensors)
  cpu     vectorised, multi-threaded C++ kernels from the extension (CPU tensors)
  torch   plain differentiable torch code: runs everywhere, the fallback

"auto" picks per call from the tensors' device: CUDA -> triton, else cuda, else torch;
CPU -> cpu, else torch. Override with the AUGKD_BACKEND environment variable (read at import: the
default of every thread) or `with augkd.ops.use_backend("torch"): ...` (the calling thread only).
Asking for a backend that cannot run raises BackendUnavailable with the reason; "auto" never raises.
Calls under a torch.func transform (grad, vmap, jacrev, ...) or inside a forward-mode AD dual level
run the torch backend, whose formulas every transform understands.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _extension

BACKENDS = ("triton", "cuda", "cpu", "torch")
CHOICES = ("auto",) + BACKENDS


class BackendUnavailable(RuntimeError):
    """A backend was requested explicitly but cannot run these inputs."""


def _parse(name: str, source: str) -> str:
    value = name.strip().lower()
    if value not in CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(CHOICES)}; got {name!r}")
    return value


_default: str = _parse(os.environ.get("AUGKD_BACKEND", "auto") or "auto", "AUGKD_BACKEND")
# use_backend() changes the backend of the thread that holds the context only: a worker thread (a data
# loader's pin-memory thread, a serving thread) keeps its own choice.
class _PerThread(threading.local):
    def __init__(self):
        self.name = _default  # runs once in each thread that reads it


_per_thread = _PerThread()


def requested() -> str:
    """The backend asked for now in this thread: 'auto' or a backend name."""
    return _per_thread.name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend `name` ('auto', 'triton', 'cuda', 'cpu', 'torch').

    The choice holds for the calling thread only; other threads keep theirs (AUGKD_BACKEND by default).
    """
    chosen = _parse(name, "use_backend(name)")
    previous = requested()
    _per_thread.name = chosen
    try:
        yield
    finally:
        _per_thread.name = previous


class _TritonMissing:
    AVAILABLE = False

    def __init__(self, why: str):
        self.WHY_UNAVAILABLE = why


def _triton_module():
    # Imported on first use: importing triton costs time that CPU-only users should not pay.
    from . import _registration

    try:
        from . import triton as triton_backend
    except Exception as exc:  # a broken backend package must not take the other backends down
        return _TritonMissing(f"augkd.ops.triton failed to import: {type(exc).__name__}: {exc}")
    if triton_backend.AVAILABLE:
        # triton_op bodies are traceable, so they need no fake implementation, only autograd.
        _registration.register("augkd_triton", fakes=False)
    return triton_backend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_unavailable() -> str:
    """'' when the Triton ops are imported and registered, else why they cannot be."""
    module = _triton_module()
    return "" if module.AVAILABLE else module.WHY_UNAVAILABLE


# Importing triton and registering the autograd of its ops cannot be traced by torch.compile, and the
# first op call of a process may well be inside a compiled function: the compiler runs this check as
# plain Python at trace time and keeps its answer as a constant. `torch.compiler.assume_constant_result`
# does nothing but set this mark, yet calling it imports torch._dynamo (~1.5 s added to `import augkd.ops`),
# so the mark is set directly; tests/test_backend_threads.py compiles a first call in a fresh process.
_triton_unavailable._dynamo_marked_constant = True


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run tensors on `device`, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs CPU tensors; got a {device.type} tensor"
        if not _extension.LOADED:
            return f"the extension augkd._C is not loaded ({_extension.WHY_NOT_LOADED})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors; got a {device.type} tensor"
        if not _extension.LOADED:
            return f"the extension augkd._C is not loaded ({_extension.WHY_NOT_LOADED})"
        if not _extension.BUILT_WITH_CUDA:
            return "augkd._C was built without CUDA kernels (nvcc or a CUDA build of torch was missing)"
        return None
    if backend == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
            return (f"the triton backend runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1); "
                    f"got a {device.type} tensor")
        why = _triton_unavailable()
        if why:
            return f"triton is unavailable: {why}"
        return None
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def select(device: torch.device) -> str:
    """The backend that runs the next op call on `device` in this thread."""
    name = requested()
    if name != "auto":
        reason = why_unavailable(name, device)
        if reason is not None:
            raise BackendUnavailable(f"backend {name!r} was requested but cannot run: {reason}")
    if not torch.compiler.is_compiling() and (torch._C._are_functorch_transforms_active()
                                               or _forward_ad._current_level >= 0):
        # torch.func.grad / vmap / jacrev / jvp, or forward-mode AD with dual tensors: the fused kernels
        # have no batching or forward-mode rules
        return "torch"
    if name != "auto":
        return name
    order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
    for backend in order:
        if why_unavailable(backend, device) is None:
            return backend
    return "torch"


def ops_namespace(backend: str):
    """torch.ops namespace holding the backend's registered ops (triton and C++ backends)."""
    return getattr(torch.ops, namespace_name(backend))


def namespace_name(backend: str) -> str:
    """Name of the torch.ops namespace of a kernel backend: augkd_triton or augkd (C++ CPU/CUDA)."""
    if backend == "triton":
        _triton_unavailable()  # imports and registers the Triton ops on first use
        return "augkd_triton"
    return "augkd"


@dataclass
class BackendStatus:
    name: str
    device: str
    available: bool
    detail: str


def status() -> list[BackendStatus]:
    """Availability of each backend on each device type this machine has."""
    rows = []
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for backend in BACKENDS:
        for device in devices:
            reason = why_unavailable(backend, device)
            if reason is not None and "runs " in reason and "got a" in reason:
                continue  # backend does not target this device type at all
            rows.append(BackendStatus(backend, device.type, reason is None, reason or "ready"))
    if not torch.cuda.is_available():
        for backend in ("triton", "cuda"):
            if not any(r.name == backend for r in rows):
                detail = "no CUDA device visible"
                if backend == "cuda":
                    detail += "; CUDA kernels " + ("compiled in" if _extension.BUILT_WITH_CUDA else "not built")
                else:
                    module = _triton_module()
                    detail += "; triton " + ("importable" if module.AVAILABLE else f"missing ({module.WHY_UNAVAILABLE})")
                rows.append(BackendStatus(backend, "cuda", False, detail))
    return rows
