"""The `revlearn` command line.

    revlearn list                         the experiments, one line each
    revlearn run NAME [options]           run one (see `revlearn run --help`)
    revlearn plot RUN_DIR                 re-render a run's figures from its files
    revlearn check                        revlearn's self-check of its gradients

Usage errors (an unknown experiment or setting, an ill-typed or out-of-range
value, a missing run folder, an incompatible --resume) and environment errors
(an unwritable or busy run folder, missing or damaged data or run files) print
one line and exit with status 2; pass --debug (or set REVLEARN_DEBUG=1) for the
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import statistics
import sys
from pathlib import Path

__all__ = ["main"]

PROG = "revlearn"
SEEDS_FILE = "seeds.json"


class CLIError(Exception):
    """A usage error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage too; keep one line
        raise CLIError(f"{message} (see `{self.prog} --help`)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Hypergradients through exactly reversible SGD: "
                     "experiments of Maclaurin, Duvenaud & Adams (2015).")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error "
                        "instead of one line (also REVLEARN_DEBUG=1; accepted anywhere)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    sub.add_parser("list", help="list the experiments with a one-line description")

    run = sub.add_parser("run", help="run an experiment",
                         description="Run an experiment; results, figures and a resumable "
                         "checkpoint go to the run folder.")
    run.add_argument("name", metavar="NAME", help="experiment name (see `revlearn list`)")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a config field (repeatable); "
                     "tuples are comma-separated, None is `none`")
    run.add_argument("--smoke", action="store_true",
                     help="start from the experiment's tiny smoke config")
    run.add_argument("--out", metavar="DIR",
                     help="run folder (default: runs/NAME[-smoke]-seedS)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in the run folder from its last checkpoint")
    run.add_argument("--overwrite", action="store_true",
                     help="start again in a run folder that already holds a run")
    run.add_argument("--data", choices=["embedded", "mnist"],
                     help="MNIST source: the bundled 10k test set, or all 70k (downloaded once)")
    run.add_argument("--data-dir", metavar="DIR", help="folder of the MNIST IDX files")
    run.add_argument("--seed", type=int, metavar="N", help="config seed (default: the config's)")
    run.add_argument("--seeds", type=int, metavar="N", default=1,
                     help="repeat over N seeds (seed, seed+1, ...) in subfolders seed-S, and "
                     "report mean ± std of the headline numbers")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument("--devices", type=int, metavar="N",
                     help="split populations (seeds averaged, sweep points) over the first N "
                     "devices (default: every visible device); results do not depend on it")

    plot = sub.add_parser("plot", help="re-render the figures of a run folder")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    sub.add_parser("check", help="run revlearn's self-check (exit 1 if it fails)")
    return parser


# -- run -----------------------------------------------------------------------

def _build_config(exp, args):
    from revlearn.experiments import ConfigError, apply_overrides

    config = exp.smoke if args.smoke else exp.Config()
    fields = {f.name for f in dataclasses.fields(config)}
    flags = []
    if args.seed is not None:
        if args.seed < 0:
            raise CLIError(f"--seed {args.seed}: seeds are non-negative integers")
        flags.append(f"seed={args.seed}")
    for flag, key, value in (("--data", "data", args.data), ("--data-dir", "data_dir", args.data_dir)):
        if value is not None:
            if key not in fields:
                raise CLIError(f"{flag}: experiment {exp.name!r} does not read MNIST (it has no "
                               f"{key!r} setting)")
            flags.append(f"{key}={value}")
    try:
        return apply_overrides(exp, config, flags + list(args.overrides))
    except ConfigError as e:
        raise CLIError(str(e)) from None


def _saved_record(name: str, smoke: bool, config) -> dict:
    from revlearn.meta import to_json
    return {"experiment": name, "smoke": smoke, "config": to_json(config)}


def _config_diff(saved: dict, now: dict) -> list[str]:
    from revlearn.experiments._registry import IGNORED_ON_RESUME
    keys = sorted(set(saved) | set(now))
    return [f"{k} (saved {saved.get(k)!r}, now {now.get(k)!r})" for k in keys
            if k not in IGNORED_ON_RESUME and saved.get(k) != now.get(k)]


