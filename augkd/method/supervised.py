"""Plain supervised training on one labelled split: the teacher recipe and the ce / kd / dfkd baselines.

Loss: CE, or with a teacher the released DistillLoss u*CE + (1-u)*T^2*KL (the ``kd`` baseline, the
official ``raw_kd`` ablation). Best epoch: validation Acc, then Acc@3, then Acc@5.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Split
from . import checkpoint as ckpt
from .context import Context
from .evaluation import accuracy_key, minibatches, validation_row
from .loop import LoopResult, run_stage_epochs
from .losses import distill_loss
from .schedules import adam, constant_warmup
from .step_sums import StepSums


@dataclass
class Supervised:
    """What a supervised epoch works on (``model_ddp``: through DDP with several processes)."""

    ctx: Context
    model: nn.Module
    model_ddp: nn.Module
    train: Split
    batch_size: int
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scheduler_step: str
    rnd: ckpt.StageRandom
    teacher: nn.Module | None  # None: CE only; else the DistillLoss with weight kd_u on the CE term
    kd_u: float
    temperature: float


def train_epoch(st: Supervised, epoch: int) -> dict:
    ctx = st.ctx
    lr_start = st.opt.param_groups[0]["lr"]
    st.model.train()
    steps = StepSums()
    for x, y in minibatches(st.train, st.batch_size, st.rnd.shared, augment_pad=ctx.cfg.data.augment_pad,
                            hflip=ctx.cfg.data.hflip, shard=ctx.dist, aug_generator=st.rnd.local):
        xn = ctx.normalize(x)
        logits = st.model_ddp(xn)
        if st.teacher is None:
            loss = F.cross_entropy(logits, y)
        else:
            with torch.no_grad():
                t_logits = st.teacher(xn)
            loss = distill_loss(logits, t_logits, y, u=st.kd_u, temperature=st.temperature)
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        st.opt.step()
        if st.scheduler_step == "batch":
            st.sched.step()
        steps.add("loss", loss, y.shape[0])
    if st.scheduler_step == "epoch":
        st.sched.step()
    return {"train_loss": steps.means().get("loss", 0.0), "lr": lr_start}


def train_supervised(
    ctx: Context,
    stage: str,
    model: nn.Module,
    train: Split,
    val: Split,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    warmup_steps: int = 0,
    warmup_factor: float = 1.0,
    scheduler_step: str = "batch",
    teacher: nn.Module | None = None,
    kd_u: float = 0.5,
    temperature: float = 10.0,
) -> LoopResult:
    """Train ``model`` in place; on return it holds the best epoch's weights."""
    rnd = ckpt.stage_random(ctx.cfg.seed, stage, ctx.device, ctx.dist)
    model_ddp = ctx.dist.wrap(model)
    # weight_decay is passed explicitly: the official teacher recipe parses --t_wd but drops it (B9);
    # the teacher config's default of 0 reproduces that, a non-zero value is honoured.
    opt = adam(model.parameters(), lr, weight_decay)
    sched = constant_warmup(opt, warmup_steps, warmup_factor)
    if teacher is not None:
        teacher.eval()
        teacher.requires_grad_(False)
    st = Supervised(ctx, model, model_ddp, train, batch_size, opt, sched, scheduler_step, rnd, teacher, kd_u, temperature)
    return run_stage_epochs(
        ctx, stage, epochs, {"model": model}, opt, sched, rnd, generator_names=("order", "local"),
        train_epoch=partial(train_epoch, st),
        evaluate=lambda epoch: validation_row(model, val, ctx.normalize),
        select_key=accuracy_key,
        describe=lambda r: f"loss {r['train_loss']:.3f} val acc {100 * r['val_acc']:.1f}",
    )
