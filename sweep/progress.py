"""The sweep's progress on the terminal, as a Ray Tune callback (imports Ray)."""

from __future__ import annotations

import time

from ray.tune import Callback
from rich.console import Console
from rich.table import Table

from sweep.layout import CONTEXT_KEY, format_variant

# Module level: Tune pickles its callbacks, and a Console holds a lock.
CONSOLE = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)


ROWS_EVERY_S = 30.0  # the per-trial table (``ntk-sweep run --trials``), at most this often


class SweepProgress(Callback):
    """Progress lines on stderr: trials done and failed, the best finished trial on the
    sweep's metric, and an ETA from the share of planned training steps done (at most every
    10 s, and whenever a trial ends). With ``rows``, also a table of the trials (state,
    swept values and seed, stage, progress, the metric so far) every ``ROWS_EVERY_S`` and
    when the sweep ends, like Tune's own reporter."""

    def __init__(self, trials: int, models: int, metric: str, mode: str, rows: bool = False):
        """``trials`` of the sweep, ``models`` evaluated per trial; ``metric`` and ``mode``
        as in the sweep settings; ``rows``: print the per-trial table."""
        self.trials, self.models, self.metric, self.mode = trials, models, metric, mode
        self.rows, self.rows_last = rows, 0.0
        self.latest: dict[str, dict] = {}  # each trial's last report
        self.start, self.last = time.monotonic(), 0.0
        self.progress: dict[str, float] = {}
        self.best: tuple[float, str] | None = None
        self.failed = 0
        self.state: tuple = ()
        self.kernels: set[str] = set()  # trials computing kernels (work the ETA cannot see)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("waiting_for"):
            CONSOLE.print(f"[sweep] trial {trial.trial_id} waits for {result['waiting_for']}: "
                          "another trial holds it")
        self.latest.setdefault(trial.trial_id, {}).update(result)
        if result.get("computing_kernels"):
            self.kernels.add(trial.trial_id)
        if result.get("finished"):
            self.kernels.discard(trial.trial_id)
        # The trial's share of its planned minibatch steps; else of its evaluated models.
        done = result.get("progress", result.get("models_evaluated", 0) / max(self.models, 1))
        self.progress[trial.trial_id] = min(done, 0.999 if not result.get("finished") else 1.0)
        if result.get("finished") and self.metric in result:
            value = result[self.metric]
            better = self.best is None or (value > self.best[0] if self.mode == "max"
                                           else value < self.best[0])
            if better:
                self.best = (value, trial.trial_id)
        self._line(force=bool(result.get("finished")))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.progress[trial.trial_id] = 1.0
        self.kernels.discard(trial.trial_id)
        self._line(force=True)

    def on_step_end(self, iteration, trials, **info):
        """Tune's control loop: a line at least every 10 s, also while no trial reports."""
        self._line(force=False)
        if self.rows and time.monotonic() - self.rows_last >= ROWS_EVERY_S:
            self.rows_last = time.monotonic()
            CONSOLE.print(self.table(trials))

    def on_experiment_end(self, trials, **info):
        if self.rows:
            CONSOLE.print(self.table(trials))

    def table(self, trials) -> Table:
        """One row per trial: id, Tune's state, swept values and seed, the stage it is in,
        its progress, the running mean of the sweep's metric over its evaluated models."""
        table = Table(title=f"trials ({self.metric}: running mean over evaluated models)",
                      title_justify="left", box=None, pad_edge=False)
        for column in ("trial", "state", "variant", "seed", "stage", "progress", self.metric):
            table.add_column(column, justify="right" if column in ("progress", self.metric)
                             else "left")
        for t in trials:
            config = {k: v for k, v in t.config.items() if k != CONTEXT_KEY}
            last = self.latest.get(t.trial_id, {})
            done = self.progress.get(t.trial_id, 0.0)
            value = last.get(self.metric)
            stage = "kernels" if t.trial_id in self.kernels else last.get("stage", "-")
            seeds = config.get("seeds", t.config.get(CONTEXT_KEY, {}).get("base", {})
                               .get("seeds", "-"))
            table.add_row(t.trial_id, str(t.status).lower(), format_variant(config) or "-",
                          ", ".join(map(str, seeds)) if isinstance(seeds, list | tuple)
                          else str(seeds), stage, f"{100 * done:.0f} %",
                          "-" if value is None else f"{value:.4f}")
        return table

    def on_trial_error(self, iteration, trials, trial, **info):
        self.progress[trial.trial_id] = 1.0
        self.kernels.discard(trial.trial_id)
        self.failed += 1
        CONSOLE.print(f"[sweep] trial {trial.trial_id} failed (try {trial.num_failures}): "
                           f"{trial.error_file}")
        self._line(force=True)

    def _line(self, force: bool) -> None:
        now = time.monotonic()
        finished = sum(v >= 1.0 for v in self.progress.values())
        state = (finished, self.failed, self.best)
        if (now - self.last < 10) and not (force and state != self.state):
            return  # at most every 10 s, or when a trial ends or a new best appears
        self.last, self.state = now, state
        share = sum(self.progress.values()) / max(self.trials, 1)
        elapsed = now - self.start
        eta = f"{elapsed * (1 - share) / share:.0f} s" if share > 0 else "?"
        if self.kernels:  # the ETA counts training steps; kernels come on top
            n = len(self.kernels)
            eta = f"? ({n} trial{'s' * (n > 1)} computing kernels; training: {eta})"
        best = (f"best {self.metric} {self.best[0]:.4f} ({self.best[1]})"
                if self.best else f"best {self.metric}: -")
        CONSOLE.print(
            f"[sweep] {finished}/{self.trials} trials done, {self.failed} failed; "
            f"{best}; {elapsed:.0f} s elapsed, ETA {eta}")
