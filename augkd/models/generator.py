"""Module 1 networks: the generator G (latent -> image) and the conditional encoder E (image, label -> latent).

Both follow the released code's ``models/generator.py``, parameterised by image shape. Images
are in [0, 1] and NOT normalised, on both sides: G ends in a Sigmoid and E reads G's raw output.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _check_shape(image_shape, levels: int, arg: str = "image_shape") -> tuple[int, int, int]:
    if (
        not isinstance(image_shape, (tuple, list))
        or len(image_shape) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_shape)
    ):
        raise ValueError(f"{arg}: expected (C, H, W) positive ints, got {image_shape!r}")
    c, h, w = image_shape
    f = 2**levels
    if h % f or w % f:
        raise ValueError(f"{arg}: H and W must be multiples of {f} for {levels} x2 resolution steps, got {h}x{w}")
    return int(c), int(h), int(w)


def _check_positive(arg: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    return value


def _check_dims(hidden_dims: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(hidden_dims)
    if len(dims) < 2 or not all(isinstance(d, int) and d > 0 for d in dims):
        raise ValueError(f"hidden_dims: expected at least 2 positive ints, got {hidden_dims!r}")
    return dims


def labels_to_onehot(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(B,) int labels -> one-hot; (B, K) float rows (one-hot or soft labels) pass through."""
    if y.dim() == 1 and not y.is_floating_point():
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"y: labels must lie in [0, {num_classes}), got {int(y.min())}..{int(y.max())}")
        return F.one_hot(y.long(), num_classes).to(dtype)
    if y.dim() == 2 and y.shape[1] == num_classes:
        return y.to(dtype)
    raise ValueError(f"y: expected (B,) int labels or (B, {num_classes}) class weights, got {tuple(y.shape)} {y.dtype}")


def _channels_last(net: nn.Sequential) -> bool:
    """Whether the first convolution's weight is stored channels-last (so its input should be too)."""
    for m in net:
        if isinstance(m, nn.Conv2d):
            w = m.weight
            return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    return False


