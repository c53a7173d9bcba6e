"""The durable job queue, kept in the same database as the studies it works on.

A job is one pipeline on one series. Workers claim the most urgent job (priority, then age) by
moving it to ``running`` with a lease that they renew while they work. A worker that dies stops
renewing; its job becomes claimable again once the lease lapses. A job that fails for a
transient reason is retried with exponential backoff; after ``max_attempts`` tries, or at once
for a reason no retry can change (a series the model cannot take), it is ``failed`` with the
reason kept. There is no broker to drift out of step with: claiming and recording the outcome
are ordinary transactions.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine, and_, or_, select, update
from sqlalchemy.engine import RowMapping

from . import db

LEASE_SECONDS = 60.0
RETRY_FIRST_SECONDS = 5.0
RETRY_MAX_SECONDS = 600.0


def retry_delay(attempts: int) -> float:
    return min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** max(0, attempts - 1))


def enqueue(
    connection: Connection, study_uid: str, series_uid: str, stack: str, pipeline: str, priority: int = 0
) -> None:
    connection.execute(
        db.jobs.insert().values(
            study_uid=study_uid,
            series_uid=series_uid,
            stack=stack,
            pipeline=pipeline,
            state="queued",
            priority=priority,
            attempts=0,
            not_before=0.0,
            created_at=db.now(),
        )
    )


def claim(engine: Engine, worker: str, pipelines: set[str], max_attempts: int) -> RowMapping | None:
    """Take the most urgent claimable job, or None; jobs with lapsed leases are claimable."""
    now = db.now()
    if not _anything_to_claim(engine, now, pipelines):
        return None  # the idle poll: a read, so that idle workers never hold the write lock
    with engine.begin() as connection:
        _requeue_lapsed(connection, now, max_attempts)
        query = (
            select(db.jobs)
            .where(db.jobs.c.state == "queued", db.jobs.c.not_before <= now, db.jobs.c.pipeline.in_(pipelines))
            .order_by(db.jobs.c.priority.desc(), db.jobs.c.created_at, db.jobs.c.id)
            .limit(1)
        )
        if engine.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        job = connection.execute(query).mappings().first()
        if job is None:
            return None
        attempt = job["attempts"] + 1
        connection.execute(
            update(db.jobs)
            .where(db.jobs.c.id == job["id"])
            .values(state="running", attempts=attempt, lease_until=now + LEASE_SECONDS, worker=worker, started_at=now)
        )
        db.log_event(
            connection, job["study_uid"], "info", f"job {job['id']} ({job['pipeline']}) started by {worker}, attempt {attempt}"
        )
        return connection.execute(select(db.jobs).where(db.jobs.c.id == job["id"])).mappings().first()


def _anything_to_claim(engine: Engine, now: float, pipelines: set[str]) -> bool:
    due = and_(db.jobs.c.state == "queued", db.jobs.c.not_before <= now, db.jobs.c.pipeline.in_(pipelines))
    lapsed = and_(db.jobs.c.state == "running", db.jobs.c.lease_until < now)
    with db.reading(engine) as connection:
        return connection.execute(select(db.jobs.c.id).where(or_(due, lapsed)).limit(1)).first() is not None


def _requeue_lapsed(connection: Connection, now: float, max_attempts: int) -> None:
    """Jobs whose worker vanished go back to the queue, or fail once out of attempts."""
    lapsed = connection.execute(
        select(db.jobs.c.id, db.jobs.c.study_uid, db.jobs.c.attempts, db.jobs.c.worker).where(
            db.jobs.c.state == "running", db.jobs.c.lease_until < now
        )
    ).all()
    for job_id, study_uid, attempts, worker in lapsed:
        reason = f"worker {worker} stopped renewing its lease"
        retry_or_fail(connection, job_id, study_uid, attempts, max_attempts, reason)


def retry_or_fail(
    connection: Connection, job_id: int, study_uid: str, attempts: int, max_attempts: int, reason: str
) -> None:
    if attempts >= max_attempts:
        finish(connection, job_id, study_uid, "failed", f"{reason} (after {attempts} attempts)")
        return
    delay = retry_delay(attempts)
    connection.execute(
        update(db.jobs)
        .where(db.jobs.c.id == job_id)
        .values(state="queued", reason=reason, lease_until=None, worker=None, not_before=db.now() + delay)
    )
    db.log_event(connection, study_uid, "warning", f"job {job_id} will be retried in {delay:.0f} s: {reason}")


def release(engine: Engine, job_id: int, worker: str) -> None:
    """Give a job back untouched (the worker is shutting down): it does not cost an attempt."""
    with engine.begin() as connection:
        job = connection.execute(select(db.jobs).where(db.jobs.c.id == job_id)).mappings().first()
        if job is None or job["state"] != "running" or job["worker"] != worker:
            return
        connection.execute(
            update(db.jobs)
            .where(db.jobs.c.id == job_id)
            .values(state="queued", attempts=job["attempts"] - 1, lease_until=None, worker=None, not_before=0.0)
        )
        db.log_event(connection, job["study_uid"], "info", f"job {job_id} released by {worker} at shutdown")


def release_dead_local_workers(engine: Engine, host: str, alive) -> None:
    """At start-up, jobs held by processes of this host that no longer exist are requeued now
    rather than after their lease: a restarted node resumes at once."""
    with engine.begin() as connection:
        held = connection.execute(
            select(db.jobs.c.id, db.jobs.c.worker).where(
                db.jobs.c.state == "running", db.jobs.c.worker.like(f"{host}:%")
            )
        ).all()
        for job_id, worker in held:
            if not alive(int(worker.rsplit(":", 1)[1])):
                connection.execute(update(db.jobs).where(db.jobs.c.id == job_id).values(lease_until=0.0))


def renew(engine: Engine, job_id: int, worker: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            update(db.jobs)
            .where(db.jobs.c.id == job_id, db.jobs.c.worker == worker, db.jobs.c.state == "running")
            .values(lease_until=db.now() + LEASE_SECONDS)
        )


def requeue_failed(engine: Engine, study_uids: list[str] | None = None) -> int:
    """`dicom-node retry`: failed jobs start again with fresh attempts; pending deliveries go now."""
    with engine.begin() as connection:
        query = select(db.jobs.c.id, db.jobs.c.study_uid).where(db.jobs.c.state == "failed")
        if study_uids:
            query = query.where(db.jobs.c.study_uid.in_(study_uids))
        failed = connection.execute(query).all()
        _queue_again(connection, failed, "re-queued by an operator")
        deliveries = update(db.deliveries).where(db.deliveries.c.state == "pending").values(not_before=0.0)
        if study_uids:
            results_of_studies = (
                select(db.results.c.id)
                .join(db.jobs, db.jobs.c.id == db.results.c.job_id)
                .where(db.jobs.c.study_uid.in_(study_uids))
            )
            deliveries = deliveries.where(db.deliveries.c.result_id.in_(results_of_studies))
        connection.execute(deliveries)
    return len(failed)


def rerun(engine: Engine, study_uids: list[str]) -> int:
    """`dicom-node rerun`: the finished jobs of these studies run again (after a model update, say).

    Their new SEG and SR get new UIDs and are recorded as superseding the earlier ones.
    """
    with engine.begin() as connection:
        finished = connection.execute(
            select(db.jobs.c.id, db.jobs.c.study_uid)
            .where(db.jobs.c.state.in_(("done", "failed")), db.jobs.c.study_uid.in_(study_uids))
        ).all()
        _queue_again(connection, finished, "re-run by an operator")
    return len(finished)


def _queue_again(connection: Connection, rows, why: str) -> None:
    """Jobs (id, study) back to the queue with fresh attempts, each with an event saying why."""
    for job_id, study_uid in rows:
        connection.execute(
            update(db.jobs)
            .where(db.jobs.c.id == job_id)
            .values(state="queued", attempts=0, not_before=0.0, reason=None, finished_at=None)
        )
        db.log_event(connection, study_uid, "info", f"job {job_id} {why}")


def finish(connection: Connection, job_id: int, study_uid: str, state: str, reason: str | None = None) -> None:
    connection.execute(
        update(db.jobs)
        .where(db.jobs.c.id == job_id)
        .values(state=state, reason=reason, finished_at=db.now(), lease_until=None)
    )
    message = f"job {job_id} {state}" + (f": {reason}" if reason else "")
    db.log_event(connection, study_uid, "error" if state == "failed" else "info", message)
