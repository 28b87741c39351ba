"""Backend selection that other code cannot disturb: use_backend() holds for its own thread only, and
the first op call of a process may be inside torch.compile(fullgraph=True) on any backend."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import augkd.ops as ops
from augkd.ops import backends, use_backend


def test_use_backend_is_per_thread():
    """Thread A holds use_backend("torch") while thread B, started inside A's block, sees its own default
    and sets its own choice, which A never sees."""
    default = backends.requested()
    a_inside, b_done = threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with use_backend("torch"):
            seen["a_before"] = backends.requested()
            a_inside.set()
            b_done.wait(timeout=30)
            seen["a_after_b"] = backends.requested()
        seen["a_out"] = backends.requested()

    def thread_b():
        a_inside.wait(timeout=30)
        seen["b_default"] = backends.requested()
        with use_backend("cpu"):
            seen["b_inside"] = backends.requested()
        b_done.set()

    workers = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert seen == {"a_before": "torch", "b_default": default, "b_inside": "cpu", "a_after_b": "torch",
                    "a_out": default}, seen
    assert backends.requested() == default


def test_ops_in_two_threads_run_on_their_own_backends():
    """A thread that asks for a backend that cannot run raises; another thread at the same time is not
    affected (the choice used to be process-wide)."""
    start = threading.Barrier(2, timeout=30)
    errors = {}

    def run(name):
        try:
            with use_backend(name):
                start.wait()
                for _ in range(20):
                    ops.kd_loss(torch.randn(4, 5), torch.randn(4, 5))
        except Exception as exc:  # recorded and checked below
            errors[name] = exc

    workers = [threading.Thread(target=run, args=(n,)) for n in ("cuda", "torch")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert isinstance(errors.pop("cuda"), backends.BackendUnavailable)
    assert errors == {}


_FIRST_CALL = textwrap.dedent("""
    import torch
    import augkd.ops as ops
    torch.manual_seed(0)
    s, t = torch.randn(4, 7, requires_grad=True), torch.randn(4, 7)
    with ops.use_backend({backend!r}):
        fn = torch.compile(lambda a, b: ops.kd_loss(a, b, temperature=2.0), fullgraph=True, backend="aot_eager")
        out = fn(s, t)
        (g,) = torch.autograd.grad(out, s)
    with ops.use_backend("torch"):
        ref = ops.kd_loss(s, t, temperature=2.0)
        (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)
    print("ok")
""")


def test_first_call_of_a_process_inside_torch_compile():
    """A fresh process whose first kd_loss call is compiled with fullgraph=True under TRITON_INTERPRET=1:
    the Triton ops are imported and registered outside the traced code (a graph break before)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    probe = subprocess.run([sys.executable, "-c", "import triton"], env=env, capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"triton is not importable here: {probe.stderr.strip().splitlines()[-1:]}")
    done = subprocess.run([sys.executable, "-c", _FIRST_CALL.format(backend="triton")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_compiled_code_follows_the_threads_backend():
    """A function compiled under one backend recompiles (not silently reuses) under another."""
    from torch._dynamo.testing import CompileCounterWithBackend

    if not ops._extension.LOADED:
        pytest.skip(f"extension augkd._C not loaded: {ops._extension.WHY_NOT_LOADED}")
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    fn = torch.compile(lambda a, b: ops.kd_loss(a, b, temperature=2.0), fullgraph=True, backend=counter)
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    with use_backend("torch"):
        fn(s, t)
    with use_backend("cpu"):
        fn(s, t)
    assert ["kd_loss_fwd" in str(g.code) for g in counter.graphs] == [False, True]


def test_the_triton_check_carries_the_mark_torch_compiler_sets():
    """The mark is set directly (torch.compiler's decorator would import torch._dynamo on `import augkd.ops`):
    it must be exactly what the decorator sets."""
    def probe():
        return ""

    before = set(vars(probe))
    torch.compiler.assume_constant_result(probe)
    added = {name: value for name, value in vars(probe).items() if name not in before}
    assert added and all(getattr(backends.load_triton, name) == value for name, value in added.items())


def test_importing_the_ops_does_not_import_the_compiler():
    code = "import sys, torch, augkd.ops; print('torch._dynamo' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
