"""Results go out as stored when the peer accepts their transfer syntax, converted otherwise.

The peer is DCMTK's storescp; what it writes is read back and compared with what was sent.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pynetdicom.association
import pytest

from dicom_node import dispatch
from dicom_node.config import Config, Destination
from tests.support.ct_study import small_study
from tests.support.peers import dcmtk_env, free_port, wait_for


@pytest.fixture
def results(tmp_path: Path) -> list[Path]:
    """Three stored files, as the node writes them (Explicit VR Little Endian)."""
    _, paths = small_study(tmp_path / "results", slices=3)
    return paths


@contextmanager
def _storescp(folder: Path, *options: str) -> Iterator[Destination]:
    port = free_port()
    folder.mkdir()
    process = subprocess.Popen(
        ["storescp", *options, "-od", str(folder), str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    finally:
        process.terminate()
        process.wait()


def _send(destination: Destination, paths: list[Path]) -> dict[str, dispatch.Outcome]:
    config = Config(destinations=[destination])
    echo = ["echoscu", destination.host, str(destination.port)]
    wait_for(
        lambda: subprocess.run(echo, env=dcmtk_env(), capture_output=True, check=False).returncode == 0,
        10,
        "storescp to listen",
    )
    return dispatch._send(config, destination, [str(p) for p in paths])


def _received(folder: Path) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in folder.iterdir())}


def test_accepted_syntax_is_sent_as_stored_without_decoding(tmp_path, results, monkeypatch) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("the file was decoded")

    monkeypatch.setattr(dispatch.pydicom, "dcmread", no_decoding)
    monkeypatch.setattr(pynetdicom.association, "dcmread", no_decoding)
    with _storescp(tmp_path / "pacs") as destination:
        assert _send(destination, results) == {str(p): dispatch.SENT for p in results}
    monkeypatch.undo()
    received = _received(tmp_path / "pacs")
    for path in results:
        sent = pydicom.dcmread(path)
        copy = received[str(sent.SOPInstanceUID)]
        assert copy.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert copy.PixelData == sent.PixelData and copy.PatientName == sent.PatientName


def test_a_peer_that_declines_the_stored_syntax_gets_a_converted_copy(tmp_path, results) -> None:
    with _storescp(tmp_path / "pacs", "+xi") as destination:  # implicit VR little endian only
        assert _send(destination, results) == {str(p): dispatch.SENT for p in results}
    received = _received(tmp_path / "pacs")
    assert len(received) == len(results)
    for path in results:
        sent = pydicom.dcmread(path)
        copy = received[str(sent.SOPInstanceUID)]
        assert copy.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
        assert copy.PixelData == sent.PixelData and copy.ImagePositionPatient == sent.ImagePositionPatient


def test_of_two_nodes_that_read_the_same_due_delivery_one_sends_it_and_a_restart_frees_its_claims(database_url):
    from sqlalchemy import select

    from dicom_node.state import db

    engine = db.connect(database_url)
    with engine.begin() as connection:
        connection.execute(db.studies.insert().values(study_uid="1.2", state="complete", first_received_at=1.0,
                                                      last_received_at=2.0))
        job = connection.execute(db.jobs.insert().values(study_uid="1.2", series_uid="1.2.1", pipeline="p",
                                                         state="done", created_at=1.0)).inserted_primary_key[0]
        result = connection.execute(db.results.insert().values(job_id=job, kind="SEG", sop_instance_uid="1.2.9",
                                                               series_uid="1.2.8", path="/nowhere",
                                                               created_at=1.0)).inserted_primary_key[0]
        connection.execute(db.deliveries.insert().values(result_id=result, destination="pacs", state="pending",
                                                         not_before=0.0))
    with db.reading(engine) as connection:  # both nodes read it as due
        due = connection.execute(select(db.deliveries.c.id, db.deliveries.c.not_before)).all()
    first, second = (Config.model_validate({"node": {"port": port}}) for port in (11112, 11113))
    assert [len(dispatch._claim(node, engine, due)) for node in (first, second)] == [1, 0]
    assert dispatch.release_claims(second, engine) == 0, "not its claim"
    assert dispatch.release_claims(first, engine) == 1
    with db.reading(engine) as connection:
        assert connection.execute(select(db.deliveries.c.not_before, db.deliveries.c.claimed_by)).one() == (0.0, None)
