"""The ``ntk-sweep`` command: thin adapters over ``core``.

Exit codes: 0 success, 1 a failure during the run, 2 invalid input (config, dataset, output
directory), reported before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

import yaml

from core.config import (
    RESULT_METRICS,
    ConfigError,
    DataError,
    load_config,
    merge,
    parse_overrides,
    read_config_file,
    read_prefix,
    stored_config,
)
from core.trajectory_store import TrajectoryStore, kernel_storage_bytes, trajectory_id
from search_spaces import FOLDER, names, resolve
from sweep.claims import (
    read_claims,
    record_claims,
    show_claims,
    studies,
    study_claims,
    write_claims,
)
from sweep.console import stdout_console
from sweep.k8s import dump, render_sweep
from sweep.layout import (
    StateFileError,
    jax_cache_dir,
    read_results,
    sweep_run,
    tracking_uri,
    trial_files,
    trial_outcomes,
)
from sweep.space import is_sweep, parse_space

EXIT_BAD_INPUT = 2


def _add_set(parser: argparse.ArgumentParser, help: str = "override a field") -> None:
    """``--set KEY=VALUE`` (repeatable): config overrides, parsed by ``parse_overrides``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help=help)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ntk-sweep")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ntk-sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ntk-sweep {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser(
        "experiment", help="run one experiment (phase 1 + phase 2 from every switch point)"
    )
    exp.add_argument("config", help="a YAML file, or the name of a shipped one (see 'list')")
    exp.add_argument("--out", default=None, help="output directory (default runs/<name>)")
    _add_set(exp, "override a field, e.g. --set phase1.epochs=3")
    exp.add_argument("--quiet", action="store_true", help="no progress bar")
    val = sub.add_parser("validate", help="validate an experiment or sweep definition and exit")
    val.add_argument("config")
    _add_set(val)
    val.add_argument("--estimate", action="store_true",
                     help="also estimate the run's time on this machine by timing its programs "
                     "once (imports JAX; seconds to a minute)")
    ker = sub.add_parser("kernel", help="empirical NTKs of an experiment's phase-1 checkpoints")
    ker.add_argument("run_dir", help="an experiment's output directory")
    _add_set(ker, "kernel settings, e.g. --set kernel.probe_size=100")
    ker.add_argument("--quiet", action="store_true", help="no progress bar")
    fea = sub.add_parser("features", help="NTK eigen-feature images of phase-1 checkpoints")
    fea.add_argument("run_dir", help="an experiment's output directory")
    fea.add_argument("--epoch", type=float, required=True, help="a phase-1 checkpoint epoch")
    fea.add_argument("--classes", default=None, help="comma-separated classes (default 0-9)")
    fea.add_argument("--steps", type=int, default=600, help="signed-gradient steps")
    _add_set(fea, "kernel settings, e.g. --set kernel.probe_size=100")
    run = sub.add_parser("run", help="run a sweep as Ray Tune trials, recorded in MLflow")
    run.add_argument("space", help="a sweep YAML file, or the name of a shipped one")
    run.add_argument("--out", default=None, help="output directory (default runs/<name>)")
    _add_set(run, "override a field, e.g. --set phase2.epochs=3")
    run.add_argument("--trials", action="store_true",
                     help="also show a table of the trials (state, values, stage, progress) "
                     "every 30 s and at the end")
    res = sub.add_parser("resume", help="finish an interrupted sweep (finished trials are kept)")
    res.add_argument("out", help="the sweep's output directory (holds sweep.json)")
    sta = sub.add_parser("status", help="the trials of a sweep: state, progress, metrics")
    sta.add_argument("out", help="the sweep's output directory (holds sweep.json)")
    rep = sub.add_parser("report", help="rebuild a sweep's tables and plots from MLflow")
    rep.add_argument("out", nargs="?", default=None,
                     help="the sweep's output directory (its MLflow store and experiment)")
    rep.add_argument("--experiment", default=None, help="MLflow experiment (the sweep's name)")
    rep.add_argument("--tracking-uri", default=None, help="default: the sweep's, or "
                     "MLFLOW_TRACKING_URI")
    rep.add_argument("--to", default=None, help="where to write (default <out>/report)")
    cmp = sub.add_parser("compare", help="kernel distances between two phase-1 trajectories")
    cmp.add_argument("run_a", help="trajectory id (prefix), directory, or <trial run id>/<mode>")
    cmp.add_argument("run_b")
    cmp.add_argument("--store", action="append", default=[],
                     help="output directories to search (default runs/*)")
    cmp.add_argument("--to", default="compare", help="where to write compare.csv/.png")
    _add_set(cmp, "kernel settings, e.g. --set kernel.probe_size=100")
    cla = sub.add_parser("claims", help="the paper's claims checked on a finished run")
    cla.add_argument("run_dir", help="an experiment's or a sweep's output directory")
    cla.add_argument("--metric", default="worst_linf",
                     help="the robust accuracy claims 1 and 2 compare (default worst_linf)")
    cla.add_argument("--fraction", type=float, default=0.1,
                     help="claim 3: converged once the distance to the final kernel stays "
                     "within this fraction of the initial one (default 0.1)")
    att = sub.add_parser("attack", help="rebuild one model of a finished run, attack it again")
    att.add_argument("run_dir", help="an experiment's output directory, or a sweep trial's "
                     "(<out>/trials/<id>)")
    att.add_argument("--model", required=True, help="CODE@EPOCH, e.g. AC@10, or A-@30 for the "
                     "phase-1 network")
    att.add_argument("--seed", type=int, default=None, help="default: the run's first seed")
    att.add_argument("--source", default=None, help="also score it on PGD examples crafted on "
                     "this model of the same seed, e.g. A-@30")
    _add_set(att, "evaluation settings, e.g. --set eval.linf.iters=500")
    k8s = sub.add_parser("k8s", help="Kubernetes manifests (KubeRay RayJob) for a sweep")
    k8s_sub = k8s.add_subparsers(dest="k8s_command", required=True)
    ren = k8s_sub.add_parser("render", help="print a ConfigMap and a RayJob running SPACE")
    ren.add_argument("space", help="a sweep YAML file, or the name of a shipped one")
    ren.add_argument("--image", required=True, help="the ntk-sweep image (see Dockerfile)")
    _add_set(ren, "override a field of the sweep")
    ren.add_argument("--max-workers", type=int, default=4, help="autoscaling upper bound")
    ren.add_argument("--worker-cpus", type=int, default=None,
                     help="CPUs per worker pod (default: 4, or 8 with GPUs)")
    ren.add_argument("--worker-memory", default=None, help="default 16Gi, or 48Gi with GPUs")
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

    return load_config(resolve(config), overrides)


