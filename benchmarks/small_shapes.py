"""Per-call forward+backward cost of each fused op at the shapes the method uses, against the torch
backend (the same front end, the reference formulas) and the formula as a torch user writes it (eager).

    python -m benchmarks.small_shapes [--repeats 30] [--calls 200] [--threads 1]

Providers are timed interleaved, ``calls`` calls per sample, ``repeats`` samples, median; the ratios
are what to read on a shared machine. The method runs with one intra-op thread by default (``threads``
auto on 2 cores), so that is the default here.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import augkd.ops as ops
from augkd.ops import backends

from .cases import kd_eager, latent_eager, pixel_eager, unc_eager

# (op, shape, what the method does with it)
SHAPES = [
    ("kd_loss", (64, 10), "Module 1 generator and student steps"),
    ("kd_loss", (200, 10), "Module 3 step (real + mixed halves of k=10)"),
    ("kd_loss", (4096, 10), "larger batch"),
    ("uncertainty", (100, 10), "Module 2 step (k=10)"),
    ("uncertainty", (256, 10), "Module 2 step (batch 256)"),
    ("uncertainty", (4096, 10), "larger batch"),
    ("latent_mixup", (100, 32), "Module 3 latent mixup (k=10)"),
    ("latent_mixup", (256, 32), "batch 256"),
    ("latent_mixup", (1024, 32), "crossover search"),
    ("latent_mixup", (2048, 32), "crossover search"),
    ("latent_mixup", (4096, 32), "larger batch"),
    ("pixel_mixup", (64, 1, 16, 16), "batch 64 digits"),
    ("pixel_mixup", (100, 1, 16, 16), "Module 3 pixel mixup (k=10)"),
    ("pixel_mixup", (1024, 1, 16, 16), "larger batch"),
]


def build(op: str, shape: tuple):
    """-> (inputs dict, leaves, eager fn, front-end fn). Front end = augkd.ops.<op> (backend chosen outside)."""
    g = torch.Generator().manual_seed(0)
    if op == "kd_loss":
        s = (3 * torch.randn(shape, generator=g)).requires_grad_()
        t = 3 * torch.randn(shape, generator=g)
        y = torch.randint(0, shape[1], shape[:1], generator=g)
        return (dict(s=s, t=t, y=y), [s], kd_eager,
                lambda s, t, y: ops.kd_loss(s, t, y, temperature=4.0, alpha=0.5))
    if op == "uncertainty":
        z = (3 * torch.randn(shape, generator=g)).requires_grad_()

        def front(z):
            e, h = ops.uncertainty(z)
            return e.sum() + h.sum()
        return dict(z=z), [z], unc_eager, front
    if op == "latent_mixup":
        z, psi = (torch.randn(shape, generator=g).requires_grad_() for _ in range(2))
        m = torch.rand(shape, generator=g).requires_grad_()
        return (dict(z=z, m=m, psi=psi, s=0.3), [z, m, psi], lambda **kw: latent_eager(**kw).sum(),
                lambda z, m, psi, s: ops.latent_mixup(z, m, psi, s).sum())
    if op == "pixel_mixup":
        gen = torch.rand(shape, generator=g).requires_grad_()
        real = torch.rand(shape, generator=g)
        mean, std = torch.tensor([0.5]).view(1, 1, 1, 1), torch.tensor([0.25]).view(1, 1, 1, 1)
        return (dict(g=gen, r=real, s=0.3), [gen], lambda g, r, s: pixel_eager(g, r, s, mean, std).sum(),
                lambda g, r, s: ops.pixel_mixup(g, r, s, mean=(0.5,), std=(0.25,)).sum())
    raise ValueError(op)


def providers(op: str, shape: tuple) -> dict:
    inputs, leaves, eager, front = build(op, shape)

    def runner(fn, backend=None):
        def run():
            if backend is None:
                out = fn(**inputs)
            else:
                with backends.use_backend(backend):
                    out = fn(**inputs)
            out.backward()
            for leaf in leaves:
                leaf.grad = None
        return run
    return {"eager": runner(eager), "torch backend": runner(front, "torch"), "fused (cpu)": runner(front, "cpu"),
            "auto": runner(front, "auto")}


def measure(op: str, shape: tuple, repeats: int, calls: int) -> dict[str, float]:
    runs = providers(op, shape)
    for run in runs.values():
        for _ in range(5):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                run()
            samples[name].append((time.perf_counter() - t0) / calls)
    return {name: statistics.median(v) for name, v in samples.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default=None, help="one op name")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU fp32, forward+backward per call, {args.threads} thread(s), median of {args.repeats} interleaved "
          f"samples of {args.calls} calls; torch {torch.__version__}\n")
    print("| op | shape | used for | eager (us) | torch backend (us) | fused cpu (us) | auto (us) | "
          "fused vs torch backend | auto picks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for op, shape, what in SHAPES:
        if args.only and op != args.only:
            continue
        t = measure(op, shape, args.repeats, args.calls)
        from augkd.ops.crossover import cheaper_backend
        pick = cheaper_backend(op, shape, "cpu")
        print(f"| {op} | {'x'.join(map(str, shape))} | {what} | {1e6 * t['eager']:.0f} | "
              f"{1e6 * t['torch backend']:.0f} | {1e6 * t['fused (cpu)']:.0f} | {1e6 * t['auto']:.0f} | "
              f"{t['torch backend'] / t['fused (cpu)']:.2f}x | {pick} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
