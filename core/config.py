"""Typed, validated experiment configuration (one experiment = phase 1 + phase 2 from each switch).

Configs are YAML files validated once at the edge; unknown keys are rejected with a suggestion
and every error names the field's dotted path. Defaults are the reference settings of Loo et
al. (CIFAR, ResNet-18); the shipped digits configs override what they need.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from core.kernels import SWITCH_MEASURES

REFERENCE_FRACTIONAL_EPOCHS = (0.125, 0.25, 0.375, 0.5, 0.75, 1.5, 2.5)
MAX_EPOCHS = 10_000  # of either phase: beyond, a typo (1e9), not an experiment

# Bounds on what is read before it is parsed or expanded (a config is a few KB and 4 levels
# deep; a sweep grid of 10,000 values is about 10,000 nodes).
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 200_000  # after alias expansion: a 1.6 KB "billion laughs" file is 10^9
MAX_YAML_DEPTH = 32
MAX_SCALAR_CHARS = 1_000  # a 5000-digit number is refused here, not in int()
MAX_OVERRIDE_KEYS = 8  # depth of a --set key path
MAX_ECHO_CHARS = 80  # of a value repeated in an error message
MAX_SEED = 2**31 - 1
MAX_COUNT = 10_000_000  # any count of images, units, classes, steps

# What an evaluated model reports and a sweep may compare on (sweep.metric), in one place, in
# table order, with the column label each table gives it. ``worst_linf`` is the headline: an
# example counts only if it survives every L-inf attack of the ensemble (WORST_LINF).
METRIC_LABELS = {
    "accuracy": "clean", "worst_linf": "worst L-inf", "robust_linf": "PGD L-inf",
    "robust_margin": "PGD-margin L-inf", "transfer_linf": "transfer L-inf",
    "reference_linf": "reference transfer L-inf", "robust_l2": "PGD L2",
}
RESULT_METRICS = tuple(METRIC_LABELS)
MODES = "CAF"  # data modes: clean, adversarial, flip (clean, then adversarial from flip_epoch)
NETWORK = "-"  # second letter of a result row's code for the phase-1 network itself ("A-")


def is_network(code: str) -> bool:
    """Whether a result row's ``code`` is a phase-1 network (``A-``), not a phase-2 model."""
    return code.endswith(NETWORK)
WORST_LINF = ("accuracy", "robust_linf", "robust_margin", "transfer_linf", "reference_linf")
WHITE_BOX = ("robust_linf", "robust_margin")  # the masking alarm compares these ...
BLACK_BOX = ("transfer_linf", "reference_linf")  # ... with these

# Numbers as written: a YAML boolean is not 1 (``batch_size: true``), "3" is not 3, and with
# ``allow_inf_nan=False`` (below) no float field takes inf or nan.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Count = Annotated[int, Strict(), Field(ge=1, le=MAX_COUNT)]
Epoch = Annotated[float, Strict(), Field(ge=0, le=MAX_EPOCHS)]
Seed = Annotated[int, Strict(), Field(ge=0, le=MAX_SEED)]
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]{0,99}")


def _check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError("a name becomes a directory: 1 to 100 letters, digits or _.+=-, "
                         "starting with a letter or digit")
    return name


# A name that becomes a directory and an MLflow experiment: no separators, no leading dot.
Name = Annotated[str, AfterValidator(_check_name)]


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the field's dotted path."""


