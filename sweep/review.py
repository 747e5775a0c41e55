"""``ntk-sweep status``, ``report`` and ``compare``: looking at a sweep without re-running it.

* status: each trial's state in Ray Tune's experiment (read offline), its values, metric and
  progress, and the sweep's MLflow location;
* report: the summary table, ``switch_point.png`` and ``kernel_distances.png`` rebuilt from
  what MLflow holds (the model runs' params and metrics, the trajectory runs' histories),
  so results are reproducible from the tracking server alone;
* compare: kernel distances S(K^a_t, K^b_t) between two stored trajectories at their common
  checkpoints, given as trajectory ids (the ``trajectory_id`` param of trajectory runs), id
  prefixes, trajectory directories or ``<trial run id>/<mode>``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from core.config import MODES, RESULT_METRICS, ConfigError
from core.trajectory_store import TrajectoryStore, is_trajectory
from sweep.layout import (
    CONTEXT_KEY,
    SWEEP_STATE,
    StateFileError,
    quiet_tune_analysis,
    read_record,
    read_results,
    read_trial_state,
    resolved,
)
from sweep.mlflow_runs import KIND, MODEL_KINDS, PARENT_TAG, SWEEP, TRAJECTORY, TRIAL, VARIANT_TAG
from sweep.space import SweepSpace

MODEL_PARAMS = ("seed", "code", "dynamics", "switch_epoch")  # what a report reads of a model run
SWEEP_STATE_KEYS = {"name": str, "space": dict, "storage": str, "tracking_uri": str,
                    "experiment_id": str, "parent_run": str}


def load_sweep(out: Path) -> tuple[dict[str, Any], SweepSpace]:
    """The ``sweep.json`` that ``ntk-sweep run`` wrote in ``out``, checked (its keys, their
    types), and its stored space parsed; ConfigError naming the file and what is wrong."""
    from sweep.space import parse_space

    path = out / SWEEP_STATE
    if not path.is_file():
        raise ConfigError(f"{path}: not found (expected the output directory of 'ntk-sweep run')")
    try:
        state = read_record(path, SWEEP_STATE_KEYS)
    except StateFileError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(state.get("out", ""), str):
        raise ConfigError(f"{path}: out: a {type(state['out']).__name__}, not a str")
    space = parse_space(state["space"], f"{path}: space")  # ConfigError naming the field
    # Paths inside the output directory are kept relative to it: resolved against where the
    # file is now, so a copy reads its own files. ``moved_from``: where it ran, if elsewhere.
    here = out.absolute()
    ran_in = state.get("out")
    return {**state, "storage": resolved(here, state["storage"]),
            "tracking_uri": resolved(here, state["tracking_uri"]),
            "moved_from": ran_in if ran_in and Path(ran_in) != here else None}, space


def resumable_sweep(out: Path) -> tuple[dict[str, Any], SweepSpace]:
    """``load_sweep``, refused (ConfigError) for a sweep copied or moved from where it ran:
    its Ray trials and MLflow artifacts record that path, and resuming would write there."""
    state, space = load_sweep(out)
    if state["moved_from"]:
        raise ConfigError(
            f"{out / SWEEP_STATE}: this sweep ran in {state['moved_from']}; 'resume' continues a "
            "sweep only where it ran (its Ray trials and MLflow artifacts record that path). Move "
            "it back to resume it, or start a new sweep here with 'ntk-sweep run --out' (stored "
            "trajectories are reused); 'status' and 'report' read this copy as it is")
    return state, space


def sweep_state(out: Path) -> dict[str, Any]:
    """``load_sweep``'s state alone."""
    return load_sweep(out)[0]


