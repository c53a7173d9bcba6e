"""What an operator can do to one job or one result from the dashboard or the API.

Each action is one transaction that checks the state it starts from, so two operators who
click at once get one action and one clear refusal, never a job in two states. Study-wide
retry and rerun are `jobs.requeue_failed` and `jobs.rerun`, as on the command line.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, select, update

from dicom_node.state import db
from dicom_node.state.audit import Operator
from dicom_node.state.jobs import queue_again


class ActionRefused(Exception):
    """The action does not apply to the job or result in its present state; the message says why."""


class NotFound(ActionRefused):
    """No such job or result."""


PURGED = "job {}: its study's instances were purged (retention), so there is nothing to run it on"


def _job(connection, job_id: int):
    job = connection.execute(select(db.jobs).where(db.jobs.c.id == job_id)).mappings().first()
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def retry_job(engine: Engine, job_id: int, by: Operator) -> None:
    """A failed job, back to the queue with fresh attempts."""
    with engine.begin() as connection:
        job = _job(connection, job_id)
        if job["state"] != "failed":
            raise ActionRefused(f"job {job_id} is {job['state']}: only a failed job is retried")
        if not queue_again(connection, [(job_id, job["study_uid"])], "re-queued by an operator", by):
            raise ActionRefused(PURGED.format(job_id))


def rerun_job(engine: Engine, job_id: int, by: Operator) -> None:
    """A finished job, run again: its new results supersede the earlier ones."""
    with engine.begin() as connection:
        job = _job(connection, job_id)
        if job["state"] not in ("done", "failed", "cancelled"):
            raise ActionRefused(f"job {job_id} is {job['state']}: only a finished job is run again")
        if not queue_again(connection, [(job_id, job["study_uid"])], "re-run by an operator", by):
            raise ActionRefused(PURGED.format(job_id))


def cancel_job(engine: Engine, job_id: int, by: Operator) -> None:
    """A queued or running job stops counting: a worker running it loses its claim (its
    results are discarded, as for a lapsed lease), and the study goes on without it."""
    with engine.begin() as connection:
        job = _job(connection, job_id)
        if job["state"] not in ("queued", "running"):
            raise ActionRefused(f"job {job_id} is {job['state']}: only a queued or running job is cancelled")
        connection.execute(update(db.jobs).where(db.jobs.c.id == job_id).values(
            state="cancelled", lease_until=None, worker=None, finished_at=db.now(),
            reason=f"cancelled by {by.name}"))
        db.log_event(connection, job["study_uid"], "warning", f"job {job_id} cancelled by an operator", by.name,
                     by.address)


def resend_result(engine: Engine, result_id: int, by: Operator) -> int:
    """Every delivery of a result, pending again and due now, sent or dead alike (the PACS lost
    it, a destination was fixed). Returns how many deliveries were re-opened."""
    with engine.begin() as connection:
        result = connection.execute(
            select(db.results.c.kind, db.results.c.sop_instance_uid, db.jobs.c.study_uid, db.results.c.path)
            .join(db.jobs, db.jobs.c.id == db.results.c.job_id).where(db.results.c.id == result_id)
        ).first()
        if result is None:
            raise NotFound(f"no result {result_id}")
        if not Path(result.path).exists():
            raise ActionRefused(f"result {result_id} cannot be sent again: its file is gone (purged by retention)")
        reopened = connection.execute(
            update(db.deliveries).where(db.deliveries.c.result_id == result_id)
            .values(state="pending", attempts=0, not_before=0.0, last_error=None, sent_at=None, announced_at=None)
        ).rowcount
        if reopened == 0:
            raise ActionRefused(f"result {result_id} has no destination to send it to")
        db.log_event(connection, result.study_uid, "info",
                     f"{result.kind} {result.sop_instance_uid} to be sent again by an operator", by.name, by.address)
    return reopened
