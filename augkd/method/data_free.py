"""Module 1, Data-Free Learning (paper Sec. 4.1; official ``df_train``).

Without any teacher-domain data, a generator G learns to produce images the teacher finds informative,
a student S is warmed up by distilling the teacher on them, and a conditional encoder E learns to
invert G (image + teacher label -> latent). E is what later places real student-domain images in G's
latent space, where Modules 2 and 3 work.

Per iteration: one G step, then ``student_steps`` steps of S and of E, each on a fresh latent batch.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from ..config import DataFreeConfig
from . import checkpoint as ckpt
from .context import Context
from .evaluation import accuracy_key, evaluate
from .loop import LoopResult, run_epochs
from .losses import BNStatsHook, cvae_loss, entropy_nats, generator_loss_terms, student_df_loss
from .schedules import adam, cosine
from .side_thread import side_worker
from .step_sums import StepSums

STAGE = "df"


def generated_class_balance(teacher_logits: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Diagnostics of the teacher on generated images: is the generator covering every class?"""
    p_bar = torch.softmax(teacher_logits, dim=1).mean(0)
    pred = teacher_logits.argmax(1)
    counts = torch.bincount(pred, minlength=num_classes).float()
    return {
        "gen_entropy": entropy_nats(p_bar),  # log(K) = perfectly balanced
        "gen_max_share": float(counts.max() / counts.sum()),
        "gen_classes": int((counts > 0).sum()),
    }


def _select_key(mode: str):
    if mode == "official":
        # Lowest val generator loss, then lowest val CVAE loss; the official third key (student metric
        # on the TEST split, B10) is replaced by the student-domain validation split.
        return lambda r: (r["val_g_loss"], r["val_cvae"]) + accuracy_key(r)
    if mode == "student":
        return lambda r: accuracy_key(r) + (r["val_g_loss"],)
    if mode == "last":
        return lambda r: (-r["epoch"],)
    raise ValueError(f"df.selection: unknown mode {mode!r}")


@dataclass
class DataFree:
    """What Module 1's steps work on: the networks (``*_ddp``: called through DDP with several processes),
    their optimisers and schedulers, the teacher's BN-statistics hooks and the random streams."""

    ctx: Context
    cfg: DataFreeConfig
    teacher: nn.Module
    generator: nn.Module
    encoder: nn.Module
    student: nn.Module
    generator_ddp: nn.Module
    encoder_ddp: nn.Module
    student_ddp: nn.Module
    opt_g: torch.optim.Optimizer
    opt_s: torch.optim.Optimizer
    opt_e: torch.optim.Optimizer
    sch_g: torch.optim.lr_scheduler.LRScheduler
    sch_s: torch.optim.lr_scheduler.LRScheduler
    sch_e: torch.optim.lr_scheduler.LRScheduler
    hooks: BNStatsHook
    bn_running: tuple[torch.Tensor, torch.Tensor]
    noise: torch.Generator  # synthetic batches: each process draws its own (DDP averages their gradients)
    val_z: torch.Tensor
    seed: int
    worker: ThreadPoolExecutor | None = None  # runs the encoder steps beside the student's (side_thread)

    @property
    def loss_weights(self) -> dict[str, float]:
        c = self.cfg
        return dict(adv_weight=c.adv_weight, pseudo_ce_weight=c.pseudo_ce_weight,
                    balance_weight=c.balance_weight, bn_weight=c.bn_weight)

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "encoder": self.encoder, "student": self.student}

    def set_mode(self, train: bool) -> None:
        for m in self.modules().values():
            m.train(train)


