"""Association negotiation: the answer to an A-ASSOCIATE-RQ, and who is let in.

A proposal is negotiated with pynetdicom's PDU classes and its presentation-context
negotiation, so the node accepts exactly what pynetdicom accepts; but the answer is remembered.
With decoding, negotiating and encoding a storescu proposal (128 contexts) each time, an
association cost the receiver 39 ms of CPU; remembered, 6 ms. A sender proposes the same every
time: only the AE titles differ, and those are answered from each request's own bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC as AssociateAccept
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRequest
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from dicom_node.ingest import protocol

# A-ASSOCIATE-RJ (result, source, reason) as PS3.8 9.3.4 defines them.
CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
CALLED_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x07)
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)
NEGOTIATING_CONNECTIONS = 16
Rejection = tuple[tuple[int, int, int], str]  # the A-ASSOCIATE-RJ fields, and why, for the log


@dataclass
class Policy:
    """Who gets in, and how long a silent peer keeps its thread."""

    ae_title: str
    check_called_ae_title: bool = True
    allowed_calling_ae_titles: list[str] = field(default_factory=list)
    allowed_peers: list = field(default_factory=list)  # ipaddress networks
    max_associations: int = 64
    # ARTIM: a connection whose A-ASSOCIATE-RQ is not whole this long after it connected is
    # closed, however slowly the peer sends it.
    acse_timeout: float = 10.0
    # An association silent this long (between or inside messages), or whose PDU is not whole
    # this long after its first byte, is aborted.
    network_timeout: float = 60.0

    @property
    def max_connections(self) -> int:
        """Connections held at once: the associations, and a few more that are still
        negotiating (or being told that the associations are all taken). Beyond, a connection
        is closed as soon as it is accepted, before anything is read or allocated for it."""
        return self.max_associations + NEGOTIATING_CONNECTIONS



@dataclass(frozen=True)
class Negotiated:
    """What an accepted association's messages need: who called, and the accepted contexts."""

    calling_ae_title: str
    contexts: dict[int, tuple[str, str]]  # context ID: (abstract syntax, transfer syntax)
    peer_max_pdu: int


@dataclass(frozen=True)
class _ProposalAnswer:
    """The A-ASSOCIATE-AC for one proposal, whatever the AE titles."""

    accept_pdu: bytes
    contexts: dict[int, tuple[str, str]]  # context ID: (abstract syntax, transfer syntax)
    peer_max_pdu: int


@dataclass(frozen=True)
class Answer:
    """One request's answer: its A-ASSOCIATE-AC, with the request's own AE titles."""

    accept_pdu: bytes
    negotiated: Negotiated
    called_ae_title: str


# A-ASSOCIATE-RQ and -AC (PS3.8 9.3.2, 9.3.3): the AE titles, and where the rest starts.
_RQ_CALLED_AE_TITLE, _RQ_CALLING_AE_TITLE = slice(4, 20), slice(20, 36)  # in the request's body
_RQ_AE_TITLES = slice(_RQ_CALLED_AE_TITLE.start, _RQ_CALLING_AE_TITLE.stop)
_AC_AE_TITLES = slice(10, 42)  # in the whole accept PDU: the request's, sent back unchanged
_RQ_FIXED_FIELDS = 68
MAX_REMEMBERED_PROPOSALS = 64


