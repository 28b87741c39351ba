"""fused_linear_kd_loss against the unfused float64 reference: linear heads, then the KD formula written with
torch.nn.functional, reduced as documented; values and every gradient (student and teacher inputs, weights,
biases)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from augkd.ops import FusedLinearKDLoss, fused_linear_kd_loss, use_backend
from augkd.ops import fused_linear_kd as flkd
from augkd.ops.fused_linear_kd import auto_chunk_rows

from .matrix import BACKENDS_HERE, assert_close, assert_fullgraph_matches_eager


@pytest.fixture(autouse=True)
def _small(one_thread):
    yield


def reference(xs, ws, bs, xt, wt, bt, target, temperature, alpha, reduction, ignore_index=-100, t2_scale=True):
    """The unfused formula: logits from nn.Linear math, KL(teacher || student) at T, CE at 1."""
    s = F.linear(xs, ws, bs)
    t = F.linear(xt, wt, bt)
    lead = s.shape[:-1]
    s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    kl = F.kl_div(F.log_softmax(s2 / temperature, -1), F.log_softmax(t2 / temperature, -1), reduction="none",
                  log_target=True).sum(-1)
    rows = alpha * (temperature**2 if t2_scale else 1.0) * kl
    if target is not None:
        y = target.reshape(-1)
        keep = y != ignore_index
        if alpha != 1.0:
            rows = rows + (1 - alpha) * F.cross_entropy(s2, torch.where(keep, y, 0), reduction="none")
        rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(lead)
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.sum() / xs.shape[0]
    count = rows.numel() if target is None else int((target != ignore_index).sum())
    return rows.sum() / max(count, 1)


def make(lead, hidden, hidden_t, vocab, *, bias_s=True, bias_t=False, ignored=0.3, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    xs = torch.randn(*lead, hidden, **f64)
    ws = torch.randn(vocab, hidden, **f64) * scale / hidden**0.5 * 3
    bs = torch.randn(vocab, **f64) if bias_s else None
    xt = torch.randn(*lead, hidden_t, **f64)
    wt = torch.randn(vocab, hidden_t, **f64) * scale / hidden_t**0.5 * 3
    bt = torch.randn(vocab, **f64) if bias_t else None
    target = torch.randint(0, vocab, lead, generator=gen)
    target[torch.rand(lead, generator=gen) < ignored] = -100
    return [xs, ws, bs, xt, wt, bt], target


def leaves(tensors, dtypes, grads):
    out = []
    for x, dtype, g in zip(tensors, dtypes, grads):
        out.append(None if x is None else x.detach().to(dtype).requires_grad_(g))
    return out


def run(fn, tensors, target, grad_out_seed=3, **kw):
    loss = fn(*tensors[:2], *tensors[3:5], target, bs=tensors[2], bt=tensors[5], **kw)
    gen = torch.Generator().manual_seed(grad_out_seed)
    grad_out = (torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5).to(loss.dtype)
    wanted = [x for x in tensors if x is not None and x.requires_grad]
    grads = torch.autograd.grad(loss, wanted, grad_out)
    return loss, grads


def fused(xs, ws, xt, wt, target, *, bs, bt, **kw):
    return fused_linear_kd_loss(xs, ws, xt, wt, target, student_bias=bs, teacher_bias=bt, **kw)


def unfused(xs, ws, xt, wt, target, *, bs, bt, temperature, alpha, reduction, chunk_size=None, t2_scale=True):
    return reference(xs, ws, bs, xt, wt, bt, target, temperature, alpha, reduction, t2_scale=t2_scale)


def check(backend, tensors, target, dtypes, grads, tol_dtype, **kw):
    got_in = leaves(tensors, dtypes, grads)
    ref_in = leaves(tensors, [torch.float64] * 6, grads)
    with use_backend(backend):
        loss, g = run(fused, got_in, target, **kw)
    kw.pop("chunk_size", None)
    ref_loss, ref_g = run(unfused, ref_in, target, **kw)
    assert loss.dtype == (torch.float64 if dtypes[0] == torch.float64 else torch.float32)
    assert_close(loss, ref_loss, tol_dtype, "loss")
    names = [n for n, x in zip(("x_s", "W_s", "b_s", "x_t", "W_t", "b_t"), got_in) if x is not None and x.requires_grad]
    kept = [x for x in got_in if x is not None and x.requires_grad]
    for name, x, a, b in zip(names, kept, g, ref_g):
        assert a.dtype == x.dtype and a.shape == x.shape, f"grad {name}: {a.dtype}{tuple(a.shape)}"
        assert_close(a, b, tol_dtype, f"grad {name}")


REDUCTIONS = ["none", "sum", "mean", "token_mean", "batchmean"]
F32 = [torch.float32] * 6


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_unfused_reference_2d(backend, reduction):
    tensors, target = make((13,), 8, 6, 37, bias_s=True, bias_t=True)
    check(backend, tensors, target, F32, [True, True, True, False, False, False], torch.float32,
          temperature=2.0, alpha=0.4, reduction=reduction, chunk_size=4)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_unfused_reference_btH_with_teacher_grads(backend, reduction):
    """(B, T, H) inputs; the teacher's tensors require grad too, so they get gradients."""
    tensors, target = make((3, 5), 7, 9, 29, bias_s=False, bias_t=True, seed=1)
    check(backend, tensors, target, F32, [True] * 6, torch.float32,
          temperature=1.0, alpha=0.7, reduction=reduction, chunk_size=4)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 64])
