"""Typed, validated experiment configuration (one experiment = phase 1 + phase 2 from each switch).

Configs are YAML files validated once at the edge; unknown keys are rejected with a suggestion
and every error names the field's dotted path. Defaults are the reference settings of Loo et
al. (CIFAR, ResNet-18); the shipped digits configs override what they need.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:  # imported where used: validating a config must not pay for importing jax
    from core.attacks import AttackConfig
    from core.data import Dataset

REFERENCE_FRACTIONAL_EPOCHS = (0.125, 0.25, 0.375, 0.5, 0.75, 1.5, 2.5)
MAX_EPOCHS = 10_000  # of either phase: beyond, a typo (1e9), not an experiment

# What an evaluated model reports and a sweep may compare on (sweep.metric), in one place.
RESULT_METRICS = ("accuracy", "robust_linf", "robust_l2", "transfer_linf")

# Numbers as written: a YAML boolean is not 1 (``batch_size: true``), "3" is not 3, and with
# ``allow_inf_nan=False`` (below) no float field takes inf or nan.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the field's dotted path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SyntheticSpec(_Strict):
    n_train: Int = Field(256, ge=2)
    n_test: Int = Field(128, ge=1)
    shape: tuple[Int, Int, Int] = (8, 8, 1)
    num_classes: Int = Field(10, ge=2)


class DatasetSpec(_Strict):
    name: Literal["digits", "cifar10", "cifar100", "synthetic"] = "digits"
    data_dir: str | None = None
    synthetic: SyntheticSpec = SyntheticSpec()

    def load(self) -> Dataset:
        """The dataset this spec names (synthetic data is drawn from seed 0)."""
        from core.data import load_dataset

        return load_dataset(self.name, self.data_dir, seed=0, **self.synthetic.model_dump())

    @model_validator(mode="after")
    def _cifar_dir(self) -> DatasetSpec:
        if self.name.startswith("cifar") and self.data_dir is None:
            raise ValueError(
                f"data_dir is required for {self.name} (the extracted archive's parent)"
            )
        return self


class ModelSpec(_Strict):
    name: Literal["mlp", "cnn", "resnet18"] = "cnn"
    widths: tuple[Int, ...] = Field((256, 256), min_length=1)
    width: Int | None = Field(None, ge=1)
    batchnorm: bool = False

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``core.models.make_model`` for this model."""
        if self.name == "mlp":
            return {"widths": self.widths}
        kw: dict[str, Any] = {} if self.width is None else {"width": self.width}
        if self.name == "cnn":
            kw["batchnorm"] = self.batchnorm
        return kw


class AttackSpec(_Strict):
    norm: Literal["linf", "l2"] = "linf"
    eps: Float = Field(4 / 255, gt=0)
    step_size: Float | None = Field(None, gt=0, description="default 2 eps / iters (L2: 0.01)")
    iters: Int = Field(20, ge=1, le=10_000)
    random_start: bool = True
    loss: Literal["ce", "margin"] = "ce"
    restarts: Int = Field(1, ge=1, le=100)

    def build(self, keep_best: bool = False) -> AttackConfig:
        from core.attacks import AttackConfig, AttackLoss, Norm

        step = self.step_size
        if step is None:
            step = 2 * self.eps / self.iters if self.norm == "linf" else 0.01
        return AttackConfig(
            Norm(self.norm), self.eps, step, self.iters, self.random_start,
            AttackLoss(self.loss), self.restarts, keep_best,
        )


class PhaseSpec(_Strict):
    """Optimisation of one phase: SGD with momentum, lr x decay_factor at each decay epoch."""

    epochs: Float | None = Field(None, ge=0, le=MAX_EPOCHS,
                                 description="phase 1: default the largest switch")
    lr: Float = Field(0.1, gt=0)
    momentum: Float = Field(0.9, ge=0, lt=1)
    batch_size: Int = Field(128, ge=1)
    lr_decay_epochs: tuple[Float, ...] = (100, 150)
    lr_decay_factor: Float = Field(0.1, gt=0, le=1)
    flip_epoch: Int = Field(50, ge=0, description="data mode F: clean before, adversarial after")
    adv_scheme: Literal["reference", "madry"] = "reference"
    attack: AttackSpec = AttackSpec()


