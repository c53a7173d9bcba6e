"""The hand-written framing against pynetdicom's and pydicom's encoders and decoders."""

from __future__ import annotations

import random
import socket
import struct
import threading
from io import BytesIO

import pytest
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.dsutils import create_file_meta, decode, encode_file_meta

from dicom_node.ingest import protocol
from tests.support.raw_dul import c_store_rq, command_rq, p_data


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
@pytest.mark.parametrize("instance", ["1.2.3.4", "1.2.3.45", "1.2.826.0.1.3680043.8.498.12345678901234567890"])
def test_file_meta_is_byte_for_byte_what_pynetdicom_writes(syntax, instance):
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(
        create_file_meta(sop_class_uid=CTImageStorage, sop_instance_uid=instance, transfer_syntax=syntax)
    )
    assert protocol.file_preamble_and_meta(CTImageStorage, instance, syntax) == expected


def test_a_c_store_request_is_read_and_answered():
    request = protocol.read_command(c_store_rq(CTImageStorage, "1.2.3.45"))
    assert protocol.command_us(request, protocol.COMMAND_FIELD) == protocol.C_STORE_RQ
    assert protocol.command_uid(request, protocol.AFFECTED_SOP_INSTANCE_UID) == "1.2.3.45"
    assert protocol.command_uid(request, protocol.AFFECTED_SOP_CLASS_UID) == CTImageStorage

    response = decode(BytesIO(protocol.response_command(request, 0xA700)), True, True)
    assert response.CommandField == 0x8001 and response.Status == 0xA700
    assert response.MessageIDBeingRespondedTo == 7 and response.CommandDataSetType == 0x0101
    assert response.AffectedSOPClassUID == CTImageStorage and response.AffectedSOPInstanceUID == "1.2.3.45"
    encoded = protocol.response_command(request, 0)
    assert response.CommandGroupLength == len(encoded) - 12


def test_an_echo_response_has_no_instance():
    request = protocol.read_command(command_rq("1.2.840.10008.1.1", protocol.C_ECHO_RQ, has_dataset=False))
    response = decode(BytesIO(protocol.response_command(request, 0)), True, True)
    assert response.CommandField == 0x8030 and "AffectedSOPInstanceUID" not in response


def test_presentation_data_values_split_as_sent():
    first = p_data(b"command", command=True, context_id=3)
    second = p_data(b"data!", command=False, context_id=3)
    body = bytearray(first[6:] + second[6:])  # two PDVs in one PDU
    values = list(protocol.presentation_data_values(body))
    assert [(v.context_id, v.is_command, v.is_last, bytes(v.data)) for v in values] == [
        (3, True, True, b"command"), (3, False, True, b"data!"),
    ]


@pytest.mark.parametrize("body", [b"\x00\x00\x00\x09\x01\x03abc", b"\x00\x00\x00\x01\x01", b"\x00\x00\x00"])
def test_a_presentation_data_value_that_does_not_fit_is_a_protocol_error(body):
    with pytest.raises(protocol.ProtocolError):
        list(protocol.presentation_data_values(bytearray(body)))


def test_a_truncated_command_set_is_a_protocol_error():
    with pytest.raises(protocol.ProtocolError):
        protocol.read_command(c_store_rq(CTImageStorage, "1.2.3")[:-3])


@pytest.mark.parametrize("max_pdu", [0, 16, 17, 64, 4096])
def test_responses_fit_the_peers_maximum_pdu(max_pdu):
    command = protocol.response_command(protocol.read_command(c_store_rq(CTImageStorage, "1.2.3.4.5")), 0)
    pdus = protocol.p_data_pdus(5, command, max_pdu)
    rebuilt = b""
    for number, pdu in enumerate(pdus):
        kind, length = struct.unpack(">BxI", pdu[:6])
        assert kind == protocol.P_DATA_TF and length == len(pdu) - 6
        assert max_pdu == 0 or length <= max_pdu
        [value] = protocol.presentation_data_values(bytearray(pdu[6:]))
        assert value.context_id == 5 and value.is_command and value.is_last == (number == len(pdus) - 1)
        rebuilt += bytes(value.data)
    assert rebuilt == command


@pytest.mark.parametrize("buffer_size", [16, 64 * 1024])
def test_pdus_read_through_the_buffer_are_those_sent_however_the_bytes_arrive(buffer_size):
    bodies = [b"", b"a", bytes(range(15)), bytes(range(16)), bytes(range(17)), bytes(1000), b"x" * 200_000]
    stream = b"".join(protocol.pdu(protocol.P_DATA_TF, body) for body in bodies)
    sender, receiver = socket.socketpair()
    pieces = random.Random(7).choices([1, 5, 6, 7, 100, 4096, 70_000], k=len(stream))

    def send_in_pieces() -> None:
        offset = 0
        for piece in pieces:
            sender.sendall(stream[offset:offset + piece])
            offset += piece
            if offset >= len(stream):
                break
        sender.close()

    thread = threading.Thread(target=send_in_pieces)
    thread.start()
    reader = protocol.PduReader(receiver, buffer_size)
    try:
        assert [reader.read_pdu() for _ in bodies] == [(protocol.P_DATA_TF, bytearray(body)) for body in bodies]
        with pytest.raises(protocol.ConnectionClosed):
            reader.read_pdu()
    finally:
        thread.join()
        receiver.close()


def test_a_pdu_cut_short_by_the_peer_closing_is_not_returned():
    sender, receiver = socket.socketpair()
    sender.sendall(protocol.pdu(protocol.P_DATA_TF, b"whole") + protocol.pdu(protocol.P_DATA_TF, b"cut short")[:-3])
    sender.close()
    reader = protocol.PduReader(receiver)
    assert reader.read_pdu() == (protocol.P_DATA_TF, bytearray(b"whole"))
    with pytest.raises(protocol.ConnectionClosed):
        reader.read_pdu()
    receiver.close()


def test_a_silent_peer_times_out_by_the_kernels_timeout():
    sender, receiver = socket.socketpair()
    reader = protocol.PduReader(receiver)
    reader.set_silence(0.3)
    assert receiver.gettimeout() is None  # a blocking socket: no poll before each receive
    sender.sendall(protocol.pdu(protocol.P_DATA_TF, b"one")[:4])  # a PDU begun, never finished
    with pytest.raises(TimeoutError, match="nothing received for 0 s"):
        reader.read_pdu()
    sender.close()
    receiver.close()
