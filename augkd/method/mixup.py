"""Module 3, Mixup Learning (paper Sec. 4.3; official ``train`` with the mixup branch).

Each student-domain batch (x, y) is paired with a mixed sample built from its anchor image:

    z = E(x, y);  (m, psi) = A(z, y);  z_mix = (1-f) z_a + f z        (latent mixup, z_a = A(z, y))
    x_mix = (1-f) G(z_mix) + f x                                       (pixel mixup, then normalised)

f = f(epoch) grows from b to 1 (schedules.mixup_factor), so training moves progressively from
teacher-domain-like anchor images to the real student images. The student sees [x, x_mix], both labelled
y, and learns from u * CE(labels) + (1-u) * T^2 * KL(teacher || student) with T = 10.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops
from . import checkpoint as ckpt
from .anchor import freeze
from .context import Context
from .evaluation import accuracy_key, evaluate, minibatches
from .loop import LoopResult, run_epochs
from .losses import mixup_loss
from .schedules import adam, constant_warmup, kd_weight_u, mixup_factor
from .step_sums import StepSums

STAGE = "mixup"


@torch.no_grad()
def mixed_batch(
    ctx: Context,
    x: torch.Tensor,
    y: torch.Tensor,
    f: float,
    encoder: nn.Module,
    generator: nn.Module,
    anchor: nn.Module | None,
    noise: torch.Generator | None,
) -> torch.Tensor:
    """The normalised mixed images for real images ``x`` (raw [0,1]) at real-share ``f``."""
    z = encoder(x, y, generator=noise)
    if anchor is None:
        z_mix = z  # no-anchor ablation: z_a = z, so the latent mixup is the identity
    else:
        mask, psi = anchor.mask_and_psi(z, y)
        z_mix = ops.latent_mixup(z, mask, psi, f)  # == (1-f) * A(z, y) + f * z
    x_gen = generator(z_mix)
    return ops.pixel_mixup(x_gen, x, f, mean=ctx.mean, std=ctx.std)  # N((1-f) x_gen + f x)


def run_mixup(
    ctx: Context,
    teacher: nn.Module,
    student: nn.Module,
    generator: nn.Module,
    encoder: nn.Module,
    anchor: nn.Module | None,
) -> LoopResult:
    """Train ``student`` (initialised from Module 1) in place; on return it holds the best val epoch."""
    cfg = ctx.cfg.mixup
    seed = ckpt.stage_seed(ctx.cfg.seed, STAGE)
    ckpt.seed_everything(seed)
    gen = ckpt.make_generator(ctx.device, seed)  # epoch order: the same in every process
    local = ckpt.per_process_generator(ctx.dist, gen, seed)  # augmentation and encoder noise
    freeze(teacher, generator, encoder)
    student_ddp = ctx.dist.wrap(student)
    if anchor is not None:
        freeze(anchor)  # eval mode: the mask uses the BN running statistics, as released
    opt = adam(student.parameters(), cfg.lr, cfg.weight_decay)
    # Released: ConstantLR (lr/3 for 5 steps) stepped per batch (B8); "epoch" spreads it over 5 epochs.
    sched = constant_warmup(opt, cfg.warmup_steps, cfg.warmup_factor)
    train = ctx.data.student.train

    def train_epoch(epoch: int) -> dict:
        f = mixup_factor(epoch, cfg.epochs, cfg.a, cfg.b, cfg.schedule)
        u = kd_weight_u(f, cfg.u_schedule, cfg.u)
        # no-mixup ablation: the synthetic half stays the pure anchor image (mixing factor 0) while the
        # CE/KD weight u still follows the schedule (docs/fidelity.md).
        f_mix = f if cfg.mix_samples else 0.0
        lr = opt.param_groups[0]["lr"]  # the rate this epoch starts with
        student.train()
        steps = StepSums()  # the loss and counts stay tensors; one host read per epoch
        n = 0
        for x, y in minibatches(train, cfg.batch_size, gen, augment_pad=ctx.cfg.data.augment_pad,
                                hflip=ctx.cfg.data.hflip, shard=ctx.dist, aug_generator=local):
            x_mix = mixed_batch(ctx, x, y, f_mix, encoder, generator, anchor, local)
            # B2: the released code puts the real half in un-normalised.
            real = ctx.normalize(x) if cfg.normalize_real else x
            inputs = torch.cat([real, x_mix])
            labels = torch.cat([y, y])
            logits = student_ddp(inputs)
            if cfg.kd_target == "teacher":
                with torch.no_grad():
                    target = teacher(inputs)
            else:
                # B1, released behaviour: the KD "teacher" is a second forward of the student itself,
                # so KL(p || p) = 0 with zero gradient and only the CE term trains. Under DDP that
                # second forward runs outside the wrapper and without a graph (one backward per DDP
                # forward); its KL gradient is exactly 0 either way.
                if ctx.dist.enabled:
                    with torch.no_grad():
                        target = student(inputs)
                else:
                    target = student(inputs)
            loss = mixup_loss(logits, target, labels, u=u, temperature=cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cfg.scheduler_step == "batch":
                sched.step()
            b = y.shape[0]
            n += b
            steps.add("loss", loss, b)
            with torch.no_grad():
                if cfg.kd_target == "teacher":
                    t_mix = target[b:]
                else:
                    t_mix = teacher(x_mix)
                steps.add("teacher_acc_mixed", (t_mix.argmax(1) == y).float().sum())
        if cfg.scheduler_step == "epoch":
            sched.step()
        sums = steps.sums()
        row = {"f": f, "u": u, "train_loss": sums.get("loss", 0.0) / max(n, 1)}
        row["teacher_acc_mixed"] = sums.get("teacher_acc_mixed", 0.0) / max(n, 1)
        row["lr"] = lr
        return row

    def eval_epoch(epoch: int) -> dict:
        m = evaluate(student, ctx.data.student.val, ctx.normalize)
        return {"val_acc": m["acc"], "val_acc3": m["acc3"], "val_acc5": m["acc5"], "val_loss": m["loss"]}

    result = run_epochs(
        ctx,
        STAGE,
        cfg.epochs,
        objects={"student": student, "opt": opt, "sched": sched},
        generators=ckpt.distinct_generators(gen=gen, local=local),
        best_modules={"student": student},
        train_epoch=train_epoch,
        evaluate=eval_epoch,
        select_key=accuracy_key,
        describe=lambda r: (
            f"f {r['f']:.2f} u {r['u']:.2f} loss {r['train_loss']:.3f} teacher acc on mixed "
            f"{100 * r['teacher_acc_mixed']:.1f} | val acc {100 * r['val_acc']:.1f}"
        ),
    )
    student.load_state_dict(result.best_states["student"])
    return result
