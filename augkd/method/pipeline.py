"""One run of one method: teacher -> Module 1 -> Module 2 -> Module 3 (or a baseline), in a run directory.

Each stage ends by writing a final artefact (``<stage>_final.pt``: the best weights and the stage's
history). A stage whose final artefact exists is loaded instead of trained, which is how ``--resume``
skips finished stages and how ``augkd compare`` shares the teacher, Module 1 and Module 2 between
methods (their stage directories then point into a cache keyed by the config that stage depends on).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any

import torch.nn as nn

from .. import models
from ..config import ConfigError, RunConfig, section_dict
from ..report import plot_curves, write_csv, write_json
from . import checkpoint as ckpt
from .anchor import run_anchor
from .context import Context
from .data_free import run_data_free
from .evaluation import evaluate
from .mixup import run_mixup
from .supervised import train_supervised
from .visuals import plot_anchor, plot_generated, plot_mixup

CURVES = {
    "teacher": {"loss": ["train_loss", "val_loss"], "accuracy": ["val_acc", "val_acc3"]},
    "finetune": {"loss": ["train_loss", "val_loss"], "accuracy": ["val_acc", "val_acc3"]},
    "df": {
        "generator": ["g_loss", "g_adv_kl", "g_pseudo_ce", "g_bn", "val_g_loss"],
        "student / encoder": ["s_kl", "e_mse", "val_cvae"],
        "diagnostics": ["gen_entropy", "gen_max_share", "val_acc"],
    },
    "anchor": {
        "loss": ["train_loss", "train_energy", "train_ce", "val_anchor_loss"],
        "mask": ["train_mask_mass", "val_mask_mass"],
        "teacher on anchored": ["anchored_teacher_acc", "decoded_teacher_acc", "anchored_max_share"],
    },
    "mixup": {"schedule": ["f", "u", "lr"], "loss": ["train_loss", "val_loss"], "accuracy": ["val_acc", "teacher_acc_mixed"]},
}


# ---------------------------------------------------------------------------------------------
# Stage cache keys (for `augkd compare`)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stage_keys(cfg: RunConfig) -> dict[str, str]:
    """Each shareable stage's key covers exactly the settings its output depends on."""
    d = section_dict(cfg, "data", "teacher", "student", "df", "anchor")
    teacher = _digest({"seed": cfg.seed, "data": d["data"], "teacher": d["teacher"]})
    df = _digest({"teacher": teacher, "student": d["student"], "df": d["df"]})
    anchor = _digest({"df": df, "anchor": d["anchor"]})
    return {"teacher": "teacher-" + teacher, "df": "df-" + df, "anchor": "anchor-" + anchor}


# ---------------------------------------------------------------------------------------------
# Final artefacts


def _final_path(ctx: Context, stage: str) -> str:
    return os.path.join(ctx.stage_dir(stage), f"{stage}_final.pt")


def _save_final(ctx: Context, stage: str, states: dict, result, extra: dict | None = None) -> dict:
    info = {
        "stage": stage,
        "best_epoch": result.best_epoch,
        "best_row": result.best_row,
        "history": result.history,
        "seconds": result.seconds,
        **(extra or {}),
    }
    if ctx.dist.is_main:
        ckpt.atomic_save({"states": states, "info": info}, _final_path(ctx, stage))
    ctx.dist.barrier()  # on disk before any process looks for it
    return info


def _load_final(ctx: Context, stage: str) -> dict | None:
    path = _final_path(ctx, stage)
    if not os.path.isfile(path):
        return None
    ctx.log.info("%s: reusing the finished stage in %s", stage, path)
    return ckpt.load(path, ctx.device)


def _stage_outputs(ctx: Context, stage: str, info: dict) -> None:
    """Metrics CSV and curves of a stage in THIS run directory (also for stages loaded from a cache)."""
    if not ctx.dist.is_main:
        return
    write_csv(os.path.join(ctx.run_dir, "metrics", f"{stage}.csv"), info["history"])
    if ctx.cfg.plots and stage in CURVES:
        plot_curves(os.path.join(ctx.run_dir, "plots", f"{stage}_curves.png"), info["history"], CURVES[stage], stage)


def _stage_summary(info: dict) -> dict:
    return {
        "best_epoch": info["best_epoch"],
        "seconds": info["seconds"],
        "best": info["best_row"],
        "last": info["history"][-1] if info["history"] else {},
    }


