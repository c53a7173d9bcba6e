"""The one database that holds all state: studies, series, instances, jobs, results, deliveries.

Every stage of the flow reads its input here and records its output here, in one transaction
with the state change, so a stop at any moment leaves a consistent picture to resume from.
SQLite in WAL mode is the embedded default; timestamps are UNIX seconds (float) so that every
backend compares them the same way.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from dicom_node.state import migrate

metadata = MetaData()

studies = Table(
    "studies",
    metadata,
    Column("study_uid", String(64), primary_key=True),
    Column("patient_id", String(64)),
    Column("patient_name", String(324)),
    Column("accession_number", String(16)),
    Column("study_date", String(8)),
    Column("study_description", String(64)),
    # 'receiving' until the quiet period passes, then 'complete', or 'failed' (with the reason)
    # when completing it failed; the rest of a study's state (queued, running, done, failed)
    # is read from its jobs and deliveries.
    Column("state", String(16), nullable=False),
    Column("first_received_at", Float, nullable=False),
    Column("last_received_at", Float, nullable=False),
    Column("completed_at", Float),
    Column("reason", Text),  # why the study failed, in words
    # The last final state (done, failed) webhooks were told of: a study is announced once per
    # time it ends, however often the notifier looks at it.
    Column("announced_state", String(16)),
    # When retention removed the received instances, and the results the node made (their rows
    # go, the study's stay until its records are purged too): `state.retention`.
    Column("instances_purged_at", Float),
    Column("results_purged_at", Float),
)

series = Table(
    "series",
    metadata,
    Column("series_uid", String(64), primary_key=True),
    Column("study_uid", ForeignKey("studies.study_uid"), nullable=False, index=True),
    Column("modality", String(16)),
    Column("series_number", Integer),
    Column("series_description", String(64)),
)

instances = Table(
    "instances",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("series_uid", ForeignKey("series.series_uid"), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("transfer_syntax_uid", String(64), nullable=False),
    Column("path", Text, nullable=False),
    Column("size", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),  # tells a repeated instance from a changed one
    Column("calling_ae", String(16)),
    Column("received_at", Float, nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_uid", ForeignKey("studies.study_uid"), nullable=False, index=True),
    Column("series_uid", String(64), nullable=False),
    Column("stack", String(128), nullable=False, default=""),  # which stack of the series, "" if one
    Column("pipeline", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # queued, running, done, failed
    Column("priority", Integer, nullable=False, default=0),
    Column("attempts", Integer, nullable=False, default=0),
    Column("not_before", Float, nullable=False, default=0.0),  # retry backoff
    Column("lease_until", Float),
    Column("worker", String(128)),
    Column("reason", Text),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Index("ix_jobs_state", "state", "priority", "created_at"),
)

results = Table(
    "results",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", ForeignKey("jobs.id"), nullable=False, index=True),
    Column("kind", String(8), nullable=False),  # SEG, SR
    Column("sop_instance_uid", String(64), nullable=False, unique=True),
    Column("series_uid", String(64), nullable=False),
    Column("path", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    # The result of the same kind that this one replaces: the same series and pipeline run
    # before (re-run by an operator, or re-opened by a late instance). UIDs are never reused.
    Column("supersedes", ForeignKey("results.id")),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("result_id", ForeignKey("results.id"), nullable=False),
    Column("destination", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # pending, sent, dead (no retry can change it)
    Column("attempts", Integer, nullable=False, default=0),
    Column("not_before", Float, nullable=False),
    Column("last_error", Text),
    Column("sent_at", Float),
    Column("announced_at", Float),  # when webhooks were told this delivery is dead
    # The node (`Config.instance_name`) sending it now; its not_before is then the end of that
    # claim, after which another node's dispatcher may take it (`dispatch.deliver_due`).
    Column("claimed_by", String(128)),
    UniqueConstraint("result_id", "destination"),
    Index("ix_deliveries_state", "state", "not_before"),
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("study_uid", String(64), index=True),
    Column("level", String(8), nullable=False),
    Column("message", Text, nullable=False),
    # Who caused it: empty for the node itself, else the operator's user or token name, and the
    # address the request came from. Events are the audit trail (`state.audit`).
    Column("actor", String(128)),
    Column("address", String(64)),
)

users = Table(
    "users",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("role", String(16), nullable=False),  # viewer, operator, admin
    Column("password_hash", Text, nullable=False),  # argon2id, never the password
    Column("created_at", Float, nullable=False),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    # SHA-256 of the token: tokens are long random strings, so a slow hash adds nothing, and a
    # look-up by digest stays one indexed query per request.
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
)

webhook_posts = Table(
    "webhook_posts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("url", Text, nullable=False),
    Column("event", String(32), nullable=False),
    Column("study_uid", String(64), index=True),
    Column("payload", Text, nullable=False),  # the JSON body, fixed when the event happened
    Column("state", String(16), nullable=False),  # pending, sent, dead
    Column("attempts", Integer, nullable=False, default=0),
    Column("not_before", Float, nullable=False, default=0.0),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Column("sent_at", Float),
    Index("ix_webhook_posts_state", "state", "not_before"),
)

pipeline_checks = Table(
    "pipeline_checks",
    metadata,
    # The last `bundle check` a worker made of a pipeline's bundle at its start; emptied at each
    # start of `serve`, so that a bundle fixed before a restart is not held disabled.
    Column("pipeline", String(64), primary_key=True),
    Column("ready", Integer, nullable=False),  # 1 ready, 0 disabled
    Column("reason", Text),
    Column("worker", String(128)),
    Column("checked_at", Float, nullable=False),
)

cursors = Table(
    "cursors",
    metadata,
    Column("name", String(64), primary_key=True),  # e.g. the last event id the notifier has read
    Column("position", Integer, nullable=False),
)


def now() -> float:
    return time.time()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # Autocommit at the driver level so that SQLAlchemy's "begin" below decides the locking:
    # BEGIN IMMEDIATE takes the write lock up front, so concurrent writers wait on busy_timeout
    # instead of failing mid-transaction with "database is locked".
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


SQLITE_BEGIN = "BEGIN IMMEDIATE"  # how every write transaction of the node starts on SQLite
# For a connection whose commits may return before they are flushed (`DriverConnection`). In WAL
# mode the order of commits is kept: a later flushed commit, any other connection's, flushes it too.
SQLITE_COMMIT_BEFORE_FLUSH = "PRAGMA synchronous=NORMAL"


def _sqlite_begin(connection) -> None:
    if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return  # a connection from reading(): no lock to take
    connection.exec_driver_sql(SQLITE_BEGIN)


def reading(engine: Engine) -> Connection:
    """A connection for reads that need no transaction: on SQLite it takes no lock, so in WAL
    mode it runs beside the writer instead of queueing for the write lock as every
    transaction here does (BEGIN IMMEDIATE). For the polls and look-ups on hot paths."""
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


def unknown_studies(engine: Engine, study_uids: list[str]) -> list[str]:
    """Those of ``study_uids`` that no instance was ever received for."""
    if not study_uids:
        return []
    with reading(engine) as connection:
        known = set(connection.execute(select(studies.c.study_uid).where(studies.c.study_uid.in_(study_uids))).scalars())
    return [uid for uid in study_uids if uid not in known]


def engine_url(url: str) -> str:
    """The SQLAlchemy URL of a URL as operators write it: PostgreSQL through psycopg 3, the
    driver the node ships, whatever the plain ``postgresql://`` would pick."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url.removeprefix(plain)
    return url


