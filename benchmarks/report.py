"""Side-by-side speed and memory report of the fused ops, as a markdown table.

    python -m benchmarks.report [--device cpu|cuda] [--repeats 15] [--only kd_loss] [--out FILE]

Providers are timed interleaved (one call of each in turn, `repeats` rounds) so that load on a shared
machine hits them alike; the table gives medians and ratios measured in the same run.

Timing runs in this process. By default (`--malloc keep`, CPU) glibc is told to keep freed memory
(mallopt: no trimming, no mmap for large blocks), as jemalloc/tcmalloc do and as PyTorch's CPU
performance guide recommends: otherwise each provider's large outputs are fresh pages on most steps,
and on a VM a 4 KiB page fault costs about as much as the kernel's own work on that page, so the
figures would measure the OS and the heap state more than the kernels. It applies to all providers
alike; `--malloc system` times with glibc's defaults. Peak extra memory (CPU) is measured
in a child process whose malloc mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_), so that freed large
buffers go back to the OS and every step's allocations are counted afresh: the kernel's high-water mark
(VmHWM) is reset before one forward+backward and read after it, minus the resident size before.
On CUDA: torch.cuda.max_memory_allocated over the step, minus what was allocated before.
Memory is also given in units of one B x C buffer (the gradient the step must return).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from augkd.ops import _extension, backends

from .cases import all_cases, step


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


SKIPPED: dict[str, str] = {}  # provider -> why it has no rows


def _providers(case) -> dict:
    formulas = dict(case.formulas)
    if "liger" in formulas:
        try:
            import liger_kernel  # noqa: F401
        except ImportError as exc:
            formulas.pop("liger")
            SKIPPED["liger"] = f"liger_kernel does not import here ({exc})"
    return formulas


def peaks(cases, device) -> dict:
    """{case name: {provider: peak extra bytes of one warmed-up forward+backward}}."""
    result = {}
    for case in cases:
        result[case.name] = {}
        for name, formula in _providers(case).items():
            built = case.build(device, torch.float32)
            step(built, formula)
            step(built, formula)
            result[case.name][name] = peak_extra_bytes(built, formula, device)
            del built
    return result


def measure_memory(argv, device, cases) -> dict:
    """CUDA: in this process (the caching allocator's counters are exact). CPU: in a child process whose
    malloc mmap threshold is pinned, which prints `peaks` as JSON."""
    if device.type == "cuda":
        return peaks(cases, device)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run([sys.executable, "-m", "benchmarks.report", *argv, "--memory-child"], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def keep_freed_memory() -> bool:
    """mallopt(M_TRIM_THRESHOLD, M_MMAP_THRESHOLD) so freed blocks stay in the heap; False where not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_trim_threshold, 2**30) and libc.mallopt(m_mmap_threshold, 2**30))
    except (OSError, AttributeError):
        return False


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--only", default=None, help="op names, comma-separated, e.g. kd_loss,topk_kd_loss")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--malloc", default="keep", choices=["keep", "system"],
                        help="CPU timing: keep freed memory in the heap (default) or glibc's defaults")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    only = None if args.only is None else set(args.only.split(","))
    cases = [c for c in all_cases(gpu=gpu) if only is None or c.op in only]
    if args.memory_child:
        print(json.dumps(peaks(cases, device)))
        return
    memory = measure_memory([a for a in argv if a != "--memory-child"], device, cases)
    malloc = "n/a"
    if device.type == "cpu":  # after the memory child: it needs glibc's own behaviour
        malloc = "keeps freed memory" if args.malloc == "keep" and keep_freed_memory() else "glibc defaults"

    lines = [f"device {device} ({torch.cuda.get_device_name() if gpu else f'{torch.get_num_threads()} threads'}), "
             f"torch {torch.__version__}, fp32, forward+backward, median of {args.repeats} interleaved rounds; "
             f"augkd backend: {backends.select(device)}" + (f"; malloc {malloc}" if device.type == "cpu" else ""),
             "",
             "| op | shape | provider | time (ms) | eager / this | compile / this | peak extra (MiB) | in B x C buffers |",
             "|---|---|---|---|---|---|---|---|"]
    for case in cases:
        formulas = _providers(case)
        built = {name: case.build(device, torch.float32) for name in formulas}
        for name, formula in formulas.items():  # warm-up, compile
            step(built[name], formula)
            step(built[name], formula)
        medians = time_interleaved(built, formulas, args.repeats, device)
        unit = case.buffer_elems * 4
        for name in formulas:
            peak = memory[case.name][name]
            lines.append(
                f"| {case.op} | {'x'.join(map(str, case.shape))} | {name} | {medians[name] * 1e3:.2f} | "
                f"{medians['eager'] / medians[name]:.2f}x | {medians['compile'] / medians[name]:.2f}x | "
                f"{peak / 2**20:.1f} | {peak / unit:.2f} |")
        print("\n".join(lines[-len(formulas):]), file=sys.stderr, flush=True)
        del built
    lines += [f"\n{name}: not measured: {why}" for name, why in SKIPPED.items()]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")
    if not _extension.LOADED and device.type == "cpu":
        print(f"\nnote: augkd._C not loaded ({_extension.WHY_NOT_LOADED}): augkd rows ran the torch backend")


if __name__ == "__main__":
    main()