class DataError(ValueError):
    """A dataset file or directory is missing or does not have the expected contents."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SyntheticSpec(_Strict):
    n_train: Count = Field(256, ge=2)
    n_test: Count = 128
    shape: tuple[Count, Count, Count] = (8, 8, 1)
    num_classes: Count = Field(10, ge=2)


class DatasetSpec(_Strict):
    name: Literal["digits", "cifar10", "cifar100", "synthetic"] = "digits"
    data_dir: str | None = Field(None, max_length=4096)
    synthetic: SyntheticSpec = SyntheticSpec()

    @model_validator(mode="after")
    def _cifar_dir(self) -> DatasetSpec:
        if self.name.startswith("cifar") and self.data_dir is None:
            raise ValueError(
                f"data_dir is required for {self.name} (the extracted archive's parent)"
            )
        return self


class ModelSpec(_Strict):
    name: Literal["mlp", "cnn", "resnet18"] = "cnn"
    widths: tuple[Count, ...] = Field((256, 256), min_length=1, max_length=100)
    width: Count | None = None
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
    schedule: Literal["fixed", "apgd"] = Field(
        "fixed", description="apgd: APGD's adaptive step from 2 eps (step_size unused)")


class EvalAttackSpec(AttackSpec):
    """An attack of the evaluation ensemble: APGD's step schedule by default, because on the
    digits switch-point models it breaks up to 15 points more than fixed-step PGD at the same
    cost (benchmarks/apgd.py; CA at switch epoch 5: 42.0 % survive PGD with cross-entropy and
    margin loss, 26.9 % APGD). Training attacks keep the fixed step of the reference."""

    schedule: Literal["fixed", "apgd"] = "apgd"


class PhaseSpec(_Strict):
    """Optimisation of one phase: SGD with momentum, lr x decay_factor at each decay epoch."""

    epochs: Float | None = Field(None, ge=0, le=MAX_EPOCHS,
                                 description="phase 1: default the largest switch")
    lr: Float = Field(0.1, gt=0)
    momentum: Float = Field(0.9, ge=0, lt=1)
    batch_size: Count = 128
    lr_decay_epochs: tuple[Epoch, ...] = Field((100, 150), max_length=1000)
    lr_decay_factor: Float = Field(0.1, gt=0, le=1)
    flip_epoch: Int = Field(50, ge=0, le=MAX_EPOCHS,
                            description="data mode F: clean before, adversarial after")
    adv_scheme: Literal["reference", "madry"] = "reference"
    attack: AttackSpec = AttackSpec()


class Phase2Spec(PhaseSpec):
    epochs: Float = Field(100, ge=0, le=MAX_EPOCHS)
    lr: Float = Field(0.01, gt=0)
    lr_decay_epochs: tuple[Epoch, ...] = Field((), max_length=1000)
    dynamics: Literal["centered", "linearized", "standard"] = "centered"
    bn: Literal["frozen", "batch"] = "frozen"


class EvalSpec(_Strict):
    """The evaluation ensemble. L-inf: ``linf`` (APGD with cross-entropy; ``schedule: fixed``
    for PGD's fixed step), the same attack with the margin (CW) loss and ``margin_restarts``
    random restarts, and (phase-2 models, with ``transfer``) the attack crafted on the
    switch-point network; ``worst_linf`` counts an example
    only if it survives all of them. ``l2`` is another threat model, reported apart. A model
    whose transfer accuracy is below its white-box accuracy by more than
    ``masking_threshold`` is flagged as masking gradients. ``reference`` names a network whose
    adversarial examples (``linf``) every model of the seed is also scored on, e.g. ``A``: the
    adversarially trained network, a strong source trained otherwise than the model scored; a
    model that resists its own white-box attacks but not these examples masks gradients."""

    linf: EvalAttackSpec = EvalAttackSpec(iters=100)
    margin_restarts: Int = Field(2, ge=0, le=100, description="0: no margin attack")
    l2: EvalAttackSpec | None = EvalAttackSpec(norm="l2", eps=0.25, step_size=0.01, iters=100)
    batch_size: Count = 500
    transfer: bool = True
    reference: Literal["C", "A", "F"] | None = Field(
        None, description="transfer from the phase-1 network of this data mode at the end of "
        "its trajectory (same seed): examples crafted once per seed, every model scored on "
        "them (reference_linf)")
    masking_threshold: Float = Field(0.02, ge=0, le=1, description="a fraction of the test set")
    max_test: Count | None = Field(None, description="evaluate on the first n test images")


class KernelSpec(_Strict):
    """Empirical NTKs of phase-1 checkpoints on a class-balanced probe set (``core.ntk``)."""

    enabled: bool = Field(True, description="sweeps: kernels and their measures per checkpoint")
    probe_size: Count = Field(500, ge=2, description="class-balanced training images")
    probe_seed: Seed = Field(0, description="the probe set is shared by every trajectory")
    output: Literal["logit", "classwise", "trace", "full"] = "classwise"
    logit: Int = Field(0, ge=0, le=MAX_COUNT, description="the class c of output 'logit'")
    implementation: Literal[
        "blocked", "nt_jacobian_contraction", "nt_ntk_vector_products"
    ] = "blocked"
    epochs: tuple[Epoch, ...] | None = Field(None, max_length=MAX_EPOCHS,
                                             description="default every checkpoint")
    dtype: Literal["float32", "float64"] = "float32"
    block_size: Count | None = None
    memory_budget_gb: Float | None = Field(
        None, gt=0, le=1e6, description="per device; default from the free memory "
        "(core.ntk.machine_memory_budget: half an accelerator's, a quarter of the host's)")
    storage_budget_gb: Float = Field(
        20.0, gt=0, le=1e9,
        description="refuse runs whose kernel files would exceed this (estimate)")

    @property
    def memory_budget_bytes(self) -> int | None:
        """``memory_budget_gb`` in bytes; None: the engine's machine-derived default."""
        return None if self.memory_budget_gb is None else int(self.memory_budget_gb * 2**30)


class SwitchRule(_Strict):
    """A switch point found during phase 1 from the kernels of its checkpoints.

    At each phase-1 checkpoint t >= 1 (in epoch order) the rule reads a class-wise mean measure
    of the probe-set kernels: ``to_previous`` S(K_t, K_{t-1}) or ``velocity``
    S(K_{t-1}, K_t) / (e_t - e_{t-1}) (``core.kernels.trajectory_distances``). It triggers at
    the first checkpoint at epoch >= ``after`` where the measure has been below ``below`` for
    ``checkpoints`` consecutive checkpoints; that epoch becomes a switch point. Phase 1 stops
    there (unless a listed switch point lies later) and never runs past ``phase1.epochs``.
    """

    measure: Literal[SWITCH_MEASURES] = "velocity"  # type: ignore[valid-type]
    below: Float = Field(gt=0)
    checkpoints: Int = Field(1, ge=1, le=1000, description="consecutive checkpoints below")
    after: Float = Field(0, ge=0, le=MAX_EPOCHS, description="the earliest epoch it may trigger at")

    def label(self) -> str:
        """A short name for tables and tags, e.g. ``velocity<0.05x3``."""
        return f"{self.measure}<{self.below:g}x{self.checkpoints}" + (
            f"@{self.after:g}" if self.after else "")


class ExperimentConfig(_Strict):
    name: Name = "experiment"
    seeds: tuple[Seed, ...] = Field((0,), min_length=1, max_length=10_000)
    dataset: DatasetSpec = DatasetSpec()
    model: ModelSpec = ModelSpec()
    codes: tuple[str, ...] = Field(("CC", "AC", "CA", "AA"), min_length=1, max_length=100)
    switch_points: tuple[Float, ...] = Field((0, 1, 2, 5, 10, 30), max_length=MAX_EPOCHS)
    switch_rule: SwitchRule | None = None
    phase1: PhaseSpec = PhaseSpec()
    phase2: Phase2Spec = Phase2Spec()
    eval: EvalSpec = EvalSpec()
    kernel: KernelSpec = KernelSpec()
    fractional_checkpoints: tuple[Float, ...] = Field(REFERENCE_FRACTIONAL_EPOCHS,
                                                      max_length=MAX_EPOCHS)

    @field_validator("codes")
    @classmethod
    def _codes(cls, codes: tuple[str, ...]) -> tuple[str, ...]:
        for c in codes:
            if len(c) != 2 or any(m not in MODES for m in c):
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

    @property
    def phase1_modes(self) -> tuple[str, ...]:
        """The phase-1 data modes of the codes (one trajectory per mode and seed), in
        ``MODES`` order."""
        return tuple(m for m in MODES if any(c[0] == m for c in self.codes))


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
            lines.append(f"{path}: {e['msg']} (got {shorten(e.get('input'))})")
    return "\n".join(lines)


def shorten(value: Any, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters: what an error message repeats of an input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 15]}... ({len(text)} chars)"


