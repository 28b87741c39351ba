"""A run killed after some epoch of any stage and resumed ends bit-for-bit where an uninterrupted run ends,
with the default configuration's plots on (plots run the networks; they must not change them)."""
import csv
import json

import pytest
import torch

from augkd.cli import main
from augkd.method.context import SimulatedKill
from augkd.method.loop import KILL_ENV

# configs/smoke.toml's sizes (plots on, as by default), spelled out so that the test owns them.
SMOKE = [
    "threads=1", "plots=true", "data.k_shot=2", "teacher.epochs=2", "teacher.batch_size=512",
    "df.epochs=2", "df.iters_per_epoch=2", "df.batch_size=16", "df.student_steps=2", "df.val_batches=1",
    "anchor.epochs=2", "mixup.epochs=3",
]


def _run(out, *extra):
    return main(["run", "--quiet", "--device", "cpu", "--out", str(out), *SMOKE, *extra])


def _metrics(out, stage):
    rows = list(csv.DictReader(open(out / "metrics" / f"{stage}.csv")))
    for r in rows:
        r.pop("seconds")  # wall time differs, nothing else may
    return rows


def assert_same_weights(a_path, b_path):
    a = torch.load(a_path, weights_only=True)
    b = torch.load(b_path, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref") / "run"
    assert _run(ref) == 0
    return ref


# Each chain kills the run after the given epochs, one after another, then resumes it to the end: a
# kill inside every stage in turn (each resume loads the stages finished before it, runs their plots,
# and continues a stage from its checkpoint), and one kill in Module 3 of a run that trained the
# stages before it in the same process.
CHAINS = {
    "every-stage": ["teacher:0", "df:0", "anchor:0", "mixup:1"],
    "mixup": ["mixup:1"],
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_resume_after_kills_is_bit_exact_with_plots(reference, tmp_path, monkeypatch, chain):
    out = tmp_path / "killed"
    for i, point in enumerate(CHAINS[chain]):
        monkeypatch.setenv(KILL_ENV, point)
        with pytest.raises(SimulatedKill):
            _run(out, *(["--resume"] if i else []))
    monkeypatch.delenv(KILL_ENV)
    assert _run(out, "--resume") == 0

    assert_same_weights(reference / "student.pt", out / "student.pt")
    assert_same_weights(reference / "teacher.pt", out / "teacher.pt")
    sa = json.loads((reference / "metrics" / "summary.json").read_text())
    sb = json.loads((out / "metrics" / "summary.json").read_text())
    assert sa["test"] == sb["test"]
    for stage in ("teacher", "df", "anchor", "mixup"):
        assert _metrics(reference, stage) == _metrics(out, stage), stage
    assert (out / "plots" / "anchor.png").is_file()


def test_resume_refuses_a_different_config(tmp_path, monkeypatch):
    out = tmp_path / "r"
    monkeypatch.setenv(KILL_ENV, "teacher:0")
    with pytest.raises(SimulatedKill):
        _run(out)
    monkeypatch.delenv(KILL_ENV)
    assert _run(out, "--resume", "mixup.lr=0.5") == 2
