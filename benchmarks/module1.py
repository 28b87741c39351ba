"""Module 1 (data-free learning) alone: its CPU and wall time, the epoch losses it logs, and optionally a
torch.profiler table of its operators. Runs against whichever ``augkd`` is importable, so the same
script times two checkouts side by side (alternate them: the machine's load hits both alike):

    PYTHONPATH=<checkout> python benchmarks/module1.py --iters 20          # one epoch of 20 iterations
    PYTHONPATH=<checkout> python benchmarks/module1.py --iters 5 --profile

The networks are built as the run builds them (``Context.place``, the stage's seeds); the teacher is
freshly initialised (not trained), which changes no shape or operator, only the numbers. Reported: the
process's CPU time, the training thread's own CPU time (with work in other threads, the critical path
when a core is free for them), the wall time and the last epoch's metrics row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20, help="df.iters_per_epoch (one epoch is run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="print the top operators by self CPU time")
    p.add_argument("--rows", type=int, default=25, help="rows of the profiler table")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further config overrides")
    args = p.parse_args(argv)

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
