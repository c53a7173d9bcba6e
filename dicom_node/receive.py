"""The DICOM listener: association policy, C-ECHO and C-STORE.

An instance is answered Success only once its file is on disk (atomically, durably) and its
row is committed: a Success the PACS sees is a promise that the instance will be processed,
even if the node is killed the next moment. Bytes are stored exactly as received, in the
transfer syntax the peer chose, so nothing is lost to a re-encoding.

Association policy, checked before any data is accepted: the peer's address against
``allowed_peers`` (refused at connection), the calling AE title against
``allowed_calling_ae_titles`` and the called AE title against ``ae_title`` (A-ASSOCIATE-RJ).
Every refusal is logged with the peer's address.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import socket
import threading
import time

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, UID_dictionary
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine

from . import db, index, store
from .config import Config
from .index import InstanceHeader

log = logging.getLogger(__name__)

SUCCESS = 0x0000
# Failure statuses of the Storage Service Class (PS3.4 B.2.3).
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

# Every transfer syntax pynetdicom knows. Where a peer offers several in one context, the first
# of this list wins: explicit VR keeps the value representations the sender wrote.
ACCEPTED_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian] + [
    syntax for syntax in ALL_TRANSFER_SYNTAXES if syntax != ExplicitVRLittleEndian
]
SHUTDOWN_GRACE_SECONDS = 30.0


def storage_sop_classes() -> list[str]:
    """Every storage SOP class pydicom or pynetdicom knows, so no modality is turned away."""
    from_pydicom = {
        uid
        for uid, (name, kind, *_rest) in UID_dictionary.items()
        if kind == "SOP Class" and "Storage" in name and "Commitment" not in name
    }
    from_pynetdicom = {str(context.abstract_syntax) for context in AllStoragePresentationContexts}
    return sorted(from_pydicom | from_pynetdicom)


def listening_socket(host: str, port: int) -> socket.socket:
    """The node's DICOM port, bound once by `serve` and shared by its receiver processes.

    Bound without SO_REUSEPORT, so a second node on the same port fails at start instead of
    silently taking part of the traffic. Non-blocking: each receiver process waits for it to
    become readable, and those that lose the race for a connection simply go back to waiting.
    """
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    listener.setblocking(False)
    return listener


class PeerCheckingServer(ThreadedAssociationServer):
    """Serves on the node's shared listening socket; refuses connections from addresses
    outside ``allowed_peers`` before any PDU is read."""

    allowed_peers: list = []

    def server_bind(self) -> None:
        self.socket.close()  # the one socketserver made, unbound: the node's is already listening
        self.socket = self.ae.listening_socket
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Nothing to do: `serve` made the socket listen before starting the receivers."""

    def verify_request(self, request, client_address) -> bool:
        if not self.allowed_peers:
            return True
        address = ipaddress.ip_address(client_address[0])
        if any(address in network for network in self.allowed_peers):
            return True
        log.warning("refused a connection from %s: address not in allowed_peers", client_address[0])
        return False


class NodeAE(AE):
    """pynetdicom's AE, serving through :class:`PeerCheckingServer`."""

    allowed_peers: list = []
    listening_socket: socket.socket  # set before make_server: see PeerCheckingServer.server_bind

    def make_server(self, address, *args, server_class=None, **kwargs):
        server = super().make_server(address, *args, server_class=PeerCheckingServer, **kwargs)
        server.allowed_peers = self.allowed_peers
        return server


