"""Value checks on a configuration, made before anything runs: every number finite and in its range,
network widths that build, architectures that exist.

``check_config`` runs on every resolved configuration (``config.build_config``); ``check_user_values``
runs on the values a config file sets, so a bad value there is reported even when a command-line
override replaces it; ``check_architectures`` runs when a run directory is prepared.
"""
from __future__ import annotations

import math
import typing
from typing import Any

from .ops.reference import TEMPERATURE_RANGE

# Range of each float key: (low, low_inclusive, high, high_inclusive); None = unbounded. Any other float
# key must only be finite.
POSITIVE = (0.0, False, None, False)
NON_NEGATIVE = (0.0, True, None, False)
UNIT = (0.0, True, 1.0, True)
# kd_loss accepts temperatures in this range only: checked here too, so that a run refuses a bad one before
# training rather than when Module 3 first calls the loss
KD_TEMPERATURE = (TEMPERATURE_RANGE[0], True, TEMPERATURE_RANGE[1], True)
FLOAT_RANGES: dict[str, tuple] = {
    "teacher.lr": POSITIVE, "teacher.weight_decay": NON_NEGATIVE,
    "df.g_lr": POSITIVE, "df.s_lr": POSITIVE, "df.e_lr": POSITIVE, "df.s_weight_decay": NON_NEGATIVE,
    "df.adv_weight": NON_NEGATIVE, "df.pseudo_ce_weight": NON_NEGATIVE, "df.balance_weight": NON_NEGATIVE,
    "df.bn_weight": NON_NEGATIVE, "df.cvae_kl_weight": NON_NEGATIVE,
    "anchor.lr": POSITIVE, "anchor.invariant": UNIT, "anchor.energy_temperature": POSITIVE,
    "anchor.ce_weight": NON_NEGATIVE, "anchor.balance_weight": NON_NEGATIVE,
    "mixup.lr": POSITIVE, "mixup.weight_decay": NON_NEGATIVE, "mixup.a": POSITIVE, "mixup.b": UNIT,
    "mixup.temperature": KD_TEMPERATURE, "mixup.u": UNIT, "mixup.warmup_factor": UNIT,
    "baseline.kd_u": UNIT,
}

DIGITS_IMAGE_SIZE = 16
FOLDERS_DEFAULT_IMAGE_SIZE = 32


def _is_float_type(tp: Any) -> bool:
    return tp is float or (float in typing.get_args(tp))


def _range_text(r: tuple) -> str:
    lo, lo_in, hi, hi_in = r
    if hi is None:
        return f"a finite value {'>=' if lo_in else '>'} {lo:g}"
    return f"a value in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def check_float(key: str, value: float, source: str = "") -> None:
    where = f" (set in {source})" if source else ""
    r = FLOAT_RANGES.get(key)
    if not math.isfinite(value):
        raise _error(f"{key}: expected {_range_text(r) if r else 'a finite number'}, got {value}{where}")
    if r is None:
        return
    lo, lo_in, hi, hi_in = r
    if (value < lo or (value == lo and not lo_in)) or (hi is not None and (value > hi or (value == hi and not hi_in))):
        raise _error(f"{key}: expected {_range_text(r)}, got {value}{where}")


def _error(msg: str):
    from .config import ConfigError

    return ConfigError(msg)


def check_user_values(values: dict[str, Any], source: str) -> None:
    """Check the float values of ``values`` (dotted keys, as read from ``source``). Other keys are typed
    and checked when the configuration is built."""
    from .config import coerce, field_types

    types = field_types()
    for key, value in values.items():
        tp = types.get(key)
        if tp is None or not _is_float_type(tp) or value is None:
            continue
        check_float(key, coerce(key, value, tp), source)


def _check_hidden(key: str, dims: list[int], side: int | None) -> None:
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise _error(f"{key}: expected a list of at least 2 positive channel counts, got {dims}")
    if side is not None and side % 2 ** (len(dims) - 1):
        raise _error(
            f"{key}: {len(dims)} entries mean {len(dims) - 1} x2 resolution steps, so the image side must be a "
            f"multiple of {2 ** (len(dims) - 1)}; this setting's images are {side}x{side}"
        )


def _check_arch(key: str, name: str) -> None:
    from .models.classifiers import SMALL_CNNS, torchvision_names

    if name in SMALL_CNNS:
        return
    known = torchvision_names()
    if not known:
        raise _error(f"{key}: {name!r} is not a built-in architecture ({', '.join(SMALL_CNNS)}) and torchvision, "
                     "which provides the others, is not installed")
    if name not in known:
        raise _error(f"{key}: unknown architecture {name!r}; expected one of {', '.join(SMALL_CNNS)} or a torchvision "
                     "classification model (e.g. resnet18, mobilenet_v3_small)")


def check_config(cfg) -> None:
    """Everything the type alone cannot say, for a resolved ``RunConfig``."""
    from .config import field_types, get_value

    for key, tp in field_types().items():
        value = get_value(cfg, key)
        if _is_float_type(tp) and value is not None:
            check_float(key, value)
    # Module 2 trains BatchNorm1d layers, which cannot take a batch of one sample.
    if cfg.anchor.batch_size < 2:
        raise _error(f"anchor.batch_size: expected at least 2 (AnchorNet's BatchNorm needs 2 samples per batch), "
                     f"got {cfg.anchor.batch_size}")
    side = DIGITS_IMAGE_SIZE if cfg.data.setting != "folders" else (cfg.data.image_size or FOLDERS_DEFAULT_IMAGE_SIZE)
    _check_hidden("df.generator_hidden", cfg.df.generator_hidden, side)
    _check_hidden("df.encoder_hidden", cfg.df.encoder_hidden, side)
    if cfg.data.image_size is not None and cfg.data.image_size < 4:
        raise _error(f"data.image_size: expected an int >= 4, got {cfg.data.image_size}")


def check_architectures(cfg) -> None:
    """The classifier names exist here (torchvision names need torchvision installed). Checked when a run
    starts rather than when a config is built, so that a config naming a torchvision model still loads on
    a machine without torchvision."""
    _check_arch("teacher.arch", cfg.teacher.arch)
    _check_arch("student.arch", cfg.student.arch)
