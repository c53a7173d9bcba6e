"""The job queue on the database: priority order, backoff, attempts, release, operator retry."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select, update

from dicom_node.config import Config, Pipeline, PriorityRule
from dicom_node.state import db, jobs
from dicom_node.state.completion import job_priority
from dicom_node.state.rules import StackFacts
from tests.support.ct_study import StudyInfo, ct_series, make_phantom


@pytest.fixture
def engine(tmp_path, database_url):
    engine = db.connect(database_url)
    with engine.begin() as connection:
        for study in ("1.1", "1.2"):
            connection.execute(
                db.studies.insert().values(study_uid=study, state="complete", first_received_at=0, last_received_at=0)
            )
    return engine


def enqueue(engine, study: str, priority: int) -> None:
    with engine.begin() as connection:
        jobs.enqueue(connection, study, study + ".9", "", "p", priority)


def state_of(engine, job_id: int):
    with engine.connect() as connection:
        return connection.execute(select(db.jobs).where(db.jobs.c.id == job_id)).mappings().one()


def test_a_higher_priority_job_overtakes_older_ones(engine):
    enqueue(engine, "1.1", 0)
    enqueue(engine, "1.2", 10)
    assert jobs.claim(engine, "w:1", {"p"}, 3)["study_uid"] == "1.2"
    assert jobs.claim(engine, "w:1", {"p"}, 3)["study_uid"] == "1.1"
    assert jobs.claim(engine, "w:1", {"p"}, 3) is None


def test_transient_failures_back_off_then_fail_with_the_reason(engine):
    enqueue(engine, "1.1", 0)
    for attempt in (1, 2, 3):
        job = jobs.claim(engine, "w:1", {"p"}, 3)
        assert job is not None and job["attempts"] == attempt
        with engine.begin() as connection:
            jobs.retry_or_fail(connection, job["id"], "1.1", job["attempts"], 3, "disk hiccup")
        row = state_of(engine, job["id"])
        if attempt < 3:
            assert row["state"] == "queued" and row["not_before"] > db.now()
            assert jobs.claim(engine, "w:1", {"p"}, 3) is None, "backoff holds the job back"
            with engine.begin() as connection:
                connection.execute(update(db.jobs).values(not_before=0))
    assert row["state"] == "failed" and row["reason"] == "disk hiccup (after 3 attempts)"
    assert jobs.requeue_failed(engine, ["1.1"]).jobs == 1
    assert state_of(engine, job["id"])["state"] == "queued"


def test_a_lapsed_lease_makes_the_job_claimable_and_release_costs_no_attempt(engine):
    enqueue(engine, "1.1", 0)
    job = jobs.claim(engine, "w:1", {"p"}, 3)
    with engine.begin() as connection:
        connection.execute(update(db.jobs).values(lease_until=0, not_before=0))
    assert jobs.claim(engine, "w:2", {"p"}, 3) is None  # requeued with a backoff first
    with engine.begin() as connection:
        connection.execute(update(db.jobs).values(not_before=0))
    again = jobs.claim(engine, "w:2", {"p"}, 3)
    assert again["id"] == job["id"] and again["attempts"] == 2
    jobs.release(engine, again["id"], "w:2")
    assert state_of(engine, job["id"])["attempts"] == 1


def test_a_stat_flag_raises_the_priority(tmp_path):
    [header] = ct_series(make_phantom((8, 8, 1), (1.0, 1.0, 1.0), seed=1), StudyInfo(), 1, "x")
    header.RequestedProcedurePriority = "STAT"
    config = Config(
        pipelines=[Pipeline(name="p", model=Path("m"), priority=1)],
        priorities=[PriorityRule(priority=50, match={"RequestedProcedurePriority": "STAT"})],
    )
    facts = StackFacts("1.2.3", "", header, [])
    assert job_priority(config, "p", facts) == 51
    header.RequestedProcedurePriority = "ROUTINE"
    assert job_priority(config, "p", facts) == 1


def test_a_time_limit_wrapped_by_a_monai_transform_is_still_a_time_limit():
    from dicom_node.compute.frames import GeometryError
    from dicom_node.compute.worker import JobTimeout, classify_failure

    try:
        try:
            raise JobTimeout()
        except JobTimeout as inner:
            raise RuntimeError("applying transform <Spacingd>") from inner
    except RuntimeError as wrapped:
        assert classify_failure(wrapped, 5) == ("exceeded the time limit of 5 s (timeout_seconds)", True)
    assert classify_failure(GeometryError("uneven"), 5) == ("uneven", True)
    assert classify_failure(OSError("disk hiccup"), 5) == (
        "unexpected error (OSError: disk hiccup); the details are in the worker's log", False)
