"""kd_loss on every backend available here against a float64 reference on fresh random inputs.

The oracle is the torch backend run in float64; the torch backend itself is checked independently
(torch.nn.functional formulas, the closed-form gradient of docs/ops-design.md, gradcheck, special cases).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from augkd.ops import KDLoss, kd_loss, use_backend

from .matrix import BACKEND_DEVICES, BACKENDS_HERE, as_leaf, assert_close, interpreted, on, small_enough

BATCHES = (1, 7, 64, 1024)
CLASSES = (1, 2, 31, 1000, 1271, 32000, 131072)
MAX_ELEMENTS = 64 * 131072  # 1024 x 131072 fp64 references need > 4 GB: the multi-block path is the same

CONFIGS = [  # rotated over the shapes so each shape sees several combinations
    dict(temperature=0.5, alpha=1.0, reduction="batchmean", target="none", weight=False, fmt="logits"),
    dict(temperature=1.0, alpha=0.5, reduction="mean", target="some_ignored", weight=True, fmt="logits"),
    dict(temperature=4.0, alpha=0.0, reduction="sum", target="plain", weight=False, fmt="log_probs"),
    dict(temperature=10.0, alpha=0.5, reduction="none", target="plain", weight=True, fmt="probs"),
    dict(temperature=1.0, alpha=1.0, reduction="mean", target="all_ignored", weight=False, fmt="logits"),
    dict(temperature=4.0, alpha=0.5, reduction="batchmean", target="some_ignored", weight=False, fmt="log_probs"),
]


def make_inputs(rows, classes, cfg, *, scale=3.0, gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    s = torch.randn(rows, classes, generator=gen, dtype=torch.float64) * scale
    t = torch.randn(rows, classes, generator=gen, dtype=torch.float64) * scale
    if cfg["fmt"] == "log_probs":
        t = torch.log_softmax(t, -1)
    elif cfg["fmt"] == "probs":
        t = torch.softmax(t, -1)
    target = None
    if cfg["target"] != "none":
        target = torch.randint(0, classes, (rows,), generator=gen)
        if cfg["target"] == "some_ignored":
            target[torch.rand(rows, generator=gen) < 0.3] = -100
        elif cfg["target"] == "all_ignored":
            target[:] = -100
    weight = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5 if cfg["weight"] else None
    return s, t, target, weight


def run(backend, s, t, target, weight, cfg, dtype, grad_seed=1, device="cpu"):
    """Loss and gradients (student, teacher, weight) with a random grad_output (never just 1)."""
    s_ = as_leaf(s, dtype, device=device)
    t_ = as_leaf(t, dtype, device=device)
    w_ = None if weight is None else as_leaf(weight, dtype, device=device)
    with use_backend(backend):
        loss = kd_loss(s_, t_, on(device, target), temperature=cfg["temperature"], alpha=cfg["alpha"], sample_weight=w_,
                       reduction=cfg["reduction"], teacher_format=cfg["fmt"])
    gen = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(device, loss.dtype)
    leaves = [x for x in (s_, t_, w_) if x is not None]
    grads = torch.autograd.grad(loss, leaves, grad_out, allow_unused=True)
    # an input the loss does not depend on (the teacher when alpha = 0) has a zero gradient
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    return loss, grads


def check_against_reference(backend, rows, classes, cfg, dtype=torch.float32, device="cpu", **kw):
    s, t, target, weight = make_inputs(rows, classes, cfg, **kw)
    loss, grads = run(backend, s, t, target, weight, cfg, dtype, device=device)
    ref_loss, ref_grads = run("torch", s, t, target, weight, cfg, torch.float64)
    expected_loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_loss_dtype, f"loss dtype {loss.dtype}, expected {expected_loss_dtype}"
    assert_close(loss, ref_loss, dtype, "loss")
    for name, g, r in zip(("grad student", "grad teacher", "grad weight"), grads, ref_grads):
        assert g.dtype == dtype, f"{name} dtype {g.dtype}, expected the input dtype {dtype}"
        assert_close(g, r, dtype, name)


SHAPES = [(b, c) for b in BATCHES for c in CLASSES]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("rows,classes", SHAPES, ids=[f"B{b}-C{c}" for b, c in SHAPES])
@pytest.mark.parametrize("variant", [0, 1])
def test_matrix(backend, device, rows, classes, variant):
    if rows * classes > MAX_ELEMENTS:
        pytest.skip(f"B*C={rows * classes} > {MAX_ELEMENTS}: the float64 reference would need > 4 GB on CI; "
                    "64 x 131072 covers the same multi-block path")
    small_enough(backend, rows, classes)
    index = (SHAPES.index((rows, classes)) * 2 + variant) % len(CONFIGS)
    check_against_reference(backend, rows, classes, CONFIGS[index], gen_seed=index, device=device)


GRID = list(itertools.product((0.5, 1.0, 4.0, 10.0), (0.0, 0.5, 1.0), ("none", "sum", "mean", "batchmean")))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("temperature,alpha,reduction", GRID)
def test_hyperparameter_grid(backend, device, temperature, alpha, reduction):
    """Every T x alpha x reduction at a small odd shape; target/weight/format rotate with the case."""
    k = GRID.index((temperature, alpha, reduction))
    cfg = dict(temperature=temperature, alpha=alpha, reduction=reduction,
               target=("plain", "some_ignored", "none" if alpha == 1.0 else "plain")[k % 3],
               weight=bool(k % 2), fmt=("logits", "log_probs", "probs")[k % 3])
    check_against_reference(backend, 7, 31, cfg, gen_seed=k, device=device)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,classes,fmt", [(64, 1000, "logits"), (8, 32000, "probs"), (2, 262144, "logits")])
def test_dtypes(backend, device, dtype, rows, classes, fmt):
    if interpreted(backend, device) and dtype != torch.float32:
        pytest.skip("the Triton interpreter supports float32 only (bf16 loads are wrong in numpy); the GPU "
                    "matrix runs it")
    small_enough(backend, rows, classes)
    cfg = dict(temperature=2.0, alpha=0.5, reduction="mean", target="some_ignored", weight=True, fmt=fmt)
    # the reference sees the inputs rounded to `dtype`, as the kernels do (fp16 probabilities of 32000
    # classes are mostly subnormal)
    s, t, target, weight = make_inputs(rows, classes, cfg, scale=2.0)
    s, t, weight = (x.to(dtype).double() for x in (s, t, weight))
    loss, grads = run(backend, s, t, target, weight, cfg, dtype, device=device)
    ref_loss, ref_grads = run("torch", s, t, target, weight, cfg, torch.float64)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(loss, ref_loss, dtype, "loss")
    for name, g, r in zip(("grad student", "grad teacher", "grad weight"), grads, ref_grads):
        assert g.dtype == dtype, f"{name} dtype {g.dtype}, expected the input dtype {dtype}"
        assert_close(g, r, dtype, name)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_masked_classes_equal_dropping_them(backend, device):
    """-inf in both student and teacher marks a class as absent: same loss and grads as without it."""
    cfg = dict(temperature=2.0, alpha=0.5, reduction="sum", target="plain", weight=False, fmt="logits")
    s, t, _, _ = make_inputs(5, 40, cfg)
    keep = torch.ones(40, dtype=torch.bool)
    keep[[3, 17, 39]] = False
    target = torch.tensor([0, 5, 10, 20, 30])  # never a masked class
    s_masked, t_masked = s.clone(), t.clone()
    s_masked[:, ~keep] = -math.inf
    t_masked[:, ~keep] = -math.inf
    loss, (gs, gt) = run(backend, s_masked, t_masked, target, None, cfg, torch.float32, device=device)
    dense_target = torch.cumsum(keep.long(), 0)[target] - 1
    ref, (rs, rt) = run("torch", s[:, keep], t[:, keep], dense_target, None, cfg, torch.float64)
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(gs[:, keep], rs, torch.float32, "grad student")
    assert_close(gt[:, keep], rt, torch.float32, "grad teacher")
    assert torch.all(gs[:, ~keep] == 0) and torch.all(gt[:, ~keep] == 0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_nan_row_stays_nan(backend, device):
    cfg = dict(temperature=2.0, alpha=0.5, reduction="none", target="plain", weight=False, fmt="logits")
    s, t, target, _ = make_inputs(4, 33, cfg)
    s[1, 7] = math.nan
    t[2, 3] = math.nan
    loss, _ = run(backend, s, t, target, None, cfg, torch.float32, device=device)
    assert torch.isnan(loss[1]) and torch.isnan(loss[2]), f"NaN rows became {loss[1]}, {loss[2]}"
    assert torch.isfinite(loss[0]) and torch.isfinite(loss[3])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_huge_logits_stay_finite_and_accurate(backend, device):
    cfg = dict(temperature=1.0, alpha=0.5, reduction="none", target="plain", weight=False, fmt="logits")
    s, t, target, _ = make_inputs(6, 100, cfg, scale=1.0)
    s = s + 1e4 * torch.sign(torch.randn(6, 1, dtype=torch.float64))
    t = t - 1e4
    check = lambda: run(backend, s, t, target, None, cfg, torch.float32, device=device)
    loss, grads = check()
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    ref, _ = run("torch", s, t, target, None, cfg, torch.float64)
    # fp32 cannot represent the +-1e4 offsets to better than ~1e-3; the loss must still be that close
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-3, atol=5e-3)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_all_rows_ignored_gives_zero_not_nan(backend, device):
    for reduction in ("mean", "sum", "batchmean", "none"):
        cfg = dict(temperature=3.0, alpha=0.5, reduction=reduction, target="all_ignored", weight=True, fmt="logits")
        s, t, target, weight = make_inputs(5, 12, cfg)
        loss, grads = run(backend, s, t, target, weight, cfg, torch.float32, device=device)
        assert torch.all(loss == 0), f"{reduction}: {loss}"
        assert all(torch.all(g == 0) for g in grads), f"{reduction}: non-zero gradient"


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_non_contiguous_and_nd_inputs(backend):
    cfg = dict(temperature=2.0, alpha=0.5, reduction="none", target="plain", weight=False, fmt="logits")
    base_s = torch.randn(40, 6, 2, dtype=torch.float64)[:, :, 0].t()  # (6, 40), strided
    base_t = torch.randn(6, 80, dtype=torch.float64)[:, ::2]
    target = torch.randint(0, 40, (6,))
    assert not base_s.is_contiguous() and not base_t.is_contiguous()
    loss, grads = run(backend, base_s, base_t, target, None, cfg, torch.float32)
    ref, ref_grads = run("torch", base_s.contiguous(), base_t.contiguous(), target, None, cfg, torch.float64)
    assert_close(loss, ref, torch.float32, "loss")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32, "grad")
    # (B, T, C) rows: reduction "none" keeps the leading shape
    s3, t3 = torch.randn(2, 3, 9), torch.randn(2, 3, 9)
    y3 = torch.randint(0, 9, (2, 3))
    with use_backend(backend):
        out = kd_loss(s3, t3, y3, alpha=0.5, reduction="none")
    with use_backend("torch"):
        flat = kd_loss(s3.reshape(6, 9), t3.reshape(6, 9), y3.reshape(6), alpha=0.5, reduction="none")
    assert out.shape == (2, 3)
    assert_close(out.reshape(6), flat, torch.float32, "3-d rows")


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_teacher_energy_from_the_same_pass(backend):
    s, t = torch.randn(8, 50, dtype=torch.float64), torch.randn(8, 50, dtype=torch.float64)
    s_, t_ = as_leaf(s, torch.float32), as_leaf(t, torch.float32)
    with use_backend(backend):
        loss, energy = kd_loss(s_, t_, temperature=4.0, return_teacher_energy=True)
    expected = -4.0 * torch.logsumexp(t / 4.0, -1)
    assert_close(energy, expected, torch.float32, "energy")
    # its gradient into the teacher is -softmax(t / T) per unit of energy
    (gt,) = torch.autograd.grad(energy.sum(), [t_])
    assert_close(gt, -torch.softmax(t / 4.0, -1), torch.float32, "d energy / d teacher")


# ---------------------------------------------------------------- the torch backend, checked independently

def test_reference_matches_functional_formulas():
    """The float64 oracle against torch.nn.functional's KL and CE (finite inputs), values and gradients."""
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(9, 17, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(9, 17, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 17, (9,), generator=gen)
    y[2] = -100
    w = torch.rand(9, generator=gen, dtype=torch.float64, requires_grad=True)
    T, alpha = 3.0, 0.3
    with use_backend("torch"):
        ours = kd_loss(s, t, y, temperature=T, alpha=alpha, weight=w, reduction="mean")
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="none", log_target=True).sum(-1)
    ce = F.cross_entropy(s, y, reduction="none", ignore_index=-100)
    valid = (y != -100).double()
    theirs = (w * valid * (alpha * T * T * kl + (1 - alpha) * ce)).sum() / valid.sum()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(ours, [s, t, w])
    g_theirs = torch.autograd.grad(theirs, [s, t, w])
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_closed_form_gradients_of_the_design_doc():
    """d/ds and d/dt from docs/ops-design.md (what the kernels compute) equal autograd of the reference."""
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(6, 23, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 23, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 23, (6,), generator=gen)
    T, alpha = 2.5, 0.4
    with use_backend("torch"):
        loss = kd_loss(s, t, y, temperature=T, alpha=alpha, reduction="sum")
    gs, gt = torch.autograd.grad(loss, [s, t])
    c = T * T
    ps, pt, p1 = torch.softmax(s / T, -1), torch.softmax(t / T, -1), torch.softmax(s, -1)
    log_ps, log_pt = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
    kl = (pt * (log_pt - log_ps)).sum(-1, keepdim=True)
    onehot = F.one_hot(y, 23).double()
    torch.testing.assert_close(gs, alpha * c / T * (ps - pt) + (1 - alpha) * (p1 - onehot))
    torch.testing.assert_close(gt, alpha * c / T * pt * (log_pt - log_ps - kl))


