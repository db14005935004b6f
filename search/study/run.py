"""``search run``: create or resume a study and run its trials, here or in ``--jobs`` worker processes.

The pieces live in their own modules: the storage (:mod:`search.study.storage`), samplers and pruners
(:mod:`search.study.samplers`), the device, data and base model (:mod:`search.setup.workbench`), one trial
(:mod:`search.study.objective`), the
trial loop and its workers (:mod:`search.study.worker`), and reading results back (:mod:`search.study.results`).
This module orders them so that everything a user can get wrong fails before anything is written.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
import torch
from optuna.trial import FrozenTrial

import ltmp_core
from ltmp_core import LTMPError, ViTGeometry
from spaces import get_space

from ..setup.config import StudyConfig, differences
from ..setup.timing import check_timeable
from .latency_study import check_latency, reaim_checked, study_latency_model, study_stride, time_best
from .objective import METRIC_NAME, METRIC_NAMES, Objective, TrialHooks
from .record import StudyRecord, TrialRecord
from .refine import refine_study
from .results import best_trial, sampled_finished
from .storage import open_storage, open_study, resolve_storage, sqlite_file
from .tables import Store
from ..setup.workbench import open_data, resolve_device
from .worker import ensure_slots, run_workers, work

__all__ = ["run", "RunResult", "delete_study"]


@dataclass
class RunResult:
    """What ``search run`` reports: the study, where it lives, and what this run added."""

    study: optuna.Study
    storage_url: str
    new_trials: list[int] = field(default_factory=list)
    base: dict[str, Any] = field(default_factory=dict)
    finished_before: int = 0
    #: Trials the refine stage added in this run (``--refine-top``).
    refined: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: With ``--latency``: the fingerprint of the device whose latency model predicted, and the trials
    #: this run timed for real (:func:`search.study.latency_study.check_latency`).
    latency_device: str | None = None
    latency_checks: list[dict[str, Any]] = field(default_factory=list)
    #: Trials this run added by re-aiming timed shapes (``--latency-reaim``).
    reaimed: list[int] = field(default_factory=list)


def _check_resume(storage: optuna.storages.BaseStorage, name: str, config: StudyConfig) -> None:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return
    saved = StudyRecord.from_study(study).config
    if not saved:
        return
    changed = differences(saved, config)
    if changed:
        detail = ", ".join(f"{k}={saved[k]!r} (now {getattr(config, k)!r})" for k in changed[:3])
        raise LTMPError(
            f"study: {name!r} was run with other settings ({detail}); use the same settings to resume it, "
            "or another --study-name"
        )


def run(
    config: StudyConfig,
    *,
    storage: str | None = None,
    study_name: str | None = None,
    jobs: int = 1,
    artifacts: str | None = None,
    hooks: TrialHooks | None = None,
    on_base_epoch: Callable[[int, int, float], None] | None = None,
    on_trial_end: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_refined: Callable[[FrozenTrial | None, FrozenTrial, str | None], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> RunResult:
    """Create or resume a study and run trials until it has ``config.n_trials`` finished ones.

    Everything a user can get wrong is checked before the database is touched. With ``jobs > 1``,
    that many worker processes share the study (see :mod:`search.study.worker`); workers on other
    machines join by running the same command against the same storage and study name.

    With ``config.refine_top``, the refine stage follows the trials (:mod:`search.study.refine`), under
    the study's lock, so two processes that finish together do not refine one shape twice;
    ``on_refined`` is told of each refined shape.

    With ``config.latency``, the study's latency model of this device is read (or measured) before the
    trials, and the best trials are timed for real after them (``on_note`` hears of both); with
    ``config.latency_reaim``, timed shapes far from the aim then run again, aimed by what they measured
    (:func:`search.study.latency_study.reaim_checked`), and are timed too.
    """
    from ..present.dashboard import artifact_dir, recorder_for, save_study_note

    if jobs < 1:
        raise LTMPError(f"--jobs: must be >= 1, got {jobs}")
    if config.latency is not None and config.device != "auto":
        check_timeable(torch.device(config.device))
    device = resolve_device(config.device)
    data = open_data(config, device)  # the data and model name are checked before the storage is touched
    url = resolve_storage(storage)
    name = study_name or config.default_study_name()
    pictures = artifact_dir(url, artifacts)

    def checked_storage() -> optuna.storages.RDBStorage:
        rdb = open_storage(url, config.heartbeat)
        _check_resume(rdb, name, config)
        return rdb

    # An existing store is checked before the base model loads (an unreachable server, or a resume
    # with other settings, fails at once); a new SQLite file is created only after it has loaded, so
    # a wrong checkpoint or unreachable pretrained weights leave no database behind.
    file = sqlite_file(url)
    rdb = checked_storage() if file is None or file.exists() else None
    objective = Objective.open(config, hooks, on_base_epoch, data=data, recorder=recorder_for(pictures))
    base_info = objective.bench.info
    if base_info.get("random_weights") and not config.random_weights and on_warning is not None:
        on_warning(f"{config.model} is searched with random weights (no --pretrained or --checkpoint): every "
                   "accuracy is an untrained model's. Pass --random-weights if that is intended.")
    if rdb is None:
        rdb = checked_storage()
    study = open_study(config, rdb, name)
    store = Store(url, write=True)
    store.clean_orphans({s.study_name for s in rdb.get_all_studies()})  # rows of studies other tools deleted
    first = None
    if StudyRecord.from_study(study).config is None:
        geometry = ViTGeometry.from_model(objective.base)
        study.set_metric_names(list(METRIC_NAMES) if config.flops_min is not None else [METRIC_NAME])
        # The plans the published methods use start the study (as far as the space has such seeds).
        first = get_space(config.space).seeded(geometry, config.ops, config.importance)
        first = first[: max(1, config.n_trials // 3)]
        StudyRecord.write(
            study, uid=uuid.uuid4().hex, config=config.to_dict(), unreduced_gmacs=ltmp_core.unreduced_macs(geometry) / 1e9,
            base={**base_info, "evaluated_accuracy": objective.base_accuracy()}, seed_trials=len(first))
    store.sync(study)
    result_device = None
    if config.latency is not None:
        latency_model = study_latency_model(study, objective.bench, config, on_measure=on_note)
        objective.use_latency(latency_model)
        result_device = latency_model.fingerprint
        objective.use_stride(study_stride(study, objective.geometry, config, latency_model, on_note))
    if first and objective.max_stride > 1:  # the published shapes reduce in every block of theirs
        first = [(name, {**params, "stage_stride": 1}) for name, params in first]
    finished = sampled_finished(study)
    if hooks is not None:
        hooks.on_study(finished)
    result = RunResult(study, url, base=StudyRecord.from_study(study).base or base_info, finished_before=finished,
                       latency_device=result_device)
    bench = objective.bench
    try:
        ensure_slots(study, store, config.n_trials, first)
        if jobs == 1:
            result.new_trials = work(study, objective, store, config.n_trials, on_trial_end)
        else:
            del objective
            result.new_trials = run_workers(config, url, name, jobs, study, on_trial_end, pictures)
            store.sync(study)
        opened: list[Objective] = [] if jobs > 1 else [objective]

        def own_objective() -> Objective:
            """This process's objective: with workers, they had theirs, and this one is opened when needed."""
            if not opened:
                opened.append(Objective.open(config, hooks, data=data))
                if config.latency is not None:
                    opened[0].use_latency(latency_model)
                    opened[0].use_stride(study_stride(study, opened[0].geometry, config, latency_model))
            return opened[0]

        if config.refine_top:
            with store.lock(name):
                result.refined = refine_study(study, own_objective(), config.refine_top, config.refine_steps,
                                              on_refined)
            store.sync(study)
        if config.latency is not None:
            if on_note is not None:
                on_note("timing the best trials for real (plan and unreduced model interleaved, median of 3 "
                        "repeats; a plan more than 10% off its prediction is timed again)")
            result.latency_checks = check_latency(study, bench, config)
            if config.latency_reaim:
                with store.lock(name):
                    result.reaimed = reaim_checked(study, config, bench.device,
                                                   lambda parent, by: own_objective().reaim(parent, by),
                                                   on_reaimed=_reaim_note(on_note))
                store.sync(study)
                if result.reaimed:
                    result.latency_checks += check_latency(study, bench, config, trials=result.reaimed)
            result.latency_checks += time_best(study, bench, config)
        save_study_note(study, best_trial(study))
    finally:
        store.dispose()
        result.skipped = data.skipped()
        if result.skipped:
            known = set(StudyRecord.from_study(study).skipped_images or [])
            StudyRecord.write(study, skipped_images=sorted(known | set(result.skipped)))
    return result


