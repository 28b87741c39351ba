"""The compare report: mean +- std per method and the paired comparison against dfkd."""
import math

import pytest

from augkd.compare import summarize


def _row(seed, method, acc):
    return {"seed": seed, "method": method, "test_acc": acc, "test_acc3": min(1.0, acc + 0.05),
            "test_acc5": 1.0, "teacher_student_test_acc": 0.3 + 0.01 * seed}


def test_summary_statistics_and_paired_differences():
    rows = [_row(0, "dfkd", 0.80), _row(1, "dfkd", 0.90), _row(2, "dfkd", 0.85),
            _row(0, "augkd", 0.82), _row(1, "augkd", 0.90), _row(2, "augkd", 0.84)]
    table, agg = summarize(rows, ["augkd", "dfkd"])
    a = next(r for r in agg if r["method"] == "augkd")
    assert a["n"] == 3
    assert a["test_acc_mean"] == pytest.approx((0.82 + 0.90 + 0.84) / 3)
    diffs = [0.02, 0.0, -0.01]
    m = sum(diffs) / 3
    assert a["diff_vs_ref_mean"] == pytest.approx(m)
    assert a["diff_vs_ref_std"] == pytest.approx(math.sqrt(sum((d - m) ** 2 for d in diffs) / 2))
    assert (a["wins"], a["ties"], a["losses"]) == (1, 1, 1)
    assert "| augkd | 3 |" in table and "1/1/1" in table
    assert "Teacher accuracy on the student-domain test split: 31.0 ± 1.0" in table
    d = next(r for r in agg if r["method"] == "dfkd")
    assert "diff_vs_ref_mean" not in d


def test_single_seed_has_zero_std():
    table, agg = summarize([_row(0, "dfkd", 0.5), _row(0, "ce", 0.4)], ["ce", "dfkd"])
    ce = agg[0]
    assert ce["test_acc_std"] == 0.0 and ce["diff_vs_ref_mean"] == pytest.approx(-0.1)


def test_anchor_diagnostics_columns():
    """Module 2's diagnostics per method: mean ± std of the teacher's accuracy on decoded and anchor images,
    the largest class share, and how many runs collapsed; dashes for a method without an anchor."""
    rows = [_row(0, "dfkd", 0.8), _row(1, "dfkd", 0.9), _row(0, "augkd", 0.82), _row(1, "augkd", 0.9)]
    for r, (dec, anc, share, collapsed) in zip(rows[2:], [(0.20, 0.60, 0.70, True), (0.30, 0.40, 0.20, False)]):
        r.update(anchor_decoded_acc=dec, anchor_anchored_acc=anc, anchor_max_share=share, anchor_mask_mass=3.0,
                 anchor_collapsed=collapsed)
    table, agg = summarize(rows, ["augkd", "dfkd"])
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    for col in ("T on G(E(x))", "T on G(A(E(x)))", "largest share", "collapsed"):
        assert col in header
    augkd = next(line for line in table.splitlines() if line.startswith("| augkd"))
    assert augkd.endswith("| 25.0 ± 7.1 | 50.0 ± 14.1 | 0.45 ± 0.35 | 1/2 |")
    assert next(line for line in table.splitlines() if line.startswith("| dfkd")).endswith("| — | — | — | — |")
    a = next(r for r in agg if r["method"] == "augkd")
    assert a["anchor_anchored_acc_mean"] == pytest.approx(0.5) and a["anchor_collapsed_runs"] == 1
    assert a["anchor_max_share_std"] == pytest.approx(math.sqrt(2 * 0.25 ** 2))
