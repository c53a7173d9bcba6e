"""The DICOM listener's storage: what a C-STORE is answered, and how an instance is kept.

An instance is answered Success only once its file is on disk (atomically, durably) and its
row is committed: a Success the PACS sees is a promise that the instance will be processed,
even if the node is killed the next moment. Only the file's content is flushed before the
answer (`store.IncomingFiles`); a rename or index rows that a power cut took are done again at
the next start (`reindex`). Bytes are stored exactly as received, in the
transfer syntax the peer chose, so nothing is lost to a re-encoding.

The association policy and the protocol are the `acceptor`'s; this module gives it the
node's settings and the C-STORE handler.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO

from pydicom import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, UID_dictionary
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.dsutils import decode
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification
from sqlalchemy import Engine

from . import db, store
from .acceptor import Acceptor, Policy, StoreRequest
from .config import Config
from .driver_sql import DriverConnection
from .group_commit import GroupCommit
from .index import InstanceHeader, InstanceIndex, content_digest, described, header_of, instance_row
from .upper_layer import file_preamble_and_meta

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
MAX_REMEMBERED_SERIES = 10_000  # series a receiver remembers as indexed; forgetting only costs a row check
# From this size an instance's digest is computed on a thread of its own while its file is
# written and flushed (both let go of the interpreter). For a 0.5 MB CT image that is 0.3 ms of
# SHA-256 off the path to its Success: 264 against 219 images a second on one association,
# medians of six alternating runs. Below it, handing the work over costs more than it saves.
DIGEST_ASIDE_BYTES = 64 * 1024


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


class Receiver:
    """Stores what one `serve` process receives; the protocol is the `Acceptor`'s."""

    def __init__(self, config: Config, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.acceptor: Acceptor | None = None
        # (study, series) whose rows this process has committed. Rows are never deleted, so
        # another instance of the pair needs neither row again, nor the values they hold.
        self._indexed_series: set[tuple[str, str]] = set()
        # Index commits need not wait for the disk: the file is already there, and the rows a
        # power cut takes are rebuilt from it at the next start (`reindex`).
        self._connection = DriverConnection(engine, durable_commits=False)
        self._files = store.IncomingFiles(store.incoming_folder(config.node.data_dir))
        self._instances = InstanceIndex(self._connection, config.node.late_arrivals)
        self._index = GroupCommit(self._connection.transaction, self._record)
        self._digests = ThreadPoolExecutor(max_workers=2, thread_name_prefix="digest")

    def handle_store(self, request: StoreRequest) -> int:
        peer = f"{request.calling_ae_title}@{request.address}"
        named = request.sop_instance_uid or "an instance without SOP Instance UID"
        try:
            dataset = _parse(request)
            header = header_of(dataset)
            if header is not None and (header.study_uid, header.series_uid) not in self._indexed_series:
                header = described(header, dataset)
        except Exception as error:  # noqa: BLE001 - any parse failure is the peer's malformed data
            log.warning("refused %s from %s: cannot parse the dataset (%s)", named, peer, error)
            return CANNOT_UNDERSTAND
        if header is None:
            log.warning("refused %s from %s: SOP Class/Instance, Study or Series UID missing or invalid", named, peer)
            return CANNOT_UNDERSTAND
        if header.sop_class_uid != request.sop_class_uid:
            log.warning(
                "refused %s from %s: dataset SOP class %s is not the negotiated %s",
                header.sop_instance_uid,
                peer,
                header.sop_class_uid,
                request.sop_class_uid,
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
            self._store(request, header)
        except OSError as error:
            log.error("could not store %s from %s: %s", header.sop_instance_uid, peer, error)
            return OUT_OF_RESOURCES
        except Exception:
            log.exception("could not store %s from %s", header.sop_instance_uid, peer)
            return PROCESSING_FAILURE
        return SUCCESS

    def _store(self, request: StoreRequest, header: InstanceHeader) -> None:
        """File first, then the rows (`_record`, group-committed). A repeat of a stored instance
        is written again (the same bytes under the same name) and recognised by its digest
        inside the index transaction, which then changes nothing: one transaction per instance
        instead of a look-up and a transaction."""
        meta = file_preamble_and_meta(request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax)
        content = meta + request.dataset
        path = store.instance_path(
            self.config.node.data_dir, header.study_uid, header.series_uid, header.sop_instance_uid
        )
        digesting = self._digests.submit(content_digest, content) if len(content) >= DIGEST_ASIDE_BYTES else None
        self._files.write(path, content)
        instance = instance_row(header, path, content, request.transfer_syntax, request.calling_ae_title, db.now(),
                                digesting.result() if digesting is not None else None)
        if not self._index((header, instance)):
            return  # the same instance again, unchanged: nothing was recorded
        if len(self._indexed_series) >= MAX_REMEMBERED_SERIES:
            self._indexed_series.clear()
        self._indexed_series.add((header.study_uid, header.series_uid))

    def _record(self, cursor, indexed: tuple[InstanceHeader, dict]) -> bool:
        """The rows of one stored file, in a transaction shared with the instances stored at
        the same moment; False for a repeat of the stored instance, which changes nothing."""
        header, instance = indexed
        return self._instances.record(cursor, header, instance)

    def start(self, listening: socket.socket, max_associations: int) -> Acceptor:
        """Serve on ``listening`` in background threads until :meth:`stop`.

        The socket is shared with the node's other receiver processes; this one takes up to
        ``max_associations`` of the node's associations.
        """
        node = self.config.node
        policy = Policy(
            ae_title=node.ae_title,
            check_called_ae_title=node.check_called_ae_title,
            allowed_calling_ae_titles=list(node.allowed_calling_ae_titles),
            allowed_peers=list(node.allowed_peers),
            max_associations=max_associations,
        )
        contexts = [_context(sop_class) for sop_class in [Verification, *storage_sop_classes()]]
        log.info("receiver process %d serving up to %d associations", os.getpid(), max_associations)
        self.acceptor = Acceptor(policy, contexts, self.handle_store)
        self.acceptor.start(listening)
        return self.acceptor

    def stop(self) -> None:
        """Stop accepting, let the C-STOREs in flight finish, then close what remains."""
        if self.acceptor is not None:
            self.acceptor.stop(SHUTDOWN_GRACE_SECONDS)
        self._connection.close()
        self._files.close()
        self._digests.shutdown()


def _context(abstract_syntax: str) -> PresentationContext:
    context = PresentationContext()
    context.abstract_syntax = abstract_syntax
    context.transfer_syntax = ACCEPTED_TRANSFER_SYNTAXES
    return context


def _parse(request: StoreRequest) -> Dataset:
    """The data set as pydicom reads it: every element's bytes located, values decoded lazily."""
    return decode(BytesIO(request.dataset), *_encoding(request.transfer_syntax))


@functools.cache
def _encoding(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated): once per syntax, as a UID validates its value."""
    syntax = UID(transfer_syntax)
    return syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated


def _free_mb(folder) -> float:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize / 1e6
