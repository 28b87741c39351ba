"""Setting up a run: device, threads, determinism, data, logger and the run directory's fixed files.

Run directory layout::

    config.toml, config.json   resolved configuration (re-runnable with --config config.toml)
    versions.json              python, torch, augkd, device
    splits.json                the data split indices (same for every method of one seed)
    log.txt                    the log
    teacher.pt                 teacher state_dict (when trained in this run)
    student.pt                 final student state_dict
    metrics/<stage>.csv        one row per epoch per stage;  metrics/summary.json
    checkpoints/               <stage>_state.pt (resumable, per epoch; the one before as
                               <stage>_state.prev.pt) and <stage>_final.pt
    plots/                     training curves and image grids
    .lock                      held (flock) by the live run; holds its pid
"""
from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time

import numpy as np
import torch

from .. import __version__
from ..atomic import remove_stale_temporaries, write_text
from ..config import ConfigError, RunConfig, flatten, to_dict, to_toml
from ..config_checks import check_architectures
from ..data import load_setting
from ..distributed import Dist
from ..errors import RunDirLocked
from ..report import write_json
from .context import Context, data_to
from .digests import stage_digests
from .lock import check_out_dir, remove_if_only_lock, take_run_dir


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def auto_threads() -> int:
    """Half the cores, at most 4. The networks here are small, so extra intra-op threads gain little,
    while a thread per core stalls badly as soon as anything else runs on the machine (measured on
    2 cores: 1 thread 0.21 s per Module-1 iteration, 2 threads 0.13 s idle but 1.2 s under load)."""
    return max(1, min(4, (os.cpu_count() or 1) // 2))


_fill_before: bool | None = None  # torch's NaN-fill setting before configure_torch turned it off


def configure_torch(cfg: RunConfig, device: torch.device) -> None:
    torch.set_num_threads(cfg.threads if cfg.threads > 0 else auto_threads())
    if cfg.deterministic:
        if device.type == "cuda":
            # cuBLAS needs this for deterministic matmuls; CPU needs nothing.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        # Deterministic mode also fills every new uninitialised tensor with NaN (a debugging aid that
        # catches kernels reading memory they never wrote): about 250 fills per training step here and
        # a tenth of the job's time. Determinism itself does not depend on it. finish() restores the
        # setting, so a run inside a larger program (tests, notebooks) leaves the process as it found it.
        global _fill_before
        if _fill_before is None:
            _fill_before = torch.utils.deterministic.fill_uninitialized_memory
        torch.utils.deterministic.fill_uninitialized_memory = False


def make_logger(run_dir: str, quiet: bool, dist: Dist | None = None) -> logging.Logger:
    """A logger private to this run directory: everything to log.txt; stderr gets INFO, or WARNING when quiet.
    With several processes only rank 0 writes log.txt; the others print only errors, tagged with the rank."""
    dist = dist or Dist()
    log = logging.getLogger(f"augkd.run.{os.path.abspath(run_dir)}.rank{dist.rank}")
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.setLevel(logging.INFO)
    log.propagate = False
    sh = _TqdmHandler()
    if dist.is_main:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
        fh = logging.FileHandler(os.path.join(run_dir, "log.txt"))
        fh.setFormatter(fmt)
        log.addHandler(fh)
        sh.setFormatter(logging.Formatter("%(message)s"))
        sh.setLevel(logging.WARNING if quiet else logging.INFO)
    else:
        sh.setFormatter(logging.Formatter(f"[rank {dist.rank}] %(message)s"))
        sh.setLevel(logging.ERROR)  # warnings about the run's state come from rank 0's rows: no repeats
    log.addHandler(sh)
    return log


class _TqdmHandler(logging.Handler):
    """Console handler that prints above active progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never take the run down
            self.handleError(record)


def close_logger(log: logging.Logger) -> None:
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


def finish(ctx: Context) -> None:
    """End of a run (also on errors): close the log, release the run directory, put back torch's NaN fill."""
    global _fill_before
    if _fill_before is not None:
        torch.utils.deterministic.fill_uninitialized_memory = _fill_before
        _fill_before = None
    close_logger(ctx.log)
    if ctx.lock is not None:
        ctx.lock.release()
        ctx.lock = None


def load_data(cfg: RunConfig):
    d = cfg.data
    kwargs = dict(seed=cfg.seed, k_shot=d.k_shot or None, val_per_class=d.val_per_class)
    if d.setting == "folders":
        kwargs.update(root=d.root, teacher_domains=d.teacher_domains, student_domain=d.student_domain, test_folder=d.test_folder)
    if d.image_size is not None:
        kwargs["image_size"] = d.image_size
    try:
        return load_setting(d.setting, **kwargs)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise ConfigError(f"data: {err}") from None
    except ValueError as err:
        raise ConfigError(f"data: {err}") from None


def versions(device: torch.device) -> dict:
    return {
        "augkd": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _comparable(cfg_dict: dict) -> dict:
    # Settings that may change between a killed run and its resume without changing the result.
    d = json.loads(json.dumps(cfg_dict))
    for k in ("device", "threads", "plots", "checkpoint_every"):
        d.pop(k, None)
    return d


def prepare(
    cfg: RunConfig,
    run_dir: str,
    *,
    quiet: bool = False,
    resume: bool = False,
    stage_dirs: dict[str, str] | None = None,
    allow_existing: bool = False,
    dist: Dist | None = None,
    device_name: str | None = None,
) -> Context:
    """Create/check the run directory, configure torch, load the data; return the stage context.

    With several processes (``dist``, from torchrun) every process checks and loads, rank 0 alone writes
    the fixed files, and ``device_name`` is this process's device (``cuda:<local rank>``)."""
    dist = dist or Dist()
    cfg_path = os.path.join(run_dir, "config.json")
    check_architectures(cfg)
    check_out_dir(run_dir)
    created = not os.path.exists(run_dir)
    # Only rank 0 takes the lock: the processes of one torchrun job share the directory.
    lock, refused = None, None
    if dist.is_main:
        try:
            lock = take_run_dir(run_dir)
        except (RunDirLocked, ConfigError) as err:
            refused = (type(err).__name__, str(err))
    refused = dist.from_main(refused)  # every process learns whether rank 0 holds the directory
    if refused:
        raise (RunDirLocked if refused[0] == "RunDirLocked" else ConfigError)(refused[1])
    try:
        ctx = _prepare_locked(cfg, run_dir, cfg_path, quiet=quiet, resume=resume, stage_dirs=stage_dirs,
                              allow_existing=allow_existing, dist=dist, device_name=device_name)
    except BaseException:
        if lock is not None:
            lock.release()
            if created:  # leave no empty run directory behind a refused start
                remove_if_only_lock(run_dir)
        raise
    ctx.lock = lock
    return ctx


def _read_config_json(path: str) -> dict:
    try:
        with open(path) as fh:
            old = json.load(fh)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--resume: {path} is unreadable or damaged ({err}); the run's settings are also in "
                          "config.toml next to it: start a new run with --config <that file>") from None
    if not isinstance(old, dict):
        raise ConfigError(f"--resume: {path}: expected a JSON object (the resolved configuration)")
    return old


def _prepare_locked(cfg, run_dir, cfg_path, *, quiet, resume, stage_dirs, allow_existing, dist, device_name) -> Context:
    if os.path.isfile(cfg_path) and not (resume or allow_existing):
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    fresh_resume = resume and not os.path.isfile(cfg_path)
    if resume and os.path.isfile(cfg_path):
        old = _read_config_json(cfg_path)
        if _comparable(old) != _comparable(to_dict(cfg)):
            diffs = [k for k, v in flatten(_comparable(to_dict(cfg))).items() if flatten(_comparable(old)).get(k) != v]
            raise ConfigError(
                f"--resume: the configuration differs from the run in {run_dir} (keys: {', '.join(diffs) or '?'}); "
                "resume with the same settings (see its config.toml)"
            )
    # Data and device first: a bad folder or device should not leave an empty run directory behind.
    device = resolve_device(device_name or cfg.device)
    data = load_data(cfg)
    configure_torch(cfg, device)
    dist.barrier()  # every process has checked the directory before rank 0 writes into it
    for sub in ("", "metrics", "checkpoints", "plots"):
        os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
    log = make_logger(run_dir, quiet, dist)
    if fresh_resume:
        log.warning("--resume: %s holds no earlier run (no config.json); starting a fresh run there", run_dir)
    if dist.is_main:
        # Temporaries of a killed writer: safe to delete now that this run holds the directory. Shared
        # stage directories (compare's cache) are cleaned by the holder of their own lock (stage_lock.py).
        stale = []
        for d in [os.path.join(run_dir, sub) for sub in ("", "metrics", "checkpoints", "plots")]:
            stale += remove_stale_temporaries(d)
        if stale:
            log.info("removed %d temporary file(s) left by an interrupted write: %s", len(stale), ", ".join(stale))
        write_text(os.path.join(run_dir, "config.toml"), to_toml(cfg))
        write_json(cfg_path, to_dict(cfg))
        write_json(os.path.join(run_dir, "versions.json"), {**versions(device), "processes": dist.world})
        write_json(os.path.join(run_dir, "splits.json"), data.splits)
    log.info(
        "run %s: method %s (preset %s), setting %s, seed %d, device %s, %d threads%s",
        run_dir, cfg.method, cfg.preset, data.name, cfg.seed, device, torch.get_num_threads(),
        f", {dist.world} processes (DDP)" if dist.enabled else "",
    )
    log.info(
        "data: %d classes, image %s; teacher domain %s (%d train); student domain %s (%d train / %d val / %d test)",
        data.num_classes, tuple(data.image_shape), data.teacher.name, len(data.teacher.train),
        data.student.name, len(data.student.train), len(data.student.val), len(data.student.test),
    )
    return Context(
        cfg=cfg, device=device, data=data_to(data, device), run_dir=run_dir, log=log, quiet=quiet,
        resume=resume, stage_dirs=dict(stage_dirs or {}), dist=dist, digests=stage_digests(cfg),
    )

