"""The node's state as the dashboard, the API and the metrics read it: a few grouped queries
over the whole database rather than one query per study, so that a page or a scrape costs the
same whether the node holds ten studies or ten thousand.

A study's state is derived exactly as `dicom-node status` derives it (`status.study_state`).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, func, select

from dicom_node.config import Config
from dicom_node.state import db, pipeline_checks
from dicom_node.state.status import study_state

STUDY_STATES = ("receiving", "queued", "running", "sending", "done", "failed")
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
DELIVERY_STATES = ("pending", "sent", "dead")


def study_states(connection: Connection, only: set[str] | None = None) -> dict[str, str]:
    """The derived state of every study, or of those in ``only``, by Study Instance UID."""
    stored_query = select(db.studies.c.study_uid, db.studies.c.state)
    jobs_query = select(db.jobs.c.study_uid, db.jobs.c.state).group_by(db.jobs.c.study_uid, db.jobs.c.state)
    deliveries_query = (
        select(db.jobs.c.study_uid, db.deliveries.c.state, func.count())
        .join(db.results, db.results.c.job_id == db.jobs.c.id)
        .join(db.deliveries, db.deliveries.c.result_id == db.results.c.id)
        .where(db.deliveries.c.state.in_(("pending", "dead")))
        .group_by(db.jobs.c.study_uid, db.deliveries.c.state)
    )
    if only is not None:
        stored_query = stored_query.where(db.studies.c.study_uid.in_(only))
        jobs_query = jobs_query.where(db.jobs.c.study_uid.in_(only))
        deliveries_query = deliveries_query.where(db.jobs.c.study_uid.in_(only))
    stored = dict(connection.execute(stored_query).all())
    job_states: dict[str, list[str]] = defaultdict(list)
    for study_uid, state in connection.execute(jobs_query):
        job_states[study_uid].append(state)
    deliveries: dict[str, Counter] = defaultdict(Counter)
    for study_uid, state, count in connection.execute(deliveries_query):
        deliveries[study_uid][state] = count
    return {
        uid: study_state(state, job_states.get(uid, []), deliveries[uid]["pending"], deliveries[uid]["dead"])
        for uid, state in stored.items()
    }


def study_exists(engine: Engine, study_uid: str) -> bool:
    with db.reading(engine) as connection:
        return connection.execute(
            select(db.studies.c.study_uid).where(db.studies.c.study_uid == study_uid)).first() is not None


@dataclass(frozen=True)
class StudyFilter:
    """What `GET /api/studies` narrows the list to; empty fields do not narrow it."""

    state: str | None = None
    patient_id: str | None = None
    received_from: float | None = None  # UNIX seconds, first instance received at or after
    received_to: float | None = None
    study_date_from: str | None = None  # YYYYMMDD, the study's own Study Date, inclusive
    study_date_to: str | None = None


@dataclass
class StudyPage:
    total: int
    studies: list[dict] = field(default_factory=list)


def list_studies(engine: Engine, where: StudyFilter, offset: int = 0, limit: int = 50) -> StudyPage:
    """Studies newest first, each with its derived state and counts."""
    query = select(db.studies).order_by(db.studies.c.first_received_at.desc())
    if where.patient_id:
        query = query.where(db.studies.c.patient_id == where.patient_id)
    if where.received_from is not None:
        query = query.where(db.studies.c.first_received_at >= where.received_from)
    if where.received_to is not None:
        query = query.where(db.studies.c.first_received_at <= where.received_to)
    if where.study_date_from:
        query = query.where(db.studies.c.study_date >= where.study_date_from)
    if where.study_date_to:
        query = query.where(db.studies.c.study_date <= where.study_date_to)
    with db.reading(engine) as connection:
        states = study_states(connection)
        rows = [dict(row) | {"status": states[row["study_uid"]]} for row in connection.execute(query).mappings()]
        if where.state:
            rows = [row for row in rows if row["status"] == where.state]
        page = rows[offset:offset + limit]
        counts = dict(connection.execute(
            select(db.instances.c.study_uid, func.count())
            .where(db.instances.c.study_uid.in_([row["study_uid"] for row in page]))
            .group_by(db.instances.c.study_uid)
        ).all())
    for row in page:
        row.pop("announced_state", None)
        row["instances"] = counts.get(row["study_uid"], 0)
    return StudyPage(len(rows), page)


def study_detail(engine: Engine, study_uid: str) -> dict | None:
    """One study with its series, jobs (each with its results and their deliveries) and events."""
    with db.reading(engine) as connection:
        study = connection.execute(select(db.studies).where(db.studies.c.study_uid == study_uid)).mappings().first()
        if study is None:
            return None
        series = connection.execute(
            select(db.series, func.count(db.instances.c.sop_instance_uid).label("instances"))
            .join(db.instances, db.instances.c.series_uid == db.series.c.series_uid, isouter=True)
            .where(db.series.c.study_uid == study_uid)
            .group_by(*db.series.c)
            .order_by(db.series.c.series_number)
        ).mappings().all()
        job_rows = connection.execute(
            select(db.jobs).where(db.jobs.c.study_uid == study_uid).order_by(db.jobs.c.id)
        ).mappings().all()
        result_rows = connection.execute(
            select(db.results).join(db.jobs, db.jobs.c.id == db.results.c.job_id)
            .where(db.jobs.c.study_uid == study_uid).order_by(db.results.c.id)
        ).mappings().all()
        delivery_rows = connection.execute(
            select(db.deliveries).join(db.results, db.results.c.id == db.deliveries.c.result_id)
            .join(db.jobs, db.jobs.c.id == db.results.c.job_id)
            .where(db.jobs.c.study_uid == study_uid).order_by(db.deliveries.c.id)
        ).mappings().all()
        events = connection.execute(
            select(db.events).where(db.events.c.study_uid == study_uid).order_by(db.events.c.id)
        ).mappings().all()
    deliveries_of: dict[int, list[dict]] = defaultdict(list)
    for delivery in delivery_rows:
        deliveries_of[delivery["result_id"]].append(
            {key: delivery[key] for key in ("id", "destination", "state", "attempts", "last_error", "sent_at")})
    superseded = {row["supersedes"] for row in result_rows if row["supersedes"] is not None}
    results_of: dict[int, list[dict]] = defaultdict(list)
    for result in result_rows:
        results_of[result["job_id"]].append({
            "id": result["id"], "kind": result["kind"], "sop_instance_uid": result["sop_instance_uid"],
            "series_uid": result["series_uid"], "created_at": result["created_at"],
            "superseded": result["id"] in superseded, "deliveries": deliveries_of[result["id"]],
        })
    jobs = [
        {key: job[key] for key in ("id", "pipeline", "series_uid", "stack", "state", "attempts", "reason", "worker",
                                   "created_at", "started_at", "finished_at")} | {"results": results_of[job["id"]]}
        for job in job_rows
    ]
    pending = sum(d["state"] == "pending" for r in result_rows for d in deliveries_of[r["id"]])
    dead = sum(d["state"] == "dead" for r in result_rows for d in deliveries_of[r["id"]])
    detail = {key: study[key] for key in study if key != "announced_state"}
    detail["status"] = study_state(study["state"], [job["state"] for job in jobs], pending, dead)
    detail["series"] = [dict(row) for row in series]
    detail["jobs"] = jobs
    detail["events"] = [
        {"id": e["id"], "at": e["at"], "level": e["level"], "message": e["message"], "actor": e["actor"] or "node",
         "address": e["address"] or ""} for e in events
    ]
    return detail


def job_counts(connection: Connection) -> dict[tuple[str, str], int]:
    """(pipeline, state) -> jobs."""
    return {(pipeline, state): count for pipeline, state, count in connection.execute(
        select(db.jobs.c.pipeline, db.jobs.c.state, func.count()).group_by(db.jobs.c.pipeline, db.jobs.c.state))}


def delivery_counts(connection: Connection) -> dict[tuple[str, str], int]:
    """(destination, state) -> deliveries."""
    return {(destination, state): count for destination, state, count in connection.execute(
        select(db.deliveries.c.destination, db.deliveries.c.state, func.count())
        .group_by(db.deliveries.c.destination, db.deliveries.c.state))}


def queue(engine: Engine, limit: int = 100) -> dict[str, list[dict]]:
    """The live queue: studies receiving, jobs queued and running, results waiting to be sent."""
    with db.reading(engine) as connection:
        receiving = connection.execute(
            select(db.studies.c.study_uid, db.studies.c.patient_id, db.studies.c.first_received_at,
                   db.studies.c.last_received_at, func.count(db.instances.c.sop_instance_uid).label("instances"))
            .join(db.instances, db.instances.c.study_uid == db.studies.c.study_uid, isouter=True)
            .where(db.studies.c.state == "receiving")
            .group_by(db.studies.c.study_uid).order_by(db.studies.c.first_received_at).limit(limit)
        ).mappings().all()
        active = connection.execute(
            select(db.jobs.c.id, db.jobs.c.study_uid, db.jobs.c.pipeline, db.jobs.c.state, db.jobs.c.attempts,
                   db.jobs.c.worker, db.jobs.c.created_at, db.jobs.c.started_at, db.jobs.c.reason)
            .where(db.jobs.c.state.in_(("queued", "running")))
            .order_by(db.jobs.c.priority.desc(), db.jobs.c.created_at).limit(limit)
        ).mappings().all()
        sending = connection.execute(
            select(db.deliveries.c.id, db.deliveries.c.destination, db.deliveries.c.attempts,
                   db.deliveries.c.last_error, db.results.c.kind, db.results.c.id.label("result_id"),
                   db.jobs.c.study_uid)
            .join(db.results, db.results.c.id == db.deliveries.c.result_id)
            .join(db.jobs, db.jobs.c.id == db.results.c.job_id)
            .where(db.deliveries.c.state == "pending").order_by(db.deliveries.c.id).limit(limit)
        ).mappings().all()
    return {
        "receiving": [dict(row) for row in receiving],
        "queued": [dict(row) for row in active if row["state"] == "queued"],
        "running": [dict(row) for row in active if row["state"] == "running"],
        "sending": [dict(row) for row in sending],
    }


def failures(engine: Engine, limit: int = 100) -> list[dict]:
    """Failed jobs and dead deliveries, newest first, each with its reason."""
    with db.reading(engine) as connection:
        jobs = connection.execute(
            select(db.jobs.c.id, db.jobs.c.study_uid, db.jobs.c.pipeline, db.jobs.c.reason, db.jobs.c.finished_at)
            .where(db.jobs.c.state == "failed").order_by(db.jobs.c.finished_at.desc()).limit(limit)
        ).mappings().all()
        dead = connection.execute(
            select(db.deliveries.c.id, db.deliveries.c.destination, db.deliveries.c.last_error,
                   db.results.c.id.label("result_id"), db.results.c.kind, db.jobs.c.study_uid)
            .join(db.results, db.results.c.id == db.deliveries.c.result_id)
            .join(db.jobs, db.jobs.c.id == db.results.c.job_id)
            .where(db.deliveries.c.state == "dead").order_by(db.deliveries.c.id.desc()).limit(limit)
        ).mappings().all()
        studies = connection.execute(
            select(db.studies.c.study_uid, db.studies.c.reason, db.studies.c.completed_at)
            .where(db.studies.c.state == "failed").limit(limit)
        ).mappings().all()
    return ([{"what": "job", **row} for row in jobs] + [{"what": "delivery", **row} for row in dead]
            + [{"what": "study", **row} for row in studies])


HOUR = 3600.0


def pipeline_activity(engine: Engine, config: Config, since: float, now: float) -> list[dict]:
    """Per pipeline over [since, now]: jobs finished by state, latency from queued to finished
    (median and 95th percentile), failure rate, and the same per hour for the charts."""
    with db.reading(engine) as connection:
        rows = connection.execute(
            select(db.jobs.c.pipeline, db.jobs.c.state, db.jobs.c.created_at, db.jobs.c.finished_at)
            .where(db.jobs.c.finished_at >= since, db.jobs.c.state.in_(("done", "failed")))
        ).all()
        waiting = job_counts(connection)
        disabled = pipeline_checks.disabled(connection)
    first_hour = math.floor(since / HOUR) * HOUR  # whole hours, so that a bar's label is its hour
    hours = max(1, math.ceil((now - first_hour) / HOUR))
    activity = []
    for pipeline in config.pipelines:
        finished = [row for row in rows if row.pipeline == pipeline.name]
        latencies = sorted(row.finished_at - row.created_at for row in finished if row.state == "done")
        per_hour = [{"done": 0, "failed": 0, "latencies": []} for _ in range(hours)]
        for row in finished:
            bucket = per_hour[min(hours - 1, int((row.finished_at - first_hour) // HOUR))]
            bucket[row.state] += 1
            if row.state == "done":
                bucket["latencies"].append(row.finished_at - row.created_at)
        activity.append({
            "pipeline": pipeline.name,
            "disabled": disabled.get(pipeline.name),  # why its bundle failed the check, if it did
            "done": sum(row.state == "done" for row in finished),
            "failed": sum(row.state == "failed" for row in finished),
            "queued": waiting.get((pipeline.name, "queued"), 0),
            "running": waiting.get((pipeline.name, "running"), 0),
            "latency_p50_s": _quantile(latencies, 0.5),
            "latency_p95_s": _quantile(latencies, 0.95),
            "failure_rate": (sum(row.state == "failed" for row in finished) / len(finished)) if finished else None,
            "hours": [{"start": first_hour + index * HOUR, "done": bucket["done"], "failed": bucket["failed"],
                       "latency_p50_s": _quantile(sorted(bucket["latencies"]), 0.5)}
                      for index, bucket in enumerate(per_hour)],
        })
    return activity


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def destination_health(engine: Engine, config: Config) -> list[dict]:
    """Per destination: deliveries by state, the last success and the last error."""
    with db.reading(engine) as connection:
        counts = delivery_counts(connection)
        last_sent = dict(connection.execute(
            select(db.deliveries.c.destination, func.max(db.deliveries.c.sent_at))
            .group_by(db.deliveries.c.destination)).all())
        errors = {}
        for destination in config.destinations:
            errors[destination.name] = connection.execute(
                select(db.deliveries.c.last_error).where(
                    db.deliveries.c.destination == destination.name, db.deliveries.c.state != "sent",
                    db.deliveries.c.last_error.is_not(None))
                .order_by(db.deliveries.c.id.desc()).limit(1)).scalar()
    health = []
    for destination in config.destinations:
        states = {state: counts.get((destination.name, state), 0) for state in DELIVERY_STATES}
        health.append({
            "name": destination.name, "type": destination.type, "address": destination.address,
            "ae_title": destination.ae_title, "host": destination.host, "port": destination.port, **states, "last_sent_at": last_sent.get(destination.name),
            "last_error": errors[destination.name],
            "healthy": states["dead"] == 0 and errors[destination.name] is None,
        })
    return health
