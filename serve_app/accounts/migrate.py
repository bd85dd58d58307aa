"""Bring an accounts database to the schema of this code, with the Alembic revisions
shipped in ``serve_app/accounts/migrations``.

Runs when a store opens (every ingress replica, the CLI) and as ``imagegen db upgrade``.
Several processes may open a fresh database at once: the whole upgrade runs in one
transaction that first takes a lock (``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped
advisory lock on PostgreSQL), so each revision is applied exactly once and the others then
find the database current.

A SQLite file made before Alembic (the hand-written migrations counted by
``PRAGMA user_version``) is stamped at the revision matching its version, then upgraded.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from serve_app.accounts.errors import SchemaTooNew

MIGRATIONS = Path(__file__).with_name("migrations")
# PRAGMA user_version of the pre-Alembic SQLite schema -> the revision with the same tables.
LEGACY_SQLITE_VERSIONS = {1: "0001", 2: "0002"}
# Any constant shared by every process of the service: the key of the advisory lock.
_PG_LOCK_KEY = 0x696D6167656E  # "imagen"


def _config(connection: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def current_revision(engine: sa.Engine) -> str | None:
    """The revision the database is at; None for an empty (or pre-Alembic) database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: sa.Engine) -> tuple[str | None, str]:
    """Upgrade to the newest revision; returns (revision found, revision now).

    Raises SchemaTooNew if the database is at a revision this code does not know (it was
    upgraded by a newer release) rather than touching it.
    """
    with engine.connect() as connection:
        connection = connection.execution_options(sqlite_begin="IMMEDIATE")
        with connection.begin():
            if connection.dialect.name == "postgresql":
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            config = _config(connection)
            found = MigrationContext.configure(connection).get_current_revision()
            if found is None and connection.dialect.name == "sqlite":
                found = _adopt_legacy_sqlite(connection, config)
            if found is not None:
                try:
                    ScriptDirectory.from_config(config).get_revision(found)
                except CommandError:
                    raise SchemaTooNew(
                        f"the accounts database is at schema revision {found!r}, newer than this code "
                        f"(newest {head_revision()!r}): upgrade the service"
                    ) from None
            command.upgrade(config, "head")
            now = MigrationContext.configure(connection).get_current_revision()
    return found, now


def _adopt_legacy_sqlite(connection: sa.Connection, config: Config) -> str | None:
    """Stamp a pre-Alembic SQLite database at its matching revision; None if it is empty."""
    version = connection.exec_driver_sql("PRAGMA user_version").scalar_one()
    if version == 0:
        return None
    revision = LEGACY_SQLITE_VERSIONS.get(version)
    if revision is None:
        raise SchemaTooNew(
            f"the accounts database has the pre-Alembic schema version {version}, newer than this code knows"
        )
    command.stamp(config, revision)
    return revision


__all__ = ["LEGACY_SQLITE_VERSIONS", "MIGRATIONS", "current_revision", "head_revision", "upgrade"]
