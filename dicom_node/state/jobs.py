"""The durable job queue, kept in the same database as the studies it works on.

A job is one pipeline on one series. Workers claim the most urgent job (priority, then age) by
moving it to ``running`` with a lease that they renew while they work. A worker that dies stops
renewing; its job becomes claimable again once the lease lapses. A job that fails for a
transient reason is retried with exponential backoff; after ``max_attempts`` tries, or at once
for a reason no retry can change (a series the model cannot take), it is ``failed`` with the
reason kept. There is no broker to drift out of step with: claiming and recording the outcome
are ordinary transactions.

Every write a worker makes to its job is fenced by its claim: the worker's name and the
attempt it claimed. A worker whose lease lapsed (a long stall, a paused machine) while another
claimed the job finds its writes match no row (`LeaseLost`), and its results are discarded: a
job's results are recorded once, by the worker that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, Engine, and_, or_, select, update
from sqlalchemy.engine import RowMapping

from dicom_node.state import db
from dicom_node.state.audit import Operator

LEASE_SECONDS = 60.0
RETRY_FIRST_SECONDS = 5.0
RETRY_MAX_SECONDS = 600.0


class LeaseLost(Exception):
    """The job is no longer this worker's: its lease lapsed and the job moved on."""


@dataclass(frozen=True)
class Claim:
    """Which worker holds a running job, and for which attempt."""

    job_id: int
    worker: str
    attempt: int

    @classmethod
    def of(cls, job: RowMapping) -> Claim:
        return cls(job["id"], job["worker"], job["attempts"])

    def fence(self, statement):
        """``statement`` (an update of jobs) limited to the job while this claim holds it."""
        return statement.where(db.jobs.c.id == self.job_id, db.jobs.c.state == "running",
                               db.jobs.c.worker == self.worker, db.jobs.c.attempts == self.attempt)


def _fenced(connection: Connection, claim: Claim | None, statement) -> None:
    """Run ``statement`` on the claimed job, or raise LeaseLost where the claim no longer holds."""
    if claim is None:
        connection.execute(statement)
        return
    if connection.execute(claim.fence(statement)).rowcount == 0:
        raise LeaseLost(f"job {claim.job_id} is no longer held by {claim.worker} (attempt {claim.attempt})")


def retry_delay(attempts: int) -> float:
    return min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** max(0, attempts - 1))


def enqueue(
    connection: Connection, study_uid: str, series_uid: str, stack: str, pipeline: str, priority: int = 0,
    state: str = "queued", reason: str | None = None,
) -> None:
    """A new job; ``state="failed"`` with ``reason`` records one that cannot run at all, so
    that it is shown, and can be retried, as any failed job."""
    now = db.now()
    connection.execute(
        db.jobs.insert().values(
            study_uid=study_uid,
            series_uid=series_uid,
            stack=stack,
            pipeline=pipeline,
            state=state,
            reason=reason,
            priority=priority,
            attempts=0,
            not_before=0.0,
            created_at=now,
            finished_at=now if state == "failed" else None,
        )
    )


def claim(engine: Engine, worker: str, pipelines: set[str], max_attempts: int,
          lease_seconds: float = LEASE_SECONDS) -> RowMapping | None:
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
            .values(state="running", attempts=attempt, lease_until=now + lease_seconds, worker=worker, started_at=now)
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
    connection: Connection, job_id: int, study_uid: str, attempts: int, max_attempts: int, reason: str,
    claim: Claim | None = None,
) -> None:
    """Back to the queue after a backoff, or failed once out of attempts; ``claim``: only while
    the worker that reports it still holds the job."""
    if attempts >= max_attempts:
        finish(connection, job_id, study_uid, "failed", f"{reason} (after {attempts} attempts)", claim)
        return
    delay = retry_delay(attempts)
    _fenced(connection, claim, update(db.jobs).where(db.jobs.c.id == job_id).values(
        state="queued", reason=reason, lease_until=None, worker=None, not_before=db.now() + delay))
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


def release_dead_local_workers(engine: Engine, host: str, alive) -> set[str]:
    """At start-up, jobs held by processes of this host that no longer exist are requeued now
    rather than after their lease: a restarted node resumes at once. Returns their studies."""
    released = set()
    with engine.begin() as connection:
        held = connection.execute(
            select(db.jobs.c.id, db.jobs.c.worker, db.jobs.c.study_uid).where(
                db.jobs.c.state == "running", db.jobs.c.worker.like(f"{host}:%")
            )
        ).all()
        for job_id, worker, study_uid in held:
            if not alive(int(worker.rsplit(":", 1)[1])):
                connection.execute(update(db.jobs).where(db.jobs.c.id == job_id).values(lease_until=0.0))
                released.add(study_uid)
    return released


def renew(engine: Engine, claim: Claim, lease_seconds: float = LEASE_SECONDS) -> bool:
    """Extend the lease; False once the claim no longer holds the job."""
    with engine.begin() as connection:
        return connection.execute(
            claim.fence(update(db.jobs)).values(lease_until=db.now() + lease_seconds)
        ).rowcount > 0


