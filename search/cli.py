"""The ``search`` command line: parse, call the library, render, return an exit code.

Mistakes a user can make (bad flags, unknown studies, unreachable storage, invalid plans) end with
one line on stderr and exit code 2; Ctrl-C ends with exit code 130. The flags of ``search run`` and
``search validate`` are generated from :class:`search.setup.config.StudyConfig`, where each setting is
declared once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .study.record import StudyRecord, TrialRecord


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2, and a help string may be a
    callable, evaluated only when help is shown (it may need imports that plain parsing avoids)."""

    def format_help(self) -> str:
        for action in self._actions:
            if callable(action.help):
                action.help = action.help()
        return super().format_help()

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _ratio(text: str) -> float:
    from ltmp_core import LTMPError

    from .setup.budget import check_ratio

    try:
        return check_ratio(text, "FLOPs ratio")
    except LTMPError:
        raise argparse.ArgumentTypeError(f"expected a FLOPs ratio in (0, 1], got {text!r}") from None


def _target(text: str) -> float | tuple[float, float]:
    """A FLOPs ratio (0.35), or a range of them (0.25:0.6) for a study over many budgets."""
    if ":" not in text:
        return _ratio(text)
    lo, _, hi = text.partition(":")
    low, high = _ratio(lo), _ratio(hi)
    if not low < high:
        raise argparse.ArgumentTypeError(f"expected a range LO:HI with LO < HI, got {text!r}")
    return low, high


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _kwarg(text: str) -> tuple[str, Any]:
    """``key=value`` with a Python literal value (a number, a boolean, a string), as timm's train.py."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


class _KwargsAction(argparse.Action):
    """``--model-kwargs a=1 b=x`` -> ``{"a": 1, "b": "x"}``."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, dict(values))


def _setting_help(f: Any) -> Callable[[], str]:
    """The help of a setting: its own line, its choices and the default preset's value (lazily)."""

    def text() -> str:
        from .setup.config import DEFAULT_PRESET, load_preset

        meta = f.metadata
        parts = [meta["help"]]
        if meta["choices"] is not None:
            choices = meta["choices"]()
            described = [f"{name} ({getattr(v, 'description', '')})" if getattr(v, "description", "") else name
                         for name, v in (choices.items() if isinstance(choices, dict) else ((c, None) for c in choices))]
            parts.append("choose from " + ", ".join(described))
        value = getattr(load_preset(DEFAULT_PRESET), f.name)
        if value not in (None, False, {}) and f.name != "flops":
            value = ",".join(value) if isinstance(value, tuple) else value
            parts.append(f"{DEFAULT_PRESET} preset: {value}")
        return "; ".join(parts).replace("%", "%%")

    return text


def _add_settings(group: argparse._ArgumentGroup, settings: Sequence[Any]) -> None:
    """Flags for the :class:`StudyConfig` fields ``settings``; every default is ``None`` (= the preset's)."""
    from .setup.config import StudyConfig

    hints = typing.get_type_hints(StudyConfig)
    for f in settings:
        meta, hint = f.metadata, hints[f.name]
        names = [meta["flag"]] + ([meta["short"]] if meta["short"] else [])
        kw: dict[str, Any] = dict(dest=f.name, default=None, help=_setting_help(f))
        origin = typing.get_origin(hint)
        if hint is bool:
            kw["action"] = "store_true"
        elif hint == (bool | None):
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is tuple:
            kw.update(type=_names, metavar="A,B")
        elif origin is dict:
            kw.update(nargs="+", type=_kwarg, metavar="KEY=VALUE", action=_KwargsAction)
        elif f.name == "flops":
            kw["type"] = _target
        else:
            kw["type"] = next(t for t in (int, float, str) if hint in (t, t | None))
        group.add_argument(*names, **kw)


