"""What `dicom-node status` shows: each study, its state, its jobs and its results.

A study's state is derived, not stored twice: ``receiving`` until its quiet period ends, then
from its jobs (queued, running, failed) and its deliveries (sending), else done.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from sqlalchemy import Engine, exists, select

from dicom_node.printable import printable
from dicom_node.state import db


@dataclass
class JobView:
    id: int
    pipeline: str
    series_uid: str
    state: str
    attempts: int
    reason: str | None
    results: list[str] = field(default_factory=list)  # "SEG 1.2.3 -> pacs: sent"


@dataclass
class StudyView:
    study_uid: str
    patient_id: str
    accession_number: str
    state: str
    instances: int
    jobs: list[JobView]
    reason: str | None = None  # why the study failed as a whole
    purged: list[str] = field(default_factory=list)  # "instances purged 2026-12-02 18:30", by retention


def study_state(stored_state: str, job_states: list[str], pending_deliveries: int, dead_letters: int = 0) -> str:
    """What `status` says of a study: from its own row while receiving or failed as a whole,
    else from its jobs, then its deliveries."""
    if stored_state in ("receiving", "failed"):
        return stored_state
    for state in ("running", "queued", "failed"):
        if state in job_states:
            return state
    if pending_deliveries:
        return "sending"
    if dead_letters:
        return "failed"
    return "done"


def collect(engine: Engine) -> list[StudyView]:
    with db.reading(engine) as connection:
        studies = connection.execute(select(db.studies).order_by(db.studies.c.first_received_at)).mappings().all()
        views = []
        for study in studies:
            instance_count = len(
                connection.execute(
                    select(db.instances.c.sop_instance_uid).where(db.instances.c.study_uid == study["study_uid"])
                ).all()
            )
            job_rows = connection.execute(
                select(db.jobs).where(db.jobs.c.study_uid == study["study_uid"]).order_by(db.jobs.c.id)
            ).mappings().all()
            job_views = []
            pending = dead = 0
            for job in job_rows:
                view = JobView(
                    job["id"], job["pipeline"], job["series_uid"], job["state"], job["attempts"], job["reason"]
                )
                newer = db.results.alias("newer")
                superseded = exists().where(newer.c.supersedes == db.results.c.id)
                rows = connection.execute(
                    select(db.results.c.kind, db.results.c.sop_instance_uid, db.deliveries.c.destination,
                           db.deliveries.c.state, db.deliveries.c.last_error, superseded.label("superseded"))
                    .join(db.deliveries, db.deliveries.c.result_id == db.results.c.id, isouter=True)
                    .where(db.results.c.job_id == job["id"])
                    .order_by(db.results.c.id)
                ).all()
                outline_images: dict[str, Counter] = defaultdict(Counter)  # destination -> states
                for kind, uid, destination, state, error, is_superseded in rows:
                    pending += state == "pending"
                    dead += state == "dead"
                    if kind == "SC":  # one line for the whole outline series
                        outline_images[destination or ""][state or "kept"] += 1
                        continue
                    line = f"{kind} {uid}" + (" (superseded)" if is_superseded else "")
                    if destination:
                        line += f" -> {destination}: {state}" + (f" ({error})" if error and state != "sent" else "")
                    view.results.append(line)
                for destination, states in outline_images.items():
                    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
                    view.results.append("SC outline images" + (f" -> {destination}" if destination else "") +
                                        f": {counts}")
                job_views.append(view)
            state = study_state(study["state"], [j.state for j in job_views], pending, dead)
            views.append(
                StudyView(
                    study["study_uid"],
                    study["patient_id"] or "",
                    study["accession_number"] or "",
                    state,
                    instance_count,
                    job_views,
                    study["reason"],
                    [f"{part} purged {_when(study[f'{part}_purged_at'])}" for part in ("instances", "results")
                     if study[f"{part}_purged_at"] is not None],
                )
            )
    return views


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(at))


def render(views: list[StudyView], disabled: dict[str, str] | None = None) -> str:
    """The text `status` prints, disabled pipelines first (``disabled``: name -> why); values
    that came from the network are made `printable`."""
    lines = [f"pipeline {name} DISABLED: {printable(reason)}" for name, reason in sorted((disabled or {}).items())]
    if not views:
        return "\n".join([*lines, "no studies received yet"])
    for view in views:
        lines.append(
            f"{printable(view.study_uid)}  {view.state}  patient {printable(view.patient_id) or '-'}  "
            f"accession {printable(view.accession_number) or '-'}  {view.instances} instances"
        )
        if view.reason:
            lines.append(f"    {printable(view.reason)}")
        if view.purged:
            lines.append(f"    {', '.join(view.purged)} (retention)")
        if not view.jobs and view.state == "done":
            lines.append("    no pipeline matched")
        for job in view.jobs:
            reason = f": {printable(job.reason)}" if job.reason else ""
            lines.append(f"    job {job.id} {job.pipeline} {job.state} (attempts {job.attempts}){reason}")
            lines.extend(f"        {printable(result)}" for result in job.results)
    return "\n".join(lines)