def _trial_files(trial_dir: Path, status: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(status, heartbeat, final metrics) as the trial's own record settles them, where it
    does, else ``status``: ``finished`` (its final metrics recorded, as ``resume`` counts it),
    ``failed`` (it diverged) or ``damaged: ...`` (a file of it is unreadable)."""
    beat: dict[str, Any] = {}
    final: dict[str, Any] = {}
    try:
        state = read_trial_state(trial_dir)
        beat = state.heartbeat or {}
        if state.final is not None:  # what resume counts as finished
            read_results(trial_dir / "results.json")
            final, status = state.final, "finished"
        elif state.error is not None:
            status = "failed"
    except StateFileError as e:
        status = f"damaged: {e}"
    return status, beat, final


def trial_status(out: Path, state: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per trial of the sweep's Tune experiment (``state``: its ``load_sweep``):
    id, status, failures, values of the swept paths, its last heartbeat, progress and metrics
    (of its last report to Tune).

    The status is what the trial's own files say where they settle it (``_trial_files``;
    results written without final metrics, by a trial killed while it computed kernels or
    wrote MLflow, is not finished), else Tune's as it last saved it: after a driver kill a
    trial Tune left RUNNING or PENDING shows the stage and age of its heartbeat, if it has
    one. Trials that started after Tune last saved its state (a driver killed within a
    second of starting them: a reused worker runs a tiny trial in that time) are found by
    their directories, named with the experiment's trial-id prefix, and counted as their
    files say (``started`` if they do not settle it)."""
    from ray.tune import ExperimentAnalysis

    quiet_tune_analysis()
    path = f"{state['storage'].rstrip('/')}/{state['name']}"
    try:
        analysis = ExperimentAnalysis(path)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{path}: no Tune experiment state ({e})") from None

    def record(trial_id: str, status: str, failures: Any, values: dict[str, Any],
               last: dict[str, Any]) -> dict[str, Any]:
        status, beat, final = _trial_files(out / "trials" / trial_id, status)
        last = final or last
        age = f", {time.time() - beat['time']:.0f} s ago" if beat else ""
        return {"trial": trial_id, "status": status, "failures": failures,
                "last heartbeat": f"{beat['stage']} {beat['epoch']}{age}" if beat else "-",
                "unsent mlflow writes": beat.get("pending_writes", 0), **values,
                "models_evaluated": last.get("models_evaluated", 0),
                **{k: last[k] for k in RESULT_METRICS if k in last}}

    records = [record(t.trial_id, t.status, t.num_failures,
                      {k: v for k, v in t.config.items() if k != CONTEXT_KEY},
                      t.last_result or {}) for t in analysis.trials]
    known = {r["trial"] for r in records}
    prefixes = {trial.rpartition("_")[0] for trial in known}
    for directory in sorted((out / "trials").glob("*_*")) if prefixes else ():
        if directory.name in known or directory.name.rpartition("_")[0] not in prefixes:
            continue
        try:
            values = read_trial_state(directory).variant
        except StateFileError:
            values = {}
        records.append(record(directory.name, "started", "-", values, {}))
    return records


def mlflow_rows(tracking_uri: str, experiment: str, parent_run: str | None = None
                ) -> tuple[list[dict[str, Any]], list[Any], list[Any]]:
    """Result rows (one per evaluated model) of one sweep in its MLflow experiment, its
    trial runs and their trajectory runs: the sweep whose parent run is ``parent_run``
    (default the latest one). Only finished trials count (as in the sweep's own summary),
    each model once."""
    from mlflow.tracking import MlflowClient

    from sweep.tracking import search_all

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"MLflow at {tracking_uri} has no experiment {experiment!r}")
    runs = search_all(client, [exp.experiment_id])
    if parent_run is None:
        sweeps = [r for r in runs if r.data.tags.get(KIND) == SWEEP]
        if not sweeps:
            raise ConfigError(f"MLflow experiment {experiment!r} has no sweep run")
        parent_run = max(sweeps, key=lambda r: r.info.start_time).info.run_id
    trials = [r for r in runs if r.data.tags.get(KIND) == TRIAL
              and r.data.tags.get(PARENT_TAG) == parent_run and r.info.status == "FINISHED"]
    variants = {t.info.run_id: trial_variant(t) for t in trials}
    latest: dict[tuple[str, str], Any] = {}
    for r in runs:
        trial = r.data.tags.get(PARENT_TAG)
        if r.data.tags.get(KIND) in MODEL_KINDS and trial in variants:
            key = (trial, r.info.run_name)
            if key not in latest or r.info.start_time > latest[key].info.start_time:
                latest[key] = r
    rows = []
    for (trial, _), r in sorted(latest.items()):
        params, metrics = r.data.params, r.data.metrics
        missing = [k for k in MODEL_PARAMS if k not in params]
        if missing:
            raise ConfigError(
                f"MLflow run {r.info.run_id} ({r.info.run_name}) of experiment {experiment!r} "
                f"has no param {', '.join(missing)}: it was logged by an ntk-sweep before the "
                "params layout (2026-11-26); rebuild its summary from the sweep's files "
                "(summary.md, 'ntk-sweep claims OUT') instead")
        rows.append({"variant": variants[trial],
                     "seed": int(params["seed"]), "code": params["code"],
                     "dynamics": params["dynamics"],
                     "switch_epoch": float(params["switch_epoch"]),
                     "switch_rule": params.get("switch_rule", ""),
                     **{k: metrics.get(k, float("nan")) for k in RESULT_METRICS},
                     "masked": r.data.tags.get("masked") == "true"})
    trajectories = [r for r in runs if r.data.tags.get(KIND) == TRAJECTORY
                    and r.data.tags.get(PARENT_TAG) in variants]
    return rows, trials, trajectories


