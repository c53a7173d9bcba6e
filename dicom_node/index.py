"""The instance index: what runs in the database for every received instance.

This is the receiver's hot path, so its statements are written once, as plain SQL with bound
parameters (valid on SQLite and PostgreSQL alike), rather than built anew for every instance:
building them took most of the index's time (measured: 2.5 ms an instance, against 0.6 ms
for the same transaction with statements written once).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, TextClause, text

from . import db


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
_SERIES = _insert(db.series, "series_uid", update=False)
_INSTANCE = _insert(db.instances, "sop_instance_uid", update=True)


def stored_digest(connection: Connection, sop_instance_uid: str) -> str | None:
    """SHA-256 of the copy already stored under this SOP Instance UID, if any."""
    row = connection.execute(_DIGEST, {"sop_instance_uid": sop_instance_uid}).first()
    return row.sha256 if row else None


def index_instance(connection: Connection, header: InstanceHeader, instance: dict, late_arrivals: str) -> None:
    """Study, series and instance rows for one stored file, in the caller's transaction.

    A study that was complete is re-opened by a new instance (``late_arrivals = "reprocess"``)
    or keeps its state (``"ignore"``); either way the instance is indexed and the event logged.
    The usual case, an instance of a study still receiving, takes one statement for the study.
    """
    received_at = instance["received_at"]
    touched = connection.execute(_STILL_RECEIVING, {"study_uid": header.study_uid, "received_at": received_at})
    if touched.rowcount == 0:
        study = connection.execute(_STUDY_STATE, {"study_uid": header.study_uid}).first()
        if study is None:
            if header.study is None:
                raise LookupError(f"study {header.study_uid} has no row, and no values were read for one")
            connection.execute(_NEW_STUDY, {"study_uid": header.study_uid, "received_at": received_at, **header.study})
        elif late_arrivals == "reprocess":
            db.log_event(connection, header.study_uid, "info", f"re-opened by a late instance {header.sop_instance_uid}")
            connection.execute(_STUDY_RECEIVING, {"study_uid": header.study_uid, "received_at": received_at})
        else:
            message = f"late instance {header.sop_instance_uid} stored, not processed (late_arrivals = ignore)"
            db.log_event(connection, header.study_uid, "info", message)
    if header.series is not None:
        connection.execute(_SERIES, {"series_uid": header.series_uid, "study_uid": header.study_uid, **header.series})
    connection.execute(_INSTANCE, instance)
