"""The losses of the three modules, written term by term (each function's docstring gives its formula).

Divergences and energies go through the fused ops of ``augkd.ops``; what is left here is the algebra
around them (weights, reductions, the class-balance and BN-statistics terms, the CVAE and mask terms).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops

# ---------------------------------------------------------------------------------------------
# Module 1: generator


class BNStatsHook:
    """Records, on every teacher BatchNorm2d, the batch mean and unbiased variance of the layer INPUT.

    The generator's "AM" term compares them with the layer's running statistics (DeepInversion-style,
    but as one L2 norm over all layers concatenated, B19). Recording is switched on only around the
    generator's forward pass (``recording``), and the hooks are removed with ``remove()`` when Module 1
    ends: the released code leaves them on for the rest of the run (B14), which only costs time.
    """

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self._means: list[torch.Tensor] = []
        self._vars: list[torch.Tensor] = []
        self.recording = False
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.Module, inputs, output) -> None:
        if not self.recording:
            return
        x = inputs[0]
        var, mean = torch.var_mean(x, dim=[0, 2, 3], unbiased=True)
        self._means.append(mean)
        self._vars.append(var)

    def start(self) -> None:
        self._means, self._vars = [], []
        self.recording = True

    def stop(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stop recording; return the concatenated batch means and variances of this forward pass."""
        self.recording = False
        means, vars_ = self._means, self._vars
        self._means, self._vars = [], []
        if not means:
            empty = torch.zeros(0)
            return empty, empty
        return torch.cat(means), torch.cat(vars_)

    def running_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.layers:
            empty = torch.zeros(0)
            return empty, empty
        return (
            torch.cat([m.running_mean for m in self.layers]),
            torch.cat([m.running_var for m in self.layers]),
        )

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.recording = False


def class_balance_term(teacher_logits: torch.Tensor) -> torch.Tensor:
    """20 * sum_c p_bar_c log10 p_bar_c (without the 20): minus the base-10 entropy of the mean prediction.

    Minimising it spreads the teacher's batch-mean prediction over all classes (DAFL's information
    entropy term), which keeps the generator from producing a single class.
    """
    p_bar = F.softmax(teacher_logits, dim=1).mean(dim=0)
    return (p_bar * torch.log10(p_bar.clamp_min(1e-30))).sum()


def bn_stats_term(batch_mean, batch_var, running_mean, running_var) -> torch.Tensor:
    """||mu_bn - mu_run||_2 + ||var_bn - var_run||_2 over all BN layers concatenated (B19)."""
    if batch_mean.numel() == 0:
        return batch_mean.new_zeros(())
    return torch.linalg.vector_norm(batch_mean - running_mean) + torch.linalg.vector_norm(batch_var - running_var)


@dataclass
class GeneratorLossTerms:
    adversarial: torch.Tensor  # mean_i KL(p_T || p_S); enters the loss with a minus sign
    pseudo_ce: torch.Tensor  # mean_i CE(T(x), argmax T(x))
    balance: torch.Tensor  # sum_c p_bar log10 p_bar
    bn: torch.Tensor  # BN statistics distance

    def total(self, adv_weight=1.0, pseudo_ce_weight=1.0, balance_weight=20.0, bn_weight=1.0) -> torch.Tensor:
        return (
            -adv_weight * self.adversarial
            + pseudo_ce_weight * self.pseudo_ce
            + balance_weight * self.balance
            + bn_weight * self.bn
        )


def generator_loss_terms(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    bn_batch: tuple[torch.Tensor, torch.Tensor],
    bn_running: tuple[torch.Tensor, torch.Tensor],
) -> GeneratorLossTerms:
    """The four terms of L_G on one batch of generated images (released DecoderLoss, KL at t = 1)."""
    adversarial = ops.kd_loss(student_logits, teacher_logits, temperature=1.0, reduction="batchmean")
    pseudo = teacher_logits.argmax(dim=1)
    pseudo_ce = F.cross_entropy(teacher_logits, pseudo)
    balance = class_balance_term(teacher_logits)
    bn = bn_stats_term(bn_batch[0], bn_batch[1], bn_running[0], bn_running[1])
    return GeneratorLossTerms(adversarial, pseudo_ce, balance, bn)


def student_df_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Module 1 student loss: mean_i KL(p_T || p_S) at t = 1."""
    return ops.kd_loss(student_logits, teacher_logits, temperature=1.0, reduction="batchmean")


def cvae_loss(z_hat, z, mu, logvar, kl_weight: float = 0.00025) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, mse, kl): [sum ||z_hat - z||^2 + kl_weight * sum KL(N(mu, e^logvar) || N(0, I))] / B.

    z_hat is the encoder's reparameterised sample (not mu), as in the released CVAELoss.
    """
    b = z.shape[0]
    mse = (z_hat - z).pow(2).sum() / b
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum()) / b
    return mse + kl_weight * kl, mse, kl


# ---------------------------------------------------------------------------------------------
# Module 2: anchor


@dataclass
class AnchorLossTerms:
    total: torch.Tensor
    energy: torch.Tensor  # mean teacher energy on the anchor-decoded images (the kind ``energy`` names)
    ce: torch.Tensor  # mean teacher CE against the true labels
    penalty: torch.Tensor  # the mask term, as it enters ``total``
    mask_mass: torch.Tensor  # mean per-sample mask mass sum_j m_ij
    balance: torch.Tensor  # sum_c p_bar_c log10 p_bar_c of the batch (enters ``total`` times balance_weight)


