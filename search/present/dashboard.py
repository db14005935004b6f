"""What optuna-dashboard shows of a study: notes, and pictures in a file artifact store.

Every finished trial gets a markdown note (its plan, layer by layer) and two artifacts: a token map
of a few held-out images and a chart of kept tokens per layer against the budget. The study gets a
note with its target, model, data and best trial. Pictures live in a file artifact store beside the
database (``<db>-artifacts/`` for a SQLite file, ``studies/artifacts/`` otherwise, or ``--artifacts``).
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path
from typing import Any

import optuna
import torch.nn as nn
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

import ltmp_core
from ltmp_core import LTMPError

from ..setup.data import StudyData
from .plots import kept_tokens_chart, token_map
from ..study.record import StudyRecord, TrialRecord
from ..study.results import accuracy_of, ranked_trials
from ..study.storage import open_storage, sqlite_file
from .ui import num, plan_columns, plan_rows

__all__ = ["artifact_dir", "DashboardStorage", "TrialRecorder", "recorder_for", "plan_note", "save_study_note", "run_dashboard"]

#: The system attribute in which optuna-dashboard 0.21 looks for a trial's constraints (a list; Optuna
#: 5 keeps them under names, read here through ``FrozenTrial.constraints``).
LEGACY_CONSTRAINTS = "constraints"

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
              target: float, seed_of: str | None = None) -> str:
    """The trial's note: a markdown table of its plan with learned thresholds and kept tokens; a
    seeded trial says whose plan it runs."""
    lines = [
        f"## Trial {trial_number}" + (f": the {seed_of}, seeded (a published method's operations per layer, tuned and scored with this study's recipe)" if seed_of else ""),
        "",
        f"Top-1 **{100 * accuracy:.2f}%** at a measured FLOPs ratio of **{ratio:.3f}** "
        f"({'feasible: at or under' if ratio <= target else 'over'} the target {target:g}). FLOPs are MACs.",
        "",
        "| " + " | ".join(plan_columns(plan)) + " |",
        "|" + "---|" * len(plan_columns(plan)),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in plan_rows(plan, kept)]
    lines += ["", f"Pictures: `{TOKEN_MAP}` (the tokens after every reducing block: merged patches share their "
              f"mean colour inside one outline, pruned patches are dimmed, squeezed ones marked) and `{KEPT_CHART}`."]
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
                save_note(trial, plan_note(trial.number, plan, kept, accuracy, ratio, target,
                                           TrialRecord.from_trial(trial).seed_of))
            ltmp_core.set_mode(model, mode)
            trace = ltmp_core.trace_tokens(model, self.inputs)
            g = plan["geometry"]
            a = {"kept_tokens": kept}
            with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                path = Path(tmp) / TOKEN_MAP
                token_map(self.display, trace, ops=[layer["op"] for layer in plan["layers"]]).save(path)
                upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial)
                path = Path(tmp) / KEPT_CHART
                kept_tokens_chart(a["kept_tokens"], [layer["keep"] for layer in plan["layers"]], g["num_patches"],
                                  g["num_prefix_tokens"], [layer["op"] for layer in plan["layers"]], str(path))
                upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial)
        except Exception as e:  # a picture must never cost a trial its result
            TrialRecord.write(trial, artifact_error=f"{type(e).__name__}: {e}"[:300])


def recorder_for(directory: Path | None) -> Any:
    """What :meth:`search.study.objective.Objective.open` calls to record trials' pictures in ``directory``
    (``None``: no pictures)."""
    if directory is None:
        return None
    return lambda data: TrialRecorder(data, directory)


def save_study_note(study: optuna.Study, best: optuna.trial.FrozenTrial | None) -> None:
    """The study's note: target, model, data, base model and best feasible trial."""
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return

    record = StudyRecord.from_study(study)
    config, base = record.config or {}, record.base or {}
    target = record.target
    lines = [
        f"# {study.study_name}",
        "",
        f"Target: measured FLOPs at most **{target}** of the unreduced model's "
        f"({record.unreduced_gmacs or 0:.4g} GMACs per image; FLOPs are MACs).",
        f"Model: `{config.get('model')}` ({base.get('source', '?')}); unreduced select-split top-1 "
        f"{100 * base.get('evaluated_accuracy', 0):.2f}%.",
        f"Data: `{config.get('data')}`, {config.get('holdout')} select images score every trial. "
        f"Space: `{config.get('space')}`, sampler `{config.get('sampler')}`, pruner `{config.get('pruner')}`.",
        "",
    ]
    if base.get("random_weights"):
        lines += ["**Warning: the base model has random weights** (no `--pretrained` or `--checkpoint`): every "
                  "accuracy here is an untrained model's.", ""]
    if record.latency_target is not None:
        lines += [f"Latency target: the plan's time at most **{record.latency_target}** of the unreduced model's "
                  f"(batch {config.get('latency_batch')}, {config.get('latency_mode')} mode), predicted per trial "
                  "(user attribute `predicted_latency_ratio`) by the latency model of the device.", ""]
        if record.latency_checks:
            lines += ["| trial | predicted | measured | error | feasible | device |", "|---|---|---|---|---|---|"]
            for c in record.latency_checks:
                error = "-" if c["error"] is None else f"{100 * c['error']:+.1f}%"
                lines.append(f"| {c['trial']} | {num(c['predicted'])} | {num(c['measured'])} | {error} | "
                             f"{'yes' if c['feasible'] else 'no'} | {c['device']} |")
            lines.append("")
    if best is None:
        lines.append("No feasible trial yet.")
    else:
        lines.append(f"Best feasible trial: **{best.number}**, top-1 {100 * accuracy_of(best):.2f}% at a FLOPs ratio of "
                     f"{num(TrialRecord.from_trial(best).flops_ratio)}. Export it with "
                     f"`search export {study.study_name} -o plan.json`.")
    save_note(study, "\n".join(lines))


