"""The ``ntk-sweep`` command: thin adapters over ``core``.

Exit codes: 0 success, 1 a failure during the run, 2 invalid input (config, dataset, output
directory), reported before any work starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ntk-sweep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser(
        "experiment", help="run one experiment (phase 1 + phase 2 from every switch point)"
    )
    exp.add_argument("config", help="a YAML file, or the name of a shipped one (see 'list')")
    exp.add_argument("--out", default=None, help="output directory (default runs/<name>)")
    exp.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a field, e.g. --set phase1.epochs=3")
    exp.add_argument("--quiet", action="store_true", help="no progress bar")
    val = sub.add_parser("validate", help="validate an experiment config and exit")
    val.add_argument("config")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ker = sub.add_parser("kernel", help="empirical NTKs of an experiment's phase-1 checkpoints")
    ker.add_argument("run_dir", help="an experiment's output directory")
    ker.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="kernel settings, e.g. --set kernel.probe_size=100")
    ker.add_argument("--quiet", action="store_true", help="no progress bar")
    fea = sub.add_parser("features", help="NTK eigen-feature images of phase-1 checkpoints")
    fea.add_argument("run_dir", help="an experiment's output directory")
    fea.add_argument("--epoch", type=float, required=True, help="a phase-1 checkpoint epoch")
    fea.add_argument("--classes", default=None, help="comma-separated classes (default 0-9)")
    fea.add_argument("--steps", type=int, default=600, help="signed-gradient steps")
    fea.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="kernel settings, e.g. --set kernel.probe_size=100")
    run = sub.add_parser("run", help="run a sweep as Ray Tune trials, recorded in MLflow")
    run.add_argument("space", help="a sweep YAML file, or the name of a shipped one")
    run.add_argument("--out", default=None, help="output directory (default runs/<name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a field, e.g. --set phase2.epochs=3")
    sub.add_parser("list", help="list the shipped experiment and sweep definitions")
    return parser


def _fail(message: str) -> int:
    print(f"ntk-sweep: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _check_writable(out: Path) -> str | None:
    """None if ``out`` can be created and written, else why not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        return f"output directory {out} is not writable ({e.strerror})"
    return None


def _load(config: str, overrides: list[str]):
    from core.config import load_config
    from search_spaces import resolve

    return load_config(resolve(config), overrides)


def _preflight(cfg) -> None:
    """Checks that need the data: the dataset loads and each batch fits the training set."""
    from core.config import ConfigError

    ds = cfg.dataset
    data = ds.load()
    n = len(data.y_train)
    for phase in ("phase1", "phase2"):
        if getattr(cfg, phase).batch_size > n:
            raise ConfigError(
                f"{phase}.batch_size: {getattr(cfg, phase).batch_size} exceeds the "
                f"{n} training images of {ds.name}"
            )


def cmd_experiment(args: argparse.Namespace) -> int:
    from core.config import ConfigError
    from core.data import DataError

    try:
        cfg = _load(args.config, args.overrides)
        _preflight(cfg)
    except (ConfigError, DataError) as e:
        return _fail(str(e))
    out = Path(args.out or Path("runs") / cfg.name)
    if problem := _check_writable(out):
        return _fail(problem)

    from core.train import Divergence
    from sweep.report import print_summary, run_with_progress

    try:
        rows = run_with_progress(cfg, out, quiet=args.quiet)
    except Divergence as e:
        print(f"ntk-sweep: training failed: {e}", file=sys.stderr)
        return 1
    print_summary(rows, out)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from core.config import ConfigError, read_config_file
    from search_spaces import resolve
    from sweep.space import parse_space

    try:
        path = resolve(args.config)
        raw = read_config_file(path, args.overrides)
        if isinstance(raw, dict) and "sweep" in raw:
            space = parse_space(raw, str(path))
            print(f"{args.config}: valid sweep, {space.trial_count()} trials over "
                  f"{', '.join(space.distributions) or 'no distributions'}")
            return 0
        cfg = _load(args.config, args.overrides)
    except ConfigError as e:
        return _fail(str(e))
    print(f"{args.config}: valid ({cfg.name}: codes {', '.join(cfg.codes)}, "
          f"switch points {list(cfg.switch_points)}, seeds {list(cfg.seeds)})")
    return 0


def cmd_kernel(args: argparse.Namespace) -> int:
    from core.config import ConfigError
    from core.data import DataError
    from sweep.kernel_report import kernel_spec, run_kernels

    run_dir = Path(args.run_dir)
    try:
        spec, infos = kernel_spec(run_dir, args.overrides)
    except (ConfigError, DataError) as e:
        return _fail(str(e))
    if not infos:
        return _fail(f"{run_dir}: no trajectories (expected {run_dir}/trajectories/*/)")
    if problem := _check_writable(run_dir):
        return _fail(problem)
    run_kernels(run_dir, spec, infos, quiet=args.quiet)
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from core.config import ConfigError
    from core.data import DataError
    from sweep.kernel_report import kernel_spec, run_features

    run_dir = Path(args.run_dir)
    try:
        spec, infos = kernel_spec(run_dir, args.overrides)
        classes = None if args.classes is None else [int(c) for c in args.classes.split(",")]
    except (ConfigError, DataError, ValueError) as e:
        return _fail(str(e))
    if not infos:
        return _fail(f"{run_dir}: no trajectories (expected {run_dir}/trajectories/*/)")
    try:
        run_features(run_dir, spec, infos, args.epoch, classes, args.steps)
    except DataError as e:
        return _fail(str(e))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from core.config import ConfigError, read_config_file
    from core.data import DataError
    from search_spaces import resolve
    from sweep.space import parse_space

    try:
        path = resolve(args.space)
        space = parse_space(read_config_file(path, args.overrides), str(path))
        _preflight(space.config({p: d.args[0] for p, d in space.distributions.items()}))
    except (ConfigError, DataError) as e:
        return _fail(str(e))
    out = Path(args.out or Path("runs") / (space.base.get("name") or path.stem))
    if problem := _check_writable(out):
        return _fail(problem)

    from sweep.console import stdout_console
    from sweep.report import summary_table
    from sweep.runner import run_sweep, sweep_rows, tracking_uri

    records = run_sweep(space, out)
    console = stdout_console()
    console.print(summary_table(sweep_rows(out.absolute())))
    failed = [r for r in records if r["error"]]
    console.print(f"{len(records)} trials, {len(failed)} failed"
                  + "".join(f"\n  failed: {r['error'][:300]}" for r in failed))
    console.print(f"summary: {out / 'summary.md'}, {out / 'summary.csv'}")
    console.print(f"plot: {out / 'switch_point.png'}")
    console.print("open the results: .venv/bin/mlflow ui --backend-store-uri "
                  f"{tracking_uri(out.absolute())}")
    return 1 if failed else 0


def cmd_list(args: argparse.Namespace) -> int:
    from search_spaces import FOLDER, names

    for name in names():
        first = (FOLDER / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:24s} {first}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = _parser().parse_args(argv)
    handler = {"experiment": cmd_experiment, "validate": cmd_validate, "list": cmd_list,
               "kernel": cmd_kernel, "features": cmd_features, "run": cmd_run}
    return handler[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