def engine_for(url: str) -> Engine:
    """An engine set up the node's way (on SQLite: WAL, the write lock taken up front), without
    looking at its schema: for `dicom-node db upgrade`, which migrates it."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(engine_url(url), future=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def connect(url: str) -> Engine:
    """An engine with the schema in place, at its newest revision (`state.migrate`); safe to
    call from every process of the node."""
    engine = engine_for(url)
    migrate.upgrade(engine)
    return engine


def log_event(connection, study_uid: str | None, level: str, message: str, actor: str | None = None,
              address: str | None = None) -> None:
    """Record what an operator needs to see in `dicom-node status` and the audit trail;
    ``actor`` and ``address`` name the operator whose action it was."""
    connection.execute(
        events.insert().values(at=now(), study_uid=study_uid, level=level, message=message, actor=actor,
                               address=address)
    )


def upsert(connection: Connection, table: Table, key: dict, values: dict) -> None:
    """Insert the row of ``key``, or update it with ``values`` if it exists, in one statement.

    An update followed by an insert when nothing was updated races: two workers of several
    hosts checking the same pipeline at their start both find no row, and the second insert
    fails on the primary key. Both backends the node runs on have ``ON CONFLICT DO UPDATE``.
    """
    dialect_insert = postgresql_insert if connection.dialect.name == "postgresql" else sqlite_insert
    statement = dialect_insert(table).values(**key, **values)
    connection.execute(statement.on_conflict_do_update(index_elements=list(key), set_=values))


def claim_due(engine: Engine, table: Table, due: list[tuple[int, float]], until: float, **values) -> set[int]:
    """The ids of ``due`` (id, not_before as read) that this process now holds: each row's
    not_before moved to ``until`` (with ``values``) on the condition that it is still pending
    and still what was read, so that of the processes or nodes that read it as due, one takes
    it. A holder that dies leaves the row to the others once ``until`` passes."""
    with engine.begin() as connection:
        return {row_id for row_id, not_before in due if connection.execute(
            table.update().where(table.c.id == row_id, table.c.state == "pending", table.c.not_before == not_before)
            .values(not_before=until, **values)).rowcount}
