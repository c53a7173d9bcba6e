"""The durable job queue, kept in the same database as the studies it works on.

A job is one pipeline on one series. Workers claim a job by moving it to ``running`` with a
lease; a worker that dies stops renewing its lease, and the job becomes claimable again, up to
``MAX_ATTEMPTS`` times, after which it fails with the reason kept. There is no broker to drift
out of step with: claiming and recording the outcome are ordinary transactions.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine, and_, or_, select, update
from sqlalchemy.engine import RowMapping

from . import db

LEASE_SECONDS = 120.0
MAX_ATTEMPTS = 3


def enqueue(connection: Connection, study_uid: str, series_uid: str, pipeline: str) -> None:
    connection.execute(
        db.jobs.insert().values(
            study_uid=study_uid,
            series_uid=series_uid,
            pipeline=pipeline,
            state="queued",
            attempts=0,
            created_at=db.now(),
        )
    )


def claim(engine: Engine, worker: str, pipelines: set[str] | None = None) -> RowMapping | None:
    """Take the oldest claimable job, or None; expired leases count as claimable."""
    now = db.now()
    with engine.begin() as connection:
        _fail_exhausted(connection, now)
        query = (
            select(db.jobs)
            .where(
                or_(
                    db.jobs.c.state == "queued",
                    and_(db.jobs.c.state == "running", db.jobs.c.lease_until < now),
                )
            )
            .order_by(db.jobs.c.created_at, db.jobs.c.id)
            .limit(1)
        )
        if pipelines is not None:
            query = query.where(db.jobs.c.pipeline.in_(pipelines))
        if engine.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        job = connection.execute(query).mappings().first()
        if job is None:
            return None
        connection.execute(
            update(db.jobs)
            .where(db.jobs.c.id == job["id"])
            .values(
                state="running",
                attempts=job["attempts"] + 1,
                lease_until=now + LEASE_SECONDS,
                worker=worker,
                started_at=now,
            )
        )
        db.log_event(
            connection,
            job["study_uid"],
            "info",
            f"job {job['id']} ({job['pipeline']}) started by {worker}, attempt {job['attempts'] + 1}",
        )
        return connection.execute(select(db.jobs).where(db.jobs.c.id == job["id"])).mappings().first()


def _fail_exhausted(connection: Connection, now: float) -> None:
    """Jobs whose worker vanished on their last allowed attempt fail instead of looping."""
    exhausted = connection.execute(
        select(db.jobs.c.id, db.jobs.c.study_uid).where(
            db.jobs.c.state == "running",
            db.jobs.c.lease_until < now,
            db.jobs.c.attempts >= MAX_ATTEMPTS,
        )
    ).all()
    for job_id, study_uid in exhausted:
        finish(connection, job_id, study_uid, "failed", f"worker lost {MAX_ATTEMPTS} times")


def renew(engine: Engine, job_id: int, worker: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            update(db.jobs)
            .where(db.jobs.c.id == job_id, db.jobs.c.worker == worker, db.jobs.c.state == "running")
            .values(lease_until=db.now() + LEASE_SECONDS)
        )


def finish(connection: Connection, job_id: int, study_uid: str, state: str, reason: str | None = None) -> None:
    connection.execute(
        update(db.jobs)
        .where(db.jobs.c.id == job_id)
        .values(state=state, reason=reason, finished_at=db.now(), lease_until=None)
    )
    message = f"job {job_id} {state}" + (f": {reason}" if reason else "")
    db.log_event(connection, study_uid, "error" if state == "failed" else "info", message)
