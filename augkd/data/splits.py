"""Seeded, class-stratified splits, kept as index lists so a run directory can store and reuse them.

Every split is drawn with its own ``numpy.random.Generator`` (never the global RNG), seeded from
``(seed, stream)``: the teacher split and the student split use different streams, so changing the
student's k-shot budget never changes the teacher's split. Index lists are sorted, so the JSON file is
stable and easy to diff.

Format of the dict (``DomainShift.splits``)::

    {"format": 1, "setting": str, "seed": int, "k_shot": int | None, "val_per_class": int | None,
     "teacher": {"size": N_t, "train": [...], "val": [...], "test": [...]},
     "student": {"size": N_s, "train": [...], "val": [...], "test": [...], "test_from": "domain"}}

With an explicit student test folder, ``student["test_from"] == "folder"``, ``student["test"]`` indexes
the test folder (``student["test_size"]`` images) and ``student`` may hold an ``"unused"`` list (images
of the student domain that the k-shot budget left out).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from ..atomic import atomic_path

SPLIT_NAMES = ("train", "val", "test")
TEACHER_STREAM, STUDENT_STREAM = 0, 1
FORMAT_VERSION = 1


def make_rng(seed: int, stream: int) -> np.random.Generator:
    """An independent generator per (seed, stream)."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    return np.random.default_rng([int(seed), int(stream)])


def _groups(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels: expected a 1-D array, got shape {labels.shape}")
    return [(int(g), np.flatnonzero(labels == g)) for g in np.unique(labels)]


def split_by_fractions(
    labels: Sequence[int] | np.ndarray,
    fractions: Sequence[float],
    rng: np.random.Generator,
    *,
    group_names: dict[int, str] | None = None,
) -> list[list[int]]:
    """Split indices per group (class) by ``fractions`` (e.g. (0.8, 0.1, 0.1)).

    Parts after the first get ``max(1, round(f * n))`` items each, the first gets the rest, so small
    classes still appear in every split. A group too small for that raises ValueError.
    """
    fr = [float(f) for f in fractions]
    if len(fr) < 2 or any(f <= 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"fractions: expected >= 2 positive numbers summing to 1, got {list(fractions)}")

    def sizes(n: int) -> list[int] | None:
        tail = [max(1, int(round(f * n))) for f in fr[1:]]
        return [n - sum(tail)] + tail if n - sum(tail) >= 1 else None

    return _cut_per_class(labels, rng, len(fr), sizes, group_names,
                          f": too few to split {len(fr)} ways {fr}; it needs at least {len(fr)}")


def split_by_counts(
    labels: Sequence[int] | np.ndarray,
    counts: Sequence[int],
    rng: np.random.Generator,
    *,
    min_rest: int = 1,
    group_names: dict[int, str] | None = None,
) -> list[list[int]]:
    """Take ``counts[j]`` items per class for part j, the remainder forms one more, final part.

    E.g. counts (k, v) gives [k-shot train, v-per-class val, rest]. ``min_rest`` is the number of items
    each class must leave for the final part (1 when it is the test split).
    """
    cnt = [int(c) for c in counts]
    if any(c < 0 for c in cnt):
        raise ValueError(f"counts: expected non-negative per-class counts, got {list(counts)}")
    return _cut_per_class(
        labels, rng, len(cnt) + 1, lambda n: cnt + [n - sum(cnt)] if n >= sum(cnt) + min_rest else None,
        group_names, f" but the split needs {sum(cnt)} per class ({' + '.join(map(str, cnt))}) plus at least "
        f"{min_rest} left over; lower k_shot/val_per_class",
    )


def _cut_per_class(
    labels, rng: np.random.Generator, n_parts: int, sizes, group_names: dict[int, str] | None, too_few: str
) -> list[list[int]]:
    """Per class (in label order): a random permutation of its indices cut into ``sizes(n)`` consecutive
    parts; part j of the result gathers every class's part j (sorted). ``sizes(n)`` is None when a class
    of n items is too small: ValueError "class <name> has <n> image(s)<too_few>"."""
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    for g, idx in _groups(np.asarray(labels)):
        n = len(idx)
        cut = sizes(n)
        if cut is None:
            name = (group_names or {}).get(g, str(g))
            raise ValueError(f"class {name!r} has {n} image(s){too_few}")
        perm = rng.permutation(idx)
        start = 0
        for p, c in zip(parts, cut):
            p.extend(int(i) for i in perm[start : start + c])
            start += c
    return [sorted(p) for p in parts]


def check_splits(splits: dict, *, teacher_size: int, student_size: int, student_test_size: int | None = None) -> None:
    """Raise ValueError unless ``splits`` fits data of these sizes (used when reusing saved splits)."""
    if not isinstance(splits, dict):
        raise ValueError(f"splits: expected a dict, got {type(splits).__name__}")
    for role, size in (("teacher", teacher_size), ("student", student_size)):
        part = splits.get(role)
        if not isinstance(part, dict):
            raise ValueError(f"splits: expected a '{role}' entry with train/val/test index lists")
        if part.get("size") != size:
            raise ValueError(
                f"splits['{role}']['size'] is {part.get('size')!r} but the {role} domain now has {size} images; "
                "the data changed since the splits were saved"
            )
        from_folder = role == "student" and part.get("test_from") == "folder"
        seen: set[int] = set()
        for name in SPLIT_NAMES + ("unused",):
            if name not in part:
                if name == "unused":
                    continue
                raise ValueError(f"splits['{role}']: missing the '{name}' index list")
            ids = part[name]
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError(f"splits['{role}']['{name}']: expected a list of ints")
            limit = size
            if name == "test" and from_folder:
                limit = part.get("test_size") if student_test_size is None else student_test_size
                if part.get("test_size") != limit:
                    raise ValueError(
                        f"splits['student']['test_size'] is {part.get('test_size')!r} but the test folder has "
                        f"{limit} images"
                    )
            if any(i < 0 or i >= limit for i in ids):
                raise ValueError(f"splits['{role}']['{name}']: indices must lie in [0, {limit})")
            if len(set(ids)) != len(ids):
                raise ValueError(f"splits['{role}']['{name}']: duplicate indices")
            if name == "test" and from_folder:
                continue  # indexes a different image set
            if seen & set(ids):
                raise ValueError(f"splits['{role}']['{name}'] overlaps another split of the same domain")
            seen |= set(ids)
        if role == "student" and from_folder != (student_test_size is not None):
            raise ValueError(
                "splits: the saved student test split "
                + ("came from a test folder, but none is given now" if from_folder else "came from the student domain, but a test folder is given now")
            )


def save_splits(path: str | os.PathLike, splits: dict) -> None:
    """Write ``splits`` as JSON, atomically (a crash never leaves a half-written file)."""
    if not isinstance(splits, dict):
        raise ValueError(f"splits: expected a dict, got {type(splits).__name__}")
    with atomic_path(path, ".json") as tmp, open(tmp, "w") as fh:
        json.dump(splits, fh)


def load_splits(path: str | os.PathLike) -> dict:
    """Read splits written by ``save_splits``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"splits file not found: {path}")
    with open(path) as fh:
        try:
            splits = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a valid splits JSON file ({exc})") from None
    if not isinstance(splits, dict) or "teacher" not in splits or "student" not in splits:
        raise ValueError(f"{path}: expected a JSON object with 'teacher' and 'student' entries")
    return splits
