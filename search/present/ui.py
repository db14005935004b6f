"""Rendering for the command line: rich tables and progress, plain lines when not on a terminal."""

from __future__ import annotations

import time
from typing import Any, Sequence

import optuna
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from ..study.objective import TrialHooks
from ..study.record import TrialRecord
from ..study.results import accuracy_of, best_trial, refined_trials, state_counts

__all__ = [
    "OP_SYMBOLS", "ops_glance", "pct", "num", "trials_table", "PLAN_COLUMNS", "WIDTH_COLUMNS", "plan_columns",
    "plan_rows", "plan_table",
    "best_plan", "studies_table", "bench_table", "RunDisplay", "TrainDisplay",
]

OP_SYMBOLS = {"none": ".", "merge": "M", "prune": "P", "squeeze": "S", "merge+prune": "MP", "merge+squeeze": "MS"}


def ops_glance(ops: Sequence[str]) -> str:
    """Per-layer ops in a few characters: ``. M P S MP MS``."""
    return " ".join(OP_SYMBOLS.get(op, "?") for op in ops)


def pct(v: float | None, digits: int = 1) -> str:
    """An accuracy as a percentage, ``-`` when there is none."""
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def num(v: float | None, fmt: str = ".3f") -> str:
    """A number in ``fmt``, ``-`` when there is none."""
    return "-" if v is None else format(v, fmt)


def trials_table(rows: Sequence[dict[str, Any]], title: str, target: float | None,
                 base_accuracy: float | None = None, latency: float | None = None) -> Table:
    """Trials, one row each. A seeded trial names the published method whose plan it runs; a pruned
    or failed trial shows its reason instead of an intermediate score; with ``base_accuracy`` a
    column gives each top-1's drop from the unreduced model; with a ``latency`` target, two columns
    give each plan's latency ratio as predicted and as measured (trials timed after the run)."""
    table = Table(title=title, title_justify="left")
    columns = [("trial", "right"), ("state", "left"), ("top-1", "right")]
    if base_accuracy is not None:
        columns.append(("drop", "right"))
    columns += [("FLOPs ratio", "right"), ("GMACs", "right")]
    if latency is not None:
        columns += [("latency pred.", "right"), ("latency meas.", "right")]
    columns += [("feasible", "center"), ("ops per layer", "left"), ("time", "right")]
    for name, justify in columns:
        table.add_column(name, justify=justify)
    for r in rows:
        done = r["state"] == "complete"
        feasible = {True: "yes", False: "no", None: "-"}[r.get("feasible")] if done else "-"
        label = f"{r['number']} ({r['seed_of']})" if r.get("seed_of") else str(r["number"])
        if r.get("refined_from") is not None:
            label = f"{r['number']} (refined {r['refined_from']})"
        if r.get("reaimed_from") is not None:
            label = f"{r['number']} (re-aimed {r['reaimed_from']})"
        cells = [label, r["state"], pct(r["top1"]) if done else "-"]
        if base_accuracy is not None:
            cells.append(f"{100 * (r['top1'] - base_accuracy):+.1f}" if done and r["top1"] is not None else "-")
        reason = (r.get("reason") or "")[:60]
        cells += [num(r["flops_ratio"]) if done else "-", num(r["gmacs"], ".4g") if done else "-"]
        if latency is not None:
            cells += [num(r.get("predicted_latency_ratio")) if done else "-", num(r.get("measured_latency_ratio"))]
        cells += [feasible,
                  ops_glance(r["ops"]) if done or not reason else reason,
                  "-" if r["duration_s"] is None else f"{r['duration_s']:.1f}s"]
        table.add_row(*cells)
    if target is not None:
        table.caption = (f"FLOPs ratio = measured MACs / unreduced MACs, target <= {target:g}. "
                         "Ops: . none, M merge, P prune, S squeeze, MP merge+prune, MS merge+squeeze. "
                         "(LTMP), (ToMe), (TPS): the published methods' plans the study started from"
                         + ("; drop: points of top-1 against the unreduced model" if base_accuracy is not None else "")
                         + (f"; latency = the plan's time / the unreduced model's on this device, target <= {latency:g}"
                            " (a measured value decides where there is one)" if latency is not None else ""))
    return table


