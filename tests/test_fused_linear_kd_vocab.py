"""fused_linear_kd_loss swept over vocabulary blocks (vocab_chunk_size) against the unfused float64 reference:
every divergence and reduction, blocks that do not divide V, V smaller than a block, ignored rows, a masked
vocabulary, teacher gradients, biases, bf16 student with fp32 teacher, torch.compile(fullgraph=True), and the
automatic choice of the blocks."""

from __future__ import annotations

import pytest
import torch

from augkd import ops
from augkd.ops import fused_linear_kd as flkd
from augkd.ops import fused_linear_kd_vocab as vocab_sweep
from augkd.ops.fused_linear_kd import auto_vocab_chunk

from .matrix import assert_close, assert_fullgraph_matches_eager
from .test_kd_divergence import oracle

pytestmark = pytest.mark.usefixtures("one_thread")

DIVERGENCES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5), ("jsd", 0.0), ("jsd", 1.0)]
DIV_IDS = [f"{d}-{b}" for d, b in DIVERGENCES]
REDUCTIONS = ["none", "sum", "mean", "token_mean", "batchmean"]


def heads(lead=(11,), hidden=6, hidden_t=5, vocab=37, seed=0, ignored=(2, 7)):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    tensors = [torch.randn(*lead, hidden, **f64), torch.randn(vocab, hidden, **f64), torch.randn(vocab, **f64),
               torch.randn(*lead, hidden_t, **f64), torch.randn(vocab, hidden_t, **f64), torch.randn(vocab, **f64)]
    y = torch.randint(0, vocab, lead, generator=gen)
    y.view(-1)[list(ignored)] = -100
    return tensors, y


def reduce(rows, y, reduction, batch):
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction in ("sum", "batchmean"):
        return total / (batch if reduction == "batchmean" else 1)
    return total / (rows.numel() if y is None else max(int((y != -100).sum()), 1))  # mean / token_mean


def reference(tensors, y, reduction, divergence, beta, temperature, alpha):
    xs, ws, bs, xt, wt, bt = tensors
    s = xs @ ws.T + (0 if bs is None else bs)
    t = xt @ wt.T + (0 if bt is None else bt)
    rows, _, _ = oracle(s, t, y, divergence=divergence, beta=beta, temperature=temperature, alpha=alpha)
    return reduce(rows, y, reduction, xs.shape[0])


def compare(tensors, y, dtypes, wants, tol, *, reduction, divergence="kl", beta=0.5, temperature=2.0, alpha=0.4,
            backend="auto", **kw):
    """Loss and the gradients of every tensor in `wants` (a random grad_output) against the float64 reference."""
    got = [None if t is None else t.detach().to(d).requires_grad_(w) for t, d, w in zip(tensors, dtypes, wants)]
    ref = [None if t is None else t.detach().to(d).double().requires_grad_(w)
           for t, d, w in zip(tensors, dtypes, wants)]
    with ops.use_backend(backend):
        loss = ops.fused_linear_kd_loss(got[0], got[1], got[3], got[4], y, student_bias=got[2],
                                        teacher_bias=got[5], temperature=temperature, alpha=alpha,
                                        divergence=divergence, beta=beta, reduction=reduction, **kw)
    want = reference(ref, y, reduction, divergence, beta, temperature, alpha)
    grad_out = torch.rand(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    leaves = [i for i, t in enumerate(got) if t is not None and t.requires_grad]
    with ops.use_backend(backend):  # reduction "none" sweeps again in the backward
        g_got = torch.autograd.grad(loss, [got[i] for i in leaves], grad_out.to(loss.dtype))
    g_ref = torch.autograd.grad(want, [ref[i] for i in leaves], grad_out)
    assert_close(loss, want, tol, "loss")
    for i, a, b in zip(leaves, g_got, g_ref):
        assert a.dtype == got[i].dtype and a.shape == got[i].shape
        assert_close(a, b, tol, f"grad of tensor {i}")


F64 = [torch.float64] * 6
ALL = [True] * 6
# the gradient sweep's elementwise math: kd_divergence's C++ backward kernel (auto on CPU tensors) or torch ops
PATHS = ["auto", "torch"]


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vocab_blocks_match_reference_float64(backend, divergence, beta, reduction):
    """Blocks of 8 over V = 37 (the last block 5 wide), rows in chunks of 4, both heads biased, every tensor
    requiring grad (the teacher's too), two rows ignored."""
    tensors, y = heads()
    compare(tensors, y, F64, ALL, torch.float64, reduction=reduction, divergence=divergence, beta=beta,
            chunk_size=4, vocab_chunk_size=8, backend=backend)


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:4], ids=DIV_IDS[:4])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (3.0, 0.0), (0.5, 1.0)])
def test_vocab_blocks_temperatures_and_weights(backend, divergence, beta, temperature, alpha):
    """T = 1 (CE shares the soft normaliser), a CE-only loss (alpha = 0), a soft-only loss (alpha = 1)."""
    tensors, y = heads(seed=2)
    compare(tensors, y, F64, [True, True, True, True, False, False], torch.float64, reduction="token_mean",
            divergence=divergence, beta=beta, temperature=temperature, alpha=alpha, chunk_size=5,
            vocab_chunk_size=6, backend=backend)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:4], ids=DIV_IDS[:4])