def _open_run(path: Path, record: dict, *, resume: bool, overwrite: bool, progress: bool = True,
              allow_fresh_resume: bool = False):
    """Lock the run folder `path` and make it ready for `record`: continue the run there
    (`resume`), start it again (`overwrite`), or start in a new or empty folder. Returns the
    locked `RunDir`; raises CLIError with advice if the folder cannot take this run."""
    from revlearn.meta import RunDir

    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {path} is a file, not a folder")
    foreign = (path.is_dir() and not (path / RunDir.LOCK).exists()
               and not (path / RunDir.CONFIG).exists() and any(path.iterdir()))
    if foreign:
        raise CLIError(f"--out {path} is not empty and holds no revlearn run; pass a new or "
                       "empty folder (a fresh run or --overwrite deletes a run folder's contents)")
    run_dir = RunDir(path, resume=resume, progress=progress).lock()
    try:
        _begin(run_dir, record, resume=resume, overwrite=overwrite,
               allow_fresh_resume=allow_fresh_resume)
    except BaseException:
        run_dir.unlock()
        raise
    return run_dir


def _begin(run_dir, record: dict, *, resume: bool, overwrite: bool,
           allow_fresh_resume: bool) -> None:
    path, name = run_dir.path, record["experiment"]
    if resume:
        saved = run_dir.read_config()
        if saved is None:
            if not allow_fresh_resume:
                raise CLIError(f"nothing to resume in {path}: it holds no run (no config.json); "
                               "start the run without --resume")
            run_dir.begin(record, fresh=True)
            return
        if saved.get("experiment") != name:
            raise CLIError(f"cannot resume {path}: it holds a run of {saved.get('experiment')!r}, "
                           f"not {name!r}")
        if ("folders" in saved) != ("folders" in record):
            def kind(r):
                return f"a run over seeds {r.get('seeds')}" if "folders" in r else "a one-seed run"
            raise CLIError(f"cannot resume {path}: it holds {kind(saved)}, not {kind(record)}; "
                           "rerun with the saved --seeds, or start a new run with --out DIR")
        diff = _config_diff(saved.get("config", {}), record.get("config", {}))
        if diff:
            raise CLIError(f"cannot resume {path}: its config differs in {'; '.join(diff)}; "
                           "rerun with the saved settings, or start a new run with --out DIR")
        if saved.get("seeds") != record.get("seeds"):
            raise CLIError(f"cannot resume {path}: it holds a run over seeds "
                           f"{saved.get('seeds')}, not {record.get('seeds')}")
        run_dir.begin(record, fresh=False)
        return
    if run_dir.holds_run() and not overwrite:
        raise CLIError(f"{path} already holds a run; pass --resume to continue it, "
                       "--overwrite to start it again, or --out DIR for a new folder")
    run_dir.begin(record, fresh=True)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _print_summary(summary: dict, indent: str = "  ") -> None:
    width = max((len(k) for k in summary), default=0)
    for k, v in summary.items():
        shown = f"{v:.6g}" if isinstance(v, float) else v
        print(f"{indent}{k:<{width}}  {shown}")


def _run_one(exp, config, run_dir) -> dict:
    from revlearn.meta import RunDir

    run_dir.write_env()
    summary = exp.run(config, run_dir)
    run_dir.write_json(RunDir.SUMMARY, summary)
    return summary


def _preflight(exp, config) -> None:
    """Everything that can be checked before a file is written: the config's values and the
    data source."""
    from revlearn import experiments
    from revlearn.data import DataError, check_source, load_mnist

    try:
        experiments.validate_config(exp, config)
    except experiments.ConfigError as e:
        raise CLIError(str(e)) from None
    if hasattr(config, "data"):
        data_dir = getattr(config, "data_dir", None)
        try:
            check_source(config.data, data_dir, download=True)
            if config.data != "embedded":  # download now (once), before the run folder exists
                load_mnist(config.data, data_dir)
        except DataError as e:
            raise CLIError(str(e)) from None


