"""Malformed datasets and PDUs against the listener: it answers or drops that peer, and serves on.

Each case opens its own association to the node process. Afterwards the node must still answer
C-ECHO and still process a good study from end to end.
"""

from __future__ import annotations

import struct
import time
import zlib

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.filebase import DicomBytesIO
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from tests.support.ct_study import DEMO_BUNDLE, StudyInfo, ct_series, make_phantom, small_study
from tests.support.peers import start_node, storescu, wait_for, write_node_config
from tests.support.raw_dul import (
    RawAssociation,
    associate_rq,
    c_store_rq,
    dataset_bytes,
    p_data,
    with_raw_value,
)

# Statuses a malformed instance may get; anything else (or a crash) is a failure of the node.
REFUSALS = {0xC000, 0xA900, 0xA700, 0x0110, 0xC210, 0xC211}


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from tests.support.peers import free_port

    workdir = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    config = write_node_config(
        workdir / "node", port, destinations=[],
        pipelines=[{"name": "ct-demo", "model": str(DEMO_BUNDLE), "select": {"Modality": "CT"}}],
        stable_after=2, min_free_disk_mb=0,
    )
    started = start_node(config, port)
    yield started
    started.stop()


def valid_dataset_bytes() -> tuple[bytes, str]:
    [ds] = ct_series(make_phantom((16, 16, 1), (10.0, 10.0, 5.0), seed=1), StudyInfo(), 1, "tiny")
    return dataset_bytes(ds), ds.SOPInstanceUID


VALID, VALID_UID = valid_dataset_bytes()


def send_instance(node, dataset: bytes, sop_class: str = CTImageStorage, uid: str = VALID_UID,
                  transfer_syntax: str = ExplicitVRLittleEndian) -> int | None:
    association = RawAssociation(node.port)
    try:
        association.send(associate_rq(node.ae_title, "FUZZER", sop_class, transfer_syntax))
        accepted = association.read_pdu()
        assert accepted is not None and accepted[0] == 0x02, "a well-formed association must be accepted"
        association.send(p_data(c_store_rq(sop_class, uid), command=True))
        association.send(p_data(dataset, command=False))
        return association.store_status()
    finally:
        association.close()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        if kind == "flip":
            data[position] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[position : position + draw(st.integers(1, 64))]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        if not data:
            break
    return bytes(data)


FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(dataset=st.one_of(st.binary(max_size=512), mutated()))
def test_malformed_datasets_are_refused_or_stored_never_crash(node, dataset):
    status = send_instance(node, dataset, uid=generate_uid())
    assert status is None or status == 0x0000 or status in REFUSALS, hex(status)


@settings(FUZZ, max_examples=60)
@given(garbage=st.binary(min_size=1, max_size=256), after_association=st.booleans())
def test_garbage_pdus_only_cost_their_own_connection(node, garbage, after_association):
    association = RawAssociation(node.port, timeout=5)
    try:
        if after_association:
            association.send(associate_rq(node.ae_title, "FUZZER", CTImageStorage, ExplicitVRLittleEndian))
            association.read_pdu()
        association.send(garbage)
    except OSError:
        pass  # the node may hang up mid-send: that is an answer too
    finally:
        association.sock.close()


NOT_UIDS = [".", "..", "../..", "1.2.3\n", "1.02.3", "1..2", "1.2.", "1" * 65, "1.2/3"]
UID_TAGS = [0x0020000D, 0x0020000E, 0x00080018]


