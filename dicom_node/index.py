"""The instance index: what runs in the database for every received instance.

This is the receiver's hot path. Its statements are written once, as plain SQL with bound
parameters (valid on SQLite and PostgreSQL alike): building them anew for every instance took
most of the index's time (2.5 ms an instance, against 0.6 ms once written). They run on the
driver's connection (`driver_sql`): SQLAlchemy's execution around them was the next cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import TextClause, text

from . import db
from .driver_sql import DriverConnection


@dataclass(frozen=True)
class InstanceHeader:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    # Columns of the studies and series rows; None when the receiver knows both rows exist.
    study: dict | None = None
    series: dict | None = None


def _insert(table, conflict: str, update: bool) -> TextClause:
    names = [column.name for column in table.columns]
    action = (
        "DO UPDATE SET " + ", ".join(f"{name} = excluded.{name}" for name in names if name != conflict)
        if update else "DO NOTHING"
    )
    return text(
        f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join(':' + n for n in names)}) "
        f"ON CONFLICT ({conflict}) {action}"
    )


_DIGEST = text("SELECT sha256 FROM instances WHERE sop_instance_uid = :sop_instance_uid")
_STUDY_STATE = text("SELECT state FROM studies WHERE study_uid = :study_uid")
_NEW_STUDY = text(
    "INSERT INTO studies (study_uid, patient_id, patient_name, accession_number, study_date, study_description, "
    "state, first_received_at, last_received_at) VALUES (:study_uid, :patient_id, :patient_name, "
    ":accession_number, :study_date, :study_description, 'receiving', :received_at, :received_at)"
)
_STUDY_RECEIVING = text(
    "UPDATE studies SET state = 'receiving', last_received_at = :received_at WHERE study_uid = :study_uid"
)
_STILL_RECEIVING = text(
    "UPDATE studies SET last_received_at = :received_at WHERE study_uid = :study_uid AND state = 'receiving'"
)
_EVENT = text("INSERT INTO events (at, study_uid, level, message) VALUES (:at, :study_uid, :level, :message)")
_SERIES = _insert(db.series, "series_uid", update=False)
_INSTANCE = _insert(db.instances, "sop_instance_uid", update=True)


class InstanceIndex:
    """Records stored files in the index, through one driver connection that its callers take
    in turn (the receiver's group commit)."""

    def __init__(self, connection: DriverConnection, late_arrivals: str) -> None:
        self.late_arrivals = late_arrivals
        prepare = connection.prepare
        self._digest, self._study_state, self._new_study = prepare(_DIGEST), prepare(_STUDY_STATE), prepare(_NEW_STUDY)
        self._study_receiving, self._still_receiving = prepare(_STUDY_RECEIVING), prepare(_STILL_RECEIVING)
        self._event, self._series, self._instance = prepare(_EVENT), prepare(_SERIES), prepare(_INSTANCE)

    def record(self, cursor: Any, header: InstanceHeader, instance: dict) -> bool:
        """Study, series and instance rows for one stored file, in the transaction of ``cursor``
        (`DriverConnection.transaction`); False, with nothing changed, for a repeat of the
        stored instance (same SHA-256).

        A study that was complete is re-opened by a new instance (``late_arrivals =
        "reprocess"``) or keeps its state (``"ignore"``); either way the instance is indexed and
        the event logged. The usual case, an instance of a study still receiving, takes one
        statement for the study.
        """
        stored = self._digest.run(cursor, {"sop_instance_uid": header.sop_instance_uid}).fetchone()
        if stored is not None and stored[0] == instance["sha256"]:
            return False
        received_at = instance["received_at"]
        study_uid = header.study_uid
        if self._still_receiving.run(cursor, {"study_uid": study_uid, "received_at": received_at}).rowcount == 0:
            if self._study_state.run(cursor, {"study_uid": study_uid}).fetchone() is None:
                if header.study is None:
                    raise LookupError(f"study {study_uid} has no row, and no values were read for one")
                self._new_study.run(cursor, {"study_uid": study_uid, "received_at": received_at, **header.study})
            elif self.late_arrivals == "reprocess":
                self._log(cursor, study_uid, f"re-opened by a late instance {header.sop_instance_uid}")
                self._study_receiving.run(cursor, {"study_uid": study_uid, "received_at": received_at})
            else:
                self._log(cursor, study_uid, f"late instance {header.sop_instance_uid} stored, not processed "
                                             "(late_arrivals = ignore)")
        if header.series is not None:
            self._series.run(cursor, {"series_uid": header.series_uid, "study_uid": study_uid, **header.series})
        self._instance.run(cursor, instance)
        return True

    def _log(self, cursor: Any, study_uid: str, message: str) -> None:
        """As `db.log_event`, in this transaction."""
        self._event.run(cursor, {"at": db.now(), "study_uid": study_uid, "level": "info", "message": message})
