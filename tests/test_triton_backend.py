"""Triton-specific checks beyond the shared matrix (which runs the Triton backend under the interpreter):

* multi-block online-softmax updates: the interpreter limits the matrix to small rows that fit one block,
  so here the block size is capped to 16 to sweep rows of 50 classes in 4 blocks;
* the augkd_triton schemas equal the C++ augkd schemas (one signature, two registrations);
* every kernel compiles to an sm_90 binary without a GPU (the interpreter is more lenient than ptxas).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from augkd.ops import _extension, backends

from .test_kd_loss import CONFIGS, check_against_reference
from .test_uncertainty import run as run_uncertainty

REASON = backends.why_unavailable("triton", torch.device("cpu"))
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable on CPU: {REASON}"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy warns on lanes that tl.where discards
]


def _small_blocks():
    from augkd.ops.triton_kernels import _common
    return _common.max_block(16)


@pytest.mark.parametrize("cfg_index", range(len(CONFIGS)))
def test_kd_loss_multi_block(cfg_index):
    with _small_blocks():
        check_against_reference("triton", 5, 50, CONFIGS[cfg_index], gen_seed=cfg_index)


def test_kd_loss_multi_block_with_masked_leading_block():
    """A first block that is entirely -inf must not poison the running sums (exp(-inf - -inf))."""
    from .test_kd_loss import run
    cfg = dict(temperature=2.0, alpha=0.5, reduction="none", target="plain", weight=False, fmt="logits")
    s, t = torch.randn(3, 50, dtype=torch.float64), torch.randn(3, 50, dtype=torch.float64)
    s[:, :20] = -math.inf
    t[:, :20] = -math.inf
    y = torch.tensor([30, 41, 49])
    with _small_blocks():
        loss, grads = run("triton", s, t, y, None, cfg, torch.float32)
    ref, ref_grads = run("torch", s[:, 20:], t[:, 20:], y - 20, None, cfg, torch.float64)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][:, 20:].double(), ref_grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_uncertainty_multi_block(temperature):
    z = torch.randn(4, 50, dtype=torch.float64) * 4
    z[1, :16] = -math.inf
    with _small_blocks():
        got = run_uncertainty("triton", z, temperature, torch.float32)
    ref = run_uncertainty("torch", z, temperature, torch.float64)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-5, equal_nan=True)


@pytest.mark.skipif(not _extension.LOADED, reason=f"extension not loaded: {_extension.WHY_NOT_LOADED}")
def test_triton_schemas_equal_the_cpp_schemas():
    from augkd.ops.triton_kernels import OPS
    for name, op in OPS.items():
        cpp = getattr(torch.ops.augkd, name).default._schema
        tri = op.default._schema
        assert str(tri).split("(", 1)[1] == str(cpp).split("(", 1)[1], name


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from augkd.ops.triton_kernels import kd_loss as K, mixup as M, uncertainty as U

INTS = {"C", "B", "L", "P", "HW", "NC", "ignore_index"}
BIG = {"HAS_TARGET": True, "SEPARATE_LSE1": True, "T2_SCALE": True, "FORMAT": 2, "STUDENT_GRAD": True,
       "TEACHER_GRAD": True, "HAS_S": True, "MASK_BCAST": True, "BACKWARD": True, "HAS_MEAN": True,
       "HAS_STD": True, "GZ": True, "GM": True, "GP": True, "GS": True, "GG": True, "GR": True,
       "BLOCK": 4096, "BLOCK_R": 4, "BLOCK_C": 1024}
kernels = [K._kd_loss_fwd_kernel, K._kd_loss_bwd_kernel, U._uncertainty_fwd_kernel, U._uncertainty_bwd_kernel,
           M._latent_mixup_kernel, M._pixel_mixup_kernel]
for storage in ("bf16", "fp64"):
    for k in kernels:
        const = {n: BIG[n] for n in k.arg_names if n in BIG}
        missing = [n for n, p in zip(k.arg_names, k.params) if p.is_constexpr and n not in BIG and n != "FP64"]
        assert not missing, f"{k.fn.__name__}: give the constexprs {missing} a value in BIG"
        const["FP64"] = storage == "fp64"
        sig = {n: "constexpr" if n in const else "*i64" if n == "y_ptr" else "*" + storage if n.endswith("_ptr")
               else "i32" if n in INTS else "fp64" for n in k.arg_names}  # fp64 scalars: as Inductor passes them
        src = triton.compiler.ASTSource(fn=k, signature=sig, constexprs=const)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
print("ok")
"""


def test_kernels_compile_for_sm90_without_gpu():
    """The interpreter is lenient: compile each kernel (bf16 and fp64 storage) to an sm_90 cubin."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", _COMPILE_SCRIPT], env=env, cwd=root,
                         capture_output=True, text=True, timeout=300)
    if "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("no ptxas in this triton install")
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