class Phase2Spec(PhaseSpec):
    epochs: Float = Field(100, ge=0, le=MAX_EPOCHS)
    lr: Float = Field(0.01, gt=0)
    lr_decay_epochs: tuple[Float, ...] = ()
    dynamics: Literal["centered", "linearized", "standard"] = "centered"
    bn: Literal["frozen", "batch"] = "frozen"


class EvalSpec(_Strict):
    linf: AttackSpec = AttackSpec(iters=100)
    l2: AttackSpec | None = AttackSpec(norm="l2", eps=0.25, step_size=0.01, iters=100)
    batch_size: Int = Field(500, ge=1)
    transfer: bool = True
    max_test: Int | None = Field(None, ge=1, description="evaluate on the first n test images")


class KernelSpec(_Strict):
    """Empirical NTKs of phase-1 checkpoints on a class-balanced probe set (``core.ntk``)."""

    enabled: bool = Field(True, description="sweeps: kernels and their measures per checkpoint")
    probe_size: Int = Field(500, ge=2, description="class-balanced training images")
    probe_seed: Int = Field(0, description="the probe set is shared by every trajectory")
    output: Literal["logit", "classwise", "trace", "full"] = "classwise"
    logit: Int = Field(0, ge=0, description="the class c of output 'logit'")
    implementation: Literal[
        "blocked", "nt_jacobian_contraction", "nt_ntk_vector_products"
    ] = "blocked"
    epochs: tuple[Float, ...] | None = Field(None, description="default every checkpoint")
    dtype: Literal["float32", "float64"] = "float32"
    block_size: Int | None = Field(None, ge=1)
    memory_budget_gb: Float = Field(2.0, gt=0, description="per device")
    storage_budget_gb: Float = Field(
        20.0, gt=0, description="refuse runs whose kernel files would exceed this (estimate)")


class SwitchRule(_Strict):
    """A switch point found during phase 1 from the kernels of its checkpoints.

    At each phase-1 checkpoint t >= 1 (in epoch order) the rule reads a class-wise mean measure
    of the probe-set kernels: ``to_previous`` S(K_t, K_{t-1}) or ``velocity``
    S(K_{t-1}, K_t) / (e_t - e_{t-1}) (``core.kernels.trajectory_distances``). It triggers at
    the first checkpoint at epoch >= ``after`` where the measure has been below ``below`` for
    ``checkpoints`` consecutive checkpoints; that epoch becomes a switch point. Phase 1 stops
    there (unless a listed switch point lies later) and never runs past ``phase1.epochs``.
    """

    measure: Literal["velocity", "to_previous"] = "velocity"
    below: Float = Field(gt=0)
    checkpoints: Int = Field(1, ge=1, le=1000, description="consecutive checkpoints below")
    after: Float = Field(0, ge=0, description="the earliest epoch it may trigger at")

    def label(self) -> str:
        """A short name for tables and tags, e.g. ``velocity<0.05x3``."""
        return f"{self.measure}<{self.below:g}x{self.checkpoints}" + (
            f"@{self.after:g}" if self.after else "")


