"""One bad study, one bad delivery or one slow worker never stops the others, and no job runs twice.

Each test runs the node as a subprocess, sends with DCMTK and judges by what an operator sees:
what a real Orthanc (or DCMTK's storescp) received, what `dicom-node status` says, the log.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from tests.support.ct_study import DEMO_BUNDLE, StudyInfo, small_study
from tests.support.peers import dcmtk_env, free_port, start_node, storescu, wait_for, write_node_config
from tests.support.validators import dciodvfy_errors
from tests.test_faults import PACS, exactly_one_result_each, job_states, node_config

POSITION = Tag(0x00200032)


def poisoned_study(folder: Path) -> tuple[StudyInfo, list[Path]]:
    """A small CT whose fifth image has ImagePositionPatient ``a\\b\\c``: the receiver's
    structure check passes it (a DS is text), and it cannot become a volume."""
    info, paths = small_study(folder, slices=12)
    ds = pydicom.dcmread(paths[4])
    ds._dict[POSITION] = RawDataElement(POSITION, "DS", 6, b"a\\b\\c ", 0, False, True)
    ds.save_as(paths[4])
    return info, paths


def test_a_poisoned_study_fails_alone_and_the_others_get_their_results(tmp_path, orthanc, node_port):
    node = start_node(node_config(tmp_path, node_port, orthanc), node_port)
    try:
        poisoned, poisoned_paths = poisoned_study(tmp_path / "poisoned")
        gone, gone_paths = small_study(tmp_path / "gone", slices=12, seed=3)
        good = [small_study(tmp_path / f"good{n}", slices=12, seed=20 + n) for n in range(2)]
        for paths in (poisoned_paths, gone_paths):
            assert storescu(node.ae_title, node.port, paths).returncode == 0
        [(stored,)] = node.query("SELECT path FROM instances WHERE study_uid = ? LIMIT 1", gone.study_uid)
        os.unlink(stored)  # a file deleted under the node before its study is complete
        for _, paths in good:
            assert storescu(node.ae_title, node.port, paths).returncode == 0
        for info, _ in good:
            exactly_one_result_each(orthanc, info.study_uid, settle=2.0)
        wait_for(lambda: node.query("SELECT state FROM studies WHERE study_uid = ?", gone.study_uid) == [("failed",)],
                 60, "the study with a file gone to fail")
        status = node.cli("status")
        poisoned_line = next(line for line in status.splitlines() if line.startswith(poisoned.study_uid))
        assert " failed " in poisoned_line
        assert "cannot be a volume: its images cannot be read" in status
        gone_line = next(line for line in status.splitlines() if line.startswith(gone.study_uid))
        assert " failed " in gone_line and "No such file or directory" in status
        assert "Traceback" not in status
        assert node.log().count("Traceback") <= 1, "an error is logged once, not on every tick"
        assert orthanc.modality_counts(poisoned.study_uid).keys() <= {"CT"}
    finally:
        node.stop()


def test_a_study_without_type_2_attributes_gets_valid_results(tmp_path, orthanc, node_port):
    info, paths = small_study(tmp_path / "bare", slices=12)
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword in ("PatientName", "PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID",
                        "AccessionNumber", "StudyDate", "StudyTime"):
            delattr(ds, keyword)
        ds.save_as(path)
    node = start_node(node_config(tmp_path, node_port, orthanc), node_port)
    try:
        assert storescu(node.ae_title, node.port, paths).returncode == 0
        exactly_one_result_each(orthanc, info.study_uid, settle=1.0)
        results = node.query("SELECT kind, path FROM results")
        assert {kind for kind, _ in results} == {"SEG", "SR"}
        for kind, path in results:
            assert dciodvfy_errors(Path(path)) == [], f"{kind}: dciodvfy errors"
            assert pydicom.dcmread(path).PatientBirthDate == ""
        assert job_states(node) == ["done"]
    finally:
        node.stop()


SEGMENTATION_ONLY = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = 1.2.840.10008.1.2.1
TransferSyntax2 = 1.2.840.10008.1.2

[[PresentationContexts]]
[SegmentationOnly]
PresentationContext1 = 1.2.840.10008.5.1.4.1.1.66.4\\Uncompressed

[[Profiles]]
[SegmentationOnly]
PresentationContexts = SegmentationOnly
"""


