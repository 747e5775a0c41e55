"""Checks of a config that need its data, made before any work starts (``ntk-sweep
experiment``, ``run``, ``validate``-time errors that YAML alone cannot find, and
``run_experiment`` itself): batch sizes against the training set, the probe set of the
kernels and the storage their files would take."""

from __future__ import annotations

from core.config import ConfigError, ExperimentConfig
from core.data import Dataset, dataset_of


def preflight(cfg: ExperimentConfig, kernels: bool = False, kernel_bytes: float | None = None,
              data: Dataset | None = None) -> None:
    """Checks that need the data: the dataset loads, each batch fits the training set and,
    when kernels will be computed (``kernels``, or a switch rule), the probe set fits the
    data and the kernel files (``kernel_bytes``, default those of the config's seeds) fit
    ``kernel.storage_budget_gb``. ConfigError naming the field, before any work; ``data``:
    the dataset if already loaded."""
    from core.trajectory_kernels import probe_set
    from core.trajectory_store import kernel_storage_bytes

    ds = cfg.dataset
    data = data if data is not None else dataset_of(ds)
    n = len(data.y_train)
    for phase in ("phase1", "phase2"):
        if getattr(cfg, phase).batch_size > n:
            raise ConfigError(
                f"{phase}.batch_size: {getattr(cfg, phase).batch_size} exceeds the "
                f"{n} training images of {ds.name}"
            )
    if not (kernels or cfg.switch_rule is not None):
        return
    spec = cfg.kernel
    if spec.probe_size > n:
        raise ConfigError(f"kernel.probe_size: {spec.probe_size} exceeds the {n} training "
                          f"images of {ds.name}")
    if spec.logit >= data.num_classes:
        raise ConfigError(f"kernel.logit: {spec.logit} is not a class of {ds.name} "
                          f"(0 to {data.num_classes - 1})")
    try:
        probe_set(data, spec)
    except ValueError as e:
        raise ConfigError(f"kernel.probe_size: {e}") from None
    if kernel_bytes is None:
        kernel_bytes = kernel_storage_bytes(cfg, data.num_classes) * len(cfg.seeds)
    estimate = kernel_bytes / 1e9
    if estimate > spec.storage_budget_gb:
        raise ConfigError(
            f"kernel.storage_budget_gb: the kernel files would take about {estimate:.1f} GB "
            f"({spec.probe_size} probe images, output {spec.output}), above "
            f"the budget of {spec.storage_budget_gb:g} GB; lower kernel.probe_size, list "
            "kernel.epochs, use kernel.output: logit, or raise kernel.storage_budget_gb")
