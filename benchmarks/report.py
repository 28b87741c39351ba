"""Side-by-side speed and memory report of the fused ops, as a markdown table.

    python -m benchmarks.report [--device cpu|cuda] [--repeats 15] [--only kd_loss] [--out FILE]

Providers are timed interleaved (one call of each in turn, `repeats` rounds) so that load on a shared
machine hits them alike; the table gives medians and ratios measured in the same run.

Peak extra memory (CPU): the kernel's per-process high-water mark (VmHWM) is reset before one
forward+backward and read after it, minus the resident size before. malloc's mmap threshold is pinned
(MALLOC_MMAP_THRESHOLD_) so freed large buffers go back to the OS and every step's allocations are
counted afresh. On CUDA: torch.cuda.max_memory_allocated over the step, minus what was allocated before.
Memory is also given in units of one B x C buffer (the gradient the step must return).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # must be set before the process starts: re-exec
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.report", *sys.argv[1:]])

import torch  # noqa: E402

from augkd.ops import _extension, backends  # noqa: E402

from .cases import all_cases, step  # noqa: E402


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(built, formula, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(built, formula)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    for leaf in built["leaves"]:
        leaf.grad = None
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    step(built, formula)
    return (_status_kib("VmHWM") - before) * 1024


def time_interleaved(built_by_provider, formulas, repeats, device):
    times = {name: [] for name in formulas}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(repeats):
        for name, formula in formulas.items():
            sync()
            start = time.perf_counter()
            step(built_by_provider[name], formula)
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--only", default=None, help="op name filter, e.g. kd_loss")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    cases = [c for c in all_cases(gpu=gpu) if args.only is None or c.op == args.only]

    lines = [f"device {device} ({torch.cuda.get_device_name() if gpu else f'{torch.get_num_threads()} threads'}), "
             f"torch {torch.__version__}, fp32, forward+backward, median of {args.repeats} interleaved rounds; "
             f"augkd backend: {backends.select(device)}",
             "",
             "| op | shape | provider | time (ms) | eager / this | compile / this | peak extra (MiB) | in B x C buffers |",
             "|---|---|---|---|---|---|---|---|"]
    for case in cases:
        formulas = dict(case.formulas)
        if "liger" in formulas:
            try:
                import liger_kernel  # noqa: F401
            except ImportError:
                formulas.pop("liger")
        built = {name: case.build(device, torch.float32) for name in formulas}
        for name, formula in formulas.items():  # warm-up, compile
            step(built[name], formula)
            step(built[name], formula)
        medians = time_interleaved(built, formulas, args.repeats, device)
        unit = case.buffer_elems * 4
        for name, formula in formulas.items():
            peak = peak_extra_bytes(built[name], formula, device)
            lines.append(
                f"| {case.op} | {'x'.join(map(str, case.shape))} | {name} | {medians[name] * 1e3:.2f} | "
                f"{medians['eager'] / medians[name]:.2f}x | {medians['compile'] / medians[name]:.2f}x | "
                f"{peak / 2**20:.1f} | {peak / unit:.2f} |")
        print(lines[-len(formulas):] and "\n".join(lines[-len(formulas):]), file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")
    if not _extension.LOADED and device.type == "cpu":
        print(f"\nnote: augkd._C not loaded ({_extension.WHY_NOT_LOADED}): augkd rows ran the torch backend")


if __name__ == "__main__":
    main()
