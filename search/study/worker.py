"""Workers: the loop that runs a study's trials, in this process or in ``--jobs N`` processes.

Optuna's RDB storage is the engine; this module adds one rule on top: a study holds exactly
``n_trials`` *slots*, Optuna trials in the WAITING state (``Study.enqueue_trial``, which ``ask``
pops atomically, also across machines). A worker runs a trial only by popping a slot (a trial whose
record says ``slot``, :class:`search.study.record.TrialRecord`), so the study ends with exactly ``n_trials`` finished (complete or pruned)
trials however many workers share it:

- slots are topped up under a per-study lock (:meth:`search.study.tables.Store.lock`), when a study is
  created or extended, and after a trial fails (its slot was spent without a result);
- a worker killed mid-trial stops beating its heartbeat; another worker fails the stale trial and
  Optuna's ``RetryHeartbeatStaleTrialCallback`` enqueues a retry with the same parameters (a slot);
- a worker leaves only when no slot is waiting and no trial is running, so a stale trial is always
  found and retried by someone;
- a run starts no trial once finished plus running trials reach its ``n_trials``: slots an
  interrupted run with a larger count left waiting stay for a later, larger run.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ltmp_core import LTMPError

from ..setup.config import StudyConfig
from .objective import Objective
from .record import TrialRecord
from .results import state_counts
from .storage import open_storage, open_study
from .tables import Store

__all__ = ["TrialFailed", "ensure_slots", "work", "run_workers", "worker_device"]

POLL_S = 0.5
MAX_CONSECUTIVE_FAILURES = 5


class TrialFailed(Exception):
    """A trial failed for a reason of its own (recorded as ``fail_reason``); the worker goes on."""


class Surplus(Exception):
    """A trial started after the study's last slot was taken (a rare race); it is failed as surplus."""


def ensure_slots(
    study: optuna.Study, store: Store, n_trials: int, first: list[dict] | None = None
) -> int:
    """Enqueue slots until finished + running + waiting trials number ``n_trials``; returns how many.

    ``first``: ``(label, parameters)`` of the first slots of a new study (the published methods'
    plans); the label becomes the trial's ``seed_of``.
    """
    with store.lock(study.study_name):
        c = state_counts(study)
        have = c[TrialState.COMPLETE] + c[TrialState.PRUNED] + c[TrialState.RUNNING] + c[TrialState.WAITING]
        need = max(0, n_trials - have)
        fresh = not study.trials
        for i in range(need):
            label, params = first[i] if fresh and first and i < len(first) else (None, {})
            attrs = TrialRecord(slot=True, seed_of=label).to_user_attrs()
            study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)
    return need


class _OneLineFailures(logging.Filter):
    """Optuna logs a failed trial with its traceback, then "failed with value None". The reason is
    recorded on the trial and shown by the command line: keep Optuna's first line only, and drop
    the record of a Ctrl-C entirely (the command prints its own message)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            return False
        if record.getMessage().endswith("failed with value None."):
            return False
        record.exc_info = None
        record.exc_text = None
        return True


#: Optuna's package logger: its handlers write every record of Optuna's modules.
_OPTUNA_LOGGER = logging.getLogger("optuna")


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)


def _busy(c: dict[TrialState, int]) -> int:
    """Trials that count against ``--n-trials``: finished (complete or pruned) and running ones."""
    return c[TrialState.COMPLETE] + c[TrialState.PRUNED] + c[TrialState.RUNNING]


def _guarded(objective: Objective, n_trials: int | None = None) -> Callable[[optuna.Trial], float]:
    """The objective with the failure policy: record every failure's reason; configuration errors stop."""

    def start(trial: optuna.Trial) -> float:
        # A trial that is not a slot was created by `ask` because the last slot was taken meanwhile.
        if not TrialRecord.from_trial(trial).slot:
            TrialRecord.write(trial, fail_reason="surplus: the study's last slot was taken by another worker")
            raise Surplus()
        # A slot left waiting by an interrupted run with a larger --n-trials, popped by two workers
        # at once when one trial was missing: this run's count is already reached without it.
        if n_trials is not None and _busy(state_counts(trial.study)) > n_trials:
            TrialRecord.write(trial, fail_reason=f"surplus: the study already has its {n_trials} trials")
            raise Surplus()
        TrialRecord.write(trial, worker=f"{os.uname().nodename}:{os.getpid()}")
        return objective(trial)

    def run(trial: optuna.Trial) -> float:
        try:
            return start(trial)
        except (optuna.TrialPruned, Surplus):
            raise
        except KeyboardInterrupt:
            run.interrupted = True
            _release_session(trial.study)
            try:
                TrialRecord.write(trial, fail_reason="interrupted (Ctrl-C)")
            except Exception:  # the storage refused the note: the trial still ends failed, the run still stops
                _release_session(trial.study)
            raise
        except LTMPError as e:
            TrialRecord.write(trial, fail_reason=f"configuration error: {e}")
            raise  # stops the run with its message
        except Exception as e:
            message = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            if TrialRecord.from_trial(trial).fail_reason is None:
                TrialRecord.write(trial, fail_reason=f"{type(e).__name__}: {message}")
            raise TrialFailed(TrialRecord.from_trial(trial).fail_reason or type(e).__name__) from e

    run.interrupted = False
    return run


