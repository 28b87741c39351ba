"""kd_loss's divergence family (divergence="kl" | "reverse_kl" | "jsd" | "tvd", return_parts) on every backend here
against the plain textbook formulas in float64: forward, student and teacher gradients, beta across [0, 1],
masked classes, NaN rows, ignored rows, extreme temperatures, (B, T, V) inputs, a bf16 student, gradcheck,
TRL's generalized_jsd_loss and Liger's JSD / TVD written out here, and torch.compile(fullgraph=True)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from augkd import ops
from augkd.ops import use_backend
from augkd.ops.divergence_reference import plain_divergence

from .matrix import BACKEND_DEVICES, BACKENDS_HERE, as_leaf, assert_close, assert_fullgraph_matches_eager, on

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [("kl", 0.5), ("reverse_kl", 0.5), ("tvd", 0.5)] + [("jsd", b) for b in (0.0, 0.1, 0.5, 0.9, 1.0)]
IDS = [f"{d}-{b}" for d, b in CASES]


def oracle(s, t, y, *, divergence, beta, temperature=1.0, alpha=1.0, ignore_index=-100, t2_scale=True):
    """(loss, soft, hard) per row in float64 from the plain formulas; ignored rows 0."""
    s, t = s.double(), t.double()
    d = plain_divergence(s, t, divergence, beta, temperature)
    soft = (temperature ** 2 if t2_scale else 1.0) * d
    hard = torch.zeros_like(soft)
    if y is not None:
        valid = y != ignore_index
        hard = F.cross_entropy(s.reshape(-1, s.shape[-1]), torch.where(valid, y, 0).reshape(-1),
                               reduction="none").reshape(soft.shape)
        zero = torch.zeros_like(soft)
        soft, hard = torch.where(valid, soft, zero), torch.where(valid, hard, zero)
    loss = (alpha * soft if alpha != 0 else 0 * soft) + ((1 - alpha) * hard if y is not None and alpha != 1 else 0)
    return loss, soft, hard


def run(backend, s, t, y, dtype=torch.float32, t_dtype=None, device="cpu", **cfg):
    """(loss, soft, hard, grad_s, grad_t) of kd_loss(reduction="none", return_parts=True) on `backend` with
    `device` tensors; the gradients are of sum(loss) + 0.5 sum(soft) (so the parts' gradients are checked too)."""
    s_ = as_leaf(s, dtype, device=device)
    t_ = as_leaf(t, t_dtype or dtype, device=device)
    with use_backend(backend):
        loss, soft, hard = ops.kd_loss(s_, t_, on(device, y), reduction="none", return_parts=True, **cfg)
    (loss.sum() + 0.5 * soft.sum()).backward()
    return loss, soft, hard, s_.grad, t_.grad


def expected(s, t, y, **cfg):
    s_, t_ = as_leaf(s, torch.float64), as_leaf(t, torch.float64)
    loss, soft, hard = oracle(s_, t_, y, **cfg)
    (loss.sum() + 0.5 * soft.sum()).backward()
    return loss, soft, hard, s_.grad, t_.grad


def check(backend, s, t, y, dtype=torch.float32, what="", device="cpu", **cfg):
    got = run(backend, s, t, y, dtype, device=device, **cfg)
    want = expected(s, t, y, **cfg)
    for name, g, w in zip(("loss", "soft", "hard", "grad_student", "grad_teacher"), got, want):
        assert_close(g, w, dtype, f"{what} {name}")


def logits(rows, classes, scale=2.0, dtype=torch.float64):
    return torch.randn(rows, classes, dtype=dtype) * scale


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("divergence,beta", CASES, ids=IDS)
def test_against_float64(backend, device, divergence, beta):
    s, t = logits(7, 37), logits(7, 37)
    y = torch.randint(0, 37, (7,))
    y[2] = -100
    for cfg in (dict(temperature=2.0, alpha=0.7), dict(temperature=1.0, alpha=1.0), dict(temperature=0.5, alpha=0.0)):
        check(backend, s, t, y, divergence=divergence, beta=beta, what=str(cfg), device=device, **cfg)
    check(backend, s, t, None, divergence=divergence, beta=beta, temperature=3.0, t2_scale=False, what="no target",
          device=device)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "tvd"])
