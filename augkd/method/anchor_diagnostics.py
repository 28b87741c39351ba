"""Module 2 measured directly: does the anchor keep the class, or does it collapse?

On the student validation split, the frozen teacher classifies two images per sample: the decoded
image G(E(x, y)) and the anchor image G(A(E(x, y), y)). Per class (by the true label) this gives the
teacher's accuracy and confidence (mean top softmax probability) on each, the share of the teacher's
predictions that fall in each class, and the anchor's mask mass. Module 2 works when the teacher is
far more accurate on anchor images than on decoded ones, without piling its predictions onto one class.

Collapse: the largest class share of the teacher's predictions on anchor images is above
``collapse_threshold(K) = (1 + 1/K) / 2``, halfway between a balanced share (1/K) and a single class
(1); 0.55 for ten classes. The run logs a warning and the summary carries ``collapsed: true``.

The measurement never changes training: the networks run in eval mode under ``torch.inference_mode``
with their modes restored afterwards (``visuals.observing``), and the encoder's noise comes from a
generator of its own, so no RNG stream of the run is advanced. It uses the same latents as the anchor
stage's per-epoch evaluation (same noise seed, batch size and encoder input), so its overall anchored
accuracy equals the best epoch's ``anchored_teacher_acc``.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn

from ..report import image_grid
from . import checkpoint as ckpt
from .context import Context
from .visuals import observing

STAGE = "anchor"  # the noise seed is the anchor stage's evaluation seed (anchor.py)


def collapse_threshold(num_classes: int) -> float:
    """Largest class share above which the teacher's predictions count as collapsed onto one class."""
    if num_classes < 2:
        raise ValueError(f"num_classes: expected at least 2, got {num_classes}")
    return (1.0 + 1.0 / num_classes) / 2.0


