"""Where the time of an ``augkd run`` goes: per stage (training / evaluation / epoch bookkeeping) and,
with ``--profiler``, which share of the operator time goes to the networks, their backward passes,
the BN-statistics hooks, the fused ops, the optimisers, host synchronisations (``.item()``) and what is
left to Python.

    python -m benchmarks.profile_job                       # the default job, both backends, interleaved
    python -m benchmarks.profile_job --profiler --short    # torch.profiler on a shortened job
    python -m benchmarks.profile_job --set df.epochs=1     # any config override

Each variant runs in this process one after another (``--rounds`` times, interleaved), so load on a
shared machine hits them alike; compare the ratios, not the absolute seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections import defaultdict

import torch

from augkd.config import build_config, parse_overrides
from augkd.ops import backends

from .stage_timer import JobTimes, timed_stages

# A job of the default's shape with fewer epochs: every code path, a fraction of the time.
SHORT = ["teacher.epochs=2", "df.epochs=1", "df.iters_per_epoch=10", "anchor.epochs=20", "mixup.epochs=40"]
STAGE_ORDER = ("teacher", "df", "anchor", "mixup", "finetune")

LAYER_OPS = ("conv", "batch_norm", "linear", "addmm", "mm", "relu", "leaky_relu", "max_pool", "upsample",
             "sigmoid", "tanh", "flatten", "view", "native_batch_norm", "_convolution", "mkldnn", "threshold")


def category(name: str) -> str:
    low = name.lower()
    if "augkd" in low:
        return "fused ops (fwd+bwd)"
    if low.startswith("optimizer."):
        return "optimizer step / zero_grad"
    if low in ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"):
        return "host syncs (.item(), bool())"
    if "var_mean" in low:
        return "BN-statistics hooks"
    if low.startswith("autograd::engine::evaluate_function"):
        return "backward (networks, losses)"
    if low.startswith("aten::") and any(k in low[6:] for k in LAYER_OPS):
        return "network layers (forward)"
    return "other torch ops (loss algebra, cat, randn, indexing, ...)"


def op_breakdown(prof, wall: float) -> tuple[dict[str, float], dict[str, int], list[tuple[str, float, int]]]:
    """Seconds per category of the outermost operator calls, the call counts, and the top ops by self time.
    The rest of ``wall`` (no operator running) is Python: the method's own code, module calls, dispatch."""
    seconds: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    self_time: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.is_user_annotation:
            continue
        self_time[ev.name][0] += ev.self_cpu_time_total / 1e6
        self_time[ev.name][1] += 1
        parent = ev.cpu_parent
        while parent is not None and parent.is_user_annotation:
            parent = parent.cpu_parent
        if parent is not None:
            continue
        cat = category(ev.name)
        seconds[cat] += ev.cpu_time_total / 1e6
        counts[cat] += 1
    seconds["Python (no operator running)"] = max(0.0, wall - sum(seconds.values()))
    top = sorted(((n, t, c) for n, (t, c) in self_time.items()), key=lambda r: -r[1])[:15]
    return dict(seconds), dict(counts), top


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """``backend`` or ``backend:ENV=VALUE+ENV=VALUE`` (environment set for that variant's job only)."""
    backend, _, env = spec.partition(":")
    return backend, dict(kv.split("=", 1) for kv in env.split("+") if kv)


@contextlib.contextmanager
def environment(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_job(overrides: list[str], variant: str, seed: int, profiler: bool = False):
    """One ``augkd run`` in this process as ``variant`` (see parse_variant); returns (JobTimes, profiler or
    None, summary)."""
    from augkd.method.pipeline import run_method
    from augkd.method.rundir import finish, prepare

    backend, env = parse_variant(variant)

    cfg = build_config(parse_overrides(["plots=false", f"seed={seed}", "device=cpu", *overrides]))
    times = JobTimes()
    with tempfile.TemporaryDirectory(prefix="augkd-profile-") as tmp:
        ctx = prepare(cfg, os.path.join(tmp, "run"), quiet=True)
        prof_cm = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                   if profiler else contextlib.nullcontext())
        try:
            with environment(env), backends.use_backend(backend), timed_stages(times, annotate=profiler), prof_cm as prof:
                t0, c0 = time.perf_counter(), time.process_time()
                summary = run_method(ctx)
                times.total = time.perf_counter() - t0
                times.cpu = time.process_time() - c0
        finally:
            finish(ctx)
    return times, prof, summary


