"""The CUDA kernels' per-thread device code, compiled for the host by nvcc and run against float64
references (tests/cuda_emulation/): the CUDA numerics CI can check without a GPU. Launch-level behaviour
(shuffles, fast-math intrinsics, the launchers) needs a GPU: tests/test_gpu.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: cannot compile the CUDA headers")
def test_cuda_kernels_per_thread_code_on_host(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    res = subprocess.run(["bash", os.path.join(ROOT, "tests", "cuda_emulation", "run.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("failures: 0") == 4, res.stdout[-3000:]
