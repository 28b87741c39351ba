"""Loading and saving model weights safely.

``load_state`` never executes pickled code: ``.pt``/``.pth`` files go through
``torch.load(weights_only=True)``, ``.safetensors`` through safetensors. Mismatches are reported with the
missing/unexpected keys, and a classifier head of the wrong width is reported as a class-count mismatch,
the usual cause (a teacher trained on other data).
"""
from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping

import torch
import torch.nn as nn

from ..atomic import atomic_path

WRAPPER_KEYS = ("state_dict", "model")


def _read(path: str) -> Mapping:
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path}: reading .safetensors files needs `pip install safetensors`") from None
        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path}: not a valid safetensors file ({exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path}: refused to load: the file holds objects other than tensors and plain containers, and "
            f"loading them would execute pickled code (torch.load weights_only=True failed: {str(exc).splitlines()[0]}). "
            "Save only the state_dict (model.state_dict()) or convert it to .safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as exc:  # truncated, damaged, not a torch file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: corrupt or truncated, not a readable PyTorch checkpoint ({first})") from None


def _unwrap(obj, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(
            f"{path}: expected a state_dict (str -> tensor), or a dict holding one under {' or '.join(map(repr, WRAPPER_KEYS))}"
        )
    sd = dict(obj)
    # Checkpoints saved from nn.DataParallel / DistributedDataParallel prefix every key with "module.".
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _head(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The last Linear layer, taken as the classifier head."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = (name, m)
    return last


def _short(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_state(model: nn.Module, path: str | os.PathLike, *, role: str = "teacher") -> nn.Module:
    """Load weights from ``path`` (.pt/.pth state_dict or .safetensors) into ``model``, strictly.

    ``role`` only names the model in error messages ("teacher has 31 classes but the data has 10").
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{role} weights not found: {path}")
    sd = _unwrap(_read(path), path)
    own = model.state_dict()
    head = _head(model)
    if head is not None:
        hname, hmod = head
        key = f"{hname}.weight" if hname else "weight"
        if key in sd and sd[key].dim() == 2 and sd[key].shape[0] != hmod.out_features:
            raise ValueError(
                f"{path}: {role} has {sd[key].shape[0]} classes but the data has {hmod.out_features} "
                f"(classifier head {key!r} is {tuple(sd[key].shape)}, the model expects {tuple(hmod.weight.shape)})"
            )
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        if wrong:
            parts.append(
                "shape mismatches: " + _short([f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in wrong])
            )
        raise ValueError(
            f"{path}: the weights do not fit this {role} architecture ({type(model).__name__}); " + "; ".join(parts)
        )
    model.load_state_dict(sd, strict=True)
    return model


def save_state(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Save a model's state_dict to ``path`` (.safetensors or torch format), atomically.

    The file is written next to its destination and moved into place with os.replace, so a crash never
    leaves a truncated checkpoint behind.
    """
    path = os.fspath(path)
    sd = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("model: expected an nn.Module or a dict of tensors")
    with atomic_path(path, os.path.splitext(path)[1]) as tmp:
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file

            # safetensors needs contiguous tensors that do not share storage.
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}, tmp)
        else:
            torch.save({k: v.detach().cpu() for k, v in sd.items()}, tmp)
