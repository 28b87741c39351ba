"""topk_kd_loss on every (backend, device) here against float64: the torch formula (itself checked against dense
formulas written independently below), values and student gradients, every tail x divergence x values format,
-inf-masked student classes, ignored rows, (B, T, V) inputs, reductions, and the argument checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from augkd.ops import TopKKDLoss, topk_kd_loss, use_backend

from .matrix import BACKEND_DEVICES, BACKENDS_HERE, as_leaf, assert_close, interpreted, on, small_enough


@pytest.fixture(autouse=True)
def _small(one_thread):
    yield


def make(lead, vocab, k, *, seed=0, scale=2.0, ignored=0.3, values="log_probs"):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, vocab, generator=gen, dtype=torch.float64) * scale
    t = torch.randn(*lead, vocab, generator=gen, dtype=torch.float64) * scale
    top = t.log_softmax(-1).topk(k, -1)
    idx = top.indices
    # shuffle the k entries: kernels must not rely on sorted values
    perm = torch.argsort(torch.rand(idx.shape, generator=gen), -1)
    idx = idx.gather(-1, perm)
    val = (t.log_softmax(-1) if values == "log_probs" else t).gather(-1, idx)
    y = torch.randint(0, vocab, lead, generator=gen)
    y[torch.rand(lead, generator=gen) < ignored] = -100
    return s, idx, val, y


def run(backend, s, idx, val, y, dtype, cfg, grad_seed=1, device="cpu"):
    s_ = as_leaf(s, dtype, device=device)
    with use_backend(backend):
        loss = topk_kd_loss(s_, on(device, idx), on(device, val), on(device, y), **cfg)
    gen = torch.Generator().manual_seed(grad_seed)
    grad_out = (torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5).to(device, loss.dtype)
    (g,) = torch.autograd.grad(loss, [s_], grad_out)
    return loss, g


def check(backend, lead, vocab, k, cfg, dtype=torch.float32, device="cpu", **kw):
    s, idx, val, y = make(lead, vocab, k, values=cfg.get("values", "log_probs"), **kw)
    loss, g = run(backend, s, idx, val, y, dtype, cfg, device=device)
    ref, rg = run("torch", s, idx, val, y, torch.float64, cfg)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert g.dtype == dtype and g.shape == s.shape
    assert_close(loss, ref, dtype, "loss")
    assert_close(g, rg, dtype, "grad student")


GRID = [dict(tail=tl, divergence=dv, values=vf, temperature=t, alpha=a, reduction=r)
        for (tl, dv, vf), t, a, r in itertools.product(
            [("renormalize", "kl", "log_probs"), ("renormalize", "kl", "logits"),
             ("renormalize", "reverse_kl", "logits"), ("bucket", "kl", "log_probs"),
             ("bucket", "reverse_kl", "log_probs")],
            (1.0, 3.0), (1.0, 0.5, 0.0), ("none", "token_mean"))]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("cfg", GRID, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_grid_matches_float64(backend, device, cfg):
    check(backend, (9,), 41, 6, cfg, seed=GRID.index(cfg), device=device)


SHAPES = [((1,), 1, 1), ((3,), 2, 2), ((5,), 3000, 64), ((2,), 9000, 17), ((4, 3), 257, 16)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("lead,vocab,k", SHAPES, ids=[f"{l}-V{v}-k{k}" for l, v, k in SHAPES])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_shapes(backend, device, lead, vocab, k, tail):
    small_enough(backend, math.prod(lead), vocab)
    cfg = dict(tail=tail, divergence="kl" if vocab % 2 else "reverse_kl", temperature=2.0, alpha=0.5,
               reduction="batchmean")
    if k == vocab and tail == "bucket":
        pytest.skip("k == V: the student's outside mass is exactly 0 (log 0); covered by renormalize")
    check(backend, lead, vocab, k, cfg, seed=vocab, device=device)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(backend, device, dtype):
    if interpreted(backend, device) and dtype != torch.float32:
        pytest.skip("the Triton interpreter supports float32 only (bf16 loads are wrong in numpy); the GPU "
                    "matrix runs it")
    cfg = dict(tail="bucket", divergence="kl", temperature=2.0, alpha=0.5, reduction="mean")
    check(backend, (16,), 500, 32, cfg, dtype=dtype, scale=1.0, device=device)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_masked_student_classes(backend, device, divergence):
    """-inf student logits off the k indices (a masked vocabulary) behave as absent classes."""
    s, idx, val, y = make((6,), 30, 5)
    masked = torch.ones(30, dtype=torch.bool)
    masked[idx.reshape(-1)] = False
    masked[y[y >= 0]] = False
    off = masked.nonzero().reshape(-1)[:4]
    s[:, off] = -math.inf
    cfg = dict(tail="bucket", divergence=divergence, temperature=2.0, alpha=0.5, reduction="sum")
    loss, g = run(backend, s, idx, val, y, torch.float32, cfg, device=device)
    ref, rg = run("torch", s, idx, val, y, torch.float64, cfg)
    assert torch.isfinite(loss) and torch.all(g[:, off.to(g.device)] == 0)
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(g, rg, torch.float32, "grad student")


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_teacher_mass_on_a_masked_student_class_is_infinite(backend):
    s, idx, val, y = make((3,), 20, 4)
    s[1, idx[1, 0]] = -math.inf
    with use_backend(backend):
        rows = topk_kd_loss(s.float(), idx, val.float(), reduction="none")
    assert torch.isinf(rows[1]) and rows[1] > 0 and torch.isfinite(rows[[0, 2]]).all()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_all_rows_ignored(backend, device):
    s, idx, val, y = make((5,), 20, 4, ignored=1.1)
    loss, g = run(backend, s, idx, val, y, torch.float32, dict(alpha=0.5, reduction="mean"), device=device)
    assert float(loss.detach()) == 0.0 and torch.all(g == 0)


# ---------------------------------------------------------------- the oracle against dense formulas

def _dense_teacher(idx, val, vocab, temperature):
    """Renormalised top-k teacher as a dense distribution (0 off the k)."""
    dense = torch.full(idx.shape[:-1] + (vocab,), -math.inf, dtype=torch.float64).scatter(-1, idx, val / temperature)
    return dense.softmax(-1)


def test_oracle_renormalize_kl_is_the_dense_kl():
    s, idx, val, _ = make((7,), 25, 5, values="logits")
    p = _dense_teacher(idx, val, 25, 2.0)
    log_q = F.log_softmax(s / 2.0, -1)
    dense = (p * (torch.where(p > 0, p.log(), 0) - log_q)).sum(-1) * 4.0
    got = topk_kd_loss(s, idx, val, values="logits", temperature=2.0, reduction="none")
    torch.testing.assert_close(got, dense)


def test_oracle_bucket_at_t1_is_the_kl_of_the_coarsened_distributions():
    s, idx, val, _ = make((7,), 25, 5)
    q = s.softmax(-1)
    p_k, q_k = val.exp(), q.gather(-1, idx)
    p = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    qq = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(topk_kd_loss(s, idx, val, tail="bucket", reduction="none"),
                               (p * (p / qq).log()).sum(-1))
    torch.testing.assert_close(topk_kd_loss(s, idx, val, tail="bucket", divergence="reverse_kl", reduction="none"),
                               (qq * (qq / p).log()).sum(-1))


def test_oracle_reverse_kl_renormalize_restricts_the_student():
    s, idx, val, _ = make((7,), 25, 5)
    q = s.gather(-1, idx).softmax(-1)
    p = val.softmax(-1)
    torch.testing.assert_close(topk_kd_loss(s, idx, val, divergence="reverse_kl", t2_scale=False, reduction="none"),
                               (q * (q / p).log()).sum(-1))


def test_oracle_ce_term_and_full_k_equals_kd_loss():
    """k = V with renormalize is the dense KD loss of kd_loss (any class order)."""
    from augkd.ops import kd_loss

    s, idx, val, y = make((6,), 12, 12, values="logits")
    with use_backend("torch"):
        want = kd_loss(s, torch.empty_like(s).scatter_(-1, idx, val), y, temperature=3.0, alpha=0.3, reduction="sum")
    got = topk_kd_loss(s, idx, val, y, values="logits", temperature=3.0, alpha=0.3, reduction="sum")
    torch.testing.assert_close(got, want)


def test_reductions_and_batch_dimension():
    s, idx, val, y = make((4, 3), 20, 4, ignored=0.0)
    total = topk_kd_loss(s, idx, val, reduction="sum")
    torch.testing.assert_close(topk_kd_loss(s, idx, val, reduction="batchmean"), total / 4)
    torch.testing.assert_close(topk_kd_loss(s, idx, val, y, reduction="token_mean"), total / 12)
    torch.testing.assert_close(topk_kd_loss(s, idx, val, y, reduction="mean"), total / 12)
    assert topk_kd_loss(s, idx, val, reduction="none").shape == (4, 3)


def test_teacher_values_requiring_grad_get_a_gradient():
    s, idx, val, y = make((5,), 20, 4)
    v = val.clone().requires_grad_()
    loss = topk_kd_loss(s.float(), idx, v.float(), temperature=2.0)
    (gv,) = torch.autograd.grad(loss, [v])
    assert gv.shape == v.shape and torch.isfinite(gv).all() and gv.abs().sum() > 0


def test_module_form():
    s, idx, val, y = make((5,), 20, 4)
    crit = TopKKDLoss(tail="bucket", temperature=2.0, alpha=0.5)
    assert "bucket" in repr(crit)
    torch.testing.assert_close(crit(s, idx, val, y), topk_kd_loss(s, idx, val, y, tail="bucket", temperature=2.0,
                                                                  alpha=0.5))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("change,match", [
    (dict(idx=lambda i: i.clone().index_fill_(-1, torch.tensor([0]), 20)), r"outside \[0, 20\)"),
    (dict(idx=lambda i: i.clone().index_fill_(-1, torch.tensor([1]), -1)), r"outside \[0, 20\)"),
    (dict(idx=lambda i: torch.cat([i[:, :1], i[:, :1], i[:, 2:]], -1)), "must be distinct"),
    (dict(idx=lambda i: i.float()), "integer tensor"),
    (dict(idx=lambda i: i[:, :0]), "1 <= k <= 20"),
    (dict(idx=lambda i: i[:4]), "teacher_indices must have shape"),
    (dict(val=lambda v: v[:, :3]), "teacher_values must have the shape"),
    (dict(val=lambda v: v.long()), "floating"),
    (dict(kw=dict(tail="bucket", values="logits")), "needs values='log_probs'"),
    (dict(kw=dict(tail="spread")), "tail"),
    (dict(kw=dict(divergence="jsd")), "divergence"),
    (dict(kw=dict(values="probs")), "values"),
    (dict(kw=dict(reduction="avg")), "reduction"),
    (dict(y=lambda y: y.clone().fill_(25)), r"target holds class index 25"),
])
def test_bad_arguments_raise_clear_errors(backend, change, match):
    s, idx, val, y = make((5,), 20, 4)
    idx = change.get("idx", lambda i: i)(idx)
    val = change.get("val", lambda v: v)(val)
    y = change.get("y", lambda t: t)(y)
    with use_backend(backend), pytest.raises((ValueError, TypeError), match=match):
        topk_kd_loss(s.float(), idx, val if not val.dtype.is_floating_point else val.float(), y, alpha=0.5,
                     **change.get("kw", {}))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_compile_fullgraph_matches_eager(backend):
    s, idx, val, y = make((6,), 40, 5)

    def step(x):
        return topk_kd_loss(x * 2, idx, val.float(), y, tail="bucket", temperature=2.0, alpha=0.5)

    torch._dynamo.reset()
    with use_backend(backend):
        a = s.float().requires_grad_()
        eager = step(a)
        (ga,) = torch.autograd.grad(eager, [a])
        b = s.float().requires_grad_()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(b)
        (gb,) = torch.autograd.grad(compiled, [b])
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(gb, ga)
