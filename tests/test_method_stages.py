"""The stage code on a tiny context: shapes through G/E/A, the mixed batch, and Module 3's KD target."""
import pytest
import torch

from augkd import models
from augkd.config import build_config
from augkd.method import losses
from augkd.method import mixup as mixup_mod
from augkd.method.anchor import run_anchor
from augkd.method.data_free import run_data_free
from augkd.method.mixup import mixed_batch, run_mixup
from augkd.method.pipeline import build_teacher
from augkd.method.rundir import finish, prepare

TINY = {
    "threads": 1, "plots": False, "df.epochs": 1, "df.iters_per_epoch": 1, "df.batch_size": 8,
    "df.student_steps": 1, "df.val_batches": 1, "anchor.epochs": 1, "mixup.epochs": 2, "data.k_shot": 2,
}


@pytest.fixture
def setup(tmp_path):
    cfg = build_config({**TINY, "device": "cpu"})
    ctx = prepare(cfg, str(tmp_path / "run"), quiet=True)
    torch.manual_seed(0)
    shape = tuple(ctx.data.image_shape)
    K, L = ctx.data.num_classes, cfg.df.latent_size
    T = build_teacher(ctx)
    G = models.Generator(L, shape, cfg.df.generator_hidden)
    E = models.Encoder(shape, K, L, cfg.df.encoder_hidden)
    S = models.build_classifier(cfg.student.arch, K, shape[0], shape[1])
    A = models.AnchorNet(L, K, mask=cfg.anchor.mask)
    yield ctx, T, G, E, S, A
    finish(ctx)


def test_shapes_through_generator_encoder_anchor(setup):
    ctx, T, G, E, S, A = setup
    L = ctx.cfg.df.latent_size
    x, y = ctx.data.student.train.images[:6], ctx.data.student.train.labels[:6]
    z = E(x, y)
    assert z.shape == (6, L)
    z_a, mask = A(z, y)
    assert z_a.shape == (6, L) and mask.shape == (6, L)
    assert float(mask.detach().min()) >= 0 and float(mask.detach().max()) < 1 / 3  # official mask range
    img = G(z_a)
    assert img.shape == x.shape
    assert float(img.detach().min()) >= 0 and float(img.detach().max()) <= 1
    assert T(ctx.normalize(img)).shape == (6, ctx.data.num_classes)


