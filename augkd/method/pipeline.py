"""One run of one method: teacher -> Module 1 -> Module 2 -> Module 3 (or a baseline), in a run directory.

Each stage ends by writing a final artefact (``<stage>_final.pt``: the best weights and the stage's
history). A stage whose final artefact exists is loaded instead of trained, which is how ``--resume``
skips finished stages and how ``augkd compare`` shares the teacher, Module 1 and Module 2 between
methods (their stage directories then point into a cache keyed by the config that stage depends on).
``restore_or_train`` is the one place this happens: a loaded stage leaves its modules exactly as a
trained one does, and an artefact made under another configuration (its digest differs) is refused.

``METHODS`` (at the end) lists each method's stages; ``run_method`` below it is the whole run.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn as nn

from .. import models
from ..config import ConfigError
from ..errors import CheckpointError, ConfigMismatch
from ..report import plot_curves, read_json, write_csv, write_json
from . import anchor_diagnostics, digests, stage_lock
from . import checkpoint as ckpt
from .anchor import run_anchor
from .context import Context
from .data_free import run_data_free
from .digests import stage_keys  # noqa: F401  (re-exported: the compare cache's directory names)
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
# Stage artefacts: the one place a finished stage enters a run


class FinalArtefact:
    """``<stage>_final.pt``: the stage's weights ("states") and its record ("info"), with the digest of the
    configuration that produced them."""

    def __init__(self, ctx: Context, stage: str):
        self.ctx, self.stage = ctx, stage
        self.path = os.path.join(ctx.stage_dir(stage), f"{stage}_final.pt")

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def read(self) -> tuple[dict, dict]:
        obj = ckpt.load(self.path, self.ctx.device)
        if not (isinstance(obj, dict) and isinstance(obj.get("states"), dict) and isinstance(obj.get("info"), dict)):
            raise CheckpointError(f"{self.path}: not a final stage artefact of this package (no states/info)")
        digests.check(self.stage, self.path, obj["info"].get("config_digest"), self.ctx.digests[self.stage])
        return obj["states"], obj["info"]

    def write(self, states: dict, info: dict) -> None:
        ckpt.atomic_save({"states": states, "info": info}, self.path)


class TeacherArtefact:
    """The trained teacher: ``teacher.pt`` (a plain state_dict, usable as ``--teacher``) and
    ``teacher_info.json`` (its record and configuration digest)."""

    stage = "teacher"

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.path = teacher_path(ctx)
        self.info_path = os.path.join(os.path.dirname(self.path), "teacher_info.json")

    def exists(self) -> bool:
        return os.path.isfile(self.path) and os.path.isfile(self.info_path)

    def read(self) -> tuple[dict, dict]:
        try:
            info = read_json(self.info_path)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{self.info_path}: unreadable ({err})") from None
        if not isinstance(info, dict):
            raise CheckpointError(f"{self.info_path}: expected a JSON object")
        digests.check("teacher", self.info_path, info.get("config_digest"), self.ctx.digests["teacher"])
        try:
            return {"model": _read_teacher_state(self.ctx, self.path)}, info
        except ValueError as err:
            raise CheckpointError(str(err)) from None

    def write(self, states: dict, info: dict) -> None:
        models.save_state(states["model"], self.path)
        write_json(self.info_path, info)


def restore_or_train(
    ctx: Context,
    artefact,
    modules: dict[str, nn.Module],
    train: Callable[[], tuple[dict[str, dict], dict]],
    *,
    frozen: tuple[str, ...] = (),
) -> dict:
    """Load ``artefact`` into ``modules`` when it exists, else ``train()`` (-> states, info) and write it.

    Either way the modules leave in the same state, so a run that loads a stage (resume, ``compare``'s
    cache) continues exactly like one that trained it: those named in ``frozen`` in eval mode without
    parameter gradients, the others in train mode with gradients. A damaged artefact is reported and
    the stage recomputed (from its last per-epoch checkpoint when resuming); one made under another
    configuration is refused.
    """
    # A shared stage (compare's cache) is looked for, trained and written under its lock (stage_lock.py).
    with stage_lock.holding(ctx, artefact.stage):
        info = _restore(ctx, artefact, modules)
        if info is None:
            states, info = train()
            info = {**info, "config_digest": ctx.digests[artefact.stage]}
            if ctx.dist.is_main:
                artefact.write(states, info)
            ctx.dist.barrier()  # on disk before any process looks for it
        for name, m in modules.items():
            if name in frozen:
                m.eval()
                m.requires_grad_(False)
            else:
                m.train()
                m.requires_grad_(True)
        return info


def _restore(ctx: Context, artefact, modules: dict[str, nn.Module]) -> dict | None:
    """The info of ``artefact`` after loading it into ``modules``; None when it is missing or damaged."""
    if not artefact.exists():
        return None
    try:
        states, info = artefact.read()
        _check_fits(artefact.path, states, modules)  # before loading anything: no half-loaded module
    except ConfigMismatch:
        raise
    except CheckpointError as err:
        ctx.log.warning("%s; recomputing the %s stage", err, artefact.stage)
        return None
    for name, m in modules.items():
        m.load_state_dict(states[name])
    ctx.log.info("%s: reusing the finished stage in %s", artefact.stage, artefact.path)
    return info


def _check_fits(path: str, states: dict, modules: dict[str, nn.Module]) -> None:
    for name, m in modules.items():
        sd, own = states.get(name), m.state_dict()
        if not isinstance(sd, dict) or set(sd) != set(own) or any(
            not isinstance(sd[k], torch.Tensor) or sd[k].shape != own[k].shape for k in own
        ):
            raise CheckpointError(f"{path}: the saved {name} does not fit this run's {name} network")


def _result_info(stage: str | None, result, **extra) -> dict:
    """A trained stage's record (the "info" of its final artefact)."""
    return {
        **({"stage": stage} if stage else {}),
        "best_epoch": result.best_epoch,
        "best_row": result.best_row,
        "history": result.history,
        "seconds": result.seconds,
        **extra,
    }


