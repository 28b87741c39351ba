"""The run directory's lock (one live run per directory), and the checks on ``--out`` before it is taken.

An exclusive ``flock`` on ``<run dir>/.lock``, taken before anything is written and held until the run
ends. The operating system drops it when the process dies, also on ``kill -9``, so a killed run never
leaves a stale lock; ``--resume`` then simply takes it. The holder's pid is written into the file so
that a refused start can say who holds the directory. ``flock`` locks belong to the open file, so a
second run in the same process (``augkd compare``, tests) is refused as well.
"""
from __future__ import annotations

import fcntl
import os

from ..atomic import default_file_mode
from ..config import ConfigError
from ..errors import RunDirLocked


class RunLock:
    NAME = ".lock"

    def __init__(self, run_dir: str):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, self.NAME)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, default_file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirLocked(
                f"{run_dir} is in use by another live run (pid {holder}); wait for it to finish, stop it, "
                "or choose another --out (a --resume also has to wait until that run has ended)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __del__(self):  # a context that is dropped without finish() still frees the directory
        try:
            self.release()
        except Exception:
            pass


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "unknown"


def check_out_dir(run_dir: str) -> None:
    """--out must be a directory this process can create and write (checked before any work)."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"--out: {run_dir} exists and is not a directory")
    parent = run_dir
    while not os.path.exists(parent):
        up = os.path.dirname(os.path.abspath(parent))
        if up == os.path.abspath(parent):
            break
        parent = up
    if not os.path.isdir(parent):
        raise ConfigError(f"--out: cannot create {run_dir}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out: cannot create or write {run_dir}: {parent} is not writable")


def take_run_dir(run_dir: str) -> RunLock:
    """Create ``run_dir`` if needed and lock it for this run (RunDirLocked when a live run holds it)."""
    try:
        return RunLock(run_dir)
    except OSError as err:
        raise ConfigError(f"--out: cannot create or write {run_dir} ({err.strerror or err})") from None


def remove_if_only_lock(run_dir: str) -> None:
    """Undo ``take_run_dir`` on a directory it created, when a start is refused before anything was written."""
    try:
        if set(os.listdir(run_dir)) <= {RunLock.NAME}:
            for name in os.listdir(run_dir):
                os.unlink(os.path.join(run_dir, name))
            os.rmdir(run_dir)
    except OSError:
        pass
