"""Backend selection for the fused ops.

Backends (one schema, several implementations side by side), one entry each in `TABLE`:
  triton  Triton kernels (CUDA tensors; CPU tensors too under TRITON_INTERPRET=1, for testing)
  cuda    CUDA C++ kernels from the extension (CUDA tensors)
  cpu     vectorised, multi-threaded C++ kernels from the extension (CPU tensors)
  torch   plain differentiable torch code: runs everywhere, the fallback

"auto" picks per call from the tensors' device: the available backend of lowest `priority` that runs
that device type (CUDA: triton, else cuda, else torch; CPU: cpu, else torch). Override with the
AUGKD_BACKEND environment variable (read at import: the default of every thread) or
`with augkd.ops.use_backend("torch"): ...` (the calling thread only). Asking for a backend that cannot
run raises BackendUnavailable with the reason; "auto" never raises. Calls under a torch.func transform
(grad, vmap, jacrev, ...) or inside a forward-mode AD dual level run the torch backend, whose formulas
every transform understands.

Whether Triton can run is only known by importing its kernels: `load_triton()` is the one place that
imports them and registers their autograd (once per process); the Triton entry's availability probe
calls it. Everything else here only reads the table.
"""

from __future__ import annotations

import contextlib
import enum
import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _extension


class BackendUnavailable(RuntimeError):
    """A backend was requested explicitly but cannot run these inputs."""


class Why(enum.Enum):
    """Why a backend cannot run some tensors."""

    WRONG_DEVICE = "does not run tensors of this device type"
    NO_EXTENSION = "the compiled extension is not loaded"
    NO_CUDA_KERNELS = "the extension was built without CUDA kernels"
    NO_TRITON = "Triton or its kernels cannot be imported"


@dataclass(frozen=True)
class Unavailable:
    """A structured reason: `why` for code, `message` for people (also what str() gives)."""

    why: Why
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Backend:
    """One row of the backend table."""

    name: str
    devices: tuple[str, ...] | None  # device types "auto" gives it (None: any)
    device_note: str  # what the wrong-device message says it runs
    namespace: str | None  # torch.ops namespace of its ops (None: plain torch code)
    probe: Callable[[], Unavailable | None]  # device-independent availability
    priority: int  # "auto" tries lower numbers first
    explicit_devices: Callable[[], tuple[str, ...]] = lambda: ()  # further device types, when asked by name
    without_device: Callable[[], str] = lambda: ""  # status() detail when no such device is visible

    def runs(self, device_type: str, explicit: bool) -> bool:
        return (self.devices is None or device_type in self.devices
                or (explicit and device_type in self.explicit_devices()))

    def why_unavailable(self, device: torch.device) -> Unavailable | None:
        """None when asking for this backend by name can run `device` tensors, else why not."""
        if not self.runs(device.type, explicit=True):
            return Unavailable(Why.WRONG_DEVICE,
                               f"the {self.name} backend runs {self.device_note}; got a {device.type} tensor")
        return self.probe()


# ---------------------------------------------------------------- availability probes

def _extension_probe() -> Unavailable | None:
    if not _extension.LOADED:
        return Unavailable(Why.NO_EXTENSION, f"the extension augkd._C is not loaded ({_extension.WHY_NOT_LOADED})")
    return None


def _cuda_probe() -> Unavailable | None:
    missing = _extension_probe()
    if missing is None and not _extension.BUILT_WITH_CUDA:
        return Unavailable(Why.NO_CUDA_KERNELS,
                           "augkd._C was built without CUDA kernels (nvcc or a CUDA build of torch was missing)")
    return missing


def load_triton() -> str:
    """Import the Triton kernels (registering augkd_triton::*) and attach their autograd: '' when that
    worked, else why not. The one place that imports Triton; idempotent, and never raises."""
    # Imported on first use: importing triton costs time that CPU-only users should not pay.
    from . import _registration

    try:
        from . import triton_kernels
    except Exception as exc:  # a broken backend package must not take the other backends down
        return f"augkd.ops.triton_kernels failed to import: {type(exc).__name__}: {exc}"
    if not triton_kernels.AVAILABLE:
        return triton_kernels.WHY_UNAVAILABLE
    # triton_op bodies are traceable, so they need no fake implementation, only autograd.
    _registration.register("augkd_triton", fakes=False)
    return ""


