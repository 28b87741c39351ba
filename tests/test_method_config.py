"""Config: presets, methods, typing of overrides, files, and the error messages."""
import math
import typing

import pytest

from augkd.config import (
    DEVICES,
    METHOD_VALUES,
    METHODS,
    ConfigError,
    RunConfig,
    build_config,
    load_file,
    parse_overrides,
    parse_value,
    set_value,
    to_toml,
)


def test_defaults_are_paper_faithful():
    cfg = build_config({})
    assert cfg.method == "augkd" and cfg.preset == "faithful"
    assert cfg.mixup.kd_target == "teacher" and cfg.mixup.normalize_real
    assert cfg.mixup.u_schedule == "tied" and cfg.anchor.mask_penalty == "per_sample"
    assert cfg.anchor.scheduler_step == "epoch" and cfg.df.step_encoder_scheduler


def test_official_method_applies_the_released_behaviour():
    cfg = build_config({"method": "official"})
    assert cfg.preset == "official"
    assert cfg.mixup.kd_target == "student" and not cfg.mixup.normalize_real
    assert cfg.mixup.u_schedule == "constant" and cfg.mixup.u == 0.5
    assert cfg.anchor.mask_penalty == "batch_sum" and cfg.anchor.scheduler_step == "batch"
    assert cfg.mixup.scheduler_step == "batch" and not cfg.df.step_encoder_scheduler
    assert cfg.anchor.eval_encoder_input == "normalized"


def test_user_keys_win_over_the_preset():
    cfg = build_config({"preset": "official", "mixup.u_schedule": "tied"})
    assert cfg.mixup.u_schedule == "tied" and cfg.mixup.kd_target == "student"


def test_ablation_methods():
    assert not build_config({"method": "no-anchor"}).mixup.use_anchor
    assert not build_config({"method": "no-mixup"}).mixup.mix_samples


def test_overrides_are_typed():
    cfg = build_config(parse_overrides(
        ["mixup.epochs=7", "mixup.lr=0.01", "mixup.normalize_real=false", "df.generator_hidden=[8,4]",
         "data.val_per_class=none", "data.teacher_domains=a,b"]
    ))
    assert cfg.mixup.epochs == 7 and cfg.mixup.lr == 0.01 and cfg.mixup.normalize_real is False
    assert cfg.df.generator_hidden == [8, 4] and cfg.data.val_per_class is None
    assert cfg.data.teacher_domains == ["a", "b"]


@pytest.mark.parametrize(
    "item,key,expected",
    [("df.generator_hidden=[8, 4]", "df.generator_hidden", [8, 4]),
     ("df.generator_hidden=8,4", "df.generator_hidden", [8, 4]),
     ("df.generator_hidden=[]", "df.generator_hidden", []),
     ('data.teacher_domains=["amazon", "web cam"]', "data.teacher_domains", ["amazon", "web cam"]),
     ("data.teacher_domains=[a, b]", "data.teacher_domains", ["a", "b"]),
     ("mixup.lr=1e-3", "mixup.lr", 1e-3),
     ("mixup.lr=2E-4", "mixup.lr", 2e-4),
     ("mixup.lr=1", "mixup.lr", 1.0),
     ("mixup.epochs=1_000", "mixup.epochs", 1000),
     ('data.student_domain="dslr"', "data.student_domain", "dslr"),
     ("data.student_domain='my domain'", "data.student_domain", "my domain"),
     ("data.student_domain=2019", "data.student_domain", "2019"),
     ("data.root=/data/office 31", "data.root", "/data/office 31"),
     ('anchor.mask_penalty="batch_sum"', "anchor.mask_penalty", "batch_sum"),
     ("data.setting=folders", "data.setting", "folders"),
     ("data.image_size=null", "data.image_size", None)],
)
def test_override_values_read_as_toml(item, key, expected):
    (k, text), = parse_overrides([item]).items()
    cfg = RunConfig()
    set_value(cfg, k, text)
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text", ["inf", "-inf", "+inf", "nan"])
def test_non_finite_floats_reach_validation(text):
    """TOML's inf/nan are floats: parsing keeps them, and validation (not the parser) judges the value."""
    assert math.isnan(parse_value(text)) if "nan" in text else math.isinf(parse_value(text))
    cfg = RunConfig()
    set_value(cfg, "mixup.lr", text)
    assert str(cfg.mixup.lr) == str(float(text))
    with pytest.raises(ConfigError, match=r"mixup\.b: expected a value in \[0, 1\], got"):
        build_config(parse_overrides([f"mixup.b={text}"]))