@pytest.mark.parametrize("fmt", ["logits", "log_probs", "probs"])
def test_gradcheck_float64(fmt):
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    raw = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    t = {"logits": raw, "log_probs": torch.log_softmax(raw, -1), "probs": torch.softmax(raw, -1)}[fmt]
    t = t.detach().requires_grad_(True)
    w = torch.rand(4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 6, 0])
    for backend in ("torch",) + (("cpu",) if _cpu_ready() else ()):
        with use_backend(backend):
            fn = lambda a, b, c: kd_loss(a, b, y, temperature=2.0, alpha=0.5, weight=c, reduction="mean",
                                         teacher_format=fmt)
            assert torch.autograd.gradcheck(fn, (s, t, w)), backend


def _cpu_ready():
    from augkd.ops import _extension
    return _extension.LOADED


def test_official_distill_loss_is_a_special_case():
    """The released DistillLoss(t=10) with u = 0.5: u*CE + (1-u)*KL(softmax(T/t).clip(1e-8) || ...)*t^2,
    averaged over rows (the released utils/criteria.py)."""
    gen = torch.Generator().manual_seed(6)
    s, t = torch.randn(16, 31, generator=gen) * 3, torch.randn(16, 31, generator=gen) * 3
    y = torch.randint(0, 31, (16,), generator=gen)
    tt, u = 10.0, 0.5
    official_kl = F.kl_div(F.log_softmax(s / tt, -1), F.softmax(t / tt, -1).clip(min=1e-8), reduction="sum") * tt * tt
    official = (u * F.cross_entropy(s, y, reduction="sum") + (1 - u) * official_kl) / 16
    ours = kd_loss(s, t, y, temperature=10, alpha=0.5, reduction="mean")
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-5)
    assert torch.allclose(KDLoss(temperature=10, alpha=0.5, reduction="mean")(s, t, y), ours)


