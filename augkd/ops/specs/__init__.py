"""One definition per op (schemas, fakes, autograd, gradient inputs, torch formula, sample inputs).

The Triton registration, the fakes and autograd of every namespace, the build and opcheck tests read the
ops from `SPECS`; tests/test_op_specs.py compares them with csrc/schemas.cpp. Importing this package
needs torch only (no Triton, no compiled extension). Adding an op: docs/adding-an-op.md.
"""

from __future__ import annotations

from . import kd_loss, latent_mixup, pixel_mixup, topk_kd_loss, uncertainty
from ._spec import OpSpec

SPECS: dict[str, OpSpec] = {spec.family: spec for spec in (
    kd_loss.SPEC,
    uncertainty.SPEC,
    latent_mixup.SPEC,
    pixel_mixup.SPEC,
    topk_kd_loss.SPEC,
)}

# every registered op name: <family>_fwd, <family>_bwd for each family
OP_NAMES: tuple[str, ...] = tuple(name for spec in SPECS.values() for name in (spec.fwd, spec.bwd))
SCHEMAS: dict[str, str] = {name: schema for spec in SPECS.values() for name, schema in spec.schemas.items()}

__all__ = ["OpSpec", "SPECS", "OP_NAMES", "SCHEMAS"]
