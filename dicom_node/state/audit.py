"""The audit trail: every state change the node makes and every action an operator takes.

Both are rows of ``events``; an operator's carry who (user or token name, or the shell user of
the command line) and from which address. Nothing here deletes a row: the trail is as long as
the studies it speaks of are kept.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, select

from dicom_node.state import db

AUDIT_COLUMNS = ("id", "at", "study_uid", "level", "actor", "address", "message")


@dataclass(frozen=True)
class Operator:
    """Who asked for an action, as the audit trail names them."""

    name: str
    address: str

    @classmethod
    def command_line(cls) -> Operator:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
        return cls(f"{user} (command line)", "local")


def trail(engine: Engine, study_uid: str | None = None, limit: int = 10_000, after_id: int = 0) -> list[dict]:
    """Events in the order they happened, of one study or of the whole node."""
    query = select(*(db.events.c[name] for name in AUDIT_COLUMNS)).where(db.events.c.id > after_id)
    if study_uid is not None:
        query = query.where(db.events.c.study_uid == study_uid)
    with db.reading(engine) as connection:
        rows = connection.execute(query.order_by(db.events.c.id).limit(limit)).mappings().all()
    return [dict(row) | {"actor": row["actor"] or "node", "address": row["address"] or ""} for row in rows]


def iso_time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")


def as_csv(rows: list[dict]) -> str:
    """One line per event, time in ISO 8601 UTC; the csv module quotes what needs quoting."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(AUDIT_COLUMNS)
    for row in rows:
        writer.writerow([iso_time(row["at"]) if name == "at" else row[name] for name in AUDIT_COLUMNS])
    return out.getvalue()


def as_json(rows: list[dict]) -> str:
    return json.dumps([row | {"at": iso_time(row["at"])} for row in rows], indent=1)
