"""The node's association handling, against DCMTK and a raw Upper Layer peer.

The acceptor is the node's own code (not pynetdicom's reactors): these tests hold it to the
protocol where DCMTK's tools and the other listener tests do not reach: data split over many
PDUs, the association limit, operations it does not offer, data on a context it did not accept,
a connection that never speaks, and release.
"""

from __future__ import annotations

import subprocess
import time

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.support.ct_study import StudyInfo, ct_series, make_phantom, write_series
from tests.support.peers import dcmtk_env, start_node, storescu, write_node_config
from tests.support.raw_dul import (
    RawAssociation,
    associate_rq,
    c_store_rq,
    command_rq,
    dataset_bytes,
    p_data,
    release_rq,
)

C_FIND = 0x0020


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from tests.support.peers import free_port

    port = free_port()
    config = write_node_config(tmp_path_factory.mktemp("acceptor") / "node", port, destinations=[], pipelines=[],
                               stable_after=600, receivers=1, max_associations=2, min_free_disk_mb=0)
    started = start_node(config, port)
    yield started
    started.stop()


def associated(node) -> RawAssociation:
    association = RawAssociation(node.port)
    association.send(associate_rq(node.ae_title, "RAWPEER", CTImageStorage, ExplicitVRLittleEndian))
    answer = association.read_pdu()
    assert answer is not None and answer[0] == 0x02, answer
    return association


def tiny_instance() -> tuple[bytes, str]:
    [ds] = ct_series(make_phantom((8, 8, 1), (1.0, 1.0, 1.0), seed=3), StudyInfo(), 1, "raw")
    return dataset_bytes(ds), ds.SOPInstanceUID


def test_a_dataset_split_over_many_pdus_is_stored_byte_for_byte(node, tmp_path):
    phantom = make_phantom((256, 256, 2), (1.0, 1.0, 1.0), seed=4)
    paths = write_series(ct_series(phantom, StudyInfo(), 1, "fragments"), tmp_path / "series")
    # 4 KB PDUs: each 128 KB data set arrives as some 32 P-DATA-TF PDUs.
    sent = storescu(node.ae_title, node.port, paths, "--max-send-pdu", "4096")
    assert sent.returncode == 0, sent.stderr
    for path in paths:
        original = pydicom.dcmread(path)
        [(stored_path,)] = node.query("SELECT path FROM instances WHERE sop_instance_uid = ?", original.SOPInstanceUID)
        stored = pydicom.dcmread(stored_path)
        assert stored.PixelData == original.PixelData
        assert stored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_associations_beyond_the_limit_are_rejected_transiently(node):
    first, second = associated(node), associated(node)
    try:
        third = RawAssociation(node.port)
        third.send(associate_rq(node.ae_title, "RAWPEER", CTImageStorage, ExplicitVRLittleEndian))
        kind, body = third.read_pdu()
        third.sock.close()
        assert kind == 0x03 and tuple(body[1:4]) == (0x02, 0x03, 0x02)  # transient, local limit exceeded
        assert "already 2 associations (max_associations)" in node.log()
    finally:
        first.close()
    fourth = associated(node)  # the released slot is free again
    fourth.close()
    second.close()


def test_an_operation_the_node_does_not_offer_is_answered_and_the_association_goes_on(node):
    association = associated(node)
    try:
        association.send(p_data(command_rq(CTImageStorage, C_FIND, has_dataset=False), command=True))
        response = association.response()
        assert response is not None and response.Status == 0x0211 and response.CommandField == 0x8020
        assert response.MessageIDBeingRespondedTo == 7
        dataset, uid = tiny_instance()
        association.send(p_data(c_store_rq(CTImageStorage, uid), command=True))
        association.send(p_data(dataset, command=False))
        response = association.response()
        assert response.Status == 0x0000 and response.AffectedSOPInstanceUID == uid
    finally:
        association.close()


def test_data_on_a_context_that_was_not_accepted_aborts_that_association_only(node):
    association = associated(node)
    association.send(p_data(c_store_rq(CTImageStorage, generate_uid()), command=True, context_id=3))
    kind, _ = association.read_pdu()
    association.sock.close()
    assert kind == 0x07  # A-ABORT
    assert "presentation context 3, which was not accepted" in node.log()
    assert node.echo()


def test_release_is_answered_with_a_release_response(node):
    association = associated(node)
    association.send(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
    kind, _ = association.read_pdu()
    association.sock.close()
    assert kind == 0x06


def test_a_connection_that_never_speaks_is_dropped_after_the_artim_timeout(node):
    silent = RawAssociation(node.port, timeout=30)
    started = time.monotonic()
    assert silent.read_pdu() is None  # closed by the node
    assert 9 < time.monotonic() - started < 20
    silent.sock.close()


def test_echo_from_dcmtk(node):
    result = subprocess.run(["echoscu", "-aec", node.ae_title, "127.0.0.1", str(node.port)],
                            check=False, capture_output=True, env=dcmtk_env())
    assert result.returncode == 0


def test_a_proposal_answered_before_is_answered_again_with_each_requests_own_ae_titles(node):
    """The answer to a proposal is remembered (negotiating it again cost 39 ms of CPU per
    association, against 6); only the AE titles, sent back as each request has them, differ."""
    answers = []
    for calling in ("FIRSTPEER", "SECOND"):
        association = RawAssociation(node.port)
        try:
            association.send(associate_rq(node.ae_title, calling, CTImageStorage, ExplicitVRLittleEndian))
            kind, body = association.read_pdu()
            assert kind == 0x02
            answers.append(body)
            association.send(release_rq())
            association.read_pdu()
        finally:
            association.close()
    titles = [body[4:36] for body in answers]  # the body follows the 6-byte PDU header
    assert titles == [(node.ae_title.ljust(16) + calling.ljust(16)).encode() for calling in ("FIRSTPEER", "SECOND")]
    assert [body[:4] + body[36:] for body in answers[1:]] == [answers[0][:4] + answers[0][36:]]
