"""The `augkd` command line end to end on a seconds-long configuration, and its error messages."""
import csv
import json
import os

import pytest

from augkd import models
from augkd.cli import main
from augkd.config import METHODS

TINY = [
    "threads=1", "plots=false", "data.k_shot=2", "teacher.epochs=1", "teacher.batch_size=256",
    "df.epochs=2", "df.iters_per_epoch=2", "df.batch_size=16", "df.student_steps=2", "df.val_batches=1",
    "anchor.epochs=2", "mixup.epochs=3",
]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["train-teacher", "--quiet", "--device", "cpu", "--out", str(out), *TINY]) == 0
    path = out / "teacher.pt"
    assert path.is_file()
    summary = json.loads((out / "metrics" / "summary.json").read_text())
    assert 0 <= summary["student_test"]["acc"] <= 1
    return str(path)


def test_run_writes_the_run_directory(teacher, tmp_path):
    out = tmp_path / "run"
    argv = ["run", "--quiet", "--device", "cpu", "--out", str(out), "--teacher", teacher, *TINY, "plots=true"]
    assert main(argv) == 0
    for f in ("config.toml", "config.json", "versions.json", "splits.json", "log.txt", "student.pt",
              "metrics/df.csv", "metrics/anchor.csv", "metrics/mixup.csv", "metrics/summary.json",
              "checkpoints/df_final.pt", "checkpoints/mixup_state.pt",
              "plots/df_curves.png", "plots/generated.png", "plots/anchor.png", "plots/mixup.png"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "metrics" / "summary.json").read_text())
    assert summary["method"] == "augkd" and set(summary["stages"]) == {"df", "anchor", "mixup"}
    assert 0 <= summary["test"]["acc"] <= summary["test"]["acc3"] <= summary["test"]["acc5"] <= 1
    rows = list(csv.DictReader(open(out / "metrics" / "mixup.csv")))
    assert [float(r["f"]) for r in rows][0] == pytest.approx(0.2) and len(rows) == 3
    assert "anchored_teacher_acc" in open(out / "metrics" / "anchor.csv").readline()
    versions = json.loads((out / "versions.json").read_text())
    assert {"torch", "python", "augkd", "device"} <= set(versions)
    # The resolved config reruns as a config file.
    assert main(["run", "--quiet", "--out", str(tmp_path / "again"), "--config", str(out / "config.toml"),
                 "mixup.epochs=1", "anchor.epochs=1"]) == 0
    # Re-using the directory without --resume is refused.
    assert main(argv) == 2


def test_compare_every_method_shares_stages(teacher, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--quiet", "--device", "cpu", "--seeds", "1", "--out", str(out), "--teacher", teacher, *TINY]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for m in METHODS:
        assert f"| {m} |" in text
        assert (out / "seed0" / m / "metrics" / "summary.json").is_file()
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert sorted(r["method"] for r in rows) == sorted(METHODS)
    assert (out / "compare.md").is_file() and (out / "compare_summary.csv").is_file()
    # Module 1 ran once for dfkd/augkd/no-anchor/no-mixup and once for official (B4 changes it).
    df_dirs = [d for d in os.listdir(out / "cache") if d.startswith("df-")]
    assert len(df_dirs) == 2
    # Same splits for every method of the seed.
    splits = {m: (out / "seed0" / m / "splits.json").read_text() for m in METHODS}
    assert len(set(splits.values())) == 1
    # Baselines ran the stages they should.
    stages = {m: set(json.loads((out / "seed0" / m / "metrics" / "summary.json").read_text())["stages"]) for m in METHODS}
    assert stages["ce"] == stages["kd"] == {"finetune"}
    assert stages["dfkd"] == {"df", "finetune"}
    assert stages["no-anchor"] == {"df", "mixup"}
    assert stages["augkd"] == stages["no-mixup"] == stages["official"] == {"df", "anchor", "mixup"}


def test_help_keys(capsys):
    assert main(["run", "--help-keys"]) == 0
    assert "mixup.kd_target" in capsys.readouterr().out


def test_unknown_key(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "r"), "mixup.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'mixup.epoch'" in err and "mixup.epochs" in err
    assert not (tmp_path / "r").exists()


def test_wrong_type(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "r"), "mixup.epochs=many"]) == 2
    assert "mixup.epochs: expected int" in capsys.readouterr().err


def test_missing_folder(tmp_path, capsys):
    argv = ["run", "--out", str(tmp_path / "r"), "data.setting=folders", f"data.root={tmp_path / 'nope'}",
            "data.teacher_domains=a", "data.student_domain=b"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "nope" in err


def test_teacher_class_count_mismatch(tmp_path, capsys):
    wrong = models.build_classifier("cnn-teacher", 5, 1, 16)
    path = tmp_path / "t5.pt"
    models.save_state(wrong, str(path))
    assert main(["run", "--quiet", "--out", str(tmp_path / "r"), "--teacher", str(path), *TINY]) == 2
    err = capsys.readouterr().err
    assert "5 classes" in err and "10" in err


def test_missing_teacher_file(tmp_path, capsys):
    assert main(["run", "--quiet", "--out", str(tmp_path / "r"), "--teacher", str(tmp_path / "none.pt"), *TINY]) == 2
    assert "teacher.path" in capsys.readouterr().err


def test_bad_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[mixup]\nepochs = 'x'\n")
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "mixup.epochs" in capsys.readouterr().err
