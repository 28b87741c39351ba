"""Batch-level transforms on (B, C, H, W) tensors.

Augmentation runs on whole batches already in memory (no per-image PIL pipeline): it is the tensor
equivalent of torchvision's ``RandomCrop(size, padding=pad)`` (+ optional ``RandomHorizontalFlip``) that
the official code applies to student-domain training images.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _check_batch(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a (B, C, H, W) tensor, got {shape}")


def _channel_stats(values, channels: int, x: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=x.dtype, device=x.device).reshape(-1)
    if t.numel() not in (1, channels):
        raise ValueError(f"{name}: expected 1 or {channels} values (one per channel), got {t.numel()}")
    return t.reshape(1, -1, 1, 1)


def normalize(x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Return ``(x - mean_c) / std_c`` per channel; differentiable w.r.t. ``x`` (the generator needs that)."""
    _check_batch(x)
    m = _channel_stats(mean, x.shape[1], x, "mean")
    s = _channel_stats(std, x.shape[1], x, "std")
    if bool((s <= 0).any()):
        raise ValueError(f"std: expected positive values, got {s.flatten().tolist()}")
    return (x - m) / s


def augment(
    x: torch.Tensor,
    *,
    pad: int = 2,
    hflip: bool = False,
    padding_mode: str = "zeros",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Shift every sample by a random offset in [-pad, pad] pixels (pad + random crop), optionally flip.

    ``padding_mode`` is "zeros" (the default, like RandomCrop's fill=0: digits have a black background)
    or "reflect". Horizontal flips are off by default because they change digit identity (2 vs 5 ...).
    The draws use ``generator`` (or the global torch RNG), so the result is reproducible given its state.
    """
    _check_batch(x)
    if not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad: expected a non-negative int, got {pad!r}")
    if padding_mode not in ("zeros", "reflect"):
        raise ValueError(f"padding_mode: expected 'zeros' or 'reflect', got {padding_mode!r}")
    b, _, h, w = x.shape
    if padding_mode == "reflect" and (pad >= h or pad >= w):
        raise ValueError(f"pad: reflect padding needs pad < image size ({h}x{w}), got {pad}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    out = x
    if pad > 0 and b > 0:
        mode = "constant" if padding_mode == "zeros" else "reflect"
        padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
        # Top-left corner of each sample's crop inside the padded image: 0..2*pad inclusive.
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gen_device).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gen_device).to(x.device)
        rows = dy[:, None] + torch.arange(h, device=x.device)[None, :]  # (B, H)
        cols = dx[:, None] + torch.arange(w, device=x.device)[None, :]  # (B, W)
        bidx = torch.arange(b, device=x.device)[:, None, None]
        # Advanced indexing gives (B, H, W, C); move channels back to dim 1.
        out = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        out = out.contiguous()
    if hflip and b > 0:
        flip = torch.rand((b,), generator=generator, device=gen_device).to(x.device) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out
