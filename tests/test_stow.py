"""Results by STOW-RS to a real DICOMweb server (Orthanc's DICOMweb plugin), with the delivery
records, retries and dead letters of DIMSE destinations: a delivery tried while the server is
down is retried until it comes back."""

from __future__ import annotations

import time

from tests.support.ct_study import DEMO_BUNDLE, small_study
from tests.support.peers import (
    restart_orthanc,
    start_node,
    start_orthanc,
    storescu,
    wait_for,
    write_node_config,
)
from tests.test_faults import exactly_one_result_each


def test_results_reach_an_orthanc_by_stow_rs_once_it_is_back(tmp_path, node_port):
    orthanc = start_orthanc(tmp_path / "orthanc", {}, dicomweb=True)
    base = f"{orthanc.url}/dicom-web"
    orthanc.stop()  # down when the results are ready
    config = write_node_config(
        tmp_path / "node", node_port, stable_after=2, min_free_disk_mb=0,
        destinations=[{"name": "web", "type": "dicomweb", "url": base, "retry_first_seconds": 1,
                       "retry_max_seconds": 2},
                      {"name": "wrong-path", "type": "dicomweb", "url": f"{orthanc.url}/nowhere",
                       "retry_first_seconds": 1, "retry_max_seconds": 2}],
        pipelines=[{"name": "ct-demo", "model": str(DEMO_BUNDLE), "destinations": ["web", "wrong-path"],
                    "select": {"Modality": "CT"}}],
    )
    info, paths = small_study(tmp_path / "study", slices=12)
    node = start_node(config, node_port)
    restarted = None
    try:
        assert storescu("DICOMNODE", node_port, paths).returncode == 0
        wait_for(lambda: node.query("SELECT count(*) FROM deliveries WHERE destination = 'web' AND attempts >= 2 "
                                    "AND state = 'pending'") == [(2,)], 120, "attempts while the server is down", 0.5)
        [(error,)] = node.query("SELECT DISTINCT last_error FROM deliveries WHERE destination = 'web'")
        assert error.startswith(f"STOW-RS to {base} failed"), error
        restarted = restart_orthanc(orthanc)
        exactly_one_result_each(restarted, info.study_uid, settle=1.0)
        wait_for(lambda: node.query("SELECT count(*) FROM deliveries WHERE destination = 'web' AND state = 'sent'")
                 == [(2,)], 30, "both deliveries recorded as sent")
        time.sleep(2)
        wrong = node.query("SELECT state, last_error FROM deliveries WHERE destination = 'wrong-path'")
        assert all(state == "pending" and "HTTP 404" in last_error for state, last_error in wrong), wrong
    finally:
        node.stop()
        if restarted is not None:
            restarted.stop()
