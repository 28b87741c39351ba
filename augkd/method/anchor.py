"""Module 2, Anchor Learning (paper Sec. 4.2; official ``train`` with model = anchor).

AnchorNet A moves the latent of a student-domain image, z = E(x, y), towards a region where the teacher
is certain: a class-specific mask m(y) chooses the "domain-specific" dimensions and psi rewrites them.
The teacher's energy on the decoded anchor image G(A(z)) measures how in-distribution it looks to the
teacher (uncertainty-guided); a small CE keeps the class; the mask term controls how much is changed.
E, G and T are frozen, but the gradient flows through G and T into A.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn

from .. import ops
from ..config import AnchorConfig
from . import checkpoint as ckpt
from .context import Context
from .evaluation import minibatches
from .loop import LoopResult, run_stage_epochs
from .losses import AnchorLossTerms, anchor_loss
from .schedules import adam, cosine
from .step_sums import StepSums

STAGE = "anchor"


def freeze(*modules: nn.Module) -> None:
    """Eval mode and no parameter gradients (B12: the released code leaves them trainable, never stepped)."""
    for m in modules:
        m.eval()
        m.requires_grad_(False)


def teacher_view_stats(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, prefix: str) -> dict[str, float]:
    """Teacher accuracy, mean energy and majority-class share on a set of images (collapse detector)."""
    pred = logits.argmax(1)
    counts = torch.bincount(pred, minlength=num_classes).float()
    return {
        f"{prefix}_teacher_acc": float((pred == labels).float().mean()),
        f"{prefix}_energy": float(ops.energy(logits).mean()),
        f"{prefix}_max_share": float(counts.max() / counts.sum()),
    }


@dataclass
class Anchor:
    """What Module 2's steps work on: A (``anchor_ddp``: through DDP with several processes), the frozen
    E, G and T, A's optimiser and scheduler, the random streams, and the validation batches' fixed part."""

    ctx: Context
    cfg: AnchorConfig
    teacher: nn.Module
    generator: nn.Module
    encoder: nn.Module
    anchor: nn.Module
    anchor_ddp: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    rnd: ckpt.StageRandom
    # What the evaluation needs from the frozen E, G and T is the same every epoch: the validation
    # latents (E's noise restarts from one seed each epoch) and the teacher's logits on the decoded
    # G(z) without the anchor. Computed once per stage, on the first evaluation.
    val_fixed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> AnchorLossTerms:
        c = self.cfg
        return anchor_loss(logits, y, mask, invariant=c.invariant, temperature=c.energy_temperature,
                           ce_weight=c.ce_weight, penalty=c.mask_penalty, energy=c.energy,
                           balance_weight=c.balance_weight)


def setup(ctx: Context, teacher: nn.Module, generator: nn.Module, encoder: nn.Module, anchor: nn.Module) -> Anchor:
    cfg = ctx.cfg.anchor
    rnd = ckpt.stage_random(ctx.cfg.seed, STAGE, ctx.device, ctx.dist)
    freeze(teacher, generator, encoder)
    anchor_ddp = ctx.dist.wrap(anchor)
    opt = adam(anchor.parameters(), cfg.lr)
    return Anchor(ctx, cfg, teacher, generator, encoder, anchor, anchor_ddp, opt, cosine(opt, cfg.epochs), rnd)


def decode_anchor(st: Anchor, z: torch.Tensor, y: torch.Tensor, net: nn.Module):
    """(A(z, y) decoded by G, the mask, the teacher's logits on that image)."""
    z_a, mask = net(z, y)
    x_a = st.generator(z_a)
    return x_a, mask, st.teacher(st.ctx.normalize(x_a))


@torch.inference_mode()
def fixed_val_batches(st: Anchor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per validation batch: E's latents, the labels, and the teacher's logits on G(z) (no anchor)."""
    if not st.val_fixed:
        val, b = st.ctx.data.student.val, st.cfg.batch_size
        noise = ckpt.make_generator(st.ctx.device, st.rnd.seed + 1)  # the same encoder noise every epoch
        for i in range(0, len(val), b):
            x, y = val.images[i : i + b], val.labels[i : i + b]
            # B7: the released evaluation feeds E normalised images although training feeds raw ones.
            x_enc = x if st.cfg.eval_encoder_input == "raw" else st.ctx.normalize(x)
            z = st.encoder(x_enc, y, generator=noise)
            st.val_fixed.append((z, y, st.teacher(st.ctx.normalize(st.generator(z)))))
    return st.val_fixed


def train_epoch(st: Anchor, epoch: int) -> dict:
    cfg, ctx = st.cfg, st.ctx
    lr = st.opt.param_groups[0]["lr"]  # the rate this epoch starts with
    st.anchor.train()
    steps = StepSums()
    for x, y in minibatches(
        ctx.data.student.train, cfg.batch_size, st.rnd.shared, augment_pad=ctx.cfg.data.augment_pad,
        hflip=ctx.cfg.data.hflip, min_batch=2, shard=ctx.dist, aug_generator=st.rnd.local,
    ):
        with torch.no_grad():
            z = st.encoder(x, y, generator=st.rnd.local)  # E gets raw [0,1] images, as in Module 1
        _, mask, logits = decode_anchor(st, z, y, st.anchor_ddp)
        terms = st.loss(logits, y, mask)
        st.opt.zero_grad(set_to_none=True)
        terms.total.backward()
        st.opt.step()
        if cfg.scheduler_step == "batch":  # B8: released behaviour
            st.sched.step()
        b = y.shape[0]
        for k, v in (("loss", terms.total), ("energy", terms.energy), ("ce", terms.ce),
                     ("penalty", terms.penalty), ("mask_mass", terms.mask_mass), ("balance", terms.balance)):
            steps.add(k, v, b)
    if cfg.scheduler_step == "epoch":
        st.sched.step()
    return {**{f"train_{k}": v for k, v in steps.means().items()}, "lr": lr}


@torch.inference_mode()
def eval_epoch(st: Anchor, epoch: int) -> dict:
    st.anchor.eval()
    per_sample = st.cfg.mask_penalty == "per_sample"
    losses = StepSums()
    masses, logits_a, logits_g, labels = [], [], [], []
    for z, y, decoded in fixed_val_batches(st):
        _, mask, logits = decode_anchor(st, z, y, st.anchor)
        # per_sample: a mean per batch -> weight by batch size; batch_sum: a sum -> add up (released).
        losses.add("total", st.loss(logits, y, mask).total, y.shape[0] if per_sample else 1)
        masses.append(mask.sum(1))
        logits_a.append(logits)
        logits_g.append(decoded)
        labels.append(y)
    total = losses.sums().get("total", 0.0)
    y_all, K = torch.cat(labels), st.ctx.data.num_classes
    row = {"val_anchor_loss": total / len(st.ctx.data.student.val) if per_sample else total}
    row["val_mask_mass"] = float(torch.cat(masses).mean())
    row.update(teacher_view_stats(torch.cat(logits_a), y_all, K, "anchored"))
    row.update(teacher_view_stats(torch.cat(logits_g), y_all, K, "decoded"))
    st.anchor.train()
    return row


def describe(r: dict) -> str:
    return (f"loss {r['train_loss']:.3f} (energy {r['train_energy']:.2f} ce {r['train_ce']:.2f} "
            f"mask {r['train_mask_mass']:.2f}) | val {r['val_anchor_loss']:.3f} teacher acc on anchored "
            f"{100 * r['anchored_teacher_acc']:.1f} (decoded {100 * r['decoded_teacher_acc']:.1f}) "
            f"energy {r['anchored_energy']:.2f} max share {r['anchored_max_share']:.2f}")


def select_key(select: str):
    """The best-epoch key to MINIMISE for ``anchor.select``: the validation anchor loss, or the teacher's
    accuracy on the validation anchor images (higher first; ties go to the lower loss, then the earlier
    epoch)."""
    if select == "loss":
        return lambda r: (r["val_anchor_loss"],)
    if select == "anchored_acc":
        return lambda r: (-r["anchored_teacher_acc"], r["val_anchor_loss"])
    raise ValueError(f"anchor.select: expected 'loss' or 'anchored_acc', got {select!r}")


def run_anchor(ctx: Context, teacher: nn.Module, generator: nn.Module, encoder: nn.Module, anchor: nn.Module) -> LoopResult:
    """Train ``anchor`` in place; on return it holds the best epoch by ``anchor.select``."""
    st = setup(ctx, teacher, generator, encoder, anchor)
    result = run_stage_epochs(
        ctx, STAGE, st.cfg.epochs, {"anchor": anchor}, st.opt, st.sched, st.rnd,
        train_epoch=partial(train_epoch, st), evaluate=partial(eval_epoch, st),
        select_key=select_key(st.cfg.select), describe=describe,
    )
    anchor.eval()
    return result