def report(tracking_uri: str, experiment: str, out: Path, parent_run: str | None = None
           ) -> tuple[list[dict], list[Path]]:
    """Rebuilds a sweep's tables, plots and claims from MLflow into ``out`` (the sweep of
    ``parent_run``, default the experiment's latest); returns the rows and the files."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from core.claims import KernelCurve
    from core.results import summarize, write_summary
    from sweep.claims import write_claims
    from sweep.plots import describe, kernel_distance_plot, switch_point_plot

    rows, trials, trajectories = mlflow_rows(tracking_uri, experiment, parent_run)
    if not rows:
        raise ConfigError(f"MLflow experiment {experiment!r} has no evaluated models yet")
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    client = MlflowClient(tracking_uri)
    parent = client.get_run(trials[0].data.tags[PARENT_TAG]) if trials else None
    swept = {p.strip() for p in parent.data.params.get("swept", "").split(",")} if parent else ()
    subtitle = describe(trials[0].data.params, swept) if trials else ""
    paths = [*write_summary(out, summary),
             switch_point_plot(summary, out / "switch_point.png", subtitle)]
    variants = {t.info.run_id: trial_variant(t) for t in trials}
    curves, kernel_curves = {}, {}
    for t in trajectories:
        if "to_init" not in t.data.metrics:
            continue
        series = {m: {h.step: h.value for h in client.get_metric_history(t.info.run_id, m)}
                  for m in ("to_init", "to_final", "velocity", "epoch")}
        steps = sorted(series["to_init"])
        epochs = [series["epoch"].get(s, np.nan) for s in steps]
        mode, seed = t.data.params["data_mode"], t.data.params["seed"]
        curves[t.info.run_id] = {
            "mode": mode, "seed": seed,
            "rows": [{"epoch": e, **{m: series[m].get(s, float("nan"))
                                     for m in ("to_init", "to_final", "velocity")}}
                     for s, e in zip(steps, epochs, strict=True)]}
        kernel_curves.setdefault(variants[t.data.tags[PARENT_TAG]], []).append(KernelCurve(
            mode, int(seed), np.array(epochs),
            np.array([series["to_final"].get(s, np.nan) for s in steps])))
    if curves:
        paths.append(kernel_distance_plot(curves, out / "kernel_distances.png"))
    return rows, [*paths, *write_claims(out, mlflow_claims(rows, kernel_curves, parent))]


def trial_variant(trial: Any) -> str:
    """A trial run's variant (its sampled values but the seed, ``format_variant``)."""
    return trial.data.tags.get(VARIANT_TAG, "")


CROSS_METRIC = re.compile(r"kernel/cross/(?:(config\d+)/)?([CAF])(\d+)-([CAF])(\d+)/distance")


def mlflow_claims(rows: list[dict[str, Any]], curves: dict[str, list[Any]], parent: Any
                  ) -> list[tuple[str, list[Any]]]:
    """The claims per variant from what the sweep logged: result rows, each trajectory's
    ``kernel/<mode>/to_final`` curve, and the parent run's cross-trajectory distances at the
    last common epoch (those of configuration ``config<i>`` go to the variant its tag names)."""
    from core.claims import evaluate

    pairs: dict[str | None, dict] = {}
    for name, value in (parent.data.metrics if parent else {}).items():
        if m := CROSS_METRIC.fullmatch(name):
            config, ma, sa, mb, sb = m.groups()
            label = parent.data.tags.get(f"kernel/cross/{config}") if config else None
            pairs.setdefault(label, {})[((ma, int(sa)), (mb, int(sb)))] = value
    results = []
    for variant in sorted({r["variant"] for r in rows}):
        own = [r for r in rows if r["variant"] == variant]
        results.append((variant, evaluate(own, curves.get(variant, ()),
                                          pairs.get(variant, pairs.get(None)))))
    return results


