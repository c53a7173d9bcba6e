"""After a crash, instances whose rename or index rows were lost are put back at start-up:
files left in the incoming folder every start, and files the index lost once per boot."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import load_config
from dicom_node.ingest.receiver import Receiver
from dicom_node.ingest.recovery import CHECKED_MARKER, recover_incoming, reindex_after_boot
from dicom_node.service import resume_after_restart
from dicom_node.state import db, files, jobs
from tests.support.ct_study import small_study
from tests.support.peers import write_node_config


@pytest.fixture
def node(tmp_path):
    config = load_config(write_node_config(tmp_path / "node", 11112, destinations=[], pipelines=[]))
    return config, db.connect(config.database_url)


def stored_as_received(config, paths: list[Path]) -> list[Path]:
    """The files where the receiver would have written them, with no index rows."""
    placed = []
    for path in paths:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        target = files.instance_path(config.node.data_dir, dataset.StudyInstanceUID, dataset.SeriesInstanceUID,
                                     dataset.SOPInstanceUID)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        placed.append(target)
    return placed


def rows(engine, sql: str) -> list[tuple]:
    with db.reading(engine) as connection:
        return [tuple(row) for row in connection.exec_driver_sql(sql)]


def test_lost_rows_are_rebuilt_from_the_files(tmp_path, node):
    config, engine = node
    info, paths = small_study(tmp_path / "study", slices=6)
    placed = stored_as_received(config, paths)

    assert reindex_after_boot(config, engine, "boot-1") == 6

    indexed = {uid: (path, digest, syntax) for uid, path, digest, syntax in
               rows(engine, "SELECT sop_instance_uid, path, sha256, transfer_syntax_uid FROM instances")}
    for path in placed:
        dataset = pydicom.dcmread(path)
        assert indexed[dataset.SOPInstanceUID] == (
            str(path), hashlib.sha256(path.read_bytes()).hexdigest(), dataset.file_meta.TransferSyntaxUID)
    assert rows(engine, "SELECT study_uid, state, patient_id FROM studies") == [
        (info.study_uid, "receiving", info.patient_id)]
    assert rows(engine, "SELECT modality FROM series") == [("CT",)]
    assert (config.node.data_dir / CHECKED_MARKER).read_text() == "boot-1"


def test_each_boot_is_checked_once(tmp_path, node):
    config, engine = node
    _, paths = small_study(tmp_path / "study", slices=4)
    _, *others = stored_as_received(config, paths)
    for path in others:
        path.rename(path.with_suffix(".later"))
    assert reindex_after_boot(config, engine, "boot-1") == 1
    for path in others:
        path.with_suffix(".later").rename(path)

    assert reindex_after_boot(config, engine, "boot-1") is None  # the node restarted, the machine did not
    assert len(rows(engine, "SELECT 1 FROM instances")) == 1
    assert reindex_after_boot(config, engine, "boot-2") == 3
    assert reindex_after_boot(config, engine, None) == 0  # a system that names no boot: every start checks


def test_a_file_that_cannot_be_indexed_is_reported_and_kept(tmp_path, node, caplog):
    config, engine = node
    _, paths = small_study(tmp_path / "study", slices=3)
    placed = stored_as_received(config, paths)
    broken = placed[0].parent / "1.2.3.4.dcm"
    broken.write_bytes(b"\0" * 200)
    misnamed = placed[0].parent / "1.2.3.5.dcm"
    shutil.copyfile(placed[1], misnamed)

    with caplog.at_level(logging.ERROR):
        assert reindex_after_boot(config, engine, "boot-1") == 3
    assert broken.exists() and misnamed.exists()
    reported = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert any(str(broken) in message for message in reported)
    assert any(str(misnamed) in message and "not its name" in message for message in reported)


def test_the_receiver_commits_without_waiting_for_the_disk(node):
    config, engine = node
    receiver = Receiver(config, engine)
    try:
        with receiver._connection.transaction() as cursor:
            assert cursor.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        receiver.stop()


def test_instances_left_in_the_incoming_folder_are_renamed_into_place_and_indexed(tmp_path, node, caplog):
    config, engine = node
    info, paths = small_study(tmp_path / "study", slices=3)
    incoming = files.incoming_folder(config.node.data_dir, config.instance_name)
    incoming.mkdir(parents=True)
    whole = incoming / "100-1.slot"  # flushed, its rename lost: the instance was acknowledged
    shutil.copyfile(paths[0], whole)
    (incoming / "100-2.slot").touch()  # made ahead, never written
    cut_short = incoming / "100-3.slot"  # the node died while writing it: never acknowledged
    cut_short.write_bytes(paths[1].read_bytes()[:-10])

    with caplog.at_level(logging.WARNING):
        assert recover_incoming(config, engine) == 1
    assert list(incoming.iterdir()) == []
    dataset = pydicom.dcmread(paths[0])
    [(path, digest)] = rows(engine, "SELECT path, sha256 FROM instances")
    assert path == str(files.instance_path(config.node.data_dir, info.study_uid, dataset.SeriesInstanceUID,
                                           dataset.SOPInstanceUID))
    assert Path(path).read_bytes() == paths[0].read_bytes()
    assert digest == hashlib.sha256(paths[0].read_bytes()).hexdigest()
    assert any(str(cut_short) in record.getMessage() for record in caplog.records)
    assert recover_incoming(config, engine) == 0


def test_a_node_recovers_its_own_incoming_folder_and_an_earlier_versions_but_not_another_nodes(tmp_path, node):
    """Nodes that share a data_dir each make files ahead in a folder of their own: another
    node's start must leave them alone, as that node is writing into them."""
    config, engine = node
    _, paths = small_study(tmp_path / "study", slices=2)
    incoming = files.incoming_folder(config.node.data_dir, config.instance_name)
    incoming.mkdir(parents=True)
    legacy = incoming.parent / "100-1.slot"  # left by a node of the version before these folders
    shutil.copyfile(paths[0], legacy)
    others = incoming.parent / "another-host-11112"
    others.mkdir()
    in_use = others / "200-1.slot"
    shutil.copyfile(paths[1], in_use)
    assert recover_incoming(config, engine) == 1
    assert not legacy.exists() and in_use.read_bytes() == paths[1].read_bytes()