def test_t2_scale_off_divides_by_t_squared():
    s, t = torch.randn(5, 9), torch.randn(5, 9)
    on = kd_loss(s, t, temperature=4.0)
    off = kd_loss(s, t, temperature=4.0, t2_scale=False)
    torch.testing.assert_close(on, off * 16)


# ---------------------------------------------------------------- bad input

BAD_CASES = [
    ("shape", lambda s, t, y: kd_loss(s, t[:, :-1]), ValueError, "teacher_logits must have the same shape"),
    ("int logits", lambda s, t, y: kd_loss(s.long(), t.long()), TypeError, "student_logits must be a floating"),
    ("float target", lambda s, t, y: kd_loss(s, t, y.float(), alpha=0.5), TypeError, "target must be an integer"),
    ("target shape", lambda s, t, y: kd_loss(s, t, y[:2], alpha=0.5), ValueError, "target must have shape"),
    ("target range", lambda s, t, y: kd_loss(s, t, y + 10, alpha=0.5), ValueError, "outside [0, 10)"),
    ("negative target", lambda s, t, y: kd_loss(s, t, y - 5, alpha=0.5), ValueError, "outside [0, 10)"),
    ("weight shape", lambda s, t, y: kd_loss(s, t, weight=torch.ones(3, 1)), ValueError, "weight must have shape"),
    ("temperature 0", lambda s, t, y: kd_loss(s, t, temperature=0), ValueError, "temperature must be a finite number > 0"),
    ("temperature -1", lambda s, t, y: kd_loss(s, t, temperature=-1.0), ValueError, "temperature"),
    ("reduction", lambda s, t, y: kd_loss(s, t, reduction="avg"), ValueError, "reduction must be one of"),
    ("format", lambda s, t, y: kd_loss(s, t, teacher_format="softmax"), ValueError, "teacher_format must be one of"),
    ("alpha without target", lambda s, t, y: kd_loss(s, t, alpha=0.5), ValueError, "needs a target"),
    ("alpha range", lambda s, t, y: kd_loss(s, t, y, alpha=1.5), ValueError, "alpha must be in [0, 1]"),
    ("not a tensor", lambda s, t, y: kd_loss(s.tolist(), t), TypeError, "student_logits must be a torch.Tensor"),
    ("no classes", lambda s, t, y: kd_loss(s[:, :0], t[:, :0]), ValueError, "C >= 1"),
]


