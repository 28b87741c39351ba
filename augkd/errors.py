"""Errors that stop a run with a message instead of a traceback (the command exits non-zero).

Settings raise ``augkd.config.ConfigError``; these are about the state of a run and its files."""
from __future__ import annotations


class RunError(RuntimeError):
    """A run cannot go on; the message says why and what to do."""


class CheckpointError(RunError):
    """An artefact that cannot be used: unreadable, truncated, not written by this package, or written
    under another configuration. The message names the file and what is wrong with it."""


class ConfigMismatch(CheckpointError):
    """An intact artefact made under another configuration: refused, never silently reused."""


class StageDiverged(RunError):
    """A stage's loss or weights turned non-finite; the last good checkpoint is kept."""


class RunDirLocked(RunError):
    """Another live process holds the run directory."""
