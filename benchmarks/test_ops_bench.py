"""pytest-benchmark suite of the fused ops against eager torch and torch.compile (CPU fp32).

    make bench                       # or: python -m pytest benchmarks -q
    python -m pytest benchmarks -q --benchmark-group-by=param:case

Timings come from pytest-benchmark; ratios side by side are what `python -m benchmarks.report` prints.
"""

from __future__ import annotations

import pytest
import torch

from .cases import all_cases, step

CASES = all_cases()
PROVIDERS = ["eager", "compile", "augkd", "augkd-dense", "liger"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "") for c in CASES])
def test_forward_backward(benchmark, case, provider):
    if provider not in case.formulas:
        pytest.skip(f"{case.op} has no {provider} provider")
    if provider == "liger":
        pytest.importorskip("liger_kernel", reason="Liger-Kernel (pip liger-kernel) is not installed")
    built = case.build(torch.device("cpu"), torch.float32)
    formula = case.formulas[provider]
    step(built, formula)  # warm-up (and compilation for torch.compile)
    benchmark.extra_info.update(op=case.op, shape=str(case.shape), provider=provider)
    benchmark.pedantic(step, args=(built, formula), rounds=10, iterations=1, warmup_rounds=1)
