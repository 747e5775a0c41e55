"""Sweep definitions: an experiment config whose leaves may be distributions, plus a ``sweep``
section. Validated completely before Ray starts.

A leaf is a distribution when it is a mapping with exactly one of these keys::

    {grid: [v1, v2, ...]}       every value, in every trial combination (Tune grid_search)
    {choice: [v1, v2, ...]}     one value drawn per sample
    {uniform: [low, high]}      a float drawn uniformly
    {loguniform: [low, high]}   a float drawn log-uniformly (0 < low)
    {randint: [low, high]}      an integer in [low, high)

``seeds: [s1, s2, ...]`` is a grid: each trial runs one seed. Every grid and choice value, and
both ends of every range, is checked by substituting it into the experiment config, so an
error names the field and the value (``phase2.lr.grid[2]``) before any work starts.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.config import (
    RESULT_METRICS,
    ConfigError,
    ExperimentConfig,
    Float,
    config_from_dict,
    format_errors,
    shorten,
)

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
MAX_VALUES = 10_000  # of one grid or choice
MAX_TRIALS = 100_000  # of a sweep (grid sizes x num_samples)


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    cpus: Float = Field(1, gt=0, le=1024)
    gpus: Float = Field(0, ge=0, le=64)


class SweepSettings(BaseModel):
    """The ``sweep`` section: how trials are sampled, scheduled and given resources."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_samples: int = Field(1, ge=1, le=MAX_TRIALS,
                             description="samples of the random distributions")
    metric: Literal[RESULT_METRICS] = Field(  # type: ignore[valid-type]
        "worst_linf", description="what ASHA and 'best trial' compare")
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["fifo", "asha"] = "fifo"
    max_concurrent_trials: int = Field(0, ge=0, le=MAX_TRIALS,
                                       description="0: as many as resources allow")
    resources: Resources = Resources()
    worker_niceness: int = Field(
        0, ge=0, le=19, description="nice value of trial workers on a local Ray cluster "
        "(Ray's default, 15, starves a sweep beside any other work; 0 is what "
        "'ntk-sweep experiment' runs at)")


@dataclass(frozen=True)
class Distribution:
    kind: str
    args: tuple[Any, ...]


