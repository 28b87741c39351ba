"""Numerics of kd_loss on every backend: logits with a large common offset, extreme temperatures, rows that
hold NaN but are ignored, teacher probabilities with exact zeros (docs/guarantees-ops-numerics.md).

Backends: those of the shared matrix on CPU tensors (torch, cpu, triton under the interpreter), plus triton
and cuda on a GPU when one is visible (those cases skip with that reason otherwise). The truth is computed
exactly (Python decimals, 60 digits) from the very fp32/fp64 values the backends see, or, for the
offset cases, in float64 by torch's own textbook formula.
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import pytest
import torch
import torch.nn.functional as F

from augkd.ops import KDLoss, backends, kd_loss, use_backend

from .matrix import BACKENDS_HERE

CPU = torch.device("cpu")
_GPU_REASON = None if torch.cuda.is_available() else "needs a CUDA device (none visible)"


def _cpu_case(entry):
    name, marks = (entry, ()) if isinstance(entry, str) else (entry.values[0], entry.marks)
    return pytest.param(name, CPU, marks=marks, id=f"{name}-cpu")


CASES = [_cpu_case(b) for b in BACKENDS_HERE] + [
    pytest.param(b, torch.device("cuda") if _GPU_REASON is None else CPU, id=f"{b}-gpu",
                 marks=pytest.mark.skipif(_GPU_REASON is not None, reason=str(_GPU_REASON)))
    for b in ("triton", "cuda")]
FORMATS = ("logits", "log_probs", "probs")


def _ready(backend, device):
    reason = backends.why_unavailable(backend, device)
    if reason:
        pytest.skip(f"{backend} unavailable on {device}: {reason}")


def _run(backend, device, s, t, y, dtype, **kw):
    """(per-row loss, grad_s, grad_t) of sum(loss) from `backend`, as float64 CPU tensors."""
    s_ = s.to(device, dtype).detach().requires_grad_()
    t_ = t.to(device, dtype).detach().requires_grad_()
    with use_backend(backend):
        loss = kd_loss(s_, t_, None if y is None else y.to(device), reduction="none", **kw)
    loss.sum().backward()
    grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in (s_, t_)]  # alpha = 0: no teacher grad
    return loss.detach().double().cpu(), grads[0].double().cpu(), grads[1].double().cpu()


# ------------------------------------------------------------------ exact truth

def _exact(s, t, y, *, temperature, alpha, t2_scale=True, teacher_format="logits", ignore_index=-100):
    """Per-row loss and d(sum loss)/ds, d(sum loss)/dt in 60-digit decimals of the given (float) values."""
    rows, classes = s.shape
    loss = torch.zeros(rows, dtype=torch.float64)
    gs = torch.zeros(rows, classes, dtype=torch.float64)
    gt = torch.zeros(rows, classes, dtype=torch.float64)
    with localcontext() as ctx:
        ctx.prec = 60
        T = Decimal(float(temperature))
        c = T * T if t2_scale else Decimal(1)
        a = Decimal(float(alpha))
        for i in range(rows):
            if y is not None and int(y[i]) == ignore_index:
                continue
            sv = [Decimal(float(x)) for x in s[i].tolist()]
            tv = [Decimal(float(x)) for x in t[i].tolist()]
            w = [((x.ln() if x > 0 else None) if teacher_format == "probs" else x) for x in tv]
            w = [None if x is None else x / T for x in w]
            u = [x / T for x in sv]
            mu, mw = max(u), max(x for x in w if x is not None)
            lds = sum((x - mu).exp() for x in u).ln()
            ldt = sum((x - mw).exp() for x in w if x is not None).ln()
            lps = [x - mu - lds for x in u]
            lpt = [None if x is None else x - mw - ldt for x in w]
            ps = [x.exp() for x in lps]
            pt = [Decimal(0) if x is None else x.exp() for x in lpt]
            kl = sum(pt[j] * (lpt[j] - lps[j]) for j in range(classes) if lpt[j] is not None)
            row = a * c * kl
            g = [a * c / T * (ps[j] - pt[j]) for j in range(classes)]
            h = [Decimal(0) if lpt[j] is None else a * c / T * pt[j] * (lpt[j] - lps[j] - kl)
                 for j in range(classes)]
            if teacher_format == "probs":
                h = [h[j] / tv[j] if tv[j] != 0 else Decimal(0) for j in range(classes)]
            if y is not None and alpha != 1:
                m1 = max(sv)
                d1 = sum((x - m1).exp() for x in sv)
                k = int(y[i])
                row += (1 - a) * (m1 + d1.ln() - sv[k])
                for j in range(classes):
                    g[j] += (1 - a) * ((sv[j] - m1).exp() / d1 - (1 if j == k else 0))
            loss[i] = float(row)
            gs[i] = torch.tensor([float(x) for x in g], dtype=torch.float64)
            gt[i] = torch.tensor([float(x) for x in h], dtype=torch.float64)
    return loss, gs, gt


def _rel_err(got, want):
    """Largest error relative to the largest magnitude of `want` (0 when both are 0)."""
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    return err / scale if scale else err


# ------------------------------------------------------------------ large offsets (precision of the stats)

def _textbook(s, t, y, temperature, alpha):
    """loss rows and grads by torch's own functions (F.log_softmax, F.kl_div, F.cross_entropy)."""
    s = s.detach().requires_grad_()
    t = t.detach().requires_grad_()
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), reduction="none",
                  log_target=True).sum(-1) * temperature ** 2
    loss = alpha * kl + (1 - alpha) * F.cross_entropy(s, y, reduction="none")
    loss.sum().backward()
    return loss.detach(), s.grad, t.grad


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4, 1e6])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_large_offsets_gradient_error_within_2x_of_torch(backend, device, offset, temperature):
    """Logits with a common offset (|logits| ~ 1e6): the gradient error in fp32 stays within 2x of torch's
    own fp32 error, both measured against float64 on the same fp32 values."""
    _ready(backend, device)
    gen = torch.Generator().manual_seed(int(offset) + 7)
    rows, classes = 16, 200
    s = (torch.randn(rows, classes, generator=gen) * 2 + offset).float()
    t = (torch.randn(rows, classes, generator=gen) * 2 + offset).float()
    y = torch.randint(0, classes, (rows,), generator=gen)
    _, ws, wt = _textbook(s.double(), t.double(), y, temperature, 0.5)
    _, ts, tt = _textbook(s, t, y, temperature, 0.5)
    _, gs, gt = _run(backend, device, s, t, y, torch.float32, temperature=temperature, alpha=0.5)
    floor = torch.finfo(torch.float32).eps / 4  # for a torch error that happens to be ~0
    for name, got, ref, want in (("grad_s", gs, ts, ws), ("grad_t", gt, tt, wt)):
        ours, theirs = _rel_err(got, want), _rel_err(ref.double(), want)
        assert ours <= 2 * theirs + floor, f"{name}: error {ours:.3g} vs torch fp32 {theirs:.3g} at offset {offset}"


