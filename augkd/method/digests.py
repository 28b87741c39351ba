"""Which configuration produced a stage's output: a digest per stage, covering that stage's settings and
those of every stage before it.

Every artefact a stage writes (per-epoch checkpoint, final artefact, the teacher's info file) records
its digest; an artefact whose digest differs from the current run's is refused, never reused. The same
digests name the stage cache of ``augkd compare``.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from ..config import RunConfig, section_dict

_FILE_HASHES: dict[tuple, str] = {}


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_digest(path: str) -> str:
    """Content hash of a file (a given teacher), cached by path, size and modification time."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()[:16]
    return _FILE_HASHES[key]


def stage_settings(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Per stage, the settings its output depends on (earlier stages enter through their digest)."""
    d = section_dict(cfg, "data", "teacher", "student", "df", "anchor", "mixup", "baseline")
    teacher_cfg = dict(d["teacher"])
    if cfg.teacher.path and os.path.isfile(cfg.teacher.path):
        teacher_cfg["file_sha256"] = file_digest(cfg.teacher.path)  # a replaced file is another teacher
    out: dict[str, dict[str, Any]] = {}
    keys: dict[str, str] = {}

    def add(stage: str, settings: dict[str, Any]) -> None:
        out[stage] = settings
        keys[stage] = digest(settings)

    add("teacher", {"seed": cfg.seed, "data": d["data"], "teacher": teacher_cfg})
    add("df", {"teacher": keys["teacher"], "student": d["student"], "df": d["df"]})
    add("anchor", {"df": keys["df"], "anchor": d["anchor"]})
    before_mixup = {"anchor": keys["anchor"]} if cfg.mixup.use_anchor else {"df": keys["df"]}
    add("mixup", {**before_mixup, "mixup": d["mixup"]})
    start = {"df": keys["df"]} if cfg.method == "dfkd" else {"teacher": keys["teacher"], "student": d["student"]}
    add("finetune", {**start, "method": cfg.method, "mixup": d["mixup"], "baseline": d["baseline"]})
    return out


def stage_digests(cfg: RunConfig) -> dict[str, str]:
    return {stage: digest(settings) for stage, settings in stage_settings(cfg).items()}


def stage_keys(cfg: RunConfig) -> dict[str, str]:
    """Cache directory names of the shareable stages (``augkd compare``)."""
    d = stage_digests(cfg)
    return {s: f"{s}-{d[s]}" for s in ("teacher", "df", "anchor")}


def check(stage: str, path: str, found: str | None, expected: str) -> None:
    """Refuse an artefact made under another configuration (or one that records none)."""
    from ..errors import ConfigMismatch

    if found == expected:
        return
    what = "records no configuration digest (written by an older augkd)" if found is None else (
        f"was made with another configuration (digest {found}, this run: {expected})")
    raise ConfigMismatch(
        f"{path}: the {stage} stage's artefact {what}; it is not reused. Choose another --out, or delete "
        "the file to recompute the stage with the current settings"
    )