def test_long_rows_and_float64(backend, divergence):
    """Rows longer than one block of the kernels (the online updates across blocks), and fp64 inputs."""
    classes = 5000 if backend != "triton" else 300
    s, t = logits(3, classes, 3.0), logits(3, classes, 3.0)
    s[:, 0] += 10  # a maximum that the later blocks do not move
    t[:, -1] += 10  # and one in the last block
    blocks = contextlib.nullcontext()
    if backend == "triton":  # blocks of 64 columns: the online updates across blocks on a short row
        from augkd.ops.triton_kernels import _common
        blocks = _common.max_block(64)
    with blocks:
        check(backend, s, t, torch.randint(0, classes, (3,)), divergence=divergence, beta=0.3, temperature=1.5,
              alpha=0.6, what="fp32")
        check(backend, s, t, None, torch.float64, divergence=divergence, beta=0.3, temperature=1.5, what="fp64")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "tvd"])
def test_masked_classes(backend, device, divergence):
    """-inf in both rows (vocabulary padding): those classes are absent. -inf in the teacher only (kl, jsd,
    tvd: finite; reverse_kl would be infinite): the student's mass there counts."""
    s, t = logits(5, 29), logits(5, 29)
    s[:, -4:] = -math.inf
    t[:, -4:] = -math.inf
    if divergence != "reverse_kl":
        t[1, :6] = -math.inf
        t[3, 10] = -math.inf
    y = torch.randint(0, 20, (5,))
    check(backend, s, t, y, divergence=divergence, beta=0.4, temperature=2.0, alpha=0.5, device=device)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "tvd"])
def test_nan_rows_and_ignored_rows(backend, divergence):
    s, t = logits(6, 19), logits(6, 19)
    s[1, 4] = math.nan
    t[3, 7] = math.nan
    s[4, :] = math.nan  # ignored: exactly 0, zero gradients, whatever it holds
    y = torch.randint(0, 19, (6,))
    y[4] = -100
    loss, soft, hard, gs, gt = run(backend, s, t, y, divergence=divergence, beta=0.5, alpha=0.5)
    for r in (1, 3):
        assert torch.isnan(loss[r]) and torch.isnan(soft[r]), f"row {r} holds a NaN: its loss must be NaN"
    assert loss[4] == 0 and soft[4] == 0 and hard[4] == 0
    assert torch.all(gs[4] == 0) and torch.all(gt[4] == 0)
    keep = [0, 2, 5]
    want = expected(s[keep], t[keep], y[keep], divergence=divergence, beta=0.5, alpha=0.5)
    for name, g, w in zip(("loss", "soft", "hard", "gs", "gt"), (loss, soft, hard, gs, gt), want):
        assert_close(g[keep], w, torch.float32, name)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "tvd"])
def test_all_rows_ignored(backend, divergence):
    s, t = as_leaf(logits(4, 11), torch.float32), as_leaf(logits(4, 11), torch.float32)
    y = torch.full((4,), -100)
    with use_backend(backend):
        loss = ops.kd_loss(s, t, y, divergence=divergence, alpha=0.5, reduction="token_mean")
    loss.backward()
    assert loss.item() == 0 and torch.all(s.grad == 0) and torch.all(t.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.9),
                                             ("tvd", 0.5)])