def deflated(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


# A data set of 16 x 16 pixels whose Pixel Data is followed by 80 MB of zeros in a private
# element: it inflates past the 64 MiB the node inflates, from some 80 KB.
BOMB = deflated(VALID + struct.pack("<HH2s2xI", 0x7FE1, 0x0010, b"OB", 80_000_000) + bytes(80_000_000))


LONG_VRS = {b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"}


def top_level_elements(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, VR, length) of each top-level element of an explicit VR little endian data set
    without sequences of undefined length."""
    elements, offset = [], 0
    while offset < len(data):
        vr = data[offset + 4:offset + 6]
        if vr in LONG_VRS:
            (length,), header = struct.unpack_from("<I", data, offset + 8), 12
        else:
            (length,), header = struct.unpack_from("<H", data, offset + 6), 8
        elements.append((offset, vr, length))
        offset += header + length
    return elements


TOP_LEVEL_ELEMENTS = top_level_elements(VALID)


@st.composite
def hostile(draw) -> tuple[bytes, str]:
    """A data set of one of the shapes hostile or broken peers send, and its transfer syntax:
    UIDs that are no UIDs, lengths longer than what follows, data cut off, deflate bombs."""
    shape = draw(st.sampled_from(["not a uid", "over-long element", "truncated", "deflate bomb"]))
    if shape == "not a uid":
        tag, value = draw(st.sampled_from(UID_TAGS)), draw(st.sampled_from(NOT_UIDS))
        return with_raw_value(VALID, tag, value.encode()), ExplicitVRLittleEndian
    if shape == "over-long element":
        offset, vr, length = draw(st.sampled_from(TOP_LEVEL_ELEMENTS))
        data = bytearray(VALID)
        if vr in LONG_VRS:
            struct.pack_into("<I", data, offset + 8, draw(st.integers(length + 1, 2**32 - 2)))
        else:
            struct.pack_into("<H", data, offset + 6, draw(st.integers(length + 1, 2**16 - 1)))
        return bytes(data), ExplicitVRLittleEndian
    if shape == "truncated":
        return VALID[: draw(st.integers(0, len(VALID) - 1))], ExplicitVRLittleEndian
    return BOMB, DeflatedExplicitVRLittleEndian


@settings(FUZZ, max_examples=60)
@given(case=hostile())
def test_hostile_shapes_are_refused_and_never_indexed(node, case):
    dataset, transfer_syntax = case
    uid = generate_uid()
    status = send_instance(node, dataset, uid=uid, transfer_syntax=transfer_syntax)
    assert status in REFUSALS or status is None, hex(status or 0)
    assert node.query("SELECT count(*) FROM instances WHERE sop_instance_uid = ?", uid) == [(0,)]


@settings(FUZZ, max_examples=15)
@given(cuts=st.lists(st.integers(1, 400), min_size=1, max_size=12), pause=st.floats(0, 0.05))
def test_a_c_store_trickled_in_pieces_within_its_deadlines_is_stored(node, cuts, pause):
    [ds] = ct_series(make_phantom((16, 16, 1), (10.0, 10.0, 5.0), seed=2), StudyInfo(), 1, "trickled")
    association = RawAssociation(node.port)
    try:
        association.send(associate_rq(node.ae_title, "FUZZER", CTImageStorage, ExplicitVRLittleEndian))
        assert association.read_pdu()[0] == 0x02
        message = p_data(c_store_rq(CTImageStorage, ds.SOPInstanceUID), command=True) + p_data(
            dataset_bytes(ds), command=False)
        position = 0
        for cut in cuts:
            association.send(message[position:position + cut])
            position += cut
            time.sleep(pause)
        association.send(message[position:])
        assert association.store_status() == 0x0000
    finally:
        association.close()


def test_specific_defects_get_the_specific_status(node):
    without_uid = pydicom.dcmread(DicomBytesIO(VALID), force=True)
    del without_uid.SOPInstanceUID
    assert send_instance(node, dataset_bytes(without_uid)) == 0xC000
    assert send_instance(node, VALID, sop_class=MRImageStorage) == 0xA900
    assert "refused" in node.log() and VALID_UID in node.log()


def test_the_node_still_serves_and_processes_a_good_study(node, tmp_path):
    assert node.echo()
    info, paths = small_study(tmp_path / "good")
    assert storescu(node.ae_title, node.port, paths).returncode == 0
    wait_for(
        lambda: node.query("SELECT state FROM jobs WHERE study_uid = ?", info.study_uid) == [("done",)],
        180, "the good study's job", 0.5,
    )