#: Columns of a plan, layer by layer: in the terminal (:func:`plan_table`) and in dashboard notes.
PLAN_COLUMNS = ("layer", "op", "budget (keep)", "merge threshold", "prune threshold", "mean tokens after")
#: Columns a plan that cuts width adds: what each block keeps of its heads and MLP units.
WIDTH_COLUMNS = ("heads", "MLP units")


def _cuts_width(plan: dict[str, Any]) -> bool:
    return any(layer.get("heads") is not None or layer.get("mlp_hidden") is not None for layer in plan["layers"])


def plan_columns(plan: dict[str, Any]) -> tuple[str, ...]:
    """The columns of a plan's table: :data:`PLAN_COLUMNS`, and :data:`WIDTH_COLUMNS` when it cuts width."""
    return PLAN_COLUMNS + (WIDTH_COLUMNS if _cuts_width(plan) else ())


def plan_rows(plan: dict[str, Any], kept: Sequence[float] | None) -> list[tuple[str, ...]]:
    """The cells of :func:`plan_columns` for every layer of a plan (its JSON form)."""
    kept = list(kept or [None] * len(plan["layers"]))
    geometry = plan.get("geometry") or {}
    width = _cuts_width(plan)

    def kept_of(value: int | None, full: int | None) -> str:
        return "all" if value is None else f"{value}/{full}" if full else str(value)

    return [
        (str(i), layer["op"], f"{layer['keep']:.3f}", num(layer.get("merge_threshold")),
         num(layer.get("prune_threshold")), num(k, ".1f"))
        + ((kept_of(layer.get("heads"), geometry.get("num_heads")),
            kept_of(layer.get("mlp_hidden"), geometry.get("mlp_hidden"))) if width else ())
        for i, (layer, k) in enumerate(zip(plan["layers"], kept))
    ]