def test_chunk_sizes_agree_in_float64(backend, chunk_size):
    if backend == "triton":
        pytest.skip("the Triton interpreter runs float32 only; float32 cases cover the Triton backend")
    tensors, target = make((2, 6), 5, 4, 19, seed=2)
    check(backend, tensors, target, [torch.float64] * 6,
          [True, True, True, True, True, False], torch.float64, temperature=3.0, alpha=0.5, reduction="mean",
          chunk_size=chunk_size)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_no_target_and_plain_kl(backend):
    tensors, _ = make((9,), 6, 6, 23, seed=4)
    check(backend, tensors, None, F32, [True, True, True, False, False, False], torch.float32,
          temperature=4.0, alpha=1.0, reduction="batchmean", chunk_size=2, t2_scale=False)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_bf16_student_with_fp32_teacher(backend):
    """A bf16 student head with an fp32 teacher: logits in fp32, gradients in bf16 (compared with the float64
    reference of the same bf16-rounded inputs). The logits reach kd_loss in fp32, so every backend runs it."""
    tensors, target = make((16,), 32, 24, 50, seed=5)
    tensors = [None if x is None else x.to(torch.bfloat16 if i < 3 else torch.float32).to(torch.float64)
               for i, x in enumerate(tensors)]
    dtypes = [torch.bfloat16] * 3 + [torch.float32] * 3
    check(backend, tensors, target, dtypes, [True, True, True, False, False, False], torch.bfloat16,
          temperature=2.0, alpha=0.5, reduction="token_mean", chunk_size=8)


def test_all_rows_ignored_give_zero_loss_and_gradients():
    tensors, target = make((6,), 4, 4, 11, ignored=1.1)
    xs, ws, bs, xt, wt, bt = leaves(tensors, F32, [True, True, True, False, False, False])
    for reduction in ("mean", "token_mean", "sum", "batchmean"):
        loss = fused_linear_kd_loss(xs, ws, xt, wt, target, student_bias=bs, alpha=0.5, reduction=reduction)
        grads = torch.autograd.grad(loss, [xs, ws, bs])
        assert float(loss.detach()) == 0.0 and all(torch.all(g == 0) for g in grads), reduction


def test_batchmean_divides_by_the_batch_dimension():
    """(B, T, H) input: batchmean is sum / B (torch's KLDivLoss), token_mean is sum / non-ignored tokens."""
    tensors, target = make((4, 3), 5, 5, 13, ignored=0.0)
    xs, ws, bs, xt, wt, bt = tensors
    total = fused_linear_kd_loss(xs, ws, xt, wt, target, temperature=2.0, reduction="sum")
    batch = fused_linear_kd_loss(xs, ws, xt, wt, target, temperature=2.0, reduction="batchmean")
    token = fused_linear_kd_loss(xs, ws, xt, wt, target, temperature=2.0, reduction="token_mean")
    torch.testing.assert_close(batch, total / 4)
    torch.testing.assert_close(token, total / 12)