def read_prefix(path: str | Path, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``path``: a caller seeing more than ``limit`` refuses the
    file without reading the rest (``/dev/zero`` never ends)."""
    with open(path, "rb") as f:
        return f.read(limit + 1)


def parse_yaml(text: str, source: str) -> Any:
    """One YAML document, refused (ConfigError naming ``source`` and the key path) before it is
    built when it nests deeper than ``MAX_YAML_DEPTH``, expands through aliases to more than
    ``MAX_YAML_NODES`` nodes, refers to itself, or holds a scalar over ``MAX_SCALAR_CHARS``."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply (at most {MAX_YAML_DEPTH} levels)"
                          ) from None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}: malformed YAML{where} ({shorten(problem, 200)})") from None
    if node is None:
        return None
    _check_yaml_size(node, source)
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    except (yaml.YAMLError, ValueError, OverflowError) as e:  # e.g. a bad timestamp
        raise ConfigError(f"{source}: malformed YAML ({shorten(str(e), 200)})") from None
    finally:
        loader.dispose()


def _check_yaml_size(root: yaml.Node, source: str) -> None:
    """Counts the nodes of ``root`` with aliases expanded (each distinct node once, sizes
    memoised), iteratively; ConfigError at the first bound crossed, naming the key path."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, str, int, bool]] = [(root, "", 0, False)]
    while stack:
        node, path, depth, done = stack.pop()
        where = f"{source}: {path or '(top level)'}"
        if done:
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in _yaml_children(node))
            if size[id(node)] > MAX_YAML_NODES:
                raise ConfigError(f"{where}: expands to more than {MAX_YAML_NODES} values "
                                  "(aliases?)")
            continue
        if id(node) in size:
            continue
        if id(node) in on_path:
            raise ConfigError(f"{where}: an alias refers to the value it is in")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{where}: nested too deeply (at most {MAX_YAML_DEPTH} levels)")
        if isinstance(node, yaml.ScalarNode):
            if len(node.value) > MAX_SCALAR_CHARS:
                raise ConfigError(f"{where}: a value of {len(node.value)} characters "
                                  f"(at most {MAX_SCALAR_CHARS})")
            size[id(node)] = 1
            continue
        on_path.add(id(node))
        stack.append((node, path, depth, True))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                name = name if len(name) <= 40 else f"{name[:37]}..."
                stack.append((key, path, depth + 1, False))
                stack.append((value, f"{path}.{name}" if path else name, depth + 1, False))
        else:
            stack.extend((c, f"{path}[{i}]", depth + 1, False) for i, c in enumerate(node.value))


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["phase1.epochs=3", "seeds=[0,1]"]`` -> nested dict; values are parsed as YAML (with
    the bounds of a config file)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {shorten(item)}: expected key.path=value")
        path, value = item.split("=", 1)
        keys = path.strip().split(".")
        if len(keys) > MAX_OVERRIDE_KEYS or not all(keys) or len(path) > 200:
            raise ConfigError(f"--set {shorten(path)}: expected a key path of at most "
                              f"{MAX_OVERRIDE_KEYS} names, like phase1.epochs")
        if len(value) > MAX_CONFIG_BYTES:
            raise ConfigError(f"--set {path}: a value of {len(value)} characters")
        node = tree
        *parents, leaf = keys
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {path}: {p} was set to a value, not a mapping")
        node[leaf] = parse_yaml(value, f"--set {path}")
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in, mapping by mapping (``--set`` overrides)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(raw: Any, source: str = "config") -> ExperimentConfig:
    """Validates a raw mapping; raises ConfigError naming every bad field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(raw).__name__}")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: invalid configuration\n{format_errors(e)}") from None