def plan_table(plan: dict[str, Any], kept: Sequence[float] | None, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in plan_columns(plan):
        table.add_column(name, justify="left" if name == "op" else "right")
    for row in plan_rows(plan, kept):
        table.add_row(*row)
    return table


def best_plan(trial: optuna.trial.FrozenTrial | None, measured_latency: float | None = None) -> Table | str:
    """The best feasible trial's plan as a table, or the line that says there is none."""
    if trial is None:
        return "No feasible trial yet."
    r = TrialRecord.from_trial(trial)
    latency = ""
    if r.predicted_latency_ratio is not None:
        latency = f", latency ratio {r.predicted_latency_ratio:.3f} predicted"
        if measured_latency is not None:
            latency += f", {measured_latency:.3f} measured"
    return plan_table(r.plan, r.kept_tokens, f"Best plan: trial {trial.number}, top-1 "
                      f"{pct(accuracy_of(trial))}, FLOPs ratio {r.flops_ratio:.3f}{latency}")


def studies_table(rows: Sequence[dict[str, Any]], where: str) -> Table:
    table = Table(title=f"Studies in {where}", title_justify="left")
    for name in ("study", "target", "model", "done/pruned/failed", "best top-1", "best FLOPs ratio",
                 "latency target", "best latency"):
        table.add_column(name, justify="left" if name in ("study", "model") else "right")
    for r in rows:
        latency = r.get("target_latency_ratio")
        best = r.get("best_measured_latency_ratio")
        best_text = (f"{best:.3f} meas." if best is not None else
                     f"{r['best_predicted_latency_ratio']:.3f} pred." if r.get("best_predicted_latency_ratio") is not None
                     else "-")
        table.add_row(
            r["study"], num(r["target_flops_ratio"], "g"), r["model"] or "-",
            f"{r['complete']}/{r['pruned']}/{r['failed']}", pct(r["best_top1"]), num(r["best_flops_ratio"]),
            "-" if latency is None else f"{latency:g} (b{r.get('latency_batch')}"
                                        + ("" if r.get("latency_mode", "static") == "static" else f", {r['latency_mode']}")
                                        + ")", best_text,
        )
    return table


def trial_line(trial: optuna.trial.FrozenTrial) -> str:
    """One plain line per finished trial."""
    r = TrialRecord.from_trial(trial)
    if trial.state == optuna.trial.TrialState.COMPLETE:
        feasible = "feasible" if r.feasible else "over the target"
        latency = "" if r.predicted_latency_ratio is None else f", latency ratio {r.predicted_latency_ratio:.3f} predicted"
        feasible = "feasible" if r.feasible else "over the target"
        return (f"trial {trial.number}: top-1 {pct(accuracy_of(trial))}, FLOPs ratio {num(r.flops_ratio)}{latency} "
                f"({feasible}), {r.gmacs or 0:.4g} GMACs")
    reason = r.reason or ""
    return f"trial {trial.number}: {trial.state.name.lower()}" + (f" ({reason})" if reason else "")


def bench_table(rows: list[dict[str, Any]], title: str) -> Table:
    """``search bench`` measurements, one row per configuration."""
    table = Table(title=title, title_justify="left")
    for col in ("plan", "device", "batch", "mode", "FLOPs ratio", "img/s base", "img/s plan", "ms base", "ms plan",
                "speedup", "of ideal"):
        table.add_column(col, justify="left" if col in ("plan", "device", "mode") else "right")
    for r in rows:
        table.add_row(str(r["plan"]), str(r["device"]), str(r["batch"]), r["mode"] + (" bf16" if r["amp"] else ""),
                      f"{r['flops_ratio']:.3f}", f"{r['images_per_s_base']:.1f}", f"{r['images_per_s_plan']:.1f}",
                      f"{r['latency_ms_base']:.1f}", f"{r['latency_ms_plan']:.1f}", f"{r['speedup']:.2f}x",
                      f"{r['ideal_fraction']:.2f}")
    table.caption = "FLOPs are MACs; 'of ideal' = speedup x FLOPs ratio (1.00 = as fast as the FLOPs say)"
    return table


class RunDisplay:
    """Progress of a run, as Optuna users know it from ``show_progress_bar``.

    On a terminal: a rich display on stderr with the study's trials done of ``--n-trials`` (ETA,
    best feasible top-1 so far) and the current trial's phase (cut width, calibrate, tune step k of
    n, score); the base model's training gets its own bar with an ETA. Otherwise (logs, pipes): one
    timestamped line per finished trial and a "best is trial N" line when the best changes
    (nothing with ``quiet``).
    """

    def __init__(self, console: Console, total: int, steps: int, quiet: bool = False, jobs: int = 1) -> None:
        self.console = console
        self.total = total
        self.steps = steps
        self.quiet = quiet
        self.jobs = jobs
        self.live = console.is_terminal and not quiet
        self.progress: Progress | None = None
        self.base_task = None
        self.best: int | None = None
        self._trial: int | None = None

    def __enter__(self) -> "RunDisplay":
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=True,
            )
            self.progress.start()
            self.trials = self.progress.add_task("opening the data and the base model", total=self.total)
            self.step_task = self.progress.add_task("", total=max(1, self.steps), visible=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def line(self, text: str) -> None:
        """A plain line: above the live display on a terminal, timestamped otherwise."""
        if self.progress is not None:
            self.progress.console.print(text)
        elif not self.quiet:
            self.console.print(f"[{time.strftime('%H:%M:%S')}] {text}", highlight=False)

    def base_epoch(self, epoch: int, epochs: int, loss: float) -> None:
        if self.progress is not None:
            if self.base_task is None:
                self.base_task = self.progress.add_task("training the base model (once; cached)", total=epochs)
            self.progress.update(self.base_task, completed=epoch,
                                 description=f"training the base model (once; cached), loss {loss:.3f}")
            if epoch == epochs:
                self.progress.remove_task(self.base_task)
        elif not self.quiet and (epoch == 1 or epoch % 10 == 0 or epoch == epochs):
            self.line(f"training the base model (once; it is cached): epoch {epoch}/{epochs}, loss {loss:.3f}")

    def hooks(self) -> TrialHooks:
        def study(finished: int) -> None:
            if self.progress is not None:
                self.progress.update(self.trials, completed=min(finished, self.total),
                                     description="trials" if self.jobs == 1 else f"trials ({self.jobs} workers)")

        def start(number: int) -> None:
            self._trial = number
            if self.progress is not None and self.jobs == 1:
                self.progress.update(self.step_task, completed=0, visible=True, description=f"trial {number}: start")

        def phase(name: str) -> None:
            if self.progress is not None and self.jobs == 1:
                total = self.progress.tasks[self.step_task].total if name == "tune" else 1
                self.progress.update(self.step_task, completed=0, total=total, description=f"trial {self._trial}: {name}")

        def step(done: int, steps: int) -> None:
            if self.progress is not None and self.jobs == 1:
                self.progress.update(self.step_task, completed=done, total=max(1, steps),
                                     description=f"trial {self._trial}: tune step {done}/{steps}")

        return TrialHooks(on_trial_start=start, on_step=step, on_phase=phase, on_study=study)

    def trial_end(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, finished: int) -> None:
        """After every finished trial of the study (``finished``: how many it has now)."""
        self.line(trial_line(trial))
        best = best_trial(study)
        if best is not None and best.number != self.best:
            self.best = best.number
            if self.progress is None:
                self.line(f"best is trial {best.number}: top-1 {pct(accuracy_of(best))} at a FLOPs ratio of "
                          f"{num(TrialRecord.from_trial(best).flops_ratio)}")
        if self.progress is not None:
            text = "trials" if self.jobs == 1 else f"trials ({self.jobs} workers)"
            if best is not None:
                text += f", best {pct(accuracy_of(best))} (trial {best.number})"
            self.progress.update(self.trials, completed=min(finished, self.total), description=text)


def finished_line(study: optuna.Study) -> str:
    """``24 trials: 20 complete, 4 pruned, 0 failed``: the study's sampled trials by state (and
    ``, plus 2 refined`` when the refine stage added some)."""
    count = state_counts(study)
    s = optuna.trial.TrialState
    done = count[s.COMPLETE] + count[s.PRUNED]
    refined = len(refined_trials(study))
    return (f"{done} trials: {count[s.COMPLETE]} complete, {count[s.PRUNED]} pruned, {count[s.FAIL]} failed"
            + (f", {count[s.WAITING]} waiting" if count[s.WAITING] else "")
            + (f", plus {refined} refined" if refined else ""))


class TrainDisplay:
    """Progress of ``search train``: on a terminal, rich bars for the epochs and the steps of the current
    one (ETA, loss, budget term, FLOPs ratio); otherwise one timestamped line per epoch (and a first
    line when the run starts). Only rank 0 of a distributed run shows anything."""

    def __init__(self, console: Console, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self.progress: Progress | None = None
        self.show = not quiet

    def line(self, text: str) -> None:
        if not self.show:
            return
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            self.console.print(f"[{time.strftime('%H:%M:%S')}] {text}", highlight=False)

    def start(self, info: dict[str, Any]) -> None:
        self.show = not self.quiet and info["rank"] == 0
        self.steps_per_epoch = info["steps_per_epoch"]
        resumed = f", resumed at step {info['resumed_at']}" if info["resumed_at"] else ""
        where = f"{info['world']} processes, " if info["world"] > 1 else ""
        self.line(f"training {info['epochs']} epoch(s) of {info['steps_per_epoch']} steps on {info['images']} images "
                  f"({where}{info['device']}{resumed}); FLOPs target {info['target']:g} (aim {info['aim']:.3f}); "
                  f"weights: {info['weights']}")
        if self.show and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=True,
            )
            self.progress.start()
            self.epochs = self.progress.add_task("epochs", total=info["epochs"],
                                                 completed=info["resumed_at"] // info["steps_per_epoch"])
            self.steps = self.progress.add_task("steps", total=info["steps"], completed=info["resumed_at"])

    def step(self, s: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(self.steps, completed=s["step"], description=(
                f"epoch {s['epoch']}/{s['epochs']}  loss {s['loss']:.3f}  budget {s['budget']:.2e}  "
                f"FLOPs {s['flops_ratio']:.3f}  lr {s['lr']:.2e}"))

    def epoch(self, row: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(self.epochs, completed=row["epoch"])
        self.line(f"epoch {row['epoch']}: loss {row['train_loss']:.4f}, budget term {row['budget_term']:.2e}, "
                  f"select top-1 {pct(row['eval_top1'], 2)} at a measured FLOPs ratio of "
                  f"{row['eval_flops_ratio']:.3f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