def stage_table(results: dict[str, list[JobTimes]]) -> str:
    names = list(results)
    lines = ["| stage | epochs | " + " | ".join(f"{n}: wall s (train / eval / loop)" for n in names)
             + (" | " + " / ".join(names[1:]) + f" vs {names[0]}" if len(names) > 1 else "") + " |",
             "|---|---|" + "---|" * len(names) + ("---|" if len(names) > 1 else "")]

    def med(values):
        values = sorted(values)
        return values[len(values) // 2]

    first = results[names[0]][0]
    for stage in [s for s in STAGE_ORDER if s in first.stages] + ["total"]:
        cells, walls = [], []
        for n in names:
            if stage == "total":
                w = med([t.total for t in results[n]])
                cells.append(f"{w:.1f}")
            else:
                st = [t.stages[stage] for t in results[n]]
                w = med([s.wall for s in st])
                cells.append(f"{w:.1f} ({med([s.train for s in st]):.1f} / {med([s.eval for s in st]):.1f} / "
                             f"{med([s.bookkeeping for s in st]):.1f})")
            walls.append(w)
        epochs = "" if stage == "total" else str(first.stages[stage].epochs)
        ratio = (" | " + " / ".join(f"{w / walls[0]:.2f}x" for w in walls[1:])) if len(names) > 1 else ""
        lines.append(f"| {stage} | {epochs} | " + " | ".join(cells) + ratio + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="auto,torch",
                   help="comma-separated backend[:ENV=VALUE+...] variants, run interleaved (default auto,torch)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--short", action="store_true", help="fewer epochs per stage: " + " ".join(SHORT))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--profiler", action="store_true", help="torch.profiler breakdown (first backend, one run)")
    args = p.parse_args(argv)
    overrides = (SHORT if args.short else []) + args.set
    names = [b.strip() for b in args.variants.split(",") if b.strip()]
    print(f"# augkd run {' '.join(overrides) or '(defaults)'} plots=false, seed {args.seed}, threads as the "
          f"run sets them, torch {torch.__version__}")

    if args.profiler:
        times, prof, _ = run_job(overrides, names[0], args.seed, profiler=True)
        wall = sum(s.train + s.eval for s in times.stages.values())
        seconds, counts, top = op_breakdown(prof, times.total)
        print(f"\nbackend {names[0]}: job {times.total:.1f} s (profiler on); training+evaluation {wall:.1f} s\n")
        print("| share of the job | seconds | % | outermost calls |\n|---|---|---|---|")
        for cat, sec in sorted(seconds.items(), key=lambda kv: -kv[1]):
            print(f"| {cat} | {sec:.2f} | {100 * sec / times.total:.0f}% | {counts.get(cat, '')} |")
        print("\ntop ops by self CPU time:\n\n| op | self s | calls | us per call |\n|---|---|---|---|")
        for name, t, c in top:
            print(f"| {name[:70]} | {t:.2f} | {c} | {1e6 * t / c:.0f} |")
        print("\n" + stage_table({names[0]: [times]}))
        return 0

    results: dict[str, list[JobTimes]] = {n: [] for n in names}
    accs: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            times, _, summary = run_job(overrides, n, args.seed)
            results[n].append(times)
            accs[n].append(summary["test"]["acc"])
            print(f"  {n}: {times.total:.1f} s wall, {times.cpu:.1f} s CPU, test acc {100 * summary['test']['acc']:.2f}%", file=sys.stderr)
    print()
    print(stage_table(results))
    print("\nprocess CPU time (s): " + ", ".join(
        f"{n} {sorted(t.cpu for t in results[n])[len(results[n]) // 2]:.1f}" for n in names))
    print("test acc: " + ", ".join(f"{n} {100 * accs[n][0]:.2f}%" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