class ExperimentConfig(_Strict):
    name: str = "experiment"
    seeds: tuple[Int, ...] = Field((0,), min_length=1)
    dataset: DatasetSpec = DatasetSpec()
    model: ModelSpec = ModelSpec()
    codes: tuple[str, ...] = Field(("CC", "AC", "CA", "AA"), min_length=1)
    switch_points: tuple[Float, ...] = Field((0, 1, 2, 5, 10, 30))
    switch_rule: SwitchRule | None = None
    phase1: PhaseSpec = PhaseSpec()
    phase2: Phase2Spec = Phase2Spec()
    eval: EvalSpec = EvalSpec()
    kernel: KernelSpec = KernelSpec()
    fractional_checkpoints: tuple[Float, ...] = REFERENCE_FRACTIONAL_EPOCHS

    @field_validator("codes")
    @classmethod
    def _codes(cls, codes: tuple[str, ...]) -> tuple[str, ...]:
        for c in codes:
            if len(c) != 2 or any(m not in "CAF" for m in c):
                raise ValueError(f"{c!r} is not a loader code: two letters of C, A, F (e.g. AC)")
        return tuple(dict.fromkeys(codes))

    @field_validator("switch_points", "fractional_checkpoints")
    @classmethod
    def _non_negative(cls, points: tuple[float, ...]) -> tuple[float, ...]:
        if any(p < 0 or p > MAX_EPOCHS or not math.isfinite(p) for p in points):
            raise ValueError(f"epochs must be finite, >= 0 and <= {MAX_EPOCHS}")
        return tuple(sorted(set(points)))

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:  # two identical runs would be counted as two seeds
            raise ValueError(f"seeds must be distinct; repeated: {repeated}")
        return seeds

    @model_validator(mode="after")
    def _switch_within_phase1(self) -> ExperimentConfig:
        if not self.switch_points and self.switch_rule is None:
            raise ValueError("switch_points: give at least one switch point or a switch_rule")
        if self.switch_rule is not None and self.phase1.epochs is None:
            raise ValueError(
                "phase1.epochs: required with switch_rule (the latest epoch it may switch at)"
            )
        last = max(self.switch_points, default=0)
        if self.phase1.epochs is not None and last > self.phase1.epochs:
            raise ValueError(
                f"switch_points: {last} is beyond phase1.epochs = {self.phase1.epochs}"
            )
        rule = self.switch_rule
        if rule is not None and self.phase1.epochs is not None and rule.after > self.phase1.epochs:
            raise ValueError(
                f"switch_rule.after: {rule.after} is beyond phase1.epochs = {self.phase1.epochs}"
            )
        return self

    @property
    def phase1_epochs(self) -> float:
        """Epochs of phase 1 at most: as configured, else the largest switch point."""
        return self.phase1.epochs if self.phase1.epochs is not None else max(self.switch_points)


def _suggest(key: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for suggestions)."""
    model: Any = root
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        model = models[0] if models else None
        if model is None:
            return None
    return model


def format_errors(error: ValidationError, root: type[BaseModel] | None = None) -> str:
    """One line per problem: ``field.path: message``; unknown keys get a suggestion from the
    fields of ``root`` (default ``ExperimentConfig``) at that path."""
    root = root or ExperimentConfig
    lines = []
    for e in error.errors():
        loc = tuple(p for p in e["loc"] if p not in ("function-after",))
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key{_suggest(str(loc[-1]), _model_at(loc, root))}")
        else:
            lines.append(f"{path}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["phase1.epochs=3", "seeds=[0,1]"]`` -> nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        path, value = item.split("=", 1)
        node = tree
        *parents, leaf = path.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} was set to a value, not a mapping")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem})") from None
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(raw: Any, source: str = "config") -> ExperimentConfig:
    """Validates a raw mapping; raises ConfigError naming every bad field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(raw).__name__}")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: invalid configuration\n{format_errors(e)}") from None


def read_config_file(path: str | Path, overrides: list[str] | None = None) -> Any:
    """The YAML document at ``path`` with ``key.path=value`` overrides merged in."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML ({e})") from None
    if isinstance(raw, dict):
        raw = _merge(raw, parse_overrides(overrides or []))
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Reads a YAML experiment config and applies ``key.path=value`` overrides."""
    return config_from_dict(read_config_file(path, overrides), str(path))