@pytest.mark.parametrize("backend,device", CASES)
def test_fp32_cross_entropy_of_logits_scaled_by_10(backend, device):
    """The CE part alone (alpha = 0) of fp32 logits drawn as randn * 10: loss and gradient match float64
    as closely as torch's fp32 cross_entropy does (a check other CE kernels are held to)."""
    _ready(backend, device)
    gen = torch.Generator().manual_seed(10)
    rows, classes = 8, 512
    s = (torch.randn(rows, classes, generator=gen) * 10).float()
    y = torch.randint(0, classes, (rows,), generator=gen)
    want = s.double().requires_grad_()
    F.cross_entropy(want, y, reduction="sum").backward()
    ref = s.clone().requires_grad_()
    ref_loss = F.cross_entropy(ref, y, reduction="none")
    ref_loss.sum().backward()
    loss, gs, _ = _run(backend, device, s, s, y, torch.float32, alpha=0.0)
    want_loss = F.cross_entropy(s.double(), y, reduction="none")
    assert _rel_err(loss, want_loss) <= 2 * _rel_err(ref_loss.detach().double(), want_loss) + 1e-7
    assert _rel_err(gs, want.grad) <= 2 * _rel_err(ref.grad.double(), want.grad) + 1e-7


# ------------------------------------------------------------------ extreme temperatures