def _log_df(ctx: Context, info: dict) -> None:
    r, K = info["best_row"], ctx.data.num_classes
    if not r:
        return
    ctx.log.info(
        "Module 1 best epoch %d: teacher on generated images covers %d/%d classes, entropy of the mean "
        "prediction %.2f (max %.2f), largest class share %.2f; student val acc %.1f%%",
        info["best_epoch"] + 1, r["gen_classes"], K, r["gen_entropy"], math.log(K), r["gen_max_share"], 100 * r["val_acc"],
    )
    if r["gen_classes"] < K or r["gen_max_share"] > 0.5:
        ctx.log.warning("Module 1: the generator is not class-balanced (mode collapse?); see plots/generated.png")


def _log_anchor(ctx: Context, info: dict) -> None:
    r = info["best_row"]
    if not r:
        return
    ctx.log.info(
        "Module 2 best epoch %d: teacher acc on anchor images %.1f%% (on decoded G(E(x)) %.1f%%), mean energy "
        "%.2f (decoded %.2f), largest predicted-class share %.2f, mean per-sample mask mass %.2f of L = %d",
        info["best_epoch"] + 1, 100 * r["anchored_teacher_acc"], 100 * r["decoded_teacher_acc"], r["anchored_energy"],
        r["decoded_energy"], r["anchored_max_share"], r["val_mask_mass"], ctx.cfg.df.latent_size,
    )
    if r["anchored_max_share"] > 0.5:
        ctx.log.warning(
            "Module 2: the teacher's predictions on anchor images collapse onto one class (share %.2f)",
            r["anchored_max_share"],
        )


# ---------------------------------------------------------------------------------------------
# Models


def _build_classifier(ctx: Context, arch: str, pretrained: bool) -> nn.Module:
    c, h, _ = ctx.data.image_shape
    return models.build_classifier(arch, ctx.data.num_classes, c, h, pretrained=pretrained).to(ctx.device)


def build_teacher(ctx: Context) -> nn.Module:
    return _build_classifier(ctx, ctx.cfg.teacher.arch, ctx.cfg.teacher.pretrained)


def load_teacher_file(ctx: Context, path: str) -> nn.Module:
    if not os.path.isfile(path):
        raise ConfigError(f"teacher.path: file not found: {path}")
    teacher = build_teacher(ctx)
    try:
        models.load_state(teacher, path, role="teacher")
    except ValueError as err:  # class-count mismatch, wrong architecture, unreadable file
        raise ConfigError(f"teacher.path: {err}") from None
    return teacher.to(ctx.device)


def teacher_path(ctx: Context) -> str:
    return os.path.join(ctx.stage_dirs.get("teacher", ctx.run_dir), "teacher.pt")


def obtain_teacher(ctx: Context) -> tuple[nn.Module, dict]:
    """The given teacher (teacher.path), a finished one in the stage directory, or a freshly trained one."""
    cfg = ctx.cfg.teacher
    if cfg.path:
        teacher = load_teacher_file(ctx, cfg.path)
        info: dict = {"source": os.path.abspath(cfg.path)}
        side = os.path.join(os.path.dirname(os.path.abspath(cfg.path)), "teacher_info.json")
        if os.path.isfile(side):
            with open(side) as fh:
                info.update(json.load(fh))
    else:
        path = teacher_path(ctx)
        info_path = os.path.join(os.path.dirname(path), "teacher_info.json")
        if os.path.isfile(path) and os.path.isfile(info_path):
            ctx.log.info("teacher: reusing %s", path)
            teacher = load_teacher_file(ctx, path)
            with open(info_path) as fh:
                info = json.load(fh)
        else:
            teacher, info = train_teacher(ctx)
            if ctx.dist.is_main:
                models.save_state(teacher, path)
                write_json(info_path, info)
            ctx.dist.barrier()
        _stage_outputs(ctx, "teacher", info)
    teacher.eval()
    teacher.requires_grad_(False)
    info["student_test"] = evaluate(teacher, ctx.data.student.test, ctx.normalize)
    return teacher, info


