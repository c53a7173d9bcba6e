"""The database's locking contract: writers queue for the write lock, readers never do.

Every transaction takes SQLite's write lock up front (BEGIN IMMEDIATE), so that concurrent
writers wait instead of failing half-way. The polls on hot paths (idle workers,
completion and dispatch loops) use ``db.reading``, which must not
queue behind a writer: in WAL mode a reader sees the last commit while a write is in progress.
"""

from __future__ import annotations

import threading

from sqlalchemy import insert, select

from dicom_node.state import db, pipeline_checks
from tests.support.races import second_writer_while_the_first_is_open


def _study(uid: str) -> dict:
    return {"study_uid": uid, "state": "receiving", "first_received_at": 1.0, "last_received_at": 1.0}


def test_a_read_runs_while_a_writer_holds_the_lock(tmp_path):
    engine = db.connect(f"sqlite:///{tmp_path / 'node.sqlite'}")
    with engine.begin() as connection:
        connection.execute(insert(db.studies).values(**_study("1.2.1")))
    seen: list[list[str]] = []

    def read() -> None:
        with db.reading(engine) as connection:
            seen.append([row.study_uid for row in connection.execute(select(db.studies.c.study_uid))])

    with engine.begin() as writer:  # holds the write lock until the block ends
        writer.execute(insert(db.studies).values(**_study("1.2.2")))
        reader = threading.Thread(target=read)
        reader.start()
        reader.join(timeout=20)  # a reader queueing for the lock would wait out busy_timeout (60 s)
        assert not reader.is_alive(), "a read waited for the writer's lock"
    assert seen == [["1.2.1"]], "the read should see the last commit, not the write in progress"


def test_a_second_writer_waits_for_the_first_instead_of_failing(tmp_path):
    engine = db.connect(f"sqlite:///{tmp_path / 'node.sqlite'}")
    done = threading.Event()

    def write() -> None:
        with engine.begin() as connection:
            connection.execute(insert(db.studies).values(**_study("1.2.4")))
        done.set()

    with engine.begin() as first:
        first.execute(insert(db.studies).values(**_study("1.2.3")))
        second = threading.Thread(target=write)
        second.start()
        assert not done.wait(timeout=1.0), "the second writer did not wait for the write lock"
    second.join(timeout=30)
    assert done.is_set()
    with db.reading(engine) as connection:
        assert {row.study_uid for row in connection.execute(select(db.studies.c.study_uid))} == {"1.2.3", "1.2.4"}


def test_two_workers_recording_the_same_pipeline_check_at_once_both_succeed(database_url):
    """Workers of several hosts check the same pipelines at their start. While the first one's
    row is not yet committed, the second finds none to update; an insert then fails on the key
    (PostgreSQL), and the worker died of it before it ever ran a job."""
    engine = db.connect(database_url)
    errors = second_writer_while_the_first_is_open(
        engine.begin(),
        lambda first_worker: db.upsert(first_worker, db.pipeline_checks, {"pipeline": "ct-demo"},
                                       {"ready": 0, "reason": "not yet", "worker": "worker-a",
                                        "checked_at": db.now()}),
        lambda: pipeline_checks.record(engine, "ct-demo", None, "worker-b"),
    )
    assert errors == []
    with db.reading(engine) as connection:
        rows = connection.execute(select(db.pipeline_checks.c.worker, db.pipeline_checks.c.ready)).all()
    assert [tuple(row) for row in rows] == [("worker-b", 1)]
