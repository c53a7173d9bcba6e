"""Doorbells between the node's processes: a ring ends a wait at once, many rings never block,
a bell nobody hears costs nothing; completion says when to look again, and a worker rings the
dispatchers once a job's results are recorded."""

from __future__ import annotations

import multiprocessing
import time

from sqlalchemy import update

from dicom_node.compute.worker import Worker
from dicom_node.doorbell import Ringer, doorbell
from dicom_node.state import db
from dicom_node.state.completion import ReadAhead, complete_quiet_studies
from tests.support.ct_study import StudyInfo, ct_series, make_phantom
from tests.support.received import stored_by_receiver

SPAWN = multiprocessing.get_context("spawn")


def ring_after(ringer: Ringer, seconds: float) -> None:
    time.sleep(seconds)
    ringer.ring()


def test_a_ring_from_another_process_ends_the_wait():
    bell, ringer = doorbell(SPAWN)
    ringing = SPAWN.Process(target=ring_after, args=(ringer, 0.5))
    ringing.start()
    try:
        started = time.monotonic()
        assert bell.wait(60)
        assert time.monotonic() - started < 30  # woken by the ring, long before the timeout
    finally:
        ringing.join()


def test_rings_never_block_and_one_wait_takes_them_all():
    bell, ringer = doorbell(SPAWN)
    for _ in range(100_000):  # far more than a pipe holds
        ringer.ring()
    assert bell.wait(0)
    assert not bell.wait(0)


def test_ringing_a_bell_nobody_hears_does_nothing():
    bell, ringer = doorbell(SPAWN)
    bell.listener.close()
    ringer.ring()


def received_and_due(tmp_path, stable_after: float):
    images = ct_series(make_phantom((24, 20, 7), (1.5, 1.5, 3.0), seed=5), StudyInfo(), 2, "bells")
    return stored_by_receiver(tmp_path, images, stable_after)


def test_completion_says_when_the_next_study_comes_due(tmp_path):
    config, engine = received_and_due(tmp_path, stable_after=10.0)
    quiet_since = db.now() - 7.0  # read ahead (quiet for over half the period), due in 3 s
    with engine.begin() as connection:
        connection.execute(update(db.studies).values(last_received_at=quiet_since))
    round_ = complete_quiet_studies(config, engine, ReadAhead())
    assert round_.completed == 0 and round_.next_due == quiet_since + 10.0


def test_a_worker_rings_the_dispatchers_once_results_are_recorded(tmp_path):
    config, engine = received_and_due(tmp_path, stable_after=10.0)
    with engine.begin() as connection:
        connection.execute(update(db.studies).values(last_received_at=db.now() - 11.0))
    assert complete_quiet_studies(config, engine, ReadAhead()).completed == 1
    jobs_queued, _ = doorbell(SPAWN)
    recorded = [doorbell(SPAWN) for _ in range(2)]
    worker = Worker(config, engine, jobs_queued, [ringer for _, ringer in recorded])
    assert worker.run_once()
    with db.reading(engine) as connection:
        assert [state for (state,) in connection.exec_driver_sql("SELECT state FROM jobs")] == ["done"]
    assert all(bell.wait(0) for bell, _ in recorded)
    assert not worker.run_once()
    assert not any(bell.wait(0) for bell, _ in recorded)