def _reaim_note(on_note: Callable[[str], None] | None) -> Callable[[FrozenTrial, FrozenTrial | None, str | None], None]:
    """What ``search run`` says of each re-aimed shape."""
    def said(parent: FrozenTrial, added: FrozenTrial | None, reason: str | None) -> None:
        if on_note is None:
            return
        if added is None:
            on_note(f"trial {parent.number} could not be re-aimed: {reason}")
        else:
            r = TrialRecord.from_trial(added)
            on_note(f"trial {parent.number} re-aimed by what it measured (x{r.latency_correction:.3f}) as trial "
                    f"{added.number}: FLOPs {r.flops_ratio:.3f}, top-1 {100 * (added.value or 0):.1f}%")
    return said


def delete_study(url: str, name: str, artifacts: str | None = None,
                 confirm: Callable[[int], bool] | None = None) -> dict[str, int] | None:
    """Remove a study with everything this project keeps of it: its Optuna trials, its rows in the
    project's tables and its pictures. Returns what was removed (trials, layer rows, pictures).

    An unknown study is an error before anything is removed; ``confirm(number of trials)`` is asked
    then, and when it says no nothing is removed and ``None`` is returned.
    """
    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta
    from optuna.artifacts.exceptions import ArtifactNotFound

    from ..present.dashboard import artifact_dir
    from .storage import load_study

    rdb = open_storage(url)
    study = load_study(rdb, name)
    trials = study.get_trials(deepcopy=False)
    if confirm is not None and not confirm(len(trials)):
        return None
    pictures = artifact_dir(url, artifacts)
    removed = 0
    if pictures.is_dir():
        files = FileSystemArtifactStore(str(pictures))
        for owner in [study, *trials]:
            for meta in get_all_artifact_meta(owner, storage=rdb):
                try:
                    files.remove(meta.artifact_id)
                    removed += 1
                except ArtifactNotFound:
                    pass
    store = Store(url, write=True)
    try:
        rows = store.delete_study_rows(name)
        optuna.delete_study(study_name=name, storage=rdb)
    finally:
        store.dispose()
    return {"trials": len(trials), "layer_rows": rows, "pictures": removed}