@dataclass(frozen=True)
class SweepSpace:
    """A parsed sweep: settings, the experiment config with distributions taken out, and the
    distributions by dotted path."""

    settings: SweepSettings
    base: dict[str, Any]
    distributions: dict[str, Distribution]
    raw: dict[str, Any] = field(default_factory=dict, compare=False)  # as written

    def trial_count(self) -> int:
        """Trials Tune will run: the product of grid sizes times ``num_samples``."""
        grids = [len(d.args) for d in self.distributions.values() if d.kind == "grid"]
        return math.prod(grids) * self.settings.num_samples

    def configs(self, limit: int = 2000) -> list[ExperimentConfig]:
        """The trial configs over every combination of grid and choice values (ranges at
        both ends), at most ``limit`` of them: what a check over all trials looks at."""
        paths = list(self.distributions)
        options = [[v for _, v in _candidates(self.distributions[p])] for p in paths]
        combos = itertools.islice(itertools.product(*options), limit)
        return [self.config(dict(zip(paths, combo, strict=True))) for combo in combos]

    def config(self, values: dict[str, Any]) -> ExperimentConfig:
        """The experiment config of one trial, given a value for every distribution path."""
        return config_from_dict(substitute(self.base, values), "trial")

    def models_per_trial(self) -> int:
        """Evaluated models of the largest trial (phase-2 runs and phase-1 networks, at
        every switch point and the rule's), for progress and ASHA's time axis."""
        def models(cfg: ExperimentConfig) -> int:
            switches = len(cfg.switch_points) + (cfg.switch_rule is not None)
            return switches * (len(cfg.codes) + len(cfg.phase1_modes))

        return max(models(cfg) for cfg in self.configs())

    def describe(self) -> list[str]:
        """What ``validate`` says about a sweep: its grid, what one trial runs, the
        resources a trial asks for and how many trials this machine runs at once."""
        import os

        lines = []
        for path, d in self.distributions.items():
            one = [v[0] if isinstance(v, list | tuple) and len(v) == 1 else v for v in d.args]
            values = ", ".join(map(str, one)) if d.kind in ("grid", "choice") else \
                f"{d.args[0]} to {d.args[1]}"
            lines.append(f"  {path}: {d.kind} [{values}]")
        cfg = self.config({p: d.args[0] for p, d in self.distributions.items()})
        epochs1 = cfg.phase1_epochs * len(cfg.phase1_modes)
        runs2 = (len(cfg.switch_points) + (cfg.switch_rule is not None)) * len(cfg.codes)
        lines.append(f"  a trial: {self.models_per_trial()} evaluated models at most; "
                     f"{epochs1:g} phase-1 epochs ({', '.join(cfg.phase1_modes)}), "
                     f"{runs2} phase-2 runs of {cfg.phase2.epochs:g} epochs")
        res = self.settings.resources
        cpus = os.cpu_count() or 1
        at_once = max(1, int(cpus // res.cpus)) if res.cpus else cpus
        if self.settings.max_concurrent_trials:
            at_once = min(at_once, self.settings.max_concurrent_trials)
        lines.append(f"  resources per trial: {res.cpus:g} CPU, {res.gpus:g} GPU; on this "
                     f"machine ({cpus} CPUs) {min(at_once, self.trial_count())} trials at once")
        return lines


def _is_distribution(node: Any) -> bool:
    return isinstance(node, dict) and len(node) == 1 and next(iter(node)) in KINDS


def is_sweep(raw: Any) -> bool:
    """Whether a definition varies anything but its seeds (a distribution elsewhere, or a
    ``sweep:`` section): what ``list`` calls a sweep rather than an experiment."""
    def varies(node: Any, top: bool) -> bool:
        if _is_distribution(node):
            return True
        if isinstance(node, dict):
            return any(varies(v, False) for k, v in node.items() if not (top and k == "seeds"))
        return False

    return isinstance(raw, dict) and ("sweep" in raw or varies(raw, True))


def _looks_like_misspelt_distribution(node: Any) -> str | None:
    if isinstance(node, dict) and len(node) == 1:
        key = str(next(iter(node)))
        close = difflib.get_close_matches(key, KINDS, n=1, cutoff=0.75)
        if close and key not in KINDS:
            return close[0]
    return None


def substitute(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with the value of each dotted path set."""
    out = copy.deepcopy(base)
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return out


def _check_args(path: str, kind: str, args: Any) -> tuple[Any, ...]:
    where = f"{path}.{kind}"
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: expected a non-empty list, got {shorten(args)}")
    if kind in ("grid", "choice"):
        if len(args) > MAX_VALUES:
            raise ConfigError(f"{where}: {len(args)} values, at most {MAX_VALUES}")
        return tuple(args)
    if len(args) != 2 or not all(isinstance(a, int | float) and not isinstance(a, bool)
                                 and math.isfinite(a) for a in args):
        raise ConfigError(f"{where}: expected [low, high] finite numbers, got {shorten(args)}")
    low, high = args
    if not low < high:
        raise ConfigError(f"{where}: low {low} must be below high {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: low must be > 0 for a log-uniform range, got {low}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: expected integers, got {shorten(args)}")
    return (low, high)


def _extract(node: Any, path: str, found: dict[str, Distribution]) -> Any:
    """Replaces distributions in ``node`` by None and records them by path."""
    if _is_distribution(node):
        kind, args = next(iter(node.items()))
        found[path] = Distribution(kind, _check_args(path, kind, args))
        return None
    if misspelt := _looks_like_misspelt_distribution(node):
        raise ConfigError(f"{path}: unknown distribution {next(iter(node))!r} "
                          f"(did you mean {misspelt!r}?)")
    if isinstance(node, dict):
        return {k: _extract(v, f"{path}.{k}" if path else str(k), found) for k, v in node.items()}
    return node


def _candidates(dist: Distribution) -> list[tuple[str, Any]]:
    """(label, value) pairs that must all give valid configs."""
    if dist.kind in ("grid", "choice"):
        return [(f"{dist.kind}[{i}]", v) for i, v in enumerate(dist.args)]
    low, high = dist.args
    return [(f"{dist.kind} low", low), (f"{dist.kind} high", high - 1 if dist.kind == "randint"
                                                              else high)]


def parse_space(raw: Any, source: str = "sweep") -> SweepSpace:
    """Validates a sweep mapping completely; raises ConfigError naming the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(raw).__name__}")
    written, raw = copy.deepcopy(raw), dict(raw)
    try:
        settings = SweepSettings.model_validate(raw.pop("sweep", None) or {})
    except ValidationError as e:
        lines = "\n".join(f"sweep.{line}" for line in format_errors(e, SweepSettings).splitlines())
        raise ConfigError(f"{source}: invalid sweep settings\n{lines}") from None
    found: dict[str, Distribution] = {}
    if _is_distribution(raw):
        raise ConfigError(f"{source}: (top level): {next(iter(raw))!r} is a distribution; "
                          "distributions go on a setting's value, e.g. phase2.lr: {grid: [...]}")
    try:
        base = _extract(raw, "", found)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    seeds = base.get("seeds")
    if isinstance(seeds, list) and len(seeds) > 1 and "seeds" not in found:
        found["seeds"] = Distribution("grid", tuple([s] for s in seeds))
    space = SweepSpace(settings, base, found, written)
    if space.trial_count() > MAX_TRIALS:
        grids = " x ".join(f"{p} ({len(d.args)})" for p, d in found.items() if d.kind == "grid")
        raise ConfigError(f"{source}: {space.trial_count()} trials ({grids or 'no grid'}, "
                          f"num_samples {settings.num_samples}): at most {MAX_TRIALS}")
    first = {p: _candidates(d)[0][1] for p, d in found.items()}
    checks = [(None, None, None)] + [(p, label, v) for p, d in found.items()
                                     for label, v in _candidates(d)]
    for path, label, value in checks:
        try:
            space.config(first if path is None else {**first, path: value})
        except ConfigError as e:
            detail = str(e).split("\n", 1)[-1]
            named = {line.split(":", 1)[0] for line in detail.splitlines()}
            if path is None and named & set(found):
                continue  # a distribution's value: the checks below say which
            if path not in named:  # the fixed part of the config is wrong
                raise ConfigError(f"{source}: invalid configuration\n{detail}") from None
            raise ConfigError(f"{source}: {path}.{label} = {shorten(value)} is invalid\n{detail}"
                              ) from None
    return space


def to_param_space(space: SweepSpace) -> dict[str, Any]:
    """Ray Tune's ``param_space``: one entry per distribution path (imports Ray)."""
    from ray import tune

    build = {
        "grid": lambda a: tune.grid_search(list(a)),
        "choice": lambda a: tune.choice(list(a)),
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
    }
    return {path: build[d.kind](d.args) for path, d in space.distributions.items()}
