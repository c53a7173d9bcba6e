"""Statements run on the database driver's own connection, for the receiver's hot path.

SQLAlchemy's work around each statement and transaction (execution contexts, events, the
pool's check-out and reset) cost 0.45 ms of CPU for every received instance, six times the
index transaction itself (measured on tmpfs: 0.50 ms against 0.07 ms). That CPU is what
limits a receiver taking small images from several associations. Here one driver connection
is held, and statements stay SQLAlchemy text clauses compiled once for the engine's dialect,
so the same SQL runs on every backend the node supports.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

from sqlalchemy import Engine, TextClause

from dicom_node.state import db


class Prepared:
    """A text clause as the driver takes it: its SQL in the driver's parameter style, and the
    order of its parameters where that style is positional."""

    def __init__(self, engine: Engine, clause: TextClause) -> None:
        compiled = clause.compile(dialect=engine.dialect)
        self.sql = compiled.string
        self._order: tuple[str, ...] | None = tuple(compiled.positiontup or ()) if compiled.positional else None

    def run(self, cursor: Any, parameters: Mapping[str, Any]) -> Any:
        """Execute on ``cursor`` (a DB-API cursor) and return it, for rowcount or rows."""
        if self._order is None:
            cursor.execute(self.sql, parameters)
        else:
            cursor.execute(self.sql, [parameters[name] for name in self._order])
        return cursor


class DriverConnection:
    """One driver connection; its transactions run one at a time, and `close` waits for the
    one in flight. On SQLite a transaction takes the write lock up front, as every transaction
    of the node does (`db.SQLITE_BEGIN`); the connection's pragmas are the engine's, set when
    the pool connected it.

    ``durable_commits=False`` lets a commit return before the disk has it (SQLite's
    synchronous=NORMAL, for this connection only): a killed process loses nothing, a power cut
    may lose the last commits. Only for rows that can be rebuilt from what is on disk (the
    receiver's index rows: `recovery`). Such a connection never goes back to the engine's pool,
    where another user would inherit its setting.
    """

    def __init__(self, engine: Engine, durable_commits: bool = True) -> None:
        self.engine = engine
        self.durable_commits = durable_commits
        self._begin = db.SQLITE_BEGIN if engine.dialect.name == "sqlite" else None
        self._connection = self._connect()
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        connection = self.engine.raw_connection()
        if not self.durable_commits and self.engine.dialect.name == "sqlite":
            cursor = connection.cursor()
            cursor.execute(db.SQLITE_COMMIT_BEFORE_FLUSH)
            cursor.close()
        return connection

    def prepare(self, clause: TextClause) -> Prepared:
        return Prepared(self.engine, clause)

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A DB-API cursor inside a transaction, committed when the block ends, rolled back if
        it raises. A connection that cannot even roll back is replaced by a new one, so a
        database restart costs the transactions in flight, not every later one."""
        with self._lock:
            cursor = None
            try:
                cursor = self._connection.cursor()
                if self._begin:
                    cursor.execute(self._begin)
                yield cursor
                self._connection.commit()
            except BaseException:
                self._roll_back()
                raise
            finally:
                if cursor is not None:
                    with suppress(Exception):  # a cursor of a connection just replaced
                        cursor.close()

    def _roll_back(self) -> None:
        try:
            self._connection.rollback()
        except Exception:  # noqa: BLE001 - the connection is unusable: start a fresh one
            self._connection.invalidate()
            self._connection = self._connect()

    def close(self) -> None:
        """Hand the connection back to the engine's pool (close it, if its commits are not
        durable), once the transaction in flight ends."""
        with self._lock:
            if not self.durable_commits:
                self._connection.invalidate()
            self._connection.close()