def test_a_destination_that_refuses_the_sr_class_gets_the_seg_and_the_sr_is_dead_lettered(
        tmp_path, orthanc, node_port):
    profile = tmp_path / "segmentation-only.cfg"
    profile.write_text(SEGMENTATION_ONLY)
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    scp = subprocess.Popen(["storescp", "-aet", "SEGONLY", "-xf", str(profile), "SegmentationOnly", "-od",
                            str(received), str(port)], env=dcmtk_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    segmentation_only = {"name": "segonly", "ae_title": "SEGONLY", "host": "127.0.0.1", "port": port,
                         "retry_first_seconds": 1, "retry_max_seconds": 5}
    node = start_node(node_config(tmp_path, node_port, orthanc, extra_destinations=[segmentation_only]), node_port)
    try:
        info, paths = small_study(tmp_path / "study", slices=12)
        assert storescu(node.ae_title, node.port, paths).returncode == 0
        exactly_one_result_each(orthanc, info.study_uid, settle=1.0)

        def states() -> dict[tuple[str, str], str]:
            return {(kind, destination): state for kind, destination, state in node.query(
                "SELECT kind, destination, deliveries.state FROM deliveries JOIN results ON results.id = result_id")}

        wait_for(lambda: states() == {("SEG", PACS): "sent", ("SR", PACS): "sent", ("SEG", "segonly"): "sent",
                                      ("SR", "segonly"): "dead"}, 60, "the SR to segonly dead-lettered")
        assert [pydicom.dcmread(p).Modality for p in received.iterdir()] == ["SEG"], "storescp got the SEG only"
        status = node.cli("status")
        assert "SR" in status and "-> segonly: dead (SEGONLY accepts no presentation context for SOP class" in status
        assert " failed " in status.splitlines()[0]
        assert "1 dead-lettered deliveries pending again" in node.cli("retry", info.study_uid)
        wait_for(lambda: states()[("SR", "segonly")] == "dead", 30, "the retried SR dead-lettered again")
    finally:
        node.stop()
        scp.terminate()
        scp.wait()


def test_a_worker_that_lost_its_lease_records_nothing(tmp_path, orthanc, node_port):
    config = node_config(tmp_path, node_port, orthanc, workers=2, lease_seconds=3)
    node = start_node(config, node_port)
    try:
        wait_for(lambda: len(node.ready_workers()) == 2, 120, "both workers to be ready")
        info, paths = small_study(tmp_path / "study", slices=60)
        assert storescu(node.ae_title, node.port, paths).returncode == 0
        running = wait_for(lambda: node.query("SELECT worker FROM jobs WHERE state = 'running'"), 60,
                           "a worker to take the job", 0.02)
        stalled = int(running[0][0].rsplit(":", 1)[1])
        os.kill(stalled, signal.SIGSTOP)  # a stalled worker: a paused machine, a long swap storm
        try:
            wait_for(lambda: node.query("SELECT state, worker FROM jobs")[0][0] == "done", 120,
                     "the other worker to take over and finish the job", 0.5)
            [(worker,)] = node.query("SELECT worker FROM jobs")
            assert worker is not None and not worker.endswith(f":{stalled}")
        finally:
            os.kill(stalled, signal.SIGCONT)
        wait_for(lambda: "discarded" in node.log() or "is not recorded" in node.log(), 60,
                 "the stalled worker to discard what it made")
        exactly_one_result_each(orthanc, info.study_uid, settle=3.0)
        assert len(node.query("SELECT id FROM results")) == 2
    finally:
        node.stop()


def test_status_and_explain_run_while_a_writer_holds_the_lock(tmp_path, node_port):
    config = write_node_config(tmp_path / "node", node_port, destinations=[], stable_after=600, min_free_disk_mb=0,
                               pipelines=[{"name": "ct", "model": str(DEMO_BUNDLE), "select": {"Modality": "CT"}}])
    node = start_node(config, node_port)
    try:
        info, paths = small_study(tmp_path / "study", slices=4)
        assert storescu(node.ae_title, node.port, paths).returncode == 0
        writer = sqlite3.connect(node.data_dir / "dicom-node.sqlite", isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")  # an operator's script, a long write: the lock is taken
        try:
            started = time.monotonic()
            assert info.study_uid in node.cli("status")
            assert "pipeline ct" in node.cli("explain", info.study_uid)
            assert time.monotonic() - started < 20, "reads must not wait for the writer"
        finally:
            writer.rollback()
            writer.close()
    finally:
        node.stop()



def test_a_pipeline_whose_bundle_fails_its_check_is_disabled_and_the_others_run(tmp_path, node_port):
    """A bundle made for an older MONAI (its network takes an argument MONAI removed) beside the
    demo: the node starts, says which pipeline it disabled and why, runs the other; fixed and
    retried, the disabled pipeline's job runs too, without a restart."""
    from tests.compute.test_bundle_check import configure, demo_copy

    old = demo_copy(tmp_path / "old")
    configure(old, lambda config: config.update(network_def={
        "_target_": "SwinUNETR", "img_size": [96, 96, 96], "in_channels": 1, "out_channels": 3, "feature_size": 12}))
    config = write_node_config(tmp_path / "node", node_port, destinations=[], pipelines=[
        {"name": "ct-demo", "model": str(DEMO_BUNDLE), "select": {"Modality": "CT"}},
        {"name": "old-model", "model": str(old), "select": {"Modality": "CT"}},
    ], stable_after=2, min_free_disk_mb=0)
    node = start_node(config, node_port)
    try:
        wait_for(lambda: "pipeline old-model disabled" in node.log(), 120, "the check to disable old-model")
        info, paths = small_study(tmp_path / "study", slices=12)
        assert storescu("DICOMNODE", node_port, paths).returncode == 0
        wait_for(lambda: sorted(node.finished_job_states()) == ["done", "failed"], 180, "both jobs finished", 0.5)
        status = node.cli("status")
        assert "pipeline old-model DISABLED: `SwinUNETR` no longer takes `img_size` (the bundle was made with MONAI " \
               "1.3.0" in status
        assert "old-model failed (attempts 0): pipeline old-model is disabled" in status
        assert "ct-demo done" in status
        assert "  DISABLED: `SwinUNETR` no longer takes `img_size`" in node.cli("explain", info.study_uid)

        shutil.copy(DEMO_BUNDLE / "configs" / "inference.json", old / "configs" / "inference.json")  # the fix
        node.cli("retry", info.study_uid)
        wait_for(lambda: node.finished_job_states() == ["done", "done"], 180, "the retried job done", 0.5)
        assert "pipeline old-model enabled: its bundle passes the check now" in node.log()
        assert "DISABLED" not in node.cli("status")
    finally:
        node.stop()
