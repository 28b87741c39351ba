"""Fused anchor-masked mixup in latent and pixel space (docs/ops-design.md, section 3).

AuG-KD mixes latents ``(1 - s) * AnchorNet(z) + s * z`` and images ``(1 - s) * G(z_mix) + s * x`` on every
step of its mixup stage; in torch each is a chain of 3-6 memory-bound ops, here one kernel each way.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from . import _checks, _registration, backends, crossover, reference


def _mix_weight(op: str, s, rows: int, like: torch.Tensor, shapes: str):
    """Split `s` into (tensor or None, python float). A tensor becomes (rows,) in `like`'s dtype;
    a single-element tensor is expanded, so autograd sums its gradient back to its own shape."""
    if isinstance(s, torch.Tensor):
        _checks.tensor(op, "s", s)
        if s.device != like.device:
            raise ValueError(f"{op}: s must be on {like.device}, got {s.device}")
        if s.numel() == 1:
            flat = s.reshape(1).expand(rows)
        elif s.numel() == rows and s.shape[0] == rows:
            flat = s.reshape(rows)
        else:
            raise ValueError(f"{op}: s must be a float or a tensor of shape {shapes} (one value per sample), "
                             f"got shape {tuple(s.shape)}")
        return flat.to(like.dtype).contiguous(), 0.0
    try:
        value = float(s)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: s must be a float or a tensor, got {type(s).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"{op}: s must be finite, got {s!r}")
    return None, value


def _promoted(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two inputs of different floating dtypes (mixed precision, autocast) in their promoted dtype; the
    casts are differentiable, so each gradient comes back in its input's dtype."""
    if a.dtype == b.dtype:
        return a, b
    common = torch.promote_types(a.dtype, b.dtype)
    return a.to(common), b.to(common)


def _checked_pair(op: str, first: str, a, second: str, b, rank: int, shape: str):
    """The two mixed inputs: tensors, `first` of `rank` dimensions (`shape` in words), `second` of the same
    shape and device; returned in their promoted dtype."""
    _checks.tensor(op, first, a)
    _checks.tensor(op, second, b)
    if a.dim() != rank:
        raise ValueError(f"{op}: {first} must have shape {shape}, got {tuple(a.shape)}")
    _checks.same(op, second, b, first, a, dtype=False)
    return _promoted(a, b)


def latent_mixup(z: torch.Tensor, mask: torch.Tensor, psi: torch.Tensor, s) -> torch.Tensor:
    """``(1 - s) * (mask * psi + (1 - mask) * z) + s * z`` in one kernel.

    Args:
        z: (B, L) latents (the encoder's output).
        mask: (B, L) or (1, L) anchor mask (AnchorNet's m); a (1, L) mask gets its gradient summed over B.
        psi: (B, L) the anchor mapping psi(m * z). A dtype other than z's is promoted with it (so is the
            output's dtype); each gradient comes back in its input's dtype.
        s: mixup factor: a float, or per-sample (B, 1) / (B,) tensor. s = 0 gives the anchor output, s = 1 z.
    """
    op = "latent_mixup"
    _checks.tensor(op, "mask", mask)
    z, psi = _checked_pair(op, "z", z, "psi", psi, 2, "(B, L)")
    rows, width = z.shape
    if mask.device != z.device:
        raise ValueError(f"{op}: mask must be on {z.device}, got {mask.device}")
    if mask.dim() != 2 or mask.shape[1] != width or mask.shape[0] not in (1, rows):
        raise ValueError(f"{op}: mask must have shape ({rows}, {width}) or (1, {width}), got {tuple(mask.shape)}")
    s_tensor, s_scalar = _mix_weight(op, s, rows, z, f"({rows}, 1) or ({rows},)")
    backend = crossover.cheaper_backend(op, z.shape, backends.select(z.device))
    if backend == "torch":
        return reference.latent_mixup(z, mask.to(z.dtype), psi, s_tensor.unsqueeze(1) if s_tensor is not None
                                      else s_scalar)
    return _registration.call(backends.namespace(backend), "latent_mixup", z.contiguous(),
                              mask.to(z.dtype).contiguous(), psi.contiguous(), s_tensor, s_scalar)


def anchor_mix(z: torch.Tensor, mask: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """AnchorNet's output ``mask * psi + (1 - mask) * z`` (latent_mixup with s = 0)."""
    return latent_mixup(z, mask, psi, 0.0)


def _channel_vector(op: str, name: str, value, channels: int, like: torch.Tensor):
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.tensor([float(v) for v in value], dtype=torch.float32)
        except TypeError:
            raise TypeError(f"{op}: {name} must be a sequence of floats or a tensor, "
                            f"got {type(value).__name__}") from None
    if value.numel() != channels:
        raise ValueError(f"{op}: {name} must have one value per channel ({channels}), got {value.numel()}")
    return value.to(device=like.device).reshape(channels)


def pixel_mixup(generated: torch.Tensor, real: torch.Tensor, s, mean: Sequence[float] | torch.Tensor | None = None,
                std: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """``normalize((1 - s) * generated + s * real)`` per channel in one kernel.

    Args:
        generated, real: (B, C, H, W) images (same shape and device; different floating dtypes are
            promoted, and so is the output's dtype).
        s: a float, or per-sample (B, 1, 1, 1) / (B,) tensor.
        mean, std: per-channel normalisation (C values each) or None (0 and 1).
    """
    op = "pixel_mixup"
    generated, real = _checked_pair(op, "generated", generated, "real", real, 4, "(B, C, H, W)")
    rows, channels = generated.shape[:2]
    mean_t = _channel_vector(op, "mean", mean, channels, generated)
    std_t = _channel_vector(op, "std", std, channels, generated)
    if std_t is not None and _checks.eager() and std_t.device.type == "cpu" and bool((std_t == 0).any()):
        raise ValueError(f"{op}: std must be non-zero in every channel, got {std_t.tolist()}")
    s_tensor, s_scalar = _mix_weight(op, s, rows, generated, f"({rows}, 1, 1, 1) or ({rows},)")
    differentiable_stats = any(t is not None and t.requires_grad for t in (mean_t, std_t))
    backend = "torch" if differentiable_stats else backends.select(generated.device)
    if backend == "torch":
        s_arg = s_tensor.view(rows, 1, 1, 1) if s_tensor is not None else s_scalar
        return reference.pixel_mixup(generated, real, s_arg, mean_t, std_t)
    mean_f = None if mean_t is None else mean_t.to(torch.float32).contiguous()
    std_f = None if std_t is None else std_t.to(torch.float32).contiguous()
    return _registration.call(backends.namespace(backend), "pixel_mixup", generated.contiguous(),
                              real.contiguous(), s_tensor, s_scalar, mean_f, std_f)
