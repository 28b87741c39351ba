"""Module 1 (data-free learning) alone: its CPU and wall time, the epoch losses it logs, and optionally a
torch.profiler table of its operators. Runs against whichever ``augkd`` is importable, so the same
script times two checkouts side by side (alternate them: the machine's load hits both alike):

    PYTHONPATH=<checkout> python benchmarks/module1.py --iters 20          # one epoch of 20 iterations
    PYTHONPATH=<checkout> python benchmarks/module1.py --iters 5 --profile
    python benchmarks/module1.py --iters 20 --pairs 3 --trees <before checkout> <after checkout>

The networks are built as the run builds them (``Context.place``, the stage's seeds); the teacher is
freshly initialised (not trained), which changes no shape or operator, only the numbers. Reported: the
process's CPU time, the training thread's own CPU time (with work in other threads, the critical path
when a core is free for them), the wall time and the last epoch's metrics row.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time


def alternate(trees: list[str], pairs: int, iters: int, extra: list[str]) -> int:
    """Run this script against each tree in turn (the order flipped every other round), one subprocess
    each; print every run and, per tree, the median CPU, training-thread CPU and wall seconds."""
    runs: dict[str, list[dict]] = {t: [] for t in trees}
    for r in range(pairs):
        for tree in trees if r % 2 == 0 else trees[::-1]:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--iters", str(iters), *extra],
                                 cwd=os.path.abspath(tree), env=env, capture_output=True, text=True, check=True)
            d = json.loads(out.stdout.splitlines()[0])
            d["digest"] = hashlib.md5(json.dumps(d["row"], sort_keys=True).encode()).hexdigest()[:12]
            runs[tree].append(d)
            print(f"round {r + 1} {tree}: CPU {d['cpu_s']:.2f} s, training thread {d['main_thread_cpu_s']:.2f} s, "
                  f"wall {d['wall_s']:.2f} s, metrics {d['digest']}", flush=True)

    def med(tree, key):
        values = sorted(d[key] for d in runs[tree])
        return values[len(values) // 2]

    for tree in trees:
        print(f"{tree}: median CPU {med(tree, 'cpu_s'):.2f} s, training thread {med(tree, 'main_thread_cpu_s'):.2f} s, "
              f"wall {med(tree, 'wall_s'):.2f} s")
    digests = {d["digest"] for r in runs.values() for d in r}
    print("the same metrics in every run" if len(digests) == 1 else f"metrics differ: {sorted(digests)}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20, help="df.iters_per_epoch (one epoch is run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="print the top operators by self CPU time")
    p.add_argument("--rows", type=int, default=25, help="rows of the profiler table")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further config overrides")
    p.add_argument("--trees", nargs="+", default=None, metavar="CHECKOUT",
                   help="time these checkouts (each with its built extension) in alternating rounds instead")
    p.add_argument("--pairs", type=int, default=3, help="rounds of --trees")
    args = p.parse_args(argv)
    if args.trees:
        extra = ["--seed", str(args.seed)] + (["--set", *args.set] if args.set else [])
        return alternate(args.trees, args.pairs, args.iters, extra)

    import torch

    import augkd
    from augkd import models
    from augkd.config import build_config, parse_overrides
    from augkd.method import checkpoint as ckpt
    from augkd.method.data_free import run_data_free
    from augkd.method.rundir import finish, prepare

    overrides = ["plots=false", f"seed={args.seed}", "device=cpu", "df.epochs=1",
                 f"df.iters_per_epoch={args.iters}", *args.set]
    cfg = build_config(parse_overrides(overrides))
    with tempfile.TemporaryDirectory(prefix="augkd-module1-") as tmp:
        ctx = prepare(cfg, os.path.join(tmp, "run"), quiet=True)
        try:
            c, h, _ = ctx.data.image_shape
            k = ctx.data.num_classes
            ckpt.seed_stage(cfg.seed, "teacher-init")
            teacher = ctx.place(models.build_classifier(cfg.teacher.arch, k, c, h))
            ckpt.seed_stage(cfg.seed, "df-init")
            G = ctx.place(models.Generator(cfg.df.latent_size, (c, h, h), cfg.df.generator_hidden))
            E = ctx.place(models.Encoder((c, h, h), k, cfg.df.latent_size, cfg.df.encoder_hidden))
            S = ctx.place(models.build_classifier(cfg.student.arch, k, c, h))
            prof = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
                    if args.profile else None)
            if prof is not None:
                prof.__enter__()
            t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
            result = run_data_free(ctx, teacher, G, E, S)
            wall, cpu, main = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - m0
            if prof is not None:
                prof.__exit__(None, None, None)
        finally:
            finish(ctx)
    row = {k: v for k, v in result.history[-1].items() if k != "seconds"}
    print(json.dumps({"augkd": os.path.dirname(augkd.__file__), "iters": args.iters, "threads": torch.get_num_threads(),
                      "cpu_s": round(cpu, 3), "main_thread_cpu_s": round(main, 3), "wall_s": round(wall, 3), "row": row}))
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=45))
    return 0


if __name__ == "__main__":
    sys.exit(main())
