"""Module 2's diagnostics: the numbers against hand-built cases and a float64 loop, collapse detected and
reported (a teacher that sees one class everywhere), and the measurement changes nothing in the run."""
import logging
import math

import pytest
import torch
import torch.nn as nn

from augkd import models
from augkd.config import build_config
from augkd.method import anchor_diagnostics as ad
from augkd.method.anchor import run_anchor
from augkd.method.pipeline import build_teacher
from augkd.method.rundir import finish, prepare

TINY = {
    "threads": 1, "plots": False, "df.epochs": 1, "df.iters_per_epoch": 1, "df.batch_size": 8,
    "df.student_steps": 1, "df.val_batches": 1, "anchor.epochs": 2, "mixup.epochs": 2, "data.k_shot": 2,
    "anchor.batch_size": 16,  # several evaluation batches: the noise stream must run across them
}


def _onehot_logits(classes, K, scale=20.0):
    return torch.nn.functional.one_hot(torch.as_tensor(classes), K).float() * scale


def test_collapse_threshold_is_halfway_between_balanced_and_one_class():
    assert ad.collapse_threshold(10) == pytest.approx(0.55)
    assert ad.collapse_threshold(2) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="num_classes"):
        ad.collapse_threshold(1)


def test_one_class_teacher_is_collapsed_and_a_perfect_one_is_not():
    K = 10
    labels = torch.arange(K).repeat(3)  # three samples per class
    perfect = _onehot_logits(labels, K)
    always3 = _onehot_logits([3] * labels.numel(), K)
    mass = torch.full((labels.numel(),), 2.0)
    d = ad.summarize(perfect, always3, labels, mass, K, latent_size=16)
    assert d["collapsed"] is True
    assert d["anchored"]["max_share"] == 1.0 and d["anchored"]["max_share_class"] == 3
    assert d["anchored"]["acc"] == pytest.approx(0.1)
    assert d["anchored"]["per_class"]["acc"] == [0.0] * 3 + [1.0] + [0.0] * 6
    assert d["anchored"]["per_class"]["pred_share"] == [0.0] * 3 + [1.0] + [0.0] * 6
    assert d["decoded"]["acc"] == 1.0 and d["decoded"]["max_share"] == pytest.approx(0.1)
    assert d["acc_gain"] == pytest.approx(-0.9)
    assert d["mask_mass"] == 2.0 and d["mask_mass_per_class"] == [2.0] * K
    assert "COLLAPSED" in ad.collapse_warning(d) and "class 3" in ad.collapse_warning(d)
    assert "COLLAPSED" in ad.headline(d)

    ok = ad.summarize(always3, perfect, labels, mass, K, latent_size=16)
    assert ok["collapsed"] is False and ok["anchored"]["acc"] == 1.0 and ok["acc_gain"] == pytest.approx(0.9)
    assert ad.collapse_warning(ok) is None and "not collapsed" in ad.headline(ok)


def test_just_above_and_at_the_threshold():
    K = 4  # threshold 0.625: 5 of 8 predictions in one class is at it (not collapsed), 6 of 8 above it
    labels = torch.arange(K).repeat(2)
    mass = torch.zeros(8)
    at = _onehot_logits([0, 0, 0, 0, 0, 1, 2, 3], K)
    above = _onehot_logits([0, 0, 0, 0, 0, 0, 2, 3], K)
    assert ad.summarize(at, at, labels, mass, K, 4)["collapsed"] is False
    assert ad.summarize(above, above, labels, mass, K, 4)["collapsed"] is True


def test_numbers_match_a_float64_loop_on_random_logits():
    g = torch.Generator().manual_seed(7)
    K, n = 5, 37
    logits = torch.randn(n, K, generator=g) * 3
    labels = torch.randint(0, K, (n,), generator=g)
    labels[labels == 4] = 0  # class 4 has no samples: its per-class values are NaN
    mass = torch.rand(n, generator=g) * 8
    d = ad.view_stats(logits, labels, K)
    p = torch.softmax(logits.double(), 1)
    pred = [int(p[i].argmax()) for i in range(n)]
    conf = [float(p[i].max()) for i in range(n)]
    assert d["acc"] == pytest.approx(sum(pred[i] == int(labels[i]) for i in range(n)) / n, abs=1e-12)
    assert d["confidence"] == pytest.approx(sum(conf) / n, abs=1e-12)
    for c in range(K):
        idx = [i for i in range(n) if int(labels[i]) == c]
        if not idx:
            assert math.isnan(d["per_class"]["acc"][c]) and math.isnan(d["per_class"]["confidence"][c])
            continue
        assert d["per_class"]["acc"][c] == pytest.approx(sum(pred[i] == c for i in idx) / len(idx), abs=1e-12)
        assert d["per_class"]["confidence"][c] == pytest.approx(sum(conf[i] for i in idx) / len(idx), abs=1e-12)
        assert d["per_class"]["pred_share"][c] == pytest.approx(pred.count(c) / n, abs=1e-12)
    assert d["max_share"] == pytest.approx(max(pred.count(c) for c in range(K)) / n, abs=1e-12)
    s = ad.summarize(logits, logits, labels, mass, K, 8)
    for c in range(4):
        idx = [i for i in range(n) if int(labels[i]) == c]
        assert s["mask_mass_per_class"][c] == pytest.approx(sum(float(mass[i]) for i in idx) / len(idx), abs=1e-6)
    assert s["per_class_images"] == [int((labels == c).sum()) for c in range(K)]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="logits"):
        ad.view_stats(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="labels"):
        ad.view_stats(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="no samples"):
        ad.view_stats(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="mask_mass"):
        ad.summarize(torch.zeros(3, 5), torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), torch.zeros(2), 5, 4)