def out_dir(args: argparse.Namespace, space, path: Path) -> Path:
    """A sweep's output directory: --out, else runs/<name>."""
    return Path(args.out or Path("runs") / (space.base.get("name") or path.stem))


def _sweep_kernel_bytes(space, num_classes: int) -> float:
    """Kernel files of a sweep: one set per distinct trajectory (trials that differ only in
    phase 2 share theirs), times ``num_samples`` when values are drawn at random."""

    per_trajectory: dict[str, float] = {}
    for cfg in space.configs():
        if not cfg.kernel.enabled:
            continue
        modes = cfg.phase1_modes
        for mode in modes:
            key = trajectory_id(cfg, mode, cfg.seeds[0]) + repr(cfg.kernel)
            per_trajectory[key] = kernel_storage_bytes(cfg, num_classes) / len(modes)
    drawn = any(d.kind != "grid" for d in space.distributions.values())
    return sum(per_trajectory.values()) * (space.settings.num_samples if drawn else 1)


def _check_tracking(out: Path) -> None:
    """ConfigError unless the MLflow store the sweep will use answers (checked before Ray)."""

    _check_tracking_uri(tracking_uri(out.absolute()), "MLFLOW_TRACKING_URI")


def _check_sqlite(path: Path) -> None:
    """ConfigError naming ``path`` if a local MLflow database exists there and is not one
    MLflow can read (damaged, or another file); a missing one is created on first use."""
    from sweep.tracking import Tracker

    if not path.exists():
        return
    advice = ("it holds the sweep's MLflow runs: restore it from a copy, or move it aside to "
              "start a new database (results on disk are kept)")
    try:
        head = read_prefix(path, 15)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the MLflow database ({e.strerror})") from None
    if head != b"SQLite format 3\x00":
        raise ConfigError(f"{path}: not an SQLite database (damaged?); {advice}")
    try:
        Tracker(f"sqlite:///{path}").check()
    except Exception as e:  # noqa: BLE001 - any failure to open it
        raise ConfigError(f"{path}: MLflow cannot read this database ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}); {advice}") from None


