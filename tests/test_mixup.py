"""latent_mixup / anchor_mix / pixel_mixup on every (backend, device) here against float64 references,
covering every broadcasting case (mask (B,L)/(1,L); s float, per-sample, single-element tensor)."""

from __future__ import annotations

import itertools

import pytest
import torch

from augkd.ops import _extension, anchor_mix, backends, latent_mixup, pixel_mixup, use_backend

from .matrix import BACKEND_DEVICES, BACKENDS_HERE, as_leaf, assert_close, interpreted, small_enough

LATENTS = [1, 100, 256, 4096]
S_KINDS = ["0", "0.3", "1", "per_sample", "per_sample_flat", "single_tensor"]


def make_s(kind, rows, shape_per_sample, gen):
    if kind in ("0", "0.3", "1"):
        return float(kind)
    if kind == "per_sample":
        return torch.rand(shape_per_sample, generator=gen, dtype=torch.float64)
    if kind == "per_sample_flat":
        return torch.rand(rows, generator=gen, dtype=torch.float64)
    return torch.rand(1, 1, generator=gen, dtype=torch.float64)


def independent_latent(z, m, psi, s):
    """The issue's definition, written as two steps: anchor output, then mixup with z."""
    if isinstance(s, torch.Tensor) and s.dim() == 1:
        s = s.unsqueeze(1)  # per-sample (B,) weights act on rows
    anchored = m * psi + (1 - m) * z
    return (1 - s) * anchored + s * z


def grads_of(out, leaves, seed=7):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    return torch.autograd.grad(out, leaves, g, allow_unused=True)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("width", LATENTS)
@pytest.mark.parametrize("mask_rows", ["B", "1"])
@pytest.mark.parametrize("s_kind", S_KINDS)
def test_latent_mixup(backend, device, width, mask_rows, s_kind):
    rows = 5
    small_enough(backend, rows, width)
    gen = torch.Generator().manual_seed(width + len(s_kind))
    z = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    psi = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    mask = torch.rand(rows if mask_rows == "B" else 1, width, generator=gen, dtype=torch.float64)
    s = make_s(s_kind, rows, (rows, 1), gen)

    def evaluate(fn, dtype, device="cpu"):
        leaves = [as_leaf(x, dtype, device=device) for x in (z, mask, psi)]
        s_ = as_leaf(s, dtype, device=device) if isinstance(s, torch.Tensor) else s
        out = fn(*leaves, s_)
        all_leaves = leaves + ([s_] if isinstance(s, torch.Tensor) else [])
        return out, grads_of(out, all_leaves)

    with use_backend(backend):
        out, grads = evaluate(latent_mixup, torch.float32, device)
    ref, ref_grads = evaluate(independent_latent, torch.float64)
    assert out.dtype == torch.float32
    assert_close(out, ref, torch.float32, "output")
    for name, g, r in zip(("z", "mask", "psi", "s"), grads, ref_grads):
        assert g.shape == r.shape, f"grad {name} shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert_close(g, r, torch.float32, f"grad {name}")


