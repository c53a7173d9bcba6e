"""The receiver's driver-level connection on a real SQLite database: statements compiled once
run with named parameters, a transaction commits or leaves nothing, and a connection that broke
is replaced instead of failing every later transaction."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import func, select, text

from dicom_node.ingest.driver_connection import DriverConnection
from dicom_node.state import db

_NEW_STUDY = text(
    "INSERT INTO studies (study_uid, state, first_received_at, last_received_at) "
    "VALUES (:study_uid, 'receiving', :at, :at)"
)


def _studies(engine) -> list[str]:
    with db.reading(engine) as connection:
        return list(connection.execute(select(db.studies.c.study_uid).order_by(db.studies.c.study_uid)).scalars())


def test_a_committed_transaction_is_seen_by_other_connections(tmp_path):
    engine = db.connect(f"sqlite:///{tmp_path / 'node.sqlite'}")
    driver = DriverConnection(engine)
    insert = driver.prepare(_NEW_STUDY)
    with driver.transaction() as cursor:
        insert.run(cursor, {"at": 1.0, "study_uid": "1.2"})  # parameters by name, any order
        insert.run(cursor, {"study_uid": "1.3", "at": 2.0})
    assert _studies(engine) == ["1.2", "1.3"]
    with db.reading(engine) as connection:
        assert connection.execute(select(func.sum(db.studies.c.first_received_at))).scalar_one() == 3.0


def test_a_failing_transaction_leaves_nothing(tmp_path):
    engine = db.connect(f"sqlite:///{tmp_path / 'node.sqlite'}")
    driver = DriverConnection(engine)
    insert = driver.prepare(_NEW_STUDY)
    with pytest.raises(sqlite3.IntegrityError), driver.transaction() as cursor:
        insert.run(cursor, {"study_uid": "1.2", "at": 1.0})
        insert.run(cursor, {"study_uid": "1.2", "at": 1.0})  # the same key again
    assert _studies(engine) == []
    with driver.transaction() as cursor:  # the connection is usable again
        insert.run(cursor, {"study_uid": "1.4", "at": 1.0})
    assert _studies(engine) == ["1.4"]


def test_a_broken_connection_is_replaced(tmp_path):
    engine = db.connect(f"sqlite:///{tmp_path / 'node.sqlite'}")
    driver = DriverConnection(engine)
    insert = driver.prepare(_NEW_STUDY)
    driver._connection.driver_connection.close()  # as a database restart would leave it
    with pytest.raises(sqlite3.ProgrammingError), driver.transaction() as cursor:
        insert.run(cursor, {"study_uid": "1.5", "at": 1.0})
    with driver.transaction() as cursor:
        insert.run(cursor, {"study_uid": "1.6", "at": 1.0})
    assert _studies(engine) == ["1.6"]


def test_a_transaction_takes_the_write_lock_at_its_start(tmp_path):
    """As every transaction of the node does, so that writers queue instead of failing."""
    engine = db.connect(f"sqlite:///{tmp_path / 'node.sqlite'}")
    driver = DriverConnection(engine)
    other = sqlite3.connect(tmp_path / "node.sqlite", timeout=0)
    with driver.transaction(), pytest.raises(sqlite3.OperationalError, match="locked"):
        other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")
    other.rollback()


def _synchronous(dbapi_connection) -> int:
    cursor = dbapi_connection.cursor()
    try:
        return cursor.execute("PRAGMA synchronous").fetchone()[0]
    finally:
        cursor.close()


def test_commits_that_need_not_wait_for_the_disk_stay_on_their_own_connection(tmp_path):
    engine = db.connect(f"sqlite:///{tmp_path / 'node.sqlite'}")
    driver = DriverConnection(engine, durable_commits=False)
    with driver.transaction() as cursor:
        assert cursor.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: flushed at checkpoints
        driver.prepare(_NEW_STUDY).run(cursor, {"study_uid": "1.2", "at": 1.0})
    driver.close()
    assert _studies(engine) == ["1.2"]
    for _ in range(3):  # whatever the pool hands out now flushes every commit, as before
        pooled = engine.raw_connection()
        assert _synchronous(pooled) == 2  # FULL
        pooled.close()
    durable = DriverConnection(engine)
    with durable.transaction() as cursor:
        assert cursor.execute("PRAGMA synchronous").fetchone()[0] == 2
    durable.close()
