"""Run outputs: metrics CSV/JSON, training-curve plots and image grids (matplotlib, Agg backend)."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Sequence

import torch

from .atomic import atomic_path, write_text


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(_plain(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str) -> Any:
    with open(path) as fh:
        return json.load(fh)


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """One row per dict; the header is the union of keys in first-seen order."""
    header: list[str] = []
    for r in rows:
        for k in r:
            if k not in header:
                header.append(k)
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in header})


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


# ---------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: str, history: Sequence[dict[str, Any]], groups: dict[str, Sequence[str]], title: str) -> None:
    """One panel per group of columns against the epoch number."""
    if not history:
        return
    plt = _pyplot()
    groups = {g: [c for c in cols if any(c in r for r in history)] for g, cols in groups.items()}
    groups = {g: cols for g, cols in groups.items() if cols}
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.2), squeeze=False)
    epochs = [r["epoch"] for r in history]
    for ax, (name, cols) in zip(axes[0], groups.items()):
        for c in cols:
            ys = [r.get(c, float("nan")) for r in history]
            ax.plot(epochs, [float("nan") if y is None else float(y) for y in ys], label=c)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def image_grid(path: str, rows: Sequence[torch.Tensor], row_titles: Sequence[str], title: str = "") -> None:
    """Rows of (N, C, H, W) images in [0, 1]; one grid line per row."""
    plt = _pyplot()
    n_rows = len(rows)
    n_cols = max(int(r.shape[0]) for r in rows) if rows else 0
    if n_rows == 0 or n_cols == 0:
        return
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(0.9 * n_cols + 1.2, 0.95 * n_rows + 0.4), squeeze=False)
    for i, (imgs, name) in enumerate(zip(rows, row_titles)):
        imgs = imgs.detach().float().cpu().clamp(0, 1)
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < imgs.shape[0]:
                img = imgs[j]
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(img.permute(1, 2, 0).numpy())
        axes[i][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
