"""Never lose a study: kill -9 at every stage (on SQLite and on PostgreSQL), a PACS that goes
away, many senders at once.

Every test runs the node as a separate process, sends with DCMTK and receives results in a real
Orthanc, and judges only by what an operator could check: what was acknowledged, what is in
the store, and what the PACS holds in the end.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom

from dicom_node.ingest.recovery import CHECKED_MARKER
from tests.support.ct_study import DEMO_BUNDLE, StudyInfo, ct_series, make_phantom, small_study, write_series
from tests.support.peers import (
    dcmtk_env,
    free_port,
    restart_orthanc,
    start_node,
    storescu,
    wait_for,
    write_node_config,
)

PACS = "pacs"


def node_config(tmp_path, node_port, orthanc, **node_settings):
    extra_destinations = node_settings.pop("extra_destinations", [])
    return write_node_config(
        tmp_path / "node",
        node_port,
        destinations=[
            {"name": PACS, "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port,
             "retry_first_seconds": 1, "retry_max_seconds": 10},
            *extra_destinations,
        ],
        pipelines=[
            {"name": "ct-demo", "model": str(DEMO_BUNDLE), "select": {"Modality": "CT"},
             "destinations": [PACS] + [d["name"] for d in extra_destinations]}
        ],
        **{"stable_after": 3, "min_free_disk_mb": 0, **node_settings},
    )


def acknowledged(storescu_output: str) -> list[Path]:
    """Files storescu saw answered with Success, from its verbose log."""
    succeeded, current = [], None
    for line in storescu_output.splitlines():
        if match := re.search(r"Sending file: (.+)$", line):
            current = Path(match.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            succeeded.append(current)
            current = None
    return succeeded


def assert_stored(node, paths: list[Path]) -> None:
    rows = dict(node.query("SELECT sop_instance_uid, path FROM instances"))
    for path in paths:
        sent = pydicom.dcmread(path)
        assert sent.SOPInstanceUID in rows, f"{path.name} was acknowledged but is not in the index"
        stored = pydicom.dcmread(rows[sent.SOPInstanceUID])
        assert stored.PixelData == sent.PixelData


def exactly_one_result_each(orthanc, study_uid: str, settle: float = 6.0) -> None:
    """SEG and SR arrive, once; a little later there is still exactly one of each."""
    wait_for(lambda: {"SEG", "SR"} <= orthanc.modality_counts(study_uid).keys(), 240, "SEG and SR in Orthanc", 1.0)
    time.sleep(settle)
    counts = orthanc.modality_counts(study_uid)
    assert counts.get("SEG") == 1 and counts.get("SR") == 1, counts


def job_states(node) -> list[str]:
    return [state for (state,) in node.query("SELECT state FROM jobs ORDER BY id")]


def test_kill_while_receiving_loses_no_acknowledged_instance(tmp_path, orthanc, node_port, database_url):
    info, paths = small_study(tmp_path / "study", slices=150)
    config = node_config(tmp_path, node_port, orthanc, database_url=database_url)
    node = start_node(config, node_port)
    try:
        sender = subprocess.Popen(
            ["storescu", "-v", "-aec", "DICOMNODE", "127.0.0.1", str(node_port), *map(str, paths)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env(),
        )
        wait_for(lambda: len(node.query("SELECT 1 FROM instances")) >= 20, 60, "20 instances stored", 0.02)
        node.kill()
        output, _ = sender.communicate(timeout=60)
        succeeded = acknowledged(output)
        assert 20 <= len(succeeded) < len(paths), "the kill must land in the middle of the transfer"
        assert_stored(node, succeeded)

        node = start_node(config, node_port)
        assert storescu("DICOMNODE", node_port, paths).returncode == 0  # the PACS sends the study again
        exactly_one_result_each(orthanc, info.study_uid)
        assert len(node.query("SELECT 1 FROM instances")) == len(paths)
    finally:
        node.stop()


def test_renames_and_index_rows_a_power_cut_took_are_redone_at_the_next_boot(tmp_path, orthanc, node_port):
    """The receiver flushes an instance's content before the Success, but not its rename into
    place nor its index rows, so a power cut may take the last ones. Simulated here: the node
    dies, the rows of the study it had just received are gone, one file is back under its
    temporary name, and the machine boots anew."""
    info, paths = small_study(tmp_path / "study", slices=30)
    config = node_config(tmp_path, node_port, orthanc, stable_after=5)
    node = start_node(config, node_port)
    try:
        assert storescu("DICOMNODE", node_port, paths).returncode == 0
        node.kill()
        assert job_states(node) == [], "the study must not have been complete yet"
        database = node.data_dir / "dicom-node.sqlite"
        [(unrenamed,)] = node.query("SELECT path FROM instances LIMIT 1")
        Path(unrenamed).rename(node.data_dir / "incoming" / "1-1.slot")
        with sqlite3.connect(database) as connection:
            for table in ("instances", "series", "studies"):
                connection.execute(f"DELETE FROM {table}")
        (node.data_dir / CHECKED_MARKER).write_text("a boot before the power cut")

        node = start_node(config, node_port)
        assert len(node.query("SELECT 1 FROM instances")) == len(paths)
        assert "1 received instances were still in" in node.log()
        assert f"{len(paths) - 1} were missing and are indexed again" in node.log()
        assert_stored(node, paths)
        exactly_one_result_each(orthanc, info.study_uid)
    finally:
        node.stop()


def node_with_a_running_job(tmp_path, orthanc, node_port, database_url=None):
    """A node that has just started the job of a small study it received."""
    info, paths = small_study(tmp_path / "study")
    config = node_config(tmp_path, node_port, orthanc, database_url=database_url)
    node = start_node(config, node_port)
    try:
        assert storescu("DICOMNODE", node_port, paths).returncode == 0
        wait_for(lambda: "running" in job_states(node), 60, "the job to run", 0.02)
    except BaseException:
        node.stop()
        raise
    return info, config, node


def test_kill_while_a_job_runs_resumes_it(tmp_path, orthanc, node_port, database_url):
    info, config, node = node_with_a_running_job(tmp_path, orthanc, node_port, database_url)
    try:
        # As in a power cut: the worker dies with the node, nothing gets to release the job.
        [(worker,)] = node.query("SELECT worker FROM jobs")
        os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
        node.kill()
        assert job_states(node) == ["running"]
        node = start_node(config, node_port)
        exactly_one_result_each(orthanc, info.study_uid)
        [(state, attempts)] = node.query("SELECT state, attempts FROM jobs")
        assert state == "done" and attempts == 2  # the killed attempt counts
    finally:
        node.stop()


def test_kill_while_dispatching_delivers_once_after_restart(tmp_path, orthanc, node_port, database_url):
    slow_port = free_port()
    received = tmp_path / "slow-pacs"
    received.mkdir()
    # A second destination that sleeps 1 s per PDU, so the kill lands during a C-STORE.
    slow = subprocess.Popen(
        ["storescp", "--sleep-during", "1", "-od", str(received), str(slow_port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    info, paths = small_study(tmp_path / "study")
    config = node_config(
        tmp_path, node_port, orthanc,
        extra_destinations=[{"name": "slow", "ae_title": "SLOW", "host": "127.0.0.1", "port": slow_port}],
        database_url=database_url,
    )
    node = start_node(config, node_port)
    try:
        assert storescu("DICOMNODE", node_port, paths).returncode == 0
        wait_for(lambda: job_states(node) == ["done"], 120, "the job to finish", 0.05)
        time.sleep(1.0)
        node.kill()
        pending = node.query("SELECT count(*) FROM deliveries WHERE state = 'pending'")[0][0]
        assert pending >= 1, "the kill must land before every delivery is recorded"
        node = start_node(config, node_port)
        wait_for(
            lambda: node.query("SELECT count(*) FROM deliveries WHERE state = 'sent'")[0][0] == 4,
            120, "all four deliveries", 0.5,
        )
        exactly_one_result_each(orthanc, info.study_uid, settle=2.0)
        modalities = sorted(pydicom.dcmread(p, stop_before_pixels=True).Modality for p in received.iterdir())
        assert set(modalities) == {"SEG", "SR"}
    finally:
        node.stop()
        slow.terminate()
        slow.wait()


def test_results_reach_a_pacs_that_was_down_for_two_minutes(tmp_path, orthanc, node_port):
    info, paths = small_study(tmp_path / "study")
    orthanc.stop()
    stopped_at = time.monotonic()
    node = start_node(node_config(tmp_path, node_port, orthanc), node_port)
    restarted = None
    try:
        assert storescu("DICOMNODE", node_port, paths).returncode == 0
        wait_for(
            lambda: node.query("SELECT count(*) FROM deliveries WHERE attempts >= 2 AND state = 'pending'")[0][0],
            120, "failed delivery attempts", 0.5,
        )
        assert "sending" in node.cli("status")
        time.sleep(max(0.0, 120 - (time.monotonic() - stopped_at)))
        restarted = restart_orthanc(orthanc)
        exactly_one_result_each(restarted, info.study_uid, settle=1.0)
        assert "done" in node.cli("status").splitlines()[0]
    finally:
        node.stop()
        if restarted is not None:
            restarted.stop()


def test_ten_concurrent_senders_lose_nothing(tmp_path, node_port):
    config = write_node_config(tmp_path / "node", node_port, destinations=[], pipelines=[], stable_after=30,
                               min_free_disk_mb=0)
    node = start_node(config, node_port)
    try:
        batches = []
        for index in range(10):
            phantom = make_phantom((64, 64, 50), (5.0, 5.0, 3.0), seed=index)
            batches.append(write_series(ct_series(phantom, StudyInfo(), 1, f"batch {index}"), tmp_path / str(index)))
        senders = [
            subprocess.Popen(
                ["storescu", "-v", "-aec", "DICOMNODE", "127.0.0.1", str(node_port), *map(str, paths)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env(),
            )
            for paths in batches
        ]
        outputs = [sender.communicate(timeout=300)[0] for sender in senders]
        assert all(sender.returncode == 0 for sender in senders)
        assert sum(len(acknowledged(output)) for output in outputs) == 500
        assert len(node.query("SELECT 1 FROM instances")) == 500
        assert_stored(node, [path for paths in batches for path in paths])
    finally:
        node.stop()


def test_a_series_the_model_cannot_take_fails_with_a_reason_and_can_be_retried(tmp_path, orthanc, node_port):
    info = StudyInfo()
    images = ct_series(make_phantom((96, 96, 20), (3.0, 3.0, 4.0), seed=5), info, 2, "mixed")
    images[7].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal image in an axial stack
    paths = write_series(images, tmp_path / "study")
    node = start_node(node_config(tmp_path, node_port, orthanc), node_port)
    try:
        assert storescu("DICOMNODE", node_port, paths).returncode == 0
        wait_for(lambda: job_states(node) == ["failed"], 120, "the job to fail", 0.5)
        status = node.cli("status")
        assert "failed" in status.splitlines()[0]
        assert "images in 2 different orientations" in status
        assert "1 failed job(s) re-queued" in node.cli("retry", info.study_uid)
        wait_for(lambda: node.query("SELECT count(*) FROM events WHERE message LIKE '%re-queued%'")[0][0], 10,
                 "the retry event")
        wait_for(lambda: job_states(node) == ["failed"], 120, "the retried job to fail again", 0.5)
        assert node.echo(), "the node keeps serving"
    finally:
        node.stop()


def test_sigterm_releases_the_running_job_for_the_next_start(tmp_path, orthanc, node_port):
    info, config, node = node_with_a_running_job(tmp_path, orthanc, node_port)
    try:
        node.process.send_signal(signal.SIGTERM)
        assert node.process.wait(timeout=60) == 0
        assert node.query("SELECT state, attempts FROM jobs") == [("queued", 0)]
        node = start_node(config, node_port)
        exactly_one_result_each(orthanc, info.study_uid, settle=1.0)
    finally:
        node.stop()