@pytest.mark.parametrize("temperature", [0.02, 100.0, 1e4])
def test_extreme_temperature(backend, divergence, beta, temperature):
    """Small T (distributions near one-hot, large log-ratios) and large T (every log-ratio tiny: the
    divergences are O(1 / T^2) and must not cancel)."""
    s, t = logits(5, 23), logits(5, 23)
    check(backend, s, t, None, divergence=divergence, beta=beta, temperature=temperature,
          what=f"T={temperature}")


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tvd"])
def test_btv_inputs_and_reductions(backend, divergence):
    s, t = logits(2 * 3, 13).reshape(2, 3, 13), logits(2 * 3, 13).reshape(2, 3, 13)
    y = torch.randint(0, 13, (2, 3))
    y[0, 1] = -100
    w = torch.rand(2, 3, dtype=torch.float64) + 0.5
    rows, _, _ = oracle(s, t, y, divergence=divergence, beta=0.5, temperature=2.0, alpha=0.5)
    rows = rows * w
    with use_backend(backend):
        for reduction, want in (("none", rows), ("sum", rows.sum()), ("batchmean", rows.sum() / 2),
                                ("token_mean", rows.sum() / 5), ("mean", rows.sum() / 5)):
            got = ops.kd_loss(s.float(), t.float(), y, divergence=divergence, temperature=2.0, alpha=0.5,
                              sample_weight=w.float(), reduction=reduction)
            assert_close(got, want, torch.float32, reduction)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tvd"])
def test_bf16_student_fp32_teacher(backend, divergence):
    s, t = logits(4, 17), logits(4, 17)
    s = s.to(torch.bfloat16).double()  # the student as it is stored
    y = torch.randint(0, 17, (4,))
    loss, soft, hard, gs, gt = run(backend, s, t, y, torch.bfloat16, torch.float32, divergence=divergence,
                                   alpha=0.5, temperature=2.0)
    assert loss.dtype == torch.float32 and gs.dtype == torch.bfloat16 and gt.dtype == torch.float32
    want = expected(s, t, y, divergence=divergence, beta=0.5, alpha=0.5, temperature=2.0)
    assert_close(loss, want[0], torch.float32, "loss (fp32 compute)")
    assert_close(gs, want[3], torch.bfloat16, "grad_student")
    assert_close(gt, want[4], torch.float32, "grad_teacher")


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5)])
def test_gradcheck_float64(backend, divergence, beta):
    s, t = as_leaf(logits(3, 7), torch.float64), as_leaf(logits(3, 7), torch.float64)
    y = torch.tensor([1, -100, 4])

    def f(a, b):
        loss, soft, hard = ops.kd_loss(a, b, y, divergence=divergence, beta=beta, temperature=1.5, alpha=0.6,
                                       reduction="none", return_parts=True)
        return loss, soft, hard

    with use_backend(backend):
        assert torch.autograd.gradcheck(f, (s, t), eps=1e-6, atol=1e-7)


def test_parts_add_up():
    s, t = logits(5, 9).float(), logits(5, 9).float()
    y = torch.randint(0, 9, (5,))
    loss, soft, hard = ops.kd_loss(s, t, y, divergence="jsd", alpha=0.3, temperature=2.0, return_parts=True)
    torch.testing.assert_close(loss, 0.3 * soft + 0.7 * hard)
    # "kl" with parts runs the divergence op; its loss equals today's kd_loss
    loss_kl, _, _ = ops.kd_loss(s, t, y, alpha=0.3, temperature=2.0, return_parts=True)
    torch.testing.assert_close(loss_kl, ops.kd_loss(s, t, y, alpha=0.3, temperature=2.0))


# ---------------------------------------------------------------- TRL and Liger, written out here

