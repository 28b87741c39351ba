"""Benchmark cases shared by the pytest-benchmark suite and the report script.

Each case builds its inputs once and offers one forward+backward callable per provider:
  eager    the formula as a torch user writes it
  compile  torch.compile of that same formula (compile time excluded by warm-up)
  augkd    the fused op (auto backend: C++ on CPU tensors, Triton/CUDA on GPU tensors)
  liger    Liger-Kernel: its KL path on GPU (KD loss); LigerFusedLinearJSDLoss (chunked, torch.compile'd, CPU
           and GPU) for the fused linear KD; rows appear when liger_kernel imports
  augkd-nostream  the fused mixups with the CPU kernels' streaming stores off (CPU mixups only)
  augkd-dense     top-k KD: the dense teacher materialised, then the fused kd_loss
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import augkd.ops as ops

T_KD, ALPHA = 4.0, 0.5


@dataclass
class Case:
    op: str
    shape: tuple
    build: Callable[[torch.device, torch.dtype], dict]  # -> {"inputs": ..., "leaves": [...], "grad": ...}
    formulas: dict[str, Callable]                        # provider -> fn(**inputs) -> output
    buffer_elems: int                                     # elements of one "B x C" buffer, the memory unit

    @property
    def name(self) -> str:
        return f"{self.op}{self.shape}"


# ---------------------------------------------------------------- formulas, as users write them

def kd_eager(s, t, y):
    kl = F.kl_div(F.log_softmax(s / T_KD, -1), F.log_softmax(t / T_KD, -1), reduction="batchmean",
                  log_target=True) * T_KD * T_KD
    return ALPHA * kl + (1 - ALPHA) * F.cross_entropy(s, y)


def kd_augkd(s, t, y):
    return ops.kd_loss(s, t, y, temperature=T_KD, alpha=ALPHA, reduction="batchmean")


def kd_liger(s, t, y):
    from liger_kernel.transformers.functional import liger_kl_div  # imported only when benchmarked

    kl = liger_kl_div(F.log_softmax(s / T_KD, -1), F.log_softmax(t / T_KD, -1), log_target=True,
                      reduction="batchmean") * T_KD * T_KD
    return ALPHA * kl + (1 - ALPHA) * F.cross_entropy(s, y)


def unc_eager(z):
    u = z / 1.0
    log_p = F.log_softmax(u, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    energy = -torch.logsumexp(u, -1)
    return energy.sum() + entropy.sum()


def unc_augkd(z):
    energy, entropy = ops.uncertainty(z)
    return energy.sum() + entropy.sum()


def latent_eager(z, m, psi, s):
    return (1 - s) * (m * psi + (1 - m) * z) + s * z


def latent_augkd(z, m, psi, s):
    return ops.latent_mixup(z, m, psi, s)


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def pixel_eager(g, r, s, mean, std):
    return ((1 - s) * g + s * r - mean) / std


def pixel_augkd(g, r, s, mean, std):
    return ops.pixel_mixup(g, r, s, mean=MEAN, std=STD)


# The CPU mixup kernels pick streaming stores per call (AUGKD_CPU_STREAMING_STORES, read at each call).
# "augkd-nostream" shows what they gain: the env var is set when its forward runs and stays set through
# that step's backward; "augkd" puts back the value the benchmark was started with.
_STREAMING_ENV = "AUGKD_CPU_STREAMING_STORES"
_STREAMING_AT_START = os.environ.get(_STREAMING_ENV)


def _set_streaming(value):
    if value is None:
        os.environ.pop(_STREAMING_ENV, None)
    else:
        os.environ[_STREAMING_ENV] = value


def _streaming(formula, value):
    def run(*args, **kwargs):
        _set_streaming(value)
        return formula(*args, **kwargs)
    return run


def _mixup_providers(eager, fused, gpu):
    if gpu:
        return _with_compile(eager, fused)
    return _with_compile(eager, _streaming(fused, _STREAMING_AT_START),
                         {"augkd-nostream": _streaming(fused, "0")})


def _with_compile(eager, fused, extra=None):
    providers = {"eager": eager, "compile": torch.compile(eager, dynamic=False), "augkd": fused}
    providers.update(extra or {})
    return providers


# ---------------------------------------------------------------- input builders

def _kd_inputs(rows, classes):
    def build(device, dtype):
        s = torch.randn(rows, classes, device=device, dtype=dtype).mul_(3).requires_grad_()
        t = torch.randn(rows, classes, device=device, dtype=dtype).mul_(3)
        y = torch.randint(0, classes, (rows,), device=device)
        return {"inputs": {"s": s, "t": t, "y": y}, "leaves": [s], "grad": None}
    return build


def _unc_inputs(rows, classes):
    def build(device, dtype):
        z = torch.randn(rows, classes, device=device, dtype=dtype).mul_(3).requires_grad_()
        return {"inputs": {"z": z}, "leaves": [z], "grad": None}
    return build


def _latent_inputs(rows, width):
    def build(device, dtype):
        z, psi = (torch.randn(rows, width, device=device, dtype=dtype).requires_grad_() for _ in range(2))
        m = torch.rand(rows, width, device=device, dtype=dtype).requires_grad_()
        grad = torch.randn(rows, width, device=device, dtype=dtype)
        return {"inputs": {"z": z, "m": m, "psi": psi, "s": 0.3}, "leaves": [z, m, psi], "grad": grad}
    return build


def _pixel_inputs(shape):
    def build(device, dtype):
        g = torch.rand(shape, device=device, dtype=dtype).requires_grad_()
        r = torch.rand(shape, device=device, dtype=dtype)
        mean = torch.tensor(MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=device, dtype=dtype).view(1, 3, 1, 1)
        grad = torch.randn(shape, device=device, dtype=dtype)
        return {"inputs": {"g": g, "r": r, "s": 0.3, "mean": mean, "std": std}, "leaves": [g], "grad": grad}
    return build


# ---------------------------------------------------------------- language-model scale (LLM distillation)

T_LM, ALPHA_LM = 2.0, 0.5


def flkd_eager(xs, ws, xt, wt, y):
    """Both heads, then the KD formula on the N x V logits (what fused_linear_kd_loss avoids holding)."""
    s = xs @ ws.t()
    with torch.no_grad():
        t = xt @ wt.t()
    return kd_eager_at(s, t, y, T_LM, ALPHA_LM)


def kd_eager_at(s, t, y, temperature, alpha):
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), reduction="batchmean",
                  log_target=True) * temperature * temperature
    return alpha * kl + (1 - alpha) * F.cross_entropy(s, y)


def flkd_augkd(xs, ws, xt, wt, y):
    return ops.fused_linear_kd_loss(xs, ws, xt, wt, y, temperature=T_LM, alpha=ALPHA_LM, reduction="batchmean")


_liger_losses: dict = {}


def flkd_liger(xs, ws, xt, wt, y):
    """Liger-Kernel's chunked fused linear JSD at beta = 0 (its forward KL), same T and hard/soft weights (it has
    no T^2 factor: the soft weight carries it)."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # imported only when benchmarked

    if "jsd" not in _liger_losses:
        _liger_losses["jsd"] = LigerFusedLinearJSDLoss(weight_hard_loss=1 - ALPHA_LM,
                                                       weight_soft_loss=ALPHA_LM * T_LM * T_LM, beta=0.0,
                                                       temperature=T_LM)
    return _liger_losses["jsd"](xs, ws, xt, wt, y)


