"""Studies: storage, samplers, pruners, the run loop and what the commands read back.

Optuna's RDB storage is the engine (SQLite by default, PostgreSQL or MySQL for many workers); this
module only wires it: it never writes Optuna's tables itself.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import sqlalchemy
import torch
from optuna.trial import FrozenTrial, TrialState

import ltmp_core
from ltmp_core import LTMPError, ViTGeometry

from .config import StudyConfig, differences
from .data import StudyData, load_data
from .models import check_model_name, load_base_model
from .objective import METRIC_NAME, Objective, TrialHooks
from .store import Store, engine_kwargs, sqlite_file

__all__ = [
    "DEFAULT_STORAGE",
    "resolve_storage",
    "redact",
    "open_storage",
    "load_study",
    "list_studies",
    "run",
    "RunResult",
    "trial_summary",
    "best_trial",
    "FINISHED",
]

DEFAULT_STORAGE = "sqlite:///studies/search.db"

# Heartbeats and stale-trial retries are the documented way to recover crashed workers; Optuna
# still labels them experimental, which is not news to the user of every run.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def resolve_storage(url: str | None, *, create: bool = True) -> str:
    """``--storage``, else ``$OPTUNA_STORAGE``, else ``sqlite:///studies/search.db``.

    With ``create`` the folder of a SQLite file is made; without it (commands that only read) a
    SQLite file that does not exist is an error rather than a new empty database.
    """
    url = url or os.environ.get("OPTUNA_STORAGE") or DEFAULT_STORAGE
    try:
        path = sqlite_file(url)
    except sqlalchemy.exc.ArgumentError:
        raise LTMPError(f"storage: not a database URL: {redact(url)!r}") from None
    if path is not None:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.is_file():
            raise LTMPError(f"storage: no database at {path} (start a study with: search run --flops 0.35)")
    return url


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's message, say) with the URL's password, and the URL itself, hidden."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:
        return text.replace(url, "<storage URL>")
    text = text.replace(url, redact(url))
    if parsed.password:
        text = text.replace(str(parsed.password), "***")
    return text


def redact(url: str) -> str:
    """The URL with its password hidden, for every message and log line."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable storage URL>"