def _trajectory_dirs(stores: list[Path]) -> list[Path]:
    return [TrajectoryStore(s).directory / t for s in stores for t in TrajectoryStore(s).ids()]


def _trajectory_of_trial(ref: str, stores: list[Path]) -> str | None:
    """The trajectory id of ``<trial run id>/<mode>``: the ``trajectory_id`` param of the
    trial's trajectory run of that data mode, in a sweep under ``stores``."""
    from mlflow.tracking import MlflowClient

    from sweep.tracking import search_all

    run_id, mode = ref.rsplit("/", 1)
    if mode not in MODES or not re.fullmatch(r"[0-9a-f]{32}", run_id):
        return None
    for store in stores:
        if not (store / SWEEP_STATE).is_file():
            continue
        client = MlflowClient(sweep_state(store)["tracking_uri"])
        try:
            experiment = client.get_run(run_id).info.experiment_id
        except Exception:  # noqa: BLE001 - not this store's run
            continue
        found = search_all(client, [experiment], f"tags.`{PARENT_TAG}` = '{run_id}' and "
                           f"params.data_mode = '{mode}'")
        if found:
            return found[0].data.params["trajectory_id"]
    return None


def resolve_trajectory(ref: str, stores: list[Path]) -> Path:
    """The trajectory directory ``ref`` names (see the module docstring)."""
    path = Path(ref)
    if is_trajectory(path):
        return path
    if "/" in ref and not path.exists():  # <trial run id>/<mode>
        found_id = _trajectory_of_trial(ref, stores)
        if found_id is None:
            raise ConfigError(f"{ref}: no trial run with a trajectory run of that data mode in "
                              f"the sweeps under {', '.join(map(str, stores))}")
        ref = found_id
    found = [d for d in _trajectory_dirs(stores) if d.name.startswith(ref)]
    if len(found) != 1:
        what = "no trajectory" if not found else f"{len(found)} trajectories"
        raise ConfigError(f"{ref}: {what} with this id under "
                          f"{', '.join(str(s) for s in stores)}/trajectories")
    return found[0]


def compare(dir_a: Path, dir_b: Path, out: Path, overrides: list[str]) -> list[dict[str, Any]]:
    """Kernel distances between two trajectories (computing kernels still missing): one row
    per common checkpoint with S(K^a_t, K^b_t) and each trajectory's S(K_t, K_0); writes
    ``compare.csv`` and ``compare.png`` into ``out``."""
    import matplotlib.pyplot as plt

    from core.results import write_csv
    from core.trajectory_kernels import (
        compute_trajectory_kernels,
        cross_trajectory_distances,
        trajectory_measures,
    )
    from sweep.kernel_report import kernel_spec
    from sweep.plots import epoch_axis, save_figure

    infos = [TrajectoryStore(d.parent.parent).at(d) for d in (dir_a, dir_b)]
    a, b = infos
    if a.config.dataset != b.config.dataset:
        raise ConfigError(f"{a.id} and {b.id} were trained on different datasets; their "
                          "kernels are not on the same probe set")
    spec, _ = kernel_spec(a.directory.parent.parent, overrides)
    ka, kb = (compute_trajectory_kernels(i, spec) for i in infos)
    cross = {r["epoch"]: r["distance"] for r in cross_trajectory_distances(ka, kb)}
    if not cross:
        raise ConfigError(f"{a.id} and {b.id} have no checkpoint epoch in common")
    num_classes = len(set(ka.load(ka.epochs()[0]).labels.tolist()))
    init = [{r["epoch"]: r["to_init"] for r in trajectory_measures(k, num_classes)}
            for k in (ka, kb)]
    rows = [{"epoch": e, "distance": d, "a_to_init": init[0][e], "b_to_init": init[1][e]}
            for e, d in sorted(cross.items())]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "compare.csv", rows, list(rows[0]))
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in rows]
    ax.plot(epochs, [r["distance"] for r in rows], "o-", color="black",
            label=f"S(a_t, b_t)  a={a.mode} seed {a.seed}, b={b.mode} seed {b.seed}")
    ax.plot(epochs, [r["a_to_init"] for r in rows], "--", label="S(a_t, a_0)")
    ax.plot(epochs, [r["b_to_init"] for r in rows], "--", label="S(b_t, b_0)")
    epoch_axis(ax, "epoch", f"kernel distance, {a.id} vs {b.id}")
    ax.legend(fontsize=7)
    save_figure(fig, out / "compare.png")
    return rows
