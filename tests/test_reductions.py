"""kd_loss reductions on N-D logits, on every backend: `batchmean` is torch's kl_div batchmean
(sum / size(0)), `token_mean` (= `mean`) averages over the rows not ignored. The table of README
"Ops API" and docs/ops-design.md is checked here row by row."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from augkd.ops import KDLoss, kd_loss, use_backend

from .matrix import BACKEND_DEVICES, assert_close

F64 = torch.float64


def _inputs(device, shape=(3, 4, 9), seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=gen, dtype=F64) * 2).to(device)
    t = (torch.randn(shape, generator=gen, dtype=F64) * 2).to(device)
    y = torch.randint(0, shape[-1], shape[:-1], generator=gen).to(device)
    y.view(-1)[::3] = -100  # a third of the tokens ignored, unevenly over the batch
    return s, t, y


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("fmt", ["logits", "log_probs"])
def test_batchmean_is_torch_kl_div_batchmean_on_3d_logits(backend, device, fmt):
    """(B, T, V): kl_div(..., reduction="batchmean", log_target=True) divides by B only; so does kd_loss."""
    s, t, _ = _inputs(device)
    if fmt == "log_probs":
        t = torch.log_softmax(t, -1)
    T = 2.0
    s32, t32 = s.float().requires_grad_(), t.float().requires_grad_()
    with use_backend(backend):
        ours = kd_loss(s32, t32, temperature=T, reduction="batchmean", teacher_format=fmt)
    gs, gt = torch.autograd.grad(ours, (s32, t32))
    s64, t64 = s.clone().requires_grad_(), t.clone().requires_grad_()
    theirs = F.kl_div(F.log_softmax(s64 / T, -1), F.log_softmax(t64 / T, -1), reduction="batchmean",
                      log_target=True) * T * T
    rs, rt = torch.autograd.grad(theirs, (s64, t64))
    assert_close(ours, theirs, torch.float32, "batchmean loss")
    assert_close(gs, rs, torch.float32, "grad student")
    assert_close(gt, rt, torch.float32, "grad teacher")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_batchmean_with_probability_targets_is_kl_div_without_log_target(backend, device):
    s, t, _ = _inputs(device, seed=4)
    p = torch.softmax(t, -1)
    s32 = s.float().requires_grad_()
    with use_backend(backend):
        ours = kd_loss(s32, p.float(), teacher_format="probs", reduction="batchmean")
    (gs,) = torch.autograd.grad(ours, s32)
    s64 = s.clone().requires_grad_()
    theirs = F.kl_div(F.log_softmax(s64, -1), p, reduction="batchmean", log_target=False)
    (rs,) = torch.autograd.grad(theirs, s64)
    assert_close(ours, theirs, torch.float32, "batchmean loss")
    assert_close(gs, rs, torch.float32, "grad student")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_reduction_table(backend, device):
    """Every reduction from the per-row losses of "none", with ignored rows and per-row weights on
    (B, T, V) logits (the table in README "Ops API")."""
    s, t, y = _inputs(device, seed=1)
    w = torch.rand(y.shape, dtype=F64).to(device) + 0.5
    kw = dict(temperature=3.0, alpha=0.5, sample_weight=w)
    with use_backend("torch"):
        rows = kd_loss(s, t, y, reduction="none", **kw)
    kept = (y != -100).sum()
    expected = {"none": rows, "sum": rows.sum(), "batchmean": rows.sum() / s.shape[0],
                "token_mean": rows.sum() / kept, "mean": rows.sum() / kept}
    assert rows.shape == y.shape and bool((rows[y == -100] == 0).all())
    for reduction, want in expected.items():
        with use_backend(backend):
            got = kd_loss(s.float(), t.float(), y, reduction=reduction, **kw)
        assert_close(got, want, torch.float32, reduction)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_token_mean_is_trls_batchmean_with_labels(backend, device):
    """The per-token mean: sum over tokens not ignored / their number (pure KL, alpha = 1)."""
    s, t, y = _inputs(device, seed=2)
    T = 1.5
    per_token = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="none",
                         log_target=True).sum(-1) * T * T
    mask = y != -100
    want = per_token[mask].sum() / mask.sum()
    with use_backend(backend):
        got = kd_loss(s.float(), t.float(), y, temperature=T, reduction="token_mean")
        assert torch.equal(got, kd_loss(s.float(), t.float(), y, temperature=T, reduction="mean"))
    assert_close(got, want, torch.float32, "token_mean")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_batchmean_edge_shapes(backend, device):
    """One row (C,): the row's loss. (B, C): sum / B as before. Zero-size leading dims: 0, not NaN."""
    s, t, _ = _inputs(device, shape=(5, 7), seed=3)
    with use_backend(backend):
        one = kd_loss(s[1].float(), t[1].float(), temperature=2.0, reduction="batchmean")
        row = kd_loss(s[1:2].float(), t[1:2].float(), temperature=2.0, reduction="none")
        two_d = kd_loss(s.float(), t.float(), temperature=2.0, reduction="batchmean")
        total = kd_loss(s.float(), t.float(), temperature=2.0, reduction="sum")
        empty = kd_loss(torch.zeros(0, 4, 7, device=device), torch.zeros(0, 4, 7, device=device),
                        reduction="batchmean")
        no_tokens = kd_loss(torch.zeros(2, 0, 7, device=device), torch.zeros(2, 0, 7, device=device),
                            reduction="batchmean")
    assert one.shape == () and torch.allclose(one, row[0])
    assert_close(two_d, total / 5, torch.float32, "2-d batchmean")
    assert empty.item() == 0.0 and no_tokens.item() == 0.0


def test_unknown_reduction_lists_the_choices():
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'sum', 'mean', 'batchmean', 'token_mean'"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), reduction="avg")
    assert KDLoss(reduction="token_mean").reduction == "token_mean"