def _release_session(study: optuna.Study) -> None:
    """Close this thread's session of the study's RDB storage. Optuna rolls a session back when a storage
    call raises an ``Exception``, not a ``KeyboardInterrupt``: a Ctrl-C that lands inside a storage call
    leaves its transaction half done, and the next call through that session would carry it on."""
    backend = getattr(study._storage, "_backend", study._storage)
    scoped = getattr(backend, "scoped_session", None)
    if scoped is not None:
        try:
            scoped.remove()
        except Exception:
            pass


def work(
    study: optuna.Study,
    objective: Objective,
    store: Store,
    n_trials: int,
    on_trial_end: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> list[int]:
    """Run slots of ``study`` until none is waiting and none is running; returns the trial numbers run."""
    ran: list[int] = []
    guarded = _guarded(objective, n_trials)

    def record(study: optuna.Study, trial: FrozenTrial) -> None:
        store.record(study, trial)
        ran.append(trial.number)
        if on_trial_end is not None:
            on_trial_end(study, trial)

    quiet = _OneLineFailures()
    handlers = list(_OPTUNA_LOGGER.handlers)  # a handler's filter sees the records of every Optuna module
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        _loop(study, guarded, store, n_trials, record, ran)
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)
    return ran


def _loop(study: optuna.Study, guarded: Callable[[optuna.Trial], float], store: Store, n_trials: int,
          record: Callable[[optuna.Study, FrozenTrial], None], ran: list[int]) -> None:
    failures = 0
    while True:
        _fail_stale(study)
        c = state_counts(study)
        if _busy(c) >= n_trials:
            # Enough trials finished or under way for this run's --n-trials, though slots of an
            # interrupted run with a larger count may still wait (a later, larger run uses them).
            if c[TrialState.RUNNING] == 0:
                break
            time.sleep(POLL_S)  # others are running trials: wait, they may go stale and need a retry
            continue
        if c[TrialState.WAITING] == 0:
            if c[TrialState.RUNNING] == 0:
                ensure_slots(study, store, n_trials)  # failed trials whose slots were not replaced
                if state_counts(study)[TrialState.WAITING] == 0:
                    break
            else:
                time.sleep(POLL_S)  # others are running trials: wait, they may go stale
            continue
        before = len(ran)
        try:
            study.optimize(guarded, n_trials=1, catch=(TrialFailed, Surplus), callbacks=[record])
        except Exception as e:
            # After a Ctrl-C, a storage error while the trial is closed (Optuna's tell) must not turn the
            # interrupt into a crash: the run stops as interrupted, and the trial's heartbeat, no longer
            # beating, lets the next run fail and retry it if it was left running.
            if getattr(guarded, "interrupted", False):
                raise KeyboardInterrupt from e
            raise
        trial = study.trials[ran[-1]] if len(ran) > before else None
        if trial is not None and trial.state == TrialState.FAIL:
            reason = TrialRecord.from_trial(trial).fail_reason or ""
            if reason.startswith("surplus"):
                continue
            failures += 1
            ensure_slots(study, store, n_trials)  # the failed trial's slot is replaced
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise LTMPError(
                    f"trials: {failures} trials in a row failed in this worker; the last one: "
                    f"{reason or 'no reason recorded'}"
                )
        else:
            failures = 0