class Generator(nn.Module):
    """Unconditional DAFL-style generator (the official code ignores the labels it is given, bug B3).

    Linear -> (hidden[0], H/2^n, W/2^n) -> BN, then per further hidden dim: Upsample x2 (nearest) ->
    Conv3x3 (no bias) -> BN -> LeakyReLU(0.2); finally Conv3x3 -> C channels -> Sigmoid. With the default
    three hidden dims (n = 2 upsamplings) the initial map is H/4, as in the official code.
    PyTorch default init (the official class has no custom init).
    """

    def __init__(self, latent_size: int, image_shape: Sequence[int] = (3, 32, 32), hidden_dims: Sequence[int] = (256, 128, 64)):
        super().__init__()
        self.latent_size = _check_positive("latent_size", latent_size)
        dims = _check_dims(hidden_dims)
        c, h, w = _check_shape(tuple(image_shape), len(dims) - 1)
        self.image_shape = (c, h, w)
        self.init_hw = (h // 2 ** (len(dims) - 1), w // 2 ** (len(dims) - 1))
        self.fc = nn.Linear(latent_size, dims[0] * self.init_hw[0] * self.init_hw[1])
        layers: list[nn.Module] = [nn.BatchNorm2d(dims[0])]
        for prev, nxt in zip(dims[:-1], dims[1:]):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(prev, nxt, 3, 1, 1, bias=False),
                nn.BatchNorm2d(nxt),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers += [nn.Conv2d(dims[-1], c, 3, 1, 1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)
        self._dims0 = dims[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_size:
            raise ValueError(f"z: expected shape (B, {self.latent_size}), got {tuple(z.shape)}")
        x = self.fc(z).view(z.shape[0], self._dims0, *self.init_hw)
        # The view is NCHW. With channels-last convolutions (Context.place on CPU) every later layer would
        # convert the 4x larger upsampled map instead (upsampling, conv input, conv backward: about a
        # third of G's time); converting once after the first BatchNorm gives bit-identical results.
        first_bn, rest = self.net[0], self.net[1:]
        x = first_bn(x)
        if _channels_last(self.net):
            x = x.contiguous(memory_format=torch.channels_last)
        return rest(x)


class Downsample(nn.Module):
    """F.interpolate by a fixed factor. The factor is stored per layer: the official lambda closure bound
    the loop variable late, so every layer used the last scale (bug B15)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class Encoder(nn.Module):
    """Conditional VAE-style encoder E(x, y) -> z, trained to invert G.

    The label enters as one extra image channel (Linear(K -> H*W)); the image goes through a 1x1 conv;
    BN on the concatenation; then per hidden dim but the last: Downsample x0.5 -> Conv3x3 (no bias) ->
    BN -> LeakyReLU(0.2); the last: Conv3x3 -> BN -> Tanh; flatten; mu and logvar heads.
    logvar is clipped to [-5, 3], eps ~ N(0, 1) clipped to [-10, 10], z = mu + exp(logvar / 2) * eps.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        latent_size: int,
        hidden_dims: Sequence[int] = (64, 128, 256),
        scales: Sequence[float] | None = None,
    ):
        super().__init__()
        dims = _check_dims(hidden_dims)
        c, h, w = _check_shape(tuple(image_shape), len(dims) - 1)
        self.image_shape = (c, h, w)
        self.num_classes = _check_positive("num_classes", num_classes)
        self.latent_size = _check_positive("latent_size", latent_size)
        scales = tuple(0.5 for _ in dims[:-1]) if scales is None else tuple(float(s) for s in scales)
        if len(scales) != len(dims) - 1 or not all(0 < s <= 1 for s in scales):
            raise ValueError(f"scales: expected {len(dims) - 1} factors in (0, 1], got {scales!r}")

        self.embed_label = nn.Linear(num_classes, h * w)
        self.embed_image = nn.Conv2d(c, c, kernel_size=1)
        layers: list[nn.Module] = [nn.BatchNorm2d(c + 1)]
        prev, fh, fw = c + 1, h, w
        for scale, d in zip(scales, dims[:-1]):
            layers += [Downsample(scale), nn.Conv2d(prev, d, 3, 1, 1, bias=False), nn.BatchNorm2d(d), nn.LeakyReLU(0.2)]
            fh, fw = math.floor(fh * scale), math.floor(fw * scale)  # F.interpolate floors the output size
            prev = d
        layers += [nn.Conv2d(prev, dims[-1], 3, 1, 1), nn.BatchNorm2d(dims[-1]), nn.Tanh(), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        flat = dims[-1] * fh * fw
        self.fc_mu = nn.Linear(flat, latent_size)
        self.fc_logvar = nn.Linear(flat, latent_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Official init: U(-0.08, 0.08) on every conv/linear weight, zero biases. BN keeps its default.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.uniform_(m.weight, -0.08, 0.08)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def sample_noise(self, rows: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor:
        """The (rows, latent_size) standard normal draw ``forward`` makes for ``rows`` images (before its
        clamp), on ``generator``'s device (else ``device``)."""
        gen_device = generator.device if generator is not None else device
        return torch.randn((rows, self.latent_size), generator=generator, device=gen_device, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        return_dist: bool = False,
        sample: bool = True,
        generator: torch.Generator | None = None,
        eps: torch.Tensor | None = None,
    ):
        """Encode images ``x`` (B, C, H, W) in [0, 1] with labels ``y`` ((B,) ints or (B, K) weights).

        Samples z by default, in eval mode too, as the official code does (B11); ``sample=False`` returns
        mu instead. With ``return_dist`` returns ``(z, mu, logvar)``. The standard normal sample is drawn
        from ``generator`` (``sample_noise``), or is ``eps`` when given (drawn earlier by the caller).
        """
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x: expected shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"y: expected {x.shape[0]} labels to match x, got {y.shape[0]}")
        onehot = labels_to_onehot(y, self.num_classes, x.dtype)
        _, h, w = self.image_shape
        label_map = self.embed_label(onehot).view(x.shape[0], 1, h, w)
        feats = self.net(torch.cat([self.embed_image(x), label_map], dim=1))
        mu = self.fc_mu(feats)
        logvar = self.fc_logvar(feats).clamp(-5.0, 3.0)
        if sample:
            if eps is None:
                eps = self.sample_noise(x.shape[0], generator, mu.dtype, mu.device)
            elif tuple(eps.shape) != tuple(mu.shape):
                raise ValueError(f"eps: expected shape {tuple(mu.shape)}, got {tuple(eps.shape)}")
            eps = eps.to(mu.device).clamp_(-10.0, 10.0)
            z = mu + torch.exp(0.5 * logvar) * eps
        else:
            z = mu
        return (z, mu, logvar) if return_dist else z
