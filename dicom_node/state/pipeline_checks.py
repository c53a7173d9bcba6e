"""Which pipelines are disabled, and why: a worker that finds a pipeline's bundle cannot run
here (`compute.bundle_check`) records it, and the rest of the node reads it.

A disabled pipeline still gets its jobs, failed at once with the reason, rather than none:
`status` shows them, and once the bundle is fixed and the node restarted, `dicom-node retry`
runs them. Other pipelines run as before.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine, delete, select, update

from dicom_node.state import db


def record(engine: Engine, pipeline: str, reason: str | None, worker: str) -> int:
    """The check's outcome (``reason`` None: ready). A disabled pipeline's queued jobs fail now
    with the reason; returns how many."""
    with engine.begin() as connection:
        values = {"ready": int(reason is None), "reason": reason, "worker": worker, "checked_at": db.now()}
        db.upsert(connection, db.pipeline_checks, {"pipeline": pipeline}, values)
        if reason is None:
            return 0
        queued = connection.execute(select(db.jobs.c.id, db.jobs.c.study_uid).where(
            db.jobs.c.pipeline == pipeline, db.jobs.c.state == "queued")).all()
        why = disabled_reason(pipeline, reason)
        for job_id, study_uid in queued:
            connection.execute(update(db.jobs).where(db.jobs.c.id == job_id, db.jobs.c.state == "queued")
                               .values(state="failed", reason=why, finished_at=db.now()))
            db.log_event(connection, study_uid, "error", f"job {job_id} failed: {why}")
    return len(queued)


def disabled_reason(pipeline: str, reason: str) -> str:
    return f"pipeline {pipeline} is disabled: its bundle failed the check at start-up: {reason}"


def disabled(connection: Connection) -> dict[str, str]:
    """Pipeline name -> why it is disabled."""
    return dict(connection.execute(select(db.pipeline_checks.c.pipeline, db.pipeline_checks.c.reason)
                                   .where(db.pipeline_checks.c.ready == 0)).all())


def with_queued_jobs(engine: Engine, pipelines: set[str]) -> set[str]:
    """Those of ``pipelines`` that have a queued job (one read, no lock taken)."""
    if not pipelines:
        return set()
    with db.reading(engine) as connection:
        return set(connection.execute(select(db.jobs.c.pipeline).distinct().where(
            db.jobs.c.state == "queued", db.jobs.c.pipeline.in_(pipelines))).scalars())


def forget(engine: Engine) -> None:
    """At the node's start: every pipeline unchecked (enabled) until its worker checks it again."""
    with engine.begin() as connection:
        connection.execute(delete(db.pipeline_checks))
