"""Run configuration: typed dataclasses, presets, TOML/YAML files and ``key=value`` overrides.

Every hyperparameter of the three stages lives here, and so does every switch that separates the
paper-faithful behaviour (the default) from the released code's behaviour (``preset = "official"``).
docs/fidelity.md lists the switches and the bugs of the released code (B1...) behind them.

Precedence, lowest first: dataclass defaults < preset < method < config file < command-line overrides.
The preset and the method are applied *under* the user's keys so that ``preset="official"`` plus
``mixup.u_schedule="tied"`` means "official, except that one switch".
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, published separately before it joined the standard library
    import tomli as tomllib

Method = Literal["augkd", "official", "dfkd", "ce", "kd", "no-anchor", "no-mixup"]
Preset = Literal["faithful", "official"]
Device = Literal["auto", "cpu", "cuda"]


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type, impossible value. The message says which."""


@dataclass
class DataConfig:
    setting: str = "digits-shift"  # "digits-shift", "digits-shift-rev" or "folders"
    root: Optional[str] = None  # folders: dataset root holding the domain folders
    teacher_domains: Optional[list[str]] = None  # folders: teacher domain folder names
    student_domain: Optional[str] = None  # folders: student domain folder name
    test_folder: Optional[str] = None  # folders: separate student test folder (else auto split)
    image_size: Optional[int] = None  # folders: resize to this size (None: the data default)
    # Labelled student images per class. The method's claim is about the low-label regime
    # (docs/prior-measurements.md): with many labels plain CE already wins. 0: no k-shot split, the
    # student domain is split 80/10/10 like the official DA_SPLIT.
    k_shot: int = 10
    val_per_class: Optional[int] = None  # None: the data module's default
    augment_pad: int = 2  # random shifts of +-pad pixels on every training batch (RandomCrop analogue)
    hflip: bool = False  # horizontal flips change digit identity; turn on for natural images


@dataclass
class TeacherConfig:
    arch: str = "cnn-teacher"
    pretrained: bool = False
    path: Optional[str] = None  # an existing teacher state_dict; None: train one first
    epochs: int = 10
    lr: float = 1e-3
    # The official train_teacher parses --t_wd but never passes it to Adam (B9): 0 reproduces that.
    weight_decay: float = 0.0
    batch_size: int = 64


@dataclass
class StudentConfig:
    arch: str = "cnn-student"
    pretrained: bool = False


@dataclass
class DataFreeConfig:
    """Module 1: generator G, encoder E and the DFKD warm-up of the student."""

    epochs: int = 6
    iters_per_epoch: int = 40  # the official code hard-codes 200
    batch_size: int = 64
    student_steps: int = 5  # S+E steps per G step (official: 5)
    latent_size: int = 32
    generator_hidden: list[int] = field(default_factory=lambda: [64, 32])
    encoder_hidden: list[int] = field(default_factory=lambda: [16, 32, 64])
    g_lr: float = 1e-3
    s_lr: float = 1e-3
    s_weight_decay: float = 1e-4
    e_lr: float = 1e-4
    # Generator loss weights (the official code: 1, 1, 20 with log10, 1).
    adv_weight: float = 1.0
    pseudo_ce_weight: float = 1.0
    balance_weight: float = 20.0
    bn_weight: float = 1.0
    cvae_kl_weight: float = 0.00025
    val_batches: int = 10  # val_z = val_batches * batch_size fixed latents (official: 10 * B)
    # B4: the official code creates a cosine scheduler for E but never steps it.
    step_encoder_scheduler: bool = True
    # Best-epoch keys. "official": lowest val generator loss, then lowest val CVAE loss, then the
    # student's val accuracy (the official third key peeks at the test split, B10: never here).
    # "student": the student's val Acc/Acc@3/Acc@5 first. "last": the last epoch.
    selection: Literal["official", "student", "last"] = "official"