def setup(ctx: Context, teacher: nn.Module, generator: nn.Module, encoder: nn.Module, student: nn.Module) -> DataFree:
    cfg = ctx.cfg.df
    rnd = ckpt.stage_random(ctx.cfg.seed, STAGE, ctx.device, ctx.dist)
    # Fixed validation latents (official: 10*B drawn once after seeding), from their own generator.
    val_z = torch.randn(cfg.val_batches * cfg.batch_size, cfg.latent_size,
                        generator=ckpt.make_generator(torch.device("cpu"), rnd.seed + 1)).to(ctx.device)
    teacher.eval()  # the teacher is never trained and always uses its running BN statistics
    teacher.requires_grad_(False)  # frozen; gradients still flow through it to G
    hooks = BNStatsHook(teacher)
    wrapped = [ctx.dist.wrap(m) for m in (generator, encoder, student)]
    opt_g = adam(generator.parameters(), cfg.g_lr)
    opt_s = adam(student.parameters(), cfg.s_lr, cfg.s_weight_decay)
    opt_e = adam(encoder.parameters(), cfg.e_lr)
    return DataFree(
        ctx, cfg, teacher, generator, encoder, student, *wrapped, opt_g, opt_s, opt_e, cosine(opt_g, cfg.epochs), cosine(opt_s, cfg.epochs), cosine(opt_e, cfg.epochs),
        hooks, tuple(t.detach() for t in hooks.running_stats()), rnd.local, val_z, rnd.seed, side_worker(ctx, "df-encoder"),
    )


def generator_step(st: DataFree) -> dict[str, torch.Tensor]:
    """One G step: fool the student, please the teacher (pseudo-label CE, class balance, BN statistics)."""
    z = torch.randn(st.cfg.batch_size, st.cfg.latent_size, generator=st.noise, device=st.ctx.device)
    xn = st.ctx.normalize(st.generator_ddp(z))
    st.hooks.start()
    t_logits = st.teacher(xn)
    bn_batch = st.hooks.stop()
    # S runs in train mode (its BN running stats see the batch, as released) but is not updated here.
    st.student.requires_grad_(False)
    s_logits = st.student(xn)
    st.student.requires_grad_(True)
    terms = generator_loss_terms(t_logits, s_logits, bn_batch, st.bn_running)
    loss = terms.total(**st.loss_weights)
    st.opt_g.zero_grad(set_to_none=True)
    loss.backward()
    st.opt_g.step()
    return {"g_loss": loss, "g_adv_kl": terms.adversarial, "g_pseudo_ce": terms.pseudo_ce,
            "g_balance": terms.balance, "g_bn": terms.bn}


def student_encoder_step(st: DataFree) -> list[dict[str, torch.Tensor] | Future]:
    """One S step (distil the teacher on a fresh G batch) and one E step (recover that batch's z): their
    metrics, in that order. With ``st.worker`` (``side_thread``) the E step is handed to it and its
    metrics come as a Future: the training thread goes on with the S step and the next steps while E
    trains. They share no network, optimiser or buffer; E's only random draw is made here, before the
    hand-over, so ``st.noise`` is read in the serial order and every number is the serial one."""
    z = torch.randn(st.cfg.batch_size, st.cfg.latent_size, generator=st.noise, device=st.ctx.device)
    with torch.no_grad():
        x = st.generator(z)  # train mode: batch statistics, as released
        xn = st.ctx.normalize(x)
        t_logits = st.teacher(xn)
    labels = t_logits.argmax(1)
    if st.worker is None:
        return [{**_student_step(st, xn, t_logits), **_encoder_step(st, x, labels, z)}]
    eps = st.encoder.sample_noise(x.shape[0], st.noise, x.dtype, x.device)
    encoder = st.worker.submit(_encoder_step, st, x, labels, z, eps)
    try:
        student = _student_step(st, xn, t_logits)
    except BaseException:
        wait_for([encoder])  # nothing of this step is left running when the error leaves
        raise
    return [student, encoder]