def train_teacher(ctx: Context) -> tuple[nn.Module, dict]:
    """Official recipe: Adam, CE, ConstantLR warm-up per batch, no weight decay unless asked (B9)."""
    cfg = ctx.cfg.teacher
    ckpt.seed_everything(ckpt.stage_seed(ctx.cfg.seed, "teacher-init"))
    teacher = build_teacher(ctx)
    dom = ctx.data.teacher
    ctx.log.info("teacher: training %s on %s (%d train / %d val images)", cfg.arch, dom.name, len(dom.train), len(dom.val))
    result = train_supervised(
        ctx, "teacher", teacher, dom.train, dom.val,
        epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
        warmup_steps=5, warmup_factor=1.0 / 3.0, scheduler_step="batch",
    )
    info = {
        "best_epoch": result.best_epoch,
        "best_row": result.best_row,
        "history": result.history,
        "seconds": result.seconds,
        "teacher_test": evaluate(teacher, dom.test, ctx.normalize),
    }
    ctx.log.info(
        "teacher: best epoch %d, val acc %.1f%%, teacher-domain test acc %.1f%%",
        result.best_epoch + 1, 100 * result.best_row.get("val_acc", float("nan")), 100 * info["teacher_test"]["acc"],
    )
    return teacher, info


# ---------------------------------------------------------------------------------------------
# Stages with final artefacts


def stage_data_free(ctx: Context, teacher: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, dict]:
    cfg = ctx.cfg.df
    ckpt.seed_everything(ckpt.stage_seed(ctx.cfg.seed, "df-init"))
    shape = tuple(ctx.data.image_shape)
    G = models.Generator(cfg.latent_size, shape, cfg.generator_hidden).to(ctx.device)
    E = models.Encoder(shape, ctx.data.num_classes, cfg.latent_size, cfg.encoder_hidden).to(ctx.device)
    S = _build_classifier(ctx, ctx.cfg.student.arch, ctx.cfg.student.pretrained)
    final = _load_final(ctx, "df")
    if final is not None:
        G.load_state_dict(final["states"]["generator"])
        E.load_state_dict(final["states"]["encoder"])
        S.load_state_dict(final["states"]["student"])
        info = final["info"]
    else:
        ctx.log.info("Module 1 (data-free): %d epochs x %d iterations, batch %d", cfg.epochs, cfg.iters_per_epoch, cfg.batch_size)
        result = run_data_free(ctx, teacher, G, E, S)
        states = {k: ckpt.cpu_state_dict(m) for k, m in (("generator", G), ("encoder", E), ("student", S))}
        info = _save_final(ctx, "df", states, result)
    _stage_outputs(ctx, "df", info)
    _log_df(ctx, info)
    if ctx.cfg.plots and ctx.dist.is_main:
        plot_generated(ctx, os.path.join(ctx.run_dir, "plots", "generated.png"), G, teacher, cfg.latent_size)
    return G, E, S, info


def stage_anchor(ctx: Context, teacher, G, E) -> tuple[nn.Module, dict]:
    cfg = ctx.cfg.anchor
    ckpt.seed_everything(ckpt.stage_seed(ctx.cfg.seed, "anchor-init"))
    A = models.AnchorNet(ctx.cfg.df.latent_size, ctx.data.num_classes, mask=cfg.mask).to(ctx.device)
    final = _load_final(ctx, "anchor")
    if final is not None:
        A.load_state_dict(final["states"]["anchor"])
        info = final["info"]
    else:
        ctx.log.info("Module 2 (anchor): %d epochs, mask penalty %s", cfg.epochs, cfg.mask_penalty)
        result = run_anchor(ctx, teacher, G, E, A)
        info = _save_final(ctx, "anchor", {"anchor": ckpt.cpu_state_dict(A)}, result)
    A.eval()
    A.requires_grad_(False)
    _stage_outputs(ctx, "anchor", info)
    _log_anchor(ctx, info)
    if ctx.cfg.plots and ctx.dist.is_main:
        plot_anchor(ctx, os.path.join(ctx.run_dir, "plots", "anchor.png"), G, E, A, teacher)
    return A, info


def stage_mixup(ctx: Context, teacher, S, G, E, A) -> dict:
    final = _load_final(ctx, "mixup")
    if final is not None:
        S.load_state_dict(final["states"]["student"])
        info = final["info"]
    else:
        m = ctx.cfg.mixup
        ctx.log.info(
            "Module 3 (mixup): %d epochs, f %s a=%g b=%g, u %s, KD target %s, anchor %s, mixing %s",
            m.epochs, m.schedule, m.a, m.b, m.u_schedule, m.kd_target, A is not None, m.mix_samples,
        )
        result = run_mixup(ctx, teacher, S, G, E, A)
        info = _save_final(ctx, "mixup", {"student": ckpt.cpu_state_dict(S)}, result)
    _stage_outputs(ctx, "mixup", info)
    if ctx.cfg.plots and ctx.dist.is_main:
        plot_mixup(ctx, os.path.join(ctx.run_dir, "plots", "mixup.png"), G, E, A)
    return info


