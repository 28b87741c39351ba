"""Image folders that would silently multiply or leak data: link loops, one file under two labels or in
two splits, and decompression bombs. Each is either read once or refused with an error naming the file."""
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from augkd.data import load_setting
from augkd.data.folders import scan_folder

COMMON = dict(teacher_domains=["t"], student_domain="s", k_shot=2, image_size=8)


def _png(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8), mode="L").save(path)


def _tree(root, per_class=5):
    """<root>/{t,s}/{a,b}/NN.png, distinct pixel values everywhere."""
    v = 0
    for dom in ("t", "s"):
        for cls in ("a", "b"):
            for i in range(per_class):
                _png(os.path.join(root, dom, cls, f"{i:02d}.png"), v)
                v += 3


def test_link_loops_are_walked_once(tmp_path):
    root = str(tmp_path)
    _tree(root)
    os.symlink(".", os.path.join(root, "s", "a", "self"))           # class/self -> .
    os.makedirs(os.path.join(root, "s", "a", "deeper"))
    os.symlink("..", os.path.join(root, "s", "a", "deeper", "back"))  # deeper/back -> class a again
    os.symlink(os.path.join(root, "s", "a", "01.png"), os.path.join(root, "s", "a", "deeper", "same.png"))
    classes, paths, labels = scan_folder(os.path.join(root, "s"))
    assert classes == ["a", "b"]
    assert len(paths) == 10 and labels == [0] * 5 + [1] * 5  # each real file once, one label each
    assert len({os.path.realpath(p) for p in paths}) == 10
    d = load_setting("folders", root=root, **COMMON)
    assert len(d.student.train) + len(d.student.val) + len(d.student.test) == 10


def test_link_into_another_class_is_refused(tmp_path):
    root = str(tmp_path)
    _tree(root)
    os.symlink("..", os.path.join(root, "s", "a", "loop"))  # class/loop -> ..: every class inside class a
    with pytest.raises(ValueError, match=r"image .*s/b/00\.png is found in class 'b'.*and in class 'a'|"
                                         r"image .*s/b/00\.png is found in class 'a'.*and in class 'b'"):
        load_setting("folders", root=root, **COMMON)


def test_file_in_two_domains_is_refused(tmp_path):
    root = str(tmp_path)
    _tree(root)
    shared = os.path.join(root, "t", "a", "00.png")
    os.symlink(shared, os.path.join(root, "s", "a", "zz.png"))  # a teacher image also in the student domain
    with pytest.raises(ValueError, match=r"t/a/00\.png is found in student domain 's' and in teacher domain 't'"):
        load_setting("folders", root=root, **COMMON)


def test_file_in_student_domain_and_test_folder_is_refused(tmp_path):
    root = str(tmp_path)
    _tree(root)
    for cls in ("a", "b"):
        _png(os.path.join(root, "test", cls, "00.png"), 200)
    os.remove(os.path.join(root, "test", "b", "00.png"))
    os.symlink(os.path.join(root, "s", "b", "01.png"), os.path.join(root, "test", "b", "00.png"))
    with pytest.raises(ValueError, match=r"s/b/01\.png is found in student domain 's' and in test folder"):
        load_setting("folders", root=root, test_folder="test", **COMMON)


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height: tiny on disk, gigabytes once decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [20000, 9000])  # above Pillow's own error limit, and between the limits
def test_decompression_bomb_is_a_clear_error(tmp_path, side):
    root = str(tmp_path)
    _tree(root)
    bomb = os.path.join(root, "s", "b", "zz_bomb.png")
    _png_header_only(bomb, side, side)
    with pytest.raises(ValueError, match=r"cannot read image .*zz_bomb\.png.*(decompression bomb|DecompressionBomb|exceeds limit)"):
        load_setting("folders", root=root, **COMMON)
