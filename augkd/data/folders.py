"""User image folders, read with Pillow (torchvision is not required).

Two layouts are accepted for a domain ``<root>/<domain>``:

- Office-31 style: ``<root>/<domain>/images/<class>/<file>``
- plain ImageFolder: ``<root>/<domain>/<class>/<file>``

Classes are the sorted class-folder names (torchvision ``ImageFolder``'s convention, so a teacher
trained with torchvision keeps its class indices). Files are found recursively inside each class
folder and sorted, which makes the image order, and so the saved split indices, reproducible.
Symbolic links are followed, but every directory is entered once (by real path, so a link back up the
tree is no loop) and every real file counts once; a file reachable from two classes, or from two of
the folders that make up the splits (teacher domains, student domain, test folder), is an error naming
it, since it would get two labels or sit in training and test at once.

Images are decoded eagerly into one preallocated uint8 array of the final size (N, C, S, S): only one
full-resolution image per worker thread is alive at a time, so memory stays at the size of the result
(Office-31 at 32x32: 4110 x 3 x 32 x 32 bytes = 12.6 MB).
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..atomic import atomic_path

# Same extension list as torchvision.datasets.folder.IMG_EXTENSIONS (lower case; matching ignores case).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        raise ImportError("reading image folders needs Pillow; run `pip install pillow`") from None
    return Image


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def class_root(path: str) -> str:
    """Return the folder whose subfolders are the classes, detecting the Office-31 ``images/`` level.

    The ``images`` level is assumed only when it is the sole subfolder and itself contains folders, so a
    plain layout with a class literally named "images" next to other classes still works.
    """
    if not os.path.isdir(path):
        raise ValueError(f"domain folder not found: {path}")
    subs = _subdirs(path)
    if subs == ["images"] and _subdirs(os.path.join(path, "images")):
        return os.path.join(path, "images")
    return path


def _class_files(folder: str) -> list[str]:
    """The image files under ``folder``, each real file once, each real directory entered once."""
    seen_dirs = {os.path.realpath(folder)}
    seen_files: set[str] = set()
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if d.startswith(".") or real in seen_dirs:
                continue  # hidden, or a directory already walked (a link loop or a second link to it)
            seen_dirs.add(real)
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            if f.startswith(".") or not f.lower().endswith(IMG_EXTENSIONS):
                continue
            path = os.path.join(dirpath, f)
            real = os.path.realpath(path)
            if real not in seen_files and os.path.isfile(real):
                seen_files.add(real)
                found.append(path)
    return found


def check_disjoint(groups: dict[str, list[str]]) -> None:
    """Refuse a real file that appears in two groups (classes, or domains feeding different splits)."""
    owner: dict[str, str] = {}
    for group, paths in groups.items():
        for p in paths:
            real = os.path.realpath(p)
            other = owner.setdefault(real, group)
            if other != group:
                raise ValueError(
                    f"image {real} is found in {other} and in {group} (through {p}); each image must belong to "
                    "one class of one domain, or it would get two labels or land in two splits"
                )


def scan_folder(path: str) -> tuple[list[str], list[str], list[int]]:
    """List (class_names, image_paths, labels) of a domain folder in either layout."""
    croot = class_root(path)
    classes = _subdirs(croot)
    if not classes:
        raise ValueError(
            f"no class folders in {croot}: expected <domain>/<class>/<image> or <domain>/images/<class>/<image>"
        )
    paths: list[str] = []
    labels: list[int] = []
    per_class: dict[str, list[str]] = {}
    for label, name in enumerate(classes):
        found = _class_files(os.path.join(croot, name))
        per_class[f"class {name!r} of {path}"] = found
        if not found:
            raise ValueError(
                f"class folder {os.path.join(croot, name)} holds no images (extensions {', '.join(IMG_EXTENSIONS)})"
            )
        paths.extend(found)
        labels.extend([label] * len(found))
    check_disjoint(per_class)
    return classes, paths, labels


# Largest image decoded (width x height): 64 megapixels, 4x the area of a 4K photo. A bigger one is
# usually a decompression bomb (a small file that expands to gigabytes), and would be resized to
# image_size anyway; raise the limit here for genuine huge scans.
MAX_IMAGE_PIXELS = 64_000_000


def _decode(path: str, size: int, grayscale: bool) -> np.ndarray:
    Image = _pil()
    try:
        with Image.open(path) as img:
            w, h = img.size  # read from the header; nothing is decoded yet
            if w * h > MAX_IMAGE_PIXELS:
                raise ValueError(
                    f"{w}x{h} = {w * h} pixels, more than augkd.data.folders.MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS} "
                    "(a decompression bomb?)"
                )
            img = img.convert("L" if grayscale else "RGB")
            # Bilinear with Pillow's built-in antialiasing: what torchvision's Resize does on PIL images.
            img = img.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombError as exc:  # Pillow's own limit, hit inside open()
        raise ValueError(f"cannot read image {path}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _cache_key(paths: list[str], size: int, grayscale: bool) -> str:
    """Hash of everything the decoded array depends on: the files (path, size, mtime) and the options."""
    h = hashlib.sha256(json.dumps({"size": size, "grayscale": grayscale, "version": 1}).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def load_images(
    paths: list[str],
    size: int = 32,
    *,
    grayscale: bool = False,
    chunk_size: int = 256,
    workers: int | None = None,
    cache_dir: str | None = None,
) -> torch.Tensor:
    """Decode and resize ``paths`` into a (N, C, size, size) uint8 tensor (C = 1 if grayscale else 3).

    Work is done ``chunk_size`` images at a time on a small thread pool (Pillow releases the GIL while
    decoding), writing straight into the preallocated result. With ``cache_dir`` the result is stored as
    an ``.npz`` keyed by the file list, sizes, modification times and options, and reused next time.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"image_size: expected a positive int, got {size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    cache_path = None
    if cache_dir is not None:
        cache_path = os.path.join(cache_dir, f"images-{_cache_key(paths, size, grayscale)}.npz")
        if os.path.isfile(cache_path):
            with np.load(cache_path) as cached:
                return torch.from_numpy(cached["images"].copy())
    result = _decode_all(paths, size, grayscale, chunk_size, workers)
    if cache_path is not None:
        with atomic_path(cache_path, ".npz") as tmp, open(tmp, "wb") as fh:  # a concurrent run never reads half a file
            np.savez(fh, images=result.numpy())
    return result


def _decode_all(paths: list[str], size: int, grayscale: bool, chunk_size: int, workers: int | None) -> torch.Tensor:
    channels = 1 if grayscale else 3
    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(paths), chunk_size):
            chunk = paths[start : start + chunk_size]
            for j, arr in enumerate(pool.map(lambda p: _decode(p, size, grayscale), chunk)):
                out[start + j] = arr
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def resolve_test_folder(root: str, test_folder: str) -> str:
    """``test_folder`` may be a path, or a domain name under ``root``."""
    if os.path.isdir(test_folder):
        return test_folder
    candidate = os.path.join(root, test_folder)
    if os.path.isdir(candidate):
        return candidate
    raise ValueError(f"test_folder: no folder at {test_folder!r} or {candidate!r}")


def check_same_classes(reference: list[str], ref_name: str, other: list[str], other_name: str) -> None:
    """Every domain must have the same class folders, otherwise label indices would silently disagree."""
    if reference != other:
        missing = sorted(set(reference) - set(other))
        extra = sorted(set(other) - set(reference))
        raise ValueError(
            f"class folders differ between domains {ref_name!r} and {other_name!r}: "
            f"missing in {other_name!r}: {missing or 'none'}; only in {other_name!r}: {extra or 'none'}"
        )
