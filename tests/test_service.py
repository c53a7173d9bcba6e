"""The supervisor of `dicom-node serve`, driven in-process step by step."""

from __future__ import annotations

import socket
import time

from dicom_node.service import Supervisor
from dicom_node.state import db
from tests.support.ct_study import StudyInfo, ct_series, make_phantom
from tests.support.received import stored_by_receiver


def test_a_completion_round_queues_the_jobs_and_rings_every_worker(tmp_path):
    images = ct_series(make_phantom((32, 32, 6), (4.0, 4.0, 4.0), seed=2), StudyInfo(), 2, "supervised")
    config, engine = stored_by_receiver(tmp_path, images, stable_after=0.2)
    config = config.model_copy(update={"node": config.node.model_copy(update={"workers": 2})})
    with socket.socket() as listening:
        supervisor = Supervisor(tmp_path / "node" / "node.toml", config, engine, listening)
        assert supervisor.shares == [64]
        time.sleep(0.3)  # the study is quiet
        assert supervisor.complete() is None  # nothing else read ahead: no time to look again at
        with db.reading(engine) as connection:
            assert connection.execute(db.jobs.select()).all(), "a job was queued"
        for bell, _ in supervisor.worker_bells:
            assert bell.wait(0), "each worker's bell rang"
        assert supervisor.complete() is None
        for bell, _ in supervisor.worker_bells:
            assert not bell.wait(0), "no ring without a job"