LATENT_INPUTS = ("z", "mask", "psi", "s")
SUBSETS = [w for n in range(1, 5) for w in itertools.combinations(LATENT_INPUTS, n)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("mask_rows", ["B", "1"])
@pytest.mark.parametrize("wanted", SUBSETS, ids=lambda w: "+".join(w))
def test_latent_mixup_only_wanted_gradients(backend, device, mask_rows, wanted):
    """Inputs that need no gradient get none (the backward skips them), the others stay exact."""
    gen = torch.Generator().manual_seed(len(wanted) * 7 + len(mask_rows))
    rows, width = 6, 37  # odd width: vector tails on every backend
    values = {"z": torch.randn(rows, width, generator=gen, dtype=torch.float64),
              "mask": torch.rand(rows if mask_rows == "B" else 1, width, generator=gen, dtype=torch.float64),
              "psi": torch.randn(rows, width, generator=gen, dtype=torch.float64),
              "s": torch.rand(rows, 1, generator=gen, dtype=torch.float64)}

    def evaluate(fn, dtype, device="cpu"):
        leaves = {k: as_leaf(v, dtype, requires_grad=k in wanted, device=device) for k, v in values.items()}
        out = fn(*(leaves[k] for k in LATENT_INPUTS))
        return out, dict(zip(wanted, grads_of(out, [leaves[k] for k in wanted]))), leaves

    with use_backend(backend):
        out, grads, leaves = evaluate(latent_mixup, torch.float32, device)
    ref, ref_grads, _ = evaluate(independent_latent, torch.float64)
    assert_close(out, ref, torch.float32, "output")
    for name in wanted:
        assert_close(grads[name], ref_grads[name], torch.float32, f"grad {name}")
    assert out.requires_grad


PIXEL_INPUTS = ("generated", "real", "s")
PIXEL_SUBSETS = [w for n in range(1, 4) for w in itertools.combinations(PIXEL_INPUTS, n)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("wanted", PIXEL_SUBSETS, ids=lambda w: "+".join(w))
def test_pixel_mixup_only_wanted_gradients(backend, device, wanted):
    gen = torch.Generator().manual_seed(len(wanted))
    shape, mean, std = (3, 2, 5, 7), [0.3, 0.6], [0.5, 2.0]
    values = {"generated": torch.rand(shape, generator=gen, dtype=torch.float64),
              "real": torch.rand(shape, generator=gen, dtype=torch.float64),
              "s": torch.rand(shape[0], 1, 1, 1, generator=gen, dtype=torch.float64)}

    def independent(g_, r_, s_):
        view = (1, -1, 1, 1)
        return ((1 - s_) * g_ + s_ * r_ - torch.tensor(mean, dtype=g_.dtype).view(view)) / torch.tensor(
            std, dtype=g_.dtype).view(view)

    def evaluate(fn, dtype, device="cpu"):
        leaves = {k: as_leaf(v, dtype, requires_grad=k in wanted, device=device) for k, v in values.items()}
        out = fn(*(leaves[k] for k in PIXEL_INPUTS))
        return out, dict(zip(wanted, grads_of(out, [leaves[k] for k in wanted])))

    with use_backend(backend):
        out, grads = evaluate(lambda g_, r_, s_: pixel_mixup(g_, r_, s_, mean=mean, std=std), torch.float32, device)
    ref, ref_grads = evaluate(independent, torch.float64)
    assert_close(out, ref, torch.float32, "output")
    for name in wanted:
        assert_close(grads[name], ref_grads[name], torch.float32, f"grad {name}")


@pytest.mark.skipif(not _extension.LOADED, reason=f"extension augkd._C not loaded: {_extension.WHY_NOT_LOADED}")
@pytest.mark.parametrize("streaming", ["0", "1"])
@pytest.mark.parametrize("width", [100, 256, 37])
@pytest.mark.parametrize("s_kind", ["0.3", "per_sample"])
def test_cpu_streaming_stores_paths(monkeypatch, streaming, width, s_kind):
    """The CPU kernels' streaming-store and flat-sweep paths (normally taken only for tensors larger
    than the last-level cache), forced on and off, against float64."""
    monkeypatch.setenv("AUGKD_CPU_STREAMING_STORES", streaming)
    gen = torch.Generator().manual_seed(width)
    rows = 70  # several flat blocks of 4096 elements at width 256
    z, psi = (torch.randn(rows, width, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(rows, width, generator=gen, dtype=torch.float64)
    s = make_s(s_kind, rows, (rows, 1), gen)
    leaves = [as_leaf(x, torch.float32) for x in (z, mask, psi)]
    ref_leaves = [as_leaf(x, torch.float64) for x in (z, mask, psi)]
    with use_backend("cpu"):
        out = latent_mixup(*leaves, s)
    ref = independent_latent(*ref_leaves, s)
    assert_close(out, ref, torch.float32, "latent output")
    for name, g, r in zip(("z", "mask", "psi"), grads_of(out, leaves), grads_of(ref, ref_leaves)):
        assert_close(g, r, torch.float32, f"latent grad {name}")
    images = [as_leaf(torch.rand(3, 3, 8, width // 4 or 1, generator=gen, dtype=torch.float64), dt)
              for dt in (torch.float32,)]
    with use_backend("cpu"):
        img = pixel_mixup(images[0], images[0].detach() * 0.5, 0.25, mean=[0.1, 0.2, 0.3], std=[0.5, 0.6, 0.7])
    ref_img = (0.875 * images[0].detach().double() - torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64).view(
        1, 3, 1, 1)) / torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64).view(1, 3, 1, 1)
    assert_close(img, ref_img, torch.float32, "pixel output")
    (grad_img,) = grads_of(img, [images[0]])
    go = torch.randn(img.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref_grad = go * 0.75 / torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64).view(1, 3, 1, 1)
    assert_close(grad_img, ref_grad, torch.float32, "pixel grad generated")


KERNEL_BACKENDS_HERE = [b for b in BACKENDS_HERE if b != "torch"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS_HERE)
def test_backward_ops_return_empty_for_unwanted_gradients(backend):
    """The *_bwd schemas' flags: an unwanted gradient is an empty (0,) tensor, a wanted one is the same
    as when every gradient is asked for, up to rounding (each flag set is its own compiled loop, whose
    multiply-adds the compiler may fuse differently)."""
    ns = backends.load(backend)
    gen = torch.Generator().manual_seed(3)
    z, psi, go = (torch.randn(4, 9, generator=gen) for _ in range(3))
    mask, s = torch.rand(1, 9, generator=gen), torch.rand(4, generator=gen)
    full = ns.latent_mixup_bwd(go, z, mask, psi, s, 0.0, True, True, True, True)
    for flags in itertools.product([False, True], repeat=4):
        part = ns.latent_mixup_bwd(go, z, mask, psi, s, 0.0, *flags)
        for name, want, got, every in zip(LATENT_INPUTS, flags, part, full):
            if want:
                torch.testing.assert_close(got, every, msg=f"{backend} {flags} grad {name}")
            else:
                assert got.shape == (0,), f"{backend} {flags}: unwanted grad {name} has shape {tuple(got.shape)}"
    g4, r4, go4 = (torch.rand(2, 3, 4, 5, generator=gen) for _ in range(3))
    s2, mean, std = torch.rand(2, generator=gen), torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.6, 0.7])
    full = ns.pixel_mixup_bwd(go4, g4, r4, s2, 0.0, mean, std, True, True, True)
    for flags in itertools.product([False, True], repeat=3):
        part = ns.pixel_mixup_bwd(go4, g4, r4, s2, 0.0, mean, std, *flags)
        for name, want, got, every in zip(PIXEL_INPUTS, flags, part, full):
            if want:
                torch.testing.assert_close(got, every, msg=f"{backend} {flags} grad {name}")
            else:
                assert got.shape == (0,), f"{backend} {flags}: unwanted grad {name} has shape {tuple(got.shape)}"


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_anchor_mix_is_latent_mixup_at_zero(backend):
    z, psi, m = torch.randn(4, 10), torch.randn(4, 10), torch.rand(4, 10)
    with use_backend(backend):
        torch.testing.assert_close(anchor_mix(z, m, psi), m * psi + (1 - m) * z)


IMAGES = [(3, 3, 32, 32), (4, 1, 16, 16), (2, 3, 7, 5), (1, 2, 1, 1)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape", IMAGES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("s_kind", S_KINDS)
@pytest.mark.parametrize("normalise", [False, True])
def test_pixel_mixup(backend, device, shape, s_kind, normalise):
    rows, channels = shape[:2]
    gen = torch.Generator().manual_seed(sum(shape) + len(s_kind))
    g = torch.rand(shape, generator=gen, dtype=torch.float64)
    r = torch.rand(shape, generator=gen, dtype=torch.float64)
    s = make_s(s_kind, rows, (rows, 1, 1, 1), gen)
    mean = [0.1 * (c + 1) for c in range(channels)] if normalise else None
    std = [0.2 + 0.1 * c for c in range(channels)] if normalise else None

    def independent(g_, r_, s_):
        s_b = s_.reshape(-1, 1, 1, 1) if isinstance(s_, torch.Tensor) else s_
        out = (1 - s_b) * g_ + s_b * r_
        if normalise:
            out = (out - torch.tensor(mean, dtype=out.dtype).view(1, -1, 1, 1)) / torch.tensor(
                std, dtype=out.dtype).view(1, -1, 1, 1)
        return out

    def evaluate(fn, dtype, device="cpu"):
        leaves = [as_leaf(x, dtype, device=device) for x in (g, r)]
        s_ = as_leaf(s, dtype, device=device) if isinstance(s, torch.Tensor) else s
        out = fn(*leaves, s_)
        return out, grads_of(out, leaves + ([s_] if isinstance(s, torch.Tensor) else []))

    with use_backend(backend):
        out, grads = evaluate(lambda a, b, c: pixel_mixup(a, b, c, mean=mean, std=std), torch.float32, device)
    ref, ref_grads = evaluate(independent, torch.float64)
    assert_close(out, ref, torch.float32, "output")
    for name, gr, rr in zip(("generated", "real", "s"), grads, ref_grads):
        assert gr.shape == rr.shape, f"grad {name} shape {tuple(gr.shape)} != {tuple(rr.shape)}"
        assert_close(gr, rr, torch.float32, f"grad {name}")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(backend, device, dtype):
    if interpreted(backend, device) and dtype != torch.float32:
        pytest.skip("the Triton interpreter supports float32 only; the GPU matrix runs half precision")
    z, psi, m = torch.randn(8, 64).to(dtype), torch.randn(8, 64).to(dtype), torch.rand(1, 64).to(dtype)
    s = torch.rand(8, 1).to(dtype)
    with use_backend(backend):
        out = latent_mixup(z.to(device), m.to(device), psi.to(device), s.to(device))
        img = pixel_mixup(z.view(8, 1, 8, 8).to(device), psi.view(8, 1, 8, 8).to(device), 0.3, mean=[0.5],
                          std=[0.25])
    assert out.dtype == dtype and img.dtype == dtype
    ref = independent_latent(z.double(), m.double(), psi.double(), s.double())
    assert_close(out, ref, dtype, "latent")
    ref_img = ((0.7 * z.double() + 0.3 * psi.double()).view(8, 1, 8, 8) - 0.5) / 0.25
    assert_close(img, ref_img, dtype, "pixel")


def test_gradcheck_float64():
    from augkd.ops import _extension
    z, psi = (torch.randn(3, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    m = torch.rand(1, 6, dtype=torch.float64, requires_grad=True)
    s = torch.rand(3, 1, dtype=torch.float64, requires_grad=True)
    g, r = (torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    s4 = torch.rand(2, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    for backend in ("torch",) + (("cpu",) if _extension.LOADED else ()):
        with use_backend(backend):
            assert torch.autograd.gradcheck(latent_mixup, (z, m, psi, s)), backend
            assert torch.autograd.gradcheck(
                lambda a, b, c: pixel_mixup(a, b, c, mean=[0.1, 0.2, 0.3], std=[0.5, 0.6, 0.7]), (g, r, s4)), backend


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_differentiable_normalisation_stats_get_gradients(backend):
    """mean and std that require grad get the gradient of ((1 - s) g + s r - mean) / std (float64 autograd)."""
    gen = torch.Generator().manual_seed(11)
    g64, r64 = (torch.rand(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    mean64 = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    std64 = torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64)
    leaves = [as_leaf(t, torch.float32) for t in (g64, r64, mean64, std64)]
    with use_backend(backend):
        out = pixel_mixup(leaves[0], leaves[1], 0.4, mean=leaves[2], std=leaves[3])
    got = grads_of(out, leaves)
    ref = [as_leaf(t, torch.float64) for t in (g64, r64, mean64, std64)]
    mixed = 0.6 * ref[0] + 0.4 * ref[1]
    expected = grads_of((mixed - ref[2].view(1, -1, 1, 1)) / ref[3].view(1, -1, 1, 1), ref)
    for name, a, b in zip(["generated", "real", "mean", "std"], got, expected):
        assert a is not None and a.shape == b.shape, name
        assert_close(a, b, torch.float32, f"grad {name}")


BAD = [
    ("mask width", lambda: latent_mixup(torch.randn(4, 5), torch.rand(4, 6), torch.randn(4, 5), 0.1),
     ValueError, r"mask must have shape \(4, 5\) or \(1, 5\)"),
    ("mask rows", lambda: latent_mixup(torch.randn(4, 5), torch.rand(2, 5), torch.randn(4, 5), 0.1),
     ValueError, "mask must have shape"),
    ("psi shape", lambda: latent_mixup(torch.randn(4, 5), torch.rand(4, 5), torch.randn(4, 6), 0.1),
     ValueError, "psi must have the same shape as z"),
    ("z rank", lambda: latent_mixup(torch.randn(4, 5, 1), torch.rand(4, 5), torch.randn(4, 5, 1), 0.1),
     ValueError, r"z must have shape \(B, L\)"),
    ("s shape", lambda: latent_mixup(torch.randn(4, 5), torch.rand(4, 5), torch.randn(4, 5), torch.rand(3, 1)),
     ValueError, "s must be a float or a tensor of shape"),
    ("s type", lambda: latent_mixup(torch.randn(4, 5), torch.rand(4, 5), torch.randn(4, 5), "half"),
     TypeError, "s must be a float or a tensor"),
    ("image shapes", lambda: pixel_mixup(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 5), 0.5),
     ValueError, "real must have the same shape as generated"),
    ("mean length", lambda: pixel_mixup(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), 0.5, mean=[0.5, 0.5]),
     ValueError, r"mean must have one value per channel \(3\), got 2"),
    ("std length", lambda: pixel_mixup(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), 0.5, std=[1.0] * 4),
     ValueError, r"std must have one value per channel \(3\), got 4"),
    ("zero std", lambda: pixel_mixup(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4), 0.5, std=[0.0]),
     ValueError, "std must be non-zero"),
    ("image rank", lambda: pixel_mixup(torch.rand(2, 16), torch.rand(2, 16), 0.5),
     ValueError, r"generated must have shape \(B, C, H, W\)"),
]


@pytest.mark.parametrize("name,call,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_empty_batch(backend, device):
    z = torch.randn(0, 4, device=device, requires_grad=True)
    with use_backend(backend):
        out = latent_mixup(z, torch.rand(1, 4, device=device), torch.randn(0, 4, device=device), 0.5)
        img = pixel_mixup(torch.rand(0, 3, 2, 2, device=device), torch.rand(0, 3, 2, 2, device=device), 0.5)
    assert out.shape == (0, 4) and img.shape == (0, 3, 2, 2)
