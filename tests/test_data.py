"""Tests for augkd.data: embedded digits, splits, image folders, transforms."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from augkd.data import (
    SETTINGS,
    DomainShift,
    Split,
    augment,
    load_setting,
    load_splits,
    normalize,
    save_splits,
)
from augkd.data.digits import load_mnist5k, load_optdigits
from augkd.data.splits import make_rng, split_by_counts, split_by_fractions

# tiny tensors: single-threaded (see the one_thread fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- embedded digits

@pytest.mark.parametrize("loader,n", [(load_mnist5k, 5000), (load_optdigits, 1797)])
def test_digits_domains(loader, n):
    x, y = loader()
    assert x.shape == (n, 1, 16, 16) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert float(x.max()) > 0.9  # really uses the range, not e.g. 0..1/255
    assert sorted(y.unique().tolist()) == list(range(10))
    assert int(y.bincount().min()) >= 170


@pytest.fixture(scope="module")
def fwd():
    return load_setting("digits-shift", seed=0)


def _all_indices(part):
    return part["train"] + part["val"] + part["test"]


def test_digits_setting_shapes(fwd):
    assert isinstance(fwd, DomainShift)
    assert fwd.name == "digits-shift" and fwd.num_classes == 10 and fwd.image_shape == (1, 16, 16)
    assert fwd.class_names == [str(i) for i in range(10)]
    assert (fwd.teacher.name, fwd.student.name) == ("mnist5k", "optdigits")
    assert [len(s) for s in (fwd.teacher.train, fwd.teacher.val, fwd.teacher.test)] == [4000, 500, 500]
    assert [len(s) for s in (fwd.student.train, fwd.student.val, fwd.student.test)] == [100, 100, 1597]
    for split in (fwd.teacher.train, fwd.student.test):
        assert isinstance(split, Split) and split.images.dtype == torch.float32
        assert tuple(split.images.shape[1:]) == (1, 16, 16)
    # mean/std = teacher train statistics
    assert fwd.mean[0] == pytest.approx(float(fwd.teacher.train.images.mean()), rel=1e-4)
    assert fwd.std[0] == pytest.approx(float(fwd.teacher.train.images.std(unbiased=False)), rel=1e-4)


def test_digits_rev():
    rev = load_setting("digits-shift-rev", seed=0, k_shot=3)
    assert (rev.teacher.name, rev.student.name) == ("optdigits", "mnist5k")
    assert len(rev.teacher.train) + len(rev.teacher.val) + len(rev.teacher.test) == 1797
    assert len(rev.student.train) == 30 and len(rev.student.val) == 30 and len(rev.student.test) == 4940


def test_splits_stratified_disjoint_exact(fwd):
    s, t = fwd.splits["student"], fwd.splits["teacher"]
    for part, size in ((s, 1797), (t, 5000)):
        ids = _all_indices(part)
        assert len(ids) == len(set(ids)) == size  # disjoint and complete
    assert fwd.student.train.labels.bincount().tolist() == [10] * 10
    assert fwd.student.val.labels.bincount().tolist() == [10] * 10
    # teacher: 80/10/10 inside every class (500 per class in MNIST-5k)
    assert fwd.teacher.train.labels.bincount().tolist() == [400] * 10
    assert fwd.teacher.test.labels.bincount().tolist() == [50] * 10
    # the split tensors are the indexed images
    _, sy = load_optdigits()
    assert torch.equal(fwd.student.train.labels, sy[torch.tensor(s["train"])])


def test_splits_deterministic_and_seeded(fwd):
    again = load_setting("digits-shift", seed=0)
    assert again.splits == fwd.splits
    assert torch.equal(again.student.train.images, fwd.student.train.images)
    other = load_setting("digits-shift", seed=1)
    assert other.splits["student"]["train"] != fwd.splits["student"]["train"]
    assert other.splits["teacher"]["train"] != fwd.splits["teacher"]["train"]
    # the student budget does not move the teacher split (separate RNG streams)
    k5 = load_setting("digits-shift", seed=0, k_shot=5, val_per_class=2)
    assert k5.splits["teacher"] == fwd.splits["teacher"]
    assert k5.student.train.labels.bincount().tolist() == [5] * 10
    assert k5.student.val.labels.bincount().tolist() == [2] * 10


def test_student_fraction_split():
    d = load_setting("digits-shift", seed=0, k_shot=None)
    n = [len(d.student.train), len(d.student.val), len(d.student.test)]
    assert sum(n) == 1797 and abs(n[0] - 0.8 * 1797) < 15 and abs(n[1] - 0.1 * 1797) < 10


def test_split_helpers_errors():
    rng = make_rng(0, 0)
    with pytest.raises(ValueError, match=r"class '1' has 3 image\(s\) but the split needs 4 per class \(2 \+ 2\)"):
        split_by_counts(np.array([0] * 10 + [1] * 3), (2, 2), rng)
    with pytest.raises(ValueError, match=r"class 'b' has 2 image\(s\): too few to split 3 ways"):
        split_by_fractions(np.array([1, 1, 0, 0, 0]), (0.5, 0.25, 0.25), rng, group_names={1: "b"})
    with pytest.raises(ValueError, match="fractions"):
        split_by_fractions(np.array([0, 0, 0]), (0.5, 0.6), rng)
    with pytest.raises(ValueError, match="seed"):
        make_rng(-1, 0)
    with pytest.raises(ValueError, match="k_shot"):
        load_setting("digits-shift", k_shot=0)
    with pytest.raises(ValueError, match="val_per_class"):
        load_setting("digits-shift", k_shot=None, val_per_class=3)
    with pytest.raises(ValueError, match="too few|needs"):
        load_setting("digits-shift", k_shot=100, val_per_class=100)


def test_save_load_splits_roundtrip(fwd, tmp_path):
    path = tmp_path / "run" / "splits.json"
    save_splits(path, fwd.splits)
    loaded = load_splits(path)
    assert loaded == fwd.splits
    reused = load_setting("digits-shift", seed=123, splits=loaded)  # the seed is ignored when splits are given
    assert torch.equal(reused.student.train.images, fwd.student.train.images)
    assert torch.equal(reused.teacher.val.labels, fwd.teacher.val.labels)
    with pytest.raises(ValueError, match="teacher_domains"):  # splits of another setting do not fit
        load_setting("digits-shift-rev", splits={**loaded, "setting": "digits-shift-rev"})
    with pytest.raises(ValueError, match="size"):  # the data changed since the splits were saved
        load_setting("digits-shift", splits={**loaded, "student": {**loaded["student"], "size": 1700}})
    with pytest.raises(ValueError, match="setting"):
        load_setting("digits-shift-rev", splits=loaded)
    bad = {**loaded, "student": {**loaded["student"], "val": loaded["student"]["train"][:3]}}
    with pytest.raises(ValueError, match="overlaps"):
        load_setting("digits-shift", splits=bad)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_splits(tmp_path / "broken.json")


def test_unknown_setting_and_misplaced_args():
    assert SETTINGS == ("digits-shift", "digits-shift-rev", "folders")
    with pytest.raises(ValueError, match="unknown setting 'office'"):
        load_setting("office")
    with pytest.raises(ValueError, match="root"):
        load_setting("digits-shift", root="/tmp")


# ---------------------------------------------------------------- image folders

CLASSES = {"zero": 0, "one": 1, "two": 2}  # sorted order: one, two, zero


def _write_domain(base, images, labels, layout: str, per_class: int, offset: int, rgb: bool = False):
    """Export digits as PNGs; returns {class name: [uint8 arrays written]} in file order."""
    written = {}
    for cname, digit in CLASSES.items():
        folder = os.path.join(base, "images", cname) if layout == "office" else os.path.join(base, cname)
        os.makedirs(folder, exist_ok=True)
        idx = torch.nonzero(labels == digit).flatten()[offset : offset + per_class]
        written[cname] = []
        for j, i in enumerate(idx.tolist()):
            arr = (images[i, 0] * 255).round().to(torch.uint8).numpy()
            img = Image.fromarray(arr, mode="L")
            (img.convert("RGB") if rgb else img).save(os.path.join(folder, f"{j:03d}.png"))
            written[cname].append(arr)
    return written


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("folders"))
    mx, my = load_mnist5k()
    ox, oy = load_optdigits()
    written = {
        "amazon": _write_domain(os.path.join(root, "amazon"), mx, my, "office", 12, 0, rgb=True),
        "webcam": _write_domain(os.path.join(root, "webcam"), mx, my, "plain", 10, 100),
        "dslr": _write_domain(os.path.join(root, "dslr"), ox, oy, "office", 14, 0),
        "dslr_test": _write_domain(os.path.join(root, "dslr_test"), ox, oy, "plain", 5, 50),
    }
    return root, written


def test_folders_loading(tree):
    root, written = tree
    d = load_setting("folders", root=root, teacher_domains=["amazon", "webcam"], student_domain="dslr",
                     k_shot=3, val_per_class=2, image_size=16, seed=0)
    assert d.name == f"folders:{os.path.abspath(root)}"
    assert d.class_names == ["one", "two", "zero"]  # sorted folder names, like ImageFolder
    assert d.num_classes == 3 and d.image_shape == (3, 16, 16) and len(d.mean) == 3
    assert d.teacher.name == "amazon+webcam" and d.student.name == "dslr"
    # teacher: both domains, split 80/10/10 per (domain, class): 12 -> 10/1/1, 10 -> 8/1/1
    assert len(d.teacher.train) == 3 * (10 + 8) and len(d.teacher.val) == 6 and len(d.teacher.test) == 6
    assert d.student.train.labels.bincount().tolist() == [3, 3, 3]
    assert d.student.val.labels.bincount().tolist() == [2, 2, 2]
    assert len(d.student.test) == 3 * (14 - 5)
    # pixels and labels survive the round trip (same size: no resampling); class "zero" has label 2
    x = d.student.train.images
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    all_student = d.splits["student"]
    first = min(all_student["train"] + all_student["val"] + all_student["test"])
    assert first == 0
    zero_imgs = written["dslr"]["zero"]
    got = (d.student.train.images[d.student.train.labels == 2][:, 0] * 255).round().to(torch.uint8)
    assert any(np.array_equal(g.numpy(), w) for g in got for w in zero_imgs)
    assert torch.equal(d.student.train.images[:, 0], d.student.train.images[:, 2])  # gray PNG -> equal RGB channels
    # deterministic
    again = load_setting("folders", root=root, teacher_domains=["amazon", "webcam"], student_domain="dslr",
                         k_shot=3, val_per_class=2, image_size=16, seed=0)
    assert again.splits == d.splits and torch.equal(again.teacher.train.images, d.teacher.train.images)


def test_folders_options_and_test_folder(tree, tmp_path):
    root, _ = tree
    d = load_setting("folders", root=root, teacher_domains=["webcam"], student_domain="dslr",
                     test_folder="dslr_test", k_shot=None, image_size=8, grayscale=True)
    assert d.image_shape == (1, 8, 8) and tuple(d.student.test.images.shape) == (15, 1, 8, 8)
    assert len(d.student.train) + len(d.student.val) == 42 and len(d.student.val) == 9  # 80/20 of 14 per class
    assert d.splits["student"]["test_from"] == "folder"
    # reuse of saved folder splits, through JSON
    save_splits(tmp_path / "s.json", d.splits)
    r = load_setting("folders", root=root, teacher_domains=["webcam"], student_domain="dslr",
                     test_folder=os.path.join(root, "dslr_test"), k_shot=None, image_size=8, grayscale=True,
                     splits=load_splits(tmp_path / "s.json"))
    assert torch.equal(r.student.val.images, d.student.val.images)
    with pytest.raises(ValueError, match="teacher_domains"):  # same sizes would not catch a swapped domain
        load_setting("folders", root=root, teacher_domains=["amazon"], student_domain="dslr",
                     test_folder="dslr_test", k_shot=None, image_size=8, splits={**d.splits, "teacher": {
                         **d.splits["teacher"], "size": 36}})
    # k-shot with a test folder: leftovers are kept as "unused"
    k = load_setting("folders", root=root, teacher_domains=["webcam"], student_domain="dslr",
                     test_folder="dslr_test", k_shot=2, image_size=8)
    assert len(k.student.train) == 6 and len(k.splits["student"]["unused"]) == 3 * 10


def _copy_tree(src_root, dst_root, domains):
    import shutil

    for d in domains:
        shutil.copytree(os.path.join(src_root, d), os.path.join(dst_root, d))


def test_folders_errors(tree, tmp_path):
    root, _ = tree
    common = dict(teacher_domains=["amazon"], student_domain="dslr", k_shot=2, image_size=8)
    with pytest.raises(ValueError, match="root: folder not found"):
        load_setting("folders", root=str(tmp_path / "nope"), **common)
    with pytest.raises(ValueError, match="root"):
        load_setting("folders", teacher_domains=["amazon"], student_domain="dslr")
    with pytest.raises(ValueError, match="'caltech' not found"):
        load_setting("folders", root=root, teacher_domains=["caltech"], student_domain="dslr")
    with pytest.raises(ValueError, match="teacher_domains"):
        load_setting("folders", root=root, teacher_domains="amazon", student_domain="dslr")
    with pytest.raises(ValueError, match="teacher_domains"):
        load_setting("folders", root=root, teacher_domains=["amazon", "amazon"], student_domain="dslr")
    with pytest.raises(ValueError, match="student_domain"):
        load_setting("folders", root=root, teacher_domains=["amazon", "dslr"], student_domain="dslr")
    with pytest.raises(ValueError, match="test_folder"):
        load_setting("folders", root=root, test_folder="nowhere", **common)

    bad = tmp_path / "bad"
    _copy_tree(root, str(bad), ["amazon", "dslr"])
    os.rename(bad / "dslr" / "images" / "two", bad / "dslr" / "images" / "three")
    with pytest.raises(ValueError, match=r"class folders differ.*\['three'\].*\['two'\]|class folders differ"):
        load_setting("folders", root=str(bad), **common)

    empty = tmp_path / "empty"
    _copy_tree(root, str(empty), ["amazon", "dslr"])
    for f in os.listdir(empty / "dslr" / "images" / "one"):
        os.unlink(empty / "dslr" / "images" / "one" / f)
    with pytest.raises(ValueError, match="holds no images"):
        load_setting("folders", root=str(empty), **common)

    bare = tmp_path / "bare"
    os.makedirs(bare / "amazon")
    os.makedirs(bare / "dslr")
    with pytest.raises(ValueError, match="no class folders"):
        load_setting("folders", root=str(bare), **common)

    corrupt = tmp_path / "corrupt"
    _copy_tree(root, str(corrupt), ["amazon", "dslr"])
    (corrupt / "dslr" / "images" / "one" / "zzz.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        load_setting("folders", root=str(corrupt), **common)


# ---------------------------------------------------------------- transforms

def test_normalize():
    x = torch.rand(4, 3, 5, 5, requires_grad=True)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    out = normalize(x, mean, std)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(out, expected)
    out.sum().backward()
    assert torch.allclose(x.grad[:, 1], torch.full((4, 5, 5), 4.0))
    with pytest.raises(ValueError, match="mean"):
        normalize(x, (0.1, 0.2), std)
    with pytest.raises(ValueError, match="x"):
        normalize(torch.rand(3, 5, 5), mean, std)


def test_augment_shifts():
    x = torch.rand(64, 2, 8, 8)
    a = augment(x, pad=2, generator=torch.Generator().manual_seed(0))
    b = augment(x, pad=2, generator=torch.Generator().manual_seed(0))
    c = augment(x, pad=2, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(augment(x, pad=0), x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shifts = set()
    for i in range(x.shape[0]):  # every sample is one crop of its own zero-padded image
        hits = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(a[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert hits
        shifts.update(hits)
    assert len(shifts) > 5  # offsets differ per sample
    r = augment(x, pad=2, padding_mode="reflect", generator=torch.Generator().manual_seed(0))
    assert r.shape == x.shape
    f = augment(x, pad=0, hflip=True, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(f[i], x[i].flip(-1)) for i in range(64)]
    assert 10 < sum(flipped) < 54 and all(fl or torch.equal(f[i], x[i]) for i, fl in enumerate(flipped))
    with pytest.raises(ValueError, match="pad"):
        augment(x, pad=-1)
    with pytest.raises(ValueError, match="padding_mode"):
        augment(x, padding_mode="edge")


def test_folder_cache(tree, tmp_path):
    root, _ = tree
    cache = tmp_path / "cache"
    kw = dict(root=root, teacher_domains=["webcam"], student_domain="dslr", k_shot=2, image_size=8, cache_dir=str(cache))
    first = load_setting("folders", **kw)
    files = sorted(os.listdir(cache))
    assert len(files) == 2 and all(f.endswith(".npz") for f in files)  # teacher + student arrays
    second = load_setting("folders", **kw)
    assert sorted(os.listdir(cache)) == files
    assert torch.equal(first.student.test.images, second.student.test.images)
    assert torch.equal(first.teacher.train.images, second.teacher.train.images)
    third = load_setting("folders", **{**kw, "image_size": 4})  # other options -> other cache entries
    assert third.image_shape == (3, 4, 4) and len(os.listdir(cache)) == 4
