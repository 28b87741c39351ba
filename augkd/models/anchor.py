"""Module 2 network: AnchorNet A(z, y) -> (z_a, mask).

A class-specific mask m(y) picks the latent dimensions to change ("domain-specific"); a small 1-D conv
net psi maps the masked latent towards the teacher domain; the other dimensions keep z:

    z_a = m * psi(m * z) + (1 - m) * z
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops import anchor_mix
from .generator import _check_positive, labels_to_onehot

MASK_MODES = ("official", "sigmoid")


class AnchorNet(nn.Module):
    """AnchorNet with the official mask squashing or a plain-sigmoid variant.

    mask="official": Linear x3 -> BatchNorm1d -> Sigmoid -> (- 0.5) -> Softsign -> ReLU, so m lies in
    [0, 1/3): a per-sample mask mass of L * (1 - invariant) (75% of dimensions at invariant = 0.25) is
    unreachable (bug B6). mask="sigmoid": Linear x3 -> BatchNorm1d -> Sigmoid, m in (0, 1): a
    paper-faithful alternative whose mass target is reachable.
    In train mode BatchNorm1d makes m depend on the batch's class mix; in eval mode m depends on y only.
    """

    def __init__(self, latent_size: int, num_classes: int, mask: str = "official"):
        super().__init__()
        self.latent_size = _check_positive("latent_size", latent_size)
        self.num_classes = _check_positive("num_classes", num_classes)
        if mask not in MASK_MODES:
            raise ValueError(f"mask: expected one of {MASK_MODES}, got {mask!r}")
        L = latent_size
        self.embed = nn.Linear(num_classes, L)
        squash: list[nn.Module] = [nn.Sigmoid()]
        if mask == "official":
            squash += [_Shift(-0.5), nn.Softsign(), nn.ReLU()]
        # No nonlinearity between the three Linear layers (as in the official code).
        self.mask_head = nn.Sequential(nn.Linear(L, L), nn.Linear(L, L), nn.Linear(L, L), nn.BatchNorm1d(L), *squash)
        self.psi_convs = nn.Sequential(
            nn.Conv1d(1, 4, 3, 1, 1), nn.BatchNorm1d(4), nn.LeakyReLU(0.01),
            nn.Conv1d(4, 8, 3, 1, 1), nn.BatchNorm1d(8), nn.LeakyReLU(0.01),
            nn.Conv1d(8, 4, 3, 1, 1), nn.BatchNorm1d(4), nn.LeakyReLU(0.01),
        )
        self.psi_out = nn.Linear(4 * L, L)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Official init: U(-0.08, 0.08) on Linear weights, zero biases. The Conv1d layers keep PyTorch's
        # default init: the official init loop only matched Conv2d.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -0.08, 0.08)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def mask(self, y: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The class-specific mask m(y), (B, L)."""
        return self.mask_head(self.embed(labels_to_onehot(y, self.num_classes, dtype)))

    def psi(self, v: torch.Tensor) -> torch.Tensor:
        """The mapping network psi on a (B, L) latent."""
        h = self.psi_convs(v.reshape(v.shape[0], 1, self.latent_size))
        return self.psi_out(h.flatten(1))

    def mask_and_psi(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, psi(m * z)): the two pieces the fused ``augkd.ops`` mixing kernels consume."""
        if z.dim() != 2 or z.shape[1] != self.latent_size:
            raise ValueError(f"z: expected shape (B, {self.latent_size}), got {tuple(z.shape)}")
        if y.shape[0] != z.shape[0]:
            raise ValueError(f"y: expected {z.shape[0]} labels to match z, got {y.shape[0]}")
        m = self.mask(y, z.dtype)
        return m, self.psi(m * z)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(z_a, mask)`` with z_a = mask * psi(mask * z) + (1 - mask) * z."""
        m, p = self.mask_and_psi(z, y)
        return anchor_mix(z, m, p), m


class _Shift(nn.Module):
    """x + offset (the official code's ``Lambda(lambda x: x - 0.5)``)."""

    def __init__(self, offset: float):
        super().__init__()
        self.offset = float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset

    def extra_repr(self) -> str:
        return f"offset={self.offset}"