def finished_stage(ctx: Context, artefact, modules: dict[str, nn.Module], train, *, frozen: tuple[str, ...]) -> dict:
    """``restore_or_train`` the stage, then write its metrics CSV and curves into this run directory."""
    info = restore_or_train(ctx, artefact, modules, train, frozen=frozen)
    _stage_outputs(ctx, artefact.stage, info)
    return info


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


# ---------------------------------------------------------------------------------------------
# Models


def _build_classifier(ctx: Context, arch: str, pretrained: bool) -> nn.Module:
    c, h, _ = ctx.data.image_shape
    return ctx.place(models.build_classifier(arch, ctx.data.num_classes, c, h, pretrained=pretrained))


def build_teacher(ctx: Context) -> nn.Module:
    return _build_classifier(ctx, ctx.cfg.teacher.arch, ctx.cfg.teacher.pretrained)


def _read_teacher_state(ctx: Context, path: str) -> dict[str, torch.Tensor]:
    """A teacher file's weights, checked: they fit the architecture and the class count, and are finite.
    Raises ValueError naming the file and the fault."""
    teacher = build_teacher(ctx)
    models.load_state(teacher, path, role="teacher")  # class-count mismatch, wrong architecture, unreadable file
    bad = [k for k, v in teacher.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path}: non-finite (NaN or infinite) values in {', '.join(bad[:8])}"
                         f"{' ...' if len(bad) > 8 else ''}; the teacher diverged or the file is damaged")
    return teacher.state_dict()


def load_teacher_file(ctx: Context, path: str) -> nn.Module:
    if not os.path.isfile(path):
        raise ConfigError(f"teacher.path: file not found: {path}")
    teacher = build_teacher(ctx)
    try:
        teacher.load_state_dict(_read_teacher_state(ctx, path))
    except ValueError as err:
        raise ConfigError(f"teacher.path: {err}") from None
    return ctx.place(teacher)


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
            try:
                info.update({k: v for k, v in read_json(side).items() if k != "config_digest"})
            except (OSError, ValueError, AttributeError) as err:
                ctx.log.warning("%s: unreadable, ignored (%s)", side, err)
        teacher.eval()
        teacher.requires_grad_(False)
    else:
        ckpt.seed_stage(ctx.cfg.seed, "teacher-init")
        teacher = build_teacher(ctx)

        def train() -> tuple[dict, dict]:
            info = train_teacher(ctx, teacher)
            return {"model": ckpt.cpu_state_dict(teacher)}, info

        info = finished_stage(ctx, TeacherArtefact(ctx), {"model": teacher}, train, frozen=("model",))
    info["student_test"] = evaluate(teacher, ctx.data.student.test, ctx.normalize)
    return teacher, info


def train_teacher(ctx: Context, teacher: nn.Module) -> dict:
    """Official recipe: Adam, CE, ConstantLR warm-up per batch, no weight decay unless asked (B9)."""
    cfg = ctx.cfg.teacher
    dom = ctx.data.teacher
    ctx.log.info("teacher: training %s on %s (%d train / %d val images)", cfg.arch, dom.name, len(dom.train), len(dom.val))
    result = train_supervised(
        ctx, "teacher", teacher, dom.train, dom.val,
        epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
        warmup_steps=5, warmup_factor=1.0 / 3.0, scheduler_step="batch",
    )
    info = _result_info(None, result, teacher_test=evaluate(teacher, dom.test, ctx.normalize))
    ctx.log.info(
        "teacher: best epoch %d, val acc %.1f%%, teacher-domain test acc %.1f%%",
        result.best_epoch + 1, 100 * result.best_row.get("val_acc", float("nan")), 100 * info["teacher_test"]["acc"],
    )
    return info