def test_of_two_versions_left_in_the_incoming_folder_the_newer_wins(tmp_path, node):
    """``9-10.slot`` was made after ``9-9.slot``, and written after it: compared as text, the
    older would be indexed last and win."""
    config, engine = node
    _, paths = small_study(tmp_path / "study", slices=1)
    older, newer = pydicom.dcmread(paths[0]), pydicom.dcmread(paths[0])
    newer.PatientName = "Newer^Version"
    incoming = files.incoming_folder(config.node.data_dir, config.instance_name)
    incoming.mkdir(parents=True)
    older.save_as(incoming / "9-9.slot")
    newer.save_as(incoming / "9-10.slot")
    os.utime(incoming / "9-9.slot", ns=(1_000_000_000, 1_000_000_000))
    os.utime(incoming / "9-10.slot", ns=(2_000_000_000, 2_000_000_000))
    recover_incoming(config, engine)
    [(path,)] = rows(engine, "SELECT path FROM instances")
    assert pydicom.dcmread(path).PatientName == "Newer^Version"


def test_results_an_interrupted_job_wrote_and_never_recorded_are_removed_at_start(tmp_path, node):
    config, engine = node
    with engine.begin() as connection:
        connection.execute(db.studies.insert().values(study_uid="1.2.3", state="complete", first_received_at=0,
                                                      last_received_at=0))
        jobs.enqueue(connection, "1.2.3", "1.2.3.4", "", "ct")
        connection.execute(db.jobs.update().values(state="running", worker=f"{socket.gethostname()}:999999999"))
    recorded = files.result_path(config.node.data_dir, "1.2.3", "1.2.3.5", "1.2.3.5.1")
    orphan = files.result_path(config.node.data_dir, "1.2.3", "1.2.3.6", "1.2.3.6.1")
    for path in (recorded, orphan):
        files.write_durably(path, b"result")
    with engine.begin() as connection:
        [job_id] = connection.execute(db.jobs.select().with_only_columns(db.jobs.c.id)).scalars()
        connection.execute(db.results.insert().values(job_id=job_id, kind="SEG", sop_instance_uid="1.2.3.5.1",
                                                      series_uid="1.2.3.5", path=str(recorded), created_at=0))
    resume_after_restart(config, engine)
    assert recorded.exists() and not orphan.exists()
