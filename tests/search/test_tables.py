"""The project's tables across versions: a new database, the tables an earlier version made, readers
that never change the schema, and writers that upgrade it once, also when several start together.

Every test runs on a SQLite file, and on PostgreSQL and MariaDB when ``LTMP_TEST_POSTGRES_URL`` /
``LTMP_TEST_MYSQL_URL`` are set, each time in a scratch database made for the test and dropped after
it. A URL that is set but does not answer fails the test; an unset one skips it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import uuid
from contextlib import contextmanager
from typing import Iterator

import optuna
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from ltmp_core import LTMPError
from search.study import migrations
from search.study.tables import Base, LayerResult, Store
from tests.search.helpers import cli

SERVERS = {"postgresql": "LTMP_TEST_POSTGRES_URL", "mysql": "LTMP_TEST_MYSQL_URL"}


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def url(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    variable = SERVERS[request.param]
    server = os.environ.get(variable)
    if not server:
        pytest.skip(f"{variable} is not set")
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    name = f"ltmp_store_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
    except sa.exc.OperationalError as e:
        admin.dispose()
        pytest.fail(f"{variable} is set, but {admin.url.render_as_string()} does not answer: {e.orig}", pytrace=False)
    yield sa.engine.make_url(server).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE {name}" + (" WITH (FORCE)" if request.param == "postgresql" else "")))
    admin.dispose()


@contextmanager
def statements() -> Iterator[list[str]]:
    """Every SQL statement any engine of this process sends while the block runs."""
    sent: list[str] = []

    def record(conn, cursor, statement, *args) -> None:
        sent.append(" ".join(statement.split()))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", record)


def ddl(sent: list[str]) -> list[str]:
    return [s for s in sent if s.split(" ", 1)[0].upper() in ("CREATE", "ALTER", "DROP")]


def schema(url: str) -> dict[str, set[str]]:
    """Tables and their columns, as the database has them."""
    engine = sa.create_engine(url)
    found = sa.inspect(engine)
    out = {t: {c["name"] for c in found.get_columns(t)} for t in found.get_table_names()}
    engine.dispose()
    return out


def revision(url: str) -> str | None:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        found = migrations.current(conn)
    engine.dispose()
    return found


def differences(url: str) -> list:
    """What alembic finds between the project's models and its tables in the database (none: they agree)."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        ours = lambda name, kind, parents: kind != "table" or name.startswith("ltmp_")  # noqa: E731 - not Optuna's
        opts = {"version_table": migrations.VERSION_TABLE, "include_name": ours}
        context = MigrationContext.configure(conn, opts=opts)
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    return diff


# The project's tables as earlier versions of search/study/tables.py made them (Base.metadata.create_all,
# no version table), with their column sets of the time.
def first_release(meta: sa.MetaData) -> None:
    """The first release (2026-11-21): layer rows without study_uid, heads and mlp_hidden; no other table."""
    sa.Table("ltmp_layer_results", meta, *layer_columns(),
             sa.UniqueConstraint("study_name", "trial_number", "layer", name="uq_ltmp_layer"))


def uid_release(meta: sa.MetaData) -> None:
    """2026-11-22 to 2026-12-01: layer rows with study_uid, without heads and mlp_hidden; bench and lock tables."""
    sa.Table("ltmp_layer_results", meta, *layer_columns(), sa.Column("study_uid", sa.String(32), nullable=True),
             sa.UniqueConstraint("study_name", "trial_number", "layer", name="uq_ltmp_layer"))
    sa.Table("ltmp_bench_results", meta, sa.Column("id", sa.Integer, primary_key=True),
             *[sa.Column(n, sa.String(k), nullable=False) for n, k in (("created", 40), ("plan", 1024), ("model", 256),
                                                                       ("device", 256))],
             sa.Column("batch_size", sa.Integer, nullable=False), sa.Column("mode", sa.String(16), nullable=False),
             sa.Column("amp", sa.Boolean, nullable=False), sa.Column("compiled", sa.Boolean, nullable=False),
             *[sa.Column(n, sa.Float, nullable=False) for n in ("flops_ratio", "images_per_s_base", "images_per_s_plan",
                                                                "latency_ms_base", "latency_ms_plan", "speedup",
                                                                "ideal_fraction")],
             sa.Column("runs", sa.Integer, nullable=False), sa.Column("peak_memory_mb", sa.Float, nullable=True))
    sa.Table("ltmp_study_locks", meta, sa.Column("study_name", sa.String(512), primary_key=True))


