"""A second thread for the independent halves of a training step, with the serial order's numbers.

Some steps hold two pieces of work that share nothing: Module 1's student and encoder steps on one
generated batch, Module 3's student forward and the teacher's (no-grad) forward on one batch. On a CPU
with a core to spare beyond the intra-op threads, ``beside`` runs one of them in a worker thread while
the training thread runs the other. Each operator still runs on the same data with the same intra-op
thread count (set in the worker explicitly: a new thread may start from the default), so every number
is what the serial order computes, as long as the two pieces touch disjoint state and only one of them
draws random numbers (each caller's tests check that bit for bit).

On by default where it can pay: a single CPU process whose intra-op threads leave at least as many
cores idle as they use (the run's automatic thread count, half the cores, does). On the quiet 2-core
development machine it took the default job from 111 s to 86 s (bit-identical results; docs/profile.md
section 8); on the same machine under heavy other load, where no core is really free, Module 1 took
8-16% more wall time with it (section 7). AUGKD_SIDE_THREAD=0 turns it off, =1 asks for it wherever a
core is left beyond the intra-op threads. Never with several processes (each DDP forward/backward may
be a collective; two in flight could interleave differently across processes), on other devices (one
stream serialises them anyway), or without a core to spare. `augkd compare --jobs N` (N > 1) turns it
off for its jobs, which share the cores already.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import Callable, TypeVar

import torch

from .context import Context

SIDE_THREAD_ENV = "AUGKD_SIDE_THREAD"  # 0: never, 1: wherever a core is left, unset: the automatic rule

A = TypeVar("A")
B = TypeVar("B")


def side_worker(ctx: Context, name: str) -> ThreadPoolExecutor | None:
    """A one-thread pool for ``beside``, or None where the work is better done in order (see above)."""
    threads = torch.get_num_threads()
    setting = os.environ.get(SIDE_THREAD_ENV, "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"{SIDE_THREAD_ENV} must be 0, 1 or unset, got {setting!r}")
    cores = os.cpu_count() or 1
    # The worker runs with the run's intra-op thread count: on by default only where that many cores idle.
    needed = threads + (1 if setting == "1" else threads)
    if ctx.device.type != "cpu" or ctx.dist.enabled or setting == "0" or cores < needed:
        return None
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"augkd-{name}",
                              initializer=torch.set_num_threads, initargs=(threads,))

def beside(worker: ThreadPoolExecutor | None, main: Callable[[], A], side: Callable[[], B]) -> tuple[A, B]:
    """(main(), side()): ``side`` in ``worker`` while ``main`` runs here, or both here in that order when
    ``worker`` is None. Neither is left running when an error leaves."""
    if worker is None:
        first = main()
        return first, side()
    future = worker.submit(side)
    try:
        first = main()
    except BaseException:
        wait_for([future])
        raise
    return first, future.result()
