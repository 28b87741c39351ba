"""The switches that change what Module 2 optimises and selects, and how Module 3 weights the teacher
(docs/anchor-diagnostics.md, "Switches"): each term against a float64 computation written out here, the
selection rule on a hand-built history, and the configuration's checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from augkd.cli import help_keys
from augkd.config import ConfigError, RunConfig, build_config
from augkd.method import anchor as anchor_stage
from augkd.method import losses
from augkd.method.evaluation import is_better


def _case(seed, rows=7, classes=5, latent=8):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, classes, generator=g) * 3
    y = torch.randint(0, classes, (rows,), generator=g)
    mask = torch.rand(rows, latent, generator=g) / 3
    return t, y, mask


def _balance64(t):
    p_bar = F.softmax(t.double(), dim=1).mean(0)
    return float((p_bar * torch.log10(p_bar)).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("penalty", ["per_sample", "batch_sum"])
def test_class_energy_and_balance_term_against_float64(seed, penalty):
    t, y, mask = _case(seed)
    w_ce, w_bal, target = 0.1, 3.0, 8 * (1 - 0.25)
    terms = losses.anchor_loss(t, y, mask, invariant=0.25, temperature=1.0, ce_weight=w_ce, penalty=penalty,
                               energy="class", balance_weight=w_bal)
    t64, m64 = t.double(), mask.double()
    energy = -t64[torch.arange(len(y)), y]  # the labelled class's logit, negated
    ce = F.cross_entropy(t64, y, reduction="none")
    if penalty == "per_sample":
        expected = energy.mean() + w_ce * ce.mean() + (m64.sum(1) - target).abs().mean()
    else:
        expected = energy.sum() + w_ce * ce.sum() + (m64.sum() - target).abs()
    expected = float(expected) + w_bal * _balance64(t)
    assert math.isclose(float(terms.total), expected, rel_tol=1e-5, abs_tol=1e-5)
    assert math.isclose(float(terms.energy), float(energy.mean()), rel_tol=1e-6, abs_tol=1e-6)
    assert math.isclose(float(terms.balance), _balance64(t), rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_class_energy_is_free_energy_plus_t_times_ce(temperature):
    """-z_y = -T logsumexp(z/T) + T * CE(softmax(z/T), y): the class energy cannot fall by moving to another
    class, unlike the free energy (the reason for the switch)."""
    t, y, _ = _case(3)
    t64 = t.double()
    free = -temperature * torch.logsumexp(t64 / temperature, dim=1)
    ce_t = F.cross_entropy(t64 / temperature, y, reduction="none")
    got = losses.anchor_energies(t, y, "class", temperature).double()
    torch.testing.assert_close(got, free + temperature * ce_t, rtol=1e-5, atol=1e-5)


def test_class_energy_rewards_the_labelled_class_only():
    """Two images of class 0: the teacher is sure of class 3 on one and of class 0 on the other. The free
    energy ranks them alike (both confident); the class energy prefers the one that keeps the class."""
    y = torch.tensor([0, 0])
    t = torch.tensor([[0.0, 0.0, 0.0, 8.0], [8.0, 0.0, 0.0, 0.0]])
    free = losses.anchor_energies(t, y, "logsumexp", 1.0)
    cls = losses.anchor_energies(t, y, "class", 1.0)
    assert torch.equal(free[0], free[1])
    assert cls[1] < cls[0] - 7.9


def test_balance_term_penalises_a_collapsed_batch_and_its_gradient_spreads_it():
    collapsed = torch.tensor([[5.0, 0, 0, 0], [5.0, 0, 0, 0], [4.0, 1, 0, 0], [5.0, 0, 1, 0]], requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    mask = torch.zeros(4, 2)
    spread = torch.eye(4) * 5
    with_bal = losses.anchor_loss(collapsed, y, mask, balance_weight=2.0)
    without = losses.anchor_loss(collapsed, y, mask)
    assert math.isclose(float((with_bal.total - without.total).detach()), 2.0 * _balance64(collapsed.detach()), rel_tol=1e-5)
    assert float(losses.anchor_loss(spread, y, mask).balance) < float(without.balance.detach())
    # the balance term's gradient lowers the logit of the class that takes the batch (column 0)
    (g,) = torch.autograd.grad(with_bal.balance, collapsed)
    assert (g[:, 0] > 0).all()


def test_default_anchor_loss_is_unchanged_by_the_new_terms():
    """balance_weight = 0 adds nothing (not even a zero): the default loss is the paper's, bit for bit."""
    t, y, mask = _case(4)
    new = losses.anchor_loss(t, y, mask)
    energy = -torch.logsumexp(t, dim=1)
    ce = F.cross_entropy(t, y, reduction="none")
    old = energy.mean() + 0.1 * ce.mean() + (mask.sum(1) - 8 * 0.75).abs().mean()
    assert torch.equal(new.total, old)