def _cmd_run(args) -> int:
    from revlearn import experiments

    try:
        exp = experiments.get(args.name)
    except experiments.UnknownExperimentError as e:
        raise CLIError(str(e)) from None
    if args.seeds < 1:
        raise CLIError(f"--seeds {args.seeds}: give a number of seeds >= 1")
    if args.devices is not None:
        import jax
        if not 1 <= args.devices <= len(jax.devices()):
            raise CLIError(f"--devices {args.devices}: {len(jax.devices())} device(s) are "
                           f"visible; give a number from 1 to {len(jax.devices())}")
    if args.resume and args.overwrite:
        raise CLIError("--resume and --overwrite exclude each other: --resume continues the run "
                       "in the folder, --overwrite deletes it and starts again; pass one")
    config = _build_config(exp, args)
    _preflight(exp, config)
    smoke_tag = "-smoke" if args.smoke else ""
    if args.seeds == 1:
        default = f"{exp.name}{smoke_tag}-seed{config.seed}"
    else:
        default = f"{exp.name}{smoke_tag}-seeds{config.seed}-{config.seed + args.seeds - 1}"
    out = Path(args.out) if args.out else Path("runs") / default

    seeds = [config.seed + k for k in range(args.seeds)]
    configs = [dataclasses.replace(config, seed=s) for s in seeds]
    parent_dir = None
    if args.seeds == 1:
        plan = [(out, configs[0])]
    else:
        plan = [(out / f"seed-{s}", c) for s, c in zip(seeds, configs)]
        parent = {"experiment": exp.name, "smoke": args.smoke, "seeds": seeds,
                  "folders": [p.name for p, _ in plan]}
        parent_dir = _open_run(out, parent, resume=args.resume, overwrite=args.overwrite)

    try:
        return _run_plan(exp, args, plan, seeds, out, parent_dir)
    finally:
        if parent_dir is not None:
            parent_dir.unlock()


def _run_plan(exp, args, plan, seeds, out, parent_dir) -> int:
    from revlearn.meta import using_devices

    progress = not args.no_progress
    summaries = []
    for k, (path, c) in enumerate(plan):
        if args.seeds > 1:
            print(f"[{k + 1}/{len(plan)}] {exp.name} seed {c.seed} -> {path}", flush=True)
        run_dir = _open_run(path, _saved_record(exp.name, args.smoke, c), resume=args.resume,
                            overwrite=args.overwrite, progress=progress,
                            allow_fresh_resume=args.seeds > 1)
        try:
            with using_devices(args.devices):
                summary = _run_one(exp, c, run_dir)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; continue with: {PROG} run {exp.name} "
                  f"{' '.join(_rerun_flags(args))} --resume --out {out}".replace("  ", " "),
                  file=sys.stderr)
            return 130
        finally:
            run_dir.unlock()
        summaries.append(summary)
        print(f"{exp.name} (seed {c.seed}): results in {path}")
        _print_summary(summary)
        figures = sorted((path / "figures").glob("*.png")) if (path / "figures").is_dir() else []
        if figures:
            print("  figures: " + ", ".join(str(f) for f in figures))

    if parent_dir is not None:
        agg = _aggregate(summaries, seeds)
        parent_dir.write_json("seeds_summary.json", agg)
        print(f"{exp.name}: mean ± std over {len(seeds)} seeds (sample std), in "
              f"{out / 'seeds_summary.json'}")
        width = max((len(k) for k in agg["mean"]), default=0)
        for k in agg["mean"]:
            print(f"  {k:<{width}}  {agg['mean'][k]:.6g} ± {agg['std'][k]:.2g}")
    return 0


def _rerun_flags(args) -> list[str]:
    flags = [f"--set {o}" for o in args.overrides]
    if args.smoke:
        flags.append("--smoke")
    if args.seed is not None:
        flags.append(f"--seed {args.seed}")
    if args.seeds != 1:
        flags.append(f"--seeds {args.seeds}")
    if args.data:
        flags.append(f"--data {args.data}")
    if args.data_dir:
        flags.append(f"--data-dir {args.data_dir}")
    if args.devices is not None:
        flags.append(f"--devices {args.devices}")
    return flags


