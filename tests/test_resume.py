"""A run killed after some epoch of any stage and resumed ends bit-for-bit where an uninterrupted run ends,
with the default configuration's plots on (plots run the networks; they must not change them)."""
import csv
import json
import os
import stat

import pytest
import torch

from augkd.cli import main

from .kills import killed_after

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
# stages before it in the same process. Module 3 is killed after its first epoch so that the resumed
# epochs still draw on the encoder (the mixing factor reaches 1, all-real samples, in the last epoch).
CHAINS = {
    "every-stage": ["teacher:0", "df:0", "anchor:0", "mixup:0"],
    "mixup": ["mixup:0"],
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_resume_after_kills_is_bit_exact_with_plots(reference, tmp_path, monkeypatch, chain):
    out = tmp_path / "killed"
    for i, point in enumerate(CHAINS[chain]):
        killed_after(monkeypatch, point, _run, out, *(["--resume"] if i else []))
    assert _run(out, "--resume") == 0

    assert_same_weights(reference / "student.pt", out / "student.pt")
    assert_same_weights(reference / "teacher.pt", out / "teacher.pt")
    sa = json.loads((reference / "metrics" / "summary.json").read_text())
    sb = json.loads((out / "metrics" / "summary.json").read_text())
    assert sa["test"] == sb["test"]
    for stage in ("teacher", "df", "anchor", "mixup"):
        assert _metrics(reference, stage) == _metrics(out, stage), stage
    assert (out / "plots" / "anchor.png").is_file()


# Every Module 2 / Module 3 switch away from its default (docs/anchor-diagnostics.md, "Switches"), with
# enough anchor epochs for the selection rule to matter.
SWITCHES = ["anchor.energy=class", "anchor.balance_weight=2", "anchor.select=anchored_acc",
            "mixup.teacher_weighting=confidence", "anchor.epochs=4", "plots=false"]


@pytest.fixture(scope="module")
def switched(tmp_path_factory):
    ref = tmp_path_factory.mktemp("switched") / "run"
    assert _run(ref, *SWITCHES) == 0
    return ref


def test_resume_with_the_switches_set_is_bit_exact(switched, reference, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    killed_after(monkeypatch, "anchor:1", _run, out, *SWITCHES)
    killed_after(monkeypatch, "mixup:0", _run, out, "--resume", *SWITCHES)
    assert _run(out, "--resume", *SWITCHES) == 0
    assert_same_weights(switched / "student.pt", out / "student.pt")
    for stage in ("anchor", "mixup"):
        assert _metrics(switched, stage) == _metrics(out, stage), stage
    # the best anchor epoch is the one with the highest anchored accuracy (first of equals: lowest loss)
    rows = _metrics(switched, "anchor")
    best = min(range(len(rows)), key=lambda i: (-float(rows[i]["anchored_teacher_acc"]),
                                                 float(rows[i]["val_anchor_loss"]), i))
    summary = json.loads((switched / "metrics" / "summary.json").read_text())
    assert summary["stages"]["anchor"]["best_epoch"] == best
    # the switches act: the anchor's training loss and the student differ from the default run's
    assert _metrics(switched, "anchor")[0]["train_loss"] != _metrics(reference, "anchor")[0]["train_loss"]
    a = torch.load(switched / "student.pt", weights_only=True)
    b = torch.load(reference / "student.pt", weights_only=True)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_config(tmp_path, monkeypatch):
    out = tmp_path / "r"
    killed_after(monkeypatch, "teacher:0", _run, out)
    assert _run(out, "--resume", "mixup.lr=0.5") == 2


def test_damaged_artefacts_are_named_and_the_run_recovers_bit_exactly(reference, tmp_path, monkeypatch):
    """Kill in Module 3, then damage what a kill or a bad disk can leave: truncated final artefacts and
    teacher weights, a truncated newest checkpoint, stale temporaries. The resume names each damaged
    file, recomputes finished stages from their last checkpoints, continues Module 3 from the checkpoint
    before the damaged one, and ends bit-identical to the uninterrupted run."""
    out = tmp_path / "killed"
    killed_after(monkeypatch, "mixup:1", _run, out)
    ck = out / "checkpoints"
    assert (ck / "mixup_state.prev.pt").is_file()  # the generation before the newest is kept
    for f in (out / "teacher.pt", ck / "df_final.pt", ck / "anchor_final.pt", ck / "mixup_state.pt"):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    stale = [ck / ".tmp-abc123.pt", out / ".tmp-def456.json", out / "metrics" / ".tmp-x.csv"]
    for f in stale:
        f.write_bytes(b"half a file")
    assert _run(out, "--resume") == 0
    log = (out / "log.txt").read_text()
    for name in ("teacher.pt", "df_final.pt", "anchor_final.pt"):
        assert f"{name}: corrupt or truncated" in log or f"{name}: not a readable" in log, name
    assert "mixup_state.pt: corrupt or truncated" in log and "continuing from the previous checkpoint" in log
    assert not any(f.exists() for f in stale)
    assert_same_weights(reference / "student.pt", out / "student.pt")
    assert_same_weights(reference / "teacher.pt", out / "teacher.pt")
    # files are written with the user's umask, as open() would create them (not mkstemp's 0600)
    mask = os.umask(0o022)
    os.umask(mask)
    for f in (out / "student.pt", ck / "mixup_final.pt", out / "metrics" / "summary.json", out / "config.toml"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_a_damaged_config_json_is_named(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    killed_after(monkeypatch, "teacher:0", _run, out)
    (out / "config.json").write_text('{"method": "augkd", "se')
    assert _run(out, "--resume") == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "damaged" in err
