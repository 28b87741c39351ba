"""The lock of a shared stage directory: one process computes a shared stage, the others wait and load it.

``augkd compare`` points the teacher, Module 1 and Module 2 of its runs at a stage cache
(``<out>/cache/<stage>-<digest>``). With ``--jobs N`` several runs, each in its own process, may need
the same stage at once. ``restore_or_train`` holds this lock (an exclusive ``flock`` on
``<stage dir>/.stage.lock``) from its look for the finished artefact until the artefact is written, so
the first process trains the stage and every later one finds the artefact and loads it: a shared stage
is trained once, never raced. The operating system drops the lock when its process dies, so a killed
job leaves no stale lock behind (its last checkpoint is there for ``--resume``).

A job holds at most one stage lock at a time and takes them in pipeline order, so jobs cannot deadlock.
Only the holder writes into a stage directory, which makes it safe for the holder to delete temporaries
that a killed writer left there.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator

from ..atomic import default_file_mode, remove_stale_temporaries
from .context import Context

NAME = ".stage.lock"


@contextlib.contextmanager
def holding(ctx: Context, stage: str) -> Iterator[None]:
    """Hold the lock of ``stage``'s directory when it is a shared one (``ctx.stage_dirs``); else nothing."""
    directory = ctx.stage_dirs.get(stage)
    if directory is None or ctx.dist.enabled:  # a run's own checkpoints/ (torchrun jobs never share a cache)
        yield
        return
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, NAME), os.O_RDWR | os.O_CREAT, default_file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            ctx.log.info("%s: another job is computing this shared stage in %s; waiting for it", stage, directory)
            fcntl.flock(fd, fcntl.LOCK_EX)
        stale = remove_stale_temporaries(directory)
        if stale:
            ctx.log.info("removed %d temporary file(s) left by an interrupted write: %s", len(stale), ", ".join(stale))
        yield
    finally:
        os.close(fd)  # closing the only descriptor of the open file releases its flock
