"""The supervisor of `dicom-node serve`, driven in-process step by step."""

from __future__ import annotations

import socket
import threading
import time

from dicom_node.service import TICK_SECONDS, Supervisor, _again_if_busy, _periodic
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


def test_an_idle_loop_waits_for_its_tick_and_a_busy_one_looks_again_at_once():
    """A step that did nothing (0 deliveries, 0 posts) must not be read as "due again in 0 s":
    an idle dispatch loop once spun on a whole core that way."""
    calls = []

    def step(results: list[int]):
        def run() -> int:
            calls.append(None)
            return results.pop(0) if results else 0
        return run

    stop = threading.Event()
    loop = threading.Thread(target=_periodic, args=("idle", _again_if_busy(step([3, 2])), stop))
    loop.start()
    time.sleep(0.5)
    stop.set()
    loop.join()
    assert 3 <= len(calls) <= 10, f"{len(calls)} looks in 0.5 s with a {TICK_SECONDS} s tick"
