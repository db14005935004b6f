"""Versions of the project's own tables (``search.study.tables``), kept with alembic as Optuna keeps its own.

Each change of the schema is one revision script in ``versions/``; a database records the revision
it is at in the table :data:`VERSION_TABLE` (Optuna records its own in ``alembic_version``, in the
same database, so this project's version lives in a table of its own name).

Databases made before versioning have the project's tables, or some of them, and no version table:
they are at "no revision" like an empty database, and every revision first looks at what is there
and changes only what is missing. That also makes a revision safe to run again after a failure half
way through (MySQL and SQLite do not roll DDL back).

A new revision: a file ``versions/NNNN_what.py`` with ``revision = "NNNN"``, ``down_revision`` the
previous one and an ``upgrade()`` that checks before it changes (see :func:`has_column`); write
the models in ``search/study/tables.py`` to match, and ``tests/search/test_tables.py`` checks that the
revisions build the models' schema on every database it has. There are no downgrades: an older
release reads a newer schema as it is.
"""

from __future__ import annotations

import threading
from functools import cache
from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import Connection

__all__ = ["VERSION_TABLE", "head", "known", "current", "upgrade", "has_table", "has_column"]

#: The table that holds the revision of the project's tables (not Optuna's ``alembic_version``).
VERSION_TABLE = "ltmp_schema_version"

SCRIPTS = Path(__file__).parent

# alembic's ``context`` and ``op`` are module globals: one upgrade at a time in a process (other
# processes are kept out by the caller's lock in the database).
_RUNNING = threading.Lock()


@cache
def _script():  # alembic is imported only where a schema is read or changed
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(SCRIPTS))


def head() -> str:
    """The newest revision, the one this code's models are written for."""
    return _script().get_current_head()


def known(revision: str) -> bool:
    """Whether ``revision`` is one of this code's (a newer release may have written a later one)."""
    return revision in {script.revision for script in _script().walk_revisions()}


def current(connection: Connection) -> str | None:
    """The revision the database is at: ``None`` for a new one or one made before versioning. Reads only."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(connection: Connection) -> None:
    """Run the revisions the database lacks, in one transaction of ``connection`` (one that PostgreSQL
    rolls back whole on failure). The caller holds a lock that keeps other processes out."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(SCRIPTS).replace("%", "%%"))
    config.attributes.update(connection=connection, version_table=VERSION_TABLE)
    with _RUNNING, connection.begin():
        command.upgrade(config, "head")


def has_table(connection: Connection, table: str) -> bool:
    return inspect(connection).has_table(table)


def has_column(connection: Connection, table: str, column: str) -> bool:
    return column in {c["name"] for c in inspect(connection).get_columns(table)}