def _check_tracking_uri(uri: str, field: str) -> None:
    """ConfigError naming ``field`` unless the tracking server at ``uri`` answers at once."""
    from sweep.tracking import Tracker, sqlite_file

    if (database := sqlite_file(uri)) is not None:
        _check_sqlite(database)
        return
    if not uri.startswith("http"):
        return
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)  # one quick try, not MLflow's minutes of retries
    try:
        Tracker(uri).check()
    except Exception as e:  # noqa: BLE001 - any failure to answer
        raise ConfigError(f"{field}: the MLflow tracking server at {uri} does not answer "
                          f"({type(e).__name__}); start it, or unset MLFLOW_TRACKING_URI to "
                          "use a local SQLite store") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cmd_experiment(args: argparse.Namespace) -> int:
    from core.preflight import preflight

    try:
        cfg = _load(args.config, args.overrides)
        preflight(cfg)
    except (ConfigError, DataError) as e:
        return _fail(str(e))
    out = Path(args.out or Path("runs") / cfg.name)
    if problem := _check_writable(out):
        return _fail(problem)

    from core.train import Divergence
    from sweep.mlflow_runs import flat_params
    from sweep.plots import describe
    from sweep.terminal import print_summary, run_with_progress

    try:
        rows = run_with_progress(cfg, out, quiet=args.quiet)
    except Divergence as e:
        print(f"ntk-sweep: training failed: {e}", file=sys.stderr)
        return 1
    print_summary(rows, out, describe(flat_params(cfg)))
    _claims_of_run(out)
    return 0


def _claims_of_run(out: Path) -> None:
    """Evaluates, writes and prints the claims of an experiment's output (``claims``)."""

    console = stdout_console()
    results = record_claims(out, studies(out))
    show_claims(console, results)
    no_kernels = any(c.key == "3" and c.verdict == "not enough data" for _, cs in results
                     for c in cs)
    console.print(f"claims: {out / 'claims.md'}" + (
        f" (claim 3 needs the kernels: ntk-sweep kernel {out})" if no_kernels else ""))


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        path = resolve(args.config)
        raw = read_config_file(path, args.overrides)
        if isinstance(raw, dict) and "sweep" in raw:
            space = parse_space(raw, str(path))
            print(f"{args.config}: valid sweep, {space.trial_count()} trials over "
                  f"{', '.join(space.distributions) or 'no distributions'}")
            print("\n".join(space.describe()))
        else:
            cfg = _load(args.config, args.overrides)
            print(f"{args.config}: valid ({cfg.name}: codes {', '.join(cfg.codes)}, "
                  f"switch points {list(cfg.switch_points)}, seeds {list(cfg.seeds)})")
            space = None
    except ConfigError as e:
        return _fail(str(e))
    if not args.estimate:
        if space is not None:
            print("  (--estimate: its time on this machine)")
        return 0
    from core import estimate

    def log(message: str) -> None:
        print(f"  ... {message}", file=sys.stderr, flush=True)

    try:
        est = (estimate.for_experiment(cfg, log) if space is None
               else estimate.for_sweep(space.configs(), space.trial_count(), log))
    except DataError as e:
        return _fail(str(e))
    print("\n".join(estimate.describe(est)))
    return 0


