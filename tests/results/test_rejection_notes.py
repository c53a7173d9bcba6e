"""A rerun that replaces delivered results tells the archives with an IOCM rejection note.

Two real Orthancs receive the same results; one takes rejection notes (the default), the other
is configured not to. After `dicom-node rerun`, the first holds a Key Object Selection Document
titled "Rejected for Quality Reasons" that names exactly the first SEG and SR and passes
dciodvfy without a finding; the second holds the new results and no note.
"""

from __future__ import annotations

import pydicom
from pydicom.uid import KeyObjectSelectionDocumentStorage

from tests.support.ct_study import DEMO_BUNDLE, small_study
from tests.support.peers import start_node, start_orthanc, storescu, wait_for, write_node_config
from tests.support.validators import dciodvfy_findings


def _instances(orthanc, study_uid: str, modality: str) -> list[str]:
    return [instance for series in orthanc.series_of_study(study_uid)
            if series["MainDicomTags"].get("Modality") == modality for instance in series["Instances"]]


def test_a_rerun_sends_a_valid_rejection_note_of_the_replaced_results(tmp_path, node_port):
    archives = {name: start_orthanc(tmp_path / name, {"node": ["DICOMNODE", "127.0.0.1", node_port]}, ae_title=name.upper())
                for name in ("iocm", "plain")}
    try:
        destinations = [
            {"name": "iocm", "ae_title": "IOCM", "host": "127.0.0.1", "port": archives["iocm"].dicom_port},
            {"name": "plain", "ae_title": "PLAIN", "host": "127.0.0.1", "port": archives["plain"].dicom_port,
             "rejection_notes": False},
        ]
        config = write_node_config(
            tmp_path / "node", node_port, destinations=destinations, stable_after=2, min_free_disk_mb=0,
            pipelines=[{"name": "body", "model": str(DEMO_BUNDLE), "destinations": ["iocm", "plain"],
                        "select": {"Modality": "CT"}}],
        )
        node = start_node(config, node_port)
        try:
            info, paths = small_study(tmp_path / "study", slices=16)
            assert storescu(node.ae_title, node.port, paths).returncode == 0
            for orthanc in archives.values():
                wait_for(lambda o=orthanc: o.modality_counts(info.study_uid).keys() >= {"SEG", "SR"}, 240,
                         "the first results in both archives", 1.0)
            first = dict(node.query("SELECT kind, sop_instance_uid FROM results ORDER BY id"))
            assert "1 job(s) queued to run again" in node.cli("rerun", info.study_uid)
            wait_for(lambda: _instances(archives["iocm"], info.study_uid, "KO"), 240, "the rejection note", 1.0)
            for orthanc in archives.values():
                wait_for(lambda o=orthanc: o.modality_counts(info.study_uid).get("SR") == 2, 120,
                         "the new results in both archives", 1.0)
            status = node.cli("status")
            kinds = node.query("SELECT r.kind, d.destination, d.state FROM results r JOIN deliveries d "
                               "ON d.result_id = r.id WHERE r.kind = 'KO'")
        finally:
            node.stop()
        [note_id] = _instances(archives["iocm"], info.study_uid, "KO")
        note_path = tmp_path / "note.dcm"
        note_path.write_bytes(archives["iocm"].get(f"/instances/{note_id}/file"))
        assert "KO" not in archives["plain"].modality_counts(info.study_uid), "a destination that declined got a note"
    finally:
        for orthanc in archives.values():
            orthanc.stop()
    assert kinds == [("KO", "iocm", "sent")]
    assert "KO" in status, status
    assert dciodvfy_findings(note_path) == []
    note = pydicom.dcmread(note_path)
    assert note.SOPClassUID == KeyObjectSelectionDocumentStorage
    assert note.StudyInstanceUID == info.study_uid
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
    referenced = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for item in note.ContentSequence if item.ValueType in ("IMAGE", "COMPOSITE")}
    assert referenced == {first["SEG"], first["SR"]}, "the note does not name exactly the replaced SEG and SR"
    evidence = {sop.ReferencedSOPInstanceUID for study in note.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence}
    assert evidence == referenced
