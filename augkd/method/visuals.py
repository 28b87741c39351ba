"""Image grids for the run directory: generated, anchor-mapped and mixed images (the paper's Fig. 3).

Plots never change a model: each runs its networks in eval mode without gradients (BatchNorm running
statistics stay as they are) and puts every module back into the mode it was in, so a run with plots
trains exactly like one without.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..report import image_grid
from . import checkpoint as ckpt
from .context import Context
from .mixup import mixed_batch

MIX_FACTORS = (0.0, 0.25, 0.5, 0.75, 1.0)


@contextlib.contextmanager
def observing(*modules: nn.Module | None):
    """Run ``modules`` for a look only: eval mode, no autograd; their own modes come back afterwards."""
    mods = [m for m in modules if m is not None]
    modes = [[(sub, sub.training) for sub in m.modules()] for m in mods]
    try:
        for m in mods:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for saved in modes:
            for sub, training in saved:
                sub.training = training


def _denormalize(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    mean = torch.as_tensor(ctx.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.as_tensor(ctx.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return x * std + mean


def _examples(ctx: Context, per_class: int = 1, max_images: int = 10):
    """The first ``per_class`` validation images of each class (up to ``max_images``)."""
    val = ctx.data.student.val
    idx = []
    for c in range(ctx.data.num_classes):
        hits = (val.labels == c).nonzero().flatten()[:per_class].tolist()
        idx.extend(hits)
        if len(idx) >= max_images:
            break
    idx = torch.as_tensor(idx[:max_images], dtype=torch.long, device=val.labels.device)
    return val.images[idx], val.labels[idx]


def plot_generated(ctx: Context, path: str, generator: nn.Module, teacher: nn.Module, latent_size: int, n: int = 30) -> None:
    """G(z) for random z, sorted by the teacher's label (is every class there? are they diverse?)."""
    with observing(generator, teacher):
        g = ckpt.make_generator(ctx.device, 12345)
        z = torch.randn(n, latent_size, generator=g, device=ctx.device)
        x = generator(z)
        pred = teacher(ctx.normalize(x)).argmax(1)
        order = pred.argsort(stable=True)
        x, pred = x[order], pred[order]
        rows = [x[i : i + 10] for i in range(0, n, 10)]
        labels = " ".join(str(int(p)) for p in pred.tolist())
        image_grid(path, rows, [f"G(z) {i + 1}" for i in range(len(rows))], f"generated images; teacher labels: {labels}")


def plot_anchor(ctx: Context, path: str, generator, encoder, anchor, teacher) -> None:
    """Rows: real student images, G(E(x)), G(A(E(x))) with the teacher's predictions."""
    with observing(generator, encoder, anchor, teacher):
        x, y = _examples(ctx)
        g = ckpt.make_generator(ctx.device, 12345)
        z = encoder(x, y, generator=g)
        decoded = generator(z)
        rows, names = [x, decoded], ["real x", "G(E(x))"]
        title = f"labels {y.tolist()}"
        if anchor is not None:
            z_a, _ = anchor(z, y)
            anchored = generator(z_a)
            rows.append(anchored)
            names.append("G(A(E(x)))")
            title += f"; teacher on anchored: {teacher(ctx.normalize(anchored)).argmax(1).tolist()}"
        image_grid(path, rows, names, title)


def plot_mixup(ctx: Context, path: str, generator, encoder, anchor) -> None:
    """Mixed images at several f: from the anchor image (f = 0) to the real image (f = 1)."""
    with observing(generator, encoder, anchor):
        x, y = _examples(ctx)
        rows, names = [], []
        for f in MIX_FACTORS:
            g = ckpt.make_generator(ctx.device, 12345)
            rows.append(_denormalize(ctx, mixed_batch(ctx, x, y, f, encoder, generator, anchor, g)))
            names.append(f"f = {f:g}")
        image_grid(path, rows, names, "mixed samples (f: share of the real image)")