def cmd_kernel(args: argparse.Namespace) -> int:
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
    if (run_dir / "results.json").is_file():  # claim 3 has its data now
        _claims_of_run(run_dir)
    return 0


def cmd_features(args: argparse.Namespace) -> int:
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
    from core.data import dataset_of
    from core.preflight import preflight

    try:
        path = resolve(args.space)
        space = parse_space(read_config_file(path, args.overrides), str(path))
        first = space.config({p: d.args[0] for p, d in space.distributions.items()})
        preflight(first, kernels=first.kernel.enabled,
                   kernel_bytes=_sweep_kernel_bytes(space, dataset_of(first.dataset).num_classes))
        _check_tracking(out_dir(args, space, path))
    except (ConfigError, DataError) as e:
        return _fail(str(e))
    out = out_dir(args, space, path)
    if problem := _check_writable(out):
        return _fail(problem)

    from sweep.runner import run_sweep

    return _finished(out, lambda: run_sweep(space, out, trial_rows=args.trials))


def _finished(out: Path, sweep) -> int:
    """Runs ``sweep()`` (run or resume) and prints its summary; a local MLflow database lost
    on the way still gets the summary from the trial files, then the error naming it."""
    from sweep.runner import SweepInterrupted, SweepTrackingLost

    try:
        records = sweep()
    except SweepInterrupted as e:
        print(f"ntk-sweep: error: {e}", file=sys.stderr)
        return 1
    except SweepTrackingLost as e:
        _sweep_done(out, e.records)
        print(f"ntk-sweep: error: {e}; the summary above and in {out / 'summary.md'} is "
              "from the trial files", file=sys.stderr)
        return 1
    return _sweep_done(out, records)


def _sweep_done(out: Path, records: list[dict]) -> int:
    """Prints the sweep's summary table, where its files are and how to open MLflow."""
    from sweep.terminal import show_summary

    console = stdout_console()
    trials = [r["trial_id"] for r in records]  # this sweep's, not earlier ones' in ``out``
    rows, own = trial_outcomes(out.absolute(), trials, sweep_run(out.absolute()))
    if rows:
        show_summary(console, rows)
    # A trial's own error (divergence, a damaged file) rather than Ray's traceback.
    errors = {r["trial_id"]: r["error"][-400:] for r in records if r["error"]}
    errors.update({f["trial"]: f["error"] for f in own})
    console.print(f"{len(records)} trials, {len(errors)} failed", highlight=False)
    for message in errors.values():
        console.print(f"  failed: {message}", highlight=False, markup=False)
    if (out / "claims.json").is_file():
        show_claims(console, read_claims(out))
    console.print(f"summary: {out / 'summary.md'}, {out / 'summary.csv'}, {out / 'claims.md'}")
    plots = [out / "switch_point.png", *sorted(out.glob("cross_trajectory*.png")),
             *trial_files(out, trials, "kernels.png")]
    console.print("plots:" + "".join(f"\n  {p}" for p in plots if p.is_file()))
    uri = tracking_uri(out.absolute())
    console.print(f"open the results: {uri}" if uri.startswith("http") else
                  f"open the results: .venv/bin/mlflow ui --backend-store-uri {uri}")
    return 1 if errors else 0


def cmd_resume(args: argparse.Namespace) -> int:
    from sweep.review import resumable_sweep

    out = Path(args.out)
    try:
        state, _ = resumable_sweep(out)
        _check_tracking_uri(state["tracking_uri"], "tracking_uri of sweep.json")
    except ConfigError as e:
        return _fail(str(e))
    from sweep.runner import resume_sweep

    return _finished(out, lambda: resume_sweep(out)[1])


