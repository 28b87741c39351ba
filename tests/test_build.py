"""What the build produced. CI sets AUGKD_REQUIRE_EXTENSION=1 so a failed build cannot pass as a
silent fallback; AUGKD_REQUIRE_CUDA_BUILD=1 likewise for the CUDA part (nvcc + CUDA torch present)."""

from __future__ import annotations

import os

import pytest
import torch

from augkd.ops import _extension

OPS = ["kd_loss_fwd", "kd_loss_bwd", "uncertainty_fwd", "uncertainty_bwd",
       "latent_mixup_fwd", "latent_mixup_bwd", "pixel_mixup_fwd", "pixel_mixup_bwd",
       "topk_kd_loss_fwd", "topk_kd_loss_bwd", "kd_divergence_fwd", "kd_divergence_bwd"]

needs_extension = pytest.mark.skipif(not _extension.LOADED,
                                     reason=f"extension not loaded: {_extension.WHY_NOT_LOADED}")


def test_extension_required_in_ci():
    if os.environ.get("AUGKD_REQUIRE_EXTENSION") != "1":
        pytest.skip("AUGKD_REQUIRE_EXTENSION is not set (only CI insists on the compiled extension)")
    assert _extension.LOADED, _extension.WHY_NOT_LOADED


@needs_extension
@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"augkd::{op}", "CPU")


@needs_extension
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_registered_when_cuda_was_built(op):
    if os.environ.get("AUGKD_REQUIRE_CUDA_BUILD") == "1":
        assert _extension.BUILT_WITH_CUDA, "the CUDA part was required but not built"
    if not _extension.BUILT_WITH_CUDA:
        pytest.skip("extension built without CUDA (no nvcc or a CPU-only torch)")
    assert _extension.has_cuda_kernel(op), f"augkd::{op} has no CUDA kernel although CUDA was built"