def trl_generalized_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0):
    """TRL GKDTrainer.generalized_jsd_loss (reduction "batchmean"): log-softmax of logits / T; beta = 0:
    kl_div(student_lp, teacher_lp, log_target) = KL(teacher || student); beta = 1: KL(student || teacher);
    otherwise the mixture log m = logsumexp(student_lp + log(1 - beta), teacher_lp + log beta) and
    beta KL(teacher || m) + (1 - beta) KL(student || m); elementwise terms summed over the non-masked
    tokens and divided by their count (no T^2 factor)."""
    sl = torch.log_softmax(student_logits / temperature, -1)
    tl_ = torch.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        jsd = tl_.exp() * (tl_ - sl)
    elif beta == 1:
        jsd = sl.exp() * (sl - tl_)
    else:
        lm = torch.logsumexp(torch.stack([sl + math.log(1 - beta), tl_ + math.log(beta)]), 0)
        jsd = beta * tl_.exp() * (tl_ - lm) + (1 - beta) * sl.exp() * (sl - lm)
    if labels is not None:
        mask = labels != -100
        return jsd[mask].sum() / mask.sum()
    return jsd.sum() / jsd.size(0)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_reproduces_trl_generalized_jsd(backend, beta):
    s, t = logits(2 * 5, 31).reshape(2, 5, 31), logits(2 * 5, 31).reshape(2, 5, 31)
    labels = torch.randint(0, 31, (2, 5))
    labels[1, 3:] = -100
    want = trl_generalized_jsd(s, t, labels, beta, temperature=1.7)
    with use_backend(backend):
        got = ops.kd_loss(s.float(), t.float(), labels, divergence="jsd", beta=beta, temperature=1.7,
                          t2_scale=False, reduction="token_mean")
    assert_close(got, want, torch.float32, "token_mean = TRL's batchmean over labelled tokens")
    want_all = trl_generalized_jsd(s.reshape(10, 31), t.reshape(10, 31), None, beta)
    with use_backend(backend):
        got_all = ops.kd_loss(s.reshape(10, 31).float(), t.reshape(10, 31).float(), divergence="jsd", beta=beta)
    assert_close(got_all, want_all, torch.float32, "batchmean without labels")


def liger_tvd(p, q):
    """Liger's TVD loss (LigerTVDLoss, reduction "none"): 0.5 |p - q| elementwise on probabilities."""
    return 0.5 * (p - q).abs()


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_reproduces_liger_tvd_and_jsd(backend):
    s, t = logits(6, 21), logits(6, 21)
    with use_backend(backend):
        got_tvd = ops.kd_loss(s.float(), t.float(), divergence="tvd", reduction="none")
        got_jsd = ops.kd_loss(s.float(), t.float(), divergence="jsd", beta=0.3, t2_scale=False, reduction="sum")
    assert_close(got_tvd, liger_tvd(t.softmax(-1), s.softmax(-1)).sum(-1), torch.float32, "tvd")
    # LigerJSD's docstring: JSD(beta)(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q,
    # P the teacher ("target", log_p) and Q the student ("input", log_q)
    p, q = t.softmax(-1), s.softmax(-1)
    m = 0.3 * p + 0.7 * q
    want = (0.3 * (p * (p / m).log()) + 0.7 * (q * (q / m).log())).sum()
    assert_close(got_jsd, want, torch.float32, "jsd")
    try:
        from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction
    except Exception as exc:  # noqa: BLE001  (liger is optional; its formulas are written out above)
        pytest.skip(f"liger_kernel not importable here ({type(exc).__name__}: {exc}); formula checked above")
    y = torch.randint(0, 21, (6,))
    y[2] = -100
    for beta in (0.0, 0.3, 1.0):
        want = LigerFusedLinearJSDFunction.distillation_loss_fn(s, t, beta=beta, target=y, ignore_index=-100)
        with use_backend(backend):
            got = ops.kd_loss(s.float(), t.float(), y, divergence="jsd", beta=beta, t2_scale=False, reduction="sum")
        assert_close(got, want, torch.float32, f"liger distillation_loss_fn beta={beta}")


# ---------------------------------------------------------------- compile and errors

