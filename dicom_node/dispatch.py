"""Dispatch: results to their destinations by C-STORE or STOW-RS (`stow`), with a delivery
record per destination.

Each (result, destination) pair is one row, so a destination that is down only delays its
own rows: it is retried with exponential backoff (``retry_first_seconds`` doubling up to
``retry_max_seconds``) while the others are delivered: each destination has its own dispatch loop.
A result sent twice (a crash between sending and recording) is harmless: its SOP Instance UID
is the same, and a PACS stores it once.

Nodes that share one database each send what they claim: a dispatcher first moves the
delivery's ``not_before`` past the time a send may take (`CLAIM_SECONDS`), on the condition that
no other did so first, and records it as ``claimed_by`` itself. A node that dies with claims
gets them back at its next start (`release_claims`); another node's dispatcher takes them once
the claim has run out.

Each delivery has its own outcome. One that no retry can change (the destination accepts no
presentation context for the result's SOP class, or answers "SOP class not supported"; the
result's file is gone) is dead-lettered: kept with its reason, shown by `status`, pending
again after `dicom-node retry`. The others of the batch go on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.presentation import PresentationContext, build_context
from sqlalchemy import Engine, select, update

from dicom_node import stow, tls
from dicom_node.config import Config, Destination
from dicom_node.state import db

log = logging.getLogger(__name__)

# pynetdicom's documented setting for sending a file path as its stored bytes, in PDU-sized
# chunks, instead of decoding the file and encoding it again; only this process sends.
_config.STORE_SEND_CHUNKED_DATASET = True

# Success, and the warnings that still mean "stored" (PS3.4 B.2.3).
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}
SOP_CLASS_NOT_SUPPORTED = 0x0122  # the destination will never take this SOP class
CLAIM_SECONDS = 600.0  # a claimed delivery is another node's to send after this long


@dataclass(frozen=True)
class Outcome:
    """What became of one delivery: sent (``error`` None), or failed, for now or for good."""

    error: str | None = None
    permanent: bool = False


SENT = Outcome()


def backoff(destination: Destination, attempts: int) -> float:
    return min(destination.retry_max_seconds, destination.retry_first_seconds * 2 ** max(0, attempts - 1))


def _contexts(metas: dict[str, Dataset]) -> list[PresentationContext]:
    """Per SOP class, one context for exactly the stored files' transfer syntax, so that they
    go out as stored, and one offering the uncompressed syntaxes, for a peer that declines it."""
    stored: dict[str, set[str]] = {}
    for meta in metas.values():
        stored.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(str(meta.TransferSyntaxUID))
    contexts = []
    for sop_class in sorted(stored):
        contexts.extend(build_context(sop_class, syntax) for syntax in sorted(stored[sop_class]))
        contexts.append(build_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    return contexts


def _send(config: Config, destination: Destination, paths: list[str]) -> dict[str, Outcome]:
    """C-STORE the files over one association; the outcome of each path.

    A file whose transfer syntax the peer accepts is sent as its stored bytes, never decoded:
    a 300-frame SEG took longer to parse and re-encode than to send. Otherwise it is decoded
    and pynetdicom converts it to a syntax the peer accepted.
    """
    if destination.type == "dicomweb":
        return {path: _stored_by_stow(destination, path) for path in paths}
    outcome: dict[str, Outcome] = {}
    metas: dict[str, Dataset] = {}
    for path in paths:
        try:
            metas[path] = read_file_meta_info(path)
        except FileNotFoundError:
            outcome[path] = Outcome(f"the result's file {path} is gone", permanent=True)
        except Exception as error:  # noqa: BLE001 - a file the node wrote and cannot read again
            outcome[path] = Outcome(f"the result's file {path} cannot be read ({error})", permanent=True)
    if not metas:
        return outcome
    ae = AE(ae_title=config.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.requested_contexts = _contexts(metas)
    secure = (tls.client_context(destination), destination.host) if destination.tls else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=secure)
    # A peer that rejects every proposed context is answered with an abort by pynetdicom: its
    # answer still says which SOP classes it does not take, and those will never go.
    answered = assoc.is_established or (assoc.is_aborted and bool(assoc.rejected_contexts))
    if not answered:
        reason = Outcome(f"association with {destination.ae_title}@{destination.host}:{destination.port} failed")
        return outcome | {path: reason for path in metas}
    accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
    try:
        for path, meta in metas.items():
            if not assoc.is_established and accepted:
                outcome[path] = Outcome("the association was lost before this result was sent")
                continue
            outcome[path] = _send_one(assoc, path, meta, accepted, destination)
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome


def _stored_by_stow(destination: Destination, path: str) -> Outcome:
    try:
        problem, permanent = stow.store(destination, path)
    except FileNotFoundError:
        return Outcome(f"the result's file {path} is gone", permanent=True)
    return SENT if problem is None else Outcome(problem, permanent)


def _send_one(assoc, path: str, meta: Dataset, accepted: set[tuple[str, str]], destination: Destination) -> Outcome:
    sop_class = str(meta.MediaStorageSOPClassUID)
    if not any(abstract_syntax == sop_class for abstract_syntax, _ in accepted):
        return Outcome(f"{destination.ae_title} accepts no presentation context for SOP class {sop_class} "
                       f"({_name(sop_class)})", permanent=True)
    try:
        if (sop_class, str(meta.TransferSyntaxUID)) in accepted:
            status = assoc.send_c_store(Path(path))  # streamed from the file (STORE_SEND_CHUNKED_DATASET)
        else:
            status = assoc.send_c_store(pydicom.dcmread(path))
    except FileNotFoundError:
        return Outcome(f"the result's file {path} is gone", permanent=True)
    except Exception as error:  # noqa: BLE001 - the network or the peer: tried again later
        return Outcome(f"{type(error).__name__}: {error}")
    code = getattr(status, "Status", None)
    if code is None:
        return Outcome("no response to C-STORE (association lost)")
    if code in STORED_STATUSES:
        return SENT
    if code == SOP_CLASS_NOT_SUPPORTED:
        return Outcome(f"{destination.ae_title} answered C-STORE status 0x{code:04X} (SOP class not supported)",
                       permanent=True)
    return Outcome(f"C-STORE status 0x{code:04X}")


def _name(sop_class: str) -> str:
    return UID(sop_class).name or "unknown"


def deliver_due(config: Config, engine: Engine, destination: Destination) -> int:
    """Send this destination's pending deliveries whose time has come; returns how many went."""
    with db.reading(engine) as connection:
        rows = connection.execute(
            select(
                db.deliveries.c.id,
                db.deliveries.c.attempts,
                db.deliveries.c.not_before,
                db.results.c.path,
                db.results.c.kind,
                db.jobs.c.study_uid,
            )
            .join(db.results, db.results.c.id == db.deliveries.c.result_id)
            .join(db.jobs, db.jobs.c.id == db.results.c.job_id)
            .where(
                db.deliveries.c.destination == destination.name,
                db.deliveries.c.state == "pending",
                db.deliveries.c.not_before <= db.now(),
            )
            .order_by(db.deliveries.c.id)
        ).all()
    rows = _claim(config, engine, rows)
    if not rows:
        return 0
    try:
        outcome = _send(config, destination, [row.path for row in rows])
    except Exception as error:  # noqa: BLE001 - any network failure means "try again later"
        outcome = {row.path: Outcome(f"{type(error).__name__}: {error}") for row in rows}
    delivered = 0
    with engine.begin() as connection:
        for row in rows:
            result = outcome.get(row.path, Outcome("not sent"))
            attempts = row.attempts + 1
            if result.error is None:
                delivered += 1
                values = {"state": "sent", "attempts": attempts, "sent_at": db.now(), "last_error": None}
                db.log_event(connection, row.study_uid, "info", f"delivered {row.kind} to {destination.name}")
            elif result.permanent:
                values = {"state": "dead", "attempts": attempts, "last_error": result.error}
                log.error("delivery of %s to %s dead-lettered: %s (`dicom-node retry` sends it again)", row.kind,
                          destination.name, result.error)
                db.log_event(connection, row.study_uid, "error",
                             f"delivery of {row.kind} to {destination.name} dead-lettered: {result.error}")
            else:
                delay = backoff(destination, attempts)
                values = {"attempts": attempts, "last_error": result.error, "not_before": db.now() + delay}
                log.warning("delivery to %s failed (attempt %d, next in %.0f s): %s", destination.name, attempts,
                            delay, result.error)
            connection.execute(update(db.deliveries).where(db.deliveries.c.id == row.id)
                               .values(claimed_by=None, **values))
    return delivered


def _claim(config: Config, engine: Engine, rows: list) -> list:
    """Those of ``rows`` this node now holds: each taken only if its ``not_before`` is still
    what this node read, so that of two dispatchers, on two nodes, one sends it."""
    held = db.claim_due(engine, db.deliveries, [(row.id, row.not_before) for row in rows], db.now() + CLAIM_SECONDS,
                        claimed_by=config.instance_name)
    return [row for row in rows if row.id in held]


def release_claims(config: Config, engine: Engine) -> int:
    """At start: the deliveries this node claimed and never recorded (it was killed while
    sending) are due again at once."""
    with engine.begin() as connection:
        return connection.execute(
            update(db.deliveries)
            .where(db.deliveries.c.claimed_by == config.instance_name, db.deliveries.c.state == "pending")
            .values(not_before=0.0, claimed_by=None)
        ).rowcount
