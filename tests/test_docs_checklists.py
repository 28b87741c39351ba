"""docs/adding-an-op.md and docs/adding-a-backend.md against the code: every spec'd op has what the checklist
asks for, and the files and names the checklists cite exist."""

from __future__ import annotations

import importlib
import os
import re

import pytest

from augkd.ops import backends
from augkd.ops.specs import FAMILIES, SPECS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("docs/adding-an-op.md", "docs/adding-a-backend.md")


def _read(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


@pytest.mark.parametrize("doc", DOCS)
def test_cited_paths_exist(doc):
    """Every repository path in backticks (a template with <family> aside) names a file or folder."""
    paths = {p for p in re.findall(r"`([\w./-]+/[\w./-]*)`", _read(doc)) if "<" not in p}
    assert paths, f"{doc} cites no path"
    missing = sorted(p for p in paths if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"{doc} cites paths that do not exist: {missing}"


def test_cited_names_exist():
    """The functions and tables the checklists tell a contributor to use."""
    from augkd.ops import _registration
    from augkd.ops.specs import _spec

    assert callable(_registration.register) and callable(_registration.call)
    assert callable(_spec.graph_grads) and _spec.OpSpec
    assert callable(backends.select) and callable(backends.namespace) and callable(backends.load)
    assert callable(backends.load_triton) and backends.Unavailable and backends.Why
    assert isinstance(backends.TABLE, dict) and all(isinstance(b, backends.Backend) for b in backends.TABLE.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_op_has_its_parts(family):
    """A spec module of its own, a reference, fakes, a backward, a public function and matrix cases."""
    spec = SPECS[family]
    assert spec.family == family and os.path.exists(os.path.join(ROOT, "augkd", "ops", "specs", f"{family}.py"))
    assert callable(spec.reference_function()), f"{family}: reference {spec.reference} is not callable"
    assert callable(spec.fake_fwd) and callable(spec.fake_bwd), f"{family}: fakes"
    assert callable(spec.backward_for(lambda *args: None)), f"{family}: backward_for must return the backward"
    assert callable(spec.setup_context) and spec.samples(False), f"{family}: setup_context, samples"
    public = importlib.import_module("augkd.ops")
    entry = spec.public_name
    assert callable(getattr(public, entry, None)), f"augkd.ops.{entry} (the public function) is missing"
    tests = [name for name in os.listdir(os.path.join(ROOT, "tests")) if name.startswith("test_")]
    matrix = [name for name in tests if "BACKEND_DEVICES" in (text := _read(os.path.join("tests", name)))
              and re.search(rf"\b{entry}\(", text) and (entry == family or family in name)]
    assert matrix, f"{family}: no test file runs it over BACKEND_DEVICES (tests/matrix.py)"


def test_every_backend_row_is_complete():
    for entry in backends.TABLE.values():
        assert entry.name in backends.BACKENDS and isinstance(entry.priority, int)
        assert entry.devices is None or entry.devices, entry.name
        reason = entry.probe()
        assert reason is None or isinstance(reason, backends.Unavailable), entry.name
    kernel = [b for b in backends.TABLE.values() if b.namespace is not None]
    assert kernel and all(b.devices for b in kernel)
