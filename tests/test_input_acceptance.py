"""Valid inputs every backend must accept (and give the float64 result for): non-contiguous integer
targets, any int ignore_index, mixed floating dtypes (a bf16 student with an fp32 teacher, autocast);
and the per-row weight argument, which must not be mistaken for torch's per-class weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import augkd.ops as ops
from augkd.ops import KDLoss, kd_loss, use_backend

from .matrix import BACKEND_DEVICES, assert_close

F64 = torch.float64


def _logits(rows, classes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, classes, generator=gen, dtype=F64) * 2).to(device) for _ in range(2)]


def _loss_and_grads(backend, s, t, y, **kw):
    s, t = s.detach().requires_grad_(), t.detach().requires_grad_()
    with use_backend(backend):
        loss = kd_loss(s, t, y, **kw)
    return (loss, *torch.autograd.grad(loss, (s, t)))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_non_contiguous_target(backend, device, dtype):
    """labels[:, 0] of a (B, 2) label tensor: a strided view, accepted as it is by torch's losses."""
    s, t = _logits(6, 10, device)
    labels = torch.tensor([[1, 0], [9, 0], [-100, 0], [3, 0], [0, 0], [7, 0]], dtype=dtype, device=device)
    y = labels[:, 0]
    assert not y.is_contiguous()
    got = _loss_and_grads(backend, s.float(), t.float(), y, temperature=2.0, alpha=0.5, reduction="mean")
    want = _loss_and_grads("torch", s, t, y.contiguous().long(), temperature=2.0, alpha=0.5, reduction="mean")
    for name, a, b in zip(("loss", "grad student", "grad teacher"), got, want):
        assert_close(a, b, torch.float32, name)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_non_contiguous_nd_target(backend, device):
    s, t = _logits(8, 5, device, seed=1)
    y = torch.randint(0, 5, (4, 2, 3), device=device)[:, :, 1]  # (4, 2), strided
    got = _loss_and_grads(backend, s.float().view(4, 2, 5), t.float().view(4, 2, 5), y, alpha=0.5)
    want = _loss_and_grads("torch", s.view(4, 2, 5), t.view(4, 2, 5), y.contiguous(), alpha=0.5)
    for name, a, b in zip(("loss", "grad student", "grad teacher"), got, want):
        assert_close(a, b, torch.float32, name)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("ignore_index", [2 ** 70, -(2 ** 70), 2 ** 63, np.int64(9), 9],
                         ids=["2**70", "-2**70", "2**63", "np.int64", "int"])
def test_any_int_ignore_index(backend, device, ignore_index):
    """An ignore_index outside int64 matches no label (labels are int64), so it ignores no row; numpy
    integers are ints."""
    s, t = _logits(5, 10, device, seed=2)
    y = torch.tensor([1, 9, 2, 9, 3], device=device)
    expect_y = torch.where(y == 9, -100, y) if int(ignore_index) == 9 else y
    got = _loss_and_grads(backend, s.float(), t.float(), y, alpha=0.5, ignore_index=ignore_index,
                          reduction="token_mean")
    want = _loss_and_grads("torch", s, t, expect_y, alpha=0.5, reduction="token_mean")
    for name, a, b in zip(("loss", "grad student", "grad teacher"), got, want):
        assert_close(a, b, torch.float32, name)


def test_ignore_index_outside_int64_still_rejects_bad_labels():
    s, t = _logits(3, 4, "cpu")
    y = torch.tensor([0, -(2 ** 63), 1])
    for backend in ("torch", "cpu") if ops._extension.LOADED else ("torch",):
        with use_backend(backend), pytest.raises(ValueError, match="target holds class index -9223372036854775808"):
            kd_loss(s, t, y, alpha=0.5, ignore_index=2 ** 70)
    with pytest.raises(TypeError, match="ignore_index must be an int, got bool"):
        kd_loss(s, t, y, alpha=0.5, ignore_index=True)
    with pytest.raises(TypeError, match="ignore_index must be an int, got float"):
        kd_loss(s, t, y, alpha=0.5, ignore_index=-100.0)


# ---------------------------------------------------------------- mixed dtypes

