"""The DICOM listener's storage: what a C-STORE is answered, and how an instance is kept.

An instance is answered Success only once its file is on disk (atomically, durably) and its
row is committed: a Success the PACS sees is a promise that the instance will be processed,
even if the node is killed the next moment. Only the file's content is flushed before the
answer (`files.IncomingFiles`); a rename or index rows that a power cut took are done again at
the next start (`recovery`). Bytes are stored exactly as received, in the
transfer syntax the peer chose, so nothing is lost to a re-encoding.

The association policy and the protocol are the `acceptor`'s; this module gives it the
node's settings and the C-STORE handler.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import mmap
import os
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, UID_dictionary
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification
from sqlalchemy import Engine

from dicom_node import metrics, tls
from dicom_node.config import Config
from dicom_node.ingest.acceptor import Acceptor, StoreRequest
from dicom_node.ingest.driver_connection import DriverConnection
from dicom_node.ingest.group_commit import GroupCommit
from dicom_node.ingest.index import (
    InstanceHeader,
    InstanceIndex,
    Recorded,
    Replaced,
    content_digest,
    described,
    header_of,
    instance_row,
)
from dicom_node.ingest.negotiation import Policy
from dicom_node.ingest.protocol import file_preamble_and_meta
from dicom_node.ingest.structure import TooLarge, check_structure, inflate
from dicom_node.state import db, files

log = logging.getLogger(__name__)

SUCCESS = 0x0000
# Failure statuses of the Storage Service Class (PS3.4 B.2.3) and of DIMSE (PS3.7 C).
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122

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
# The most of one instance an association holds in memory (`IncomingInstance`).
SPILL_BYTES = 4 * 1024 * 1024
# The most a Deflated data set may inflate to: it is inflated in memory to be checked.
MAX_INFLATED_BYTES = 64 * 1024 * 1024
CONCURRENT_INFLATIONS = 2  # per receiver process; others wait their turn
LAST_INDEXED_TAG = 0x0020FFFF  # the index reads UIDs and values of groups 0008 to 0020 only


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
        self.max_instance_bytes = int(config.node.max_instance_mb * 1024 * 1024)
        # (study, series) whose rows this process has committed: another instance of the pair
        # needs neither row again, nor the values they hold. Forgotten when retention purges
        # (`_forget_if_purged`), as the rows may be gone.
        self._indexed_series: set[tuple[str, str]] = set()
        self._purge_stamp = files.purge_stamp(config.node.data_dir)
        # Index commits need not wait for the disk: the file is already there, and the rows a
        # power cut takes are rebuilt from it at the next start (`recovery`).
        self._connection = DriverConnection(engine, durable_commits=False)
        self._files = files.IncomingFiles(files.incoming_folder(config.node.data_dir, config.instance_name))
        self._instances = InstanceIndex(self._connection, config.node.late_arrivals)
        self._index = GroupCommit(self._connection.transaction, self._record)
        self._digests = ThreadPoolExecutor(max_workers=2, thread_name_prefix="digest")
        # Deflated data sets inflated at once: each may take MAX_INFLATED_BYTES of memory.
        self._inflating = threading.BoundedSemaphore(CONCURRENT_INFLATIONS)

    def begin_store(self, request: StoreRequest) -> IncomingInstance:
        """Where the data set of the C-STORE ``request`` goes as it arrives (`Acceptor`)."""
        return IncomingInstance(self, request)

    def store(self, request: StoreRequest, dataset: bytes) -> int:
        """Store a data set received whole, and return the C-STORE status."""
        incoming = self.begin_store(request)
        incoming.add(memoryview(dataset))
        return incoming.finish()

    def _finish(self, incoming: IncomingInstance) -> int:
        """Store a data set whose last byte has arrived; the C-STORE status, counted (`metrics`)."""
        status, refusal = self._outcome(incoming)
        metrics.count_store(incoming.request.calling_ae_title, refusal, incoming.size)
        return status

    def _outcome(self, incoming: IncomingInstance) -> tuple[int, str | None]:
        """The status, and for a refusal its reason as the metrics name it."""
        request = incoming.request
        peer = f"{request.calling_ae_title}@{request.address}"  # escaped by the log formatter (`logs`)
        named = request.sop_instance_uid or "an instance without Affected SOP Instance UID"
        if incoming.too_large:
            log.warning("refused %s from %s: its data set is %d bytes, more than max_instance_mb = %g",
                        named, peer, incoming.size, self.config.node.max_instance_mb)
            return OUT_OF_RESOURCES, "too_large"
        if incoming.failure is not None:
            log.error("could not store %s from %s: %s", named, peer, incoming.failure)
            return OUT_OF_RESOURCES, "storage_error"
        implicit_vr, little_endian, deflated = _encoding(request.transfer_syntax)
        self._forget_if_purged()
        try:
            with incoming.data_set() as data, (self._inflating if deflated else contextlib.nullcontext()):
                plain = inflate(data, MAX_INFLATED_BYTES) if deflated else data
                check_structure(plain, implicit_vr, little_endian)
                dataset = _parse(plain, implicit_vr, little_endian)
                header = header_of(dataset)
                if header is not None and (header.study_uid, header.series_uid) not in self._indexed_series:
                    header = described(header, dataset)
        except TooLarge as error:
            log.warning("refused %s from %s: %s (the node inflates at most %d bytes)", named, peer, error,
                        MAX_INFLATED_BYTES)
            return OUT_OF_RESOURCES, "too_large"
        except Exception as error:  # noqa: BLE001 - any parse failure is the peer's malformed data
            log.warning("refused %s from %s: the data set is not well formed (%s)", named, peer, error)
            return CANNOT_UNDERSTAND, "malformed"
        refusal = self._refusal(request, header)
        if refusal is not None:
            status, why = refusal
            log.warning("refused %s from %s: %s", named, peer, why)
            return status, "uid_mismatch" if header is not None else "malformed"
        free_mb = files.free_mb(self.config.node.data_dir)
        if free_mb < self.config.node.min_free_disk_mb:
            log.error(
                "refused %s from %s: %.0f MB free under %s, below min_free_disk_mb = %g",
                named,
                peer,
                free_mb,
                self.config.node.data_dir,
                self.config.node.min_free_disk_mb,
            )
            return OUT_OF_RESOURCES, "disk_full"
        try:
            recorded = incoming.keep(header)
        except OSError as error:
            log.error("could not store %s from %s: %s", named, peer, error)
            return OUT_OF_RESOURCES, "storage_error"
        except Exception:
            log.exception("could not store %s from %s", named, peer)
            return PROCESSING_FAILURE, "storage_error"
        if recorded.replaced is not None:
            self._replaced(header, recorded.replaced, peer)
        return SUCCESS, None

    def _forget_if_purged(self) -> None:
        """One stat per instance (a microsecond) keeps the remembered rows and folders true
        after a purge by the main process."""
        stamp = files.purge_stamp(self.config.node.data_dir)
        if stamp != self._purge_stamp:
            self._purge_stamp = stamp
            self._indexed_series = set()
            self._files.forget_folders()

    @staticmethod
    def _refusal(request: StoreRequest, header: InstanceHeader | None) -> tuple[int, str] | None:
        """The status and reason for a data set whose UIDs are missing, or do not agree with its
        command and its presentation context (the file meta would contradict the data set), or
        with the study a STOW-RS request was addressed to."""
        if header is None:
            return CANNOT_UNDERSTAND, "SOP Class/Instance, Study or Series UID missing or not a valid UID"
        if request.sop_class_uid != request.abstract_syntax:
            return SOP_CLASS_NOT_SUPPORTED, (f"the command's SOP class {request.sop_class_uid} is not the presentation "
                                             f"context's {request.abstract_syntax}")
        if header.sop_class_uid != request.abstract_syntax:
            return DATASET_DOES_NOT_MATCH_SOP_CLASS, (f"dataset SOP class {header.sop_class_uid} is not the "
                                                      f"negotiated {request.abstract_syntax}")
        if header.sop_instance_uid != request.sop_instance_uid:
            return DATASET_DOES_NOT_MATCH_SOP_CLASS, (f"dataset SOP Instance UID {header.sop_instance_uid} is not "
                                                      f"the command's {request.sop_instance_uid}")
        if request.study_uid and header.study_uid != request.study_uid:
            return DATASET_DOES_NOT_MATCH_SOP_CLASS, (f"dataset Study Instance UID {header.study_uid} is not the "
                                                      f"request's {request.study_uid}")
        return None

    def _replaced(self, header: InstanceHeader, replaced: Replaced, peer: str) -> None:
        """Keep the newest version of an instance, and only it (`InstanceIndex.record`)."""
        new_path = str(self._path(header))
        if replaced.path != new_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(replaced.path)
        if replaced.study_uid != header.study_uid:
            log.warning("instance %s from %s, stored in study %s, came again in study %s: the new version replaces "
                        "the old, whose file is removed", header.sop_instance_uid, peer, replaced.study_uid,
                        header.study_uid)
        else:
            log.warning("instance %s from %s came again with other content: the new version replaces the old",
                        header.sop_instance_uid, peer)

    def _path(self, header: InstanceHeader) -> Path:
        return files.instance_path(self.config.node.data_dir, header.study_uid, header.series_uid,
                                   header.sop_instance_uid)

    def _keep_in_memory(self, request: StoreRequest, header: InstanceHeader, dataset) -> Recorded:
        """File first, then the rows (`_record`, group-committed). A repeat of a stored instance
        is written again (the same bytes under the same name) and recognised by its digest
        inside the index transaction, which then changes nothing: one transaction per instance
        instead of a look-up and a transaction."""
        meta = file_preamble_and_meta(request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax)
        content = meta + dataset
        path = self._path(header)
        digesting = self._digests.submit(content_digest, content) if len(content) >= DIGEST_ASIDE_BYTES else None
        self._files.write(path, content)
        digest = digesting.result() if digesting is not None else content_digest(content)
        return self._indexed(request, header, path, len(content), digest)

    def _keep_file(self, request: StoreRequest, header: InstanceHeader, incoming: files.IncomingFile,
                   digest: str) -> Recorded:
        """As `_keep_in_memory`, for a data set already written to a file of the incoming folder."""
        path = self._path(header)
        self._files.keep(incoming, path)
        return self._indexed(request, header, path, incoming.size, digest)

    def _indexed(self, request: StoreRequest, header: InstanceHeader, path: Path, size: int,
                 digest: str) -> Recorded:
        instance = instance_row(header, path, size, digest, request.transfer_syntax, request.calling_ae_title,
                                db.now())
        recorded = self._index((header, instance))
        if recorded.new:
            if len(self._indexed_series) >= MAX_REMEMBERED_SERIES:
                self._indexed_series.clear()
            self._indexed_series.add((header.study_uid, header.series_uid))
        return recorded

    def _record(self, cursor, indexed: tuple[InstanceHeader, dict]) -> Recorded:
        """The rows of one stored file, in a transaction shared with the instances stored at
        the same moment."""
        header, instance = indexed
        return self._instances.record(cursor, header, instance)

    def start(self, listening: list[tuple[socket.socket, bool]], max_associations: int) -> Acceptor:
        """Serve on the sockets of ``listening`` (each with whether it is the TLS listener) in
        background threads until :meth:`stop`.

        The sockets are shared with the node's other receiver processes; this one takes up to
        ``max_associations`` of the node's associations, on all of them together.
        """
        node = self.config.node
        policy = Policy(
            ae_title=node.ae_title,
            check_called_ae_title=node.check_called_ae_title,
            allowed_calling_ae_titles=list(node.allowed_calling_ae_titles),
            allowed_peers=list(node.allowed_peers),
            max_associations=max_associations,
            acse_timeout=node.acse_timeout,
            network_timeout=node.network_timeout,
        )
        contexts = [_context(sop_class) for sop_class in [Verification, *storage_sop_classes()]]
        log.info("receiver process %d serving up to %d associations", os.getpid(), max_associations)
        self.acceptor = Acceptor(policy, contexts, self.begin_store)
        secure = tls.server_context(node.tls) if node.tls is not None else None
        self.acceptor.start([(sock, secure if is_tls else None) for sock, is_tls in listening])
        return self.acceptor

    def stop(self) -> None:
        """Stop accepting, let the C-STOREs in flight finish, then close what remains."""
        if self.acceptor is not None:
            self.acceptor.stop(SHUTDOWN_GRACE_SECONDS)
        self._connection.close()
        self._files.close()
        self._digests.shutdown()


class IncomingInstance:
    """One C-STORE's data set as it arrives (`acceptor.IncomingDataSet`).

    Up to `SPILL_BYTES` it is held in memory, as the PDUs brought it, and written whole once
    checked: most instances are a few hundred KB, and one write is their fastest path. A larger
    one is written to a file of the incoming folder as it arrives, its digest computed on the
    way, and checked there through a memory map: an association never holds more than
    `SPILL_BYTES` of an instance, however large it is. Past ``max_instance_mb``, what arrives is
    counted and dropped, and the C-STORE answered Out of Resources.
    """

    def __init__(self, receiver: Receiver, request: StoreRequest) -> None:
        self.receiver = receiver
        self.request = request
        self.size = 0
        self.too_large = False
        self.failure: OSError | None = None  # the file could not be written
        self._parts: list[memoryview | bytes] = []
        self._file: files.IncomingFile | None = None
        self._meta_length = 0
        self._hash = None

    def add(self, fragment: memoryview) -> None:
        self.size += len(fragment)
        if self.too_large or self.failure is not None:
            return
        if self.size > self.receiver.max_instance_bytes:
            self.too_large = True
            self.discard()
            return
        try:
            if self._file is not None:
                self._file.write(fragment)
                self._hash.update(fragment)
                return
            self._parts.append(fragment)
            if self.size > SPILL_BYTES:
                self._spill()
        except OSError as error:
            self.failure = error
            self.discard()

    def _spill(self) -> None:
        request = self.request
        meta = file_preamble_and_meta(request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax)
        self._file = self.receiver._files.open()
        self._meta_length = len(meta)
        self._hash = hashlib.sha256(meta)
        self._file.write(meta)
        for part in self._parts:
            self._file.write(part)
            self._hash.update(part)
        self._parts = []

    def finish(self) -> int:
        try:
            return self.receiver._finish(self)
        finally:
            self.discard()  # whatever was not kept

    @contextlib.contextmanager
    def data_set(self) -> Iterator[bytes | memoryview]:
        """The data set as received: in memory, or mapped from its file."""
        if self._file is None:
            if len(self._parts) != 1 or not isinstance(self._parts[0], bytes):
                self._parts = [b"".join(self._parts)]  # joined once, for the checks and the write
            yield self._parts[0]
            return
        with mmap.mmap(self._file.descriptor, 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            data_set = view[self._meta_length:]
            try:
                yield data_set
            finally:  # every view released, or the map cannot close
                data_set.release()
                view.release()

    def keep(self, header: InstanceHeader) -> Recorded:
        """Store the checked data set under its UIDs and index it."""
        receiver = self.receiver
        if self._file is None:
            return receiver._keep_in_memory(self.request, header, b"".join(self._parts))  # joined: one part
        incoming, self._file = self._file, None
        return receiver._keep_file(self.request, header, incoming, self._hash.hexdigest())

    def discard(self) -> None:
        self._parts = []
        if self._file is not None:
            incoming, self._file = self._file, None
            self.receiver._files.discard(incoming)


def _context(abstract_syntax: str) -> PresentationContext:
    context = PresentationContext()
    context.abstract_syntax = abstract_syntax
    context.transfer_syntax = ACCEPTED_TRANSFER_SYNTAXES
    return context


def _parse(data, implicit_vr: bool, little_endian: bool) -> Dataset:
    """The elements up to group 0020 (every UID and value the index keeps), as pydicom reads
    them: each element's bytes located, values decoded lazily. The rest was walked by
    `check_structure`; reading it again here would only copy the pixels."""
    source = BytesIO(data) if isinstance(data, bytes) else _ViewReader(data)
    return read_dataset(source, implicit_vr, little_endian, stop_when=_past_the_index_values)


class _ViewReader:
    """A buffer read as a file, without the copy that BytesIO makes of anything but bytes: a
    memory-mapped instance of a gigabyte is read only where pydicom reads."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.view) if size is None or size < 0 else min(self.position + size, len(self.view))
        data = bytes(self.view[self.position:end])
        self.position = end
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: len(self.view)}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position


def _past_the_index_values(tag, _vr, _length) -> bool:
    return tag > LAST_INDEXED_TAG


@functools.cache
def _encoding(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated): once per syntax, as a UID validates its value."""
    syntax = UID(transfer_syntax)
    return syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated
