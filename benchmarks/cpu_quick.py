"""Quick CPU timing of the C++ ops (torch.ops.augkd.*, forward + backward) against torch eager and
torch.compile of the same formulas. Medians of time.perf_counter over repeated calls; compile warm-up is
excluded. Usage: .venv/bin/python benchmarks/cpu_quick.py [--only kd,unc,latent,pixel] [--reps N]"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import augkd._C  # noqa: F401,E402

ops = torch.ops.augkd


def interleaved_times(fns, reps, min_time=0.5):
    """Times each function once per round, rounds repeated (the machine may be shared: interleaving makes
    the competitors see the same load). Returns per function (median, min) in seconds."""
    for fn in fns:
        for _ in range(3):
            fn()
    times = [[] for _ in fns]
    t_end = time.perf_counter() + min_time
    rounds = 0
    while rounds < reps or (time.perf_counter() < t_end and rounds < 20 * reps):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        rounds += 1
    return [(statistics.median(ts), min(ts)) for ts in times]


# --------------------------------------------------------------------------------------- formulas (torch)

def kd_formula(s, t, T):
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean",
                    log_target=True) * T * T


def unc_formula(z, T):
    u = z / T
    lse = torch.logsumexp(u, -1)
    lp = torch.log_softmax(u, -1)
    return -T * lse, -(lp.exp() * lp).sum(-1)


def latent_formula(z, m, psi, s):
    return z + (1 - s)[:, None] * m * (psi - z)


def pixel_formula(g, r, s, mean, std):
    return ((1 - s)[:, None, None, None] * g + s[:, None, None, None] * r - mean[:, None, None]) / std[:, None, None]


# --------------------------------------------------------------------------------------- cases

def bench_kd(B, C, reps, T=4.0):
    s0 = torch.randn(B, C) * 3
    t = torch.randn(B, C) * 3
    g = torch.full((B,), 1.0 / B)
    zeros = torch.zeros(B)

    def ours():
        loss, stats = ops.kd_loss_fwd(s0, t, None, T, 1.0, -100, True, 0)
        ops.kd_loss_bwd(g, zeros, s0, t, None, stats, T, 1.0, -100, True, 0, True, False)

    s = s0.clone().requires_grad_(True)
    compiled = torch.compile(kd_formula, dynamic=False)

    def eager():
        s.grad = None
        kd_formula(s, t, T).backward()

    def comp():
        s.grad = None
        compiled(s, t, T).backward()

    return ours, eager, comp


def bench_unc(B, C, reps, T=2.0):
    z0 = torch.randn(B, C) * 3
    ge, gh = torch.randn(B), torch.randn(B)

    def ours():
        e, h = ops.uncertainty_fwd(z0, T)
        ops.uncertainty_bwd(ge, gh, z0, e, h, T)

    z = z0.clone().requires_grad_(True)
    compiled = torch.compile(unc_formula, dynamic=False)

    def run(fn):
        z.grad = None
        e, h = fn(z, T)
        torch.autograd.backward([e, h], [ge, gh])

    return ours, (lambda: run(unc_formula)), (lambda: run(compiled))


def bench_latent(B, L, reps, shared=False):
    z0, psi0 = torch.randn(B, L), torch.randn(B, L)
    m0 = torch.rand(1 if shared else B, L)
    s0 = torch.rand(B)
    go = torch.randn(B, L)

    def ours():
        ops.latent_mixup_fwd(z0, m0, psi0, s0, 0.0)
        ops.latent_mixup_bwd(go, z0, m0, psi0, s0, 0.0)

    ts = [x.clone().requires_grad_(True) for x in (z0, m0, psi0, s0)]
    compiled = torch.compile(latent_formula, dynamic=False)

    def run(fn):
        for x in ts:
            x.grad = None
        fn(*ts).backward(go)

    return ours, (lambda: run(latent_formula)), (lambda: run(compiled))


def bench_pixel(B, C, H, W, reps):
    g0, r0 = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    s0 = torch.rand(B)
    mean, std = torch.rand(C), torch.rand(C) + 0.5
    go = torch.randn(B, C, H, W)

    def ours():
        ops.pixel_mixup_fwd(g0, r0, s0, 0.0, mean, std)
        ops.pixel_mixup_bwd(go, g0, r0, s0, 0.0, mean, std)

    ts = [x.clone().requires_grad_(True) for x in (g0, r0, s0)]
    compiled = torch.compile(pixel_formula, dynamic=False)

    def run(fn):
        for x in ts:
            x.grad = None
        fn(*ts, mean, std).backward(go)

    return ours, (lambda: run(pixel_formula)), (lambda: run(compiled))


CASES = {
    "kd": [("kd_loss", bench_kd, (4096, 1000)), ("kd_loss", bench_kd, (512, 32000)), ("kd_loss", bench_kd, (64, 31))],
    "unc": [("uncertainty", bench_unc, (4096, 1000)), ("uncertainty", bench_unc, (512, 32000))],
    "latent": [("latent_mixup", bench_latent, (4096, 256)), ("latent_mixup", bench_latent, (65536, 100))],
    "pixel": [("pixel_mixup", bench_pixel, (2048, 3, 32, 32))],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="kd,unc,latent,pixel")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'op':14s} {'shape':18s} {'ours ms':>9s} {'eager ms':>9s} {'compile ms':>10s} {'vs eager':>9s} "
          f"{'vs compile':>10s}")
    for key in args.only.split(","):
        for name, make, shape in CASES[key]:
            ours, eager, comp = make(*shape, args.reps)
            fns = [ours, eager] if args.no_compile else [ours, eager, comp]
            res = interleaved_times(fns, args.reps)
            if args.no_compile:
                res.append((float("nan"), float("nan")))
            (mo, no), (me, ne), (mc, nc) = res
            print(f"{name:14s} {str(shape):18s} {mo * 1e3:9.3f} {me * 1e3:9.3f} {mc * 1e3:10.3f} "
                  f"{me / mo:8.2f}x {mc / mo:9.2f}x   | min: {no * 1e3:.3f} {ne * 1e3:.3f} {nc * 1e3:.3f} "
                  f"{ne / no:.2f}x {nc / no:.2f}x", flush=True)


if __name__ == "__main__":
    main()