def test_parse_value_falls_back_to_the_text():
    assert parse_value("1e-3") == 1e-3 and parse_value("[1, 2.5]") == [1, 2.5] and parse_value("true") is True
    assert parse_value('"quoted # not a comment"') == "quoted # not a comment"
    for text in ["/a/b", "a,b", "yes", "", "1\nseed = 3"]:
        assert parse_value(text) == text


@pytest.mark.parametrize(
    "item,expected",
    [("mixup.epochs=1e3", "expected int"), ("mixup.epochs=[1]", "expected int"),
     ("df.generator_hidden=[8, x]", "expected int, got 'x'"), ("mixup.lr=[1e-3]", "expected float"),
     ("mixup.normalize_real=1", "expected bool"), ("mixup.normalize_real=yes", "expected bool"),
     ("data.image_size=big", "expected int or none"), ("seed=1\nmixup.epochs = 3", "expected int")],
)
def test_override_errors_name_key_and_type(item, expected):
    with pytest.raises(ConfigError) as err:
        build_config(parse_overrides([item]))
    assert item.split("=")[0] + ": " + expected in str(err.value)


def test_choice_lists_come_from_the_config_types():
    hints = typing.get_type_hints(RunConfig)
    assert METHODS == typing.get_args(hints["method"]) and "no-mixup" in METHODS
    assert DEVICES == typing.get_args(hints["device"]) == ("auto", "cpu", "cuda")
    assert set(METHOD_VALUES) <= set(METHODS)


def test_every_method_has_its_stages_and_nothing_else_does():
    from augkd.method.pipeline import METHODS as STAGES

    assert set(STAGES) == set(METHODS)
    assert all(STAGES[m] for m in METHODS)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        build_config({"mixup.epoch": 3})
    assert "mixup.epoch" in str(err.value) and "mixup.epochs" in str(err.value)


@pytest.mark.parametrize(
    "key,value,expected",
    [("mixup.epochs", "ten", "int"), ("mixup.lr", "fast", "float"), ("mixup.normalize_real", "maybe", "bool"),
     ("anchor.mask_penalty", "l2", "'per_sample'"), ("mixup.epochs", 2.5, "int"), ("seed", True, "int")],
)
def test_wrong_type_names_key_and_type(key, value, expected):
    with pytest.raises(ConfigError) as err:
        build_config({key: value})
    assert key in str(err.value) and expected in str(err.value)


def test_bad_values():
    with pytest.raises(ConfigError, match="mixup.b"):
        build_config({"mixup.b": 1.5})
    with pytest.raises(ConfigError, match="data.root"):
        build_config({"data.setting": "folders"})


def test_toml_round_trip(tmp_path):
    cfg = build_config({"method": "official", "mixup.epochs": 3, "df.encoder_hidden": [4, 8]})
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    again = build_config(load_file(str(path)))
    assert again == cfg


def test_yaml_file_and_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("method: dfkd\nmixup:\n  epochs: 4\n")
    cfg = build_config(load_file(str(y)))
    assert cfg.method == "dfkd" and cfg.mixup.epochs == 4
    with pytest.raises(ConfigError, match="not found"):
        load_file(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("mixup = [")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_file(str(bad))
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["mixup.epochs"])


def test_example_configs_load():
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    files = sorted(glob.glob(os.path.join(root, "*.toml")))
    assert files
    for f in files:
        build_config(load_file(f))


def test_digits_example_config_matches_the_defaults():
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "digits-shift.toml")
    assert build_config(load_file(path)) == build_config({})


def test_resume_with_another_config_names_the_changed_keys(tmp_path):
    import json

    from augkd.config import to_dict
    from augkd.method.rundir import prepare

    (tmp_path / "config.json").write_text(json.dumps(to_dict(build_config({}))))
    with pytest.raises(ConfigError, match=r"--resume: .*\(keys: df\.generator_hidden, mixup\.epochs\)"):
        prepare(build_config({"mixup.epochs": 3, "df.generator_hidden": [16, 8]}), str(tmp_path), resume=True)
