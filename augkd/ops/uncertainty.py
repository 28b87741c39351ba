"""Fused uncertainty scores of a classifier's logits: energy and softmax entropy in one pass
(docs/ops-design.md, section 2). AuG-KD's anchor stage minimises the teacher's energy on anchor-mapped
images and backpropagates it into the anchor network, so both outputs are differentiable."""

from __future__ import annotations

import torch

from . import _checks, _registration, backends, reference

OP = "uncertainty"


def uncertainty(logits: torch.Tensor, *,
                temperature: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(energy, entropy)`` of ``logits`` (..., C)::

        energy  = -T * logsumexp(logits / T)          (Liu et al. 2020; lower = more in-distribution)
        entropy = -sum_c p_c log p_c,  p = softmax(logits / T)   (nats)

    Both have shape (...) and dtype fp32 (fp64 for fp64 logits). A one-element ``temperature`` tensor
    that requires grad gets its gradient (computed by the torch backend).
    """
    _checks.tensor(OP, "logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{OP}: logits must have shape (..., C) with C >= 1, got {tuple(logits.shape)}")
    temperature = _checks.scalar_parameter(OP, "temperature", temperature, _checks.positive_float)
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    backend = "torch" if isinstance(temperature, torch.Tensor) else backends.select(flat.device)
    if backend == "torch":
        energy, entropy = reference.uncertainty(flat, temperature)
    else:
        energy, entropy = _registration.call(backends.namespace(backend), "uncertainty", flat.contiguous(),
                                             temperature)
    return energy.reshape(lead), entropy.reshape(lead)


def energy(logits: torch.Tensor, *, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Per-row energy ``-T * logsumexp(logits / T)``."""
    return uncertainty(logits, temperature=temperature)[0]


def entropy(logits: torch.Tensor, *, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Per-row entropy (nats) of ``softmax(logits / T)``."""
    return uncertainty(logits, temperature=temperature)[1]


def max_softmax(logits: torch.Tensor, *, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Per-row largest class probability of ``softmax(logits / T)`` (1 - this is the MSP uncertainty).

    Built from the fused energy: max_c p_c = exp(max_c z_c / T - lse) = exp((max_c z_c + energy) / T).
    """
    e = energy(logits, temperature=temperature)
    top = logits.amax(dim=-1).to(e.dtype)
    return torch.exp((top + e) / temperature)
