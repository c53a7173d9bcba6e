"""Associations the node accepts: one thread each, blocked on its socket between PDUs.

pynetdicom's acceptor runs two reactor threads per association that poll each other's queues
with millisecond sleeps, and builds pydicom datasets for every command and response; measured
on small instances, that left the node at a third of Orthanc's rate. Here a thread reads a PDU
whole, answers C-ECHO and C-STORE with hand-written command sets (`protocol`), and sleeps
only in ``recv``. Negotiation still uses pynetdicom's PDU classes and its presentation-context
negotiation, so the node accepts exactly what pynetdicom accepted; but its answer to a proposal
is remembered. With decoding, negotiating and encoding a storescu proposal (128 contexts) each
time, an association cost the receiver 39 ms of CPU; remembered, 6 ms. A sender proposes the
same every time: only the AE titles differ, and those are answered from each request's own
bytes.

Association policy, in this order: the peer's address against ``allowed_peers`` (connection
closed before any PDU is read), the number of connections, then the called AE title, the
calling AE title (`negotiation`) and the number of associations (A-ASSOCIATE-RJ with the reason
PS3.8 has for each). Every refusal is logged with the peer's address and the reason.
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pynetdicom.presentation import PresentationContext

from dicom_node import metrics
from dicom_node.ingest import protocol
from dicom_node.ingest.negotiation import (
    LOCAL_LIMIT_EXCEEDED,
    NEGOTIATING_CONNECTIONS,
    Negotiated,
    Negotiator,
    Policy,
)

log = logging.getLogger(__name__)

SUCCESS = 0x0000
ACCEPT_POLL_SECONDS = 0.2  # how soon the accept loop notices `stop`


@dataclass(frozen=True)
class StoreRequest:
    """One C-STORE as its command set and presentation context announce it; its data set, in
    ``transfer_syntax``, follows in parts (`IncomingDataSet`)."""

    calling_ae_title: str
    address: str
    sop_class_uid: str  # the command's Affected SOP Class UID
    sop_instance_uid: str  # the command's Affected SOP Instance UID
    transfer_syntax: str
    context_sop_class_uid: str = ""  # the presentation context's abstract syntax; "" as the command's
    study_uid: str = ""  # the study the data set must belong to (a study-level STOW-RS); "" for any

    @property
    def abstract_syntax(self) -> str:
        return self.context_sop_class_uid or self.sop_class_uid


class IncomingDataSet(Protocol):
    """Where a C-STORE's data set goes as its fragments arrive, so that the acceptor never
    holds a whole instance itself."""

    def add(self, fragment: memoryview) -> None:
        """The next fragment, a view into a PDU that is not reused."""

    def finish(self) -> int:
        """The data set is whole: store it, and return the C-STORE status to answer."""

    def discard(self) -> None:
        """The association ended before the data set was whole: forget what arrived."""


@dataclass(eq=False)
class _Association:
    connection: socket.socket
    address: str
    port: int
    tls: ssl.SSLContext | None = None  # the listener's: its handshake comes first, in the association's thread
    connected_at: float = field(default_factory=time.monotonic)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    reader: protocol.PduReader = field(init=False)
    thread: threading.Thread | None = None
    # A C-STORE whose command set has arrived and whose response is not sent yet: a stop lets
    # it finish (`Acceptor.stop`).
    storing: bool = False
    incoming: IncomingDataSet | None = None

    def __post_init__(self) -> None:
        self.reader = protocol.PduReader(self.connection)

    @property
    def peer(self) -> str:
        """How log lines name the peer."""
        return f"{self.address}:{self.port}"

    def send(self, *pdus: bytes) -> None:
        with self.send_lock:
            for data in pdus:
                self.connection.sendall(data)


# A C-STORE's command set is some 200 bytes; one of more is no real peer's.
MAX_COMMAND_SET_LENGTH = 64 * 1024


class Acceptor:
    """Accepts associations on a listening socket shared with other processes, and hands each
    C-STORE to ``begin_store``, whose data set's `IncomingDataSet.finish` gives the status sent
    back."""

    def __init__(self, policy: Policy, contexts: list[PresentationContext],
                 begin_store: Callable[[StoreRequest], IncomingDataSet]) -> None:
        self.policy = policy
        self.begin_store = begin_store
        self._connections: set[_Association] = set()  # from accept to close
        self._associations: set[_Association] = set()  # from admission to release
        self.negotiator = Negotiator(policy, contexts)
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._cut_off = threading.Event()  # the stop's grace is over
        self._accept_thread: threading.Thread | None = None

    def start(self, listening: list[tuple[socket.socket, ssl.SSLContext | None]]) -> None:
        """Accept on every socket of ``listening``; those with a TLS context are TLS listeners."""
        self._accept_thread = threading.Thread(target=self._accept_loop, args=(listening,),
                                               name="accept", daemon=True)
        self._accept_thread.start()

    def stop(self, grace_seconds: float) -> None:
        """Stop accepting; abort the associations between messages at once, and let each
        C-STORE whose command has arrived finish and be answered (up to ``grace_seconds``),
        then abort its association too. Returns once no association thread runs, so that
        nothing is stored after this returns, and nothing half stored is left (a data set not
        whole at the deadline is discarded)."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join()
        deadline = time.monotonic() + grace_seconds
        with self._lock:
            idle = [association for association in self._connections if not association.storing]
        for association in idle:
            self._hang_up(association)
        with self._lock:
            while self._connections and time.monotonic() < deadline:
                self._lock.wait(timeout=0.5)
            remaining = list(self._connections)
        self._cut_off.set()
        for association in remaining:
            log.warning("aborted the association with %s: the receiver stopped before its C-STORE was whole",
                        association.peer)
            self._hang_up(association)
        for association in remaining:
            if association.thread is not None:
                association.thread.join()

    def _hang_up(self, association: _Association) -> None:
        """Abort, and end the connection under the association's thread, wherever it waits."""
        self._abort(association, protocol.REASON_NOT_SPECIFIED)
        try:
            association.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _accept_loop(self, listening: list[tuple[socket.socket, ssl.SSLContext | None]]) -> None:
        contexts = dict(listening)
        while not self._stopping.is_set():
            readable, _, _ = select.select(list(contexts), [], [], ACCEPT_POLL_SECONDS)
            for ready in readable:
                self._accept(ready, contexts[ready])

    def _accept(self, listening: socket.socket, tls: ssl.SSLContext | None) -> None:
        """Take one connection, if this process wins it, and serve it in a thread of its own."""
        try:
            connection, address = listening.accept()
        except (BlockingIOError, InterruptedError):
            return  # another receiver process took this connection
        except OSError as error:
            log.error("accepting a connection failed: %s", error)
            return
        if not self._peer_allowed(address[0]):
            log.warning("refused a connection from %s: address not in allowed_peers", address[0])
            metrics.count_association(accepted=False)
            connection.close()
            return
        association = _Association(connection, address[0], address[1], tls)
        with self._lock:
            full = len(self._connections) >= self.policy.max_connections
            if not full:
                self._connections.add(association)
        if full:
            log.warning("closed a connection from %s at once: already %d connections (max_associations = %d "
                        "and %d more negotiating)", association.peer, self.policy.max_connections,
                        self.policy.max_associations, NEGOTIATING_CONNECTIONS)
            metrics.count_association(accepted=False)
            connection.close()
            return
        connection.setblocking(True)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        association.thread = threading.Thread(target=self._serve, args=(association,),
                                              name=f"association {association.peer}", daemon=True)
        association.thread.start()

    def _peer_allowed(self, address: str) -> bool:
        if not self.policy.allowed_peers:
            return True
        ip = ipaddress.ip_address(address)
        return any(ip in network for network in self.policy.allowed_peers)

    def _serve(self, association: _Association) -> None:
        connection = association.connection
        try:
            if association.tls is not None:
                secured = self._handshake(association)
                if secured is None:
                    return
                connection = secured
            association.reader.set_silence(self.policy.acse_timeout)
            try:
                negotiated = self._negotiate(association)
            except TimeoutError:
                log.warning("closed the connection from %s: no whole association request within %.0f s (ARTIM)",
                            association.peer, self.policy.acse_timeout)
                return
            if negotiated is None:
                return
            association.reader.set_silence(self.policy.network_timeout)
            self._exchange(association, negotiated)
        except protocol.ConnectionClosed:
            pass
        except TimeoutError as error:
            log.warning("aborted the association with %s: %s", association.peer, error)
            self._abort(association, protocol.REASON_NOT_SPECIFIED)
        except protocol.ProtocolError as error:
            log.warning("aborted the association with %s: %s", association.peer, error)
            self._abort(association, error.reason)
        except OSError as error:
            if not self._stopping.is_set():
                log.warning("lost the association with %s: %s", association.peer, error)
        except Exception:
            log.exception("aborted the association with %s after an unexpected error", association.peer)
            self._abort(association, protocol.REASON_NOT_SPECIFIED)
        finally:
            if association.incoming is not None:  # the association ended inside a data set
                association.incoming.discard()
                association.incoming = None
            connection.close()
            with self._lock:
                self._associations.discard(association)
                self._connections.discard(association)
                self._lock.notify_all()

    def _handshake(self, association: _Association) -> ssl.SSLSocket | None:
        """The TLS handshake, within the ARTIM time (``acse_timeout``) as the request that
        follows it; None, logged with the peer's address, when it fails: a peer without a valid
        certificate where one is required, another protocol, a TLS version below 1.2."""
        raw = association.connection
        raw.settimeout(self.policy.acse_timeout)
        try:
            secured = association.tls.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as error:
            log.warning("refused a TLS connection from %s: %s", association.peer,
                        getattr(error, "reason", None) or error)
            metrics.count_association(accepted=False)
            raw.close()
            return None
        secured.settimeout(None)  # from here on, the kernel's timeouts (`protocol.set_timeout`)
        association.connection = secured
        association.reader = protocol.PduReader(secured)
        return secured

    def _forget(self, association: _Association) -> None:
        with self._lock:
            self._associations.discard(association)

    def _abort(self, association: _Association, reason: int) -> None:
        try:
            association.send(protocol.abort_pdu(reason))
        except OSError:
            pass

    def _negotiate(self, association: _Association) -> Negotiated | None:
        """Read the A-ASSOCIATE-RQ and answer it: AC with the negotiated contexts, or RJ."""
        kind, body = association.reader.read_pdu(
            protocol.MAX_ASSOCIATE_RQ_LENGTH, deadline=association.connected_at + self.policy.acse_timeout)
        if kind != protocol.A_ASSOCIATE_RQ:
            raise protocol.ProtocolError(f"expected an A-ASSOCIATE-RQ, got PDU type 0x{kind:02x}", protocol.UNEXPECTED_PDU)
        answer = self.negotiator.answer(body)
        rejection = self.negotiator.rejection(answer) or self._admit(association)
        if rejection is not None:
            (result, source, reason), why = rejection
            log.warning("rejected an association from %s: %s", association.peer, why)
            association.send(protocol.reject_pdu(result, source, reason))
            metrics.count_association(accepted=False)
            return None
        association.send(answer.accept_pdu)
        metrics.count_association(accepted=True)
        return answer.negotiated

    def _admit(self, association: _Association) -> tuple[tuple[int, int, int], str] | None:
        """Count the association in, unless the limit is reached (checked and counted at once,
        so two peers arriving together cannot both take the last place)."""
        with self._lock:
            if len(self._associations) >= self.policy.max_associations:
                return LOCAL_LIMIT_EXCEEDED, f"already {self.policy.max_associations} associations (max_associations)"
            self._associations.add(association)
        return None

    def _exchange(self, association: _Association, negotiated: Negotiated) -> None:
        """Messages until the peer releases or aborts: each command set, with its data set if it
        has one, is answered before the next PDU is read. A data set goes to its
        `IncomingDataSet` fragment by fragment, as it arrives."""
        command_parts: list[memoryview] = []
        command: dict[int, bytes] | None = None
        context_id = 0
        while True:
            kind, body = association.reader.read_pdu()
            if kind == protocol.A_RELEASE_RQ:
                self._forget(association)  # before the answer: the peer may reconnect at once
                association.send(protocol.RELEASE_RP)
                return
            if kind == protocol.A_ABORT:
                return
            if kind != protocol.P_DATA_TF:
                raise protocol.ProtocolError(f"unexpected PDU type 0x{kind:02x} during the association", protocol.UNEXPECTED_PDU)
            for value in protocol.presentation_data_values(body):
                if value.context_id not in negotiated.contexts:
                    raise protocol.ProtocolError(f"data on presentation context {value.context_id}, which was not accepted")
                if value.is_command:
                    if command is not None:
                        raise protocol.ProtocolError("a command set arrived before the previous one's data set")
                    command_parts.append(value.data)
                    if sum(len(part) for part in command_parts) > MAX_COMMAND_SET_LENGTH:
                        raise protocol.ProtocolError(f"a command set of more than {MAX_COMMAND_SET_LENGTH} bytes")
                    if value.is_last:
                        command, context_id = protocol.read_command(b"".join(command_parts)), value.context_id
                        command_parts = []
                        if protocol.command_us(command, protocol.COMMAND_DATA_SET_TYPE) == protocol.NO_DATA_SET:
                            self._answer(association, negotiated, context_id, command, None)
                            command = None
                        else:
                            self._begin(association, negotiated, context_id, command)
                else:
                    if command is None or value.context_id != context_id:
                        raise protocol.ProtocolError("a data set arrived without its command set")
                    if association.incoming is not None:
                        association.incoming.add(value.data)
                    if value.is_last:
                        self._answer(association, negotiated, context_id, command, association.incoming)
                        command = None
                if self._stopping.is_set() and not association.storing:
                    raise protocol.ProtocolError("the receiver is stopping: answered, and nothing more is taken",
                                           protocol.REASON_NOT_SPECIFIED)

    def _begin(self, association: _Association, negotiated: Negotiated, context_id: int,
               command: dict[int, bytes]) -> None:
        """A command set with a data set to follow: a C-STORE's goes to ``begin_store``; any
        other's is read and dropped."""
        if protocol.command_us(command, protocol.COMMAND_FIELD) != protocol.C_STORE_RQ:
            return
        abstract_syntax, transfer_syntax = negotiated.contexts[context_id]
        request = StoreRequest(
            calling_ae_title=negotiated.calling_ae_title,
            address=association.address,
            sop_class_uid=protocol.command_uid(command, protocol.AFFECTED_SOP_CLASS_UID),
            sop_instance_uid=protocol.command_uid(command, protocol.AFFECTED_SOP_INSTANCE_UID),
            transfer_syntax=transfer_syntax,
            context_sop_class_uid=abstract_syntax,
        )
        with self._lock:
            association.storing = True
        association.incoming = self.begin_store(request)

    def _answer(self, association: _Association, negotiated: Negotiated, context_id: int,
                command: dict[int, bytes], incoming: IncomingDataSet | None) -> None:
        operation = protocol.command_us(command, protocol.COMMAND_FIELD)
        if operation is None or operation & protocol.RESPONSE_BIT or operation == protocol.C_CANCEL_RQ:
            return  # nothing to answer: the node sends no requests, and stores are never pending
        if operation == protocol.C_ECHO_RQ:
            status = SUCCESS
        elif operation == protocol.C_STORE_RQ and incoming is not None:
            association.incoming = None
            if self._cut_off.is_set():  # too late: `stop` has hung up, nothing is stored now
                incoming.discard()
                raise protocol.ConnectionClosed()
            status = incoming.finish()
        else:
            log.warning("answered command 0x%04x from %s as unrecognized: the node only takes C-ECHO and C-STORE",
                        operation, association.peer)
            status = protocol.UNRECOGNIZED_OPERATION
        association.send(*protocol.p_data_pdus(context_id, protocol.response_command(command, status), negotiated.peer_max_pdu))
        if association.storing:
            with self._lock:
                association.storing = False