@dataclass
class AnchorConfig:
    """Module 2: the AnchorNet that maps student-domain latents towards the teacher domain."""

    epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 256
    invariant: float = 0.25  # alpha: the intended share of latent dimensions kept as they are
    energy_temperature: float = 1.0
    ce_weight: float = 0.1
    # B6: "per_sample" = mean_i |sum_j m_ij - L(1-alpha)| added to mean energy and CE;
    # "batch_sum" = |sum_ij m_ij - L(1-alpha)| added to batch-SUMMED energy and CE (released code).
    mask_penalty: Literal["per_sample", "batch_sum"] = "per_sample"
    mask: Literal["official", "sigmoid"] = "official"  # "official" caps the mask at 1/3
    # B8: the released code steps the cosine scheduler once per batch.
    scheduler_step: Literal["epoch", "batch"] = "epoch"
    # B7: the released anchor evaluation feeds E normalised images although training feeds raw ones.
    eval_encoder_input: Literal["raw", "normalized"] = "raw"
    # The energy the anchor minimises (docs/anchor-diagnostics.md, "Switches"). "logsumexp": the teacher's
    # free energy -T logsumexp(z/T) (paper), lowered by confidence in ANY class. "class": the energy of
    # the labelled class, -z_y (= free energy + T * CE at temperature T), lowered only by that class.
    energy: Literal["logsumexp", "class"] = "logsumexp"
    # Weight of a collapse penalty: sum_c p_bar_c log10 p_bar_c of the teacher's mean prediction on the
    # batch's anchor images (Module 1's class-balance term). 0: not added.
    balance_weight: float = 0.0
    # Best anchor epoch: "loss" = lowest validation anchor loss; "anchored_acc" = highest teacher accuracy
    # on the validation anchor images (ties: lower loss).
    select: Literal["loss", "anchored_acc"] = "loss"


@dataclass
class MixupConfig:
    """Module 3 (and the student-domain training of every baseline: same epochs, lr, batch)."""

    # Few labelled images: one full batch per epoch, so 200 epochs are 200 steps (seconds on a CPU).
    epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    a: float = 0.6  # f reaches 1 after a * epochs
    b: float = 0.2  # f(0): the initial share of the real sample
    schedule: Literal["linear", "step"] = "linear"
    temperature: float = 10.0
    # B21: the released DistillLoss always uses u = 0.5. "tied": u = f (labels take over as the mixed
    # samples turn real); a constant u with a poor OOD teacher swamps the labels.
    u_schedule: Literal["tied", "constant"] = "tied"
    u: float = 0.5  # used by u_schedule = "constant"
    # B1: the released code distils from the student's own logits (KL = 0, no teacher knowledge).
    kd_target: Literal["teacher", "student"] = "teacher"
    # B2: the released code feeds the real half of the batch un-normalised.
    normalize_real: bool = True
    use_anchor: bool = True  # False: the no-anchor ablation (z_a = z, Module 2 skipped)
    mix_samples: bool = True  # False: the no-mixup ablation (see docs/fidelity.md)
    # Per-row weight of the KD term. "none": 1. "confidence": the teacher's top softmax probability on
    # that row's image (at temperature 1), divided by its batch mean (uncertainty-guided, per sample).
    teacher_weighting: Literal["none", "confidence"] = "none"
    # The released code wraps the optimiser in ConstantLR (lr/3 for the first 5 steps) stepped per
    # batch (B8). "epoch" applies the same warm-up to the first 5 epochs.
    warmup_steps: int = 5
    warmup_factor: float = 1.0 / 3.0
    scheduler_step: Literal["epoch", "batch"] = "epoch"


@dataclass
class BaselineConfig:
    kd_u: float = 0.5  # the kd baseline: u * CE + (1 - u) * T^2 * KL on student data, T = mixup.temperature


@dataclass
class RunConfig:
    method: Method = "augkd"
    preset: Preset = "faithful"
    seed: int = 0
    device: Device = "auto"
    threads: int = 0  # torch intra-op threads; 0: auto (half the cores, at most 4)
    deterministic: bool = True  # torch.use_deterministic_algorithms (needed for bit-exact resume)
    checkpoint_every: int = 1  # epochs between resumable checkpoints (the last epoch is always saved)
    plots: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    df: DataFreeConfig = field(default_factory=DataFreeConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)


METHODS: tuple[str, ...] = typing.get_args(Method)
DEVICES: tuple[str, ...] = typing.get_args(Device)

# The released code's behaviour, switch by switch (docs/fidelity.md).
PRESET_VALUES: dict[str, dict[str, Any]] = {
    "faithful": {},
    "official": {
        "df.step_encoder_scheduler": False,  # B4
        "anchor.mask_penalty": "batch_sum",  # B6
        "anchor.scheduler_step": "batch",  # B8
        "anchor.eval_encoder_input": "normalized",  # B7
        "mixup.kd_target": "student",  # B1
        "mixup.normalize_real": False,  # B2
        "mixup.scheduler_step": "batch",  # B8 (ConstantLR warm-up over 5 batches)
        "mixup.u_schedule": "constant",  # B21
        "mixup.u": 0.5,
    },
}

# What a method changes on top of the preset (the others change nothing; which stages each method runs
# is method.pipeline.METHODS).
METHOD_VALUES: dict[str, dict[str, Any]] = {
    "official": {"preset": "official"},
    "no-anchor": {"mixup.use_anchor": False},
    "no-mixup": {"mixup.mix_samples": False},
}


# ----------------------------------------------------------------------------------------------
# Typed access by dotted key


