"""Module 1, Data-Free Learning (paper Sec. 4.1; official ``df_train``).

Without any teacher-domain data, a generator G learns to produce images the teacher finds informative,
a student S is warmed up by distilling the teacher on them, and a conditional encoder E learns to
invert G (image + teacher label -> latent). E is what later places real student-domain images in G's
latent space, where Modules 2 and 3 work.

Per iteration: one G step, then ``student_steps`` steps of S and of E, each on a fresh latent batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .context import Context
from .evaluation import accuracy_key, evaluate
from .loop import LoopResult, run_epochs
from .losses import BNStatsHook, cvae_loss, entropy_nats, generator_loss_terms, student_df_loss
from .schedules import cosine
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


def run_data_free(
    ctx: Context, teacher: nn.Module, generator: nn.Module, encoder: nn.Module, student: nn.Module
) -> LoopResult:
    """Train G, E and S in place; on return they hold the best epoch's weights."""
    cfg = ctx.cfg.df
    seed = ckpt.stage_seed(ctx.cfg.seed, STAGE)
    ckpt.seed_everything(seed)
    # synthetic batches: each process draws its own (DDP averages their gradients)
    noise = ckpt.per_process_generator(ctx.dist, ckpt.make_generator(ctx.device, seed), seed)
    K, L, B = ctx.data.num_classes, cfg.latent_size, cfg.batch_size
    # Fixed validation latents (official: 10*B drawn once after seeding), from their own generator.
    val_z = torch.randn(cfg.val_batches * B, L, generator=ckpt.make_generator(torch.device("cpu"), seed + 1)).to(ctx.device)

    teacher.eval()  # the teacher is never trained and always uses its running BN statistics
    teacher.requires_grad_(False)  # frozen; gradients still flow through it to G
    hooks = BNStatsHook(teacher)
    bn_running = tuple(t.detach() for t in hooks.running_stats())

    # the modules a training step updates, called through DDP with several processes
    generator_ddp, encoder_ddp, student_ddp = (ctx.dist.wrap(m) for m in (generator, encoder, student))
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.g_lr)
    opt_s = torch.optim.Adam(student.parameters(), lr=cfg.s_lr, weight_decay=cfg.s_weight_decay)
    opt_e = torch.optim.Adam(encoder.parameters(), lr=cfg.e_lr)
    sch_g, sch_s, sch_e = cosine(opt_g, cfg.epochs), cosine(opt_s, cfg.epochs), cosine(opt_e, cfg.epochs)
    weights = dict(
        adv_weight=cfg.adv_weight,
        pseudo_ce_weight=cfg.pseudo_ce_weight,
        balance_weight=cfg.balance_weight,
        bn_weight=cfg.bn_weight,
    )

    def generator_step() -> dict[str, torch.Tensor]:
        z = torch.randn(B, L, generator=noise, device=ctx.device)
        x = generator_ddp(z)
        xn = ctx.normalize(x)
        hooks.start()
        t_logits = teacher(xn)
        bn_batch = hooks.stop()
        # S runs in train mode (its BN running stats see the batch, as released) but is not updated here.
        student.requires_grad_(False)
        s_logits = student(xn)
        student.requires_grad_(True)
        terms = generator_loss_terms(t_logits, s_logits, bn_batch, bn_running)
        loss = terms.total(**weights)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        return {
            "g_loss": loss,
            "g_adv_kl": terms.adversarial,
            "g_pseudo_ce": terms.pseudo_ce,
            "g_balance": terms.balance,
            "g_bn": terms.bn,
        }

    def student_encoder_step() -> dict[str, torch.Tensor]:
        z = torch.randn(B, L, generator=noise, device=ctx.device)
        with torch.no_grad():
            x = generator(z)  # train mode: batch statistics, as released
            xn = ctx.normalize(x)
            t_logits = teacher(xn)
        pseudo = t_logits.argmax(1)
        s_logits = student_ddp(xn)
        loss_s = student_df_loss(s_logits, t_logits)
        opt_s.zero_grad(set_to_none=True)
        loss_s.backward()
        opt_s.step()
        # E sees G's raw [0,1] output and the teacher's label, and must recover z.
        z_hat, mu, logvar = encoder_ddp(x, pseudo, return_dist=True, generator=noise)
        loss_e, mse, kl = cvae_loss(z_hat, z, mu, logvar, cfg.cvae_kl_weight)
        opt_e.zero_grad(set_to_none=True)
        loss_e.backward()
        opt_e.step()
        return {"s_kl": loss_s, "e_loss": loss_e, "e_mse": mse, "e_kl": kl}

    def train_epoch(epoch: int) -> dict:
        lr_g, lr_e = opt_g.param_groups[0]["lr"], opt_e.param_groups[0]["lr"]  # this epoch's rates
        generator.train()
        student.train()
        encoder.train()
        steps = StepSums()  # the losses stay tensors; one host read per epoch
        for _ in ctx.bar(range(cfg.iters_per_epoch), desc=f"df {epoch + 1}/{cfg.epochs}"):
            for k, v in generator_step().items():
                steps.add(k, v)
            for _ in range(cfg.student_steps):
                for k, v in student_encoder_step().items():
                    steps.add(k, v)
        sch_g.step()
        sch_s.step()
        if cfg.step_encoder_scheduler:  # B4: the released code never steps E's scheduler
            sch_e.step()
        row = {k: v / steps.counts[k] for k, v in steps.sums().items()}
        row["lr_g"] = lr_g
        row["lr_e"] = lr_e
        return row

    @torch.inference_mode()
    def eval_epoch(epoch: int) -> dict:
        generator.eval()
        encoder.eval()
        student.eval()
        val_noise = ckpt.make_generator(ctx.device, seed + 2)  # same encoder noise every epoch
        g_losses, cvae_losses, all_t = [], [], []
        chunks = val_z.split(B)
        for z in chunks:
            x = generator(z)
            xn = ctx.normalize(x)
            hooks.start()
            t_logits = teacher(xn)
            bn_batch = hooks.stop()
            s_logits = student(xn)
            g_losses.append(generator_loss_terms(t_logits, s_logits, bn_batch, bn_running).total(**weights))
            z_hat, mu, logvar = encoder(x, t_logits.argmax(1), return_dist=True, generator=val_noise)
            cvae_losses.append(cvae_loss(z_hat, z, mu, logvar, cfg.cvae_kl_weight)[0])
            all_t.append(t_logits)
        # one host read; summed in Python in batch order, as adding float(loss) batch by batch does
        values = torch.stack(g_losses + cvae_losses).double().tolist()
        g_values, cvae_values = values[: len(chunks)], values[len(chunks) :]
        row = {"val_g_loss": sum(g_values) / len(chunks), "val_cvae": sum(cvae_values) / len(chunks)}
        row.update(generated_class_balance(torch.cat(all_t), K))
        m = evaluate(student, ctx.data.student.val, ctx.normalize)
        row.update({"val_acc": m["acc"], "val_acc3": m["acc3"], "val_acc5": m["acc5"]})
        generator.train()
        encoder.train()
        student.train()
        return row

    try:
        result = run_epochs(
            ctx,
            STAGE,
            cfg.epochs,
            objects={
                "generator": generator, "encoder": encoder, "student": student,
                "opt_g": opt_g, "opt_s": opt_s, "opt_e": opt_e,
                "sch_g": sch_g, "sch_s": sch_s, "sch_e": sch_e,
            },
            generators={"noise": noise},
            best_modules={"generator": generator, "encoder": encoder, "student": student},
            train_epoch=train_epoch,
            evaluate=eval_epoch,
            select_key=_select_key(cfg.selection),
            describe=lambda r: (
                f"G {r['g_loss']:.3f} S-KL {r['s_kl']:.3f} E {r['e_loss']:.2f} | val G {r['val_g_loss']:.3f} "
                f"CVAE {r['val_cvae']:.2f} | gen classes {r['gen_classes']} max share {r['gen_max_share']:.2f} "
                f"| student val acc {100 * r['val_acc']:.1f}"
            ),
        )
    finally:
        hooks.remove()  # B14: the released code leaves the hooks on for the rest of the run
    generator.load_state_dict(result.best_states["generator"])
    encoder.load_state_dict(result.best_states["encoder"])
    student.load_state_dict(result.best_states["student"])
    return result