ANCHOR_ENERGIES = ("logsumexp", "class")


def anchor_energies(teacher_logits: torch.Tensor, labels: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """Per-sample energy of the teacher on anchor images.

    ``logsumexp``: the free energy -T logsumexp(z / T) (paper), lowered by confidence in any class.
    ``class``: the labelled class's energy -z_y, the class-conditional energy whose Boltzmann density
    exp(z_y / T) is the joint p(x, y) of a classifier read as an energy model. It equals the free energy
    plus T * CE(softmax(z / T), y), so it is lowered only by raising the labelled class (no temperature).
    """
    if kind == "logsumexp":
        return ops.energy(teacher_logits, temperature=temperature)
    if kind == "class":
        return -teacher_logits.gather(1, labels.reshape(-1, 1).to(torch.int64)).squeeze(1)
    raise ValueError(f"energy: expected one of {ANCHOR_ENERGIES}, got {kind!r}")


def anchor_loss(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    invariant: float = 0.25,
    temperature: float = 1.0,
    ce_weight: float = 0.1,
    penalty: str = "per_sample",
    energy: str = "logsumexp",
    balance_weight: float = 0.0,
) -> AnchorLossTerms:
    """L_A = energy + ce_weight * CE + mask penalty (+ balance_weight * balance).

    ``per_sample`` (paper-faithful reading): mean_i E_i + w * mean_i CE_i + mean_i |sum_j m_ij - L(1-a)|.
    ``batch_sum`` (released AnchorLoss, B6): sum_i E_i + w * sum_i CE_i + |sum_ij m_ij - L(1-a)|, i.e. the
    energy and CE are SUMMED over the batch and the mask target applies to the whole batch's mask mass.
    E_i is the energy ``energy`` names (``anchor_energies``). The balance term sum_c p_bar_c log10 p_bar_c
    (p_bar: the batch mean of softmax(z)) is one number per batch in either reading; it is added only
    when ``balance_weight`` is not 0, so that the default loss is computed exactly as without it.
    """
    latent = mask.shape[1]
    target_mass = latent * (1.0 - invariant)
    energies = anchor_energies(teacher_logits, labels, energy, temperature)
    ces = F.cross_entropy(teacher_logits, labels, reduction="none")
    per_sample_mass = mask.sum(dim=1)
    if penalty == "per_sample":
        pen = (per_sample_mass - target_mass).abs().mean()
        total = energies.mean() + ce_weight * ces.mean() + pen
    elif penalty == "batch_sum":
        pen = (mask.sum() - target_mass).abs()
        total = energies.sum() + ce_weight * ces.sum() + pen
    else:
        raise ValueError(f"penalty: expected 'per_sample' or 'batch_sum', got {penalty!r}")
    balance = class_balance_term(teacher_logits)
    if balance_weight != 0.0:
        total = total + balance_weight * balance
    return AnchorLossTerms(total, energies.mean(), ces.mean(), pen, per_sample_mass.mean(), balance)


# ---------------------------------------------------------------------------------------------
# Module 3 and the kd baseline


def distill_loss(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    u: float,
    temperature: float = 10.0,
) -> torch.Tensor:
    """Released DistillLoss: mean over rows of u * CE(S, y) + (1 - u) * T^2 * KL(softmax(t/T) || softmax(S/T)).

    Module 3's loss on [real, mixed] batches and the ``kd`` baseline's loss on labelled student data."""
    return ops.kd_loss(
        student_logits, target_logits, labels, temperature=temperature, alpha=1.0 - u, reduction="mean"
    )


def confidence_weights(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-row weights: the teacher's top softmax probability (temperature 1) over its batch mean (mean 1).

    A row where the teacher is unsure of its own answer (an image far from its domain) then counts less
    in the KD term, one where it is sure counts more; the batch's total KD weight is unchanged."""
    conf = F.softmax(teacher_logits.detach().float(), dim=1).amax(dim=1)
    return conf / conf.mean()


def distill_loss_weighted(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    labels: torch.Tensor,
    kd_weight: torch.Tensor,
    *,
    u: float,
    temperature: float = 10.0,
) -> torch.Tensor:
    """mean_i [u * CE(S_i, y_i) + (1 - u) * w_i * T^2 * KL(softmax(t_i/T) || softmax(S_i/T))]: ``distill_loss``
    with a per-row weight w on the KD term only (the labels' term keeps weight 1)."""
    ce = F.cross_entropy(student_logits, labels)
    if u == 1.0:  # the KD term's weight is 0 (as kd_loss leaves out a term of weight 0)
        return u * ce
    kd = ops.kd_loss(student_logits, target_logits, temperature=temperature, sample_weight=kd_weight,
                     reduction="mean")
    return u * ce + (1.0 - u) * kd


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 3, 5)) -> dict[int, int]:
    """Number of rows whose label is among the top-k logits, for each k (k capped at the class count)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top == labels[:, None]
    return {k: int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks}


def entropy_nats(p: torch.Tensor) -> float:
    p = p.clamp_min(1e-30)
    return float(-(p * p.log()).sum())
