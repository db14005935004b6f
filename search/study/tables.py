"""The project's own tables, beside Optuna's in the same database.

Optuna's RDB storage owns studies and trials. What it has no place for lives here: one row per
layer of every finished trial (op, budget, learned thresholds, mean kept tokens, heads and MLP units
kept), so that a user can
query "which layers merge in the feasible trials" with SQL, and benchmark results.

The schema is versioned (:mod:`search.study.migrations`). Only a store opened for writing
(``Store(url, write=True)``: ``search run``, its workers, ``bench``, ``delete``) creates or upgrades
the tables, once, under a lock that keeps other processes out. A store opened for reading never
changes the schema: it reads the tables as they are, those of an earlier version included (a column
an earlier version lacked reads as NULL, a table it lacked as empty).

Rows are derived from the trial's user attributes and written in one transaction after the trial
finished (:meth:`Store.sync` is idempotent and also backfills trials whose worker died between
finishing a trial and writing its rows).

A study is named by users but deleted by others (optuna-dashboard's trash icon, ``optuna
delete-study``) who know nothing of these rows, and a new study may take the name again. So rows
carry the study's ``uid`` (a user attribute set when ``search run`` creates it) beside its name:
rows of another study of the same name are orphans, never read, and removed by the next sync.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import optuna
from sqlalchemy import (Boolean, ColumnElement, Float, Integer, String, UniqueConstraint, create_engine, delete, false,
                        inspect, select, text)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from ltmp_core import LTMPError

from . import migrations
from .record import StudyRecord, TrialRecord
from .storage import engine_kwargs, redact

__all__ = ["Base", "LayerResult", "BenchResult", "StudyLock", "Store"]


def study_uid(study: optuna.Study) -> str | None:
    """What tells the study from a deleted one of the same name (its record's ``uid``)."""
    return StudyRecord.from_study(study).uid


class Base(DeclarativeBase):
    pass


class LayerResult(Base):
    """One layer of one finished trial."""

    __tablename__ = "ltmp_layer_results"
    __table_args__ = (UniqueConstraint("study_name", "trial_number", "layer", name="uq_ltmp_layer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_name: Mapped[str] = mapped_column(String(512), index=True)
    study_uid: Mapped[str | None] = mapped_column(String(32), nullable=True)
    trial_number: Mapped[int] = mapped_column(Integer)
    layer: Mapped[int] = mapped_column(Integer)
    op: Mapped[str] = mapped_column(String(32))
    keep: Mapped[float] = mapped_column(Float)
    merge_keep: Mapped[float | None] = mapped_column(Float, nullable=True)
    merge_threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    prune_threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    kept_tokens: Mapped[float | None] = mapped_column(Float, nullable=True)
    heads: Mapped[int | None] = mapped_column(Integer, nullable=True)  # heads the block keeps; NULL: all
    mlp_hidden: Mapped[int | None] = mapped_column(Integer, nullable=True)  # MLP units it keeps; NULL: all

    @classmethod
    def of(cls, study_name: str, uid: str | None) -> Any:
        """The rows of the study with this name and uid (a study made before uids: none)."""
        return (cls.study_name == study_name) & (cls.study_uid.is_(None) if uid is None else cls.study_uid == uid)

    @classmethod
    def others(cls, study_name: str, uid: str | None) -> Any:
        """The rows under this name that belong to another study (one deleted since)."""
        other = cls.study_uid.is_not(None) if uid is None else (cls.study_uid.is_(None) | (cls.study_uid != uid))
        return (cls.study_name == study_name) & other


def layer_rows(study_name: str, trial: optuna.trial.FrozenTrial, uid: str | None = None) -> list[LayerResult]:
    """The rows of a finished trial, from its ``plan`` and ``kept_tokens`` user attributes."""
    record = TrialRecord.from_trial(trial)
    plan = record.plan
    if not plan:
        return []
    kept = record.kept_tokens or [None] * len(plan["layers"])
    return [
        LayerResult(
            study_name=study_name, study_uid=uid, trial_number=trial.number, layer=i, op=layer["op"], keep=layer["keep"],
            merge_keep=layer.get("merge_keep"), merge_threshold=layer.get("merge_threshold"),
            prune_threshold=layer.get("prune_threshold"), kept_tokens=k, heads=layer.get("heads"),
            mlp_hidden=layer.get("mlp_hidden"),
        )
        for i, (layer, k) in enumerate(zip(plan["layers"], kept))
    ]


class BenchResult(Base):
    """One measured configuration of ``search bench``."""

    __tablename__ = "ltmp_bench_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created: Mapped[str] = mapped_column(String(40))
    plan: Mapped[str] = mapped_column(String(1024))
    model: Mapped[str] = mapped_column(String(256))
    device: Mapped[str] = mapped_column(String(256))
    batch_size: Mapped[int] = mapped_column(Integer)
    mode: Mapped[str] = mapped_column(String(16))
    amp: Mapped[bool] = mapped_column(Boolean)
    compiled: Mapped[bool] = mapped_column(Boolean)
    flops_ratio: Mapped[float] = mapped_column(Float)
    images_per_s_base: Mapped[float] = mapped_column(Float)
    images_per_s_plan: Mapped[float] = mapped_column(Float)
    latency_ms_base: Mapped[float] = mapped_column(Float)
    latency_ms_plan: Mapped[float] = mapped_column(Float)
    speedup: Mapped[float] = mapped_column(Float)
    ideal_fraction: Mapped[float] = mapped_column(Float)
    runs: Mapped[int] = mapped_column(Integer)
    peak_memory_mb: Mapped[float | None] = mapped_column(Float, nullable=True)

    FIELDS = ("created", "plan", "model", "device", "batch_size", "mode", "amp", "compiled", "flops_ratio",
              "images_per_s_base", "images_per_s_plan", "latency_ms_base", "latency_ms_plan", "speedup",
              "ideal_fraction", "runs", "peak_memory_mb")

    #: The column each key of a ``search bench`` row is stored in, where the names differ.
    COLUMNS = {"batch": "batch_size"}

    def to_dict(self) -> dict[str, Any]:
        keys = {column: key for key, column in self.COLUMNS.items()}
        return {"id": self.id, **{keys.get(k, k): getattr(self, k) for k in self.FIELDS}}


class StudyLock(Base):
    """One row per study, locked (``SELECT ... FOR UPDATE``) while a worker tops up its trial slots."""

    __tablename__ = "ltmp_study_locks"

    study_name: Mapped[str] = mapped_column(String(512), primary_key=True)


#: PostgreSQL advisory lock (per database) held while one process upgrades the schema: "ltmp" in ASCII.
SCHEMA_LOCK_KEY = 0x6C746D70


@contextmanager
def _file_lock(engine: Engine) -> Iterator[None]:
    """An exclusive ``flock`` on the file ``DATABASE.lock`` beside a SQLite database while the block runs
    (nothing for an in-memory database). The study lock and the schema lock share it; neither is taken
    while the other is held."""
    database = engine.url.database
    if not database or database == ":memory:":
        yield
        return
    import fcntl

    with open(f"{database}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Store:
    """The project's tables in the database at ``url`` (the same URL as the Optuna storage).

    ``write``: the caller writes rows (``search run`` and its workers, ``bench``, ``delete``), so the
    tables are created or upgraded to this code's schema first. Without it the store only reads, and
    changes nothing, the schema least of all; its writing methods raise.
    """

    def __init__(self, url: str, *, write: bool = False) -> None:
        self.url = url
        self.writable = write
        self.engine: Engine = create_engine(url, **engine_kwargs(url))
        if write:
            self._upgrade()
            self._columns = {name: set(table.c.keys()) for name, table in Base.metadata.tables.items()}
        else:
            self._columns = self._existing_columns()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def _upgrade(self) -> None:
        """Create or upgrade the tables to this code's revision. When they are there already (the usual
        case, and every ``--jobs`` worker after the first process) this only reads the version."""
        head = migrations.head()
        with self.engine.connect() as conn:
            found = migrations.current(conn)
            conn.rollback()
            if found == head:
                return
            if found is not None and not migrations.known(found):
                raise LTMPError(f"storage: {redact(self.url)} holds this project's tables at schema revision {found}, "
                                f"newer than this release knows (up to {head}); upgrade ltmp-search to write to it")
            with self._schema_lock(conn):
                migrations.upgrade(conn)  # reads the version again: another process may have upgraded meanwhile

    @contextmanager
    def _schema_lock(self, conn: Connection) -> Iterator[None]:
        """Keep other processes out of the schema while this one upgrades it: an advisory lock on
        PostgreSQL, a named lock on MySQL (both of the session, released here or when it dies), the
        lock file on SQLite. Held outside any transaction, so the upgrade sees what a process that held
        it before committed."""
        dialect = conn.dialect.name
        if dialect == "sqlite":
            with _file_lock(self.engine):
                yield
            return
        if dialect == "postgresql":
            take, release, key = "SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)", SCHEMA_LOCK_KEY
        elif dialect in ("mysql", "mariadb"):  # the name is the server's: one per database
            take, release = "SELECT GET_LOCK(:key, 600)", "SELECT RELEASE_LOCK(:key)"
            key = f"ltmp_schema.{conn.engine.url.database}"[:64]
        else:  # no lock known: the revisions' checks still make a second run harmless
            yield
            return
        got = conn.execute(text(take), {"key": key}).scalar()
        conn.commit()
        if dialect != "postgresql" and got != 1:
            raise LTMPError(f"storage: waited 10 minutes for another process to upgrade the tables of "
                            f"{redact(self.url)}; try again")
        try:
            yield
        finally:
            conn.rollback()
            conn.execute(text(release), {"key": key})
            conn.commit()

    def _existing_columns(self) -> dict[str, set[str]]:
        """The project's tables that the database has, with the columns each has."""
        found = inspect(self.engine)
        names = set(found.get_table_names())
        return {t: {c["name"] for c in found.get_columns(t)} for t in Base.metadata.tables if t in names}

    def _writing(self) -> None:
        if not self.writable:
            raise RuntimeError("this Store only reads; open it with Store(url, write=True) to write rows")

    def _read(self, model: type[Base], where: ColumnElement[bool] | None = None, order_by: Sequence[Any] = (),
              limit: int | None = None) -> list[Any]:
        """Rows of ``model``'s table as new (unattached) instances. On a table an earlier version made, a
        column it lacks reads None; a table the database lacks has no rows."""
        present = self._columns.get(model.__tablename__)
        if present is None:
            return []
        table = model.__table__
        query = select(*(c for c in table.c if c.name in present)).order_by(*order_by).limit(limit)
        if where is not None:
            query = query.where(where)
        with self.session() as s:
            found = s.execute(query).mappings().all()
        return [model(**{name: row.get(name) for name in table.c.keys()}) for row in found]

    @contextmanager
    def lock(self, study_name: str) -> Iterator[None]:
        """Hold a per-study lock across processes and machines for the duration of the block.

        PostgreSQL and MySQL: a row lock in ``ltmp_study_locks``, released when the block's transaction
        ends (a killed holder's lock is released by the server). SQLite: an exclusive ``flock`` on a
        file beside the database (SQLite is local to one machine anyway).
        """
        self._writing()
        if self.engine.dialect.name == "sqlite":
            with _file_lock(self.engine):
                yield
            return
        from sqlalchemy.exc import IntegrityError

        for _ in range(5):
            acquired = False
            try:
                with self.session() as session:  # the lock is held until this transaction ends
                    row = session.execute(
                        select(StudyLock).where(StudyLock.study_name == study_name).with_for_update()
                    ).scalar_one_or_none()
                    if row is None:  # first use: an inserted row is locked until the transaction ends
                        session.add(StudyLock(study_name=study_name))
                        session.flush()
                    acquired = True
                    yield
                return
            except IntegrityError:
                if acquired:
                    raise
                continue  # another worker inserted the row first: lock that one
        raise RuntimeError(f"could not lock study {study_name!r}")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back on error, always closed."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def record(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> int:
        """Write the rows of one finished trial (replacing any); returns the number of rows."""
        self._writing()
        if trial.state != optuna.trial.TrialState.COMPLETE:
            return 0
        rows = layer_rows(study.study_name, trial, study_uid(study))
        with self.session() as s:
            s.execute(delete(LayerResult).where(
                LayerResult.study_name == study.study_name, LayerResult.trial_number == trial.number))
            s.add_all(rows)
        return len(rows)

    def sync(self, study: optuna.Study) -> int:
        """Remove the rows of other studies that had this name and of trials this study does not
        have; write rows for every complete trial that has none. Returns how many trials were written."""
        self._writing()
        uid = study_uid(study)
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        numbers = {t.number for t in complete}
        with self.session() as s:
            s.execute(delete(LayerResult).where(LayerResult.others(study.study_name, uid)))
            rows = s.scalars(select(LayerResult.trial_number).where(LayerResult.of(study.study_name, uid)).distinct())
            done = set(rows)
            gone = done - numbers
            if gone:
                s.execute(delete(LayerResult).where(LayerResult.of(study.study_name, uid),
                                                    LayerResult.trial_number.in_(sorted(gone))))
        missing = [t for t in complete if t.number not in done]
        for trial in missing:
            self.record(study, trial)
        return len(missing)

    def layers(self, study: optuna.Study, trial_number: int | None = None) -> list[LayerResult]:
        """The rows of ``study`` (never those of another study that had its name)."""
        uid = study_uid(study)
        if "study_uid" in self._columns.get(LayerResult.__tablename__, ()):
            where = LayerResult.of(study.study_name, uid)
        else:  # a table from before uids: its rows belong to studies made before uids, which have none
            where = LayerResult.study_name == study.study_name if uid is None else false()
        if trial_number is not None:
            where = where & (LayerResult.trial_number == trial_number)
        return self._read(LayerResult, where, (LayerResult.trial_number, LayerResult.layer))

    def delete_study_rows(self, study_name: str) -> int:
        """Remove every row under ``study_name`` (all studies that had it) and its lock; returns how many."""
        self._writing()
        with self.session() as s:
            n = s.execute(delete(LayerResult).where(LayerResult.study_name == study_name)).rowcount
            s.execute(delete(StudyLock).where(StudyLock.study_name == study_name))
        return n or 0

    def clean_orphans(self, study_names: set[str]) -> int:
        """Remove the rows of studies that no longer exist (deleted by other tools); returns how many."""
        self._writing()
        with self.session() as s:
            names = set(s.scalars(select(LayerResult.study_name).distinct()))
            gone = sorted(names - study_names)
            if not gone:
                return 0
            return s.execute(delete(LayerResult).where(LayerResult.study_name.in_(gone))).rowcount or 0

    def add_bench(self, plan: str, result: dict[str, Any]) -> int:
        """Store one ``search bench`` measurement; returns its id."""
        self._writing()
        columns = {BenchResult.COLUMNS.get(k, k): v for k, v in result.items() if k not in ("created", "plan")}
        row = BenchResult(plan=plan, created=result["created"],
                          **{k: v for k, v in columns.items() if k in BenchResult.FIELDS})
        with self.session() as s:
            s.add(row)
            s.flush()
            return row.id

    def bench_history(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest ``search bench`` measurements, newest first."""
        return [r.to_dict() for r in self._read(BenchResult, order_by=(BenchResult.id.desc(),), limit=limit)]

    def dispose(self) -> None:
        self.engine.dispose()
