"""Module 2, Anchor Learning (paper Sec. 4.2; official ``train`` with model = anchor).

AnchorNet A moves the latent of a student-domain image, z = E(x, y), towards a region where the teacher
is certain: a class-specific mask m(y) chooses the "domain-specific" dimensions and psi rewrites them.
The teacher's energy on the decoded anchor image G(A(z)) measures how in-distribution it looks to the
teacher (uncertainty-guided); a small CE keeps the class; the mask term controls how much is changed.
E, G and T are frozen, but the gradient flows through G and T into A.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops
from . import checkpoint as ckpt
from .context import Context
from .evaluation import minibatches
from .loop import LoopResult, run_epochs
from .losses import anchor_loss
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


def run_anchor(ctx: Context, teacher: nn.Module, generator: nn.Module, encoder: nn.Module, anchor: nn.Module) -> LoopResult:
    """Train ``anchor`` in place; on return it holds the epoch with the lowest validation anchor loss."""
    cfg = ctx.cfg.anchor
    seed = ckpt.stage_seed(ctx.cfg.seed, STAGE)
    ckpt.seed_everything(seed)
    gen = ckpt.make_generator(ctx.device, seed)  # epoch order: the same in every process
    local = ckpt.per_process_generator(ctx.dist, gen, seed)  # augmentation and encoder noise
    freeze(teacher, generator, encoder)
    anchor_ddp = ctx.dist.wrap(anchor)
    K = ctx.data.num_classes
    train, val = ctx.data.student.train, ctx.data.student.val
    opt = adam(anchor.parameters(), cfg.lr)
    sched = cosine(opt, cfg.epochs)
    loss_kw = dict(
        invariant=cfg.invariant, temperature=cfg.energy_temperature, ce_weight=cfg.ce_weight, penalty=cfg.mask_penalty
    )

    def decode_anchor(z: torch.Tensor, y: torch.Tensor, net: nn.Module = anchor):
        z_a, mask = net(z, y)
        x_a = generator(z_a)
        logits = teacher(ctx.normalize(x_a))
        return x_a, mask, logits

    def forward(x_enc: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None, net: nn.Module = anchor):
        with torch.no_grad():
            z = encoder(x_enc, y, generator=noise)
        return (z,) + decode_anchor(z, y, net)

    # What the evaluation needs from the frozen E, G and T is the same every epoch: the validation
    # latents (E's noise restarts from one seed each epoch) and the teacher's logits on the decoded
    # G(z) without the anchor. Computed once per stage, on the first evaluation.
    val_fixed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @torch.inference_mode()
    def fixed_val_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if not val_fixed:
            noise = ckpt.make_generator(ctx.device, seed + 1)  # the same encoder noise every epoch
            for i in range(0, len(val), cfg.batch_size):
                x, y = val.images[i : i + cfg.batch_size], val.labels[i : i + cfg.batch_size]
                # B7: the released evaluation feeds E normalised images although training feeds raw ones.
                x_enc = x if cfg.eval_encoder_input == "raw" else ctx.normalize(x)
                z = encoder(x_enc, y, generator=noise)
                val_fixed.append((z, y, teacher(ctx.normalize(generator(z)))))  # without the anchor
        return val_fixed

    def train_epoch(epoch: int) -> dict:
        lr = opt.param_groups[0]["lr"]  # the rate this epoch starts with
        anchor.train()
        steps = StepSums()  # the losses stay tensors; one host read per epoch
        n = 0
        for x, y in minibatches(
            train, cfg.batch_size, gen, augment_pad=ctx.cfg.data.augment_pad, hflip=ctx.cfg.data.hflip, min_batch=2,
            shard=ctx.dist, aug_generator=local,
        ):
            _, _, mask, logits = forward(x, y, local, anchor_ddp)  # E gets raw [0,1] images, as in Module 1
            terms = anchor_loss(logits, y, mask, **loss_kw)
            opt.zero_grad(set_to_none=True)
            terms.total.backward()
            opt.step()
            if cfg.scheduler_step == "batch":  # B8: released behaviour
                sched.step()
            b = y.shape[0]
            n += b
            for k, v in (("loss", terms.total), ("energy", terms.energy), ("ce", terms.ce),
                         ("penalty", terms.penalty), ("mask_mass", terms.mask_mass)):
                steps.add(k, v, b)
        if cfg.scheduler_step == "epoch":
            sched.step()
        row = {f"train_{k}": v / max(n, 1) for k, v in steps.sums().items()}
        row["lr"] = lr
        return row

    @torch.inference_mode()
    def eval_epoch(epoch: int) -> dict:
        anchor.eval()
        losses = StepSums()
        masses, logits_a, logits_g, labels = [], [], [], []
        for z, y, decoded in fixed_val_batches():
            _, mask, logits = decode_anchor(z, y)
            terms = anchor_loss(logits, y, mask, **loss_kw)
            # per_sample: a mean per batch -> weight by batch size; batch_sum: a sum -> add up (released).
            losses.add("total", terms.total, y.shape[0] if cfg.mask_penalty == "per_sample" else 1)
            masses.append(mask.sum(1))
            logits_a.append(logits)
            logits_g.append(decoded)
            labels.append(y)
        total = losses.sums().get("total", 0.0)
        y_all = torch.cat(labels)
        row = {"val_anchor_loss": total / len(val) if cfg.mask_penalty == "per_sample" else total}
        row["val_mask_mass"] = float(torch.cat(masses).mean())
        row.update(teacher_view_stats(torch.cat(logits_a), y_all, K, "anchored"))
        row.update(teacher_view_stats(torch.cat(logits_g), y_all, K, "decoded"))
        anchor.train()
        return row

    result = run_epochs(
        ctx,
        STAGE,
        cfg.epochs,
        objects={"anchor": anchor, "opt": opt, "sched": sched},
        generators=ckpt.distinct_generators(gen=gen, local=local),
        best_modules={"anchor": anchor},
        train_epoch=train_epoch,
        evaluate=eval_epoch,
        select_key=lambda r: (r["val_anchor_loss"],),
        describe=lambda r: (
            f"loss {r['train_loss']:.3f} (energy {r['train_energy']:.2f} ce {r['train_ce']:.2f} "
            f"mask {r['train_mask_mass']:.2f}) | val {r['val_anchor_loss']:.3f} teacher acc on anchored "
            f"{100 * r['anchored_teacher_acc']:.1f} (decoded {100 * r['decoded_teacher_acc']:.1f}) "
            f"energy {r['anchored_energy']:.2f} max share {r['anchored_max_share']:.2f}"
        ),
    )
    anchor.load_state_dict(result.best_states["anchor"])
    anchor.eval()
    return result
