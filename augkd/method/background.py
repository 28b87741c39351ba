"""Writing a stage's per-epoch files (metrics CSV, resumable checkpoint) while the next epoch trains.

Each write is an atomic, fsync'ed replace (``augkd.atomic``), which costs tens of milliseconds of disk
wait per file; the stages with hundreds of one-step epochs spent a tenth of their time there. The
writer takes a snapshot of what is to be written (tensors copied, containers rebuilt), so training can
change the live objects at once, and writes it in a background thread. One write is in flight at a
time: the next ``submit`` and ``wait`` first finish the previous one and re-raise its error, so every
epoch's files are still written, in order, and nothing is lost when a stage ends or fails.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch

# Values that are immutable and hold no tensor: shared by a snapshot instead of rebuilt.
_ATOMS = (int, float, bool, str, bytes, type(None))


def snapshot(obj: Any) -> Any:
    """A copy of ``obj`` that later in-place changes to the live tensors and containers cannot reach:
    tensors are copied to the CPU (a checkpoint is loaded with ``map_location``), dicts and lists are
    rebuilt, tuples rebuilt when they hold a tensor or a container, anything else (numbers, strings,
    None) is immutable and shared."""
    kind = type(obj)
    if kind in _ATOMS:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    # Flat containers of plain values (metrics rows, RNG state tuples, index lists) in one step each:
    # an epoch's checkpoint holds thousands of such values, and visiting each costs more than its copy.
    if isinstance(obj, dict):
        if all(type(v) in _ATOMS for v in obj.values()):
            return dict(obj)
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        if all(type(v) in _ATOMS for v in obj):
            return list(obj)
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple):
        if all(type(v) in _ATOMS for v in obj):
            return obj
        return tuple(snapshot(v) for v in obj)
    return obj


class BackgroundWriter:
    """Runs write jobs one at a time in a background thread (inline when ``enabled`` is False)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        """Finish the previous job, then start ``job`` (which must only touch snapshots)."""
        self.wait()
        if not self.enabled:
            job()
            return

        def run() -> None:
            try:
                job()
            except BaseException as err:  # handed to the training thread by wait()
                self._error = err

        self._thread = threading.Thread(target=run, name="augkd-checkpoint-writer", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until the job in flight is written; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
