"""Atomic checkpoint files and the random-number-generator state that makes resume exact.

A checkpoint is written to a temporary file in the same directory and moved into place with
``os.replace``, so a run killed mid-write leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from ..atomic import atomic_path


def atomic_save(obj: Any, path: str) -> None:
    with atomic_path(path, ".pt") as tmp:
        torch.save(obj, tmp)


def load(path: str, device: torch.device | str = "cpu") -> Any:
    # weights_only=False: checkpoints hold optimizer states, RNG states and plain Python metadata that
    # this package wrote itself.
    return torch.load(path, map_location=device, weights_only=False)


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


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, g in (generators or {}).items():
        state["gen:" + name] = g.get_state()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