def _aggregate(summaries: list[dict], seeds: list[int]) -> dict:
    keys = [k for k in summaries[0] if all(_is_number(s.get(k)) for s in summaries)]
    mean = {k: statistics.fmean(float(s[k]) for s in summaries) for k in keys}
    std = {k: (statistics.stdev(float(s[k]) for s in summaries) if len(summaries) > 1 else 0.0)
           for k in keys}
    return {"seeds": seeds, "n": len(seeds), "mean": mean, "std": std,
            "per_seed": {str(s): summ for s, summ in zip(seeds, summaries)}}


# -- plot, list, check -------------------------------------------------------------

def _cmd_plot(args) -> int:
    from revlearn import experiments
    from revlearn.meta import RunDir, RunFileError

    path = Path(args.run_dir)
    if not path.is_dir():
        raise CLIError(f"no run folder at {path}; give a folder written by `revlearn run`")
    top = RunDir(path).read_config() or {}
    if "folders" in top:
        folders = [path / f for f in top["folders"]]
    elif (path / SEEDS_FILE).is_file():  # multi-seed folders of revlearn 0.2
        folders = [path / f for f in json.loads((path / SEEDS_FILE).read_text())["folders"]]
    else:
        folders = [path]
    for folder in folders:
        if not (folder / RunDir.CONFIG).is_file():
            raise CLIError(f"{folder} is not a run folder (no config.json); give a folder "
                           "written by `revlearn run`")
        run_dir = RunDir(folder).lock()  # no run may write it meanwhile
        name = run_dir.read_config().get("experiment")
        try:
            exp = experiments.get(name)
        except experiments.UnknownExperimentError as e:
            raise CLIError(f"{folder}: {e}") from None
        try:
            figures = exp.plot(folder)
        except FileNotFoundError as e:
            raise CLIError(f"{folder} lacks saved results ({Path(e.filename or '?').name}); "
                           "finish the run first (revlearn run ... --resume)") from None
        except RunFileError as e:
            raise CLIError(f"{e} (the run is unfinished or damaged; nothing was plotted)") from None
        finally:
            run_dir.unlock()
        for f in figures:
            print(f)
    return 0


def _cmd_list(args) -> int:
    from revlearn import experiments

    exps = experiments.all_experiments()
    width = max((len(e.name) for e in exps), default=0)
    for e in exps:
        print(f"{e.name:<{width}}  {e.description}")
    return 0


def _cmd_check(args) -> int:
    import revlearn

    self_check = getattr(revlearn, "self_check", None)
    if self_check is None:
        raise CLIError("this revlearn has no self_check(); upgrade or reinstall revlearn")
    result = self_check()
    print(result)
    return 0 if result.passed else 1


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line with `argv` (default: sys.argv[1:]); returns the exit status.

    Usage, configuration, data and environment errors (a folder that cannot be written, a
    damaged run file, a run folder in use) print one line and return 2; `--debug` (or
    REVLEARN_DEBUG=1) lets them raise with their traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("REVLEARN_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        # The core's fixed-point state needs int64: switch x64 on before any
        # module that creates JAX arrays is imported.
        import jax
        jax.config.update("jax_enable_x64", True)
        from revlearn.data import DataError

        command = {"list": _cmd_list, "run": _cmd_run, "plot": _cmd_plot,
                   "check": _cmd_check}[args.command]
        lab_errors: tuple = ()
        if args.command != "check":  # `check` is the core's; the rest is the lab's
            try:
                from revlearn._extras import require
                require(f"`{PROG} {args.command}`")
                from revlearn.meta import RunDirError
            except ImportError as e:
                if debug:
                    raise
                raise CLIError(_one_line(e)) from None
            lab_errors = (RunDirError,)
        try:
            return command(args)
        except (*lab_errors, DataError, PermissionError, NotADirectoryError,
                FileExistsError, IsADirectoryError) as e:
            if debug:
                raise
            raise CLIError(_one_line(e)) from None
        except OSError as e:
            if debug or e.errno not in _ENVIRONMENT_ERRNOS:
                raise
            raise CLIError(f"{e.strerror}: {e.filename}" if e.filename else _one_line(e)) from None
    except CLIError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


#: OSError numbers that are the environment's fault, not revlearn's: reported in one line.
_ENVIRONMENT_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM,
                       errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.ENAMETOOLONG}


if __name__ == "__main__":
    sys.exit(main())