# ---------------------------------------------------------------------------------------------
# Stages with final artefacts. Each takes the networks so far (``Nets``), adds or trains its own, and
# returns {its name in summary.json: its summary} ({} when it records nothing or does not run).


@dataclass
class Nets:
    """The networks of one run, as the stages produce them."""

    teacher: nn.Module
    student: nn.Module | None = None
    generator: nn.Module | None = None
    encoder: nn.Module | None = None
    anchor: nn.Module | None = None  # None: no Module 2 (the no-anchor ablation)


def new_student(ctx: Context, nets: Nets) -> dict:
    """The ce and kd baselines' student: freshly initialised."""
    ckpt.seed_stage(ctx.cfg.seed, "student-init")
    nets.student = _build_classifier(ctx, ctx.cfg.student.arch, ctx.cfg.student.pretrained)
    return {}


def stage_data_free(ctx: Context, nets: Nets) -> dict:
    """Module 1: G, E and the student's warm-up."""
    cfg = ctx.cfg.df
    ckpt.seed_stage(ctx.cfg.seed, "df-init")
    shape = tuple(ctx.data.image_shape)
    G = ctx.place(models.Generator(cfg.latent_size, shape, cfg.generator_hidden))
    E = ctx.place(models.Encoder(shape, ctx.data.num_classes, cfg.latent_size, cfg.encoder_hidden))
    S = _build_classifier(ctx, ctx.cfg.student.arch, ctx.cfg.student.pretrained)
    modules = {"generator": G, "encoder": E, "student": S}

    def train() -> tuple[dict, dict]:
        ctx.log.info("Module 1 (data-free): %d epochs x %d iterations, batch %d", cfg.epochs, cfg.iters_per_epoch, cfg.batch_size)
        result = run_data_free(ctx, nets.teacher, G, E, S)
        return {k: ckpt.cpu_state_dict(m) for k, m in modules.items()}, _result_info("df", result)

    # G and E are only used from here on; the student trains on in Module 3 or the fine-tune.
    info = finished_stage(ctx, FinalArtefact(ctx, "df"), modules, train, frozen=("generator", "encoder"))
    _log_df(ctx, info)
    if ctx.cfg.plots and ctx.dist.is_main:
        plot_generated(ctx, os.path.join(ctx.run_dir, "plots", "generated.png"), G, nets.teacher, cfg.latent_size)
    nets.generator, nets.encoder, nets.student = G, E, S
    return {"df": {**_stage_summary(info), "student_test": evaluate(S, ctx.data.student.test, ctx.normalize)}}


def stage_anchor(ctx: Context, nets: Nets) -> dict:
    """Module 2: the AnchorNet, where Module 3 uses one (mixup.use_anchor)."""
    if not ctx.cfg.mixup.use_anchor:
        return {}
    cfg = ctx.cfg.anchor
    ckpt.seed_stage(ctx.cfg.seed, "anchor-init")
    A = models.AnchorNet(ctx.cfg.df.latent_size, ctx.data.num_classes, mask=cfg.mask).to(ctx.device)
    teacher, G, E = nets.teacher, nets.generator, nets.encoder

    def train() -> tuple[dict, dict]:
        ctx.log.info("Module 2 (anchor): %d epochs, mask penalty %s", cfg.epochs, cfg.mask_penalty)
        result = run_anchor(ctx, teacher, G, E, A)
        return {"anchor": ckpt.cpu_state_dict(A)}, _result_info("anchor", result)

    info = finished_stage(ctx, FinalArtefact(ctx, "anchor"), {"anchor": A}, train, frozen=("anchor",))
    _log_anchor(ctx, info)
    info = {**info, "diagnostics": anchor_diagnostics.measure(ctx, teacher, G, E, A)}  # every run, also a cached stage
    anchor_diagnostics.report(ctx, info["diagnostics"])
    if ctx.cfg.plots and ctx.dist.is_main:
        plot_anchor(ctx, os.path.join(ctx.run_dir, "plots", "anchor.png"), G, E, A, teacher)
        anchor_diagnostics.plot_classes(ctx, os.path.join(ctx.run_dir, "plots", "anchor_classes.png"), G, E, A, teacher)
    nets.anchor = A
    return {"anchor": {**_stage_summary(info), "diagnostics": info["diagnostics"]}}


