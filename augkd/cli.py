"""The ``augkd`` command line: ``train-teacher``, ``run`` and ``compare``.

Configuration comes from a TOML/YAML file (``--config``) and ``key=value`` overrides with dotted keys
(``mixup.epochs=30 df.iters_per_epoch=20``); ``augkd run --help-keys`` lists every key.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from .config import METHODS, ConfigError, _type_name, build_config, field_types, load_file, parse_overrides
from .config_checks import check_user_values
from .errors import RunError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML or YAML config file (sections: data, teacher, student, df, anchor, mixup)")
    p.add_argument("--seed", type=int, help="random seed (splits, initialisation, noise)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default auto)")
    p.add_argument("--out", help="run directory (default: runs/<command>-<method>-<seed>-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only on the console")
    p.add_argument("--help-keys", action="store_true", help="list every config key with its type and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. mixup.epochs=30")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="augkd",
        description="AuG-KD: anchor-based mixup generation for out-of-domain knowledge distillation.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-teacher", help="train the teacher on the teacher-domain data")
    _common(p)
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out")

    p = sub.add_parser("run", help="run one method end to end (trains a teacher first unless --teacher)")
    _common(p)
    p.add_argument("--method", choices=METHODS, help="augkd (default), official, dfkd, ce, kd, no-anchor, no-mixup")
    p.add_argument("--teacher", help="teacher state_dict to use instead of training one (= teacher.path)")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out from its last checkpoint")

    p = sub.add_parser("compare", help="several methods over several seeds, with paired differences vs dfkd")
    _common(p)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. N-1 plus --seed offset)")
    p.add_argument(
        "--methods", action="append",
        help=f"comma-separated methods (repeatable); default: all of {','.join(METHODS)}",
    )
    p.add_argument("--teacher", help="teacher state_dict to use for every seed (= teacher.path)")
    p.add_argument("--teacher-per-seed", dest="teacher_per_seed", action="store_true", default=True,
                   help="train one teacher per seed (default)")
    p.add_argument("--shared-teacher", dest="teacher_per_seed", action="store_false",
                   help="train the teacher once (first seed) and use it for every seed")
    p.add_argument("--resume", action="store_true", help="continue in-progress stages in --out")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs (seed, method) at once, each in its own process with cores/N torch threads unless "
                        "threads= is set (default 1: one after another in this process)")
    return parser


def help_keys() -> str:
    from .config import RunConfig, get_value

    cfg = RunConfig()
    lines = [f"{k} = {get_value(cfg, k)!r}    ({_type_name(t)})" for k, t in sorted(field_types().items())]
    return "\n".join(lines)


def gather_config(args: argparse.Namespace) -> dict[str, Any]:
    """File < overrides < explicit flags. Returns dotted user keys (typed in build_config)."""
    user: dict[str, Any] = {}
    if args.config:
        from_file = load_file(args.config)
        # every value the file sets is checked, also one that an override below replaces
        check_user_values(from_file, f"config file {args.config}")
        user.update(from_file)
    user.update(parse_overrides(args.overrides))
    if args.seed is not None:
        user["seed"] = args.seed
    if args.device is not None:
        user["device"] = args.device
    if getattr(args, "method", None):
        user["method"] = args.method
    if getattr(args, "teacher", None):
        user["teacher.path"] = args.teacher
    return user


def default_out(command: str, cfg) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = command if command != "run" else cfg.method
    return os.path.join("runs", f"{name}-{cfg.data.setting}-s{cfg.seed}-{stamp}")


def _processes(cfg):
    """Under torchrun: join its process group (DDP); else one process. Returns (Dist, device name)."""
    from .distributed import from_environment

    return from_environment(cfg.device)


def cmd_train_teacher(args, user) -> int:
    from .method.pipeline import obtain_teacher
    from .method.rundir import finish, prepare
    from .report import write_json

    user.pop("teacher.path", None)
    cfg = build_config(user)
    cfg.teacher.path = None
    dist, device_name = _processes(cfg)
    out = dist.from_main(args.out or default_out("teacher", cfg))  # one directory for all processes
    ctx = prepare(cfg, out, quiet=args.quiet, resume=args.resume, dist=dist, device_name=device_name)
    try:
        _, info = obtain_teacher(ctx)
        summary = {
            "teacher": os.path.join(out, "teacher.pt"),
            "teacher_test": info.get("teacher_test"),
            "student_test": info["student_test"],
            "best_epoch": info.get("best_epoch"),
        }
        if dist.is_main:
            write_json(os.path.join(out, "metrics", "summary.json"), summary)
            print(
                f"teacher saved to {summary['teacher']}: teacher-domain test Acc {100 * summary['teacher_test']['acc']:.1f}%, "
                f"student-domain test Acc {100 * info['student_test']['acc']:.1f}%"
            )
    finally:
        finish(ctx)
    return 0


def cmd_run(args, user) -> int:
    from .method.pipeline import run_method
    from .method.rundir import finish, prepare

    cfg = build_config(user)
    dist, device_name = _processes(cfg)
    out = dist.from_main(args.out or default_out("run", cfg))  # one directory for all processes
    ctx = prepare(cfg, out, quiet=args.quiet, resume=args.resume, dist=dist, device_name=device_name)
    t0 = time.perf_counter()
    try:
        s = run_method(ctx)
    finally:
        finish(ctx)
    if not dist.is_main:
        return 0
    t = s["test"]
    print(
        f"{cfg.method} on {s['setting']} (seed {cfg.seed}): test Acc {100 * t['acc']:.1f}%  Acc@3 {100 * t['acc3']:.1f}%  "
        f"Acc@5 {100 * t['acc5']:.1f}%  | teacher on student test {100 * s['teacher']['student_test']['acc']:.1f}%  "
        f"| {time.perf_counter() - t0:.0f} s  | {out}"
    )
    diag = s["stages"].get("anchor", {}).get("diagnostics")
    if diag:
        from .method.anchor_diagnostics import headline

        print(headline(diag))
    return 0


def cmd_compare(args, user) -> int:
    from .compare import run_compare

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("compare runs its methods in this process or in its own worker processes (--jobs); "
                          "launch it without torchrun (torchrun works with `augkd run` and `augkd train-teacher`)")
    methods: list[str] = []
    for item in args.methods or [",".join(METHODS)]:
        methods.extend(m.strip() for m in item.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"--methods: unknown {', '.join(bad)}; expected some of {', '.join(METHODS)}")
    if args.seeds < 1:
        raise ConfigError("--seeds: expected at least 1")
    if args.jobs < 1:
        raise ConfigError(f"--jobs: expected at least 1 process, got {args.jobs}")
    user.pop("method", None)
    base_seed = int(user.pop("seed", 0))
    cfg = build_config(user)  # validates the shared keys once, up front
    out = args.out or default_out("compare", cfg)
    table = run_compare(
        user, methods, [base_seed + i for i in range(args.seeds)], out,
        quiet=args.quiet, resume=args.resume, teacher_per_seed=args.teacher_per_seed, jobs=args.jobs,
    )
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may sit anywhere among the flags (argparse's "*" positional only takes one
    # contiguous run), so collect the leftovers that look like overrides.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = list(args.overrides) + extra
    if args.help_keys:
        print(help_keys())
        return 0
    try:
        user = gather_config(args)
        if args.command == "train-teacher":
            return cmd_train_teacher(args, user)
        if args.command == "run":
            return cmd_run(args, user)
        return cmd_compare(args, user)
    except ConfigError as err:
        print(f"augkd: error: {err}", file=sys.stderr)
        return 2
    except RunError as err:  # damaged or foreign artefacts, a diverged stage, a run directory in use
        print(f"augkd: error: {err}", file=sys.stderr)
        return 1
    finally:
        from .distributed import shutdown_process_group

        shutdown_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