@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "tvd"])
def test_compile_fullgraph(divergence):
    s, t = logits(4, 16).float(), logits(4, 16).float()
    y = torch.randint(0, 16, (4,))

    def f(a, b):
        loss, soft, hard = ops.kd_loss(a, b, y, divergence=divergence, beta=0.3, temperature=2.0, alpha=0.5,
                                       return_parts=True)
        return loss + 0.1 * soft

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a1, b1 = as_leaf(s, torch.float32), as_leaf(t, torch.float32)
    a2, b2 = as_leaf(s, torch.float32), as_leaf(t, torch.float32)
    got = compiled(a1, b1)
    got.backward()
    want = f(a2, b2)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(a1.grad, a2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)


def test_bad_arguments():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="divergence"):
        ops.kd_loss(s, t, divergence="js")
    with pytest.raises(ValueError, match="beta"):
        ops.kd_loss(s, t, divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match="return_teacher_energy"):
        ops.kd_loss(s, t, divergence="tvd", return_teacher_energy=True)


# ---------------------------------------------------------------- fused linear KD with the divergences

def _heads(n=9, hidden=6, vocab=21):
    xs = torch.randn(n, hidden, dtype=torch.float64)
    ws = torch.randn(vocab, hidden, dtype=torch.float64) / hidden ** 0.5
    bs = torch.randn(vocab, dtype=torch.float64) * 0.1
    xt = torch.randn(n, hidden, dtype=torch.float64)
    wt = torch.randn(vocab, hidden, dtype=torch.float64) / hidden ** 0.5
    y = torch.randint(0, vocab, (n,))
    y[3] = -100
    return xs, ws, bs, xt, wt, y


def _unfused(xs, ws, bs, xt, wt, y, divergence, beta, reduction):
    rows, _, _ = oracle(xs @ ws.T + bs, xt @ wt.T, y, divergence=divergence, beta=beta, temperature=2.0, alpha=0.5)
    return {"none": rows, "sum": rows.sum(), "token_mean": rows.sum() / (y != -100).sum()}[reduction]


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("jsd", 0.2), ("tvd", 0.5)])
def test_fused_linear_divergences(backend, divergence, beta):
    tensors = _heads()
    y = tensors[-1]
    for reduction in ("token_mean", "none"):
        xs, ws, bs, xt, wt = (as_leaf(t, torch.float32, i < 3) for i, t in enumerate(tensors[:5]))
        with use_backend(backend):
            got = ops.fused_linear_kd_loss(xs, ws, xt, wt, y, student_bias=bs, temperature=2.0, alpha=0.5,
                                           divergence=divergence, beta=beta, reduction=reduction, chunk_size=4)
        got.sum().backward()
        ref = [as_leaf(t, torch.float64, i < 3) for i, t in enumerate(tensors[:5])]
        want = _unfused(*ref, y, divergence, beta, reduction)
        want.sum().backward()
        assert_close(got, want, torch.float32, f"{reduction} loss")
        for name, a, b in zip(("x", "W", "b"), (xs, ws, bs), ref[:3]):
            assert_close(a.grad, b.grad, torch.float32, f"{reduction} grad {name}")
    crit = ops.FusedLinearKDLoss(temperature=2.0, alpha=0.5, divergence=divergence, beta=beta, reduction="sum")
    f32 = [t.float() for t in tensors[:5]]
    with use_backend(backend):
        assert_close(crit(f32[0], f32[1], f32[3], f32[4], y, student_bias=f32[2]),
                     _unfused(*tensors[:5], y, divergence, beta, "sum"), torch.float32, "module")


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("reduction", ["token_mean", "none"])
def test_fused_linear_compile_fullgraph(divergence, reduction):
    tensors = _heads()
    y = tensors[-1]

    def step(a, b, c, xt, wt):
        out = ops.fused_linear_kd_loss(a, b, xt, wt, y, student_bias=c, temperature=2.0, alpha=0.5,
                                       divergence=divergence, beta=0.3, reduction=reduction, chunk_size=4)
        return out.sum()

    assert_fullgraph_matches_eager(step, lambda: [as_leaf(t, torch.float32, i < 3) for i, t in enumerate(tensors[:5])], 3)