class DashboardStorage(optuna.storages.RDBStorage):
    """The study's storage as optuna-dashboard 0.21 should read it, so that it agrees with ``search export``.

    - The dashboard takes a trial's constraints from the legacy system attribute ``constraints`` (a
      list) only, not Optuna 5's ``constraints:<name>``: trials are handed to it with the list filled
      in, so infeasible trials are marked and left out of the history plot's best line.
    - Its "Best Trial" is ``storage.get_best_trial``, which ignores constraints: here it is the first
      trial of :func:`search.study.results.ranked_trials` (the best feasible one, as ``search export``
      picks; the most accurate one when none is feasible).

    Reads only: nothing is written back, so studies made by older versions show the same way.
    """

    def get_trial(self, trial_id: int) -> optuna.trial.FrozenTrial:
        return _legacy_constraints(super().get_trial(trial_id))

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Any = None) -> list[optuna.trial.FrozenTrial]:
        return [_legacy_constraints(t) for t in super().get_all_trials(study_id, deepcopy=deepcopy, states=states)]

    def get_best_trial(self, study_id: int) -> optuna.trial.FrozenTrial:
        study = optuna.load_study(study_name=self.get_study_name_from_id(study_id), storage=self)
        if len(study.directions) > 1:
            return super().get_best_trial(study_id)
        ranked = ranked_trials(study)
        if not ranked:
            raise ValueError("no trial is complete yet")
        return _legacy_constraints(ranked[0])


def _legacy_constraints(trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    """A copy of ``trial`` whose constraints are also in the legacy list attribute."""
    named = trial.constraints
    if not named or LEGACY_CONSTRAINTS in trial.system_attrs:
        return trial
    out = copy.copy(trial)
    out.system_attrs = {**trial.system_attrs, LEGACY_CONSTRAINTS: [named[k] for k in sorted(named)]}
    return out


def run_dashboard(url: str, host: str, port: int, artifacts: str | None, on_start: Any = None) -> None:
    """Serve optuna-dashboard for the studies at ``url`` with their pictures, until Ctrl-C."""
    try:
        import optuna_dashboard
    except ImportError:
        raise LTMPError("dashboard: optuna-dashboard is not installed; pip install 'ltmp-search[dashboard]'") from None
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: only a listener blocks
        try:
            probe.bind((host, port))
        except OSError as e:
            raise LTMPError(f"--port: cannot listen on {host}:{port} ({e.strerror or e}); pass another --port") from None
    storage = open_storage(url, cls=DashboardStorage)
    pictures = artifact_dir(url, artifacts)
    pictures.mkdir(parents=True, exist_ok=True)
    if on_start is not None:
        on_start(pictures)
    optuna_dashboard.run_server(storage, host=host, port=port, artifact_store=FileSystemArtifactStore(str(pictures)))