def test_module_form_matches_function():
    tensors, target = make((7,), 6, 5, 17, seed=6)
    xs, ws, bs, xt, wt, bt = tensors
    crit = FusedLinearKDLoss(temperature=2.0, alpha=0.5, reduction="token_mean", chunk_size=3)
    assert "token_mean" in repr(crit)
    torch.testing.assert_close(crit(xs, ws, xt, wt, target, bs),
                               fused_linear_kd_loss(xs, ws, xt, wt, target, student_bias=bs, temperature=2.0,
                                                    alpha=0.5, reduction="token_mean"))


def test_second_backward_raises_clearly():
    tensors, target = make((5,), 4, 4, 9)
    xs, ws, bs, xt, wt, bt = leaves(tensors, F32, [True, True, False, False, False, False])
    loss = fused_linear_kd_loss(xs, ws, xt, wt, target, alpha=0.5, reduction="mean")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_reduction_none_backward_twice_with_retain_graph_works():
    tensors, target = make((5,), 4, 4, 9)
    xs, ws, bs, xt, wt, bt = leaves(tensors, F32, [True, True, False, False, False, False])
    rows = fused_linear_kd_loss(xs, ws, xt, wt, target, alpha=0.5, reduction="none")
    (g1,) = torch.autograd.grad(rows.sum(), [xs], retain_graph=True)
    (g2,) = torch.autograd.grad(rows.sum(), [xs])
    torch.testing.assert_close(g1, g2)


def test_no_grad_gives_the_same_value():
    tensors, target = make((6,), 4, 4, 9)
    xs, ws, bs, xt, wt, bt = leaves(tensors, F32, [True, True, False, False, False, False])
    with torch.no_grad():
        a = fused_linear_kd_loss(xs, ws, xt, wt, target, alpha=0.5, temperature=2.0)
    b = fused_linear_kd_loss(xs, ws, xt, wt, target, alpha=0.5, temperature=2.0)
    torch.testing.assert_close(a, b.detach())


def test_auto_chunk_rows():
    cpu, f32 = torch.device("cpu"), torch.float32
    # 120 MiB over 2 buffers fit 491 rows of 32000: 5 even chunks of 410, rounded up to 416 (the last 384)
    assert auto_chunk_rows(2048, 32000, f32, cpu, buffers=2) == 416
    assert auto_chunk_rows(2048, 32000, f32, cpu) == 296  # 3 buffers: 327 fit, 7 chunks of 293 -> 296
    assert auto_chunk_rows(512, 128256, f32, cpu) == 128  # raised to MIN_CHUNK_ROWS
    assert auto_chunk_rows(4096, 1000, f32, cpu) == 4096
    assert auto_chunk_rows(10, 32000, f32, cpu) == 10
    assert auto_chunk_rows(4096, 10**9, f32, cpu) == 128
    assert auto_chunk_rows(4096, 32000, torch.float64, cpu) == 160  # 163 fit: 26 chunks of 158 -> 160
    assert auto_chunk_rows(4096, 32000, f32, torch.device("cuda")) == 1024
    assert auto_chunk_rows(1000, 32000, f32, cpu, buffers=2) == 336  # 3 chunks of 334 -> 336 (the last 328)
    assert auto_chunk_rows(492, 32000, f32, cpu, buffers=2) == 248  # one row over the fit: 2 chunks of 246 -> 248


@pytest.mark.parametrize("rows,vocab,buffers", [(2048, 32000, 2), (2048, 32000, 3), (1000, 777, 2), (5000, 50257, 2),
                                                (300, 128256, 2), (4096, 32000, 3)])
