"""Plain supervised training on one labelled split: the teacher recipe and the ce / kd / dfkd baselines.

Loss: CE, or with a teacher the released DistillLoss u*CE + (1-u)*T^2*KL (the ``kd`` baseline, the
official ``raw_kd`` ablation). Best epoch: validation Acc, then Acc@3, then Acc@5.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Split
from . import checkpoint as ckpt
from .context import Context
from .evaluation import accuracy_key, evaluate, minibatches
from .loop import LoopResult, run_epochs
from .losses import mixup_loss
from .schedules import adam, constant_warmup
from .step_sums import StepSums


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
    seed = ckpt.stage_seed(ctx.cfg.seed, stage)
    ckpt.seed_everything(seed)
    order = ckpt.make_generator(ctx.device, seed)  # epoch order: the same in every process
    local = ckpt.per_process_generator(ctx.dist, order, seed)  # augmentation
    model_ddp = ctx.dist.wrap(model)
    # weight_decay is passed explicitly: the official teacher recipe parses --t_wd but drops it (B9);
    # the teacher config's default of 0 reproduces that, a non-zero value is honoured.
    opt = adam(model.parameters(), lr, weight_decay)
    sched = constant_warmup(opt, warmup_steps, warmup_factor)
    if teacher is not None:
        teacher.eval()
        teacher.requires_grad_(False)
    pad, hflip = ctx.cfg.data.augment_pad, ctx.cfg.data.hflip

    def train_epoch(epoch: int) -> dict:
        lr_start = opt.param_groups[0]["lr"]
        model.train()
        steps, n = StepSums(), 0  # the loss stays a tensor; one host read per epoch
        batches = minibatches(train, batch_size, order, augment_pad=pad, hflip=hflip, shard=ctx.dist,
                              aug_generator=local)
        for x, y in batches:
            xn = ctx.normalize(x)
            logits = model_ddp(xn)
            if teacher is None:
                loss = F.cross_entropy(logits, y)
            else:
                with torch.no_grad():
                    t_logits = teacher(xn)
                loss = mixup_loss(logits, t_logits, y, u=kd_u, temperature=temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler_step == "batch":
                sched.step()
            steps.add("loss", loss, y.shape[0])
            n += y.shape[0]
        if scheduler_step == "epoch":
            sched.step()
        return {"train_loss": steps.sums().get("loss", 0.0) / max(n, 1), "lr": lr_start}

    def eval_epoch(epoch: int) -> dict:
        m = evaluate(model, val, ctx.normalize)
        return {"val_acc": m["acc"], "val_acc3": m["acc3"], "val_acc5": m["acc5"], "val_loss": m["loss"]}

    result = run_epochs(
        ctx,
        stage,
        epochs,
        objects={"model": model, "opt": opt, "sched": sched},
        generators=ckpt.distinct_generators(order=order, local=local),
        best_modules={"model": model},
        train_epoch=train_epoch,
        evaluate=eval_epoch,
        select_key=accuracy_key,
        describe=lambda r: f"loss {r['train_loss']:.3f} val acc {100 * r['val_acc']:.1f}",
    )
    model.load_state_dict(result.best_states["model"])
    return result