def layer_columns() -> list[sa.Column]:
    return [
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_name", sa.String(512), index=True, nullable=False),
        sa.Column("trial_number", sa.Integer, nullable=False), sa.Column("layer", sa.Integer, nullable=False),
        sa.Column("op", sa.String(32), nullable=False), sa.Column("keep", sa.Float, nullable=False),
        *[sa.Column(n, sa.Float, nullable=True)
          for n in ("merge_keep", "merge_threshold", "prune_threshold", "kept_tokens")],
    ]


BENCH_ROW = dict(created="2026-11-30T10:00:00", plan="old plan", model="deit_tiny_patch16_224", device="cpu",
                 batch_size=8, mode="static", amp=False, compiled=False, flops_ratio=0.5, images_per_s_base=100.0,
                 images_per_s_plan=180.0, latency_ms_base=80.0, latency_ms_plan=44.0, speedup=1.8,
                 ideal_fraction=0.9, runs=5, peak_memory_mb=None)


def old_database(url: str, release) -> None:
    """A database an earlier version used: Optuna's study ``old`` with one finished trial, and that
    version's tables holding the trial's two layer rows (and, where it had the table, a bench row)."""
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(study_name="old", storage=storage)
    plan = {"layers": [{"op": "merge", "keep": 0.8}, {"op": "prune", "keep": 0.5}]}
    study.add_trial(optuna.trial.create_trial(value=0.7, user_attrs={"plan": plan, "kept_tokens": [50.0, 25.0]}))
    optuna.create_study(study_name="other", storage=storage)
    storage.engine.dispose()
    meta = sa.MetaData()
    release(meta)
    engine = sa.create_engine(url)
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(meta.tables["ltmp_layer_results"].insert(), [
            dict(study_name="old", trial_number=0, layer=0, op="merge", keep=0.8, kept_tokens=50.0),
            dict(study_name="old", trial_number=0, layer=1, op="prune", keep=0.5, kept_tokens=25.0),
        ])
        if "ltmp_bench_results" in meta.tables:
            conn.execute(meta.tables["ltmp_bench_results"].insert(), [BENCH_ROW])
    engine.dispose()


RELEASES = [first_release, uid_release]


def test_a_new_database_gets_the_models_tables_at_the_newest_revision_beside_optunas(url):
    optuna.create_study(study_name="s", storage=url)  # Optuna's tables and its own alembic_version
    optunas = revision_of_optuna(url)
    Store(url, write=True).dispose()
    assert revision(url) == migrations.head()
    assert differences(url) == []
    assert revision_of_optuna(url) == optunas
    store = Store(url, write=True)
    row = store.add_bench("p", {**BENCH_ROW, "batch": 4})
    store.dispose()
    store = Store(url)
    assert [(r["id"], r["batch"], r["speedup"]) for r in store.bench_history()] == [(row, 4, 1.8)]
    store.dispose()


def revision_of_optuna(url: str) -> str:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()
    return found


@pytest.mark.parametrize("release", RELEASES)
def test_readers_read_an_earlier_versions_tables_as_they_are_and_change_nothing(url, release):
    old_database(url, release)
    before = schema(url)
    with statements() as sent:
        code, out, err = cli("show", "old", "--storage", url, "--json")
        assert code == 0, err
        layers = json.loads(out)["layers"]
        code, out, err = cli("bench", "--history", "--storage", url, "--json")
        assert code == 0, err
        bench = [json.loads(line) for line in out.splitlines()]
        code, out, err = cli("studies", "--storage", url, "--json")
        assert code == 0, err
    assert ddl(sent) == []
    assert schema(url) == before and migrations.VERSION_TABLE not in before
    assert [(r["layer"], r["op"], r["kept_tokens"], r["heads"], r["mlp_hidden"]) for r in layers] == [
        (0, "merge", 50.0, None, None), (1, "prune", 25.0, None, None)]
    if "ltmp_bench_results" in before:
        assert [(r["plan"], r["batch"], r["speedup"], r["peak_memory_mb"]) for r in bench] == [
            ("old plan", 8, 1.8, None)]
    else:
        assert bench == []


