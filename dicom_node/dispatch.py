"""Dispatch: results to their destinations by C-STORE, with a delivery record per destination.

Each (result, destination) pair is one row, so a destination that is down only delays its
own rows: it is retried with exponential backoff while the others are delivered.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import pydicom
from pynetdicom import AE
from pynetdicom.presentation import build_context
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import Engine, select, update

from . import db
from .config import Config, Destination

log = logging.getLogger(__name__)

BACKOFF_FIRST_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 300.0


def backoff(attempts: int) -> float:
    return min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** max(0, attempts - 1))


def _send(config: Config, destination: Destination, paths: list[str]) -> dict[str, str | None]:
    """C-STORE the files over one association; per path, None on success or the error."""
    datasets = {path: pydicom.dcmread(path) for path in paths}
    ae = AE(ae_title=config.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets.values()}):
        ae.requested_contexts.append(build_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        reason = f"association with {destination.ae_title}@{destination.host}:{destination.port} failed"
        return {path: reason for path in paths}
    outcome: dict[str, str | None] = {}
    try:
        for path, dataset in datasets.items():
            status = assoc.send_c_store(dataset)
            code = getattr(status, "Status", None)
            if code is None:
                outcome[path] = "no response to C-STORE"
            elif code in (0x0000, 0xB000, 0xB007, 0xB006):
                outcome[path] = None
            else:
                outcome[path] = f"C-STORE status 0x{code:04X}"
    finally:
        assoc.release()
    return outcome


def deliver_due(config: Config, engine: Engine) -> int:
    """Send every pending delivery whose time has come; returns how many were delivered."""
    now = db.now()
    with engine.connect() as connection:
        due = connection.execute(
            select(
                db.deliveries.c.id,
                db.deliveries.c.destination,
                db.deliveries.c.attempts,
                db.results.c.path,
                db.jobs.c.study_uid,
            )
            .join(db.results, db.results.c.id == db.deliveries.c.result_id)
            .join(db.jobs, db.jobs.c.id == db.results.c.job_id)
            .where(db.deliveries.c.state == "pending", db.deliveries.c.not_before <= now)
            .order_by(db.deliveries.c.id)
        ).all()
    by_destination = defaultdict(list)
    for row in due:
        by_destination[row.destination].append(row)
    delivered = 0
    for name, rows in by_destination.items():
        destination = config.destination(name)
        try:
            outcome = _send(config, destination, [row.path for row in rows])
        except Exception as error:  # noqa: BLE001 - any network failure means "try again later"
            outcome = {row.path: f"{type(error).__name__}: {error}" for row in rows}
        with engine.begin() as connection:
            for row in rows:
                error = outcome.get(row.path, "not sent")
                attempts = row.attempts + 1
                if error is None:
                    delivered += 1
                    values = {"state": "sent", "attempts": attempts, "sent_at": db.now(), "last_error": None}
                    db.log_event(connection, row.study_uid, "info", f"delivered {row.path} to {name}")
                else:
                    values = {"attempts": attempts, "last_error": error, "not_before": db.now() + backoff(attempts)}
                    log.warning("delivery to %s failed (attempt %d): %s", name, attempts, error)
                connection.execute(update(db.deliveries).where(db.deliveries.c.id == row.id).values(**values))
    return delivered