@dataclass(frozen=True)
class _Job:
    config: StudyConfig
    url: str
    study_name: str
    index: int
    threads: int
    artifacts: Path | None


def worker_device(device: str, index: int, gpus: int) -> str:
    """The device of ``--jobs`` worker ``index`` on a machine with ``gpus`` visible GPUs: ``cuda`` and
    ``auto`` spread the workers over the GPUs in turn (worker i on ``cuda:{i mod gpus}``); ``cpu`` and
    an explicit ``cuda:N`` are kept."""
    if gpus > 1 and device in ("auto", "cuda"):
        return f"cuda:{index % gpus}"
    return device


def _worker_main(job: _Job) -> None:
    """Entry point of a ``--jobs`` worker process: load the data and model once, then run slots."""
    from .. import exit_without_final_collection

    exit_without_final_collection()  # the parent waits for its workers to end after a Ctrl-C
    torch.set_num_threads(job.threads)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        # Each worker samples with a seed of its own.
        study = open_study(job.config, open_storage(job.url, job.config.heartbeat), job.study_name, job.index + 1)
        store = Store(job.url, write=True)
        from ..present.dashboard import recorder_for

        device = worker_device(job.config.device, job.index, torch.cuda.device_count())
        objective = Objective.open(replace(job.config, device=device), recorder=recorder_for(job.artifacts))
        if job.config.latency is not None:  # the parent checked the study's device; a worker's threads differ
            from .latency_study import study_latency_model, study_stride

            model = study_latency_model(study, objective.bench, job.config, remeasure=True)
            objective.use_latency(model)
            objective.use_stride(study_stride(study, objective.geometry, job.config, model))
        work(study, objective, store, job.config.n_trials)
        store.dispose()
    except KeyboardInterrupt:
        raise SystemExit(130)
    except LTMPError as e:
        import sys

        sys.stderr.write(f"search: worker {job.index}: error: {e}\n")
        raise SystemExit(2)


def run_workers(
    config: StudyConfig,
    url: str,
    study_name: str,
    jobs: int,
    study: optuna.Study,
    on_trial_end: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    artifacts: Path | None = None,
) -> list[int]:
    """Run ``jobs`` worker processes on the study and follow it until they are done.

    The study's finished trials are reported through ``on_trial_end`` as they appear. Ctrl-C stops
    the workers (each marks its running trial failed as interrupted) and re-raises here.
    """
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    procs = [ctx.Process(target=_worker_main, args=(_Job(config, url, study_name, i, threads, artifacts),), daemon=False)
             for i in range(jobs)]
    seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    new: list[int] = []
    try:
        for p in procs:
            p.start()
        while any(p.is_alive() for p in procs):
            time.sleep(POLL_S)
            new += _report_new(study, seen, on_trial_end)
        new += _report_new(study, seen, on_trial_end)
    except KeyboardInterrupt:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGINT)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        raise
    codes = [p.exitcode for p in procs]
    if any(code == 2 for code in codes):
        raise LTMPError("workers: a worker stopped on a configuration error (see its message above)")
    return new


def _report_new(study: optuna.Study, seen: set[int], on_trial_end) -> list[int]:
    new = []
    for t in study.get_trials(deepcopy=False):
        if t.state.is_finished() and t.number not in seen:
            seen.add(t.number)
            new.append(t.number)
            if on_trial_end is not None:
                on_trial_end(study, t)
    return new
