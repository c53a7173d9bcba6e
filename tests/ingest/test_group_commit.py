"""Group commit on a real SQLite database: callers that arrive while another commits share the
next transaction, each returns only once its rows are committed, and a failing item fails alone."""

from __future__ import annotations

import threading

from sqlalchemy import Connection, func, insert, select

from dicom_node.ingest.group_commit import GroupCommit
from dicom_node.state import db


def _insert_study(connection: Connection, uid: str) -> int:
    if uid.endswith(".bad"):
        raise ValueError(f"cannot record {uid}")
    connection.execute(insert(db.studies).values(study_uid=uid, state="receiving", first_received_at=1.0,
                                                 last_received_at=1.0))
    return id(connection)


def _count(engine) -> int:
    with db.reading(engine) as connection:
        return connection.execute(select(func.count()).select_from(db.studies)).scalar_one()


def test_callers_waiting_for_a_commit_share_the_next_one(tmp_path):
    engine = db.connect(f"sqlite:///{tmp_path / 'node.sqlite'}")
    first_inside, release_first = threading.Event(), threading.Event()
    transactions: dict[str, int] = {}

    def record(connection: Connection, uid: str) -> int:
        if uid == "1.1":
            first_inside.set()
            release_first.wait(10)
        transactions[uid] = id(connection.get_transaction())
        return _insert_study(connection, uid)

    commit = GroupCommit(engine.begin, record)
    first = threading.Thread(target=commit, args=("1.1",))
    first.start()
    assert first_inside.wait(10)
    others = [threading.Thread(target=commit, args=(f"1.{n}",)) for n in range(2, 9)]
    for thread in others:
        thread.start()
    while len(commit._pending) < len(others):  # all seven queued behind the first commit
        threading.Event().wait(0.01)
    release_first.set()
    for thread in [first, *others]:
        thread.join(10)
    assert _count(engine) == 8
    later = {transactions[f"1.{n}"] for n in range(2, 9)}
    assert len(later) == 1 and transactions["1.1"] not in later  # one transaction for the seven


def test_a_caller_returns_after_its_rows_are_committed(tmp_path):
    engine = db.connect(f"sqlite:///{tmp_path / 'node.sqlite'}")
    commit = GroupCommit(engine.begin, _insert_study)
    for n in range(5):
        commit(f"2.{n}")
        assert _count(engine) == n + 1  # visible to another connection at once


def test_a_failing_item_fails_alone(tmp_path):
    engine = db.connect(f"sqlite:///{tmp_path / 'node.sqlite'}")
    gate = threading.Event()

    def record(connection: Connection, uid: str) -> int:
        if uid == "3.0":
            gate.wait(10)
        return _insert_study(connection, uid)

    commit = GroupCommit(engine.begin, record)
    errors: dict[str, Exception] = {}

    def call(uid: str) -> None:
        try:
            commit(uid)
        except ValueError as error:
            errors[uid] = error

    threads = [threading.Thread(target=call, args=(uid,)) for uid in ("3.0", "3.1", "3.bad", "3.2")]
    threads[0].start()
    while not commit._committing.locked():
        threading.Event().wait(0.01)
    for thread in threads[1:]:
        thread.start()
    while len(commit._pending) < 3:  # the failing item shares a batch with two good ones
        threading.Event().wait(0.01)
    gate.set()
    for thread in threads:
        thread.join(10)
    assert list(errors) == ["3.bad"] and "cannot record 3.bad" in str(errors["3.bad"])
    with db.reading(engine) as connection:
        stored = set(connection.execute(select(db.studies.c.study_uid)).scalars())
    assert stored == {"3.0", "3.1", "3.2"}