def _student_step(st: DataFree, xn: torch.Tensor, t_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    loss_s = student_df_loss(st.student_ddp(xn), t_logits)
    st.opt_s.zero_grad(set_to_none=True)
    loss_s.backward()
    st.opt_s.step()
    return {"s_kl": loss_s}


def _encoder_step(st: DataFree, x: torch.Tensor, labels: torch.Tensor, z: torch.Tensor,
                  eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    # E sees G's raw [0,1] output and the teacher's label, and must recover z.
    z_hat, mu, logvar = st.encoder_ddp(x, labels, return_dist=True, generator=st.noise, eps=eps)
    loss_e, mse, kl = cvae_loss(z_hat, z, mu, logvar, st.cfg.cvae_kl_weight)
    st.opt_e.zero_grad(set_to_none=True)
    loss_e.backward()
    st.opt_e.step()
    return {"e_loss": loss_e, "e_mse": mse, "e_kl": kl}


def train_epoch(st: DataFree, epoch: int) -> dict:
    cfg = st.cfg
    lr_g, lr_e = st.opt_g.param_groups[0]["lr"], st.opt_e.param_groups[0]["lr"]  # this epoch's rates
    st.set_mode(True)
    results: list[dict[str, torch.Tensor] | Future] = []  # every step's metrics, in the serial order
    try:
        for _ in st.ctx.bar(range(cfg.iters_per_epoch), desc=f"df {epoch + 1}/{cfg.epochs}"):
            results.append(generator_step(st))
            for _ in range(cfg.student_steps):
                results.extend(student_encoder_step(st))
    finally:
        wait_for([r for r in results if isinstance(r, Future)])  # E's last steps, before its scheduler
    steps = StepSums()
    for r in results:
        for k, v in (r.result() if isinstance(r, Future) else r).items():
            steps.add(k, v)
    st.sch_g.step()
    st.sch_s.step()
    if cfg.step_encoder_scheduler:  # B4: the released code never steps E's scheduler
        st.sch_e.step()
    return {**steps.means(), "lr_g": lr_g, "lr_e": lr_e}


@torch.inference_mode()
def eval_epoch(st: DataFree, epoch: int) -> dict:
    """G's loss and E's CVAE loss on the fixed validation latents, the teacher's class balance on G's
    images, and the student's accuracy on the student-domain validation split."""
    st.set_mode(False)
    val_noise = ckpt.make_generator(st.ctx.device, st.seed + 2)  # same encoder noise every epoch
    losses, all_t = StepSums(), []
    for z in st.val_z.split(st.cfg.batch_size):
        x = st.generator(z)
        xn = st.ctx.normalize(x)
        st.hooks.start()
        t_logits = st.teacher(xn)
        bn_batch = st.hooks.stop()
        s_logits = st.student(xn)
        losses.add("val_g_loss", generator_loss_terms(t_logits, s_logits, bn_batch, st.bn_running).total(**st.loss_weights))
        z_hat, mu, logvar = st.encoder(x, t_logits.argmax(1), return_dist=True, generator=val_noise)
        losses.add("val_cvae", cvae_loss(z_hat, z, mu, logvar, st.cfg.cvae_kl_weight)[0])
        all_t.append(t_logits)
    row = losses.means()
    row.update(generated_class_balance(torch.cat(all_t), st.ctx.data.num_classes))
    m = evaluate(st.student, st.ctx.data.student.val, st.ctx.normalize)
    row.update({"val_acc": m["acc"], "val_acc3": m["acc3"], "val_acc5": m["acc5"]})
    st.set_mode(True)
    return row


def describe(r: dict) -> str:
    return (f"G {r['g_loss']:.3f} S-KL {r['s_kl']:.3f} E {r['e_loss']:.2f} | val G {r['val_g_loss']:.3f} "
            f"CVAE {r['val_cvae']:.2f} | gen classes {r['gen_classes']} max share {r['gen_max_share']:.2f} "
            f"| student val acc {100 * r['val_acc']:.1f}")


def run_data_free(
    ctx: Context, teacher: nn.Module, generator: nn.Module, encoder: nn.Module, student: nn.Module
) -> LoopResult:
    """Train G, E and S in place; on return they hold the best epoch's weights."""
    st = setup(ctx, teacher, generator, encoder, student)
    try:
        result = run_epochs(
            ctx, STAGE, st.cfg.epochs,
            objects={**st.modules(), "opt_g": st.opt_g, "opt_s": st.opt_s, "opt_e": st.opt_e,
                     "sch_g": st.sch_g, "sch_s": st.sch_s, "sch_e": st.sch_e},
            generators={"noise": st.noise},
            best_modules=st.modules(),
            train_epoch=partial(train_epoch, st),
            evaluate=partial(eval_epoch, st),
            select_key=_select_key(st.cfg.selection),
            describe=describe,
        )
    finally:
        st.hooks.remove()  # B14: the released code leaves the hooks on for the rest of the run
        if st.worker is not None:
            st.worker.shutdown(wait=True)
    result.load_best(st.modules())
    return result
