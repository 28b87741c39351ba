"""A run killed after some epoch of any stage and resumed ends bit-for-bit where an uninterrupted run ends."""
import csv
import json

import pytest
import torch

from augkd.cli import main
from augkd.method.context import SimulatedKill
from augkd.method.loop import KILL_ENV

TINY = [
    "threads=1", "plots=false", "data.k_shot=2", "teacher.epochs=2", "teacher.batch_size=512",
    "df.epochs=2", "df.iters_per_epoch=2", "df.batch_size=16", "df.student_steps=2", "df.val_batches=1",
    "anchor.epochs=2", "mixup.epochs=3",
]


def _run(out, *extra):
    return main(["run", "--quiet", "--device", "cpu", "--out", str(out), *TINY, *extra])


def _metrics(out, stage):
    rows = list(csv.DictReader(open(out / "metrics" / f"{stage}.csv")))
    for r in rows:
        r.pop("seconds")  # wall time differs, nothing else may
    return rows


def test_resume_after_kills_in_every_stage_is_bit_exact(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    assert _run(ref) == 0

    out = tmp_path / "killed"
    kills = ["teacher:0", "df:0", "anchor:0", "mixup:1"]
    for i, point in enumerate(kills):
        monkeypatch.setenv(KILL_ENV, point)
        with pytest.raises(SimulatedKill):
            _run(out, *(["--resume"] if i else []))
    monkeypatch.delenv(KILL_ENV)
    assert _run(out, "--resume") == 0

    a = torch.load(ref / "student.pt")
    b = torch.load(out / "student.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = json.loads((ref / "metrics" / "summary.json").read_text())
    sb = json.loads((out / "metrics" / "summary.json").read_text())
    assert sa["test"] == sb["test"]
    for stage in ("teacher", "df", "anchor", "mixup"):
        assert _metrics(ref, stage) == _metrics(out, stage), stage
    ta, tb = torch.load(ref / "teacher.pt"), torch.load(out / "teacher.pt")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_refuses_a_different_config(tmp_path, monkeypatch):
    out = tmp_path / "r"
    monkeypatch.setenv(KILL_ENV, "teacher:0")
    with pytest.raises(SimulatedKill):
        _run(out)
    monkeypatch.delenv(KILL_ENV)
    assert _run(out, "--resume", "mixup.lr=0.5") == 2