def _best(select, rows):
    key, best, best_key = anchor_stage.select_key(select), None, None
    for i, r in enumerate(rows):
        if is_better(key(r), best_key):
            best, best_key = i, key(r)
    return best


def test_selection_by_anchored_accuracy():
    rows = [
        {"val_anchor_loss": -5.0, "anchored_teacher_acc": 0.3},  # lowest loss: a collapsed, confident anchor
        {"val_anchor_loss": -2.0, "anchored_teacher_acc": 0.7},
        {"val_anchor_loss": -3.0, "anchored_teacher_acc": 0.7},  # tie on accuracy: the lower loss wins
        {"val_anchor_loss": -1.0, "anchored_teacher_acc": 0.5},
    ]
    assert _best("loss", rows) == 0
    assert _best("anchored_acc", rows) == 2
    with pytest.raises(ValueError, match="anchor.select"):
        anchor_stage.select_key("best")


@pytest.mark.parametrize("seed", [0, 1])
def test_confidence_weights_and_weighted_distill_loss_against_float64(seed):
    g = torch.Generator().manual_seed(seed)
    t, s = torch.randn(8, 6, generator=g) * 2, torch.randn(8, 6, generator=g) * 2
    y = torch.randint(0, 6, (8,), generator=g)
    w = losses.confidence_weights(t)
    conf = F.softmax(t.double(), 1).max(1).values
    torch.testing.assert_close(w.double(), conf / conf.mean(), rtol=1e-6, atol=1e-6)
    u, temp = 0.3, 10.0
    kl = (F.softmax(t.double() / temp, 1) * (F.log_softmax(t.double() / temp, 1) - F.log_softmax(s.double() / temp, 1))).sum(1)
    expected = (u * F.cross_entropy(s.double(), y, reduction="none") + (1 - u) * temp**2 * w.double() * kl).mean()
    got = losses.distill_loss_weighted(s, t, y, w, u=u, temperature=temp)
    assert math.isclose(float(got), float(expected), rel_tol=1e-5, abs_tol=1e-6)
    # weights of 1 give the unweighted loss; u = 1 leaves only the labels' term
    ones = torch.ones(8)
    assert math.isclose(float(losses.distill_loss_weighted(s, t, y, ones, u=u, temperature=temp)),
                        float(losses.distill_loss(s, t, y, u=u, temperature=temp)), rel_tol=1e-5)
    assert math.isclose(float(losses.distill_loss_weighted(s, t, y, w, u=1.0)), float(F.cross_entropy(s, y)),
                        rel_tol=1e-6)


def test_confidence_weights_favour_rows_where_the_teacher_is_sure():
    t = torch.tensor([[9.0, 0, 0], [0.1, 0, 0], [0.0, 5.0, 0]])
    w = losses.confidence_weights(t)
    assert w[0] > w[2] > 1.0 > w[1]
    assert math.isclose(float(w.mean()), 1.0, rel_tol=1e-6)


def test_switch_defaults_keep_the_paper_objective():
    cfg = RunConfig()
    assert (cfg.anchor.energy, cfg.anchor.balance_weight, cfg.anchor.select) == ("logsumexp", 0.0, "loss")
    assert cfg.mixup.teacher_weighting == "none"


@pytest.mark.parametrize("key,value,expected", [
    ("anchor.energy", "free", "anchor.energy: expected one of 'logsumexp', 'class'"),
    ("anchor.select", "acc", "anchor.select: expected one of 'loss', 'anchored_acc'"),
    ("mixup.teacher_weighting", "entropy", "mixup.teacher_weighting: expected one of 'none', 'confidence'"),
    ("anchor.balance_weight", "-1", "anchor.balance_weight: expected a finite value >= 0"),
    ("anchor.balance_weight", "nan", "anchor.balance_weight: expected a finite value >= 0"),
])
def test_bad_switch_values_are_named(key, value, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        build_config({key: value})


def test_switches_are_set_and_listed():
    cfg = build_config({"anchor.energy": "class", "anchor.balance_weight": "2", "anchor.select": "anchored_acc",
                        "mixup.teacher_weighting": "confidence"})
    assert (cfg.anchor.energy, cfg.anchor.balance_weight, cfg.anchor.select) == ("class", 2.0, "anchored_acc")
    assert cfg.mixup.teacher_weighting == "confidence"
    listed = help_keys().splitlines()
    for key in ("anchor.energy", "anchor.balance_weight", "anchor.select", "mixup.teacher_weighting"):
        assert any(line.startswith(f"{key} = ") for line in listed), key