TEMPERATURES = [1e-12, 1e-9, 1e-3, 1.0, 1e3, 1e4, 1e5, 1e7]


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_temperatures_match_exact(backend, device, temperature, offset, dtype):
    """Any T in the tested range: loss and gradients match the exact values (the KL of a large T is a
    difference of nearly uniform distributions, ~1/T^2; T^2 * KL stays O(1) and must stay accurate)."""
    _ready(backend, device)
    gen = torch.Generator().manual_seed(int(math.log10(temperature)) + 50)
    rows, classes = 4, 13
    s = (torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 2 + offset).to(dtype)
    t = (torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 2 + offset).to(dtype)
    y = torch.randint(0, classes, (rows,), generator=gen)
    loss, gs, gt = _run(backend, device, s, t, y, dtype, temperature=temperature, alpha=0.7)
    want, ws, wt = _exact(s, t, y, temperature=temperature, alpha=0.7)
    tol = 2e-6 if dtype == torch.float32 else 1e-13
    assert _rel_err(loss, want) <= tol, f"loss {loss.tolist()} != {want.tolist()}"
    assert _rel_err(gs, ws) <= tol, "grad_s"
    assert _rel_err(gt, wt) <= tol or float(wt.abs().max()) < 1e-30, "grad_t"
    # the KL alone (alpha = 1) is never negative, and relative-accurate however small it is
    kl, _, _ = _run(backend, device, s, t, None, dtype, temperature=temperature, alpha=1.0, t2_scale=False)
    want_kl, _, _ = _exact(s, t, None, temperature=temperature, alpha=1.0, t2_scale=False)
    assert (kl >= 0).all(), f"negative KL {kl.tolist()}"
    assert ((kl - want_kl).abs() <= tol * want_kl.abs() + 1e-300).all(), f"KL {kl.tolist()} != {want_kl.tolist()}"


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_large_temperature_every_teacher_format(backend, device, fmt):
    _ready(backend, device)
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(3, 9, generator=gen).float() * 3
    t = torch.randn(3, 9, generator=gen).float() * 3
    if fmt == "probs":
        t = torch.softmax(t, -1)
    elif fmt == "log_probs":
        t = torch.log_softmax(t, -1)
    loss, gs, gt = _run(backend, device, s, t, None, torch.float32, temperature=1e5, teacher_format=fmt)
    want, ws, wt = _exact(s, t, None, temperature=1e5, alpha=1.0, teacher_format=fmt)
    assert _rel_err(loss, want) <= 2e-6 and _rel_err(gs, ws) <= 2e-6 and _rel_err(gt, wt) <= 2e-6


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("temperature", [1e-16, 0.9e-15, 1.1e10, 1e12])
def test_temperature_outside_the_tested_range_is_rejected(backend, device, temperature):
    _ready(backend, device)
    s = torch.randn(2, 5, device=device)
    with use_backend(backend), pytest.raises(ValueError, match=r"temperature must be in \[1e-15, 1e\+10\]"):
        kd_loss(s, s, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(temperature=temperature)
    if backend in ("cpu", "cuda"):  # the C++ op itself, called directly
        with pytest.raises(ValueError, match=r"temperature must be in \[1e-15, 1e\+10\]"):
            torch.ops.augkd.kd_loss_fwd(s, s, None, temperature, 1.0, -100, True, 0)


# ------------------------------------------------------------------ the same answer on every backend

@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_ignored_rows_contribute_zero_whatever_they_hold(backend, device, fmt):
    """An ignored row adds exactly 0 to the loss and gets exactly zero gradients, also when it holds NaN or
    inf (every backend; the torch backend too)."""
    _ready(backend, device)
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(4, 7, generator=gen)
    t = torch.randn(4, 7, generator=gen)
    if fmt == "probs":
        t = torch.softmax(t, -1)
    s[1, 2], t[1, 4] = math.nan, math.nan
    s[3, 0], t[3, 1] = math.inf, -math.inf
    y = torch.tensor([2, -100, 5, -100])
    loss, gs, gt = _run(backend, device, s, t, y, torch.float32, temperature=2.0, alpha=0.5, teacher_format=fmt)
    assert loss[1] == 0 and loss[3] == 0 and torch.isfinite(loss).all(), loss
    for g in (gs, gt):
        assert (g[1] == 0).all() and (g[3] == 0).all() and torch.isfinite(g).all(), g


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_zero_teacher_probabilities_are_absent_classes(backend, device, temperature):
    """teacher_format="probs" with exact zeros: those classes are absent (no KL term), their teacher
    gradient is 0 and every gradient is finite, at any T (every backend)."""
    _ready(backend, device)
    gen = torch.Generator().manual_seed(9)
    s = torch.randn(3, 6, generator=gen).double()
    t = torch.softmax(torch.randn(3, 6, generator=gen), -1).double()
    t[:, 0] = 0
    t[1, 3] = 0
    t = t / t.sum(-1, keepdim=True)
    y = torch.tensor([1, 2, 4])
    loss, gs, gt = _run(backend, device, s, t, y, torch.float64, temperature=temperature, alpha=0.5,
                        teacher_format="probs")
    want, ws, wt = _exact(s, t, y, temperature=temperature, alpha=0.5, teacher_format="probs")
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert (gt[:, 0] == 0).all() and gt[1, 3] == 0
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gs, ws, rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(gt, wt, rtol=1e-11, atol=1e-14)
