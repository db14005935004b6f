"""What optuna-dashboard shows of a study: notes, and pictures in a file artifact store.

Every finished trial gets a markdown note (its plan, layer by layer) and two artifacts: a token map
of a few held-out images and a chart of kept tokens per layer against the budget. The study gets a
note with its target, model, data and best trial. Pictures live in a file artifact store beside the
database (``<db>-artifacts/`` for a SQLite file, ``studies/artifacts/`` otherwise, or ``--artifacts``).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import optuna
import torch.nn as nn
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

import ltmp_core
from ltmp_core import LTMPError

from .data import StudyData
from .plots import kept_tokens_chart, token_map
from .results import accuracy_of, target_of
from .storage import sqlite_file
from .ui import PLAN_COLUMNS, num, plan_rows

__all__ = ["artifact_dir", "TrialRecorder", "plan_note", "save_study_note"]

TOKEN_MAP = "token-map.png"
KEPT_CHART = "kept-tokens.png"


def artifact_dir(url: str, override: str | None = None) -> Path:
    """The artifact folder of a storage: beside a SQLite file, else ``studies/artifacts`` here."""
    if override:
        return Path(override)
    db = sqlite_file(url)
    if db is not None:
        return db.with_name(f"{db.stem}-artifacts")
    return Path("studies/artifacts")


def plan_note(trial_number: int, plan: dict[str, Any], kept: list[float], accuracy: float, ratio: float,
              target: float) -> str:
    """The trial's note: a markdown table of its plan with learned thresholds and kept tokens."""
    lines = [
        f"## Trial {trial_number}",
        "",
        f"Top-1 **{100 * accuracy:.2f}%** at a measured FLOPs ratio of **{ratio:.3f}** "
        f"({'feasible: at or under' if ratio <= target else 'over'} the target {target:g}). FLOPs are MACs.",
        "",
        "| " + " | ".join(PLAN_COLUMNS) + " |",
        "|" + "---|" * len(PLAN_COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in plan_rows(plan, kept)]
    lines += ["", f"Pictures: `{TOKEN_MAP}` (one colour per group of patches merged into one token, grey with "
              f"a cross = pruned, white stripe = squeezed) and `{KEPT_CHART}`."]
    return "\n".join(lines)


class TrialRecorder:
    """Writes a finished trial's note and pictures; never fails the trial (errors are recorded)."""

    def __init__(self, data: StudyData, directory: Path, images: int = 3) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.store = FileSystemArtifactStore(str(directory))
        x, _ = next(iter(data.holdout_batches(images, limit=images)))
        self.inputs = x
        self.display = data.denormalize(x)

    def record(self, trial: optuna.Trial, model: nn.Module, mode: str, plan: dict[str, Any], kept: list[float],
               accuracy: float, ratio: float, target: float) -> None:
        try:
            try:
                from optuna_dashboard import save_note
            except ImportError:  # the dashboard extra is not installed: pictures only
                save_note = None
            if save_note is not None:
                save_note(trial, plan_note(trial.number, plan, kept, accuracy, ratio, target))
            ltmp_core.set_mode(model, mode)
            trace = ltmp_core.trace_tokens(model, self.inputs)
            g = plan["geometry"]
            a = {"kept_tokens": kept}
            with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                path = Path(tmp) / TOKEN_MAP
                token_map(self.display, trace).save(path)
                upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial)
                path = Path(tmp) / KEPT_CHART
                kept_tokens_chart(a["kept_tokens"], [layer["keep"] for layer in plan["layers"]], g["num_patches"],
                                  g["num_prefix_tokens"], [layer["op"] for layer in plan["layers"]], str(path))
                upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial)
        except Exception as e:  # a picture must never cost a trial its result
            trial.set_user_attr("artifact_error", f"{type(e).__name__}: {e}"[:300])


def save_study_note(study: optuna.Study, best: optuna.trial.FrozenTrial | None) -> None:
    """The study's note: target, model, data, base model and best feasible trial."""
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return

    config = study.user_attrs.get("config", {})
    base = study.user_attrs.get("base", {})
    target = target_of(study)
    lines = [
        f"# {study.study_name}",
        "",
        f"Target: measured FLOPs at most **{target}** of the unreduced model's "
        f"({study.user_attrs.get('unreduced_gmacs', 0):.4g} GMACs per image; FLOPs are MACs).",
        f"Model: `{config.get('model')}` ({base.get('source', '?')}); unreduced held-out top-1 "
        f"{100 * base.get('evaluated_accuracy', 0):.2f}%.",
        f"Data: `{config.get('data')}`, {config.get('holdout')} held-out images score every trial. "
        f"Space: `{config.get('space')}`, sampler `{config.get('sampler')}`, pruner `{config.get('pruner')}`.",
        "",
    ]
    if best is None:
        lines.append("No feasible trial yet.")
    else:
        lines.append(f"Best feasible trial: **{best.number}**, top-1 {100 * accuracy_of(best):.2f}% at a FLOPs ratio of "
                     f"{num(best.user_attrs.get('flops_ratio'))}. Export it with "
                     f"`search export {study.study_name} -o plan.json`.")
    save_note(study, "\n".join(lines))


def run_dashboard(url: str, host: str, port: int, artifacts: str | None, on_start: Any = None) -> None:
    """Serve optuna-dashboard for the studies at ``url`` with their pictures, until Ctrl-C."""
    try:
        import optuna_dashboard
    except ImportError:
        raise LTMPError("dashboard: optuna-dashboard is not installed; pip install 'ltmp-search[dashboard]'") from None
    from .storage import open_storage

    storage = open_storage(url)
    pictures = artifact_dir(url, artifacts)
    pictures.mkdir(parents=True, exist_ok=True)
    if on_start is not None:
        on_start(pictures)
    optuna_dashboard.run_server(storage, host=host, port=port, artifact_store=FileSystemArtifactStore(str(pictures)))
