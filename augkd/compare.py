"""``augkd compare``: several methods over several seeds, on the same splits per seed.

Work is shared through a stage cache in ``<out>/cache``: the teacher (per seed, or once), Module 1 and
Module 2 are keyed by the config they depend on (``pipeline.stage_keys``), so dfkd, augkd, no-anchor
and no-mixup of one seed reuse one Module 1, and augkd / no-mixup one Module 2. The ``official`` preset
changes Module 1 (B4: encoder scheduler not stepped) and Module 2 (B6-B8), so it gets its own.

The runs go one after another, or with ``--jobs N`` into N processes (``compare_jobs.py``); a shared
stage is still trained once (``method/stage_lock.py``).

Outputs: ``compare.csv`` (one row per seed and method), ``compare_summary.csv`` and ``compare.md``
(mean +- std of test Acc / Acc@3 / Acc@5, the paired difference to dfkd per seed, Module 2's
diagnostics, and the wall time).
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

from .atomic import remove_stale_temporaries, write_text
from .config import ConfigError
from .report import write_csv, write_json


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
    jobs: int = 1,
) -> str:
    from .method.lock import check_out_dir, take_run_dir

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs: expected a whole number of processes, at least 1; got {jobs!r}")
    check_out_dir(out)
    lock = take_run_dir(out)  # the stage cache is shared by its runs: one compare per directory at a time
    remove_stale_temporaries(out)  # a killed compare's half-written tables (safe: this process holds out)
    try:
        return _run_compare(user, methods, seeds, out, quiet=quiet, resume=resume, teacher_per_seed=teacher_per_seed,
                            jobs=jobs)
    finally:
        lock.release()


def _run_compare(user, methods, seeds, out, *, quiet, resume, teacher_per_seed, jobs) -> str:
    from .compare_jobs import Job, JobsFailed, plan_job, run_jobs

    t0 = time.perf_counter()
    order = [(seed, method) for seed in seeds for method in methods]
    summaries: dict[tuple[int, str], dict] = {}
    run_dirs: dict[tuple[int, str], str] = {}
    failures: list[str] = []

    def done(job: Job, summary: dict) -> None:
        summaries[(job.seed, job.method)] = summary
        run_dirs[(job.seed, job.method)] = job.run_dir
        rows = [_row(s, m, summaries[(s, m)], run_dirs[(s, m)]) for s, m in order if (s, m) in summaries]
        write_csv(os.path.join(out, "compare.csv"), rows)
        if not quiet:
            print(f"[compare] seed {job.seed} {job.method}: test Acc {100 * summary['test']['acc']:.1f}% "
                  f"({summary['seconds']:.0f} s)", file=sys.stderr)

    shared_teacher = user.get("teacher.path")
    processes = min(jobs, max(1, len(order)))
    if processes > 1 and "threads" not in user:
        # Each process gets its share of the cores (torch's intra-op threads).
        user = dict(user, threads=max(1, (os.cpu_count() or 1) // processes))
    if processes > 1:
        # The jobs already share the cores: a side thread per job would oversubscribe them.
        from .method.side_thread import SIDE_THREAD_ENV

        os.environ.setdefault(SIDE_THREAD_ENV, "0")
    first = order[:1] if not teacher_per_seed and not shared_teacher else []
    if first:
        # --shared-teacher: the first run trains the teacher; every later run loads that file, so it
        # runs alone before the others (their configurations name the file and its content).
        job = plan_job(user, first[0][1], first[0][0], out, None)
        _execute([job], 1, quiet, resume, done, failures, run_jobs)
        shared_teacher = os.path.join(job.stage_dirs["teacher"], "teacher.pt")
    if failures:
        failures.append(f"the other {len(order) - 1} run(s) need its teacher and were not started")
    else:
        rest = [plan_job(user, m, s, out, shared_teacher) for s, m in order[len(first):]]
        _execute(rest, jobs, quiet, resume, done, failures, run_jobs)
    wall = time.perf_counter() - t0
    rows = [_row(s, m, summaries[(s, m)], run_dirs[(s, m)]) for s, m in order if (s, m) in summaries]
    table, agg = summarize(rows, methods)
    timing = (f"Wall time {wall:.0f} s for {len(order)} run(s) in {processes} process(es) "
              f"(--jobs {jobs}); the runs' own times add up to {sum(r['seconds'] for r in rows):.0f} s.")
    table = f"{table}\n{timing}\n"
    write_csv(os.path.join(out, "compare_summary.csv"), agg)
    write_text(os.path.join(out, "compare.md"), table)
    write_json(os.path.join(out, "compare.json"), {"methods": methods, "seeds": seeds, "runs": rows, "summary": agg,
                                                   "jobs": jobs, "wall_seconds": wall, "failed": failures})
    if failures:
        raise JobsFailed(f"{len(order) - len(rows)} of {len(order)} compare run(s) failed: " + "; ".join(failures)
                         + f". The finished runs are in {out}/compare.md; rerun the same command to redo the failed ones")
    return table


def _execute(jobs_list, jobs, quiet, resume, done, failures, run_jobs) -> None:
    for job, result in run_jobs(jobs_list, jobs, quiet=quiet, resume=resume):
        if result.error is None:
            done(job, result.summary)
        else:
            failures.append(f"seed {job.seed} {job.method}: {result.error}")
            print(f"[compare] seed {job.seed} {job.method} FAILED: {result.error}", file=sys.stderr)
            if result.traceback and not quiet:
                print(result.traceback, file=sys.stderr, end="")


def _row(seed: int, method: str, summary: dict, run_dir: str) -> dict[str, Any]:
    row = {
        "seed": seed,
        "method": method,
        "test_acc": summary["test"]["acc"],
        "test_acc3": summary["test"]["acc3"],
        "test_acc5": summary["test"]["acc5"],
        "val_acc": summary["val"]["acc"],
        "teacher_student_test_acc": summary["teacher"]["student_test"]["acc"],
    }
    row.update(anchor_columns(summary))
    row.update({"seconds": summary["seconds"], "run_dir": run_dir})
    return row


# Module 2's diagnostics (method/anchor_diagnostics.py) in a compare row; empty for runs without an anchor.
ANCHOR_COLUMNS = {
    "anchor_decoded_acc": ("decoded", "acc"),
    "anchor_anchored_acc": ("anchored", "acc"),
    "anchor_decoded_confidence": ("decoded", "confidence"),
    "anchor_anchored_confidence": ("anchored", "confidence"),
    "anchor_max_share": ("anchored", "max_share"),
}


def anchor_columns(summary: dict) -> dict[str, Any]:
    diag = (summary.get("stages", {}).get("anchor") or {}).get("diagnostics")
    if not diag:
        return {}
    cols: dict[str, Any] = {k: diag[view][key] for k, (view, key) in ANCHOR_COLUMNS.items()}
    cols["anchor_mask_mass"] = diag["mask_mass"]
    cols["anchor_collapsed"] = bool(diag["collapsed"])
    return cols


def summarize(rows: list[dict[str, Any]], methods: list[str], reference: str = "dfkd") -> tuple[str, list[dict]]:
    """Markdown table + aggregated rows: mean ± std per method, paired differences vs ``reference``."""
    by = {(r["method"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    agg: list[dict[str, Any]] = []
    lines = [
        f"# augkd compare: {len(seeds)} seed(s) ({', '.join(map(str, seeds))})",
        "",
        "Test accuracy (%) on the student-domain test split, mean ± std over seeds; "
        f"Δ = paired difference to `{reference}` (same seed, same splits); W/T/L = seeds better/equal/worse. "
        "Module 2 (methods with an anchor; docs/anchor-diagnostics.md): the teacher's accuracy (%) on decoded "
        "images G(E(x)) and on anchor images G(A(E(x), y)) of the student validation split, the largest class "
        "share of its predictions on anchor images, and the runs whose anchor collapsed.",
        "",
        f"| method | n | Acc | Acc@3 | Acc@5 | Δ Acc vs {reference} | W/T/L "
        "| T on G(E(x)) | T on G(A(E(x))) | largest share | collapsed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
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
        anchor_cells = _anchor_cells(mine, row)
        agg.append(row)
        lines.append(
            f"| {m} | {len(mine)} | {_pm(acc)} | {_pm([r['test_acc3'] for r in mine])} | "
            f"{_pm([r['test_acc5'] for r in mine])} | {delta} | {wtl} | {anchor_cells} |"
        )
    teacher = {s: next(r["teacher_student_test_acc"] for r in rows if r["seed"] == s) for s in seeds}
    lines += ["", f"Teacher accuracy on the student-domain test split: {_pm(list(teacher.values()))} "
              f"(per seed: {', '.join(f'{100 * v:.1f}' for v in teacher.values())})", ""]
    agg.append({"method": "teacher (student test)", "n": len(teacher),
                "test_acc_mean": _mean_std(list(teacher.values()))[0], "test_acc_std": _mean_std(list(teacher.values()))[1]})
    return "\n".join(lines), agg


def _anchor_cells(mine: list[dict[str, Any]], row: dict[str, Any]) -> str:
    """The Module 2 cells of a method's line (and its aggregated values into ``row``); dashes without an anchor."""
    runs = [r for r in mine if r.get("anchor_anchored_acc") is not None and r.get("anchor_anchored_acc") != ""]
    if not runs:
        return "— | — | — | —"
    for key in ("anchor_decoded_acc", "anchor_anchored_acc", "anchor_max_share", "anchor_mask_mass"):
        row[key + "_mean"], row[key + "_std"] = _mean_std([float(r[key]) for r in runs])
    collapsed = sum(r["anchor_collapsed"] in (True, "True") for r in runs)
    row["anchor_collapsed_runs"] = collapsed
    share_m, share_s = row["anchor_max_share_mean"], row["anchor_max_share_std"]
    return (f"{_pm([float(r['anchor_decoded_acc']) for r in runs])} | {_pm([float(r['anchor_anchored_acc']) for r in runs])} "
            f"| {share_m:.2f} ± {share_s:.2f} | {collapsed}/{len(runs)}")
