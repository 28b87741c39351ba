"""Accuracy metrics, mini-batch iteration and the lexicographic "better epoch" comparison."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Split, augment
from ..distributed import Dist
from .losses import topk_correct


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, normalize, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` (eval mode) on raw [0,1] images, normalised on the way in."""
    was_training = model.training
    model.eval()
    out = [model(normalize(images[i : i + batch_size])) for i in range(0, images.shape[0], batch_size)]
    model.train(was_training)
    if not out:
        return images.new_zeros((0, 0))
    return torch.cat(out)


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    n = labels.shape[0]
    if n == 0:
        return {"acc": float("nan"), "acc3": float("nan"), "acc5": float("nan"), "loss": float("nan")}
    hits = topk_correct(logits, labels, (1, 3, 5))
    return {
        "acc": hits[1] / n,
        "acc3": hits[3] / n,
        "acc5": hits[5] / n,
        "loss": float(F.cross_entropy(logits, labels)),
    }


def evaluate(model: nn.Module, split: Split, normalize, batch_size: int = 512) -> dict[str, float]:
    """Acc, Acc@3, Acc@5 (fractions) and mean CE of ``model`` on ``split``."""
    return metrics_from_logits(predict(model, split.images, normalize, batch_size), split.labels)


def validation_row(model: nn.Module, split: Split, normalize) -> dict[str, float]:
    """An epoch's validation columns for a classifier: val_acc, val_acc3, val_acc5, val_loss."""
    m = evaluate(model, split, normalize)
    return {"val_acc": m["acc"], "val_acc3": m["acc3"], "val_acc5": m["acc5"], "val_loss": m["loss"]}


def accuracy_key(row: dict, prefix: str = "val_") -> tuple:
    """Best-epoch key to MINIMISE: higher Acc, then Acc@3, then Acc@5 (the official order)."""
    return (-row[prefix + "acc"], -row[prefix + "acc3"], -row[prefix + "acc5"])


def is_better(key: tuple, best_key: tuple | None) -> bool:
    # Strictly better only: on a tie the earlier epoch stays (as the official code does).
    return best_key is None or tuple(key) < tuple(best_key)


def minibatches(
    split: Split,
    batch_size: int,
    generator: torch.Generator,
    *,
    shuffle: bool = True,
    augment_pad: int = 0,
    hflip: bool = False,
    min_batch: int = 1,
    shard: Dist | None = None,
    aug_generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled (and augmented) batches of a split; all randomness from ``generator`` so resume repeats it.

    ``min_batch`` drops a smaller trailing batch (BatchNorm1d in train mode cannot take one sample).
    ``shard``: with several processes, this process's part of the epoch (``Dist.shard_order``: the same
    shuffled order everywhere, so ``generator`` must be seeded alike in all processes), augmented with
    ``aug_generator`` (per process; default ``generator``).
    """
    n = len(split)
    if shuffle:
        order = torch.randperm(n, generator=generator, device=generator.device).to(split.images.device)
    else:
        order = torch.arange(n, device=split.images.device)
    if shard is not None:
        order = shard.shard_order(order)
    aug = aug_generator if aug_generator is not None else generator
    for i in range(0, order.numel(), batch_size):
        idx = order[i : i + batch_size]
        if idx.numel() < min_batch:
            break
        x, y = split.images[idx], split.labels[idx]
        if augment_pad > 0 or hflip:
            x = augment(x, pad=augment_pad, hflip=hflip, generator=aug)
        yield x, y
