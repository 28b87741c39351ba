"""Module 3, Mixup Learning (paper Sec. 4.3; official ``train`` with the mixup branch).

Each student-domain batch (x, y) is paired with a mixed sample built from its anchor image:

    z = E(x, y);  (m, psi) = A(z, y);  z_mix = (1-f) z_a + f z        (latent mixup, z_a = A(z, y))
    x_mix = (1-f) G(z_mix) + f x                                       (pixel mixup, then normalised)

f = f(epoch) grows from b to 1 (schedules.mixup_factor), so training moves progressively from
teacher-domain-like anchor images to the real student images. The student sees [x, x_mix], both labelled
y, and learns from u * CE(labels) + (1-u) * T^2 * KL(teacher || student) with T = 10; with
``mixup.teacher_weighting = "confidence"`` each row's KD term is weighted by the teacher's confidence on it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from .. import ops
from ..config import MixupConfig
from . import checkpoint as ckpt
from .anchor import freeze
from .context import Context
from .evaluation import accuracy_key, minibatches, validation_row
from .loop import LoopResult, run_stage_epochs
from .losses import confidence_weights, distill_loss, distill_loss_weighted
from .schedules import adam, ce_weight, constant_warmup, mixup_factor
from .side_thread import beside, side_worker
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


@dataclass
class Mixup:
    """What Module 3's steps work on: S (``student_ddp``: through DDP with several processes), the frozen
    T, G, E and A (None: the no-anchor ablation), S's optimiser and scheduler, the random streams."""

    ctx: Context
    cfg: MixupConfig
    teacher: nn.Module
    student: nn.Module
    student_ddp: nn.Module
    generator: nn.Module
    encoder: nn.Module
    anchor: nn.Module | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    rnd: ckpt.StageRandom
    worker: ThreadPoolExecutor | None = None  # the teacher's forward beside the student's (side_thread)


def setup(ctx: Context, teacher: nn.Module, student: nn.Module, generator: nn.Module, encoder: nn.Module,
          anchor: nn.Module | None) -> Mixup:
    cfg = ctx.cfg.mixup
    rnd = ckpt.stage_random(ctx.cfg.seed, STAGE, ctx.device, ctx.dist)
    freeze(teacher, generator, encoder)
    student_ddp = ctx.dist.wrap(student)
    if anchor is not None:
        freeze(anchor)  # eval mode: the mask uses the BN running statistics, as released
    opt = adam(student.parameters(), cfg.lr, cfg.weight_decay)
    # Released: ConstantLR (lr/3 for 5 steps) stepped per batch (B8); "epoch" spreads it over 5 epochs.
    sched = constant_warmup(opt, cfg.warmup_steps, cfg.warmup_factor)
    # The teacher's no-grad forward and the student's share nothing (other networks; neither draws random
    # numbers); the KD target "student" is a second forward of the student itself and stays in order.
    worker = side_worker(ctx, "mixup-teacher") if cfg.kd_target == "teacher" else None
    return Mixup(ctx, cfg, teacher, student, student_ddp, generator, encoder, anchor, opt, sched, rnd, worker)


def kd_target(st: Mixup, inputs: torch.Tensor) -> torch.Tensor:
    """The logits the KD term distils from."""
    if st.cfg.kd_target == "teacher":
        with torch.no_grad():
            return st.teacher(inputs)
    # B1, released behaviour: the KD "teacher" is a second forward of the student itself, so
    # KL(p || p) = 0 with zero gradient and only the CE term trains. Under DDP that second forward runs
    # outside the wrapper and without a graph (one backward per DDP forward); its KL gradient is
    # exactly 0 either way.
    if st.ctx.dist.enabled:
        with torch.no_grad():
            return st.student(inputs)
    return st.student(inputs)


def train_epoch(st: Mixup, epoch: int) -> dict:
    cfg, ctx = st.cfg, st.ctx
    f = mixup_factor(epoch, cfg.epochs, cfg.a, cfg.b, cfg.schedule)
    u = ce_weight(f, cfg.u_schedule, cfg.u)
    # no-mixup ablation: the synthetic half stays the pure anchor image (mixing factor 0) while the
    # CE/KD weight u still follows the schedule (docs/fidelity.md).
    f_mix = f if cfg.mix_samples else 0.0
    lr = st.opt.param_groups[0]["lr"]  # the rate this epoch starts with
    st.student.train()
    steps = StepSums()
    for x, y in minibatches(ctx.data.student.train, cfg.batch_size, st.rnd.shared, augment_pad=ctx.cfg.data.augment_pad,
                            hflip=ctx.cfg.data.hflip, shard=ctx.dist, aug_generator=st.rnd.local):
        x_mix = mixed_batch(ctx, x, y, f_mix, st.encoder, st.generator, st.anchor, st.rnd.local)
        # B2: the released code puts the real half in un-normalised.
        inputs = torch.cat([ctx.normalize(x) if cfg.normalize_real else x, x_mix])
        logits, target = beside(st.worker, lambda: st.student_ddp(inputs), lambda: kd_target(st, inputs))
        if cfg.teacher_weighting == "confidence":
            loss = distill_loss_weighted(logits, target, torch.cat([y, y]), confidence_weights(target), u=u,
                                         temperature=cfg.temperature)
        else:
            loss = distill_loss(logits, target, torch.cat([y, y]), u=u, temperature=cfg.temperature)
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        st.opt.step()
        if cfg.scheduler_step == "batch":
            st.sched.step()
        b = y.shape[0]
        steps.add("loss", loss, b)
        with torch.no_grad():
            t_mix = target[b:] if cfg.kd_target == "teacher" else st.teacher(x_mix)
            steps.add("teacher_acc_mixed", (t_mix.argmax(1) == y).float().sum())
    if cfg.scheduler_step == "epoch":
        st.sched.step()
    sums, n = steps.sums(), max(steps.weights.get("loss", 0), 1)
    return {"f": f, "u": u, "train_loss": sums.get("loss", 0.0) / n,
            "teacher_acc_mixed": sums.get("teacher_acc_mixed", 0.0) / n, "lr": lr}


def describe(r: dict) -> str:
    return (f"f {r['f']:.2f} u {r['u']:.2f} loss {r['train_loss']:.3f} teacher acc on mixed "
            f"{100 * r['teacher_acc_mixed']:.1f} | val acc {100 * r['val_acc']:.1f}")


def run_mixup(
    ctx: Context,
    teacher: nn.Module,
    student: nn.Module,
    generator: nn.Module,
    encoder: nn.Module,
    anchor: nn.Module | None,
) -> LoopResult:
    """Train ``student`` (initialised from Module 1) in place; on return it holds the best val epoch."""
    st = setup(ctx, teacher, student, generator, encoder, anchor)
    try:
        return run_stage_epochs(
            ctx, STAGE, st.cfg.epochs, {"student": student}, st.opt, st.sched, st.rnd,
            train_epoch=partial(train_epoch, st),
            evaluate=lambda epoch: validation_row(student, ctx.data.student.val, ctx.normalize),
            select_key=accuracy_key, describe=describe,
        )
    finally:
        if st.worker is not None:
            st.worker.shutdown(wait=True)
