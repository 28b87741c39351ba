"""The op specs (augkd/ops/specs) against the C++ schemas and against themselves.

The C++ side is read as text from csrc/schemas.cpp, so these tests run without a built extension: a schema
edited in one place and not the other fails here first.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re

import pytest
import torch

from augkd.ops import _extension, backends
from augkd.ops.specs import OP_NAMES, SCHEMAS, SINGLE_BACKEND_SCHEMAS, SPECS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ops of the C++ library that are no kernel op of a spec (a build probe)
CPP_ONLY = {"built_with_cuda": "() -> bool"}

_LITERAL = r'"(?:[^"\\]|\\.)*"'


def _normalise(schema: str) -> str:
    return re.sub(r"\s+", " ", schema).strip()


def cpp_schemas(text: str) -> dict[str, str]:
    """{op name: schema after the name} of every `m.def(...)` in C++ source: the op string is one or more
    adjacent string literals (C concatenates them), comments and line breaks anywhere in between."""
    text = re.sub(r"//[^\n]*", "", text)
    found = {}
    for match in re.finditer(r"\bm\.def\s*\(\s*((?:" + _LITERAL + r"\s*)+)", text):
        parts = re.findall(_LITERAL, match.group(1))
        full = "".join(bytes(p[1:-1], "utf-8").decode("unicode_escape") for p in parts)
        name, rest = full.split("(", 1)
        assert name.strip() not in found, f"{name} is defined twice"
        found[name.strip()] = _normalise("(" + rest)
    return found


def test_the_parser_reads_concatenated_literals_and_skips_comments():
    text = ('m.def(\n  "a_fwd(Tensor x, "  // a comment "with quotes"\n  "float t) -> Tensor");\n'
            'm.def("b() -> bool", []() -> bool { return true; });\n// m.def("c() -> bool");\n')
    assert cpp_schemas(text) == {"a_fwd": "(Tensor x, float t) -> Tensor", "b": "() -> bool"}


def test_csrc_schemas_equal_the_specs():
    with open(os.path.join(ROOT, "csrc", "schemas.cpp")) as f:
        cpp = cpp_schemas(f.read())
    expected = {name: _normalise(schema) for name, schema in (SCHEMAS | SINGLE_BACKEND_SCHEMAS).items()} | CPP_ONLY
    assert sorted(cpp) == sorted(expected), "ops in csrc/schemas.cpp and in augkd/ops/specs differ"
    for name, schema in expected.items():
        assert cpp[name] == schema, f"{name}: csrc/schemas.cpp says {cpp[name]!r}, the spec {schema!r}"


@pytest.mark.skipif(not _extension.LOADED, reason=f"extension not loaded: {_extension.WHY_NOT_LOADED}")
@pytest.mark.parametrize("name", OP_NAMES)
def test_registered_cpp_schemas_equal_the_specs(name):
    registered = str(getattr(torch.ops.augkd, name).default._schema)
    assert _normalise(registered) == f"augkd::{name}" + _normalise(SCHEMAS[name])


@pytest.mark.skipif(not _extension.LOADED, reason=f"extension not loaded: {_extension.WHY_NOT_LOADED}")
@pytest.mark.parametrize("name", SINGLE_BACKEND_SCHEMAS)
def test_registered_single_backend_schemas_equal_the_specs(name):
    registered = str(getattr(torch.ops.augkd, name).default._schema)
    assert _normalise(registered) == f"augkd::{name}" + _normalise(SINGLE_BACKEND_SCHEMAS[name])


def test_op_names_are_fwd_and_bwd_of_each_family():
    assert OP_NAMES == tuple(n for family in SPECS for n in (f"{family}_fwd", f"{family}_bwd"))
    assert all(spec.family == family for family, spec in SPECS.items())


@pytest.mark.parametrize("family", SPECS)
def test_gradient_inputs_and_flags_agree_with_the_schemas(family):
    spec = SPECS[family]
    inputs, bwd_inputs = spec.input_names("fwd"), spec.input_names("bwd")
    assert spec.grad_inputs and set(spec.grad_inputs) <= set(inputs), spec.grad_inputs
    flags = [n for n in bwd_inputs if n.endswith("_grad")]
    if flags:  # a backward with flags has exactly one per differentiable input, in order
        assert flags == [f"{n}_grad" for n in spec.grad_inputs], flags
    # the backward reads every forward tensor (it recomputes from them and the saved statistics); scalars
    # that only weight the terms may be folded into the incoming per-row gradients instead
    args = spec.fwd_schema[spec.fwd_schema.index("(") + 1:spec.fwd_schema.index(")")].split(",")
    tensors = {a.split()[-1] for a in args if a.split()[0].startswith("Tensor")}
    assert tensors <= set(bwd_inputs), tensors - set(bwd_inputs)


@pytest.mark.parametrize("family", SPECS)
def test_fakes_take_the_schema_arguments(family):
    spec = SPECS[family]
    for which, fake in (("fwd", spec.fake_fwd), ("bwd", spec.fake_bwd)):
        params = inspect.signature(fake).parameters.values()
        named = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        names = spec.input_names(which)
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            names = names[:len(named)]
        assert tuple(named) == names, f"{family} fake {which}: {named} != {names}"


@pytest.mark.parametrize("family", SPECS)
def test_reference_and_samples_exist(family):
    spec = SPECS[family]
    assert callable(spec.reference_function()), spec.reference
    samples = spec.samples(False)
    assert samples, f"{family}: no sample inputs"
    for args in samples:
        assert len(args) == len(spec.input_names("fwd")), f"{family}: sample of {len(args)} arguments"
        out = spec.fake_fwd(*args)  # the fake accepts the samples
        assert out is not None


def test_triton_registers_every_spec_op():
    """A spec'd op without its Triton kernels would make the whole Triton backend unavailable, and its tests
    skip: where Triton can run, loading it must succeed and register every op of every spec."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set: Triton cannot run here")
    assert backends.load_triton() == ""
    from augkd.ops import triton_kernels

    assert tuple(triton_kernels.OPS) == OP_NAMES
    for name, op in triton_kernels.OPS.items():
        assert _normalise(str(op.default._schema)) == f"augkd_triton::{name}" + _normalise(SCHEMAS[name])
