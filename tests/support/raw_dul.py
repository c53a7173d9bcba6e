"""A deliberately naive DICOM Upper Layer client that sends whatever bytes a test asks for.

Fuzzing the listener needs a peer that breaks rules on purpose: malformed datasets inside a
well-formed C-STORE, or garbage where a PDU should be. Real toolkits refuse to send either.
"""

from __future__ import annotations

import socket
import struct
from io import BytesIO

import pydicom
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.dsutils import decode, encode

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = b"1.2.826.0.1.3680043.10.1426.1"


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def associate_rq(called: str, calling: str, abstract_syntax: str, transfer_syntax: str) -> bytes:
    context = bytes([1, 0, 0, 0]) + _item(0x30, abstract_syntax.encode()) + _item(0x40, transfer_syntax.encode())
    user = _item(0x51, struct.pack(">I", 65536)) + _item(0x52, IMPLEMENTATION_CLASS_UID)
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16).encode()
        + calling.ljust(16).encode()
        + bytes(32)
        + _item(0x10, APPLICATION_CONTEXT)
        + _item(0x20, context)
        + _item(0x50, user)
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def dataset_bytes(ds: Dataset) -> bytes:
    """A data set as a C-STORE carries it: Explicit VR Little Endian, no file meta."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def with_raw_value(dataset: bytes, tag: int, value: bytes) -> bytes:
    """``dataset`` (explicit VR little endian) with the value of the top-level element ``tag``
    replaced by ``value``, byte for byte: pydicom would tidy what a hostile peer sends."""
    ds = pydicom.dcmread(DicomBytesIO(dataset), force=True)
    element = ds.get_item(tag)
    start = element.value_tell - 8
    end = element.value_tell + element.length
    value += b"\0" * (len(value) % 2)
    header = struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, element.VR.encode(), len(value))
    return dataset[:start] + header + value + dataset[end:]


def p_data(data: bytes, command: bool, context_id: int = 1) -> bytes:
    pdv = struct.pack(">IBB", len(data) + 2, context_id, (1 if command else 0) | 0b10) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def command_rq(sop_class_uid: str, command_field: int, sop_instance_uid: str | None = None,
               has_dataset: bool = True) -> bytes:
    """A request's command set, as any DIMSE request starts."""
    command = Dataset()
    command.CommandGroupLength = 0
    command.AffectedSOPClassUID = sop_class_uid
    command.CommandField = command_field
    command.MessageID = 7
    command.Priority = 0
    command.CommandDataSetType = 0x0000 if has_dataset else 0x0101
    if sop_instance_uid is not None:
        command.AffectedSOPInstanceUID = sop_instance_uid
    command.CommandGroupLength = len(encode(command, True, True)) - 12
    return encode(command, True, True)


def c_store_rq(sop_class_uid: str, sop_instance_uid: str) -> bytes:
    return command_rq(sop_class_uid, 0x0001, sop_instance_uid)


def release_rq() -> bytes:
    return struct.pack(">BBI", 0x05, 0, 4) + bytes(4)


class RawAssociation:
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_pdu(self) -> tuple[int, bytes] | None:
        """The next PDU as (type, body), or None once the node closed the connection."""
        header = self._read(6)
        if header is None:
            return None
        kind, _, length = struct.unpack(">BBI", header)
        body = self._read(length)
        return None if body is None else (kind, body)

    def _read(self, size: int) -> bytes | None:
        chunks = b""
        while len(chunks) < size:
            try:
                chunk = self.sock.recv(size - len(chunks))
            except (TimeoutError, ConnectionResetError):
                return None
            if not chunk:
                return None
            chunks += chunk
        return chunks

    def response(self) -> Dataset | None:
        """The next response's command set, or None when the node aborted or closed."""
        pdu = self.read_pdu()
        if pdu is None or pdu[0] != 0x04:
            return None
        return decode(BytesIO(pdu[1][6:]), True, True)

    def store_status(self) -> int | None:
        """The Status of the C-STORE response, or None when the node aborted or closed."""
        response = self.response()
        return None if response is None else int(response.Status)

    def close(self) -> None:
        try:
            self.send(release_rq())
            self.read_pdu()
        except OSError:
            pass
        self.sock.close()
