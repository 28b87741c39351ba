"""``load_setting``: assemble a ``DomainShift`` (teacher domain -> student domain) with its splits.

Split conventions (all seeded and class-stratified, see ``splits.py``):

- teacher domain: 80/10/10 train/val/test, per class and, with several teacher folders, per domain
  (the official code also splits each teacher domain separately).
- student domain:
  * ``k_shot=k`` (default 10): k labelled train images per class, ``val_per_class`` (default k) per
    class for validation / model selection, every remaining image for test. A small validation split of
    the same size as the labelled budget mirrors the few-shot setting: selecting epochs on a large
    labelled set would hide how little labelled data the student really has.
  * ``k_shot=None``: 80/10/10 train/val/test (the official code's DA_SPLIT).
  * with ``test_folder`` (folders only): the test split is the whole test folder; the student domain
    gives 80/20 train/val when ``k_shot=None``, else k-shot train + ``val_per_class`` val (images left
    over are recorded as "unused").
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .containers import Domain, DomainShift, Split
from .digits import IMAGE_SIZE as DIGITS_SIZE
from .digits import load_mnist5k, load_optdigits
from .folders import check_disjoint, check_same_classes, load_images, resolve_test_folder, scan_folder
from .splits import (
    FORMAT_VERSION,
    STUDENT_STREAM,
    TEACHER_STREAM,
    check_splits,
    make_rng,
    split_by_counts,
    split_by_fractions,
)

SETTINGS: tuple[str, ...] = ("digits-shift", "digits-shift-rev", "folders")

TEACHER_FRACTIONS = (0.8, 0.1, 0.1)
STUDENT_FRACTIONS = (0.8, 0.1, 0.1)
STUDENT_FRACTIONS_WITH_TEST_FOLDER = (0.8, 0.2)


def _channel_stats(images: torch.Tensor, chunk: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std over (N, H, W), accumulated in float64 chunk by chunk (no full float copy)."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].to(torch.float64)
        if images.dtype == torch.uint8:
            part = part / 255.0
        total += part.sum(dim=(0, 2, 3))
        total_sq += (part * part).sum(dim=(0, 2, 3))
        count += part.shape[0] * part.shape[2] * part.shape[3]
    if count == 0:
        raise ValueError("the teacher train split is empty: cannot compute normalisation statistics")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0.0).sqrt().clamp_min(1e-6)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _take(images: torch.Tensor, labels: torch.Tensor, idx: list[int]) -> Split:
    index = torch.as_tensor(idx, dtype=torch.long)
    x = images[index]
    x = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
    return Split(images=x.contiguous(), labels=labels[index].to(torch.int64).contiguous())


def _check_k(k_shot, val_per_class) -> tuple[int | None, int | None]:
    if k_shot is None:
        if val_per_class is not None:
            raise ValueError("val_per_class: only applies with an integer k_shot (k_shot=None splits by fractions)")
        return None, None
    if not isinstance(k_shot, (int, np.integer)) or isinstance(k_shot, bool) or k_shot < 1:
        raise ValueError(f"k_shot: expected a positive int or None, got {k_shot!r}")
    if val_per_class is None:
        val_per_class = k_shot
    if not isinstance(val_per_class, (int, np.integer)) or isinstance(val_per_class, bool) or val_per_class < 1:
        raise ValueError(f"val_per_class: expected a positive int or None (= k_shot), got {val_per_class!r}")
    return int(k_shot), int(val_per_class)


def _draw_student(labels: np.ndarray, seed: int, k_shot, val_per_class, has_test_folder: bool, names) -> dict:
    rng = make_rng(seed, STUDENT_STREAM)
    if k_shot is None:
        if has_test_folder:
            train, val = split_by_fractions(labels, STUDENT_FRACTIONS_WITH_TEST_FOLDER, rng, group_names=names)
            return {"train": train, "val": val}
        train, val, test = split_by_fractions(labels, STUDENT_FRACTIONS, rng, group_names=names)
        return {"train": train, "val": val, "test": test}
    train, val, rest = split_by_counts(
        labels, (k_shot, val_per_class), rng, min_rest=0 if has_test_folder else 1, group_names=names
    )
    if has_test_folder:
        return {"train": train, "val": val, "unused": rest}
    return {"train": train, "val": val, "test": rest}


def _load_digits(name: str):
    mnist, optdigits = ("mnist5k", load_mnist5k), ("optdigits", load_optdigits)
    (t_name, t_load), (s_name, s_load) = (mnist, optdigits) if name == "digits-shift" else (optdigits, mnist)
    tx, ty = t_load()
    sx, sy = s_load()
    return {
        "teacher_name": t_name,
        "teacher_domains": [t_name],
        "student_name": s_name,
        "teacher": (tx, ty, ty.numpy(), None),
        "student": (sx, sy),
        "test": None,
        "class_names": [str(i) for i in range(10)],
        "image_shape": (1, DIGITS_SIZE, DIGITS_SIZE),
    }


def _load_folders(root, teacher_domains, student_domain, test_folder, image_size, grayscale, cache_dir):
    if root is None:
        raise ValueError("root: the 'folders' setting needs root=<folder holding the domain folders>")
    if not os.path.isdir(root):
        raise ValueError(f"root: folder not found: {root}")
    if not teacher_domains or isinstance(teacher_domains, str) or not all(isinstance(d, str) for d in teacher_domains):
        raise ValueError(f"teacher_domains: expected a non-empty list of domain folder names, got {teacher_domains!r}")
    if not isinstance(student_domain, str) or not student_domain:
        raise ValueError(f"student_domain: expected a domain folder name, got {student_domain!r}")
    if len(set(teacher_domains)) != len(teacher_domains):
        raise ValueError(f"teacher_domains: each domain may appear once, got {list(teacher_domains)}")
    if student_domain in teacher_domains:
        raise ValueError(f"student_domain: {student_domain!r} is also a teacher domain; the domains must differ")
    for d in list(teacher_domains) + [student_domain]:
        if not os.path.isdir(os.path.join(root, d)):
            available = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
            shown = ", ".join(available[:10]) + (f", ... ({len(available)} in all)" if len(available) > 10 else "")
            raise ValueError(f"domain folder {d!r} not found under root {root} (found: {shown or 'no folders'})")

    s_classes, s_paths, s_labels = scan_folder(os.path.join(root, student_domain))
    t_paths, t_labels, t_groups = [], [], []
    names = {}
    by_domain = {f"student domain {student_domain!r}": s_paths}
    for di, d in enumerate(teacher_domains):
        classes, paths, labels = scan_folder(os.path.join(root, d))
        by_domain[f"teacher domain {d!r}"] = paths
        check_same_classes(s_classes, student_domain, classes, d)
        t_paths += paths
        t_labels += labels
        # Stratify per (domain, class): each teacher domain is split on its own, as in the official code.
        t_groups += [di * len(classes) + lab for lab in labels]
        names.update({di * len(classes) + k: f"{d}/{c}" for k, c in enumerate(classes)})
    test = None
    if test_folder is not None:
        folder = resolve_test_folder(root, test_folder)
        e_classes, e_paths, e_labels = scan_folder(folder)
        check_same_classes(s_classes, student_domain, e_classes, folder)
        by_domain[f"test folder {folder}"] = e_paths
    # The same image in two domains would be trained on as one and tested on as the other.
    check_disjoint(by_domain)
    if test_folder is not None:
        test = (load_images(e_paths, image_size, grayscale=grayscale, cache_dir=cache_dir), torch.tensor(e_labels, dtype=torch.int64))

    return {
        "teacher_name": "+".join(teacher_domains),
        "teacher_domains": list(teacher_domains),
        "student_name": student_domain,
        "teacher": (
            load_images(t_paths, image_size, grayscale=grayscale, cache_dir=cache_dir),
            torch.tensor(t_labels, dtype=torch.int64),
            np.asarray(t_groups),
            names,
        ),
        "student": (load_images(s_paths, image_size, grayscale=grayscale, cache_dir=cache_dir), torch.tensor(s_labels, dtype=torch.int64)),
        "test": test,
        "class_names": s_classes,
        "image_shape": (1 if grayscale else 3, image_size, image_size),
    }


def load_setting(
    name: str,
    *,
    seed: int = 0,
    k_shot: int | None = 10,
    val_per_class: int | None = None,
    root: str | None = None,
    teacher_domains: list[str] | None = None,
    student_domain: str | None = None,
    test_folder: str | None = None,
    image_size: int = 32,
    splits: dict | None = None,
    grayscale: bool = False,
    cache_dir: str | None = None,
) -> DomainShift:
    """Load a teacher -> student domain shift with seeded, stratified splits.

    name: "digits-shift" (MNIST-5k teacher -> UCI optdigits student, 1x16x16; ``image_size`` does not
    apply), "digits-shift-rev" (the reverse) or "folders" (``root``, ``teacher_domains`` and
    ``student_domain`` required; optional ``test_folder``, ``image_size``, ``grayscale``, and
    ``cache_dir``: where decoded images are cached as .npz, keyed by file list/mtimes/options).
    splits: index lists from an earlier run (``DomainShift.splits`` / ``load_splits``); when given they
    are reused as they are and ``seed``/``k_shot``/``val_per_class`` only serve as a record.
    """
    if name not in SETTINGS:
        raise ValueError(f"name: unknown setting {name!r}; expected one of {', '.join(SETTINGS)}")
    k_shot, val_per_class = _check_k(k_shot, val_per_class)
    make_rng(seed, 0)  # validates the seed early
    if name == "folders":
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 4:
            raise ValueError(f"image_size: expected an int >= 4, got {image_size!r}")
        data = _load_folders(root, teacher_domains, student_domain, test_folder, image_size, grayscale, cache_dir)
        setting_name = f"folders:{os.path.abspath(root)}"
    else:
        extra = {k: v for k, v in (("root", root), ("teacher_domains", teacher_domains),
                                   ("student_domain", student_domain), ("test_folder", test_folder),
                                   ("cache_dir", cache_dir)) if v is not None}
        if extra or grayscale:
            raise ValueError(f"{', '.join(extra) or 'grayscale'}: only applies to the 'folders' setting, not {name!r}")
        data = _load_digits(name)
        setting_name = name

    tx, ty, t_groups, t_names = data["teacher"]
    sx, sy = data["student"]
    test = data["test"]
    if splits is None:
        t_train, t_val, t_test = split_by_fractions(t_groups, TEACHER_FRACTIONS, make_rng(seed, TEACHER_STREAM),
                                                    group_names=t_names)
        s_part = _draw_student(sy.numpy(), seed, k_shot, val_per_class, test is not None,
                               dict(enumerate(data["class_names"])))
        student = {"size": int(sy.shape[0]), **s_part}
        if test is None:
            student["test_from"] = "domain"
        else:
            student.update(test_from="folder", test_size=int(test[1].shape[0]),
                           test=list(range(int(test[1].shape[0]))))
        splits = {
            "format": FORMAT_VERSION,
            "setting": name,
            "seed": int(seed),
            "k_shot": k_shot,
            "val_per_class": val_per_class,
            "teacher_domains": data["teacher_domains"],
            "student_domain": data["student_name"],
            "teacher": {"size": int(ty.shape[0]), "train": t_train, "val": t_val, "test": t_test},
            "student": student,
        }
    else:
        if isinstance(splits, dict):
            if splits.get("setting", name) != name:
                raise ValueError(f"splits: saved for setting {splits.get('setting')!r}, not {name!r}")
            for key, now in (("teacher_domains", data["teacher_domains"]), ("student_domain", data["student_name"])):
                if key in splits and splits[key] != now:
                    raise ValueError(f"splits: saved for {key} {splits[key]!r}, but this run uses {now!r}")
        check_splits(splits, teacher_size=int(ty.shape[0]), student_size=int(sy.shape[0]),
                     student_test_size=None if test is None else int(test[1].shape[0]))
        splits = {k: (dict(v) if isinstance(v, dict) else v) for k, v in splits.items()}

    t, s = splits["teacher"], splits["student"]
    teacher = Domain(data["teacher_name"], _take(tx, ty, t["train"]), _take(tx, ty, t["val"]), _take(tx, ty, t["test"]))
    s_test = _take(test[0], test[1], s["test"]) if test is not None else _take(sx, sy, s["test"])
    student_dom = Domain(data["student_name"], _take(sx, sy, s["train"]), _take(sx, sy, s["val"]), s_test)
    mean, std = _channel_stats(teacher.train.images)
    return DomainShift(
        name=setting_name,
        teacher=teacher,
        student=student_dom,
        num_classes=len(data["class_names"]),
        image_shape=tuple(data["image_shape"]),
        mean=mean,
        std=std,
        class_names=list(data["class_names"]),
        splits=splits,
    )
