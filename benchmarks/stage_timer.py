"""Per-stage and per-epoch wall time of an ``augkd run``, split into training, evaluation and the epoch
loop's bookkeeping (finiteness check, CSV, best-weights copy, checkpoint).

It wraps ``run_epochs`` where the stages reach it (the loop module's, which ``run_stage_epochs`` calls,
and each stage module's own import of it), so the method code itself carries no timers.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

# Every module whose global ``run_epochs`` a stage calls: the loop's (through ``run_stage_epochs``) and
# the stage modules that import it directly.
STAGE_MODULES = ("augkd.method.loop", "augkd.method.data_free", "augkd.method.anchor", "augkd.method.mixup",
                 "augkd.method.supervised")


@dataclass
class StageTimes:
    epochs: int = 0
    wall: float = 0.0
    train: float = 0.0
    eval: float = 0.0

    @property
    def bookkeeping(self) -> float:
        return self.wall - self.train - self.eval


@dataclass
class JobTimes:
    stages: dict[str, StageTimes] = field(default_factory=lambda: defaultdict(StageTimes))
    total: float = 0.0  # wall seconds of the whole job
    cpu: float = 0.0  # process CPU seconds (less sensitive to other load on a shared machine)


@contextlib.contextmanager
def timed_stages(times: JobTimes, annotate: bool = False):
    """Inside the block every stage's epochs are timed into ``times``; with ``annotate`` the training
    and evaluation callbacks are also torch.profiler ranges ("<stage>/train", "<stage>/eval")."""
    import importlib

    modules = [m for m in map(importlib.import_module, STAGE_MODULES) if hasattr(m, "run_epochs")]
    originals = {m: m.run_epochs for m in modules}

    def wrap(stage: str, what: str, fn):
        def timed(epoch):
            rec = torch.profiler.record_function(f"{stage}/{what}") if annotate else contextlib.nullcontext()
            t0 = time.perf_counter()
            with rec:
                out = fn(epoch)
            setattr(times.stages[stage], what, getattr(times.stages[stage], what) + time.perf_counter() - t0)
            return out
        return timed

    def make(original):
        def run_epochs(ctx, stage, epochs, **kw):
            kw["train_epoch"] = wrap(stage, "train", kw["train_epoch"])
            kw["evaluate"] = wrap(stage, "eval", kw["evaluate"])
            t0 = time.perf_counter()
            result = original(ctx, stage, epochs, **kw)
            times.stages[stage].wall += time.perf_counter() - t0
            times.stages[stage].epochs += epochs
            return result
        return run_epochs

    for m in modules:
        m.run_epochs = make(originals[m])
    try:
        yield times
    finally:
        for m in modules:
            m.run_epochs = originals[m]
