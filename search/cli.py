"""The ``search`` command line: parse, call the library, render, return an exit code.

Mistakes a user can make (bad flags, unknown studies, unreachable storage, invalid plans) end with
one line on stderr and exit code 2; Ctrl-C ends with exit code 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Sequence

from . import __version__


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _target(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a FLOPs ratio in (0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"expected a FLOPs ratio in (0, 1], got {text!r}")
    return value


def _ops(text: str) -> tuple[str, ...]:
    return tuple(op.strip() for op in text.split(",") if op.strip())


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


def _model_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--model", help="timm model name")
    g.add_argument("--model-kwargs", nargs="+", type=_kwarg, metavar="KEY=VALUE",
                   help="extra arguments for timm.create_model, e.g. patch_size=8 depth=4")
    g.add_argument("--pretrained", action="store_true", default=None, help="timm's pretrained weights (needs network)")
    g.add_argument("--checkpoint", help="local weights (.pth/.pt/.safetensors; timm, DeiT or LTMP checkpoints)")
    g.add_argument("--data-dir", dest="data", help="ImageNet-layout folder (train/<class>/..., val/<class>/...) or 'digits'")
    g.add_argument("--img-size", type=int)
    g.add_argument("-b", "--batch-size", type=int)
    g.add_argument("--holdout", type=int, help="held-out images carved from train/ that score the trials")
    g.add_argument("--workers", type=int, help="DataLoader workers (default: cores - 1, at most 8)")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default on CUDA)")


MODEL_FIELDS = ("model", "model_kwargs", "pretrained", "checkpoint", "data", "img_size", "batch_size", "holdout",
                "workers", "device", "amp")


def _storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="database URL (default: $OPTUNA_STORAGE, else sqlite:///studies/search.db)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="search", description="Search where and how to cut tokens in a vision transformer.")
    parser.add_argument("--version", action="version", version=f"ltmp-search {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="run (or resume) a search", description=(
        "Run an Optuna study: every trial samples per-layer operations and budgets under the FLOPs target, "
        "tunes the learned thresholds briefly and scores the plan on held-out images with tokens removed. "
        "Re-running the same command resumes the study."))
    run.add_argument("--flops", type=_target, help="target FLOPs ratio, e.g. 0.35 = at most 35%% of the unreduced model's")
    run.add_argument("--study", dest="preset", help="preset name (e.g. digits) or path of a preset TOML file")
    g = run.add_argument_group("model and data (timm style)")
    _model_options(g)
    g.add_argument("--trial-images", type=int, help="cap on the images a trial tunes its thresholds on")
    g = run.add_argument_group("search (Optuna style)")
    g.add_argument("--space", help="search space: layerwise (default), or a baseline: ltmp, tome, tps")
    g.add_argument("--ops", type=_ops, help="operations the layerwise space may use, comma-separated")
    g.add_argument("--importance", type=_ops, help="prune/squeeze scores: mean (LTMP, default), cls (class "
                   "token's attention: fused, faster), or mean,cls (the search chooses per layer)")
    g.add_argument("--sampler", help="tpe (default), nsga2, random or gp")
    g.add_argument("--pruner", help="median (default), hyperband or none")
    g.add_argument("--n-trials", type=int, help="finished trials the study should have")
    g.add_argument("--seed", type=int)
    g.add_argument("--trial-steps", type=int, help="threshold-tuning steps per trial")
    g.add_argument("--budget", choices=("space", "layer", "global"),
                   help="budget term while tuning: each layer against its budget, LTMP's global FLOPs term, "
                        "or the space's choice (default; layer for layerwise)")
    g.add_argument("--distill", action="store_true", default=None, help="tune against the unreduced model's logits")
    g.add_argument("--study-name")
    _storage_options(g)
    run.add_argument("--artifacts", help="folder of the dashboard pictures (default: beside a SQLite file, "
                     "else studies/artifacts)")
    run.add_argument("--jobs", type=int, default=1, help="worker processes on this machine sharing the study "
                     "(workers on other machines join with the same --storage and --study-name)")
    run.add_argument("--quiet", action="store_true", help="no progress, only the result")
    run.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("studies", help="list the studies in a storage")
    _storage_options(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("show", help="trials and best plan of a study")
    p.add_argument("study_name", metavar="STUDY")
    p.add_argument("--plot", metavar="FILE.png", help="draw top-1 against measured FLOPs of every trial")
    _storage_options(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="write the best feasible plan (or --trial N) as JSON")
    p.add_argument("study_name", metavar="STUDY")
    p.add_argument("--trial", type=int, help="export this trial instead of the best feasible one")
    p.add_argument("-o", "--output", default="plan.json", help="output file (default: plan.json)")
    _storage_options(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("validate", help="top-1/top-5 and measured FLOPs of a plan on a data split", description=(
        "Apply a plan to its base model and report top-1, top-5 and the measured FLOPs (MACs) on a split: "
        "val/ of an ImageNet-layout folder, or the held-out split a search scored its trials on."))
    p.add_argument("plan", metavar="PLAN.json")
    p.add_argument("--study", dest="preset", help="preset whose model and data settings to use (default: digits)")
    p.add_argument("--split", default="val", choices=("val", "holdout"))
    p.add_argument("--mode", choices=("dynamic", "static"),
                   help="dynamic (learned thresholds, default when the plan has them) or static (fixed counts)")
    p.add_argument("--compile", action="store_true", help="torch.compile the static model")
    _model_options(p.add_argument_group("model and data (timm style)"))
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="images/s and latency of a plan against its unreduced model", description=(
        "Time the unreduced model and the plan side by side on random images (warm-up, then the median of "
        "several runs), with the measured FLOPs ratio, the speedup and the speedup as a fraction of the "
        "FLOP-ideal 1/ratio. Results are stored in the database and listed by --history."))
    p.add_argument("plan", nargs="?", metavar="PLAN.json", help="an exported plan (or give --model and --flops)")
    p.add_argument("--model", help="timm model for a quick look without a plan")
    p.add_argument("--model-kwargs", nargs="+", type=_kwarg, metavar="KEY=VALUE")
    p.add_argument("--flops", type=_target, help="with --model: a plan at this FLOPs ratio")
    p.add_argument("--op", default="merge+prune", help="with --model: the op of every block (default merge+prune)")
    p.add_argument("--importance", default="cls", choices=("mean", "cls"),
                   help="with --model: prune/squeeze scores (default cls: fused attention)")
    p.add_argument("-b", "--batch-size", default="32", help="batch size, or several: 1,32")
    p.add_argument("--mode", default="static", help="static, dynamic, or both: static,dynamic")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (static mode)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--history", action="store_true", help="list stored measurements instead")
    _storage_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object per measured configuration")

    p = sub.add_parser("dashboard", help="open the studies in optuna-dashboard")
    _storage_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--artifacts", help="folder of the pictures (default: as search run)")
    return parser


def _consoles():
    from rich.console import Console

    # soft_wrap: sentences stay one line (pipes, logs); tables fit the terminal, or 160 columns in a log.
    width = None if sys.stdout.isatty() else 160
    return Console(soft_wrap=True, width=width), Console(stderr=True, soft_wrap=True)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def cmd_run(args: argparse.Namespace) -> int:
    import optuna

    from . import ui
    from .config import resolve
    from .study import FINISHED, best_trial, redact, run, trial_summary

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    overrides = {k: getattr(args, k) for k in MODEL_FIELDS + (
        "flops", "trial_images", "space", "ops", "importance", "sampler", "pruner", "n_trials", "seed", "trial_steps", "budget",
        "distill")}
    if overrides["model_kwargs"] is not None:
        overrides["model_kwargs"] = dict(overrides["model_kwargs"])
    config = resolve(args.preset, overrides)
    out, err = _consoles()
    display = ui.RunDisplay(err, config.n_trials, config.trial_steps, quiet=args.quiet or args.json)

    def trial_end(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        display.trial_end(study, trial)
        if display.progress is not None:
            display.progress.update(display.trials, completed=len(study.get_trials(deepcopy=False, states=FINISHED)))

    try:
        with display:
            result = run(config, storage=args.storage, study_name=args.study_name, jobs=args.jobs, artifacts=args.artifacts,
                         hooks=display.hooks(), on_base_epoch=display.base_epoch, on_trial_end=trial_end)
    except KeyboardInterrupt:
        return _interrupted(args, config)
    study = result.study
    best = best_trial(study)
    where = redact(result.storage_url)
    if result.skipped:
        err.print(f"warning: skipped {len(result.skipped)} unreadable image(s), e.g. {result.skipped[0]}")
    if args.json:
        _print_json({
            "study": study.study_name, "storage": where, "target_flops_ratio": config.flops,
            "new_trials": result.new_trials, "base": result.base,
            "best": None if best is None else {**trial_summary(best), "plan": best.user_attrs.get("plan")},
        })
        return 0
    if not result.new_trials:
        out.print(f"Study {study.study_name!r} already has {result.finished_before} finished trials "
                  f"(--n-trials {config.n_trials}); nothing to run. Raise --n-trials to continue it.")
    base = result.base
    if base.get("evaluated_accuracy") is not None:
        out.print(f"Unreduced base model ({base.get('model')}): top-1 {100 * base['evaluated_accuracy']:.1f}% "
                  f"on {config.holdout} held-out images, {study.user_attrs.get('unreduced_gmacs', 0):.4f} GMACs.")
    trials = sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                    key=lambda t: (not t.user_attrs.get("feasible"), -(t.value or 0)))
    out.print(ui.trials_table([trial_summary(t) for t in trials[:5]], f"Best trials of {study.study_name}", config.flops))
    storage_flag = "" if args.storage is None else f" --storage '{where}'"
    if best is None:
        more = len(study.get_trials(deepcopy=False, states=FINISHED)) + config.n_trials
        out.print(f"No trial is at or under the FLOPs target {config.flops:g} yet; continue the study with "
                  f"--n-trials {more}.")
    else:
        out.print(ui.plan_table(best.user_attrs["plan"], best.user_attrs.get("kept_tokens"),
                                f"Best plan: trial {best.number}, top-1 {100 * best.value:.1f}%, "
                                f"FLOPs ratio {best.user_attrs['flops_ratio']:.3f}"))
        out.print(f"Export it:   search export {study.study_name}{storage_flag} -o plan.json")
    out.print(f"Dashboard:   search dashboard{storage_flag}")
    return 0


def _interrupted(args: argparse.Namespace, config: Any) -> int:
    """Ctrl-C: the running trial was marked failed as interrupted; print the study so far; exit 130."""
    import optuna

    from . import ui
    from .study import load_study, open_storage, resolve_storage, trial_summary

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
    from . import ui
    from .study import list_studies, open_storage, redact, resolve_storage

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
    from . import ui
    from .store import Store
    from .study import best_trial, load_study, open_storage, resolve_storage, trial_summary

    url = resolve_storage(args.storage, create=False)
    study = load_study(open_storage(url), args.study_name)
    rows = [trial_summary(t) for t in study.get_trials(deepcopy=False)]
    best = best_trial(study)
    target = study.user_attrs.get("target_flops_ratio")
    if args.plot:
        from .plots import accuracy_flops_plot

        points = [(r["flops_ratio"], r["accuracy"], bool(r["feasible"]), r["number"]) for r in rows
                  if r["state"] == "complete" and r["flops_ratio"] is not None]
        accuracy_flops_plot(points, target, args.plot, title=study.study_name)
    if args.json:
        store = Store(url)
        layers = [
            {k: getattr(r, k) for k in ("trial_number", "layer", "op", "keep", "merge_keep", "merge_threshold",
                                         "prune_threshold", "kept_tokens")}
            for r in store.layers(study.study_name)
        ]
        store.dispose()
        _print_json({"study": study.study_name, "target_flops_ratio": target,
                     "config": study.user_attrs.get("config"), "base": study.user_attrs.get("base"),
                     "trials": rows, "best_trial": None if best is None else best.number, "layers": layers})
        return 0
    out, _ = _consoles()
    out.print(ui.trials_table(rows, f"Trials of {study.study_name}", target))
    if best is None:
        out.print("No feasible trial yet.")
    else:
        out.print(ui.plan_table(best.user_attrs["plan"], best.user_attrs.get("kept_tokens"),
                                f"Best plan: trial {best.number}, top-1 {100 * best.value:.1f}%, "
                                f"FLOPs ratio {best.user_attrs['flops_ratio']:.3f}"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_plan
    from .study import open_storage, resolve_storage

    url = resolve_storage(args.storage, create=False)
    path, plan, trial = export_plan(open_storage(url), args.study_name, args.output, args.trial)
    if args.json:
        _print_json({"path": str(path), "trial": trial.number, "plan": plan.to_dict()})
        return 0
    out, _ = _consoles()
    out.print(f"Wrote {path}: trial {trial.number} of {args.study_name}, top-1 {100 * trial.value:.1f}%, "
              f"FLOPs ratio {trial.user_attrs.get('flops_ratio', float('nan')):.3f}.")
    out.print("Apply it:    ltmp_core.apply_plan(model, ltmp_core.load_plan(%r), mode='dynamic')" % str(path))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .config import resolve
    from .validate import validate_plan

    import ltmp_core

    plan = ltmp_core.load_plan(args.plan)
    overrides = {k: getattr(args, k) for k in MODEL_FIELDS}
    if overrides["model_kwargs"] is not None:
        overrides["model_kwargs"] = dict(overrides["model_kwargs"])
    if overrides["model"] is None and plan.model:  # the model the plan was searched on, at its size
        overrides["model"] = plan.model
        if overrides["img_size"] is None and plan.geometry is not None:
            overrides["img_size"] = plan.geometry.img_size[0]
    config = resolve(args.preset, overrides)
    result = validate_plan(plan, config, split=args.split, mode=args.mode, compile=args.compile,
                           name=str(args.plan))
    if result["geometry_note"]:
        _consoles()[1].print(f"warning: {result['geometry_note']}")
    if args.json:
        _print_json(result)
        return 0
    out, err = _consoles()
    if result["skipped_images"]:
        err.print(f"warning: skipped {len(result['skipped_images'])} unreadable image(s), "
                  f"e.g. {result['skipped_images'][0]}")
    out.print(f"{result['plan']} on {result['data']} ({result['split']}, {result['images']} images, "
              f"{result['mode']} mode, {result['device']}):")
    out.print(f"  top-1 {100 * result['top1']:.2f}%   top-5 {100 * result['top5']:.2f}%")
    out.print(f"  {result['gmacs']:.4g} GMACs per image (FLOPs as MACs), {result['flops_ratio']:.3f} of the unreduced "
              f"model; {result['images_per_s']:.1f} images/s")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import timm
    import torch

    import ltmp_core
    from ltmp_core import LTMPError

    from .bench import bench_plan
    from .store import Store
    from .study import resolve_device, resolve_storage

    out, err = _consoles()
    if args.history:
        store = Store(resolve_storage(args.storage, create=False))
        rows = store.bench_history()
        store.dispose()
        if args.json:
            for row in rows:
                sys.stdout.write(json.dumps(row) + "\n")
        else:
            out.print(_bench_table(rows, "search bench --history"))
        return 0
    kwargs = dict(args.model_kwargs or [])
    if args.plan:
        plan = ltmp_core.load_plan(args.plan)
        name = args.model or plan.model
        if not name:
            raise LTMPError("model: the plan names no model; give --model")
        label = str(args.plan)
    else:
        if not args.model or args.flops is None:
            raise LTMPError("bench: give PLAN.json, or --model and --flops for a quick look")
        name, plan, label = args.model, None, f"{args.model} {args.op} ({args.importance}) at {args.flops:g}"
    if not timm.is_model(name):
        raise LTMPError(f"model: unknown timm model {name!r}")
    geometry = plan.geometry if plan is not None else None
    if geometry is not None:
        kwargs.setdefault("num_classes", geometry.num_classes)
        kwargs.setdefault("img_size", geometry.img_size[0])
    import search.models  # noqa: F401  (registers ltmp_vit_digits)

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)  # speed does not depend on the weights
    if plan is None:
        g = ltmp_core.ViTGeometry.from_model(model)
        keeps = ltmp_core.budgets_for_ratio([args.op] * g.depth, [1.0] * g.depth, g, args.flops)
        plan = ltmp_core.make_plan(model, op=args.op, keep=keeps, importance=args.importance, model_name=name)
    device = resolve_device(args.device)
    amp = args.amp if args.amp is not None else device.type == "cuda"
    sizes = [int(b) for b in str(args.batch_size).split(",")]
    modes = [m.strip() for m in args.mode.split(",")]
    store = Store(resolve_storage(args.storage))
    rows = []
    for mode in modes:
        for batch in sizes:
            result = bench_plan(model, plan, batch_size=batch, device=device, mode=mode, amp=amp,
                                warmup=args.warmup, runs=args.runs, compile=args.compile)
            result = {"plan": label, **result}
            result["id"] = store.add_bench(label, result)
            rows.append(result)
            if args.json:
                sys.stdout.write(json.dumps(result) + "\n")
                sys.stdout.flush()
    store.dispose()
    if not args.json:
        out.print(_bench_table(rows, f"search bench: {label}"))
    return 0


def _bench_table(rows: list[dict[str, Any]], title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("plan", "device", "batch", "mode", "FLOPs ratio", "img/s base", "img/s plan", "ms base", "ms plan",
                "speedup", "of ideal"):
        table.add_column(col, justify="left" if col in ("plan", "device", "mode") else "right")
    for r in rows:
        table.add_row(str(r["plan"]), str(r["device"]), str(r["batch_size"]), r["mode"] + (" bf16" if r["amp"] else ""),
                      f"{r['flops_ratio']:.3f}", f"{r['images_per_s_base']:.1f}", f"{r['images_per_s_plan']:.1f}",
                      f"{r['latency_ms_base']:.1f}", f"{r['latency_ms_plan']:.1f}", f"{r['speedup']:.2f}x",
                      f"{r['ideal_fraction']:.2f}")
    table.caption = "FLOPs are MACs; 'of ideal' = speedup x FLOPs ratio (1.00 = as fast as the FLOPs say)"
    return table


def cmd_dashboard(args: argparse.Namespace) -> int:
    from ltmp_core import LTMPError

    from .study import open_storage, redact, resolve_storage

    try:
        import optuna_dashboard
    except ImportError:
        raise LTMPError("dashboard: optuna-dashboard is not installed; pip install 'ltmp-search[dashboard]'") from None
    from optuna.artifacts import FileSystemArtifactStore

    from .dashboard import artifact_dir

    url = resolve_storage(args.storage, create=False)
    storage = open_storage(url)
    pictures = artifact_dir(url, args.artifacts)
    pictures.mkdir(parents=True, exist_ok=True)
    _, err = _consoles()
    err.print(f"optuna-dashboard for {redact(url)} (pictures in {pictures}): "
              f"http://{args.host}:{args.port}/dashboard  (Ctrl-C to stop)")
    optuna_dashboard.run_server(storage, host=args.host, port=args.port,
                                artifact_store=FileSystemArtifactStore(str(pictures)))
    return 0


COMMANDS = {"run": cmd_run, "studies": cmd_studies, "show": cmd_show, "export": cmd_export,
            "validate": cmd_validate, "bench": cmd_bench, "dashboard": cmd_dashboard}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