def cmd_status(args: argparse.Namespace) -> int:
    from rich.table import Table

    from sweep.review import load_sweep, trial_status

    out = Path(args.out)
    try:
        state, space = load_sweep(out)
        records = trial_status(out, state)
    except ConfigError as e:
        return _fail(str(e))
    counts: dict[str, int] = {}
    for r in records:
        kind = r["status"].split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    table = Table(title=f"sweep {state['name']}: {space.trial_count()} trials: " + ", ".join(
        f"{n} {kind}" for kind, n in counts.items()) + (
        f", {space.trial_count() - len(records)} not started"
        if len(records) < space.trial_count() else ""))
    columns = list(dict.fromkeys(k for r in records for k in r))
    for c in columns:
        table.add_column(c, justify="right")
    for r in records:
        table.add_row(*(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                        for c in columns))
    console = stdout_console()
    console.print(table)
    console.print(f"MLflow: {state['tracking_uri']} (experiment {state['name']!r}, parent run "
                  f"{state['parent_run']})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sweep.review import report, sweep_state
    from sweep.terminal import show_summary

    try:
        state = sweep_state(Path(args.out)) if args.out else {}
        uri = args.tracking_uri or state.get("tracking_uri") or os.environ.get(
            "MLFLOW_TRACKING_URI")
        experiment = args.experiment or state.get("name")
        if not uri or not experiment:
            raise ConfigError("report: give a sweep's output directory, or --experiment and "
                              "--tracking-uri (or MLFLOW_TRACKING_URI)")
        to = Path(args.to or Path(args.out or ".") / "report")
        if problem := _check_writable(to):
            return _fail(problem)
        # One quick try, not minutes of MLflow's retries and a traceback.
        _check_tracking_uri(uri, "--tracking-uri" if args.tracking_uri else
                            "tracking_uri of sweep.json" if state.get("tracking_uri") else
                            "MLFLOW_TRACKING_URI")
        same = state and uri == state.get("tracking_uri") and experiment == state.get("name")
        rows, paths = report(uri, experiment, to, state.get("parent_run") if same else None)
    except ConfigError as e:
        return _fail(str(e))
    console = stdout_console()
    show_summary(console, rows)
    console.print("rebuilt from MLflow: " + ", ".join(str(p) for p in paths))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from sweep.review import compare, resolve_trajectory

    stores = [Path(s) for s in args.store] or sorted(Path("runs").glob("*/"))
    try:
        a = resolve_trajectory(args.run_a, stores)
        b = resolve_trajectory(args.run_b, stores)
        if problem := _check_writable(Path(args.to)):
            return _fail(problem)
        rows = compare(a, b, Path(args.to), args.overrides)
    except (ConfigError, DataError) as e:
        return _fail(str(e))
    console = stdout_console()
    console.print(f"kernel distance S(a_t, b_t), a = {a.name}, b = {b.name}")
    for r in rows:
        console.print(f"  epoch {r['epoch']:>8g}  {r['distance']:.4f}   "
                      f"(to init: a {r['a_to_init']:.4f}, b {r['b_to_init']:.4f})")
    console.print(f"written: {Path(args.to) / 'compare.csv'}, {Path(args.to) / 'compare.png'}")
    return 0


def cmd_claims(args: argparse.Namespace) -> int:

    run_dir = Path(args.run_dir)
    if args.metric not in RESULT_METRICS:
        return _fail(f"--metric: {args.metric!r} is not one of {', '.join(RESULT_METRICS)}")
    if not 0 < args.fraction < 1:
        return _fail(f"--fraction: {args.fraction} is not in (0, 1)")
    try:
        found = studies(run_dir)
    except ConfigError as e:
        return _fail(str(e))
    if not found:
        return _fail(f"{run_dir}: no finished trials")
    results = [(s.variant, study_claims(s, args.metric, args.fraction)) for s in found]
    console = stdout_console()
    show_claims(console, results)
    if problem := _check_writable(run_dir):
        return _fail(problem)
    paths = write_claims(run_dir, results)
    console.print("claims: " + ", ".join(str(p) for p in paths))
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from core.audit import AuditError, ModelRef, recorded_row

    run_dir = Path(args.run_dir)
    try:
        results = read_results(run_dir / "results.json")
        extra = parse_overrides(args.overrides)
        if set(extra) - {"eval"}:
            raise ConfigError(f"--set: only eval.* settings apply here, got "
                              f"{sorted(set(extra) - {'eval'})}")
        source_file = str(run_dir / "results.json")
        run_eval = stored_config(results["config"], source_file).eval
        cfg = stored_config(merge(results["config"], extra), source_file)
        ref = ModelRef.parse(args.model)
        source = ModelRef.parse(args.source) if args.source else None
        seed = cfg.seeds[0] if args.seed is None else args.seed
        if seed not in cfg.seeds:
            raise AuditError(f"--seed {seed}: the run's seeds are {list(cfg.seeds)}")
        recorded = recorded_row(results["rows"], ref, seed)
        if source is not None:
            recorded_row(results["rows"], source, seed)  # it exists too
    except (StateFileError, ConfigError, AuditError) as e:
        return _fail(str(e))
    store_root = next((d for d in (run_dir, run_dir.parent.parent)
                       if TrajectoryStore(d).directory.is_dir()), run_dir)
    if problem := _check_writable(run_dir):
        return _fail(problem)

    from sweep.terminal import run_audit

    return run_audit(cfg, run_dir, store_root, ref, seed, source, recorded, run_eval)


def cmd_k8s(args: argparse.Namespace) -> int:



    try:
        path = resolve(args.space)
        raw = read_config_file(path, args.overrides)
        space = parse_space(raw, str(path))
        if args.max_workers < 1:
            raise ConfigError(f"--max-workers: expected at least 1, got {args.max_workers}")
    except ConfigError as e:
        return _fail(str(e))
    gpus = math.ceil(space.settings.resources.gpus)
    print(dump(render_sweep(
        path.stem, yaml.safe_dump(raw, sort_keys=False) if args.overrides else path.read_text(),
        args.image, gpus_per_worker=gpus, max_workers=args.max_workers,
        worker_cpus=args.worker_cpus or (8 if gpus else 4),
        worker_memory=args.worker_memory or ("48Gi" if gpus else "16Gi"),
    )), end="")
    return 0


def cmd_list(args: argparse.Namespace) -> int:

    """The shipped definitions: name, whether it is a sweep (``run``) or an experiment
    (``experiment``; ``run`` runs its seeds as trials), and its first comment line."""
    for name in names():
        text = (FOLDER / f"{name}.yaml").read_text()
        kind = "sweep" if is_sweep(yaml.safe_load(text)) else "experiment"
        print(f"{name:24s} {kind:10s} {text.splitlines()[0].lstrip('# ')}")
    return 0


COMPILING = {"experiment", "kernel", "features", "compare", "attack"}  # commands running JAX


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # MLflow announces every database migration of a new store at INFO: not news to a user.
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    args = _parser().parse_args(argv)
    if args.command in COMPILING:  # they load JAX anyway: keep what they compile
        from core.compat import use_compilation_cache

        use_compilation_cache(jax_cache_dir())
    handler = {"experiment": cmd_experiment, "validate": cmd_validate, "list": cmd_list,
               "kernel": cmd_kernel, "features": cmd_features, "run": cmd_run,
               "resume": cmd_resume, "status": cmd_status, "report": cmd_report,
               "compare": cmd_compare, "claims": cmd_claims, "attack": cmd_attack,
               "k8s": cmd_k8s}
    return handler[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
