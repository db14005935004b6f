"""Where studies live: storage URLs, Optuna's RDB storage, and opening a study on it.

Optuna's RDB storage is the engine (SQLite by default, PostgreSQL or MySQL for many workers); this
module only wires it and never writes Optuna's tables itself.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

from ltmp_core import LTMPError

from ..setup.config import StudyConfig
from .samplers import make_pruner, make_sampler

__all__ = [
    "DEFAULT_STORAGE", "resolve_storage", "redact", "scrub", "open_storage", "load_study", "open_study",
    "sqlite_file", "engine_kwargs",
]

DEFAULT_STORAGE = "sqlite:///studies/search.db"

# Heartbeats and stale-trial retries are the documented way to recover crashed workers; Optuna
# still labels them experimental, which is not news to the user of every run.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names (``None`` for other databases and in-memory SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        return Path(parsed.database)
    return None


def engine_kwargs(url: str) -> dict[str, Any]:
    """Engine options for a storage URL, shared by Optuna's storage and the project's tables.

    SQLite waits up to a minute for a lock instead of failing at once with "database is locked";
    server databases check a pooled connection before using it.
    """
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}


def resolve_storage(url: str | None, *, create: bool = True) -> str:
    """``--storage``, else ``$OPTUNA_STORAGE``, else ``sqlite:///studies/search.db``.

    With ``create`` a new SQLite file may be made: the default's folder (``studies/``) is created,
    but the folder of a file the user named must exist (a typo must not grow a directory tree).
    Without it (commands that only read) a SQLite file that does not exist is an error rather than
    a new empty database.
    """
    url = url or os.environ.get("OPTUNA_STORAGE") or DEFAULT_STORAGE
    try:
        path = sqlite_file(url)
    except sqlalchemy.exc.ArgumentError:
        raise LTMPError(f"storage: not a database URL: {redact(url)!r}") from None
    if path is not None:
        if create and url == DEFAULT_STORAGE:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif create:
            if not path.parent.is_dir():
                raise LTMPError(f"--storage: no folder {path.parent} for the SQLite file {path.name} (create it first)")
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


def open_storage(url: str, heartbeat: int = 60, cls: type[optuna.storages.RDBStorage] | None = None
                 ) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with heartbeats, so that trials of crashed workers are failed and retried.

    A running trial beats every ``heartbeat`` seconds; one silent for three beats is stale. SQLite
    files are switched to write-ahead logging, so that readers never block the writer. ``cls`` is
    a subclass of Optuna's RDBStorage to open instead (the dashboard's).
    """
    _sqlite_wal(url)
    try:
        return (cls or optuna.storages.RDBStorage)(
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


def open_study(config: StudyConfig, storage: optuna.storages.BaseStorage, name: str,
               seed_offset: int = 0) -> optuna.Study:
    """Create or load the study ``name`` with the configuration's sampler and pruner.

    ``seed_offset`` gives each ``--jobs`` worker a sampler seed of its own. Over a range of targets
    (``--flops LO:HI``) the study has two objectives, top-1 (up) and the measured FLOPs ratio (down),
    and no pruner (Optuna's pruners follow one objective).
    """
    multi = config.flops_min is not None
    return optuna.create_study(
        study_name=name, storage=storage, directions=["maximize", "minimize"] if multi else ["maximize"],
        load_if_exists=True, sampler=make_sampler(config.sampler, config.seed + seed_offset, config.n_trials),
        pruner=make_pruner("none" if multi else config.pruner, config.trial_steps),
    )
