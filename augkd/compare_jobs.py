"""The runs of ``augkd compare``: one per (seed, method), in this process or in N worker processes.

``--jobs 1`` runs them one after another in this process. ``--jobs N`` hands them to N worker processes
(``concurrent.futures.ProcessPoolExecutor`` with the ``spawn`` start method: each worker imports torch
afresh and sets its own thread count from the run's ``threads``). A run's result depends only on its
configuration and the stages it loads, so it is the same in either mode (with the same ``threads``).
Stages shared through the cache are trained once: ``method/stage_lock.py`` makes a second process that
needs a stage wait for the first and then load it.

A failed run does not stop the others; it comes back as a ``Result`` with the error, and the compare
reports it with its (seed, method) and exits non-zero.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Iterator

from .config import build_config
from .errors import RunError
from .report import read_json


class JobsFailed(RunError):
    """Some runs of a compare failed; the message names each by seed and method."""


@dataclass(frozen=True)
class Job:
    seed: int
    method: str
    user: dict[str, Any]  # the run's dotted configuration keys
    run_dir: str
    stage_dirs: dict[str, str]  # shared stages -> their cache directories


@dataclass
class Result:
    summary: dict | None = None
    error: str | None = None  # "<exception type>: <message>" of a failed run
    traceback: str | None = None


SHARED_STAGES = ("teacher", "df", "anchor")


def plan_job(user: dict[str, Any], method: str, seed: int, out: str, shared_teacher: str | None) -> Job:
    """The run of ``method`` with ``seed`` in compare directory ``out`` (its configuration is checked here)."""
    from .method.pipeline import stage_keys

    u = dict(user, method=method, seed=seed)
    if shared_teacher:
        u["teacher.path"] = shared_teacher
    keys = stage_keys(build_config(u))
    cache = os.path.join(out, "cache")
    return Job(seed, method, u, os.path.join(out, f"seed{seed}", method), {s: os.path.join(cache, keys[s]) for s in SHARED_STAGES})


def finished_summary(job: Job) -> dict | None:
    """The summary of a run that finished in an earlier compare, or None."""
    path = os.path.join(job.run_dir, "metrics", "summary.json")
    if not os.path.isfile(path):
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as err:  # damaged: run it again (its stages are on disk)
        print(f"[compare] {path} is unreadable ({err}); running {job.method} again", file=sys.stderr)
        return None


def run_job(job: Job, quiet: bool, resume: bool, *, bars: bool = True) -> dict:
    """Run one job in this process; return its summary."""
    from .method.pipeline import run_method
    from .method.rundir import finish, prepare

    ctx = prepare(build_config(job.user), job.run_dir, quiet=quiet, resume=resume, stage_dirs=job.stage_dirs,
                  allow_existing=True)
    ctx.quiet = ctx.quiet or not bars  # progress bars of several processes would overwrite each other
    try:
        return run_method(ctx)
    finally:
        finish(ctx)


def _run_in_worker(job: Job, quiet: bool, resume: bool) -> Result:
    """A worker's task: the job's summary, or its error as text (any exception object may not pickle)."""
    try:
        return Result(summary=run_job(job, quiet, resume, bars=False))
    except BaseException as err:  # also SystemExit/KeyboardInterrupt: the parent reports it per job
        return Result(error=_describe(err), traceback=traceback.format_exc())


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _spread(jobs: list[Job]) -> list[Job]:
    """Start order that puts runs of different seeds side by side: they share no stage, so fewer
    processes wait on another's shared stage (the i-th run of every seed, then the (i+1)-th ...)."""
    by_seed: dict[int, list[Job]] = {}
    for j in jobs:
        by_seed.setdefault(j.seed, []).append(j)
    out, i = [], 0
    while len(out) < len(jobs):
        out += [runs[i] for runs in by_seed.values() if i < len(runs)]
        i += 1
    return out


def run_jobs(jobs: list[Job], processes: int, *, quiet: bool, resume: bool) -> Iterator[tuple[Job, Result]]:
    """Run ``jobs`` (one after another, or in ``processes`` workers); yield each with its result as it ends."""
    todo = []
    for job in jobs:
        summary = finished_summary(job)
        if summary is not None:
            yield job, Result(summary=summary)
        else:
            todo.append(job)
    if processes <= 1 or len(todo) <= 1:
        for job in todo:
            try:
                result = Result(summary=run_job(job, quiet, resume))
            except Exception as err:
                result = Result(error=_describe(err), traceback=traceback.format_exc())
            yield job, result
        return
    pool = ProcessPoolExecutor(max_workers=min(processes, len(todo)), mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(_run_in_worker, job, quiet, resume): job for job in _spread(todo)}
        for fut in as_completed(futures):
            try:
                result = fut.result()
            except Exception as err:  # the worker process died (killed, out of memory) or the result did not pickle
                result = Result(error=f"its worker process failed ({_describe(err)})")
            yield futures[fut], result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