@pytest.mark.parametrize("vocab_chunk", [1, 36, 37, 500])
def test_block_widths_down_to_one_and_past_v(divergence, beta, vocab_chunk):
    """One entry per block, V - 1 (a last block of one), exactly V and more than V (whole rows)."""
    tensors, y = heads(seed=3)
    compare(tensors, y, F64, [True, True, False, False, True, True], torch.float64, reduction="sum",
            divergence=divergence, beta=beta, chunk_size=3, vocab_chunk_size=vocab_chunk)


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:4], ids=DIV_IDS[:4])
@pytest.mark.parametrize("reduction", ["none", "token_mean"])
def test_vocab_blocks_float32_btH_no_bias(backend, divergence, beta, reduction):
    tensors, y = heads(lead=(3, 5), hidden=12, hidden_t=10, vocab=300, seed=4, ignored=(0, 9))
    tensors[2] = tensors[5] = None
    compare(tensors, y, [torch.float32] * 6, ALL, torch.float32, reduction=reduction, divergence=divergence,
            beta=beta, chunk_size=4, vocab_chunk_size=64, backend=backend)


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("jsd", 0.3), ("tvd", 0.5)], ids=["kl", "jsd", "tvd"])
def test_teacher_masked_vocabulary(backend, divergence, beta):
    """-inf teacher bias on entries 1..8: a block of 4 entirely masked for the teacher."""
    tensors, y = heads(vocab=23, seed=5)
    tensors[5][1:9] = -float("inf")
    compare(tensors, y, F64, [True, True, True, True, True, False], torch.float64, reduction="none",
            divergence=divergence, beta=beta, chunk_size=4, vocab_chunk_size=4, backend=backend)


@pytest.mark.parametrize("backend", PATHS)
def test_bf16_student_with_fp32_teacher(backend):
    tensors, y = heads(lead=(16,), hidden=32, hidden_t=24, vocab=200, seed=6)
    tensors = [t.to(torch.bfloat16 if i < 3 else torch.float32).double() for i, t in enumerate(tensors)]
    dtypes = [torch.bfloat16] * 3 + [torch.float32] * 3
    compare(tensors, y, dtypes, [True, True, True, False, False, False], torch.bfloat16, reduction="token_mean",
            divergence="jsd", beta=0.4, chunk_size=8, vocab_chunk_size=48, backend=backend)


def test_no_target():
    tensors, _ = heads(seed=7)
    compare(tensors, None, F64, [True, True, False, False, False, False], torch.float64, reduction="batchmean",
            alpha=1.0, chunk_size=4, vocab_chunk_size=10)


def test_all_rows_ignored_give_zero_loss_and_gradients():
    tensors, y = heads(lead=(6,), ignored=range(6))
    xs, ws, bs, xt, wt, bt = (t.clone().requires_grad_() for t in tensors)
    for reduction in ("mean", "sum", "batchmean"):
        loss = ops.fused_linear_kd_loss(xs, ws, xt, wt, y, student_bias=bs, alpha=0.5, reduction=reduction,
                                        vocab_chunk_size=5)
        grads = torch.autograd.grad(loss, [xs, ws, bs, xt])
        assert float(loss.detach()) == 0.0 and all(torch.all(g == 0) for g in grads), reduction


@pytest.mark.parametrize("divergence", ["kl", "jsd", "tvd"])
@pytest.mark.parametrize("reduction", ["token_mean", "none"])
def test_compile_fullgraph_with_vocab_blocks(divergence, reduction):
    tensors, y = heads(seed=8)
    f32 = [t.float() for t in tensors]

    def step(a, b, c, xt, wt):
        out = ops.fused_linear_kd_loss(a, b, xt, wt, y, student_bias=c, temperature=2.0, alpha=0.5,
                                       divergence=divergence, beta=0.3, reduction=reduction, chunk_size=4,
                                       vocab_chunk_size=8)
        return out.sum()

    assert_fullgraph_matches_eager(step, lambda: [t.clone().requires_grad_(i < 3) for i, t in enumerate(f32[:5])], 3)


def test_module_takes_vocab_chunk_size():
    tensors, y = heads(seed=9)
    xs, ws, bs, xt, wt, bt = tensors
    crit = ops.FusedLinearKDLoss(temperature=2.0, alpha=0.5, divergence="tvd", vocab_chunk_size=7)
    assert "vocab_chunk_size=7" in repr(crit)
    assert_close(crit(xs, ws, xt, wt, y, bs, bt),
                 reference(tensors, y, "batchmean", "tvd", 0.5, 2.0, 0.5), torch.float64, "module")