# Importing triton and registering the autograd of its ops cannot be traced by torch.compile, and the
# first op call of a process may well be inside a compiled function: the compiler runs this function as
# plain Python at trace time and keeps its answer (a string: a constant it can hold) as a constant.
# `torch.compiler.assume_constant_result` does nothing but set this mark, yet calling it imports
# torch._dynamo (~1.5 s added to `import augkd.ops`), so the mark is set directly;
# tests/test_backend_threads.py compiles a first call in a fresh process.
load_triton._dynamo_marked_constant = True


def _triton_probe() -> Unavailable | None:
    missing = load_triton()
    return Unavailable(Why.NO_TRITON, f"triton is unavailable: {missing}") if missing else None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_without_device() -> str:
    missing = load_triton()
    return "triton " + (f"missing ({missing})" if missing else "importable")


TABLE: dict[str, Backend] = {b.name: b for b in (
    Backend("triton", ("cuda",), "CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)", "augkd_triton",
            _triton_probe, 0, explicit_devices=lambda: ("cpu",) if _interpreting() else (),
            without_device=_triton_without_device),
    Backend("cuda", ("cuda",), "CUDA tensors", "augkd", _cuda_probe, 1,
            without_device=lambda: "CUDA kernels " + ("compiled in" if _extension.BUILT_WITH_CUDA else "not built")),
    Backend("cpu", ("cpu",), "CPU tensors", "augkd", _extension_probe, 2),
    Backend("torch", None, "tensors of any device", None, lambda: None, 99),
)}
_AUTO_ORDER = tuple(sorted(TABLE.values(), key=lambda b: b.priority))
BACKENDS = tuple(TABLE)
CHOICES = ("auto",) + BACKENDS


# ---------------------------------------------------------------- the requested backend, per thread

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


# ---------------------------------------------------------------- choosing

def _entry(backend: str) -> Backend:
    try:
        return TABLE[backend]
    except KeyError:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}") from None


def why_unavailable(backend: str, device: torch.device) -> Unavailable | None:
    """None when `backend` can run tensors on `device`, else the reason it cannot."""
    return _entry(backend).why_unavailable(device)


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
    for entry in _AUTO_ORDER:
        if entry.runs(device.type, explicit=False) and entry.probe() is None:
            return entry.name
    return "torch"


def namespace(backend: str) -> str:
    """Name of the torch.ops namespace of a kernel backend (augkd_triton, or augkd for the C++ ones).
    The front ends call it with what select() returned, which has loaded the backend."""
    entry = _entry(backend)
    if entry.namespace is None:
        raise ValueError(f"the {backend} backend runs plain torch code and has no ops namespace")
    return entry.namespace


def load(backend: str):
    """The torch.ops namespace of a kernel backend, its ops registered (Triton: loaded on first use);
    BackendUnavailable when they cannot be."""
    if backend == "triton":
        missing = load_triton()
        if missing:
            raise BackendUnavailable(f"backend 'triton' cannot run: {missing}")
    return getattr(torch.ops, namespace(backend))


# ---------------------------------------------------------------- python -m augkd.ops

@dataclass
class BackendStatus:
    name: str
    device: str
    available: bool
    detail: str


def status() -> list[BackendStatus]:
    """Availability of each backend on each device type this machine has."""
    rows = []
    gpu = torch.cuda.is_available()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if gpu else [])
    for entry in TABLE.values():
        for device in devices:
            reason = why_unavailable(entry.name, device)
            if reason is not None and reason.why is Why.WRONG_DEVICE:
                continue  # the backend does not target this device type at all
            rows.append(BackendStatus(entry.name, device.type, reason is None, str(reason or "ready")))
    if not gpu:
        for entry in TABLE.values():
            if entry.devices is not None and "cuda" in entry.devices and not any(r.name == entry.name for r in rows):
                rows.append(BackendStatus(entry.name, "cuda", False,
                                          "no CUDA device visible; " + entry.without_device()))
    return rows
