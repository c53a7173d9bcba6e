"""Protection of the node and of what it holds: disk watermark, access control, repeats, late arrivals."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.support.ct_study import DEMO_BUNDLE, StudyInfo, ct_series, make_phantom, small_study, write_series
from tests.support.peers import dcmtk_env, start_node, storescu, wait_for, write_node_config


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MB file system of its own, so the test can fill it without touching the machine's."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_low_disk_answers_out_of_resources_and_recovers(tmp_path, small_disk, node_port):
    config = write_node_config(tmp_path / "node", node_port, destinations=[], pipelines=[], stable_after=60,
                               min_free_disk_mb=16)
    config.write_text(config.read_text().replace(str(tmp_path / "node" / "data"), str(small_disk / "data")))
    node = start_node(config, node_port)
    try:
        ballast = small_disk / "ballast"
        ballast.write_bytes(bytes(36 * 1024 * 1024))  # leaves about 12 MB free, below the 16 MB minimum
        _, paths = small_study(tmp_path / "study", slices=3)
        refused = storescu(node.ae_title, node.port, paths[:1])
        assert "Received Store Response (Refused: OutOfResources)" in refused.stderr, refused.stderr
        assert node.query("SELECT count(*) FROM instances") == [(0,)]
        leftovers = [p for p in small_disk.rglob("*") if p.is_file() and p.suffix in (".dcm", ".tmp")]
        assert leftovers == [], "nothing partial is left behind"
        assert "below min_free_disk_mb" in node.log()

        ballast.unlink()
        accepted = storescu(node.ae_title, node.port, paths)
        assert accepted.returncode == 0 and "OutOfResources" not in accepted.stderr
        assert node.query("SELECT count(*) FROM instances") == [(3,)]
    finally:
        node.stop()


def test_only_allowed_peers_and_ae_titles_get_in(tmp_path, node_port):
    config = write_node_config(tmp_path / "a", node_port, destinations=[], pipelines=[],
                               allowed_calling_ae_titles=["MODALITY1"])
    node = start_node(config, node_port, calling_ae_title="MODALITY1")
    try:
        def echo(calling: str) -> int:
            return subprocess.run(["echoscu", "-aet", calling, "-aec", node.ae_title, "127.0.0.1", str(node.port)],
                                  capture_output=True, env=dcmtk_env()).returncode

        assert echo("MODALITY1") == 0
        assert echo("INTRUDER") != 0
        assert "calling AE title 'INTRUDER' is not in allowed_calling_ae_titles" in node.log()
        assert "from 127.0.0.1" in node.log()
    finally:
        node.stop()

    config = write_node_config(tmp_path / "b", node_port, destinations=[], pipelines=[],
                               allowed_peers=["10.99.0.0/16"])
    node = start_node(config, node_port, echo=False)
    try:
        assert not node.echo()
        wait_for(lambda: "refused a connection from 127.0.0.1" in node.log(), 10, "the refusal in the log")
    finally:
        node.stop()


@pytest.mark.parametrize("late_arrivals", ["reprocess", "ignore"])
def test_repeats_change_nothing_and_late_arrivals_follow_the_setting(tmp_path, node_port, late_arrivals):
    info = StudyInfo()
    phantom = make_phantom((96, 96, 21), (3.5, 3.5, 4.0), seed=8)
    images = ct_series(phantom, info, 2, "late")
    first, last = write_series(images[:20], tmp_path / "first"), write_series(images[20:], tmp_path / "last")
    config = write_node_config(
        tmp_path / "node", node_port, destinations=[],
        pipelines=[{"name": "ct-demo", "model": str(DEMO_BUNDLE), "select": {"Modality": "CT"}}],
        stable_after=2, min_free_disk_mb=0, late_arrivals=late_arrivals,
    )
    node = start_node(config, node_port)

    def jobs():
        return node.query("SELECT state FROM jobs ORDER BY id")

    try:
        assert storescu(node.ae_title, node.port, first).returncode == 0
        wait_for(lambda: jobs() == [("done",)], 120, "the first job")
        assert storescu(node.ae_title, node.port, first).returncode == 0  # the PACS sends it all again
        assert node.query("SELECT state FROM studies") == [("complete",)], "a repeat must not re-open the study"

        assert storescu(node.ae_title, node.port, last).returncode == 0  # one image arrives late
        assert node.query("SELECT count(*) FROM instances") == [(21,)]
        if late_arrivals == "reprocess":
            wait_for(lambda: jobs() == [("done",), ("done",)], 120, "the second job")
            reopened = node.query("SELECT count(*) FROM events WHERE message LIKE 're-opened by a late instance%'")
            assert reopened == [(1,)]
        else:
            time.sleep(4)  # twice stable_after: long enough for a wrongly re-opened study to be queued
            assert jobs() == [("done",)]
            assert node.query("SELECT state FROM studies") == [("complete",)]
    finally:
        node.stop()
