"""The per-epoch meter: sums and means of per-step scalar tensors, read from the device once per epoch.

A training step's losses are 0-dim tensors; reading each with ``.item()`` is a host synchronisation per
value per step (on a GPU it stalls the queue every step). ``StepSums`` keeps the tensors and reads them
all in one transfer at the end of the epoch, then adds them up in Python in the order they came, with
the same per-step weights: the sums are bit-identical to adding ``v.item() * weight`` step by step.
"""
from __future__ import annotations

from collections import defaultdict

import torch


class StepSums:
    def __init__(self) -> None:
        self._keys: list[str] = []
        self._values: list[torch.Tensor] = []
        self._scales: list[float] = []
        self.counts: dict[str, int] = defaultdict(int)
        self.weights: dict[str, float] = defaultdict(int)  # per key: the sum of the weights given to add

    def add(self, key: str, value: torch.Tensor, scale: float = 1.0) -> None:
        """Record ``value`` (a 0-dim or 1-element tensor) to be added as ``float(value) * scale``; ``scale``
        is also its weight in ``means`` (e.g. the batch size, for a per-sample mean over the epoch)."""
        self._keys.append(key)
        self._values.append(value.detach().reshape(()))
        self._scales.append(scale)
        self.counts[key] += 1
        self.weights[key] += scale

    def sums(self) -> dict[str, float]:
        """The sums per key (insertion order of first appearance), with one device-to-host read."""
        out: dict[str, float] = {}
        if not self._values:
            return out
        # float64 holds every fp16/bf16/fp32 value exactly, so each number equals its .item()
        values = torch.stack([v.to(torch.float64) for v in self._values]).tolist()
        for key, value, scale in zip(self._keys, values, self._scales):
            out[key] = out.get(key, 0.0) + (value * scale if scale != 1.0 else value)
        return out

    def means(self) -> dict[str, float]:
        """Weighted means per key: sum(value * weight) / sum(weight) (the plain mean with weight 1)."""
        return {k: v / self.weights[k] for k, v in self.sums().items()}
