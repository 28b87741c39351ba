"""Atomic file writes, used for every file a run leaves behind (checkpoints, weights, splits, metrics).

The data goes to a temporary file in the destination's directory, is flushed to disk, and is moved into
place with os.replace: a run killed mid-write leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from typing import Iterator

TMP_PREFIX = ".tmp-"
_umask_lock = threading.Lock()


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file under the process's umask (mkstemp alone gives 0600)."""
    with _umask_lock:  # reading the umask means setting it; keep that window private
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Delete the temporary files (``.tmp-*``) a killed writer left in ``directory``; return their paths.
    Only call this while holding the directory's run lock: a live writer's temporary looks the same."""
    removed = []
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return removed
    for entry in os.scandir(directory):
        if entry.name.startswith(TMP_PREFIX) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(entry.path)
            except FileNotFoundError:
                pass
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path next to `path`; write it inside the block. On success it replaces `path`;
    on any error it is removed and `path` is left untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=directory)
    try:
        os.fchmod(fd, default_file_mode())  # the file a plain open() would create, not mkstemp's 0600
    finally:
        os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path, ".txt") as tmp, open(tmp, "w") as fh:
        fh.write(text)
