"""Alembic's entry point for :func:`search.study.migrations.upgrade`: runs the revisions on the caller's connection."""

from alembic import context

config = context.config
context.configure(connection=config.attributes["connection"], version_table=config.attributes["version_table"])
with context.begin_transaction():  # inside the caller's transaction: no second one
    context.run_migrations()
