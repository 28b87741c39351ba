"""Backend selection, overrides, clear errors, and the fallback when the extension is missing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from augkd.ops import BackendUnavailable, _extension, backends, kd_loss, use_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=120)


def test_auto_picks_cpu_kernels_for_cpu_tensors_when_built():
    expected = "cpu" if _extension.LOADED else "torch"
    assert backends.select(torch.device("cpu")) == expected


def test_context_manager_overrides_and_restores():
    with use_backend("torch"):
        assert backends.select(torch.device("cpu")) == "torch"
        with use_backend("auto"):
            assert backends.select(torch.device("cpu")) in ("cpu", "torch")
        assert backends.requested() == "torch"
    assert backends.requested() == "auto"


def test_unavailable_backend_raises_with_reason():
    with use_backend("cuda"), pytest.raises(BackendUnavailable, match="cuda backend runs CUDA tensors; got a cpu"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="use_backend\\(name\\) must be one of auto, triton, cuda, cpu, torch"):
        with use_backend("numpy"):
            pass


def test_environment_variable_is_read_and_checked():
    ok = _python("import augkd.ops.backends as b; print(b.requested())", AUGKD_BACKEND="torch")
    assert ok.returncode == 0 and ok.stdout.strip() == "torch", ok.stderr
    bad = _python("import augkd.ops", AUGKD_BACKEND="fast")
    assert bad.returncode != 0 and "AUGKD_BACKEND must be one of" in bad.stderr


def test_missing_extension_falls_back_with_one_warning():
    code = (
        "import sys, warnings\n"
        "sys.modules['augkd._C'] = None  # makes `import augkd._C` fail like a missing build\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import augkd, augkd.ops as ops, torch\n"
        "    loss = ops.kd_loss(torch.randn(3, 4), torch.randn(3, 4))\n"
        "    ops.uncertainty(torch.randn(3, 4))\n"
        "msgs = [str(w.message) for w in caught if 'augkd._C' in str(w.message)]\n"
        "print(len(msgs)); print(msgs[0]); print(ops.backends.select(torch.device('cpu')))\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    count, message, backend = out.stdout.strip().splitlines()
    assert count == "1" and "falls back to the torch backend" in message and "import of augkd._C halted" in message
    assert backend == "torch"


def test_status_report_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "augkd.ops"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("triton", "cuda", "cpu", "torch"):
        assert f"\n{name}" in out.stdout, out.stdout
    assert "auto on cpu:" in out.stdout


def test_reasons_are_structured():
    """A reason says why in a field (never parsed back from its text); str() gives the message."""
    reason = backends.why_unavailable("cuda", torch.device("cpu"))
    assert isinstance(reason, backends.Unavailable) and reason.why is backends.Why.WRONG_DEVICE
    assert str(reason) == "the cuda backend runs CUDA tensors; got a cpu tensor"
    assert backends.why_unavailable("torch", torch.device("cpu")) is None
    if not _extension.LOADED:
        assert backends.why_unavailable("cpu", torch.device("cpu")).why is backends.Why.NO_EXTENSION
    with pytest.raises(ValueError, match="unknown backend 'numpy'"):
        backends.why_unavailable("numpy", torch.device("cpu"))


def test_status_lists_each_backend_once_per_device_it_targets():
    rows = backends.status()
    assert len({(r.name, r.device) for r in rows}) == len(rows)
    assert {r.name for r in rows} == set(backends.BACKENDS)
    assert all(r.detail == "ready" for r in rows if r.available)


def test_choosing_and_naming_a_backend_import_nothing():
    """select() for CPU tensors and namespace() never import Triton; load_triton() is the place that does."""
    code = ("import sys, torch, augkd.ops as ops\n"
            "from augkd.ops import backends\n"
            "ops.kd_loss(torch.randn(3, 4), torch.randn(3, 4))\n"
            "names = [backends.namespace(b) for b in ('triton', 'cuda', 'cpu')]\n"
            "print(names, 'triton' in sys.modules, 'augkd.ops.triton_kernels' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['augkd_triton', 'augkd', 'augkd'] False False", out.stdout