def test_auto_vocab_chunk():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    f32 = torch.float32
    assert auto_vocab_chunk(256, 32000, f32, cpu) == 32000  # 31 MiB of logits fit the 32 MiB budget
    assert auto_vocab_chunk(128, 131072, f32, cpu) == 131072  # 64 MiB: up to twice the budget stays whole
    assert auto_vocab_chunk(128, 131073, f32, cpu) == 32768
    assert auto_vocab_chunk(128, 262144, f32, cpu) == 32768  # 3 budgets over 6 block buffers of 128 rows
    assert auto_vocab_chunk(128, 262144, torch.float64, cpu) == 16384
    assert auto_vocab_chunk(128, 262144, f32, cuda) == 262144  # 128 MiB fits CUDA's budget
    assert auto_vocab_chunk(128, 10**7, f32, cuda) == 131072
    assert auto_vocab_chunk(10**6, 10**7, f32, cpu) == 128  # never below 128 entries


def test_automatic_blocks_engage_when_a_minimal_row_chunk_exceeds_the_budget(monkeypatch):
    """With a budget of 4 KiB, 8 rows x 37 fp64 logits (2.3 KiB) stay whole, 8 x 370 (23 KiB) go in blocks;
    either way the result is the reference's."""
    monkeypatch.setitem(flkd.CHUNK_LOGIT_BYTES, "cpu", 4096)
    monkeypatch.setattr(flkd, "MIN_CHUNK_ROWS", 8)
    calls = []
    original = vocab_sweep.sweep_row_chunk
    monkeypatch.setattr(vocab_sweep, "sweep_row_chunk", lambda *a, **k: calls.append(a[7]) or original(*a, **k))
    for vocab, blocked in [(37, False), (370, True)]:
        calls.clear()
        tensors, y = heads(lead=(20,), vocab=vocab, seed=10)
        compare(tensors, y, F64, [True, True, True, False, False, False], torch.float64, reduction="mean",
                divergence="jsd", beta=0.5)
        assert bool(calls) == blocked, (vocab, calls)
        if blocked:
            assert set(calls) == {128}, calls  # 3 x 4096 // (6 x 8 x 8) = 32, raised to the 128 floor


@pytest.mark.parametrize("divergence,gradients,sweeps", [("kl", False, 1), ("kl", True, 2), ("reverse_kl", True, 2),
                                                        ("jsd", False, 2), ("jsd", True, 3), ("tvd", True, 3)])
def test_sweeps_over_the_vocabulary(monkeypatch, divergence, gradients, sweeps):
    """docs/ops-design.md: kl and reverse_kl take 1 sweep for the loss and 1 more for the gradients, jsd and tvd
    2 and 1 (each sweep recomputes both heads' logits of every block)."""
    calls = []
    original = flkd._Head.logits
    monkeypatch.setattr(flkd._Head, "logits", lambda self, *a, **k: calls.append(a[1:3]) or original(self, *a, **k))
    tensors, y = heads(seed=11)
    xs, ws, bs, xt, wt, bt = (t.clone().requires_grad_(gradients) for t in tensors)
    loss = ops.fused_linear_kd_loss(xs, ws, xt, wt, y, alpha=0.5, divergence=divergence, beta=0.4,
                                    reduction="sum", chunk_size=6, vocab_chunk_size=10)
    row_chunks, blocks, heads_ = 2, 4, 2
    assert len(calls) == sweeps * row_chunks * blocks * heads_
    assert set(calls) == {(0, 10), (10, 20), (20, 30), (30, 37)}
    if gradients:
        loss.backward()
        assert len(calls) == sweeps * row_chunks * blocks * heads_  # computed in the forward


def test_bad_vocab_chunk_size_raises():
    args = (torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 4), torch.randn(5, 4))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="vocab_chunk_size must be None"):
            ops.fused_linear_kd_loss(*args, vocab_chunk_size=bad)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:4], ids=DIV_IDS[:4])
def test_ignore_index_that_is_a_token_id(backend, divergence, beta):
    """ignore_index = 3, a token id that block-relative labels also take: rows whose target is 3 are ignored,
    a row whose target is 13 (3 within the block [10, 20)) is not."""
    tensors, y = heads(seed=12, ignored=())
    y[:4] = torch.tensor([3, 13, 3, 23])
    got = [t.clone().requires_grad_() for t in tensors]
    with ops.use_backend(backend):
        loss = ops.fused_linear_kd_loss(got[0], got[1], got[3], got[4], y, student_bias=got[2],
                                        teacher_bias=got[5], temperature=2.0, alpha=0.5, divergence=divergence,
                                        beta=beta, ignore_index=3, reduction="sum", chunk_size=4,
                                        vocab_chunk_size=10)
    ref = [t.clone().requires_grad_() for t in tensors]
    s, t = ref[0] @ ref[1].T + ref[2], ref[3] @ ref[4].T + ref[5]
    want = oracle(s, t, y, divergence=divergence, beta=beta, temperature=2.0, alpha=0.5, ignore_index=3)[0].sum()
    assert_close(loss, want, torch.float64, "loss")
    for i, (a, b) in enumerate(zip(torch.autograd.grad(loss, got), torch.autograd.grad(want, ref))):
        assert_close(a, b, torch.float64, f"grad of tensor {i}")