def test_mixed_batch_endpoints(setup):
    ctx, T, G, E, S, A = setup
    for m in (G, E, A):
        m.eval()
    x, y = ctx.data.student.train.images[:5], ctx.data.student.train.labels[:5]
    # f = 1: the mixed sample is the (normalised) real image.
    out = mixed_batch(ctx, x, y, 1.0, E, G, A, torch.Generator().manual_seed(0))
    assert torch.allclose(out, ctx.normalize(x), atol=1e-6)
    # f = 0: the normalised anchor image G(A(E(x), y)), same encoder noise.
    out0 = mixed_batch(ctx, x, y, 0.0, E, G, A, torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = E(x, y, generator=torch.Generator().manual_seed(0))
        expected = ctx.normalize(G(A(z, y)[0]))
    assert torch.allclose(out0, expected, atol=1e-5)
    # Halfway: the pixel and latent mixes both at 0.5.
    out5 = mixed_batch(ctx, x, y, 0.5, E, G, A, torch.Generator().manual_seed(0))
    with torch.no_grad():
        z_a = A(z, y)[0]
        expected = ctx.normalize(0.5 * G(0.5 * z_a + 0.5 * z) + 0.5 * x)
    assert torch.allclose(out5, expected, atol=1e-5)


def test_data_free_and_anchor_stages_run(setup):
    ctx, T, G, E, S, A = setup
    res = run_data_free(ctx, T, G, E, S)
    assert res.best_epoch == 0 and "val_g_loss" in res.best_row and "gen_max_share" in res.best_row
    assert all(len(m._forward_hooks) == 0 for m in T.modules())  # BN hooks removed (B14)
    res = run_anchor(ctx, T, G, E, A)
    row = res.history[-1]
    for key in ("train_energy", "train_mask_mass", "anchored_teacher_acc", "anchored_energy", "anchored_max_share"):
        assert key in row
    # E, G, T frozen; A trained.
    assert not any(p.requires_grad for m in (T, G, E) for p in m.parameters())


def _spy(monkeypatch):
    calls = []
    real = mixup_mod.distill_loss

    def spy(logits, target, labels, *, u, temperature):
        calls.append((logits.detach().clone(), target.detach().clone(), labels.clone(), u))
        return real(logits, target, labels, u=u, temperature=temperature)

    monkeypatch.setattr(mixup_mod, "distill_loss", spy)
    return calls


def test_module3_distils_from_the_teacher(setup, monkeypatch):
    """Fails if the KD target is the student's own logits (the released bug B1)."""
    ctx, T, G, E, S, A = setup
    assert ctx.cfg.mixup.kd_target == "teacher"
    calls = _spy(monkeypatch)
    teacher_outputs = []
    T.register_forward_hook(lambda m, i, o: teacher_outputs.append(o.detach().clone()))
    run_mixup(ctx, T, S, G, E, A.eval())
    assert calls
    for logits, target, labels, u in calls:
        assert any(torch.equal(target, o) for o in teacher_outputs), "KD target is not a teacher output"
        assert not torch.allclose(target, logits), "KD target equals the student's logits"
        # The KD term contributes: the loss is not the CE-only loss u * CE.
        full = losses.distill_loss(logits, target, labels, u=u, temperature=10.0)
        ce_only = u * torch.nn.functional.cross_entropy(logits, labels)
        assert not torch.allclose(full, ce_only)


def test_official_preset_uses_the_student_as_kd_target(setup, monkeypatch):
    """B1 as released: every Module-3 step distils from the student's own logits, so the KD term is 0."""
    ctx, T, G, E, S, A = setup
    ctx.cfg.mixup.kd_target = "student"
    calls = _spy(monkeypatch)
    teacher_outputs = []
    T.register_forward_hook(lambda m, i, o: teacher_outputs.append(o.detach().clone()))
    run_mixup(ctx, T, S, G, E, A.eval())
    assert len(calls) == ctx.cfg.mixup.epochs  # k_shot = 2: one batch per epoch
    for logits, target, labels, u in calls:
        assert torch.allclose(target, logits, atol=1e-6)
        assert not any(o.shape == target.shape and torch.allclose(o, target) for o in teacher_outputs)
        full = losses.distill_loss(logits, target, labels, u=u, temperature=10.0)
        torch.testing.assert_close(full, u * torch.nn.functional.cross_entropy(logits, labels))


@pytest.mark.parametrize("step", ["epoch", "batch"])
def test_module3_warmup_and_schedule_columns(setup, step):
    """ConstantLR warm-up (lr/3 for 5 scheduler steps), stepped per epoch or per batch with three batches
    per epoch; f and u = f per epoch (the tied default)."""
    ctx, T, G, E, S, A = setup
    ctx.cfg.mixup.epochs = 7
    ctx.cfg.mixup.scheduler_step = step
    ctx.cfg.mixup.batch_size = 8  # k_shot = 2 -> 20 images -> batches of 8, 8, 4
    res = run_mixup(ctx, T, S, G, E, A.eval())
    lrs = [r["lr"] for r in res.history]  # the rate each epoch starts with
    lr = ctx.cfg.mixup.lr
    expected = {"epoch": [lr / 3] * 5 + [lr] * 2, "batch": [lr / 3] * 2 + [lr] * 5}[step]
    assert lrs == pytest.approx(expected)
    fs = [r["f"] for r in res.history]
    assert fs[0] == pytest.approx(0.2) and fs[-1] == 1.0
    assert [r["u"] for r in res.history] == fs


def test_data_free_schedulers_b4(setup):
    """E's cosine schedule is stepped by default and frozen at e_lr with the official B4 switch."""
    ctx, T, G, E, S, A = setup
    ctx.cfg.df.epochs = 2
    res = run_data_free(ctx, T, G, E, S)
    assert res.history[1]["lr_e"] < ctx.cfg.df.e_lr
    ctx.cfg.df.step_encoder_scheduler = False
    ctx.resume = False
    res = run_data_free(ctx, T, G, E, S)
    assert res.history[1]["lr_e"] == pytest.approx(ctx.cfg.df.e_lr)