def stored_config(raw: Any, source: str) -> ExperimentConfig:
    """A config as ntk-sweep wrote it beside its results (``results.json``), possibly by an
    earlier version: every field was written, so a field missing there predates it and is
    read with the behaviour it had then, not today's default (evaluation attacks without
    ``schedule`` ran PGD's fixed step, though APGD is the default now)."""
    if isinstance(raw, dict) and isinstance(raw.get("eval"), dict):
        ev = dict(raw["eval"])
        for name in ("linf", "l2"):
            if isinstance(ev.get(name), dict) and "schedule" not in ev[name]:
                ev[name] = {**ev[name], "schedule": "fixed"}
        raw = {**raw, "eval": ev}
    return config_from_dict(raw, source)


def read_config_file(path: str | Path, overrides: list[str] | None = None) -> Any:
    """The YAML document at ``path`` with ``key.path=value`` overrides merged in."""
    path = Path(path)
    try:
        data = read_prefix(path, MAX_CONFIG_BYTES)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes, not a config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    raw = parse_yaml(text, str(path)) or {}
    if isinstance(raw, dict):
        raw = merge(raw, parse_overrides(overrides or []))
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Reads a YAML experiment config and applies ``key.path=value`` overrides."""
    return config_from_dict(read_config_file(path, overrides), str(path))