class _Deprecated(argparse.Action):
    """An old flag that still works for one release, with one line saying which flag replaces it."""

    def __init__(self, *args: Any, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        sys.stderr.write(f"search: warning: {option_string} is deprecated and will be removed in the next release; "
                         f"use {self.new}\n")
        setattr(namespace, self.dest, values)


def _preset_options(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--preset", dest="preset", help=help)
    p.add_argument("--study", dest="preset", action=_Deprecated, new="--preset", help=argparse.SUPPRESS)


def _json_options(p: argparse.ArgumentParser, help: str = "print the result as JSON") -> None:
    """``--json``, and Optuna's CLI spelling ``-f json`` / ``--format json`` for the same."""
    p.add_argument("--json", action="store_true", help=help)
    p.add_argument("-f", "--format", choices=("table", "json"), default="table", help="table (default) or json "
                   "(the same as --json, as Optuna's command line spells it)")


def _storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="database URL (default: $OPTUNA_STORAGE, else sqlite:///studies/search.db)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="search", description="Search where and how to cut tokens in a vision transformer.")
    parser.add_argument("--version", action="version", version=f"ltmp-search {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_study_commands(sub)
    _add_plan_commands(sub)
    return parser


def _add_study_commands(sub: Any) -> None:
    """run, studies, show, export, delete: a study and its trials."""
    from .setup.config import option_fields

    run = sub.add_parser("run", help="run (or resume) a search", description=(
        "Run an Optuna study: every trial samples a plan (which blocks merge, prune or squeeze, and how hard) "
        "under the FLOPs target, sets its learned thresholds (solved for the target, or tuned briefly) and scores "
        "it on the select split with tokens removed. Re-running the same command resumes the study."))
    _preset_options(run, "preset name (mnist, digits, deit_small, ...) or path of a preset TOML file "
                    "(default: mnist); --study-name names the study")
    _add_settings(run.add_argument_group("model and data (timm style)"), option_fields("model"))
    search_group = run.add_argument_group("search (Optuna style)")
    _add_settings(search_group, option_fields("search"))
    search_group.add_argument("--study-name")
    _storage_options(search_group)
    run.add_argument("--artifacts", help="folder of the dashboard pictures (default: beside a SQLite file, "
                     "else studies/artifacts)")
    run.add_argument("--jobs", type=int, default=1, help="worker processes on this machine sharing the study "
                     "(workers on other machines join with the same --storage and --study-name)")
    run.add_argument("--quiet", action="store_true", help="no progress, only the result")
    _json_options(run, "print the result as JSON")

    p = sub.add_parser("studies", help="list the studies in a storage")
    _storage_options(p)
    _json_options(p)

    p = sub.add_parser("show", help="trials and best plan of a study")
    p.add_argument("study_name", metavar="STUDY")
    p.add_argument("--plot", metavar="FILE.png", help="draw top-1 against measured FLOPs of every trial")
    _storage_options(p)
    _json_options(p)

    p = sub.add_parser("export", help="write the best feasible plan (or --trial N) as JSON")
    p.add_argument("study_name", metavar="STUDY")
    p.add_argument("--trial", type=int, help="export this trial instead of the best feasible one")
    p.add_argument("--flops", type=_ratio, help="the best plan at or under this measured FLOPs ratio (for a study "
                   "over a range of targets)")
    p.add_argument("-o", "--output", default="plan.json", help="output file (default: plan.json)")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    _storage_options(p)
    _json_options(p)

    p = sub.add_parser("delete", help="remove a study, its layer rows and its pictures", description=(
        "Remove a study with everything this project keeps of it: its trials, its rows in the "
        "project's tables and its dashboard pictures. Asks first unless --yes is given."))
    p.add_argument("study_name", metavar="STUDY")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask")
    p.add_argument("--artifacts", help="folder of the pictures (default: as search run)")
    _storage_options(p)
    _json_options(p)


def _add_plan_commands(sub: Any) -> None:
    """validate, train, export-model, bench, dashboard: what is done with a plan and a study."""
    from .setup.config import option_fields

    p = sub.add_parser("validate", help="top-1/top-5 and measured FLOPs of a plan on a data split", description=(
        "Apply a plan to its base model and report top-1, top-5 and the measured FLOPs (MACs) on a split: "
        "the test split (val/ of an ImageNet-layout folder), or the select split a search scored its trials on."))
    p.add_argument("plan", metavar="PLAN.json", help="an exported plan, or a model trained by search train "
                   "(MODEL.safetensors: its plan, weights and data settings)")
    _preset_options(p, "preset whose model and data settings to use (default: the plan's own, else mnist)")
    p.add_argument("--split", default="test", choices=("test", "select", "val", "holdout"),
                   help="test (default: the built-in test split, or val/ of a folder; never searched on) or "
                        "select (what the search scored its trials on); val and holdout are their old names")
    p.add_argument("--mode", choices=("dynamic", "static"),
                   help="dynamic (learned thresholds, default when the plan has them) or static (fixed counts)")
    p.add_argument("--compile", action="store_true", help="torch.compile the static model")
    _add_settings(p.add_argument_group("model and data (timm style)"), option_fields("model"))
    _json_options(p)

    p = sub.add_parser("train", help="train a plan: thresholds (LTMP's recipe) or weights and thresholds", description=(
        "Train an exported plan on its model and data: --recipe ltmp (LTMP's released recipe: only the thresholds, "
        "one epoch, SGD, cosine schedule, CE + 10 (r_flops - r_target)^2) or --recipe full (weights and thresholds, "
        "AdamW, warm-up, cosine decay, optional distillation). Writes OUT/model.safetensors (weights, with the plan "
        "and its learned thresholds in the metadata), plan.json, summary.csv (per epoch) and args.yaml; a killed "
        "run continues with --resume. Many processes: torchrun --nproc_per_node N -m search train ..."))
    p.add_argument("plan", metavar="PLAN.json")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (created; must not hold "
                   "another run unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
    _preset_options(p, "preset whose model and data settings to use (default: the plan's own, else mnist)")
    _add_settings(p.add_argument_group("model and data (timm style)"), option_fields("model"))
    _add_train_settings(p.add_argument_group("training (timm train.py names)"))
    p.add_argument("--quiet", action="store_true", help="no progress, only the result")
    _json_options(p, "print the final figures as JSON")

    p = sub.add_parser("export-model", help="save a trained model as a torch.export program (static mode)",
                       description=(
        "Save the trained model of search train in static mode (fixed token counts: what the thresholds kept on "
        "average on the select split) as a torch.export program: torch.export.load(path).module() runs it with "
        "torch alone, without timm or this package."))
    p.add_argument("model", metavar="MODEL.safetensors")
    p.add_argument("--static", action="store_true", help="static mode (required: the only mode with fixed shapes)")
    p.add_argument("-o", "--output", default="model.pt2", help="output file (default: model.pt2)")
    p.add_argument("-b", "--batch-size", type=int, default=2, help="batch size of the example input (default 2)")
    p.add_argument("--fixed-batch", action="store_true", help="export for that batch size only (default: any "
                   "batch size from 1 on)")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    _json_options(p)

    p = sub.add_parser("bench", help="images/s and latency of a plan against its unreduced model", description=(
        "Time the unreduced model and the plan side by side on random images (warm-up, then the median of "
        "several runs), with the measured FLOPs ratio, the speedup and the speedup as a fraction of the "
        "FLOP-ideal 1/ratio. Results are stored in the database and listed by --history."))
    p.add_argument("plan", nargs="?", metavar="PLAN.json", help="an exported plan or a trained MODEL.safetensors "
                   "(or give --model and --flops)")
    p.add_argument("--model", help="timm model for a quick look without a plan")
    p.add_argument("--model-kwargs", nargs="+", type=_kwarg, metavar="KEY=VALUE", action=_KwargsAction)
    p.add_argument("--flops", type=_ratio, help="with --model: a plan at this FLOPs ratio")
    p.add_argument("--op", default="merge+prune", help="with --model: the op of every block (default merge+prune)")
    p.add_argument("--importance", default=None, choices=("mean", "cls"),
                   help="with --model: prune/squeeze scores (default: a study's default, mean; cls keeps fused "
                   "attention)")
    p.add_argument("-b", "--batch-size", default="32", type=_sizes, help="batch size, or several: 1,32")
    p.add_argument("--mode", default="static", type=_names, help="static, dynamic, or both: static,dynamic")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (static mode)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--history", action="store_true", help="list stored measurements instead")
    _storage_options(p)
    _json_options(p, "one JSON object per measured configuration")

    p = sub.add_parser("dashboard", help="open the studies in optuna-dashboard")
    _storage_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--artifacts", help="folder of the pictures (default: as search run)")


def _add_train_settings(group: argparse._ArgumentGroup) -> None:
    """Flags for the :class:`search.train.loop.TrainSettings` fields (declared there once)."""
    import dataclasses

    from .setup.config import TrainSettings

    hints = typing.get_type_hints(TrainSettings)
    for f in dataclasses.fields(TrainSettings):
        hint, kw = hints[f.name], dict(dest=f"train_{f.name}", default=None, help=f.metadata["help"].replace("%", "%%"))
        if hint is bool:
            kw["action"] = "store_true"
        elif f.name == "flops":
            kw["type"] = _ratio
        else:
            kw["type"] = next(t for t in (int, float, str) if hint in (t, t | None))
        if hint is not bool:
            kw["metavar"] = f.name.upper()
        group.add_argument(f.metadata["flag"], **kw)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,32, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def _settings(args: argparse.Namespace, group: str | None = None) -> dict[str, Any]:
    """The settings the user gave on the command line (``None``: not given, the preset decides)."""
    from .setup.config import option_fields

    given = {f.name: getattr(args, f.name) for f in option_fields(group)}
    if isinstance(given.get("flops"), tuple):  # --flops LO:HI: a study over a range of targets
        given["flops_min"], given["flops"] = given["flops"]
    return given


def _consoles():
    from rich.console import Console

    # soft_wrap: sentences stay one line (pipes, logs); tables fit the terminal, or 160 columns in a log.
    width = None if sys.stdout.isatty() else 160
    return Console(soft_wrap=True, width=width), Console(stderr=True, soft_wrap=True)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def cmd_run(args: argparse.Namespace) -> int:
    from .setup.config import resolve

    config = resolve(args.preset, _settings(args))  # settings are checked before torch is imported

    import optuna

    from .present import ui
    from .study.results import best_trial, ranked_trials, sampled_finished, trial_summary
    from .study.storage import redact
    from .study.run import run

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out, err = _consoles()
    display = ui.RunDisplay(err, config.n_trials, config.trial_steps, quiet=args.quiet or args.json, jobs=args.jobs)

    def trial_end(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        display.trial_end(study, trial, sampled_finished(study))

    refined_lines: list[str] = []

    def refined(trial: optuna.trial.FrozenTrial | None, parent: optuna.trial.FrozenTrial, reason: str | None) -> None:
        if trial is None:
            refined_lines.append(f"Trial {parent.number} could not be refined: {reason}")
            return
        r, p = TrialRecord.from_trial(trial), TrialRecord.from_trial(parent)
        refined_lines.append(f"Refined trial {parent.number} ({ui.pct(p.accuracy)} at {ui.num(p.flops_ratio)}) as trial "
                             f"{trial.number}: {ui.pct(r.accuracy)} at {ui.num(r.flops_ratio)} on select "
                             f"({config.refine_steps} steps, shift re-solved)")

    try:
        with display:
            result = run(config, storage=args.storage, study_name=args.study_name, jobs=args.jobs, artifacts=args.artifacts,
                         hooks=display.hooks(), on_base_epoch=display.base_epoch, on_trial_end=trial_end,
                         on_warning=lambda message: err.print(f"warning: {message}"), on_refined=refined,
                         on_note=display.line)
    except KeyboardInterrupt:
        return _interrupted(args, config)
    study = result.study
    best = best_trial(study)
    where = redact(result.storage_url)
    if result.skipped:
        err.print(f"warning: skipped {len(result.skipped)} unreadable image(s), e.g. {result.skipped[0]}")
    from .study.latency_study import ERROR_BOUND

    for check in result.latency_checks:
        if check["error"] is not None and abs(check["error"]) > ERROR_BOUND:
            err.print(f"warning: trial {check['trial']}: predicted latency ratio {check['predicted']:.3f}, measured "
                      f"{check['measured']:.3f} ({100 * check['error']:+.0f}%, beyond {100 * ERROR_BOUND:.0f}%"
                      f"{' after timing it again' if check.get('remeasured') else ''}); the measured value decides")
    measured = StudyRecord.from_study(study).measured_latency()
    if args.json:
        _print_json({
            "study": study.study_name, "storage": where, "target_flops_ratio": config.flops,
            "target_latency_ratio": config.latency, "latency_batch": config.latency_batch if config.latency else None,
            "latency_mode": config.latency_mode if config.latency else None,
            "latency_device": result.latency_device, "latency_checks": result.latency_checks,
            "new_trials": result.new_trials, "refined_trials": result.refined, "reaimed_trials": result.reaimed,
            "base": result.base,
            "best": None if best is None else {**trial_summary(best, measured), "plan": TrialRecord.from_trial(best).plan},
        })
        return 0
    if not result.new_trials and not refined_lines:
        out.print(f"Study {study.study_name!r} already has {result.finished_before} finished trials "
                  f"(--n-trials {config.n_trials}); nothing to run. Raise --n-trials to continue it.")
    base = result.base
    out.print(ui.finished_line(study) + f" (this run: {len(result.new_trials)})")
    for line in refined_lines:
        out.print(line)
    if base.get("cached_at"):
        out.print(f"The base model was trained once and cached at {base['cached_at']}; later runs load it "
                  "(LTMP_CACHE=DIR moves the cache).")
    if base.get("evaluated_accuracy") is not None:
        out.print(f"Unreduced base model ({base.get('model')}): top-1 {ui.pct(base['evaluated_accuracy'])} "
                  f"on the {config.holdout} select images, {StudyRecord.from_study(study).unreduced_gmacs or 0:.4f} GMACs.")
    rows = [trial_summary(t, measured) for t in ranked_trials(study)[:5]]
    out.print(ui.trials_table(rows, f"Best trials of {study.study_name}", config.flops,
                              base_accuracy=base.get("evaluated_accuracy"), latency=config.latency))
    storage_flag = "" if args.storage is None else f" --storage '{where}'"
    if best is None:
        more = sampled_finished(study) + config.n_trials
        what = f"the FLOPs target {config.flops:g}" + (f" and the latency target {config.latency:g}" if config.latency else "")
        out.print(f"No trial is at or under {what} yet; continue the study with --n-trials {more}.")
    else:
        out.print(ui.best_plan(best, measured.get(best.number)))
        out.print(f"Export it:   search export {study.study_name}{storage_flag} -o plan.json")
    out.print(f"Dashboard:   search dashboard{storage_flag}")
    return 0


def _interrupted(args: argparse.Namespace, config: Any) -> int:
    """Ctrl-C: the running trial was marked failed as interrupted; print the study so far; exit 130."""
    import optuna

    from .present import ui
    from .study.results import trial_summary
    from .study.storage import load_study, open_storage, resolve_storage

    out, err = _consoles()
    err.print("search: interrupted; the running trial is marked failed. Run the same command to resume.")
    try:
        name = args.study_name or config.default_study_name()
        study = load_study(open_storage(resolve_storage(args.storage, create=False)), name)
    except Exception:  # nothing was created yet
        return 130
    rows = [trial_summary(t) for t in study.get_trials(deepcopy=False)
            if t.state != optuna.trial.TrialState.WAITING]
    if args.json:
        _print_json({"study": study.study_name, "interrupted": True, "trials": rows})
    else:
        out.print(ui.trials_table(rows, f"Trials of {study.study_name} so far", config.flops))
    return 130


def cmd_studies(args: argparse.Namespace) -> int:
    from .present import ui
    from .study.results import list_studies
    from .study.storage import open_storage, redact, resolve_storage

    url = resolve_storage(args.storage, create=False)
    rows = list_studies(open_storage(url))
    if args.json:
        _print_json(rows)
        return 0
    out, _ = _consoles()
    if not rows:
        out.print(f"No studies in {redact(url)} yet. Start one with: search run --flops 0.35")
        return 0
    out.print(ui.studies_table(rows, redact(url)))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .present import ui
    from .study.results import best_trial, target_of, trial_summary
    from .study.storage import load_study, open_storage, resolve_storage
    from .study.tables import Store

    if args.plot:
        from .present.plots import check_plot_path

        check_plot_path(args.plot)
    url = resolve_storage(args.storage, create=False)
    study = load_study(open_storage(url), args.study_name)
    record = StudyRecord.from_study(study)
    measured = record.measured_latency()
    rows = [trial_summary(t, measured) for t in study.get_trials(deepcopy=False)]
    best = best_trial(study)
    target = target_of(study)
    if args.plot:
        from .present.plots import accuracy_flops_plot

        points = [(r["flops_ratio"], r["top1"], bool(r["feasible"]), r["number"]) for r in rows
                  if r["state"] == "complete" and r["flops_ratio"] is not None]
        accuracy_flops_plot(points, target, args.plot, title=study.study_name)
    if args.json:
        store = Store(url)
        layers = [
            {k: getattr(r, k) for k in ("trial_number", "layer", "op", "keep", "merge_keep", "merge_threshold",
                                         "prune_threshold", "kept_tokens", "heads", "mlp_hidden")}
            for r in store.layers(study)
        ]
        store.dispose()
        _print_json({"study": study.study_name, "target_flops_ratio": target,
                     "target_latency_ratio": record.latency_target, "latency_checks": record.latency_checks or [],
                     "config": record.config, "base": record.base,
                     "trials": rows, "best_trial": None if best is None else best.number, "layers": layers})
        return 0
    out, _ = _consoles()
    out.print(ui.trials_table(rows, f"Trials of {study.study_name}", target,
                              base_accuracy=(record.base or {}).get("evaluated_accuracy"), latency=record.latency_target))
    out.print(ui.best_plan(best, None if best is None else measured.get(best.number)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .present import ui
    from .study.plans import export_plan
    from .study.results import accuracy_of
    from .study.storage import open_storage, resolve_storage

    from ltmp_core import LTMPError

    output = Path(args.output)
    if output.exists() and not args.force:
        raise LTMPError(f"-o: {output} exists; pass --force to overwrite it")
    if not output.parent.is_dir():
        raise LTMPError(f"-o: no folder {output.parent} (create it first)")
    url = resolve_storage(args.storage, create=False)
    path, plan, trial = export_plan(open_storage(url), args.study_name, args.output, args.trial, args.flops)
    if args.json:
        _print_json({"path": str(path), "trial": trial.number, "plan": plan.to_dict()})
        return 0
    out, _ = _consoles()
    latency = ""
    if plan.meta.get("predicted_latency_ratio") is not None:
        latency = f", latency ratio {ui.num(plan.meta['predicted_latency_ratio'])} predicted"
        if plan.meta.get("measured_latency_ratio") is not None:
            latency += f", {ui.num(plan.meta['measured_latency_ratio'])} measured"
    out.print(f"Wrote {path}: trial {trial.number} of {args.study_name}, top-1 {ui.pct(accuracy_of(trial))}, "
              f"FLOPs ratio {ui.num(TrialRecord.from_trial(trial).flops_ratio)}{latency}.")
    out.print("Apply it:    ltmp_core.apply_plan(model, ltmp_core.load_plan(%r), mode='dynamic')" % str(path))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from ltmp_core import LTMPError

    from .study.storage import redact, resolve_storage
    from .study.run import delete_study

    url = resolve_storage(args.storage, create=False)

    def confirm(trials: int) -> bool:
        if args.yes:
            return True
        if not sys.stdin.isatty():
            raise LTMPError(f"--yes: not a terminal, so nothing can be asked; pass --yes to delete "
                            f"{args.study_name!r}")
        answer = input(f"Delete study {args.study_name!r} ({trials} trials) from {redact(url)}? [y/N] ")
        return answer.strip().lower() in ("y", "yes")

    removed = delete_study(url, args.study_name, args.artifacts, confirm=confirm)
    if removed is None:
        sys.stderr.write("search: nothing deleted\n")
        return 1
    if args.json:
        _print_json({"study": args.study_name, "deleted": removed})
        return 0
    out, _ = _consoles()
    out.print(f"Deleted study {args.study_name!r}: {removed['trials']} trials, {removed['layer_rows']} layer rows, "
              f"{removed['pictures']} pictures.")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    import ltmp_core

    from .setup.config import TrainSettings
    from .setup.config import plan_config

    given = {f.name: getattr(args, f"train_{f.name}") for f in dataclasses.fields(TrainSettings)}
    settings = TrainSettings(**{k: v for k, v in given.items() if v is not None})
    plan = ltmp_core.load_plan(args.plan)
    model_settings = _settings(args, "model")
    config = plan_config(plan, args.preset, model_settings)

    from .present import ui
    from .train.loop import train

    out, err = _consoles()
    display = ui.TrainDisplay(err, quiet=args.quiet or args.json)
    try:
        result = train(args.plan, config, settings, args.output, resume=args.resume,
                       model_given=model_settings.get("model") is not None, on_start=display.start,
                       on_step=display.step, on_epoch=display.epoch)
    except KeyboardInterrupt:
        display.close()
        err.print(f"search: interrupted; {args.output} keeps its last checkpoint. Add --resume to the same command "
                  "to continue.")
        return 130
    finally:
        display.close()
    f = result.final
    if not f:  # a rank other than 0 of a distributed run
        return 0
    if args.json:
        _print_json({"output": str(result.out), "epochs": result.epochs, "steps": result.steps,
                     "resumed_at": result.resumed_at, "history": result.history, **f})
        return 0
    drop = "" if f.get("base_test_top1") is None else f" (unreduced {ui.pct(f['base_test_top1'], 2)})"
    out.print(f"Trained {args.plan} ({f['recipe']}, {result.epochs} epoch(s), {result.steps} steps) -> "
              f"{result.out}/model.safetensors")
    out.print(f"  select: top-1 {ui.pct(f['select_top1'], 2)} at a FLOPs ratio of {f['select_flops_ratio']:.3f}"
              + ("" if f.get("search_top1") is None else f" (search: {ui.pct(f['search_top1'], 2)})"))
    out.print(f"  test:   top-1 {ui.pct(f['test_top1'], 2)}{drop}, top-5 {ui.pct(f['test_top5'], 2)}, FLOPs ratio "
              f"{f['test_flops_ratio']:.3f} (target {f['target_flops_ratio']:g})")
    out.print(f"Validate it: search validate {result.out}/model.safetensors")
    out.print(f"Deploy it:   search export-model {result.out}/model.safetensors --static -o model.pt2")
    return 0


def cmd_export_model(args: argparse.Namespace) -> int:
    from ltmp_core import LTMPError

    if not args.static:
        raise LTMPError("--static: only the static mode (fixed token counts) can be exported; add --static")
    output = Path(args.output)
    if output.exists() and not args.force:
        raise LTMPError(f"-o: {output} exists; pass --force to overwrite it")
    if not output.parent.is_dir():
        raise LTMPError(f"-o: no folder {output.parent} (create it first)")
    if args.batch_size < 1:
        raise LTMPError(f"-b: must be >= 1, got {args.batch_size}")
    from .deploy.program import export_static

    facts = export_static(args.model, output, batch_size=args.batch_size, dynamic_batch=not args.fixed_batch)
    if args.json:
        _print_json(facts)
        return 0
    out, _ = _consoles()
    batches = "any batch size" if facts["dynamic_batch"] else f"batch size {facts['batch_size']}"
    out.print(f"Wrote {output}: {facts['model']} in static mode ({facts['flops_ratio']:.3f} of the FLOPs, "
              f"{batches}). Load it with torch alone: torch.export.load({str(output)!r}).module()")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .setup.config import plan_config
    from .deploy.validate import read_any, validate_plan

    plan, trained = read_any(args.plan)
    given, preset = _settings(args, "model"), args.preset
    if trained is not None:  # a trained model: its own data settings and weights unless the flags say more
        trained = dict(trained)
        preset = preset or trained.pop("preset", None)
        trained.pop("preset", None)
        for key, value in trained.items():
            if given.get(key) is None:
                given[key] = value
    config = plan_config(plan, preset, given)
    result = validate_plan(plan, config, split=args.split, mode=args.mode, compile=args.compile,
                           name=str(args.plan))
    out, err = _consoles()
    if result["geometry_note"]:
        err.print(f"warning: {result['geometry_note']}")
    if args.json:
        _print_json(result)
        return 0
    if result["skipped_images"]:
        err.print(f"warning: skipped {len(result['skipped_images'])} unreadable image(s), "
                  f"e.g. {result['skipped_images'][0]}")
    out.print(f"{result['plan']} on {result['data']} ({result['split']}, {result['images']} images, "
              f"{result['mode']} mode, {result['device']}):")
    out.print(f"  top-1 {result['top1'] * 100:.2f}%   top-5 {result['top5'] * 100:.2f}%   (unreduced: top-1 "
              f"{result['base_top1'] * 100:.2f}%, top-5 {result['base_top5'] * 100:.2f}%; top-1 drop "
              f"{result['top1_drop'] * 100:.2f} points)")
    out.print(f"  {result['gmacs']:.4g} GMACs per image (FLOPs as MACs), {result['flops_ratio']:.3f} of the unreduced "
              f"model; {result['images_per_s']:.1f} images/s")
    if result.get("target_flops_ratio") is not None:
        where = "at or under" if result["within_target"] else "OVER"
        out.print(f"  {where} the plan's FLOPs target {result['target_flops_ratio']:g} (aim "
                  f"{result['aim']:.3f}, margin {result['flops_margin']:g})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .present import ui
    from .deploy.bench import bench_command

    out, _ = _consoles()
    if args.history:
        from .study.storage import resolve_storage
        from .study.tables import Store

        store = Store(resolve_storage(args.storage, create=False))
        rows = store.bench_history()
        store.dispose()
        if args.json:
            for row in rows:
                sys.stdout.write(json.dumps(row) + "\n")
        else:
            out.print(ui.bench_table(rows, "search bench --history"))
        return 0

    def row_out(row: dict[str, Any]) -> None:
        if args.json:
            sys.stdout.write(json.dumps(row) + "\n")
            sys.stdout.flush()

    label, rows = bench_command(
        args.plan, model=args.model, model_kwargs=args.model_kwargs, flops=args.flops, op=args.op,
        importance=args.importance, batch_sizes=args.batch_size, modes=list(args.mode), device=args.device,
        amp=args.amp, warmup=args.warmup, runs=args.runs, compile=args.compile, storage=args.storage, on_row=row_out)
    if not args.json:
        out.print(ui.bench_table(rows, f"search bench: {label}"))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .present.dashboard import run_dashboard
    from .study.storage import redact, resolve_storage

    url = resolve_storage(args.storage, create=False)
    _, err = _consoles()

    def started(pictures: Any) -> None:
        err.print(f"optuna-dashboard for {redact(url)} (pictures in {pictures}): "
                  f"http://{args.host}:{args.port}/dashboard  (Ctrl-C to stop)")

    run_dashboard(url, args.host, args.port, args.artifacts, on_start=started)
    return 0


COMMANDS = {"run": cmd_run, "studies": cmd_studies, "show": cmd_show, "export": cmd_export,
            "delete": cmd_delete, "validate": cmd_validate, "train": cmd_train, "export-model": cmd_export_model,
            "bench": cmd_bench, "dashboard": cmd_dashboard}


def main(argv: Sequence[str] | None = None) -> int:
    from . import exit_without_final_collection

    exit_without_final_collection()  # a Ctrl-C must end the process in seconds, also on a loaded host
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "format", None) == "json":
        args.json = True
    if args.command is None:
        parser.print_help()
        return 0
    from ltmp_core import LTMPError

    try:
        return COMMANDS[args.command](args)
    except LTMPError as e:
        sys.stderr.write(f"search: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("search: interrupted\n")
        return 130
    except BrokenPipeError:  # the reader of our output went away (| head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
