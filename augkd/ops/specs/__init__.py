"""One definition per op (schemas, fakes, autograd, gradient inputs, torch formula, sample inputs).

The Triton registration, the fakes and autograd of every namespace, the build and opcheck tests read the
ops from `SPECS`; tests/test_op_specs.py compares them with csrc/schemas.cpp. Importing this package
needs torch only (no Triton, no compiled extension). Adding an op: docs/adding-an-op.md.
"""

from __future__ import annotations

import importlib

from ._spec import OpSpec
from .kd_loss import GRAD_IN_PLACE_SCHEMA

# the op families, one module each (augkd/ops/specs/<family>.py holding SPEC): one line per op
FAMILIES = (
    "kd_loss",
    "uncertainty",
    "latent_mixup",
    "pixel_mixup",
    "topk_kd_loss",
    "kd_divergence",
)

SPECS: dict[str, OpSpec] = {family: importlib.import_module(f"{__name__}.{family}").SPEC for family in FAMILIES}

# every registered op name: <family>_fwd, <family>_bwd for each family
OP_NAMES: tuple[str, ...] = tuple(name for spec in SPECS.values() for name in (spec.fwd, spec.bwd))
SCHEMAS: dict[str, str] = {name: schema for spec in SPECS.values() for name, schema in spec.schemas.items()}
# kernel entry points outside the fwd/bwd families: one backend implements them, no autograd or fake; their
# callers check that the op exists and run the family's ops otherwise
SINGLE_BACKEND_SCHEMAS: dict[str, str] = {"kd_loss_grad_": GRAD_IN_PLACE_SCHEMA}

__all__ = ["OpSpec", "SPECS", "OP_NAMES", "SCHEMAS", "SINGLE_BACKEND_SCHEMAS"]