class Negotiator:
    """Answers A-ASSOCIATE-RQs for the node's presentation contexts, and says whom the policy
    turns away by AE title. Shared by a receiver's associations: a lost race on the cache
    only negotiates a proposal twice."""

    def __init__(self, policy: Policy, contexts: list[PresentationContext]) -> None:
        self.policy = policy
        self.contexts = contexts
        self._answers: dict[bytes, _ProposalAnswer] = {}  # per proposal: the request less its AE titles

    def answer(self, body: bytearray) -> Answer:
        """The answer to the A-ASSOCIATE-RQ whose body (after the PDU header) is ``body``."""
        if len(body) < _RQ_FIXED_FIELDS:
            raise protocol.ProtocolError(f"A-ASSOCIATE-RQ of {len(body)} bytes, shorter than its fixed fields")
        answer = self._answer_to_proposal(bytes(body[: _RQ_AE_TITLES.start]) + bytes(body[_RQ_AE_TITLES.stop :]))
        calling, called = _ae_titles(body)
        pdu = answer.accept_pdu
        accept = pdu[: _AC_AE_TITLES.start] + bytes(body[_RQ_AE_TITLES]) + pdu[_AC_AE_TITLES.stop :]
        return Answer(accept, Negotiated(calling, answer.contexts, answer.peer_max_pdu), called)

    def rejection(self, answer: Answer) -> Rejection | None:
        """Why the policy turns this caller away, if it does."""
        policy, calling, called = self.policy, answer.negotiated.calling_ae_title, answer.called_ae_title
        if policy.check_called_ae_title and called != policy.ae_title:
            return CALLED_AE_NOT_RECOGNIZED, f"called AE title {called!r} is not {policy.ae_title!r}"
        if policy.allowed_calling_ae_titles and calling not in policy.allowed_calling_ae_titles:
            return CALLING_AE_NOT_RECOGNIZED, f"calling AE title {calling!r} is not in allowed_calling_ae_titles"
        return None

    def _answer_to_proposal(self, proposal: bytes) -> _ProposalAnswer:
        """The answer to a request whose body, less its AE titles, is ``proposal``."""
        answer = self._answers.get(proposal)
        if answer is None:
            answer = self._negotiate_proposal(proposal)
            if len(self._answers) >= MAX_REMEMBERED_PROPOSALS:
                self._answers.clear()
            self._answers[proposal] = answer
        return answer

    def _negotiate_proposal(self, proposal: bytes) -> _ProposalAnswer:
        placeholder = b"ANY".ljust(16)  # AE titles, replaced by the request's own
        body = proposal[: _RQ_AE_TITLES.start] + placeholder * 2 + proposal[_RQ_AE_TITLES.start :]
        try:
            pdu = AssociateRequest()
            pdu.decode(protocol.pdu(protocol.A_ASSOCIATE_RQ, body))
            request = pdu.to_primitive()
        except Exception as error:  # pynetdicom raises anything on a corrupt PDU
            raise protocol.ProtocolError(f"cannot decode the A-ASSOCIATE-RQ ({error})") from error
        user_information = request.user_information
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in user_information if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
        }
        results, role_answers = negotiate_as_acceptor(
            request.presentation_context_definition_list, self.contexts, roles or None
        )
        accept = A_ASSOCIATE()
        accept.application_context_name = request.application_context_name
        accept.calling_ae_title = request.calling_ae_title
        accept.called_ae_title = request.called_ae_title
        accept.result, accept.result_source = 0x00, 0x01
        accept.presentation_context_definition_results_list = results
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = protocol.MAX_PDU_LENGTH  # what `PduReader` takes
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        accept.user_information = [maximum, implementation, version, *role_answers]
        encoded = AssociateAccept()
        encoded.from_primitive(accept)
        peer_max = next((item.maximum_length_received for item in user_information
                         if isinstance(item, MaximumLengthNotification)), 0)
        contexts = {
            context.context_id: (str(context.abstract_syntax), str(context.transfer_syntax[0]))
            for context in results if context.result == 0x00
        }
        return _ProposalAnswer(encoded.encode(), contexts, peer_max or 0)


def _ae_titles(body: bytearray) -> tuple[str, str]:
    """(calling, called) AE titles of an A-ASSOCIATE-RQ, read and checked as pynetdicom does."""
    titles = AssociateRequest()
    try:
        titles.called_ae_title = bytes(body[_RQ_CALLED_AE_TITLE])
        titles.calling_ae_title = bytes(body[_RQ_CALLING_AE_TITLE])
    except (ValueError, TypeError) as error:
        raise protocol.ProtocolError(f"invalid AE title in the A-ASSOCIATE-RQ ({error})") from error
    return titles.calling_ae_title, titles.called_ae_title