def test_auto_chunks_stay_in_the_budget_and_even(rows, vocab, buffers):
    """The chosen chunk's buffers fit CHUNK_BUFFER_BYTES (or the chunk is MIN_CHUNK_ROWS or all rows), and no more
    chunks than the budget needs."""
    from augkd.ops import fused_linear_kd as flkd
    cpu = torch.device("cpu")
    chunk = auto_chunk_rows(rows, vocab, torch.float32, cpu, buffers=buffers)
    fit = flkd.CHUNK_BUFFER_BYTES["cpu"] // (buffers * vocab * 4)
    assert chunk == rows or chunk == flkd.MIN_CHUNK_ROWS or chunk <= fit
    assert -(-rows // chunk) == -(-rows // max(fit, flkd.MIN_CHUNK_ROWS))


@pytest.mark.parametrize("kwargs,match", [
    (dict(student_input=torch.randn(4)), "student_input must have shape"),
    (dict(student_weight=torch.randn(7, 3)), r"student_weight must have shape \(V, 5\)"),
    (dict(teacher_weight=torch.randn(8, 6)), "share the vocabulary"),
    (dict(teacher_input=torch.randn(3, 6)), "leading shape"),
    (dict(student_bias=torch.randn(6)), r"student_bias must have shape \(7,\)"),
    (dict(target=torch.zeros(4, dtype=torch.long)), "target must have shape"),
    (dict(target=torch.zeros(5)), "integer tensor"),
    (dict(temperature=0.0), "temperature"),
    (dict(alpha=1.5), "alpha"),
    (dict(reduction="avg"), "reduction"),
    (dict(divergence="js"), "divergence"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(target=torch.tensor([0, 1, 7, 2, 3])), r"fused_linear_kd_loss: target holds token id 7, outside \[0, 7\)"),
    (dict(student_weight=torch.randn(7, 5, dtype=torch.float64)), "same dtype"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = dict(student_input=torch.randn(5, 5), student_weight=torch.randn(7, 5), teacher_input=torch.randn(5, 6),
                teacher_weight=torch.randn(7, 6), target=torch.zeros(5, dtype=torch.long), alpha=0.5)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_linear_kd_loss(args.pop("student_input"), args.pop("student_weight"), args.pop("teacher_input"),
                             args.pop("teacher_weight"), args.pop("target"), **args)


def test_alpha_below_one_needs_a_target():
    with pytest.raises(ValueError, match="needs a target"):
        fused_linear_kd_loss(torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 4), torch.randn(5, 4), alpha=0.5)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("reduction", ["token_mean", "none"])
def test_compile_matches_eager(backend, reduction):
    """torch.compile around the loss (the chunk loop runs eagerly behind a graph break)."""
    tensors, target = make((9,), 6, 5, 21, seed=7)
    xs, ws, bs, xt, wt, bt = leaves(tensors, F32, [True, True, True, False, False, False])

    def step(a, b, c):
        out = fused_linear_kd_loss(a, b, xt, wt, target, student_bias=c, temperature=2.0, alpha=0.5,
                                   reduction=reduction, chunk_size=4)
        return out.sum()

    torch._dynamo.reset()
    with use_backend(backend):
        eager = step(xs, ws, bs)
        ge = torch.autograd.grad(eager, [xs, ws, bs])
        compiled = torch.compile(step, backend="aot_eager")(xs, ws, bs)
        gc = torch.autograd.grad(compiled, [xs, ws, bs])
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- chunks through kd_loss_grad_ (C++ CPU, "kl")

IN_PLACE = pytest.mark.skipif(flkd._grad_in_place_kernel(torch.device("cpu"), "kl") is None,
                              reason="kd_loss_grad_ needs the compiled extension (built with the op)")


def _spied_kernel(monkeypatch):
    """Count the calls of kd_loss_grad_ that the row sweep makes."""
    calls = []
    real = flkd._grad_in_place_kernel

    def spy(device, divergence):
        kernel = real(device, divergence)
        if kernel is None:
            return None

        def counted(*args):
            calls.append(args[0].shape[0])
            return kernel(*args)
        return counted
    monkeypatch.setattr(flkd, "_grad_in_place_kernel", spy)
    return calls


@IN_PLACE
def test_in_place_kernel_serves_cpu_kl_only():
    cpu = torch.device("cpu")
    assert flkd._grad_in_place_kernel(cpu, "kl") is torch.ops.augkd.kd_loss_grad_
    assert flkd.row_chunk_buffers(cpu, "kl") == 2
    for divergence in ("reverse_kl", "jsd", "tvd"):
        assert flkd._grad_in_place_kernel(cpu, divergence) is None
        assert flkd.row_chunk_buffers(cpu, divergence) == 3
    with use_backend("torch"):
        assert flkd._grad_in_place_kernel(cpu, "kl") is None
    assert flkd._grad_in_place_kernel(torch.device("meta"), "kl") is None


@IN_PLACE
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("teacher_grads", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 5, 24])
def test_in_place_chunks_equal_the_kd_loss_chunks(monkeypatch, reduction, teacher_grads, chunk_size):
    """Chunks whose logit buffers take their gradients (kd_loss_grad_) give the values and gradients of the chunks
    that run kd_loss_fwd / kd_loss_bwd, bit for bit: chunk sizes that do not divide N (37 rows), ignored rows
    with a non-default ignore_index, biases on both heads."""
    tensors, target = make((37,), 8, 6, 53, bias_s=True, bias_t=True, seed=11)
    target[target == -100] = 7
    wants = [True, True, True] + [teacher_grads] * 3
    kw = dict(temperature=2.0, alpha=0.6, reduction=reduction, ignore_index=7, chunk_size=chunk_size)
    ins = leaves(tensors, F32, wants)
    calls = _spied_kernel(monkeypatch)
    got = run(fused, ins, target, **kw)
    assert calls and sum(calls) == 37 * (2 if reduction == "none" else 1), calls  # "none": forward + backward
    monkeypatch.setattr(flkd, "_grad_in_place_kernel", lambda device, divergence: None)
    want = run(fused, ins, target, **kw)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1], want[1]):
        assert torch.equal(a, b)