def stage_mixup(ctx: Context, nets: Nets) -> dict:
    """Module 3: the student learns from real and mixed images."""
    S, G, E, A = nets.student, nets.generator, nets.encoder, nets.anchor

    def train() -> tuple[dict, dict]:
        m = ctx.cfg.mixup
        ctx.log.info(
            "Module 3 (mixup): %d epochs, f %s a=%g b=%g, u %s, KD target %s, anchor %s, mixing %s",
            m.epochs, m.schedule, m.a, m.b, m.u_schedule, m.kd_target, A is not None, m.mix_samples,
        )
        result = run_mixup(ctx, nets.teacher, S, G, E, A)
        return {"student": ckpt.cpu_state_dict(S)}, _result_info("mixup", result)

    info = finished_stage(ctx, FinalArtefact(ctx, "mixup"), {"student": S}, train, frozen=("student",))
    if ctx.cfg.plots and ctx.dist.is_main:
        plot_mixup(ctx, os.path.join(ctx.run_dir, "plots", "mixup.png"), G, E, A)
    return {"mixup": _stage_summary(info)}


def stage_finetune(ctx: Context, nets: Nets, *, distil: bool) -> dict:
    """Baselines: CE (ce, dfkd) or, with ``distil``, CE + KD from the teacher (kd) on the labelled student
    data, with Module 3's budget."""
    S = nets.student

    def train() -> tuple[dict, dict]:
        m = ctx.cfg.mixup
        ctx.log.info("fine-tune (%s): %d epochs on %d labelled images", ctx.cfg.method, m.epochs, len(ctx.data.student.train))
        result = train_supervised(
            ctx, "finetune", S, ctx.data.student.train, ctx.data.student.val,
            epochs=m.epochs, lr=m.lr, weight_decay=m.weight_decay, batch_size=m.batch_size,
            warmup_steps=m.warmup_steps, warmup_factor=m.warmup_factor, scheduler_step=m.scheduler_step,
            teacher=nets.teacher if distil else None, kd_u=ctx.cfg.baseline.kd_u, temperature=m.temperature,
        )
        return {"student": ckpt.cpu_state_dict(S)}, _result_info("finetune", result)

    info = finished_stage(ctx, FinalArtefact(ctx, "finetune"), {"student": S}, train, frozen=("student",))
    return {"finetune": _stage_summary(info)}


# ---------------------------------------------------------------------------------------------
# The method: the teacher, then the method's stages in order (each loads its final artefact when it
# exists, else trains and writes it), then the student's test metrics.

Stage = Callable[[Context, Nets], dict]
AUGKD: tuple[Stage, ...] = (stage_data_free, stage_anchor, stage_mixup)  # Module 2 only where mixup.use_anchor
METHODS: dict[str, tuple[Stage, ...]] = {
    "augkd": AUGKD,
    "official": AUGKD,  # the released code's behaviour (config.PRESET_VALUES["official"])
    "no-anchor": AUGKD,  # mixup.use_anchor = false: no Module 2
    "no-mixup": AUGKD,  # mixup.mix_samples = false
    "dfkd": (stage_data_free, partial(stage_finetune, distil=False)),
    "ce": (new_student, partial(stage_finetune, distil=False)),
    "kd": (new_student, partial(stage_finetune, distil=True)),
}


def run_method(ctx: Context) -> dict:
    """Run ``ctx.cfg.method`` end to end; return (and write) the summary with the test metrics."""
    t0 = time.perf_counter()
    teacher, teacher_info = obtain_teacher(ctx)
    ctx.log.info("teacher accuracy on the student-domain test split: %.1f%%", 100 * teacher_info["student_test"]["acc"])
    nets, stages = Nets(teacher), {}
    for stage in METHODS[ctx.cfg.method]:
        stages.update(stage(ctx, nets))
    return _finish(ctx, nets.student, teacher_info, stages, t0)


def _check_replicas_agree(ctx: Context, model: nn.Module) -> None:
    """DDP keeps the replicas equal; a difference would mean a process trained on its own. Cheap to
    verify once at the end: compare a checksum of the final student's parameters across processes."""
    sums = ctx.dist.gather([float(p.detach().double().sum()) for p in model.parameters()])
    if any(s != sums[0] for s in sums[1:]):
        raise RuntimeError("data-parallel run: the processes' final students differ; the replicas diverged")


def _finish(ctx: Context, S: nn.Module, teacher_info: dict, stages: dict, t0: float) -> dict:
    """The student's test and validation metrics: summary.json, student.pt and the closing log line."""
    cfg = ctx.cfg
    test = evaluate(S, ctx.data.student.test, ctx.normalize)
    val = evaluate(S, ctx.data.student.val, ctx.normalize)
    summary = {
        "method": cfg.method,
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
        cfg.method, 100 * test["acc"], 100 * test["acc3"], 100 * test["acc5"], 100 * teacher_info["student_test"]["acc"],
    )
    return summary
