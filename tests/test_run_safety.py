"""What a run refuses instead of giving a wrong result or losing data: a run directory in use, artefacts
made under another configuration, pickles in checkpoints, non-finite settings, teachers or training,
settings that would crash late, and unusable --out paths."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from augkd import models
from augkd.cli import main
from augkd.method import mixup as mixup_mod

from .kills import killed_after
from .test_cli import TINY


def _run(out, *extra, command="run"):
    return main([command, "--quiet", "--device", "cpu", "--out", str(out), *TINY, *extra])


# ---------------------------------------------------------------- item 3: one live run per directory


def test_second_run_and_resume_are_refused_while_a_run_is_alive(tmp_path, capsys):
    from augkd.method.lock import RunLock

    out = tmp_path / "busy"
    # A real run in another process, long enough to be alive while this one tries the directory.
    argv = [sys.executable, "-m", "augkd.cli", "run", "--quiet", "--device", "cpu", "--out", str(out), *TINY,
            "teacher.epochs=1000"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        lock = out / ".lock"
        deadline = time.time() + 120
        while not (lock.is_file() and lock.read_text().strip() == str(proc.pid)):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the run never took its lock"
            time.sleep(0.2)
        for extra in ([], ["--resume"]):
            assert _run(out, "teacher.epochs=1000", *extra) == 1
            err = capsys.readouterr().err
            assert f"in use by another live run (pid {proc.pid})" in err and str(out) in err
        assert proc.poll() is None  # the refused starts left the live run alone
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # kill -9 releases the lock (the OS drops it): the directory can be taken again
    RunLock(str(out)).release()


def test_lock_is_per_open_file_so_one_process_cannot_take_it_twice(tmp_path):
    from augkd.method.lock import RunLock

    held = RunLock(str(tmp_path))
    try:
        with pytest.raises(Exception, match=f"pid {os.getpid()}"):
            RunLock(str(tmp_path))
    finally:
        held.release()
    RunLock(str(tmp_path)).release()


# ---------------------------------------------------------------- item 5: digests; item 8: fresh resume


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run, started with --resume on a directory that does not exist yet."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _run(out, "--resume") == 0
    return out


def test_resume_on_a_missing_directory_says_it_starts_fresh(finished):
    assert "starting a fresh run" in (finished / "log.txt").read_text()


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    os.remove(dst / "config.json")  # no record of the old settings: only the artefacts can tell
    os.remove(dst / "metrics" / "summary.json")


@pytest.mark.parametrize("change,artefact", [
    ("teacher.lr=0.002", "teacher_info.json"),
    ("df.g_lr=0.002", "df_final.pt"),
    ("anchor.lr=0.002", "anchor_final.pt"),
    ("mixup.lr=0.002", "mixup_final.pt"),
])
def test_artefacts_of_another_config_are_refused(finished, tmp_path, capsys, change, artefact):
    out = tmp_path / "run"
    _copy_run(finished, out)
    assert _run(out, change) == 1
    err = capsys.readouterr().err
    assert artefact in err and "another configuration" in err
    assert not (out / "metrics" / "summary.json").exists()


def test_artefacts_of_the_same_config_are_reused(finished, tmp_path):
    out = tmp_path / "run"
    _copy_run(finished, out)
    assert _run(out) == 0
    a = torch.load(finished / "student.pt", weights_only=True)
    b = torch.load(out / "student.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "reusing the finished stage" in (out / "log.txt").read_text()


# ---------------------------------------------------------------- item 6: no code runs from a checkpoint


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_in_checkpoints_does_not_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    killed_after(monkeypatch, "teacher:0", _run, out)
    marker = tmp_path / "code-ran"
    for name in ("teacher_state.pt", "teacher_state.prev.pt"):
        with open(out / "checkpoints" / name, "wb") as fh:
            pickle.dump(_Marker(str(marker)), fh)
    assert _run(out, "--resume") == 1
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "teacher_state.pt" in err and "teacher_state.prev.pt" in err


# ---------------------------------------------------------------- item 4: non-finite values


@pytest.mark.parametrize("override,key", [
    ("df.g_lr=inf", "df.g_lr"), ("mixup.a=inf", "mixup.a"), ("mixup.lr=nan", "mixup.lr"),
    ("mixup.temperature=nan", "mixup.temperature"), ("anchor.energy_temperature=-inf", "anchor.energy_temperature"),
    ("teacher.lr=-1", "teacher.lr"), ("df.bn_weight=nan", "df.bn_weight"), ("baseline.kd_u=1.5", "baseline.kd_u"),
    ("mixup.temperature=1e12", "mixup.temperature"),  # finite, but outside the range kd_loss accepts
])
def test_non_finite_or_out_of_range_settings_are_refused(tmp_path, capsys, override, key):
    assert _run(tmp_path / "r", override) == 2
    err = capsys.readouterr().err
    assert key in err and "expected" in err
    assert not (tmp_path / "r").exists()


def test_a_bad_value_in_the_config_file_is_refused_even_when_overridden(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[df]\ng_lr = nan\n")
    assert _run(tmp_path / "r", "--config", str(cfg), "df.g_lr=0.001") == 2
    err = capsys.readouterr().err
    assert "df.g_lr" in err and str(cfg) in err


def test_a_teacher_with_nan_weights_is_refused(tmp_path, capsys):
    teacher = models.build_classifier("cnn-teacher", 10, 1, 16)
    with torch.no_grad():
        teacher.fc.weight[0, 0] = float("nan")
    path = tmp_path / "t.pt"
    models.save_state(teacher, str(path))
    assert _run(tmp_path / "r", "--teacher", str(path)) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "non-finite" in err and "fc.weight" in err


def test_a_diverging_stage_stops_and_keeps_its_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = mixup_mod.distill_loss

    def diverging(*args, **kwargs):  # one batch per epoch here: epoch 0 is fine, epoch 1 blows up
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss if calls["n"] < 2 else loss * float("nan")

    monkeypatch.setattr(mixup_mod, "distill_loss", diverging)
    out = tmp_path / "r"
    assert _run(out) == 1
    err = capsys.readouterr().err
    assert "mixup diverged in epoch 2" in err and "mixup_state.pt" in err and "after epoch 1" in err
    state = torch.load(out / "checkpoints" / "mixup_state.pt", weights_only=True)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["objects"]["student"].values() if v.is_floating_point())
    assert not (out / "student.pt").exists()


# ---------------------------------------------------------------- item 8: validated before training


@pytest.mark.parametrize("override,expect", [
    ("anchor.batch_size=1", "anchor.batch_size"),
    ("df.generator_hidden=[]", "df.generator_hidden"),
    ("df.generator_hidden=[0,8]", "df.generator_hidden"),
    ("df.encoder_hidden=[-4,8]", "df.encoder_hidden"),
    ("df.encoder_hidden=[8,8,8,8,8,8]", "df.encoder_hidden"),
    ("student.arch=resnet9000", "student.arch"),
    ("teacher.arch=nonet", "teacher.arch"),
])
def test_settings_that_would_crash_late_are_refused_up_front(tmp_path, capsys, override, expect):
    out = tmp_path / "r"
    assert _run(out, override) == 2
    err = capsys.readouterr().err
    assert expect in err
    assert not out.exists()  # refused before a run directory (let alone a teacher) was made


def test_out_that_is_a_file_or_cannot_be_created(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert _run(f) == 2
    assert "--out" in capsys.readouterr().err and f.read_text() == "x"
    assert _run(f / "sub") == 2
    assert "not a directory" in capsys.readouterr().err
    assert _run("/proc/augkd-no-such-place/run") == 2  # a place nobody can create directories in
    assert "--out" in capsys.readouterr().err