MIXED = [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float32),
         (torch.float16, torch.bfloat16), (torch.float32, torch.float64)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("student_dtype,teacher_dtype", MIXED, ids=[f"{a}-{b}".replace("torch.", "")
                                                                     for a, b in MIXED])
def test_mixed_dtypes_compute_in_the_promoted_dtype(backend, device, student_dtype, teacher_dtype):
    """Each gradient in its input's dtype; the loss in fp32 (fp64 if an input is fp64); values as the
    float64 reference on the inputs as given (rounded to their dtypes)."""
    s, t = _logits(9, 33, device, seed=3)
    y = torch.tensor([0, 5, -100, 32, 7, 7, 1, 2, 3], device=device)
    s_in, t_in = s.to(student_dtype).requires_grad_(), t.to(teacher_dtype).requires_grad_()
    with use_backend(backend):
        loss, energy = kd_loss(s_in, t_in, y, temperature=2.0, alpha=0.5, reduction="mean",
                               return_teacher_energy=True)
    gs, gt = torch.autograd.grad(loss + energy.mean(), (s_in, t_in))
    promoted = torch.promote_types(student_dtype, teacher_dtype)
    assert loss.dtype == (F64 if promoted == F64 else torch.float32)
    assert gs.dtype == student_dtype and gt.dtype == teacher_dtype
    ref_s, ref_t = s_in.detach().double().requires_grad_(), t_in.detach().double().requires_grad_()
    with use_backend("torch"):
        ref_loss, ref_energy = kd_loss(ref_s, ref_t, y, temperature=2.0, alpha=0.5, reduction="mean",
                                       return_teacher_energy=True)
    rs, rt = torch.autograd.grad(ref_loss + ref_energy.mean(), (ref_s, ref_t))
    loose = torch.float32 if promoted == F64 else promoted  # the compute dtype's rounding of the grads
    assert_close(loss, ref_loss, torch.float32 if promoted != F64 else F64, "loss")
    assert_close(gs, rs, student_dtype if student_dtype != F64 else loose, "grad student")
    assert_close(gt, rt, teacher_dtype if teacher_dtype != F64 else loose, "grad teacher")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bf16_student_under_autocast_with_fp32_teacher(backend):
    """The usual mixed-precision KD step on CPU: the student runs under autocast (bf16 logits), the
    teacher's logits stay fp32."""
    if backend == "cpu" and not ops._extension.LOADED:
        pytest.skip(f"extension augkd._C not loaded: {ops._extension.WHY_NOT_LOADED}")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 16, generator=gen)
    layer = torch.nn.Linear(16, 12)
    teacher = torch.randn(8, 12, generator=gen)
    y = torch.randint(0, 12, (8,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16), use_backend(backend):
        student = layer(x)
        assert student.dtype == torch.bfloat16
        loss = kd_loss(student, teacher, y, temperature=4.0, alpha=0.5)
    assert loss.dtype == torch.float32
    (g_weight,) = torch.autograd.grad(loss, layer.weight)
    ref_student = student.detach().double().requires_grad_()
    with use_backend("torch"):
        ref = kd_loss(ref_student, teacher.double(), y, temperature=4.0, alpha=0.5)
    assert_close(loss, ref, torch.bfloat16, "loss")
    (ref_g_student,) = torch.autograd.grad(ref, ref_student)
    ref_g_weight = ref_g_student.T @ x.double()  # through the linear layer
    assert_close(g_weight, ref_g_weight, torch.bfloat16, "grad of the student's weight")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_mixups_with_mixed_dtypes(backend, device):
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(4, 6, generator=gen).to(device, torch.bfloat16).requires_grad_()
    psi = torch.randn(4, 6, generator=gen).to(device).requires_grad_()
    m = torch.rand(1, 6, generator=gen).to(device)
    g = torch.rand(2, 3, 4, 4, generator=gen).to(device).requires_grad_()
    r = torch.rand(2, 3, 4, 4, generator=gen).to(device, torch.float16)
    with use_backend(backend):
        mixed = ops.latent_mixup(z, m, psi, 0.25)
        image = ops.pixel_mixup(g, r, 0.5, mean=[0.5] * 3, std=[0.2] * 3)
    assert mixed.dtype == torch.float32 and image.dtype == torch.float32
    gz, gp = torch.autograd.grad(mixed.sum(), (z, psi))
    assert gz.dtype == torch.bfloat16 and gp.dtype == torch.float32
    z64, psi64 = z.detach().double(), psi.detach().double()
    assert_close(mixed, z64 + 0.75 * m.double() * (psi64 - z64), torch.float32, "latent mixup")
    assert_close(image, (0.5 * g.detach().double() + 0.5 * r.double() - 0.5) / 0.2, torch.float32, "pixel mixup")


# ---------------------------------------------------------------- per-row weights

def test_sample_weight_is_per_row_and_weight_is_refused_when_ambiguous():
    s, t = _logits(4, 4, "cpu", seed=6)
    w = torch.tensor([0.5, 1.0, 2.0, 0.0], dtype=F64)
    rows = kd_loss(s, t, temperature=2.0, reduction="none")
    torch.testing.assert_close(kd_loss(s, t, temperature=2.0, sample_weight=w, reduction="sum"), (rows * w).sum())
    # (C,) with B == C: torch's losses would read it per class; kd_loss refuses to guess
    with pytest.raises(ValueError, match="could be per class .* pass sample_weight"):
        kd_loss(s, t, temperature=2.0, weight=w)
    with pytest.raises(ValueError, match="could be per class"):
        KDLoss(temperature=2.0)(s, t, weight=w)
    torch.testing.assert_close(KDLoss(temperature=2.0, reduction="sum")(s, t, None, w), (rows * w).sum())


def test_weight_keeps_working_where_unambiguous():
    s, t = _logits(3, 5, "cpu", seed=7)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    torch.testing.assert_close(kd_loss(s, t, weight=w), kd_loss(s, t, sample_weight=w))
    s3, t3 = (x.view(3, 1, 5).expand(3, 5, 5).contiguous() for x in (s, t))  # (B, T, C) with T == C
    w3 = torch.rand(3, 5, dtype=F64)
    torch.testing.assert_close(kd_loss(s3, t3, weight=w3), kd_loss(s3, t3, sample_weight=w3))


@pytest.mark.parametrize("kwargs,message", [
    (dict(weight=torch.ones(5)), r"weight must have shape \(3,\) \(one weight per row\), got \(5,\) "
                                 r"\(kd_loss has no per-class weights"),
    (dict(sample_weight=torch.ones(3, 1)), r"sample_weight must have shape \(3,\)"),
    (dict(sample_weight=torch.ones(3), weight=torch.ones(3)), "sample_weight or weight, not both"),
    (dict(sample_weight=torch.ones(3, dtype=torch.long)), "sample_weight must be a floating tensor"),
])
def test_bad_weights_name_the_argument(kwargs, message):
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises((ValueError, TypeError), match=message):
        kd_loss(s, t, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("op", ["topk_kd_loss", "fused_linear_kd_loss"])
def test_llm_ops_take_any_int_ignore_index(backend, op):
    """As kd_loss: an ignore_index outside int64 ignores no row, the same as one no label equals."""
    reason = ops.backends.why_unavailable(backend, torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    g = torch.Generator().manual_seed(3)
    rows, vocab, hidden = 6, 12, 5
    y = torch.randint(0, vocab, (rows,), generator=g)
    if op == "topk_kd_loss":
        s = torch.randn(rows, vocab, generator=g)
        idx = torch.randn(rows, vocab, generator=g).topk(4, dim=-1).indices
        val = torch.log_softmax(torch.randn(rows, 4, generator=g), -1)

        def call(ii):
            return ops.topk_kd_loss(s, idx, val, y, alpha=0.5, ignore_index=ii)
    else:
        xs, xt = torch.randn(rows, hidden, generator=g), torch.randn(rows, hidden, generator=g)
        ws, wt = torch.randn(vocab, hidden, generator=g), torch.randn(vocab, hidden, generator=g)

        def call(ii):
            return ops.fused_linear_kd_loss(xs, ws, xt, wt, y, alpha=0.5, ignore_index=ii)
    with use_backend(backend):
        expected = call(-100)
        assert torch.isfinite(expected) and expected > 0
        assert torch.equal(call(2 ** 70), expected) and torch.equal(call(np.int64(-100)), expected)
        with pytest.raises(TypeError, match="ignore_index"):
            call(1.5)
