"""Completion: a study is complete once no instance has arrived for ``stable_after`` seconds.

DICOM has no "end of study" message, so quiet time is the signal. On completion the study's
series are matched against every pipeline and one job is queued per chosen series, in the same
transaction that marks the study complete: a crash cannot leave a complete study without jobs.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from sqlalchemy import Engine, select, update

from . import db, jobs
from .config import Config
from .rules import Selection, StackFacts, select_series, series_stacks, why_block_fails

log = logging.getLogger(__name__)


def study_stacks(engine: Engine, study_uid: str) -> list[StackFacts]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(db.instances.c.series_uid, db.instances.c.path)
            .where(db.instances.c.study_uid == study_uid)
            .order_by(db.instances.c.path)
        ).all()
    paths: dict[str, list[Path]] = defaultdict(list)
    for series_uid, path in rows:
        paths[series_uid].append(Path(path))
    return [stack for uid, series_paths in sorted(paths.items()) for stack in series_stacks(uid, series_paths)]


def selections(config: Config, engine: Engine, study_uid: str) -> dict[str, Selection]:
    """Per pipeline name, the series it takes in this study and why."""
    candidates = study_stacks(engine, study_uid)
    return {pipeline.name: select_series(pipeline, candidates) for pipeline in config.pipelines}


def explain(config: Config, engine: Engine, study_uid: str) -> str:
    """`dicom-node explain`: series by series, why each pipeline takes it or not."""
    candidates = study_stacks(engine, study_uid)
    if not candidates:
        return f"no instances of study {study_uid} are stored"
    lines = [f"study {study_uid}"]
    for pipeline in config.pipelines:
        selection = select_series(pipeline, candidates)
        lines.append(f"pipeline {pipeline.name} (take {pipeline.take}, prefer {pipeline.prefer})")
        lines.extend(f"  {facts.label}: {selection.reasons[facts.key]}" for facts in candidates)
    return "\n".join(lines)


def job_priority(config: Config, pipeline_name: str, stack: StackFacts) -> int:
    """The pipeline's priority, raised by the strongest ``[[priorities]]`` rule the stack meets."""
    boosts = [rule.priority for rule in config.priorities if why_block_fails(rule.match, stack) is None]
    return config.pipeline(pipeline_name).priority + max(boosts, default=0)


def complete_quiet_studies(config: Config, engine: Engine) -> int:
    """Mark every quiet study complete and queue its jobs; returns how many were completed."""
    cutoff = db.now() - config.node.stable_after
    with db.reading(engine) as connection:
        quiet = connection.execute(
            select(db.studies.c.study_uid, db.studies.c.last_received_at).where(
                db.studies.c.state == "receiving", db.studies.c.last_received_at <= cutoff
            )
        ).all()
    completed = 0
    for study_uid, last_received_at in quiet:
        chosen = selections(config, engine, study_uid)
        with engine.begin() as connection:
            marked = connection.execute(
                update(db.studies)
                .where(
                    db.studies.c.study_uid == study_uid,
                    db.studies.c.state == "receiving",
                    db.studies.c.last_received_at == last_received_at,  # nothing new arrived meanwhile
                )
                .values(state="complete", completed_at=db.now())
            ).rowcount
            if not marked:
                continue
            queued = []
            for pipeline_name, selection in chosen.items():
                for stack in selection.chosen:
                    priority = job_priority(config, pipeline_name, stack)
                    jobs.enqueue(connection, study_uid, stack.series_uid, stack.stack, pipeline_name, priority)
                    queued.append(f"{pipeline_name} on {stack.label} (priority {priority})")
            message = "complete; queued " + "; ".join(queued) if queued else "complete; no pipeline matched"
            db.log_event(connection, study_uid, "info", message)
            log.info("study %s %s", study_uid, message)
        completed += 1
    return completed
