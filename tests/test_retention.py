"""Retention through `dicom-node serve`: finished studies go, undelivered ones stay, a late
instance after a purge is a new study, and purging below the high-water mark keeps the node
receiving where it would otherwise answer Out of Resources (0xA700).

Studies are sent with DCMTK storescu; the node is judged by what an operator sees: its files,
its database, `status` and `purge --dry-run`.
"""

from __future__ import annotations

import os

from dicom_node.state import files
from tests.support.ct_study import DEMO_BUNDLE, StudyInfo, ct_series, make_phantom, small_study, write_series
from tests.support.peers import free_port, start_node, storescu, wait_for, write_node_config

ALL_AT_ONCE = {"instances_days": 0, "results_days": 0, "records_days": 0, "check_every_seconds": 0.5}


def successes(result) -> int:
    return result.stderr.count("Received Store Response (Success)")


def study_row(node, study_uid: str) -> tuple | None:
    rows = node.query("SELECT state, instances_purged_at, patient_id FROM studies WHERE study_uid = ?", study_uid)
    return rows[0] if rows else None


def test_a_finished_study_is_purged_an_undelivered_one_kept_and_a_late_instance_starts_anew(tmp_path, node_port):
    closed_port = free_port()  # nothing listens: the CT study's results stay undelivered
    config = write_node_config(
        tmp_path / "node", node_port,
        destinations=[{"name": "pacs", "ae_title": "NOBODY", "host": "127.0.0.1", "port": closed_port,
                       "retry_first_seconds": 1, "retry_max_seconds": 2}],
        pipelines=[{"name": "ct-demo", "model": str(DEMO_BUNDLE), "destinations": ["pacs"],
                    "select": {"SeriesDescription": {"regex": "Abdomen.*"}}}],
        retention={"instances_days": 0, "results_days": 0, "records_days": "forever", "check_every_seconds": 0.5},
        stable_after=1, min_free_disk_mb=0,
    )
    undelivered, undelivered_paths = small_study(tmp_path / "ct")
    finished = StudyInfo(patient_id="PH-FINISHED")
    scout = write_series(ct_series(make_phantom((64, 64, 6), (4.0, 4.0, 5.0), seed=3), finished, 1, "Scout"),
                         tmp_path / "scout")
    node = start_node(config, node_port)
    try:
        assert successes(storescu("DICOMNODE", node_port, undelivered_paths)) == len(undelivered_paths)
        assert successes(storescu("DICOMNODE", node_port, scout)) == len(scout)
        wait_for(lambda: (study_row(node, finished.study_uid) or (None, None))[1] is not None, 60,
                 "the finished study's instances purged", 0.5)
        assert not (node.data_dir / "studies" / finished.study_uid).exists()
        assert node.query("SELECT count(*) FROM instances WHERE study_uid = ?", finished.study_uid) == [(0,)]
        wait_for(lambda: node.query("SELECT count(*) FROM jobs WHERE state = 'done'") == [(1,)], 120, "the CT job")
        wait_for(lambda: node.query("SELECT count(*) FROM deliveries WHERE attempts >= 2") == [(2,)], 60,
                 "delivery attempts to the closed port")
        assert study_row(node, undelivered.study_uid)[1] is None, "results not delivered: the study stays"
        assert len(list((node.data_dir / "studies" / undelivered.study_uid).rglob("*.dcm"))) == len(undelivered_paths)
        assert "instances purged" in node.cli("status")
        assert node.cli("purge", "--dry-run").strip() == "nothing to purge"
        [purged] = node.query("SELECT message FROM events WHERE study_uid = ? AND message LIKE '%purged%'",
                              finished.study_uid)
        assert purged[0].startswith(f"{len(scout)} received instances purged") and "kept 0 days after" in purged[0]

        # The PACS sends one image of the purged study again: a new study under the same record.
        assert successes(storescu("DICOMNODE", node_port, scout[:1])) == 1
        wait_for(lambda: node.query("SELECT count(*) FROM events WHERE study_uid = ? AND message LIKE "
                                    "'%received as a new study%'", finished.study_uid) == [(1,)], 30, "a new study")
        wait_for(lambda: node.query("SELECT count(*) FROM events WHERE study_uid = ? AND message LIKE "
                                    "'%received instances purged%'", finished.study_uid) == [(2,)], 30,
                 "the new study finished and purged in its turn", 0.5)
    finally:
        node.stop()


def test_a_study_whose_records_were_purged_is_received_again_as_a_new_one(tmp_path, node_port, database_url):
    config = write_node_config(tmp_path / "node", node_port, destinations=[], pipelines=[], stable_after=1,
                               min_free_disk_mb=0, retention=ALL_AT_ONCE, database_url=database_url)
    info, paths = small_study(tmp_path / "study", slices=8)
    node = start_node(config, node_port)
    try:
        assert successes(storescu("DICOMNODE", node_port, paths)) == len(paths)
        wait_for(lambda: node.query("SELECT count(*) FROM events WHERE study_uid IS NULL AND message LIKE "
                                    "'records of study %'") == [(1,)], 60, "the study's records purged", 0.5)
        assert study_row(node, info.study_uid) is None
        assert not (node.data_dir / "studies" / info.study_uid).exists()
        # The receiver that stored it remembered its rows and folders; both are gone now.
        assert successes(storescu("DICOMNODE", node_port, paths[:2])) == 2
        state, _, patient_id = study_row(node, info.study_uid)
        assert state in ("receiving", "complete") and patient_id == info.patient_id
        assert "could not store" not in node.log()
    finally:
        node.stop()


def test_purging_below_the_high_water_mark_keeps_the_node_receiving(tmp_path, node_port):
    """Without purging, these studies (about 8 x 10.5 MB) would take the disk past
    min_free_disk_mb: the last ones would be refused with 0xA700."""
    phantom = make_phantom((256, 256, 80), (1.5, 1.5, 3.0), seed=4)
    studies = [write_series(ct_series(phantom, StudyInfo(), 2, "Body"), tmp_path / f"study{n}") for n in range(8)]
    study_mb = sum(os.path.getsize(path) for path in studies[0]) / 1e6
    free = files.free_mb(tmp_path)
    min_free, high_water = free - 4 * study_mb, free - 2 * study_mb
    config = write_node_config(
        tmp_path / "node", node_port, destinations=[], pipelines=[], stable_after=1, min_free_disk_mb=int(min_free),
        retention={"instances_days": "forever", "results_days": "forever", "records_days": "forever",
                   "purge_below_free_mb": int(high_water), "check_every_seconds": 3600},
    )
    node = start_node(config, node_port)
    try:
        for number, paths in enumerate(studies):
            assert successes(storescu("DICOMNODE", node_port, paths)) == len(paths), f"study {number} refused"
            wait_for(lambda complete=[(number + 1,)]: node.query(
                "SELECT count(*) FROM studies WHERE state = 'complete'") == complete, 30, f"study {number} complete", 0.25)
        assert len(studies) * study_mb > free - min_free, "the studies would not have filled the disk"
        wait_for(lambda: files.free_mb(tmp_path) >= high_water, 30, "free space back above the mark")
        purged = node.query("SELECT count(*) FROM studies WHERE instances_purged_at IS NOT NULL")[0][0]
        assert 2 <= purged < len(studies), purged
        reasons = node.query("SELECT message FROM events WHERE message LIKE '%received instances purged%'")
        assert all("below purge_below_free_mb" in message for (message,) in reasons)
        assert "below min_free_disk_mb" not in node.log()
    finally:
        node.stop()
