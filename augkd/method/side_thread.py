"""A second thread for the independent halves of a training step, with the serial order's numbers.

Some steps hold two pieces of work that share nothing: Module 1's student and encoder steps on one
generated batch, Module 3's student forward and the teacher's (no-grad) forward on one batch. On a CPU
with a core to spare beyond the intra-op threads, ``beside`` runs one of them in a worker thread while
the training thread runs the other. Each operator still runs on the same data with the same intra-op
thread count (set in the worker explicitly: a new thread may start from the default), so every number
is what the serial order computes, as long as the two pieces touch disjoint state and only one of them
draws random numbers (each caller's tests check that bit for bit).

Off by default: on this project's 2-core development machine, under other load, Module 1 took 8-16%
more wall and about 12% more CPU time with the worker than without (docs/profile.md section 7); where
a core is really free it may pay. AUGKD_SIDE_THREAD=1 turns it on. Never with several processes (each
DDP forward/backward may be a collective; two in flight could interleave differently across
processes), on other devices (one stream serialises them anyway) or without a core to spare.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import Callable, TypeVar

import torch

from .context import Context

SIDE_THREAD_ENV = "AUGKD_SIDE_THREAD"  # 1: the worker thread where it is allowed (off by default)

A = TypeVar("A")
B = TypeVar("B")


def side_worker(ctx: Context, name: str) -> ThreadPoolExecutor | None:
    """A one-thread pool for ``beside``, or None where the work is better done in order (see above)."""
    threads = torch.get_num_threads()
    if (ctx.device.type != "cpu" or ctx.dist.enabled or os.environ.get(SIDE_THREAD_ENV) != "1"
            or (os.cpu_count() or 1) <= threads):
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
