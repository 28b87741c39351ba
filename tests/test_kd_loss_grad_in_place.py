"""augkd::kd_loss_grad_ (the C++ CPU backend's kd_loss forward and backward in one sweep, the gradients written over
the logits): against the float64 reference of kd_loss and bit for bit against kd_loss_fwd + kd_loss_bwd; bad inputs.
The fused linear loss that runs it is tested in test_fused_linear_kd.py."""

from __future__ import annotations

import itertools

import pytest
import torch

from augkd.ops import _extension, reference

from .matrix import BACKEND_DEVICES, assert_close

HAS_OP = _extension.LOADED and hasattr(torch.ops.augkd, "kd_loss_grad_")
pytestmark = pytest.mark.skipif(not HAS_OP, reason="kd_loss_grad_ needs the compiled extension: "
                                f"{_extension.WHY_NOT_LOADED or 'built without the op'}")
# the op exists on one (backend, device) of the matrix: the C++ kernels on CPU tensors
CPU_CASE = [case for case in BACKEND_DEVICES if case.values == ("cpu", "cpu")]

GRID = list(itertools.product((0.5, 1.0, 4.0), (0.0, 0.4, 1.0), ("none", "some_ignored", "plain"), (True, False)))


def inputs(rows, classes, target_kind, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, classes, generator=gen, dtype=torch.float64) * scale
    t = torch.randn(rows, classes, generator=gen, dtype=torch.float64) * scale
    g = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5
    y = None
    if target_kind != "none":
        y = torch.randint(0, classes, (rows,), generator=gen)
        if target_kind == "some_ignored":
            y[torch.rand(rows, generator=gen) < 0.3] = -100
    return s, t, y, g


def in_place(s, t, y, g, temperature, alpha, t2_scale, dtype, want_s=True, want_t=True, ignore_index=-100):
    zs, zt = s.to(dtype).clone(), t.to(dtype).clone()
    loss = torch.ops.augkd.kd_loss_grad_(zs, zt, y, g.to(dtype), temperature, alpha, ignore_index, t2_scale, want_s,
                                         want_t)
    return loss, zs, zt


@pytest.mark.parametrize("backend,device", CPU_CASE)
@pytest.mark.parametrize("temperature,alpha,target,t2_scale", GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_the_float64_reference(backend, device, temperature, alpha, target, t2_scale, dtype):
    """Loss rows and both gradients (weighted by per-row upstream gradients) against autograd of the torch
    formula in float64; 2500 classes: more than one block of the row kernels."""
    if alpha != 1.0 and target == "none":
        pytest.skip("alpha < 1 needs a target")
    s, t, y, g = inputs(9, 2500, target)
    loss, gs, gt = in_place(s, t, y, g, temperature, alpha, t2_scale, dtype)
    s64, t64 = s.clone().requires_grad_(), t.clone().requires_grad_()
    want, _ = reference.kd_loss_rows(s64, t64, y, temperature, alpha, -100, t2_scale, 0)
    want_gs, want_gt = torch.autograd.grad(want, [s64, t64], g, allow_unused=True, materialize_grads=True)
    assert loss.dtype == dtype and gs.dtype == dtype
    assert_close(loss, want, dtype, "loss")
    assert_close(gs, want_gs, dtype, "grad student")
    assert_close(gt, want_gt, dtype, "grad teacher")


@pytest.mark.parametrize("want_s,want_t", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("temperature,alpha", [(2.0, 0.5), (1.0, 0.5), (3.0, 1.0), (1.0, 0.0)])
def test_equals_kd_loss_fwd_and_bwd_bit_for_bit(want_s, want_t, temperature, alpha):
    """The same row functions as the two ops (with the same gradient flags): identical losses, gradients where
    asked, untouched logits where not (also a target entry: its gradient is formed from the logits read before the row is overwritten)."""
    s, t, y, g = inputs(17, 3001, "some_ignored", seed=3)
    s, t, g = s.float(), t.float(), g.float()
    loss, zs, zt = in_place(s, t, y, g, temperature, alpha, True, torch.float32, want_s, want_t)
    want, stats = torch.ops.augkd.kd_loss_fwd(s, t, y, temperature, alpha, -100, True, 0)
    gs, gt = torch.ops.augkd.kd_loss_bwd(g, torch.zeros_like(g), s, t, y, stats, temperature, alpha, -100, True, 0,
                                         want_s, want_t)
    assert torch.equal(loss, want)
    assert torch.equal(zs, gs if want_s else s)
    assert torch.equal(zt, gt if want_t else t)


def test_large_temperature_and_nearly_equal_logits_stay_accurate():
    """The refined KL (close distributions at a large T) and the expm1 form of p_s - p_t run in place too."""
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(6, 4000, generator=gen, dtype=torch.float64) * 4
    t = s + 1e-3 * torch.randn(6, 4000, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4000, (6,), generator=gen)
    g = torch.ones(6, dtype=torch.float64)
    loss, gs, gt = in_place(s, t, y, g, 50.0, 0.7, True, torch.float32)
    s64, t64 = s.clone().requires_grad_(), t.clone().requires_grad_()
    want, _ = reference.kd_loss_rows(s64, t64, y, 50.0, 0.7, -100, True, 0)
    want_gs, want_gt = torch.autograd.grad(want, [s64, t64], g)
    assert_close(loss, want, torch.float32, "loss")
    assert_close(gs, want_gs, torch.float32, "grad student")
    assert_close(gt, want_gt, torch.float32, "grad teacher")


def test_empty_batch():
    s, t = torch.zeros(0, 5), torch.zeros(0, 5)
    loss = torch.ops.augkd.kd_loss_grad_(s, t, None, torch.zeros(0), 1.0, 1.0, -100, True, True, True)
    assert loss.shape == (0,)


def test_bad_label_raises_before_any_logit_is_overwritten():
    s, t, y, g = inputs(4, 7, "plain")
    s, t, g = s.float(), t.float(), g.float()
    y[2] = 7
    zs, zt = s.clone(), t.clone()
    with pytest.raises(ValueError, match=r"target holds class index 7, outside \[0, 7\)"):
        torch.ops.augkd.kd_loss_grad_(zs, zt, y, g, 2.0, 0.5, -100, True, True, True)
    assert torch.equal(zs, s) and torch.equal(zt, t)


@pytest.mark.parametrize("change,match", [
    (dict(grad_loss=torch.ones(3)), r"grad_loss must have shape \(4,\)"),
    (dict(grad_loss=torch.ones(4, dtype=torch.float64)), "grad_loss"),
    (dict(teacher=torch.zeros(4, 6)), "teacher"),
    (dict(temperature=0.0), "temperature"),
    (dict(same=True), "different tensors"),
])
def test_bad_arguments_raise_clear_errors(change, match):
    args = dict(student=torch.zeros(4, 7), teacher=torch.zeros(4, 7), grad_loss=torch.ones(4), temperature=1.0)
    args.update({k: v for k, v in change.items() if k != "same"})
    if change.get("same"):
        args["teacher"] = args["student"]
    with pytest.raises((RuntimeError, ValueError), match=match):
        torch.ops.augkd.kd_loss_grad_(args["student"], args["teacher"], None, args["grad_loss"], args["temperature"],
                                      1.0, -100, True, True, True)