def stage_finetune(ctx: Context, S: nn.Module, teacher: nn.Module | None) -> dict:
    """Baselines: CE (ce, dfkd) or CE + KD (kd) on the labelled student data, Module 3's budget."""
    final = _load_final(ctx, "finetune")
    if final is not None:
        S.load_state_dict(final["states"]["student"])
        info = final["info"]
    else:
        m = ctx.cfg.mixup
        ctx.log.info("fine-tune (%s): %d epochs on %d labelled images", ctx.cfg.method, m.epochs, len(ctx.data.student.train))
        result = train_supervised(
            ctx, "finetune", S, ctx.data.student.train, ctx.data.student.val,
            epochs=m.epochs, lr=m.lr, weight_decay=m.weight_decay, batch_size=m.batch_size,
            warmup_steps=m.warmup_steps, warmup_factor=m.warmup_factor, scheduler_step=m.scheduler_step,
            teacher=teacher, kd_u=ctx.cfg.baseline.kd_u, temperature=m.temperature,
        )
        info = _save_final(ctx, "finetune", {"student": ckpt.cpu_state_dict(S)}, result)
    _stage_outputs(ctx, "finetune", info)
    return info


# ---------------------------------------------------------------------------------------------
# The method


def _check_replicas_agree(ctx: Context, model: nn.Module) -> None:
    """DDP keeps the replicas equal; a difference would mean a process trained on its own. Cheap to
    verify once at the end: compare a checksum of the final student's parameters across processes."""
    sums = ctx.dist.gather([float(p.detach().double().sum()) for p in model.parameters()])
    if any(s != sums[0] for s in sums[1:]):
        raise RuntimeError("data-parallel run: the processes' final students differ; the replicas diverged")


def run_method(ctx: Context) -> dict:
    """Run ``ctx.cfg.method`` end to end; return (and write) the summary with the test metrics."""
    t0 = time.perf_counter()
    cfg = ctx.cfg
    teacher, teacher_info = obtain_teacher(ctx)
    ctx.log.info("teacher accuracy on the student-domain test split: %.1f%%", 100 * teacher_info["student_test"]["acc"])
    stages: dict[str, dict] = {}
    method = cfg.method
    if method in ("ce", "kd"):
        ckpt.seed_everything(ckpt.stage_seed(cfg.seed, "student-init"))
        S = _build_classifier(ctx, cfg.student.arch, cfg.student.pretrained)
        stages["finetune"] = _stage_summary(stage_finetune(ctx, S, teacher if method == "kd" else None))
    else:
        G, E, S, df_info = stage_data_free(ctx, teacher)
        stages["df"] = _stage_summary(df_info)
        df_student = evaluate(S, ctx.data.student.test, ctx.normalize)
        stages["df"]["student_test"] = df_student
        if method == "dfkd":
            stages["finetune"] = _stage_summary(stage_finetune(ctx, S, None))
        else:
            A = None
            if cfg.mixup.use_anchor:
                A, anchor_info = stage_anchor(ctx, teacher, G, E)
                stages["anchor"] = _stage_summary(anchor_info)
            stages["mixup"] = _stage_summary(stage_mixup(ctx, teacher, S, G, E, A))
    test = evaluate(S, ctx.data.student.test, ctx.normalize)
    val = evaluate(S, ctx.data.student.val, ctx.normalize)
    summary = {
        "method": method,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "setting": ctx.data.name,
        "test": test,
        "val": val,
        "teacher": {
            "student_test": teacher_info["student_test"],
            "teacher_test": teacher_info.get("teacher_test"),
            "source": teacher_info.get("source", "trained in this run"),
        },
        "stages": stages,
        "seconds": time.perf_counter() - t0,
        "student_train_images": len(ctx.data.student.train),
        "student_test_images": len(ctx.data.student.test),
    }
    if ctx.dist.enabled:
        _check_replicas_agree(ctx, S)
        summary["processes"] = ctx.dist.world
    if ctx.dist.is_main:
        write_json(os.path.join(ctx.run_dir, "metrics", "summary.json"), summary)
        models.save_state(S, os.path.join(ctx.run_dir, "student.pt"))
    ctx.log.info(
        "%s: student test Acc %.1f%%  Acc@3 %.1f%%  Acc@5 %.1f%%  (teacher on student test %.1f%%)",
        method, 100 * test["acc"], 100 * test["acc3"], 100 * test["acc5"], 100 * teacher_info["student_test"]["acc"],
    )
    return summary