# ---------------------------------------------------------------------------------------------
# On a run's context, with networks built so that the answer is known


@pytest.fixture
def ctx(tmp_path):
    c = prepare(build_config({**TINY, "device": "cpu"}), str(tmp_path / "run"), quiet=True)
    yield c
    finish(c)


class ClassInLatent(nn.Module):
    """An anchor that writes a class into the first latent dimensions: y itself, or always ``fixed``."""

    def __init__(self, K, fixed=None):
        super().__init__()
        self.K, self.fixed = K, fixed
        self.bn = nn.BatchNorm1d(2)  # a buffer that a train-mode forward would change

    def forward(self, z, y):
        cls = y if self.fixed is None else torch.full_like(y, self.fixed)
        z_a = torch.zeros_like(z)
        z_a[:, : self.K] = torch.nn.functional.one_hot(cls, self.K).to(z.dtype)
        return z_a, torch.ones_like(z)


class LatentImage(nn.Module):
    """G: the latent in the first pixels of an otherwise blank image."""

    def __init__(self, shape):
        super().__init__()
        self.shape = shape

    def forward(self, z):
        x = torch.zeros(z.shape[0], *self.shape, dtype=z.dtype, device=z.device)
        flat = x.view(z.shape[0], -1)
        flat[:, : z.shape[1]] = z
        return x


class FirstPixels(nn.Module):
    """T: the class is the brightest of the first K pixels (normalisation keeps the order)."""

    def __init__(self, K):
        super().__init__()
        self.K = K

    def forward(self, x):
        return x.reshape(x.shape[0], -1)[:, : self.K] * 10


def _capture(log):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    return records


@pytest.mark.parametrize("fixed", [None, 3])
def test_measure_detects_and_reports_a_collapsed_anchor(ctx, fixed):
    K, shape, L = ctx.data.num_classes, tuple(ctx.data.image_shape), ctx.cfg.df.latent_size
    E = models.Encoder(shape, K, L, ctx.cfg.df.encoder_hidden)
    A, G, T = ClassInLatent(K, fixed), LatentImage(shape), FirstPixels(K)
    for m in (E, A):
        m.train()
    d = ad.measure(ctx, T, G, E, A)
    assert E.training and A.training  # modes restored
    n_val = len(ctx.data.student.val)
    assert d["images"] == n_val and sum(d["per_class_images"]) == n_val
    records = _capture(ctx.log)
    ad.report(ctx, d)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    if fixed is None:  # the anchor keeps every class: perfect and balanced
        assert d["anchored"]["acc"] == 1.0 and not d["collapsed"] and not warnings
        assert d["anchored"]["max_share"] == pytest.approx(max(d["per_class_images"]) / n_val)
    else:  # every anchor image shows class 3
        assert d["collapsed"] and d["anchored"]["max_share"] == 1.0 and d["anchored"]["max_share_class"] == 3
        assert d["anchored"]["acc"] == pytest.approx(d["per_class_images"][3] / n_val)
        assert len(warnings) == 1 and "COLLAPSED" in warnings[0] and "class 3" in warnings[0]
    assert d["mask_mass"] == pytest.approx(L)
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert infos[0].startswith("Module 2 anchor diagnostics") and len(infos) == 2 + K  # headline, header, classes


def test_measure_agrees_with_the_stage_and_changes_nothing(ctx, tmp_path):
    """On a trained anchor: the same numbers as the stage's best epoch (same latents), no RNG drawn, no
    weight or BatchNorm statistic or mode changed; the per-class plot is written."""
    torch.manual_seed(0)
    K, shape, L = ctx.data.num_classes, tuple(ctx.data.image_shape), ctx.cfg.df.latent_size
    T = build_teacher(ctx)
    G = models.Generator(L, shape, ctx.cfg.df.generator_hidden)
    E = models.Encoder(shape, K, L, ctx.cfg.df.encoder_hidden)
    A = models.AnchorNet(L, K, mask=ctx.cfg.anchor.mask)
    res = run_anchor(ctx, T, G, E, A)
    best = res.best_row
    nets = {"T": T, "G": G, "E": E, "A": A}
    A.train()  # as a resumed stage might leave it; the measurement must put it back
    before = {k: ({n: v.clone() for n, v in m.state_dict().items()}, [s.training for s in m.modules()]) for k, m in nets.items()}
    rng = torch.get_rng_state()
    d = ad.measure(ctx, T, G, E, A)
    ad.plot_classes(ctx, str(tmp_path / "classes.png"), G, E, A, T)
    assert torch.equal(rng, torch.get_rng_state())
    for k, m in nets.items():
        sd, modes = before[k]
        assert [s.training for s in m.modules()] == modes, k
        for n, v in m.state_dict().items():
            assert torch.equal(v, sd[n]), f"{k}.{n}"
    assert d["anchored"]["acc"] == pytest.approx(best["anchored_teacher_acc"], abs=1e-7)  # float32 mean there
    assert d["decoded"]["acc"] == pytest.approx(best["decoded_teacher_acc"], abs=1e-7)
    assert d["anchored"]["max_share"] == pytest.approx(best["anchored_max_share"], abs=1e-7)
    assert d["mask_mass"] == pytest.approx(best["val_mask_mass"], rel=1e-5)
    assert (tmp_path / "classes.png").is_file()
