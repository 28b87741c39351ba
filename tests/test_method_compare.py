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