class Receiver:
    """Handles one node's incoming associations; one instance per `serve` process."""

    def __init__(self, config: Config, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.ae: NodeAE | None = None
        self.server: ThreadedAssociationServer | None = None
        self._in_flight = 0
        self._in_flight_lock = threading.Condition()

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def handle_rejected(self, event: evt.Event) -> None:
        requestor, node = event.assoc.requestor, self.config.node
        called = event.assoc.acceptor.ae_title
        if node.check_called_ae_title and called != node.ae_title:
            reason = f"called AE title {called!r} is not {node.ae_title!r}"
        elif node.allowed_calling_ae_titles and requestor.ae_title not in node.allowed_calling_ae_titles:
            reason = f"calling AE title {requestor.ae_title!r} is not in allowed_calling_ae_titles"
        elif self.ae is not None and len(self.ae.active_associations) >= node.max_associations:
            reason = f"already {node.max_associations} associations (max_associations)"
        else:
            reason = "no acceptable presentation context or protocol error"
        log.warning("rejected an association from %s:%s: %s", requestor.address, requestor.port, reason)

    def handle_store(self, event: evt.Event) -> int:
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            return self._handle_store(event)
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1
                self._in_flight_lock.notify_all()

    def _handle_store(self, event: evt.Event) -> int:
        requestor = event.assoc.requestor
        peer = f"{requestor.ae_title}@{requestor.address}"
        named = str(event.request.AffectedSOPInstanceUID or "an instance without SOP Instance UID")
        try:
            header = _header(event.dataset)
        except Exception as error:  # noqa: BLE001 - any parse failure is the peer's malformed data
            log.warning("refused %s from %s: cannot parse the dataset (%s)", named, peer, error)
            return CANNOT_UNDERSTAND
        if header is None:
            log.warning("refused %s from %s: SOP Class/Instance, Study or Series UID missing or invalid", named, peer)
            return CANNOT_UNDERSTAND
        if header.sop_class_uid != str(event.request.AffectedSOPClassUID):
            log.warning(
                "refused %s from %s: dataset SOP class %s is not the negotiated %s",
                header.sop_instance_uid,
                peer,
                header.sop_class_uid,
                event.request.AffectedSOPClassUID,
            )
            return DATASET_DOES_NOT_MATCH_SOP_CLASS
        free_mb = _free_mb(self.config.node.data_dir)
        if free_mb < self.config.node.min_free_disk_mb:
            log.error(
                "refused %s from %s: %.0f MB free under %s, below min_free_disk_mb = %g",
                header.sop_instance_uid,
                peer,
                free_mb,
                self.config.node.data_dir,
                self.config.node.min_free_disk_mb,
            )
            return OUT_OF_RESOURCES
        try:
            self._store(event, header)
        except OSError as error:
            log.error("could not store %s from %s: %s", header.sop_instance_uid, peer, error)
            return OUT_OF_RESOURCES
        except Exception:
            log.exception("could not store %s from %s", header.sop_instance_uid, peer)
            return PROCESSING_FAILURE
        return SUCCESS

    def _store(self, event: evt.Event, header: InstanceHeader) -> None:
        content = event.encoded_dataset(include_meta=True)
        digest = hashlib.sha256(content).hexdigest()
        with db.reading(self.engine) as connection:
            if index.stored_digest(connection, header.sop_instance_uid) == digest:
                return  # the same instance again, unchanged: nothing to do
        path = store.instance_path(
            self.config.node.data_dir, header.study_uid, header.series_uid, header.sop_instance_uid
        )
        store.write_durably(path, content)
        instance = {
            "sop_instance_uid": header.sop_instance_uid,
            "series_uid": header.series_uid,
            "study_uid": header.study_uid,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": str(event.context.transfer_syntax),
            "path": str(path),
            "size": len(content),
            "sha256": digest,
            "calling_ae": event.assoc.requestor.ae_title,
            "received_at": db.now(),
        }
        with self.engine.begin() as connection:
            index.index_instance(connection, header, instance, self.config.node.late_arrivals)

    def start(self, listening: socket.socket, max_associations: int) -> ThreadedAssociationServer:
        """Serve on ``listening`` in background threads until :meth:`stop`.

        The socket is shared with the node's other receiver processes; this one takes up to
        ``max_associations`` of the node's associations.
        """
        node = self.config.node
        ae = NodeAE(ae_title=node.ae_title)
        ae.listening_socket = listening
        ae.allowed_peers = list(node.allowed_peers)
        ae.require_called_aet = node.check_called_ae_title
        if node.allowed_calling_ae_titles:
            ae.require_calling_aet = list(node.allowed_calling_ae_titles)
        ae.maximum_associations = max_associations
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs
        ae.network_timeout = 60  # a stalled peer is dropped, never holds a thread for ever
        ae.dimse_timeout = 120
        # Also the ARTIM timer: how long a connection that sent garbage holds its slot.
        ae.acse_timeout = 10
        ae.add_supported_context(Verification, ACCEPTED_TRANSFER_SYNTAXES)
        for sop_class in storage_sop_classes():
            ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
        handlers = [
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_REJECTED, self.handle_rejected),
        ]
        log.info("receiver process %d serving up to %d associations", os.getpid(), max_associations)
        self.ae = ae
        self.server = ae.start_server((node.host, node.port), block=False, evt_handlers=handlers)
        return self.server

    def stop(self) -> None:
        """Stop accepting, let the C-STOREs in flight finish, then close what remains."""
        if self.server is None or self.ae is None:
            return
        self.server.shutdown()
        deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
        with self._in_flight_lock:
            while self._in_flight and time.monotonic() < deadline:
                self._in_flight_lock.wait(timeout=0.5)
        for association in self.ae.active_associations:
            association.abort()


def _free_mb(folder) -> float:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize / 1e6


def _header(dataset: Dataset) -> InstanceHeader | None:
    """Every value the index needs, read before anything is written: a dataset that fails to
    parse half-way is refused whole, never half-stored."""
    uids = [dataset.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")]
    if not all(uids):
        return None
    study_uid, series_uid, sop_instance_uid, sop_class_uid = (str(v).strip() for v in uids)
    if not all(store.is_valid_uid(uid) for uid in (study_uid, series_uid, sop_instance_uid)):
        return None
    return InstanceHeader(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class_uid,
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


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
