"""Versioned migrations of the node's schema (Alembic), one script per change under
`migrations/versions/` (a folder of scripts that Alembic runs, not a package).

Every process that connects brings the database to the newest revision first (`upgrade`), and
`dicom-node db upgrade` does it on its own; the usual case, a database already there, costs one
read. A database made before migrations existed (its tables, no revision) is marked as the
baseline, the schema it holds, and upgraded in place.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect

FOLDER = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)
# Alembic says at INFO, in every process that connects, which backend it found: noise in the
# node's log. What was migrated is said here instead, once.
logging.getLogger("alembic").setLevel(logging.WARNING)
BASELINE = "0001"
# Held while PostgreSQL is migrated, so that processes starting at once migrate one at a time;
# on SQLite the write lock that every transaction of the node takes does the same.
ADVISORY_LOCK = 0x44434D4E  # "DCMN"


def _config(connection: Connection | None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(FOLDER))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    return ScriptDirectory.from_config(_config(None)).get_current_head()


def current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the database to the newest revision; (revision before, after), before None for an
    empty database. The revision is looked at again under the lock, so that of several
    processes starting together one migrates and the others find it done."""
    target = head()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        if current(connection) == target:
            return target, target
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK})")
        before = current(connection)
        if before == target:
            return before, target
        config = _config(connection)
        if before is None and inspect(connection).has_table("studies"):
            command.stamp(config, BASELINE)
            before = BASELINE
        command.upgrade(config, "head")
    log.info("database schema %s revision %s", f"upgraded from revision {before} to" if before else "created at",
             target)
    return before, target