# labels are read on the host for CPU tensors only (on CUDA it would be a sync): on a GPU an out-of-range
# label is a NaN row instead (test_out_of_range_target_is_a_nan_row_inside_the_kernel)
HOST_CHECKED = {"target range", "negative target"}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("name,call,error,message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_names_the_argument(backend, device, name, call, error, message):
    if device != "cpu" and name in HOST_CHECKED:
        pytest.skip("labels are checked on the host for CPU tensors only")
    s, t = torch.randn(4, 10, device=device), torch.randn(4, 10, device=device)
    y = torch.randint(0, 10, (4,), device=device)
    with use_backend(backend), pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(")
                                             .replace(")", r"\)")):
        call(s, t, y)


# ---------------------------------------------------------------- semantics every backend must share

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_zero_weight_term_is_left_out(backend, device):
    """alpha = 0 drops the KL term: an infinite KL (student -inf where the teacher is not) stays out,
    instead of 0 * inf = NaN; alpha = 1 likewise drops an infinite CE (target class at -inf)."""
    s = torch.randn(3, 8, dtype=torch.float64)
    t = torch.randn(3, 8, dtype=torch.float64)
    s[0, 2] = -math.inf
    y = torch.tensor([1, 4, 7])
    cfg = dict(temperature=2.0, alpha=0.0, reduction="none", target="plain", weight=False, fmt="logits")
    loss, grads = run(backend, s, t, y, None, cfg, torch.float32, device=device)
    assert torch.isfinite(loss).all() and torch.isfinite(grads[0]).all(), (loss, grads[0])
    ce = torch.logsumexp(s, -1) - s.gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(loss.double().cpu(), ce, rtol=1e-5, atol=1e-6)
    s2 = torch.randn(3, 8, dtype=torch.float64)
    t2 = t.clone()
    s2[1, 4] = t2[1, 4] = -math.inf  # class 4 absent from both: KL finite, CE of row 1 (target 4) infinite
    cfg1 = dict(cfg, alpha=1.0)
    loss1, grads1 = run(backend, s2, t2, y, None, cfg1, torch.float32, device=device)
    assert torch.isfinite(loss1).all() and torch.isfinite(grads1[0]).all(), (loss1, grads1[0])


@pytest.mark.parametrize("backend", [b for b in BACKENDS_HERE if getattr(b, "values", [b])[0] != "torch"])
def test_out_of_range_target_is_a_nan_row_inside_the_kernel(backend):
    """The front-end rejects such labels on CPU in eager mode; the kernels (used on GPUs and under
    torch.compile, where no check runs) must give a NaN loss row and a NaN gradient row, never garbage."""
    from augkd.ops import backends
    ns = backends.load(backend)
    s, t = torch.randn(3, 10), torch.randn(3, 10)
    y = torch.tensor([2, 10, -100])  # row 1 out of range, row 2 ignored
    if backend == "cpu":  # the C++ CPU kernel can report it without a device sync, so it raises instead
        with pytest.raises(ValueError, match=r"target holds class index 10, outside \[0, 10\)"):
            ns.kd_loss_fwd(s, t, y, 2.0, 0.5, -100, True, 0)
        return
    loss, stats = ns.kd_loss_fwd(s, t, y, 2.0, 0.5, -100, True, 0)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0]) and loss[2] == 0
    gs, gt = ns.kd_loss_bwd(torch.ones(3), torch.zeros(3), s, t, y, stats, 2.0, 0.5, -100, True, 0, True, True)
    assert torch.isnan(gs[1]).all() and torch.isfinite(gs[0]).all() and torch.all(gs[2] == 0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("which", ["student_only", "teacher_only"])
def test_one_sided_gradients(backend, device, which):
    """The usual KD step detaches the teacher (student grad only); AuG-KD's generator loss needs both;
    a frozen student with a trained teacher is the mirror case. Each path must match on its own."""
    cfg = dict(temperature=4.0, alpha=0.5, reduction="mean", target="some_ignored", weight=False, fmt="logits")
    s, t, target, _ = make_inputs(33, 257, cfg)
    needs = {"student_only": (True, False), "teacher_only": (False, True)}[which]
    results = {}
    for name, dtype, dev in ((backend, torch.float32, device), ("torch", torch.float64, "cpu")):
        s_ = as_leaf(s, dtype, needs[0], device=dev)
        t_ = as_leaf(t, dtype, needs[1], device=dev)
        with use_backend(name):
            loss = kd_loss(s_, t_, on(dev, target), temperature=4.0, alpha=0.5, reduction="mean")
        (grad,) = torch.autograd.grad(loss * 1.7, [s_ if needs[0] else t_])
        results[name] = (loss, grad)
    assert_close(results[backend][0], results["torch"][0], torch.float32, "loss")
    assert_close(results[backend][1], results["torch"][1], torch.float32, which)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_empty_batch(backend, device):
    s = torch.randn(0, 7, device=device, requires_grad=True)
    t = torch.randn(0, 7, device=device)
    with use_backend(backend):
        for reduction in ("sum", "mean", "batchmean"):
            loss = kd_loss(s, t, torch.zeros(0, dtype=torch.long, device=device), alpha=0.5, reduction=reduction)
            assert loss.item() == 0.0
        loss.backward()
        assert kd_loss(s, t, reduction="none").shape == (0,)
    assert s.grad.shape == (0, 7)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_llm_vocabulary_262144_classes(backend, device):
    """The issue's upper bound: one sweep per row over 262144 classes (many blocks), ignored row included."""
    small_enough(backend, 3, 262144)
    cfg = dict(temperature=4.0, alpha=0.5, reduction="none", target="plain", weight=False, fmt="logits")
    s, t, _, _ = make_inputs(3, 262144, cfg, gen_seed=11)
    y = torch.tensor([5, 262143, -100])
    loss, grads = run(backend, s, t, y, None, cfg, torch.float32, device=device)
    ref, ref_grads = run("torch", s, t, y, None, cfg, torch.float64)
    assert_close(loss, ref, torch.float32, "loss")
    for name, g, r in zip(("grad student", "grad teacher"), grads, ref_grads):
        assert_close(g, r, torch.float32, name)