def field_types(cls: type = RunConfig, prefix: str = "") -> dict[str, Any]:
    """Map every dotted leaf key to its declared type."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.update(field_types(tp, prefix + f.name + "."))
        else:
            out[prefix + f.name] = tp
    return out


def valid_keys() -> list[str]:
    return sorted(field_types())


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or none"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def parse_value(text: str) -> Any:
    """A command-line value read as a TOML value (``1e-3``, ``inf``, ``true``, ``[8, 4]``, ``"a b"``).

    Text that is not a TOML value stays a bare string, so ``data.root=/data/office31`` needs no quotes.
    """
    try:
        parsed = tomllib.loads(f"value = {text}")
    except tomllib.TOMLDecodeError:
        return text
    if set(parsed) != {"value"}:  # text that smuggles in a second key after a newline
        return text
    return parsed["value"]


def _is_text(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp)))


def _from_text(text: str, tp: Any) -> Any:
    """A string (command line, or YAML's ``1e-3``) read for a field of type ``tp``: as TOML, except that a
    text field keeps text that is not a quoted TOML string as it is (``data.student_domain=2019``)."""
    parsed = parse_value(text)
    if _is_text(tp):
        return parsed if isinstance(parsed, str) else text
    return parsed


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against type ``tp``; strings are read as TOML values first (``parse_value``)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(key, value, a)
            except ConfigError:
                continue
        raise bad
    if isinstance(value, str):
        value = _from_text(value, tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):  # not TOML: a bare comma-separated list, brackets optional
            s = value.strip()
            parts = s[1:-1] if s.startswith("[") and s.endswith("]") else s
            value = [p for p in (q.strip() for q in parts.split(",")) if p]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [coerce(key, v, inner) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def set_value(cfg: RunConfig, key: str, value: Any) -> None:
    types_ = field_types()
    if key not in types_:
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
    value = coerce(key, value, types_[key])
    obj: Any = cfg
    *path, leaf = key.split(".")
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, leaf, value)


def get_value(cfg: RunConfig, key: str) -> Any:
    obj: Any = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict (a parsed TOML/YAML file) -> dotted keys. Tables map onto config sections."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = prefix + str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["mixup.epochs=5", "seed=1"]`` -> {"mixup.epochs": "5", "seed": "1"}: the values stay text until
    ``coerce`` reads them against the declared type of their key."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. mixup.epochs=20)")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise ConfigError(f"override {item!r}: empty key")
        out[k] = v
    return out


def load_file(path: str) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) config file into dotted keys."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            with open(path, "rb") as fh:
                tree = tomllib.load(fh)
        elif ext in (".yaml", ".yml"):
            import yaml

            with open(path) as fh:
                tree = yaml.safe_load(fh) or {}
        elif ext == ".json":
            with open(path) as fh:
                tree = json.load(fh)
        else:
            raise ConfigError(f"config file {path}: expected a .toml, .yaml/.yml or .json file")
    except ConfigError:
        raise
    except Exception as err:  # parser errors: name the file
        raise ConfigError(f"config file {path}: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: expected a table of keys at top level")
    return flatten(tree)


def build_config(user: dict[str, Any] | None = None) -> RunConfig:
    """Defaults < preset < method < ``user`` (dotted keys; strings from the CLI are typed here)."""
    user = dict(user or {})
    types_ = field_types()
    for k in user:
        if k not in types_:
            raise ConfigError(f"unknown config key {k!r}; valid keys: {', '.join(valid_keys())}")
    method = coerce("method", user.get("method", RunConfig.method), types_["method"])
    layers: dict[str, Any] = dict(METHOD_VALUES.get(method, {}))
    preset = coerce("preset", user.get("preset", layers.get("preset", RunConfig.preset)), types_["preset"])
    cfg = RunConfig()
    for k, v in PRESET_VALUES[preset].items():
        set_value(cfg, k, v)
    for k, v in layers.items():
        set_value(cfg, k, v)
    for k, v in user.items():
        set_value(cfg, k, v)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Value checks that the type alone cannot express."""
    __import__("augkd.config_checks", fromlist=["_"]).check_config(cfg)  # finite floats, widths, batch sizes
    positive_ints = [
        "teacher.epochs", "teacher.batch_size", "df.iters_per_epoch", "df.batch_size", "df.student_steps",
        "df.latent_size", "df.val_batches", "anchor.batch_size", "mixup.batch_size",
        "checkpoint_every",
    ]
    for k in positive_ints:
        if get_value(cfg, k) < 1:
            raise ConfigError(f"{k}: expected a positive integer, got {get_value(cfg, k)}")
    for k in ["df.epochs", "anchor.epochs", "mixup.epochs", "threads", "data.augment_pad", "mixup.warmup_steps", "data.k_shot"]:
        if get_value(cfg, k) < 0:
            raise ConfigError(f"{k}: expected a non-negative integer, got {get_value(cfg, k)}")
    for k in ["mixup.b", "mixup.u", "anchor.invariant", "baseline.kd_u", "mixup.warmup_factor"]:
        v = get_value(cfg, k)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{k}: expected a value in [0, 1], got {v}")
    if cfg.mixup.a <= 0:
        raise ConfigError(f"mixup.a: expected a positive value, got {cfg.mixup.a}")
    if cfg.mixup.temperature <= 0 or cfg.anchor.energy_temperature <= 0:
        raise ConfigError("temperatures must be positive")
    if cfg.data.setting == "folders" and not cfg.data.root:
        raise ConfigError("data.setting = 'folders' needs data.root (the dataset directory)")


# ----------------------------------------------------------------------------------------------
# Serialisation


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def section_dict(cfg: RunConfig, *names: str) -> dict[str, Any]:
    d = to_dict(cfg)
    return {n: d[n] for n in names}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic strings
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: RunConfig) -> str:
    """A TOML file that ``load_file`` reads back into the same config (None values are omitted)."""
    d = to_dict(cfg)
    lines = ["# resolved augkd configuration (defaults < preset < method < file < overrides)"]
    for k, v in d.items():
        if not isinstance(v, dict) and v is not None:
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append("")
            lines.append(f"[{k}]")
            for kk, vv in v.items():
                if vv is not None:
                    lines.append(f"{kk} = {_toml_value(vv)}")
    return "\n".join(lines) + "\n"