@dataclass(frozen=True)
class Retried:
    """What `requeue_failed` put back to work."""

    jobs: int
    studies: int
    dead_letters: int


def requeue_failed(engine: Engine, study_uids: list[str] | None = None, by: Operator | None = None) -> Retried:
    """`dicom-node retry`: failed jobs start again with fresh attempts, failed studies are
    completed again after a quiet period, dead-lettered deliveries are pending again, and
    pending deliveries go now."""
    with engine.begin() as connection:
        query = select(db.jobs.c.id, db.jobs.c.study_uid).where(db.jobs.c.state == "failed")
        if study_uids:
            query = query.where(db.jobs.c.study_uid.in_(study_uids))
        failed = connection.execute(query).all()
        by = by or Operator.command_line()
        requeued = queue_again(connection, failed, "re-queued by an operator", by)
        studies = select(db.studies.c.study_uid).where(db.studies.c.state == "failed")
        if study_uids:
            studies = studies.where(db.studies.c.study_uid.in_(study_uids))
        failed_studies = connection.execute(studies).scalars().all()
        for study_uid in failed_studies:
            connection.execute(update(db.studies).where(db.studies.c.study_uid == study_uid)
                               .values(state="receiving", reason=None, last_received_at=db.now()))
            db.log_event(connection, study_uid, "info", "re-opened by an operator: completed again after the quiet period",
                         by.name, by.address)
        dead = update(db.deliveries).where(db.deliveries.c.state == "dead").values(
            state="pending", attempts=0, not_before=0.0)
        due = update(db.deliveries).where(db.deliveries.c.state == "pending").values(not_before=0.0)
        if study_uids:
            results_of_studies = (
                select(db.results.c.id)
                .join(db.jobs, db.jobs.c.id == db.results.c.job_id)
                .where(db.jobs.c.study_uid.in_(study_uids))
            )
            dead = dead.where(db.deliveries.c.result_id.in_(results_of_studies))
            due = due.where(db.deliveries.c.result_id.in_(results_of_studies))
        dead_letters = connection.execute(dead).rowcount
        connection.execute(due)
        summary = (f"retry asked by an operator: {requeued} failed job(s) re-queued, {len(failed_studies)} failed "
                   f"study(ies) re-opened, {dead_letters} dead delivery(ies) pending again")
        for study_uid in study_uids or [None]:  # the action itself, even where it found nothing to do
            db.log_event(connection, study_uid, "info", summary, by.name, by.address)
    return Retried(requeued, len(failed_studies), dead_letters)


def rerun(engine: Engine, study_uids: list[str], by: Operator | None = None) -> int:
    """`dicom-node rerun`: the finished jobs of these studies run again (after a model update, say).

    Their new SEG and SR get new UIDs and are recorded as superseding the earlier ones.
    """
    with engine.begin() as connection:
        finished = connection.execute(
            select(db.jobs.c.id, db.jobs.c.study_uid)
            .where(db.jobs.c.state.in_(("done", "failed", "cancelled")), db.jobs.c.study_uid.in_(study_uids))
        ).all()
        by = by or Operator.command_line()
        queued = queue_again(connection, finished, "re-run by an operator", by)
        if not finished:
            for study_uid in study_uids:
                db.log_event(connection, study_uid, "info", "rerun asked by an operator: no finished job to run again",
                             by.name, by.address)
    return queued


def queue_again(connection: Connection, rows, why: str, by: Operator) -> int:
    """Jobs (id, study) back to the queue with fresh attempts, each with an event saying why
    and who asked; how many. A job of a study whose instances retention purged has nothing
    left to run on: it stays as it is, and an event says so."""
    purged = set(connection.execute(select(db.studies.c.study_uid).where(
        db.studies.c.study_uid.in_({study_uid for _, study_uid in rows}),
        db.studies.c.instances_purged_at.is_not(None))).scalars()) if rows else set()
    queued = 0
    for job_id, study_uid in rows:
        if study_uid in purged:
            db.log_event(connection, study_uid, "warning", f"job {job_id} not {why}: the study's instances were "
                         "purged (retention)", by.name, by.address)
            continue
        connection.execute(
            update(db.jobs)
            .where(db.jobs.c.id == job_id)
            .values(state="queued", attempts=0, not_before=0.0, reason=None, finished_at=None)
        )
        db.log_event(connection, study_uid, "info", f"job {job_id} {why}", by.name, by.address)
        queued += 1
    return queued


def finish(connection: Connection, job_id: int, study_uid: str, state: str, reason: str | None = None,
           claim: Claim | None = None) -> None:
    """The job is done or failed for good; ``claim``: only while the worker that reports it
    still holds the job (LeaseLost otherwise, and the caller's transaction is to roll back)."""
    _fenced(connection, claim, update(db.jobs).where(db.jobs.c.id == job_id).values(
        state=state, reason=reason, finished_at=db.now(), lease_until=None))
    message = f"job {job_id} {state}" + (f": {reason}" if reason else "")
    db.log_event(connection, study_uid, "error" if state == "failed" else "info", message)