def open_storage(url: str, heartbeat: int = 60) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with heartbeats, so that trials of crashed workers are failed and retried.

    A running trial beats every ``heartbeat`` seconds; one silent for three beats is stale. SQLite
    files are switched to write-ahead logging, so that readers never block the writer.
    """
    _sqlite_wal(url)
    try:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs(url),
            heartbeat_interval=heartbeat,
            grace_period=3 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        reason = scrub(str(getattr(e, "orig", None) or e).strip().splitlines()[0], url)
        raise LTMPError(f"storage: cannot open {redact(url)} ({reason})") from None


def _sqlite_wal(url: str) -> None:
    path = sqlite_file(url)
    if path is None:
        return
    import sqlite3

    with sqlite3.connect(path, timeout=60) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


def load_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    """An existing study; an unknown name is a clear error listing the known ones."""
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in storage.get_all_studies()]
        known = f" (studies here: {', '.join(names)})" if names else " (no studies here yet)"
        raise LTMPError(f"study: no study named {name!r}{known}") from None


def _sampler(name: str, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    startup = max(3, min(10, n_trials // 3))
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, n_trials // 2)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)


def _pruner(name: str, steps: int) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, steps))
    return optuna.pruners.NopPruner()


def starting_params(depth: int, ops: tuple[str, ...], importance: tuple[str, ...] = ("mean",)) -> list[dict[str, Any]]:
    """Layerwise parameters of the plans the papers use, to enqueue as a new study's first trials.

    Uniform merge+prune (LTMP's block everywhere), uniform merge (ToMe-like) and squeeze at three
    evenly spaced layers (TPS), each with equal cuts, as far as ``ops`` allows. The search starts
    from them, so its best trial is never worse than these under the same tuning budget.
    """
    from spaces._baselines import tps_layers

    shapes = [["merge+prune"] * depth, ["merge"] * depth]
    tps = set(tps_layers(depth))
    shapes.append(["squeeze" if i in tps else "none" for i in range(depth)])
    out = []
    for shape in shapes:
        if all(op in ops for op in shape):
            params = {**{f"op_{i}": op for i, op in enumerate(shape)}, **{f"cut_{i}": 0.5 for i in range(depth)}}
            if len(importance) > 1:
                params.update({f"imp_{i}": importance[0] for i in range(depth)})
            out.append(params)
    return out


def open_data(config: StudyConfig, device: torch.device, *, holdout: bool = True) -> StudyData:
    """The study's data, with the model's own preprocessing for folders; checks the model name first.

    ``holdout=False`` carves no held-out split out of a folder (validation on val/ alone).
    """
    from timm.data import create_transform

    if not config.data:
        raise LTMPError(
            f"data: the {Path(config.preset).stem} preset needs --data-dir DIR, a folder in ImageNet layout "
            "(DIR/train/<class>/<image>, DIR/val/<class>/<image>)"
        )
    data_config = check_model_name(config.model, config.model_kwargs)
    img_size = config.img_size or int(data_config["input_size"][-1])
    transform = None
    if config.data != "digits":
        data_config = {**data_config, "input_size": (3, img_size, img_size)}
        transform = create_transform(**data_config, is_training=False)
    return load_data(
        config.data, img_size=img_size, holdout=config.holdout if holdout else None, transform=transform,
        trial_images=config.trial_images, workers=config.workers, pin_memory=device.type == "cuda",
        mean=data_config["mean"], std=data_config["std"],
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LTMPError(f"device: {name} was asked for, but no CUDA device is available here")
    return device


@dataclass
class RunResult:
    study: optuna.Study
    storage_url: str
    new_trials: list[int] = field(default_factory=list)
    base: dict[str, Any] = field(default_factory=dict)
    finished_before: int = 0
    skipped: list[str] = field(default_factory=list)
    artifacts: Path | None = None


def _check_resume(storage: optuna.storages.BaseStorage, name: str, config: StudyConfig) -> None:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return
    saved = study.user_attrs.get("config")
    if not saved:
        return
    changed = differences(saved, config)
    if changed:
        detail = ", ".join(f"{k}={saved[k]!r} (now {getattr(config, k)!r})" for k in changed[:3])
        raise LTMPError(
            f"study: {name!r} was run with other settings ({detail}); use the same settings to resume it, "
            "or another --study-name"
        )


def _open(config: StudyConfig, storage: optuna.storages.BaseStorage, name: str, seed_offset: int = 0) -> optuna.Study:
    return optuna.create_study(
        study_name=name, storage=storage, direction="maximize", load_if_exists=True,
        sampler=_sampler(config.sampler, config.seed + seed_offset, config.n_trials),
        pruner=_pruner(config.pruner, config.trial_steps),
    )


def build_objective(
    config: StudyConfig,
    hooks: TrialHooks | None = None,
    on_base_epoch: Callable[[int, int, float], None] | None = None,
    artifacts: Path | None = None,
    data: StudyData | None = None,
) -> tuple[Objective, dict[str, Any], StudyData]:
    """Data, base model (loaded once; trained and cached for the digits preset) and the objective.

    With ``artifacts`` (a folder), every finished trial gets a dashboard note and pictures. ``data``:
    the study's data when the caller has opened it already.
    """
    from .dashboard import TrialRecorder

    device = resolve_device(config.device)
    amp = config.amp if config.amp is not None else device.type == "cuda"
    if data is None:
        data = open_data(config, device)
    base, base_info = load_base_model(
        config.model, data, img_size=config.img_size, model_kwargs=config.model_kwargs,
        pretrained=config.pretrained, checkpoint=config.checkpoint, base_epochs=config.base_epochs,
        on_train=on_base_epoch,
    )
    recorder = None if artifacts is None else TrialRecorder(data, artifacts)
    return Objective(config, base, data, device=device, amp=amp, hooks=hooks, recorder=recorder), base_info, data


def open_study_for_worker(config: StudyConfig, url: str, name: str, seed_offset: int) -> tuple[optuna.Study, Store]:
    """The study as a ``--jobs`` worker opens it: its own sampler seed, the project's tables."""
    return _open(config, open_storage(url, config.heartbeat), name, seed_offset), Store(url)


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
) -> RunResult:
    """Create or resume a study and run trials until it has ``config.n_trials`` finished ones.

    Everything a user can get wrong is checked before the database is touched. With ``jobs > 1``,
    that many worker processes share the study (see :mod:`search.worker`); workers on other
    machines join by running the same command against the same storage and study name.
    """
    from .worker import ensure_slots, run_workers, work

    if jobs < 1:
        raise LTMPError(f"jobs: must be >= 1, got {jobs}")
    from .dashboard import artifact_dir, save_study_note

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
    objective, base_info, _ = build_objective(config, hooks, on_base_epoch, pictures, data=data)
    if rdb is None:
        rdb = checked_storage()
    study = _open(config, rdb, name)
    store = Store(url)
    first = None
    if "config" not in study.user_attrs:
        geometry = ViTGeometry.from_model(objective.base)
        study.set_metric_names([METRIC_NAME])
        study.set_user_attr("config", config.to_dict())
        study.set_user_attr("target_flops_ratio", config.flops)
        study.set_user_attr("unreduced_gmacs", ltmp_core.unreduced_macs(geometry) / 1e9)
        study.set_user_attr("base", {**base_info, "evaluated_accuracy": objective.base_accuracy()})
        if config.space == "layerwise":
            first = starting_params(geometry.depth, config.ops, config.importance)[: max(1, config.n_trials // 3)]
    store.sync(study)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    result = RunResult(study, url, base=study.user_attrs.get("base", base_info), finished_before=finished,
                       artifacts=pictures)
    try:
        ensure_slots(study, store, config.n_trials, first)
        if jobs == 1:
            result.new_trials = work(study, objective, store, config.n_trials, on_trial_end)
        else:
            del objective
            result.new_trials = run_workers(config, url, name, jobs, study, on_trial_end, pictures)
            store.sync(study)
        save_study_note(study, best_trial(study))
    finally:
        store.dispose()
        result.skipped = data.skipped()
        if result.skipped:
            known = set(study.user_attrs.get("skipped_images", []))
            study.set_user_attr("skipped_images", sorted(known | set(result.skipped)))
    return result


def list_studies(storage: optuna.storages.BaseStorage) -> list[dict[str, Any]]:
    """One summary per study: name, target, trials by state, best feasible accuracy."""
    out = []
    for s in storage.get_all_studies():
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        best = best_trial(study)
        out.append({
            "study": s.study_name,
            "target_flops_ratio": s.user_attrs.get("target_flops_ratio"),
            "model": (s.user_attrs.get("config") or {}).get("model"),
            "space": (s.user_attrs.get("config") or {}).get("space"),
            "trials": len(trials),
            "complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "failed": sum(t.state == TrialState.FAIL for t in trials),
            "best_trial": None if best is None else best.number,
            "best_accuracy": None if best is None else best.value,
            "best_flops_ratio": None if best is None else best.user_attrs.get("flops_ratio"),
            "started": min((t.datetime_start for t in trials if t.datetime_start), default=None),
        })
    return out


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The most accurate feasible trial (measured FLOPs at or under the target), or ``None``."""
    feasible = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("feasible") and t.value is not None
    ]
    return max(feasible, key=lambda t: (t.value, -t.user_attrs.get("flops_ratio", 1.0)), default=None)


def trial_summary(trial: FrozenTrial) -> dict[str, Any]:
    """What ``search show`` prints of one trial."""
    plan = trial.user_attrs.get("plan") or {}
    ops = [layer["op"] for layer in plan.get("layers", [])]
    if not ops:  # pruned before its plan was built: show what was sampled
        ops = [trial.params[k] for k in sorted((k for k in trial.params if k.startswith("op_")),
                                              key=lambda k: int(k[3:]))]
    duration = trial.duration.total_seconds() if trial.duration else None
    return {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "accuracy": trial.value,
        "flops_ratio": trial.user_attrs.get("flops_ratio"),
        "gmacs": trial.user_attrs.get("gmacs"),
        "feasible": trial.user_attrs.get("feasible"),
        "ops": ops,
        "keeps": [layer["keep"] for layer in plan.get("layers", [])],
        "duration_s": duration,
        "reason": trial.user_attrs.get("pruned_reason") or trial.user_attrs.get("fail_reason"),
    }
