"""The whole ``augkd run`` job, timed side by side: code trees x backends, interleaved, one subprocess each.

    python -m benchmarks.compare_job --variant base=/path/to/old/tree:torch --variant new=.:auto \\
        --variant new-torch=.:torch [--rounds 1] [--seed 0] [-- key=value ...]

A variant is ``label=TREE:BACKEND``: ``python -m augkd run`` with ``PYTHONPATH=TREE`` and
``AUGKD_BACKEND=BACKEND`` (TREE holds its own built ``augkd/_C*.so``); ``--env label=NAME=VALUE`` adds an
environment variable to that variant's job (e.g. ``AUGKD_SIDE_THREAD=1``). Each round runs every variant once,
in turn, so load on a shared machine hits them alike. Reported: wall and CPU seconds of each job (the
child's user+system time: less sensitive to other load than the wall time), their ratios to the first
variant, and the test accuracy from the run's summary.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def run_variant(tree: str, backend: str, seed: int, overrides: list[str], out: str,
                extra_env: dict[str, str] | None = None) -> dict:
    env = dict(os.environ, **(extra_env or {}), PYTHONPATH=os.path.abspath(tree), AUGKD_BACKEND=backend)
    cmd = [sys.executable, "-m", "augkd", "run", "--quiet", "--device", "cpu", "--seed", str(seed), "--out", out,
           "plots=false", *overrides]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=os.path.abspath(tree), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics", "summary.json")) as fh:
        summary = json.load(fh)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "acc": summary["test"]["acc"],
            "stages": {k: v.get("seconds") for k, v in summary.get("stages", {}).items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True, metavar="LABEL=TREE:BACKEND")
    p.add_argument("--env", action="append", default=[], metavar="LABEL=NAME=VALUE")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="directory to keep the run directories in")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value) for every variant")
    args = p.parse_args(argv)
    variants = []
    for spec in args.variant:
        label, _, rest = spec.partition("=")
        tree, _, backend = rest.rpartition(":")
        variants.append((label, tree, backend))
    envs: dict[str, dict[str, str]] = {label: {} for label, _, _ in variants}
    for spec in args.env:
        label, _, assignment = spec.partition("=")
        name, eq, value = assignment.partition("=")
        if label not in envs or not name or not eq:
            p.error(f"--env expects LABEL=NAME=VALUE with LABEL one of {sorted(envs)}, got {spec!r}")
        envs[label][name] = value
    base = args.keep or tempfile.mkdtemp(prefix="augkd-compare-job-")
    results: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
    for r in range(args.rounds):
        for label, tree, backend in variants:
            out = os.path.join(base, f"{label}-r{r}")
            res = run_variant(tree, backend, args.seed, args.overrides, out, envs[label])
            results[label].append(res)
            print(f"  round {r}: {label}: {res['wall']:.1f} s wall, {res['cpu']:.1f} s CPU, "
                  f"test acc {100 * res['acc']:.2f}%", file=sys.stderr, flush=True)
    first = variants[0][0]
    med = {label: {k: statistics.median(x[k] for x in rs) for k in ("wall", "cpu")} for label, rs in results.items()}
    print(f"augkd run --seed {args.seed} plots=false {' '.join(args.overrides)}: {args.rounds} interleaved "
          f"round(s), medians\n")
    print(f"| variant | tree | backend | wall (s) | CPU (s) | wall / {first} | CPU / {first} | test acc (%) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, tree, backend in variants:
        m = med[label]
        if envs[label]:
            backend += " " + " ".join(f"{k}={v}" for k, v in envs[label].items())
        accs = ", ".join(f"{100 * x['acc']:.2f}" for x in results[label])
        print(f"| {label} | {tree} | {backend} | {m['wall']:.1f} | {m['cpu']:.1f} | "
              f"{m['wall'] / med[first]['wall']:.2f}x | {m['cpu'] / med[first]['cpu']:.2f}x | {accs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
