"""The instance index: what runs in the database for every received instance.

This is the receiver's hot path. Its statements are written once, as plain SQL with bound
parameters (valid on SQLite and PostgreSQL alike): building them anew for every instance took
most of the index's time (2.5 ms an instance, against 0.6 ms once written). They run on the
driver's connection (`driver_connection`): SQLAlchemy's execution around them was the next cost.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydicom import Dataset
from sqlalchemy import TextClause, text

from dicom_node.ingest.driver_connection import DriverConnection
from dicom_node.state import db, files


@dataclass(frozen=True)
class InstanceHeader:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    # Columns of the studies and series rows; None when the receiver knows both rows exist.
    study: dict | None = None
    series: dict | None = None


STUDY_INSTANCE_UID, SERIES_INSTANCE_UID = 0x0020000D, 0x0020000E
SOP_INSTANCE_UID, SOP_CLASS_UID = 0x00080018, 0x00080016


def header_of(dataset: Dataset) -> InstanceHeader | None:
    """The UIDs the index needs, or None where one is missing or not a valid UID. The receiver
    reads them before anything is written: a dataset that fails to parse half-way is refused
    whole, never half-stored. They are read from the elements' bytes: pydicom's conversion of
    each value cost more than the rest of the parse."""
    uids = [_uid(dataset, tag) for tag in (STUDY_INSTANCE_UID, SERIES_INSTANCE_UID, SOP_INSTANCE_UID, SOP_CLASS_UID)]
    if not all(uids):
        return None
    study_uid, series_uid, sop_instance_uid, sop_class_uid = uids
    if not all(files.is_valid_uid(uid) for uid in (study_uid, series_uid, sop_instance_uid)):
        return None
    return InstanceHeader(study_uid, series_uid, sop_instance_uid, sop_class_uid)


def described(header: InstanceHeader, dataset: Dataset) -> InstanceHeader:
    """``header`` with the values of the study and series rows, for an instance of a series
    not known to be indexed yet (the rows keep their first instance's values)."""
    return replace(
        header,
        study={
            "patient_id": str(dataset.get("PatientID", "")),
            "patient_name": str(dataset.get("PatientName", "")),
            "accession_number": str(dataset.get("AccessionNumber", "")),
            "study_date": str(dataset.get("StudyDate", "")),
            "study_description": str(dataset.get("StudyDescription", "")),
        },
        series={
            "modality": str(dataset.get("Modality", "")),
            "series_number": _int_or_none(dataset.get("SeriesNumber")),
            "series_description": str(dataset.get("SeriesDescription", "")),
        },
    )


def _uid(dataset: Dataset, tag: int) -> str | None:
    """A UID element's value, unconverted: ASCII by definition, whatever the character set."""
    element = dataset.get_item(tag)
    if element is None or not element.value:
        return None
    value = element.value
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return text.strip("\0 ") or None


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def content_digest(content: bytes) -> str:
    """What tells a repeated instance from a changed one: SHA-256 of the file's bytes."""
    return hashlib.sha256(content).hexdigest()


def instance_row(header: InstanceHeader, path: Path, size: int, digest: str, transfer_syntax: str,
                 calling_ae: str | None, received_at: float) -> dict:
    """The instances row of a stored file of ``size`` bytes, meta header included, whose
    `content_digest` is ``digest``."""
    return {
        "sop_instance_uid": header.sop_instance_uid,
        "series_uid": header.series_uid,
        "study_uid": header.study_uid,
        "sop_class_uid": header.sop_class_uid,
        "transfer_syntax_uid": transfer_syntax,
        "path": str(path),
        "size": size,
        "sha256": digest,
        "calling_ae": calling_ae,
        "received_at": received_at,
    }


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


_STORED = text("SELECT sha256, study_uid, path FROM instances WHERE sop_instance_uid = :sop_instance_uid")
_STUDY_STATE = text("SELECT state, instances_purged_at FROM studies WHERE study_uid = :study_uid")
# Two nodes on one database can both find no row for a study whose first instances reach
# them at once: the second insert then waits for the first and only moves its clock on.
_NEW_STUDY = text(
    "INSERT INTO studies (study_uid, patient_id, patient_name, accession_number, study_date, study_description, "
    "state, first_received_at, last_received_at) VALUES (:study_uid, :patient_id, :patient_name, "
    ":accession_number, :study_date, :study_description, 'receiving', :received_at, :received_at) "
    "ON CONFLICT (study_uid) DO UPDATE SET last_received_at = CASE WHEN excluded.last_received_at > "
    "studies.last_received_at THEN excluded.last_received_at ELSE studies.last_received_at END"
)
_STUDY_RECEIVING = text(
    "UPDATE studies SET state = 'receiving', reason = NULL, last_received_at = :received_at "
    "WHERE study_uid = :study_uid"
)
_STUDY_ANEW = text(
    "UPDATE studies SET state = 'receiving', reason = NULL, first_received_at = :received_at, "
    "last_received_at = :received_at, completed_at = NULL, announced_state = NULL, instances_purged_at = NULL, "
    "results_purged_at = NULL WHERE study_uid = :study_uid"
)
_STILL_RECEIVING = text(
    "UPDATE studies SET last_received_at = :received_at WHERE study_uid = :study_uid AND state = 'receiving'"
)
_EVENT = text("INSERT INTO events (at, study_uid, level, message) VALUES (:at, :study_uid, :level, :message)")
_STUDY_EXISTS = text("SELECT 1 FROM studies WHERE study_uid = :study_uid")
_SERIES = _insert(db.series, "series_uid", update=False)
_INSTANCE = _insert(db.instances, "sop_instance_uid", update=True)


@dataclass(frozen=True)
class Replaced:
    """The stored instance that a new version with the same SOP Instance UID replaced."""

    study_uid: str
    path: str


@dataclass(frozen=True)
class Recorded:
    """What recording one stored file changed."""

    new: bool  # False: the same instance again, nothing recorded
    replaced: Replaced | None = None


UNCHANGED, ADDED = Recorded(new=False), Recorded(new=True)


class InstanceIndex:
    """Records stored files in the index, through one driver connection that its callers take
    in turn (the receiver's group commit)."""

    def __init__(self, connection: DriverConnection, late_arrivals: str) -> None:
        self.late_arrivals = late_arrivals
        prepare = connection.prepare
        self._stored, self._study_exists = prepare(_STORED), prepare(_STUDY_EXISTS)
        self._study_state, self._new_study = prepare(_STUDY_STATE), prepare(_NEW_STUDY)
        self._study_receiving, self._still_receiving = prepare(_STUDY_RECEIVING), prepare(_STILL_RECEIVING)
        self._study_anew = prepare(_STUDY_ANEW)
        self._event, self._series, self._instance = prepare(_EVENT), prepare(_SERIES), prepare(_INSTANCE)

    def record(self, cursor: Any, header: InstanceHeader, instance: dict) -> Recorded:
        """Study, series and instance rows for one stored file, in the transaction of ``cursor``
        (`DriverConnection.transaction`); nothing changes for a repeat of the stored instance
        (same SHA-256).

        An instance with the SOP Instance UID of a stored one but other content is the newer
        version of it: its row replaces the old one, an event says so in its study and, where it
        moved, in the old one too, and the old file is named in the outcome for the caller to
        remove once this transaction is committed (`Recorded.replaced`).

        A study that was complete is re-opened by a new instance (``late_arrivals =
        "reprocess"``) or keeps its state (``"ignore"``); either way the instance is indexed and
        the event logged. A study whose instances retention purged starts anew, whatever
        ``late_arrivals`` says: its first instances are gone, so the new ones are a study of
        their own, under the same record. The usual case, an instance of a study still
        receiving, takes one statement for the study.
        """
        stored = self._stored.run(cursor, {"sop_instance_uid": header.sop_instance_uid}).fetchone()
        if stored is not None and stored[0] == instance["sha256"]:
            return UNCHANGED
        received_at = instance["received_at"]
        study_uid = header.study_uid
        if self._still_receiving.run(cursor, {"study_uid": study_uid, "received_at": received_at}).rowcount == 0:
            known = self._study_state.run(cursor, {"study_uid": study_uid}).fetchone()
            if known is None:
                if header.study is None:
                    raise LookupError(f"study {study_uid} has no row, and no values were read for one")
                self._new_study.run(cursor, {"study_uid": study_uid, "received_at": received_at, **header.study})
            elif known[1] is not None:
                self._log(cursor, study_uid, f"instance {header.sop_instance_uid} arrived after this study's "
                                             "instances were purged: received as a new study (its earlier jobs and "
                                             "results stay in its history)")
                self._study_anew.run(cursor, {"study_uid": study_uid, "received_at": received_at})
            elif self.late_arrivals == "reprocess":
                self._log(cursor, study_uid, f"re-opened by a late instance {header.sop_instance_uid}")
                self._study_receiving.run(cursor, {"study_uid": study_uid, "received_at": received_at})
            else:
                self._log(cursor, study_uid, f"late instance {header.sop_instance_uid} stored, not processed "
                                             "(late_arrivals = ignore)")
        if header.series is not None:
            self._series.run(cursor, {"series_uid": header.series_uid, "study_uid": study_uid, **header.series})
        self._instance.run(cursor, instance)
        if stored is None:
            return ADDED
        replaced = Replaced(study_uid=stored[1], path=stored[2])
        self._replaced(cursor, header, replaced)
        return Recorded(new=True, replaced=replaced)

    def _replaced(self, cursor: Any, header: InstanceHeader, replaced: Replaced) -> None:
        uid = header.sop_instance_uid
        if replaced.study_uid == header.study_uid:
            self._log(cursor, header.study_uid, f"instance {uid} received again with other content: the new "
                                                "version replaces the stored one", "warning")
            return
        self._log(cursor, header.study_uid, f"instance {uid} received again with other content, here: it was in "
                                            f"study {replaced.study_uid}, and the new version replaces it",
                  "warning")
        if self._study_exists.run(cursor, {"study_uid": replaced.study_uid}).fetchone() is not None:
            self._log(cursor, replaced.study_uid, f"instance {uid} received again in study {header.study_uid}: "
                                                  "removed from this study", "warning")

    def _log(self, cursor: Any, study_uid: str, message: str, level: str = "info") -> None:
        """As `db.log_event`, in this transaction."""
        self._event.run(cursor, {"at": db.now(), "study_uid": study_uid, "level": level, "message": message})
