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
from .rules import Selection, SeriesFacts, select_series, series_facts, why_not_selected

log = logging.getLogger(__name__)


def study_series(engine: Engine, study_uid: str) -> list[SeriesFacts]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(db.instances.c.series_uid, db.instances.c.path).where(db.instances.c.study_uid == study_uid)
        ).all()
    paths: dict[str, list[Path]] = defaultdict(list)
    for series_uid, path in rows:
        paths[series_uid].append(Path(path))
    return [series_facts(uid, series_paths) for uid, series_paths in sorted(paths.items())]


def selections(config: Config, engine: Engine, study_uid: str) -> dict[str, Selection]:
    """Per pipeline name, the series it takes in this study and why."""
    candidates = study_series(engine, study_uid)
    return {pipeline.name: select_series(pipeline, candidates) for pipeline in config.pipelines}


def job_priority(config: Config, pipeline_name: str, series: SeriesFacts) -> int:
    """The pipeline's priority, raised by the strongest ``[[priorities]]`` rule the series meets."""
    boosts = [rule.priority for rule in config.priorities if why_not_selected(rule.match, series.header) is None]
    return config.pipeline(pipeline_name).priority + max(boosts, default=0)


def complete_quiet_studies(config: Config, engine: Engine) -> int:
    """Mark every quiet study complete and queue its jobs; returns how many were completed."""
    cutoff = db.now() - config.node.stable_after
    with engine.connect() as connection:
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
                if selection.chosen is not None:
                    priority = job_priority(config, pipeline_name, selection.chosen)
                    jobs.enqueue(connection, study_uid, selection.chosen.series_uid, pipeline_name, priority)
                    queued.append(f"{pipeline_name} on {selection.chosen.label} (priority {priority})")
            message = "complete; queued " + "; ".join(queued) if queued else "complete; no pipeline matched"
            db.log_event(connection, study_uid, "info", message)
            log.info("study %s %s", study_uid, message)
        completed += 1
    return completed