def _flkd_inputs(rows, hidden, vocab):
    def build(device, dtype):
        gen = torch.Generator(device="cpu").manual_seed(0)
        xs = torch.randn(rows, hidden, generator=gen).to(device, dtype).requires_grad_()
        ws = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(device, dtype).requires_grad_()
        xt = torch.randn(rows, hidden, generator=gen).to(device, dtype)
        wt = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(device, dtype)
        y = torch.randint(0, vocab, (rows,), generator=gen).to(device)
        return {"inputs": {"xs": xs, "ws": ws, "xt": xt, "wt": wt, "y": y}, "leaves": [xs, ws], "grad": None}
    return build


TOPK = 64
FILL = torch.finfo(torch.float32).min  # dense teacher off its k entries: probability 0, no inf - inf in formulas


def _dense_teacher(s, idx, val):
    return torch.full_like(s, FILL, requires_grad=False).scatter_(-1, idx, val)


def topk_eager(s, idx, val, y):
    return kd_eager_at(s, _dense_teacher(s, idx, val), y, T_LM, ALPHA_LM)


def topk_dense_augkd(s, idx, val, y):
    return ops.kd_loss(s, _dense_teacher(s, idx, val), y, temperature=T_LM, alpha=ALPHA_LM, reduction="batchmean")


def topk_augkd(s, idx, val, y):
    return ops.topk_kd_loss(s, idx, val, y, values="logits", temperature=T_LM, alpha=ALPHA_LM, reduction="batchmean")


def _topk_inputs(rows, vocab):
    def build(device, dtype):
        gen = torch.Generator(device="cpu").manual_seed(0)
        s = (torch.randn(rows, vocab, generator=gen) * 3).to(device, dtype).requires_grad_()
        t = torch.randn(rows, vocab, generator=gen) * 3
        top = t.topk(TOPK, -1)
        y = torch.randint(0, vocab, (rows,), generator=gen).to(device)
        return {"inputs": {"s": s, "idx": top.indices.to(device), "val": top.values.to(device, dtype), "y": y},
                "leaves": [s], "grad": None}
    return build