def _per_class_mean(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    sums = torch.zeros(num_classes, dtype=torch.float64, device=values.device).index_add_(0, labels, values.double())
    counts = torch.bincount(labels, minlength=num_classes).double()
    return [float(s / c) if c > 0 else float("nan") for s, c in zip(sums.tolist(), counts.tolist())]


def view_stats(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """The teacher's view of one set of images: accuracy, confidence and prediction shares, overall and
    per true class (a class without samples gets NaN, written as null)."""
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits: expected shape (N, {num_classes}), got {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels: expected shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    n = logits.shape[0]
    if n == 0:
        raise ValueError("logits: no samples to measure")
    prob = torch.softmax(logits.double(), 1)
    conf, pred = prob.max(1)
    correct = (pred == labels).double()
    shares = torch.bincount(pred, minlength=num_classes).double() / n
    top = int(shares.argmax())
    return {
        "acc": float(correct.mean()),
        "confidence": float(conf.mean()),
        "max_share": float(shares[top]),
        "max_share_class": top,
        "per_class": {
            "acc": _per_class_mean(correct, labels, num_classes),
            "confidence": _per_class_mean(conf, labels, num_classes),
            "pred_share": [float(s) for s in shares.tolist()],
        },
    }


def summarize(
    decoded_logits: torch.Tensor,
    anchored_logits: torch.Tensor,
    labels: torch.Tensor,
    mask_mass: torch.Tensor,
    num_classes: int,
    latent_size: int,
) -> dict:
    """The diagnostics record from the teacher's logits on decoded and anchor images of the same samples
    and each sample's mask mass (sum of its mask over the latent dimensions)."""
    if mask_mass.shape != labels.shape:
        raise ValueError(f"mask_mass: expected shape {tuple(labels.shape)}, got {tuple(mask_mass.shape)}")
    dec = view_stats(decoded_logits, labels, num_classes)
    anc = view_stats(anchored_logits, labels, num_classes)
    threshold = collapse_threshold(num_classes)
    return {
        "images": int(labels.shape[0]),
        "per_class_images": [int(c) for c in torch.bincount(labels, minlength=num_classes).tolist()],
        "decoded": dec,
        "anchored": anc,
        "acc_gain": anc["acc"] - dec["acc"],
        "mask_mass": float(mask_mass.double().mean()),
        "mask_mass_per_class": _per_class_mean(mask_mass, labels, num_classes),
        "latent_size": int(latent_size),
        "collapse_threshold": threshold,
        "collapsed": anc["max_share"] > threshold,
    }


def _latents(ctx: Context, encoder: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """E's latents of ``images`` in the anchor evaluation's batches and with its noise stream."""
    cfg = ctx.cfg.anchor
    noise = ckpt.make_generator(ctx.device, ckpt.stage_seed(ctx.cfg.seed, STAGE) + 1)
    out = []
    for i in range(0, images.shape[0], cfg.batch_size):
        x, y = images[i : i + cfg.batch_size], labels[i : i + cfg.batch_size]
        x_enc = x if cfg.eval_encoder_input == "raw" else ctx.normalize(x)  # B7, as the stage evaluates
        out.append(encoder(x_enc, y, generator=noise))
    return torch.cat(out)


def measure(ctx: Context, teacher: nn.Module, generator: nn.Module, encoder: nn.Module, anchor: nn.Module) -> dict:
    """The diagnostics of ``anchor`` on the student validation split (networks left as they were)."""
    val = ctx.data.student.val
    K, bs = ctx.data.num_classes, ctx.cfg.anchor.batch_size
    with observing(teacher, generator, encoder, anchor), torch.inference_mode():
        z = _latents(ctx, encoder, val.images, val.labels)
        dec, anc, mass = [], [], []
        for i in range(0, z.shape[0], bs):
            zb, yb = z[i : i + bs], val.labels[i : i + bs]
            dec.append(teacher(ctx.normalize(generator(zb))))
            z_a, mask = anchor(zb, yb)
            anc.append(teacher(ctx.normalize(generator(z_a))))
            mass.append(mask.sum(1))
        return summarize(torch.cat(dec), torch.cat(anc), val.labels, torch.cat(mass), K, z.shape[1])


def _cell(v: float | None, percent: bool = False) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    return f"{100 * v:.1f}" if percent else f"{v:.2f}"


def describe(diag: dict, class_names: list[str] | None = None) -> list[str]:
    """The diagnostics as log lines: the overall figures, then one line per class (accuracy in %,
    confidence and prediction share as fractions)."""
    d, a = diag["decoded"], diag["anchored"]
    K = len(d["per_class"]["acc"])
    names = [str(c) for c in (class_names or range(K))]
    lines = [
        f"Module 2 anchor diagnostics on {diag['images']} student validation images: teacher acc on decoded "
        f"G(E(x)) {100 * d['acc']:.1f}% -> on anchor images G(A(E(x), y)) {100 * a['acc']:.1f}% "
        f"({100 * diag['acc_gain']:+.1f} points); confidence {d['confidence']:.2f} -> {a['confidence']:.2f}; "
        f"largest class share {d['max_share']:.2f} -> {a['max_share']:.2f} (class {names[a['max_share_class']]}; "
        f"collapse above {diag['collapse_threshold']:.2f}); mask mass {diag['mask_mass']:.2f} of L = {diag['latent_size']}",
        f"  {'class':>8} {'n':>5} | {'acc dec':>7} {'acc anc':>7} | {'conf dec':>8} {'conf anc':>8} | "
        f"{'share dec':>9} {'share anc':>9} | {'mask':>6}",
    ]
    for c in range(K):
        pd, pa = d["per_class"], a["per_class"]
        lines.append(
            f"  {names[c][:8]:>8} {diag['per_class_images'][c]:5d} | {_cell(pd['acc'][c], True):>7} "
            f"{_cell(pa['acc'][c], True):>7} | {_cell(pd['confidence'][c]):>8} {_cell(pa['confidence'][c]):>8} | "
            f"{_cell(pd['pred_share'][c]):>9} {_cell(pa['pred_share'][c]):>9} | {_cell(diag['mask_mass_per_class'][c]):>6}"
        )
    return lines


def collapse_warning(diag: dict, class_names: list[str] | None = None) -> str | None:
    """The warning for a collapsed anchor, or None."""
    if not diag["collapsed"]:
        return None
    a = diag["anchored"]
    name = (class_names or [])[a["max_share_class"]] if class_names else a["max_share_class"]
    return (
        f"Module 2: the anchor has COLLAPSED: {100 * a['max_share']:.0f}% of the teacher's predictions on anchor "
        f"images are class {name} (threshold {100 * diag['collapse_threshold']:.0f}%); the anchored soft labels "
        "carry little class information (see plots/anchor_classes.png and docs/anchor-diagnostics.md)"
    )


def report(ctx: Context, diag: dict) -> None:
    """Log the diagnostics (INFO) and, for a collapsed anchor, a warning."""
    names = list(ctx.data.class_names) or None
    for line in describe(diag, names):
        ctx.log.info("%s", line)
    warning = collapse_warning(diag, names)
    if warning:
        ctx.log.warning("%s", warning)


def plot_classes(
    ctx: Context, path: str, generator: nn.Module, encoder: nn.Module, anchor: nn.Module, teacher: nn.Module,
    per_class: int = 8,
) -> None:
    """One line per class: the decoded images G(E(x)) of its first ``per_class`` validation samples, a
    white gap, then their anchor images G(A(E(x), y)); the line's title gives the teacher's predictions."""
    val = ctx.data.student.val
    K = ctx.data.num_classes
    names = list(ctx.data.class_names) or [str(c) for c in range(K)]
    with observing(teacher, generator, encoder, anchor), torch.inference_mode():
        rows, titles = [], []
        for c in range(K):
            idx = (val.labels == c).nonzero().flatten()[:per_class]
            if idx.numel() == 0:
                continue
            x, y = val.images[idx], val.labels[idx]
            z = encoder(x, y, generator=ckpt.make_generator(ctx.device, 12345))
            decoded = generator(z)
            anchored = generator(anchor(z, y)[0])
            preds = ["".join(str(int(p) % 10) for p in teacher(ctx.normalize(imgs)).argmax(1).tolist())
                     for imgs in (decoded, anchored)]
            rows.append(torch.cat([decoded, torch.ones_like(decoded[:1]), anchored]))
            titles.append(f"{names[c][:8]}: T {preds[0]} | {preds[1]}")
        if rows:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            image_grid(path, rows, titles, "per class: G(E(x)) | G(A(E(x), y)); T: the teacher's predictions")


def headline(diag: dict) -> str:
    """One line for the end of ``augkd run``."""
    d, a = diag["decoded"], diag["anchored"]
    state = "COLLAPSED" if diag["collapsed"] else "not collapsed"
    return (
        f"anchor: teacher acc on decoded {100 * d['acc']:.1f}% -> on anchor images {100 * a['acc']:.1f}% "
        f"({100 * diag['acc_gain']:+.1f}), largest class share {a['max_share']:.2f} ({state}, threshold "
        f"{diag['collapse_threshold']:.2f}), mask mass {diag['mask_mass']:.2f} of {diag['latent_size']}"
    )
