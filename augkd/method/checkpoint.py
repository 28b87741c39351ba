"""Checkpoint files and the random-number-generator state that makes resume exact.

A checkpoint is written to a temporary file in the same directory and moved into place with
``os.replace``, so a run killed mid-write leaves either the old file or the new one, never half of one.
Resumable checkpoints keep one generation back (``<name>.prev.pt``): when the newest is damaged, the
run continues from the one before. Every file is read with ``torch.load(weights_only=True)``, so a
file placed in a run directory cannot execute code; RNG states are stored as tensors and plain types
for that reason.
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import CheckpointError


def previous_path(path: str) -> str:
    """Where the generation before ``path`` is kept: ``x_state.pt`` -> ``x_state.prev.pt``."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def atomic_save(obj: Any, path: str, *, keep_previous: bool = False) -> None:
    """Write ``obj`` to ``path`` atomically; with ``keep_previous`` the file it replaces becomes
    ``previous_path(path)`` (a kill between the two renames leaves the previous one, never nothing)."""
    with atomic_path(path, ".pt") as tmp:
        torch.save(obj, tmp)
        if keep_previous and os.path.isfile(path):
            os.replace(path, previous_path(path))


def load(path: str, device: torch.device | str = "cpu") -> Any:
    """Read a checkpoint this package wrote, safely (weights_only); errors name the file and the fault."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refused: the file holds objects other than tensors and plain containers, which only "
            f"a pickle that runs code can restore ({first}); it was not written by this version of augkd"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first})") from None


def load_with_fallback(path: str, device: torch.device | str, warn: Callable[[str], None],
                       check: Callable[[Any, str], None] | None = None) -> Any | None:
    """The newest intact generation of a resumable checkpoint: ``path``, else ``previous_path(path)``.

    ``check(state, file)`` may raise CheckpointError for content that is readable but unusable. Returns
    None when neither file exists; raises CheckpointError naming both files when neither is usable.
    """
    prev = previous_path(path)
    problems = []
    for i, candidate in enumerate((path, prev)):
        if not os.path.isfile(candidate):
            continue
        try:
            state = load(candidate, device)
            if check is not None:
                check(state, candidate)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems:
            warn(f"{problems[0]}; continuing from the previous checkpoint {candidate}")
        return state
    if problems:
        raise CheckpointError("no usable checkpoint: " + "; ".join(problems))
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def stage_seed(seed: int, stage: str) -> int:
    """A seed per (run seed, stage): each stage starts from a known RNG state, whatever ran before it.

    That keeps a stage's result a function of its inputs and the seed, so a resumed run (which skips
    finished stages) and an uninterrupted run agree, and so do cached and fresh stage outputs.
    """
    h = 0
    for ch in stage:
        h = (h * 131 + ord(ch)) % 1_000_003
    return (seed * 1_000_003 + h) % (2**31 - 1)


def seed_stage(run_seed: int, stage: str) -> int:
    """Seed Python, NumPy and torch for ``stage`` (``stage_seed``) and return that seed: the one way a
    stage's code takes its randomness (network initialisation "<stage>-init", training "<stage>")."""
    seed = stage_seed(run_seed, stage)
    seed_everything(seed)
    return seed


@dataclass
class StageRandom:
    """A training stage's randomness: its seed, a generator drawn alike in every process (epoch order) and
    one per process (augmentation, noise; the same generator when there is one process)."""

    seed: int
    shared: torch.Generator
    local: torch.Generator


def stage_random(run_seed: int, stage: str, device: torch.device, dist) -> StageRandom:
    seed = seed_stage(run_seed, stage)
    shared = make_generator(device, seed)
    return StageRandom(seed, shared, per_process_generator(dist, shared, seed))


def _numpy_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_state(s: dict[str, Any]) -> None:
    keys = s["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((s["kind"], keys, s["pos"], s["has_gauss"], s["cached_gaussian"]))


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG state as tensors and plain types (loadable with weights_only=True)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, g in (generators or {}).items():
        state["gen:" + name] = g.get_state()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    for name, g in (generators or {}).items():
        g.set_state(state["gen:" + name].cpu())


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def per_process_generator(dist, shared: torch.Generator, seed: int) -> torch.Generator:
    """The generator for per-process randomness (augmentation, per-sample noise, synthetic batches):
    ``shared`` itself with one process, so single-process runs draw exactly what they always did; with
    several (torchrun), a stream of its own per rank."""
    if not dist.enabled:
        return shared
    return make_generator(shared.device, (seed * 7919 + 104729 * (dist.rank + 1)) % (2**63 - 1))


def distinct_generators(**named: torch.Generator) -> dict[str, torch.Generator]:
    """The generators to checkpoint, each once: a per-process generator that is the shared one (a single
    process) is not saved twice under a second name, so single-process checkpoints keep their keys."""
    out: dict[str, torch.Generator] = {}
    for name, g in named.items():
        if all(g is not h for h in out.values()):
            out[name] = g
    return out


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state (for the in-memory "best epoch" snapshot)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