def llm_cases(*, gpu: bool = False) -> list[Case]:
    cases = []
    for rows, hidden, vocab in [(2048, 512, 32000), (512, 256, 128256)]:
        providers = _with_compile(flkd_eager, flkd_augkd, {"liger": flkd_liger})
        cases.append(Case("fused_linear_kd", (rows, hidden, vocab), _flkd_inputs(rows, hidden, vocab), providers,
                          rows * vocab))
    # a vocabulary so large that fused_linear_kd_loss sweeps vocabulary blocks on CPU (128 rows of fp32 logits
    # exceed twice its 32 MiB budget); two N show its peak memory independent of N
    for rows, hidden, vocab in [(256, 256, 262144), (512, 256, 262144)]:
        providers = _with_compile(flkd_eager, flkd_augkd, {"liger": flkd_liger})
        cases.append(Case("fused_linear_kd-vocab", (rows, hidden, vocab), _flkd_inputs(rows, hidden, vocab),
                          providers, rows * vocab))
    rows, vocab = (4096 if gpu else 512), 128256
    cases.append(Case("topk_kd_loss", (rows, vocab, TOPK), _topk_inputs(rows, vocab),
                      _with_compile(topk_eager, topk_augkd, {"augkd-dense": topk_dense_augkd}), rows * vocab))
    return cases


# ---------------------------------------------------------------- the divergence family of kd_loss

def _soft_hard(soft, s, y):
    return ALPHA * soft * T_KD * T_KD + (1 - ALPHA) * F.cross_entropy(s, y)


def reverse_kl_eager(s, t, y):
    log_q, log_p = F.log_softmax(s / T_KD, -1), F.log_softmax(t / T_KD, -1)
    return _soft_hard(F.kl_div(log_p, log_q, reduction="batchmean", log_target=True), s, y)


def jsd_eager(s, t, y, beta=0.5):
    log_q, log_p = F.log_softmax(s / T_KD, -1), F.log_softmax(t / T_KD, -1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), 0)
    jsd = (beta * F.kl_div(log_m, log_p, reduction="batchmean", log_target=True)
           + (1 - beta) * F.kl_div(log_m, log_q, reduction="batchmean", log_target=True))
    return _soft_hard(jsd, s, y)


def tvd_eager(s, t, y):
    p, q = F.softmax(t / T_KD, -1), F.softmax(s / T_KD, -1)
    return _soft_hard(0.5 * (p - q).abs().sum(-1).mean(), s, y)


def _divergence_augkd(divergence):
    def run(s, t, y):
        return ops.kd_loss(s, t, y, temperature=T_KD, alpha=ALPHA, divergence=divergence, reduction="batchmean")
    return run


DIVERGENCE_EAGER = {"reverse_kl": reverse_kl_eager, "jsd": jsd_eager, "tvd": tvd_eager}


def divergence_cases() -> list[Case]:
    """kd_loss with divergence="reverse_kl" / "jsd" / "tvd" (op name kd_loss-<divergence>) against the plain
    formulas, eager and compiled (the "kl" case is kd_loss itself)."""
    return [Case(f"kd_loss-{name}", shape, _kd_inputs(*shape), _with_compile(eager, _divergence_augkd(name)),
                 shape[0] * shape[1])
            for name, eager in DIVERGENCE_EAGER.items() for shape in [(4096, 1000), (512, 32000)]]


def all_cases(*, gpu: bool = False) -> list[Case]:
    kd_extra = {"liger": kd_liger} if gpu else None
    kd_shapes = [(4096, 1000), (512, 32000), (64, 31), (16, 131072)]
    cases = [Case("kd_loss", shape, _kd_inputs(*shape), _with_compile(kd_eager, kd_augkd, kd_extra),
                  shape[0] * shape[1]) for shape in kd_shapes]
    cases += [Case("uncertainty", shape, _unc_inputs(*shape), _with_compile(unc_eager, unc_augkd),
                   shape[0] * shape[1]) for shape in [(4096, 1000), (512, 32000)]]
    cases += [Case("latent_mixup", shape, _latent_inputs(*shape), _mixup_providers(latent_eager, latent_augkd, gpu),
                   shape[0] * shape[1]) for shape in [(4096, 256), (65536, 100)]]
    shape = (2048, 3, 32, 32)
    cases.append(Case("pixel_mixup", shape, _pixel_inputs(shape), _mixup_providers(pixel_eager, pixel_augkd, gpu),
                      2048 * 3 * 32 * 32))
    return cases + divergence_cases() + llm_cases(gpu=gpu)


def step(case_inputs: dict, formula: Callable) -> None:
    """One forward+backward; gradients are reset to None first so every step allocates them afresh."""
    for leaf in case_inputs["leaves"]:
        leaf.grad = None
    out = formula(**case_inputs["inputs"])
    if case_inputs["grad"] is None:
        out.backward()
    else:
        out.backward(case_inputs["grad"])
