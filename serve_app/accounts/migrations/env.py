"""Alembic's entry point. ``serve_app.accounts.migrate`` hands it an open connection that
already holds the migration lock inside a transaction; the revisions run in it."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection)
with context.begin_transaction():
    context.run_migrations()
