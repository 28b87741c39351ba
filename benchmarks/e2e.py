"""End-to-end training throughput per stage (images/s), fused backend against ``AUGKD_BACKEND=torch``.

    python -m benchmarks.e2e [--rounds 1] [--full] [--out docs/results/e2e-throughput.md]

Runs ``augkd run`` in this process for the methods ``augkd`` (teacher, Module 1, 2, 3) and the baselines
``kd`` (CE + KD fine-tune from the teacher) and ``ce`` (CE fine-tune), once per backend per round,
interleaved (order alternating between rounds), on the CPU with the run's thread setting. Throughput counts the images a stage's
training steps process, over the time of those steps (evaluation and checkpoints excluded):

  teacher   teacher-domain training images per epoch
  Module 1  generated images: iters_per_epoch x (1 G step + student_steps S/E steps) x batch_size
  Module 2  student-domain training images (anchor-mapped, decoded and scored by the teacher)
  Module 3  student-domain training images (each with its mixed partner: 2 student inputs per image)
  finetune  student-domain training images (the ce / kd baselines)

By default the epochs are shortened (every step is the same work, so the rate holds); ``--full`` runs
the default epochs.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from .profile_job import run_job

SHORT = ["teacher.epochs=2", "df.epochs=1", "df.iters_per_epoch=10", "anchor.epochs=20", "mixup.epochs=40"]
METHODS = ("augkd", "kd", "ce")
STAGE_NAMES = {"teacher": "teacher", "df": "Module 1", "anchor": "Module 2", "mixup": "Module 3",
               "finetune": "finetune"}


def images_per_epoch(cfg, data, stage: str) -> int:
    if stage == "teacher":
        return len(data.teacher.train)
    if stage == "df":
        return cfg.df.iters_per_epoch * (1 + cfg.df.student_steps) * cfg.df.batch_size
    n = len(data.student.train)
    if stage == "anchor":  # a trailing batch of one is dropped (BatchNorm1d in train mode)
        return n - (1 if n % cfg.anchor.batch_size == 1 else 0)
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full", action="store_true", help="the default epochs instead of the shortened job")
    p.add_argument("--backends", default="auto,torch")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    from augkd.config import build_config, parse_overrides
    from augkd.method.rundir import load_data

    names = [b.strip() for b in args.backends.split(",")]
    overrides = [] if args.full else SHORT
    rates: dict[tuple[str, str, str], list[float]] = {}
    for r in range(args.rounds):
        for method in METHODS:
            # the order alternates between rounds (ABBA), so neither backend always runs first
            for backend in (names if r % 2 == 0 else names[::-1]):
                times, _, _ = run_job(overrides + [f"method={method}"], backend, args.seed)
                cfg = build_config(parse_overrides(overrides + [f"method={method}", f"seed={args.seed}"]))
                data = load_data(cfg)
                for stage, st in times.stages.items():
                    if st.train > 0:
                        rate = images_per_epoch(cfg, data, stage) * st.epochs / st.train
                        rates.setdefault((method, stage, backend), []).append(rate)
                print(f"  {method} {backend}: {times.total:.1f} s", file=sys.stderr, flush=True)
    lines = [
        f"CPU, {torch.get_num_threads()} thread(s) (the run's default), torch {torch.__version__}; "
        f"{'default epochs' if args.full else 'shortened job: ' + ' '.join(SHORT)}; median of {args.rounds} "
        f"interleaved round(s) (order alternating); training steps only (evaluation and checkpoints excluded)",
        "",
        "| method | stage | " + " | ".join(f"{b} (images/s)" for b in names) + " | "
        + " | ".join(f"{names[0]} / {b}" for b in names[1:]) + " |",
        "|---|---|" + "---|" * (2 * len(names) - 1),
    ]
    for method in METHODS:
        for stage in STAGE_NAMES:
            if (method, stage, names[0]) not in rates:
                continue
            med = [statistics.median(rates[(method, stage, b)]) for b in names]
            lines.append(f"| {method} | {STAGE_NAMES[stage]} | " + " | ".join(f"{r:.0f}" for r in med) + " | "
                         + " | ".join(f"{med[0] / r:.2f}x" for r in med[1:]) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("# End-to-end training throughput per stage\n\n`python -m benchmarks.e2e"
                     + (" --full" if args.full else "") + f" --rounds {args.rounds}`\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