@IN_PLACE
def test_in_place_chunks_match_the_float64_reference_in_float64(monkeypatch):
    tensors, target = make((3, 7), 6, 5, 41, seed=12)
    calls = _spied_kernel(monkeypatch)
    check("cpu", tensors, target, [torch.float64] * 6, [True] * 6, torch.float64, temperature=3.0, alpha=0.3,
          reduction="sum", chunk_size=6)
    assert len(calls) == 4


@IN_PLACE
def test_in_place_chunks_under_compile_fullgraph(monkeypatch):
    tensors, target = make((11,), 6, 5, 23, seed=13)
    calls = _spied_kernel(monkeypatch)

    def step(xs, ws, bs, xt, wt):
        return fused_linear_kd_loss(xs, ws, xt, wt, target, student_bias=bs, temperature=2.0, alpha=0.5,
                                    reduction="token_mean", chunk_size=4)
    assert_fullgraph_matches_eager(step, lambda: [t.detach().float().requires_grad_() for t in tensors[:5]], 5)
    assert calls


def test_matches_liger_chunked_forward_kl():
    """Liger-Kernel's LigerFusedLinearJSDLoss at beta = 0 is the forward KL(teacher || student) with hard/soft
    weights and no T^2: the same loss and gradients as ours with alpha = soft / (hard + soft) scaled."""
    chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="Liger-Kernel (pip liger-kernel) not installed")
    tensors, target = make((24,), 16, 16, 50, bias_s=False, ignored=0.0, seed=8)
    xs, ws, _, xt, wt, _ = leaves(tensors, F32, [True, True, False, False, False, False])
    temperature = 2.0
    liger = chunked.LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5 * temperature**2, beta=0.0,
                                            temperature=temperature, compiled=False)
    want = liger(xs, ws, xt, wt, target)
    got = fused_linear_kd_loss(xs, ws, xt, wt, target, temperature=temperature, alpha=0.5, reduction="token_mean")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, [xs, ws]), torch.autograd.grad(want, [xs, ws])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
