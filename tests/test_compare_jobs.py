"""`augkd compare --jobs N`: runs in N processes give bit-for-bit the results of `--jobs 1`, a stage shared
through the cache is trained by one process while the others wait and load it, and a failing run is
named by seed and method with a non-zero exit."""
import csv
import json

import pytest

from augkd.cli import main
from augkd.method.loop import KILL_ENV
from tests.test_resume import assert_same_weights

TINY = [
    "threads=1", "plots=false", "data.k_shot=2", "teacher.epochs=1", "teacher.batch_size=256",
    "df.epochs=2", "df.iters_per_epoch=2", "df.batch_size=16", "df.student_steps=2", "df.val_batches=1",
    "anchor.epochs=2", "mixup.epochs=3",
]
# dfkd and no-anchor start together and both need the teacher and Module 1 at once; augkd follows.
METHODS = ("dfkd", "no-anchor", "augkd")


def _compare(out, jobs, methods=METHODS):
    return main(["compare", "--quiet", "--device", "cpu", "--seeds", "1", "--methods", ",".join(methods),
                 "--jobs", str(jobs), "--out", str(out), *TINY])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("jobs")
    assert _compare(base / "one", 1) == 0
    assert _compare(base / "two", 2) == 0
    return base / "one", base / "two"


def _summary(out, method):
    return json.loads((out / "seed0" / method / "metrics" / "summary.json").read_text())


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_give_the_results_of_one(runs, method):
    one, two = runs
    assert_same_weights(one / "seed0" / method / "student.pt", two / "seed0" / method / "student.pt")
    a, b = _summary(one, method), _summary(two, method)
    assert a["test"] == b["test"] and a["val"] == b["val"]
    assert a["stages"].get("anchor", {}).get("diagnostics") == b["stages"].get("anchor", {}).get("diagnostics")


def test_a_shared_stage_is_trained_once(runs):
    _, two = runs
    logs = {m: (two / "seed0" / m / "log.txt").read_text() for m in METHODS}
    trained = {stage: [m for m, text in logs.items() if marker in text]
               for stage, marker in (("teacher", "teacher: training"), ("df", "Module 1 (data-free):"))}
    assert len(trained["teacher"]) == 1 and len(trained["df"]) == 1, trained
    for m, text in logs.items():
        if m not in trained["teacher"]:
            assert "teacher: reusing the finished stage" in text, m
        if m not in trained["df"]:
            assert "df: reusing the finished stage" in text, m
    assert len(list((two / "cache").glob("teacher-*"))) == len(list((two / "cache").glob("df-*"))) == 1


def test_the_table_has_the_anchor_columns_and_the_wall_time(runs):
    _, two = runs
    md = (two / "compare.md").read_text()
    assert "| T on G(E(x)) | T on G(A(E(x))) | largest share | collapsed |" in md
    assert "Wall time" in md and "(--jobs 2)" in md
    rows = {r["method"]: r for r in csv.DictReader(open(two / "compare.csv"))}
    assert [r["method"] for r in csv.DictReader(open(two / "compare.csv"))] == list(METHODS)  # the plan's order
    diag = _summary(two, "augkd")["stages"]["anchor"]["diagnostics"]
    assert float(rows["augkd"]["anchor_anchored_acc"]) == pytest.approx(diag["anchored"]["acc"], rel=1e-5)
    assert rows["augkd"]["anchor_collapsed"] == str(diag["collapsed"])
    assert rows["dfkd"]["anchor_anchored_acc"] == ""
    info = json.loads((two / "compare.json").read_text())
    assert info["jobs"] == 2 and info["wall_seconds"] > 0 and info["failed"] == []


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_run_is_named_and_the_exit_code_is_non_zero(tmp_path, monkeypatch, capsys, jobs):
    monkeypatch.setenv(KILL_ENV, "df:0")  # dfkd dies in Module 1; ce never reaches it
    out = tmp_path / "cmp"
    assert _compare(out, jobs, ("ce", "dfkd")) == 1
    err = capsys.readouterr().err
    assert "seed 0 dfkd" in err and "SimulatedKill" in err and "1 of 2 compare run(s) failed" in err
    assert [r["method"] for r in csv.DictReader(open(out / "compare.csv"))] == ["ce"]
    assert json.loads((out / "compare.json").read_text())["failed"][0].startswith("seed 0 dfkd: SimulatedKill")


def test_jobs_must_be_positive(tmp_path, capsys):
    assert _compare(tmp_path / "x", 0) == 2
    assert "--jobs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_stage_lock_makes_a_second_holder_wait_and_cleans_temporaries(tmp_path):
    """Two holders of one shared stage directory (separate opens, as two processes have): the second
    enters only after the first has left; the holder removes a killed writer's temporaries."""
    import logging
    import threading
    import time
    from types import SimpleNamespace

    from augkd.distributed import Dist
    from augkd.method import stage_lock

    d = tmp_path / "cache" / "df-abc"
    d.mkdir(parents=True)
    (d / ".tmp-left-by-a-kill.pt").write_bytes(b"half")
    ctx = SimpleNamespace(stage_dirs={"df": str(d)}, dist=Dist(), log=logging.getLogger("test-stage-lock"))
    events = []

    def second():
        with stage_lock.holding(ctx, "df"):
            events.append("second in")

    with stage_lock.holding(ctx, "df"):
        assert not (d / ".tmp-left-by-a-kill.pt").exists()
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.5)
        events.append("first out")
    t.join(10)
    assert events == ["first out", "second in"]
    with stage_lock.holding(ctx, "teacher"):  # not a shared stage here: no lock, nothing touched
        pass
    assert not (tmp_path / "cache" / "teacher").exists()
