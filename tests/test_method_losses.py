"""Each loss against its formula written out again here (augkd/method/losses.py), on small tensors."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from augkd.method import losses


def kl_rows(p_logits, q_logits, t=1.0):
    """KL(softmax(p/t) || softmax(q/t)) per row, written out."""
    p = F.softmax(p_logits / t, dim=1)
    return (p * (F.log_softmax(p_logits / t, dim=1) - F.log_softmax(q_logits / t, dim=1))).sum(1)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 5, generator=g) * 2
    s = torch.randn(6, 5, generator=g) * 2
    y = torch.randint(0, 5, (6,), generator=g)
    return t, s, y


class TinyTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.b1 = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        self.b2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))).flatten(1))


def test_generator_terms_match_formula(logits):
    t, s, _ = logits
    bn = (torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
    run = (torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1.0]))
    terms = losses.generator_loss_terms(t, s, bn, run)
    assert torch.allclose(terms.adversarial, kl_rows(t, s).mean(), atol=1e-6)
    assert torch.allclose(terms.pseudo_ce, F.cross_entropy(t, t.argmax(1)), atol=1e-6)
    p_bar = F.softmax(t, 1).mean(0)
    assert torch.allclose(terms.balance, (p_bar * torch.log10(p_bar)).sum(), atol=1e-6)
    assert torch.allclose(terms.bn, torch.tensor(math.sqrt(5.0) + math.sqrt(9.0 + 9.0)), atol=1e-6)
    total = terms.total(adv_weight=1, pseudo_ce_weight=1, balance_weight=20, bn_weight=1)
    expected = -kl_rows(t, s).mean() + F.cross_entropy(t, t.argmax(1)) + 20 * (p_bar * torch.log10(p_bar)).sum() + terms.bn
    assert torch.allclose(total, expected, atol=1e-5)


def test_balance_term_is_minimal_for_uniform_prediction():
    uniform = torch.zeros(4, 10)
    peaked = torch.zeros(4, 10)
    peaked[:, 0] = 10
    assert losses.class_balance_term(uniform) < losses.class_balance_term(peaked)
    assert torch.allclose(losses.class_balance_term(uniform), torch.tensor(-1.0), atol=1e-6)  # -log10(10)


def test_bn_hook_records_input_statistics_and_is_removed():
    torch.manual_seed(0)
    teacher = TinyTeacher()
    teacher.b1.running_mean.uniform_()
    teacher.b2.running_var.uniform_(0.5, 2)
    teacher.eval()
    hook = losses.BNStatsHook(teacher)
    x = torch.randn(8, 1, 4, 4)
    hook.start()
    teacher(x)
    mean, var = hook.stop()
    # Manual: the inputs of b1 and b2, unbiased variance over (N, H, W).
    a1 = teacher.c1(x)
    a2 = teacher.c2(torch.relu(teacher.b1(a1)))
    v1, m1 = torch.var_mean(a1, dim=[0, 2, 3], unbiased=True)
    v2, m2 = torch.var_mean(a2, dim=[0, 2, 3], unbiased=True)
    assert torch.allclose(mean, torch.cat([m1, m2]), atol=1e-6)
    assert torch.allclose(var, torch.cat([v1, v2]), atol=1e-6)
    rm, rv = hook.running_stats()
    term = losses.bn_stats_term(mean, var, rm, rv)
    manual = torch.linalg.norm(torch.cat([m1, m2]) - rm) + torch.linalg.norm(torch.cat([v1, v2]) - rv)
    assert torch.allclose(term, manual, atol=1e-5)
    # Not recording: nothing is kept; removed: no hooks left on the teacher (B14).
    teacher(x)
    assert hook.stop()[0].numel() == 0
    hook.remove()
    assert all(len(m._forward_hooks) == 0 for m in teacher.modules())


def test_cvae_loss_matches_formula():
    g = torch.Generator().manual_seed(1)
    z_hat, z, mu, logvar = (torch.randn(4, 3, generator=g) for _ in range(4))
    total, mse, kl = losses.cvae_loss(z_hat, z, mu, logvar, kl_weight=0.00025)
    exp_mse = ((z_hat - z) ** 2).sum() / 4
    exp_kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum() / 4
    assert torch.allclose(mse, exp_mse) and torch.allclose(kl, exp_kl)
    assert torch.allclose(total, exp_mse + 0.00025 * exp_kl)


@pytest.mark.parametrize("penalty", ["per_sample", "batch_sum"])
def test_anchor_loss_both_penalty_forms(logits, penalty):
    t, _, y = logits
    mask = torch.rand(6, 8, generator=torch.Generator().manual_seed(2)) / 3
    terms = losses.anchor_loss(t, y, mask, invariant=0.25, temperature=1.0, ce_weight=0.1, penalty=penalty)
    energy = -torch.logsumexp(t, dim=1)
    ce = F.cross_entropy(t, y, reduction="none")
    target = 8 * (1 - 0.25)
    if penalty == "per_sample":
        expected = energy.mean() + 0.1 * ce.mean() + (mask.sum(1) - target).abs().mean()
    else:
        expected = energy.sum() + 0.1 * ce.sum() + (mask.sum() - target).abs()
    assert torch.allclose(terms.total, expected, atol=1e-5)
    assert torch.allclose(terms.mask_mass, mask.sum(1).mean())
    assert torch.allclose(terms.energy, energy.mean(), atol=1e-6)


def test_anchor_energy_temperature(logits):
    t, _, y = logits
    mask = torch.zeros(6, 4)
    terms = losses.anchor_loss(t, y, mask, temperature=2.0, ce_weight=0.0, invariant=1.0)
    assert torch.allclose(terms.energy, (-2.0 * torch.logsumexp(t / 2.0, dim=1)).mean(), atol=1e-6)


@pytest.mark.parametrize("u", [0.0, 0.3, 0.5, 1.0])
def test_distill_loss_matches_the_released_formula(logits, u):
    t, s, y = logits
    loss = losses.distill_loss(s, t, y, u=u, temperature=10.0)
    expected = (u * F.cross_entropy(s, y, reduction="none") + (1 - u) * 100 * kl_rows(t, s, 10.0)).mean()
    assert torch.allclose(loss, expected, atol=1e-5)


def test_distill_loss_with_own_logits_reduces_to_ce(logits):
    """The released B1 behaviour: KL(p || p) = 0, only u * CE is left."""
    _, s, y = logits
    loss = losses.distill_loss(s, s, y, u=0.5, temperature=10.0)
    assert torch.allclose(loss, 0.5 * F.cross_entropy(s, y), atol=1e-5)


def test_student_df_loss_is_kl_at_t1(logits):
    t, s, _ = logits
    assert torch.allclose(losses.student_df_loss(s, t), kl_rows(t, s).mean(), atol=1e-6)


def test_topk_correct():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    y = torch.tensor([1, 0])
    assert losses.topk_correct(logits, y, (1, 3, 5)) == {1: 0, 3: 1, 5: 2}
