"""``augkd compare``: several methods over several seeds, on the same splits per seed.

Work is shared through a stage cache in ``<out>/cache``: the teacher (per seed, or once), Module 1 and
Module 2 are keyed by the config they depend on (``pipeline.stage_keys``), so dfkd, augkd, no-anchor
and no-mixup of one seed reuse one Module 1, and augkd / no-mixup one Module 2. The ``official`` preset
changes Module 1 (B4: encoder scheduler not stepped) and Module 2 (B6-B8), so it gets its own.

Outputs: ``compare.csv`` (one row per seed and method), ``compare_summary.csv`` and ``compare.md``
(mean +- std of test Acc / Acc@3 / Acc@5, and the paired difference to dfkd per seed).
"""
from __future__ import annotations

import math
import os
import sys
from typing import Any

from .atomic import remove_stale_temporaries, write_text
from .config import build_config
from .report import read_json, write_csv, write_json


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _pm(xs: list[float]) -> str:
    m, s = _mean_std(xs)
    return "n/a" if math.isnan(m) else f"{100 * m:.1f} ± {100 * s:.1f}"


def run_compare(
    user: dict[str, Any],
    methods: list[str],
    seeds: list[int],
    out: str,
    *,
    quiet: bool = False,
    resume: bool = False,
    teacher_per_seed: bool = True,
) -> str:
    from .method.lock import check_out_dir, take_run_dir

    check_out_dir(out)
    lock = take_run_dir(out)  # the stage cache is shared by its runs: one compare per directory at a time
    remove_stale_temporaries(out)  # a killed compare's half-written tables (safe: this process holds out)
    try:
        return _run_compare(user, methods, seeds, out, quiet=quiet, resume=resume, teacher_per_seed=teacher_per_seed)
    finally:
        lock.release()


def _run_compare(user, methods, seeds, out, *, quiet, resume, teacher_per_seed) -> str:
    from .method.pipeline import run_method, stage_keys
    from .method.rundir import finish, prepare

    cache = os.path.join(out, "cache")
    rows: list[dict[str, Any]] = []
    shared_teacher = user.get("teacher.path")
    for seed in seeds:
        for method in methods:
            u = dict(user, method=method, seed=seed)
            if shared_teacher:
                u["teacher.path"] = shared_teacher
            cfg = build_config(u)
            keys = stage_keys(cfg)
            stage_dirs = {s: os.path.join(cache, keys[s]) for s in ("teacher", "df", "anchor")}
            run_dir = os.path.join(out, f"seed{seed}", method)
            summary_path = os.path.join(run_dir, "metrics", "summary.json")
            summary = None
            if os.path.isfile(summary_path):
                try:
                    summary = read_json(summary_path)  # finished earlier (compare was re-run)
                except (OSError, ValueError) as err:  # damaged: rerun it (its stages are on disk)
                    print(f"[compare] {summary_path} is unreadable ({err}); running {method} again", file=sys.stderr)
            if summary is None:
                ctx = prepare(cfg, run_dir, quiet=quiet, resume=resume, stage_dirs=stage_dirs, allow_existing=True)
                try:
                    summary = run_method(ctx)
                finally:
                    finish(ctx)
            if not teacher_per_seed and not shared_teacher:
                # The first run trained the teacher; every later seed loads that file.
                shared_teacher = os.path.join(stage_dirs["teacher"], "teacher.pt")
            rows.append(
                {
                    "seed": seed,
                    "method": method,
                    "test_acc": summary["test"]["acc"],
                    "test_acc3": summary["test"]["acc3"],
                    "test_acc5": summary["test"]["acc5"],
                    "val_acc": summary["val"]["acc"],
                    "teacher_student_test_acc": summary["teacher"]["student_test"]["acc"],
                    "seconds": summary["seconds"],
                    "run_dir": run_dir,
                }
            )
            write_csv(os.path.join(out, "compare.csv"), rows)
            if not quiet:
                print(
                    f"[compare] seed {seed} {method}: test Acc {100 * rows[-1]['test_acc']:.1f}% "
                    f"({rows[-1]['seconds']:.0f} s)",
                    file=sys.stderr,
                )
    table, agg = summarize(rows, methods)
    write_csv(os.path.join(out, "compare_summary.csv"), agg)
    write_text(os.path.join(out, "compare.md"), table)
    write_json(os.path.join(out, "compare.json"), {"methods": methods, "seeds": seeds, "runs": rows, "summary": agg})
    return table


def summarize(rows: list[dict[str, Any]], methods: list[str], reference: str = "dfkd") -> tuple[str, list[dict]]:
    """Markdown table + aggregated rows: mean ± std per method, paired differences vs ``reference``."""
    by = {(r["method"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    agg: list[dict[str, Any]] = []
    lines = [
        f"# augkd compare: {len(seeds)} seed(s) ({', '.join(map(str, seeds))})",
        "",
        "Test accuracy (%) on the student-domain test split, mean ± std over seeds; "
        f"Δ = paired difference to `{reference}` (same seed, same splits); W/T/L = seeds better/equal/worse.",
        "",
        f"| method | n | Acc | Acc@3 | Acc@5 | Δ Acc vs {reference} | W/T/L |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        mine = [by[(m, s)] for s in seeds if (m, s) in by]
        if not mine:
            continue
        acc = [r["test_acc"] for r in mine]
        row: dict[str, Any] = {"method": m, "n": len(mine)}
        for key in ("test_acc", "test_acc3", "test_acc5"):
            row[key + "_mean"], row[key + "_std"] = _mean_std([r[key] for r in mine])
        diffs = [by[(m, s)]["test_acc"] - by[(reference, s)]["test_acc"] for s in seeds if (m, s) in by and (reference, s) in by]
        delta, wtl = "—", "—"
        if diffs and m != reference:
            dm, ds = _mean_std(diffs)
            row["diff_vs_ref_mean"], row["diff_vs_ref_std"] = dm, ds
            w = sum(d > 0 for d in diffs)
            t = sum(d == 0 for d in diffs)
            l = sum(d < 0 for d in diffs)
            row["wins"], row["ties"], row["losses"] = w, t, l
            delta, wtl = f"{100 * dm:+.1f} ± {100 * ds:.1f}", f"{w}/{t}/{l}"
        agg.append(row)
        lines.append(
            f"| {m} | {len(mine)} | {_pm(acc)} | {_pm([r['test_acc3'] for r in mine])} | "
            f"{_pm([r['test_acc5'] for r in mine])} | {delta} | {wtl} |"
        )
    teacher = {s: next(r["teacher_student_test_acc"] for r in rows if r["seed"] == s) for s in seeds}
    lines += ["", f"Teacher accuracy on the student-domain test split: {_pm(list(teacher.values()))} "
              f"(per seed: {', '.join(f'{100 * v:.1f}' for v in teacher.values())})", ""]
    agg.append({"method": "teacher (student test)", "n": len(teacher),
                "test_acc_mean": _mean_std(list(teacher.values()))[0], "test_acc_std": _mean_std(list(teacher.values()))[1]})
    return "\n".join(lines), agg