@pytest.mark.parametrize("release", RELEASES)
def test_a_writing_command_upgrades_an_earlier_versions_tables_once_and_keeps_their_rows(url, release):
    old_database(url, release)
    with statements() as sent:
        code, _, err = cli("delete", "other", "--storage", url, "--yes")
    assert code == 0, err
    assert ddl(sent), "the tables were upgraded"
    assert revision(url) == migrations.head()
    assert differences(url) == []
    study = optuna.load_study(study_name="old", storage=url)
    with statements() as sent:
        store = Store(url, write=True)
    assert ddl(sent) == [], "a second writer finds the tables at the newest revision"
    assert [(r.layer, r.op, r.study_uid, r.heads) for r in store.layers(study)] == [
        (0, "merge", None, None), (1, "prune", None, None)]
    trial = study.trials[0]  # a copy: the rows a later version writes for it
    trial.user_attrs = {"plan": {"layers": [{"op": "merge", "keep": 0.8, "heads": 2},
                                            {"op": "prune", "keep": 0.5, "mlp_hidden": 64}]}}
    store.record(study, trial)
    assert [(r.heads, r.mlp_hidden) for r in store.layers(study)] == [(2, None), (None, 64)]
    store.dispose()


def open_writer(url: str, ready, results) -> None:
    """One process of :func:`test_writers_that_start_together_upgrade_the_tables_once`."""
    with statements() as sent:
        ready.wait()
        try:
            Store(url, write=True).dispose()
            results.put(("ok", ddl(sent)))
        except Exception as e:  # noqa: BLE001 - the test says which
            results.put((repr(e), ddl(sent)))


@pytest.mark.parametrize("start", ["new", "first release"])
def test_writers_that_start_together_upgrade_the_tables_once(url, start):
    # As `search run --jobs 3` on a database an earlier version made, or on none: the processes open
    # their stores at the same moment.
    if start == "first release":
        old_database(url, first_release)
    spawn = multiprocessing.get_context("spawn")
    ready, results = spawn.Barrier(3), spawn.Queue()
    workers = [spawn.Process(target=open_writer, args=(url, ready, results)) for _ in range(3)]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    assert [outcome for outcome, _ in outcomes] == ["ok"] * 3
    assert revision(url) == migrations.head()
    assert differences(url) == []
    changes = [s.lower() for _, sent in outcomes for s in sent]
    created = ["ltmp_bench_results", "ltmp_study_locks", migrations.VERSION_TABLE]
    if start == "new":
        created.append("ltmp_layer_results")
    for table in ("ltmp_layer_results", "ltmp_bench_results", "ltmp_study_locks", migrations.VERSION_TABLE):
        assert sum(s.startswith(f"create table {table} ") for s in changes) == (table in created), table
    for column in ("study_uid", "heads", "mlp_hidden"):
        assert sum(s.startswith("alter table ltmp_layer_results add") and f" {column} " in s for s in changes) == 1


def test_a_reader_does_not_write(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    Store(url, write=True).dispose()
    store = Store(url)
    study = optuna.create_study(study_name="s", storage=url)
    with pytest.raises(RuntimeError, match="write=True"):
        store.sync(study)
    with pytest.raises(RuntimeError, match="write=True"):
        store.add_bench("p", {**BENCH_ROW, "batch": 1})
    with pytest.raises(RuntimeError, match="write=True"):
        with store.lock("s"):
            pass
    store.dispose()


def test_a_database_a_newer_release_upgraded_is_read_but_not_written(tmp_path):
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    Store(url, write=True).dispose()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = '9999'"))
        conn.execute(sa.text("ALTER TABLE ltmp_layer_results ADD COLUMN later FLOAT"))
        conn.execute(sa.insert(LayerResult.__table__).values(study_name="s", trial_number=0, layer=0, op="none",
                                                             keep=1.0))
    engine.dispose()
    with pytest.raises(LTMPError, match="revision 9999, newer than this release knows"):
        Store(url, write=True)
    study = optuna.create_study(study_name="s", storage=url)
    store = Store(url)
    assert [(r.layer, r.op) for r in store.layers(study)] == [(0, "none")]
    store.dispose()
