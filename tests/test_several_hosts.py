"""Several hosts as a hospital would run them, on one machine: two nodes (`dicom-node serve`,
receiving and sending, no workers of their own) and two `dicom-node worker` processes, each in a
process group of its own, on one PostgreSQL and one storage root.

Studies are sent to both nodes; one worker is killed with SIGKILL in the middle of a job. Every
study must end with exactly one SEG and one SR in the PACS: completion, inference and dispatch
each happen once across the nodes, and the killed job goes to the other worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.ct_study import DEMO_BUNDLE, small_study
from tests.support.peers import ROOT, free_port, start_node, storescu, wait_for, write_node_config
from tests.test_faults import exactly_one_result_each


def node_config(folder: Path, port: int, orthanc, database_url: str, data_dir: Path) -> Path:
    path = write_node_config(
        folder, port, database_url=database_url, workers=0, stable_after=2, min_free_disk_mb=0, lease_seconds=6,
        destinations=[{"name": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port,
                       "retry_first_seconds": 1, "retry_max_seconds": 5}],
        pipelines=[{"name": "ct-demo", "model": str(DEMO_BUNDLE), "destinations": ["pacs"],
                    "select": {"Modality": "CT"}}],
    )
    text = path.read_text().replace(f'data_dir = "{folder / "data"}"', f'data_dir = "{data_dir}"')
    path.write_text(text)
    return path


def start_worker(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "worker", "--config", str(config)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def test_two_nodes_and_two_workers_on_one_database_make_one_result_each_though_a_worker_dies(tmp_path, orthanc,
                                                                                             postgres):
    database_url, shared = postgres.database(), tmp_path / "shared-storage"
    ports = [free_port(), free_port()]
    configs = [node_config(tmp_path / f"node{n}", port, orthanc, database_url, shared) for n, port in enumerate(ports)]
    nodes = [start_node(config, port) for config, port in zip(configs, ports)]
    worker_logs = [tmp_path / f"worker{n}.log" for n in range(2)]
    workers = [start_worker(config, log) for config, log in zip(configs, worker_logs)]
    try:
        wait_for(lambda: all("ready" in log.read_text() for log in worker_logs if log.exists())
                 and all(log.exists() for log in worker_logs), 120, "both workers ready")
        studies = [small_study(tmp_path / f"study{n}", slices=24, seed=20 + n) for n in range(4)]
        for number, (_, paths) in enumerate(studies):
            sent = storescu("DICOMNODE", ports[number % 2], paths)
            assert sent.stderr.count("Received Store Response (Success)") == len(paths)

        running = wait_for(lambda: nodes[0].query("SELECT id, worker FROM jobs WHERE state = 'running' LIMIT 1"),
                           120, "a job to run", 0.05)
        [(killed_job, worker_name)] = running
        victim = next(worker for worker in workers if worker_name.endswith(f":{worker.pid}"))
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()

        for info, _ in studies:
            exactly_one_result_each(orthanc, info.study_uid, settle=1.0)
        assert nodes[0].query("SELECT state FROM jobs ORDER BY id") == [("done",)] * 4
        [(attempts, finished_by)] = nodes[0].query("SELECT attempts, worker FROM jobs WHERE id = ?", killed_job)
        assert attempts == 2 and finished_by != worker_name, "the killed worker's job went to the other"
        assert nodes[0].query("SELECT count(*) FROM deliveries WHERE state = 'sent'") == [(8,)]
        delivered = [line for node in nodes for line in node.log().splitlines() if "delivery to pacs failed" in line]
        assert delivered == []
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(timeout=30)
        for node in nodes:
            node.stop()
