"""Stopping a run after a given epoch, as a kill would (the AUGKD_DEBUG_KILL_AFTER hook)."""
import pytest

from augkd.method.context import SimulatedKill
from augkd.method.loop import KILL_ENV


def killed_after(monkeypatch, point: str, run, *args) -> None:
    """``run(*args)`` stopped right after the checkpoint of ``point`` ("<stage>:<epoch>"); it must stop there."""
    monkeypatch.setenv(KILL_ENV, point)
    with pytest.raises(SimulatedKill):
        run(*args)
    monkeypatch.delenv(KILL_ENV)
