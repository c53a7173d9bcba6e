"""Retention: what a finished study leaves behind goes once the policy's time is up, or sooner,
oldest study first, when the disk runs short.

Only a *finished* study is ever purged: nothing receiving, queued or running for it, and every
result delivered. A pending or dead-lettered delivery keeps the whole study, as its results
still have somewhere to go (`dicom-node retry` sends them again).

Three things go, each on its own clock after the study finished (`[retention]`): the received
instances, the results the node made, and finally the rows (study, series, jobs, results,
deliveries, events). Files go before the rows that name them, so that a crash in between
leaves rows naming missing files (the next pass finishes the purge) and never files that no
row names: after a reboot those would be indexed again as if just received (`recovery`).

A late instance may arrive for a study while it is purged, with the path of a purged file (a
PACS sending the study again). Its file is spared for being newer than the row that named the
path (`REWRITTEN_AFTER_SECONDS`), and its row for being newer than the plan; the index then
starts the study anew (`ingest.index`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy import Connection, Engine, delete, func, select, update

from dicom_node.config import DAY_SECONDS, Config
from dicom_node.printable import printable
from dicom_node.state import db, files

log = logging.getLogger(__name__)

# A file written this long after its row was recorded is a late instance's (the same path,
# written again), not the one the row names: a file is written just before its row...
REWRITTEN_AFTER_SECONDS = 1.0
# ...if it was written in the last minutes. A file server whose clock runs ahead of the node's
# would otherwise make every file look rewritten, and retention keep them all.
RECENT_SECONDS = 600.0
Part = Literal["instances", "results", "records"]
FOLDERS = {"instances": ("studies",), "results": ("results",), "records": ("studies", "results")}  # under data_dir


@dataclass(frozen=True)
class FinishedStudy:
    study_uid: str
    finished_at: float  # when the last of it ended: completion, a job, a delivery
    instances_purged: bool
    results_purged: bool
    instance_bytes: int


@dataclass(frozen=True)
class Purge:
    """One part of one study to remove, and why, in words for the events and `purge --dry-run`."""

    study_uid: str
    part: Part
    why: str
    finished_at: float
    for_space: bool = False  # below the high-water mark, not at its time: skipped once there is room


@dataclass(frozen=True)
class Purged:
    purge: Purge
    files: int
    megabytes: float


def finished_studies(connection: Connection, only: str | None = None) -> list[FinishedStudy]:
    """Every finished study (or ``only`` that one, if it is), the longest finished first, in a
    few grouped queries."""
    jobs, results, deliveries, studies = db.jobs, db.results, db.deliveries, db.studies

    def of_study(query, column):
        return query if only is None else query.where(column == only)

    busy = of_study(select(jobs.c.study_uid).where(jobs.c.state.in_(("queued", "running"))), jobs.c.study_uid)
    undelivered = of_study(select(jobs.c.study_uid).join(results, results.c.job_id == jobs.c.id)
                           .join(deliveries, deliveries.c.result_id == results.c.id)
                           .where(deliveries.c.state.in_(("pending", "dead"))), jobs.c.study_uid)
    job_end = of_study(select(jobs.c.study_uid, func.max(jobs.c.finished_at).label("at")),
                       jobs.c.study_uid).group_by(jobs.c.study_uid).subquery()
    sent = of_study(select(jobs.c.study_uid, func.max(deliveries.c.sent_at).label("at"))
                    .join(results, results.c.job_id == jobs.c.id)
                    .join(deliveries, deliveries.c.result_id == results.c.id),
                    jobs.c.study_uid).group_by(jobs.c.study_uid).subquery()
    sizes = of_study(select(db.instances.c.study_uid, func.sum(db.instances.c.size).label("bytes")),
                     db.instances.c.study_uid).group_by(db.instances.c.study_uid).subquery()
    query = of_study(
        select(studies.c.study_uid, studies.c.last_received_at, studies.c.completed_at, job_end.c.at, sent.c.at,
               studies.c.instances_purged_at, studies.c.results_purged_at, sizes.c.bytes)
        .outerjoin(job_end, job_end.c.study_uid == studies.c.study_uid)
        .outerjoin(sent, sent.c.study_uid == studies.c.study_uid)
        .outerjoin(sizes, sizes.c.study_uid == studies.c.study_uid)
        .where(studies.c.state != "receiving", studies.c.study_uid.not_in(busy),
               studies.c.study_uid.not_in(undelivered)),
        studies.c.study_uid,
    )
    finished = [
        FinishedStudy(uid, max(t for t in (received, completed, job_at, sent_at) if t is not None),
                      instances_at is not None, results_at is not None, int(size or 0))
        for uid, received, completed, job_at, sent_at, instances_at, results_at, size in connection.execute(query)
    ]
    return sorted(finished, key=lambda study: study.finished_at)


def _days(seconds: float) -> str:
    days = seconds / DAY_SECONDS
    return f"{days:g} day{'' if days == 1 else 's'}"


def plan(config: Config, connection: Connection, now: float, free_mb: float) -> list[Purge]:
    """What the policy removes now: the parts past their time, then, while free space is below
    the mark, the files of the longest finished studies (their size counted as freed)."""
    policy = config.retention
    keep = {part: policy.seconds(getattr(policy, f"{part}_days")) for part in ("instances", "results", "records")}
    purges: list[Purge] = []
    with_files: list[FinishedStudy] = []
    for study in finished_studies(connection):
        age = now - study.finished_at
        if age >= keep["records"]:
            purges.append(Purge(study.study_uid, "records", f"kept {_days(keep['records'])} after it finished",
                                study.finished_at))
            continue
        for part, purged in (("instances", study.instances_purged), ("results", study.results_purged)):
            if not purged and age >= keep[part]:
                purges.append(Purge(study.study_uid, part, f"kept {_days(keep[part])} after it finished",
                                    study.finished_at))
        with_files.append(study)
    mark = config.purge_below_free_mb
    if not mark or free_mb >= mark:
        return purges
    why = f"free space {free_mb:.0f} MB, below purge_below_free_mb = {mark:g}"
    planned = {(purge.study_uid, purge.part) for purge in purges}
    for study in with_files:
        for part, purged in (("instances", study.instances_purged), ("results", study.results_purged)):
            if free_mb >= mark:
                return purges
            if not purged and (study.study_uid, part) not in planned:
                purges.append(Purge(study.study_uid, part, why, study.finished_at, for_space=True))
                freed = study.instance_bytes if part == "instances" else _bytes(_result_paths(connection,
                                                                                              study.study_uid))
                free_mb += freed / 1e6
    return purges


def apply(config: Config, engine: Engine, purge: Purge, planned_at: float) -> Purged | None:
    """Carry out one purge made at ``planned_at``; None when the study is no longer finished
    (a late instance, a rerun), and so is left whole, or when another node sharing the database
    purged it at the same moment."""
    with db.reading(engine) as connection:
        if not finished_studies(connection, only=purge.study_uid):
            return None
        instances = _instance_files(connection, purge.study_uid, planned_at) if purge.part != "results" else []
        results = _result_paths(connection, purge.study_uid, planned_at) if purge.part != "instances" else []
    data_dir = config.node.data_dir
    removed, freed = 0, 0
    # Results are never written again: each has UIDs, and so a path, of its own.
    for path, recorded_at in instances + [(path, float("inf")) for path in results]:
        size = _remove_unless_rewritten(path, recorded_at + REWRITTEN_AFTER_SECONDS, planned_at - RECENT_SECONDS)
        if size is not None:
            removed, freed = removed + 1, freed + size
    for root in FOLDERS[purge.part]:
        _remove_empty_folders(data_dir / root / purge.study_uid)
    megabytes = freed / 1e6
    with engine.begin() as connection:  # recorded once, by the node whose purge got here first
        if purge.part == "records":
            if not _delete_records(connection, purge.study_uid):
                return None
            db.log_event(connection, None, "info", f"records of study {printable(purge.study_uid)} purged "
                                                   f"({removed} files, {megabytes:.1f} MB): {purge.why}")
        else:
            column = db.studies.c[f"{purge.part}_purged_at"]
            if not connection.execute(update(db.studies).where(db.studies.c.study_uid == purge.study_uid,
                                                               column.is_(None))
                                      .values({column.name: db.now()})).rowcount:
                return None
            if purge.part == "instances":
                connection.execute(delete(db.instances).where(db.instances.c.study_uid == purge.study_uid,
                                                              db.instances.c.received_at <= planned_at))
            what = "received instances" if purge.part == "instances" else "result files"
            if removed:  # a study no pipeline took has no results: nothing to say
                db.log_event(connection, purge.study_uid, "info",
                             f"{removed} {what} purged ({megabytes:.1f} MB): {purge.why}")
    files.mark_purged(data_dir)
    log.info("study %s: %s purged, %d files, %.1f MB: %s", purge.study_uid, purge.part, removed, megabytes, purge.why)
    return Purged(purge, removed, megabytes)


def run(config: Config, engine: Engine, dry_run: bool = False) -> list[Purged | Purge]:
    """Apply the policy once: each purge done (`Purged`), or with ``dry_run`` only planned
    (`Purge`). Free space is looked at again after each study, so that the high-water mark
    removes no more than it must."""
    data_dir = config.node.data_dir
    planned_at = db.now()
    with db.reading(engine) as connection:
        purges = plan(config, connection, planned_at, files.free_mb(data_dir))
    if dry_run:
        return list(purges)
    done: list[Purged | Purge] = []
    mark = config.purge_below_free_mb
    for purge in purges:
        if purge.for_space and files.free_mb(data_dir) >= mark:
            continue  # what was purged before it freed enough
        outcome = apply(config, engine, purge, planned_at)
        if outcome is not None:
            done.append(outcome)
    return done


def _instance_files(connection: Connection, study_uid: str, before: float) -> list[tuple[Path, float]]:
    """(path, when its row was recorded) of the study's instances received before ``before``."""
    return [(Path(path), received_at) for path, received_at in connection.execute(
        select(db.instances.c.path, db.instances.c.received_at).where(db.instances.c.study_uid == study_uid,
                                                                      db.instances.c.received_at <= before))]


def _result_paths(connection: Connection, study_uid: str, before: float | None = None) -> list[Path]:
    query = (select(db.results.c.path).join(db.jobs, db.jobs.c.id == db.results.c.job_id)
             .where(db.jobs.c.study_uid == study_uid))
    if before is not None:
        query = query.where(db.results.c.created_at <= before)
    return [Path(path) for path in connection.execute(query).scalars()]


def _bytes(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total


def _remove_unless_rewritten(path: Path, written_by: float, recent: float) -> int | None:
    """Remove ``path`` unless it was written after ``written_by`` and after ``recent``; its
    size, or None when it was already gone or is a late instance's."""
    try:
        state = path.stat()
        if state.st_mtime > max(written_by, recent):
            log.info("%s was written during its study's purge: kept, as a late instance's", path)
            return None
        path.unlink()
    except FileNotFoundError:
        return None
    return state.st_size


def _remove_empty_folders(top: Path) -> None:
    """The study's folder and its series folders, those left empty; a late instance's stay."""
    if not top.is_dir():
        return
    for folder, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _delete_records(connection: Connection, study_uid: str) -> bool:
    """Every row of the study, those that point at others first; False if it had none left."""
    job_ids = select(db.jobs.c.id).where(db.jobs.c.study_uid == study_uid)
    result_ids = select(db.results.c.id).where(db.results.c.job_id.in_(job_ids))
    connection.execute(delete(db.deliveries).where(db.deliveries.c.result_id.in_(result_ids)))
    connection.execute(update(db.results).where(db.results.c.job_id.in_(job_ids)).values(supersedes=None))
    connection.execute(delete(db.results).where(db.results.c.job_id.in_(job_ids)))
    connection.execute(delete(db.jobs).where(db.jobs.c.study_uid == study_uid))
    connection.execute(delete(db.instances).where(db.instances.c.study_uid == study_uid))
    connection.execute(delete(db.series).where(db.series.c.study_uid == study_uid))
    connection.execute(delete(db.events).where(db.events.c.study_uid == study_uid))
    connection.execute(delete(db.webhook_posts).where(db.webhook_posts.c.study_uid == study_uid))
    return bool(connection.execute(delete(db.studies).where(db.studies.c.study_uid == study_uid)).rowcount)


FREE_SPACE_LOOK_SECONDS = 2.0  # how often `serve` looks at free space between the policy's rounds


class Schedule:
    """When `serve` applies the policy: every ``check_every_seconds``, and within
    `FREE_SPACE_LOOK_SECONDS` of free space falling below the mark, so that purging starts
    before storing stops at ``min_free_disk_mb``."""

    def __init__(self, config: Config, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self._due = 0.0
        self._warned = 0.0

    def step(self) -> None:
        now = time.monotonic()
        mark = self.config.purge_below_free_mb
        short = bool(mark) and files.free_mb(self.config.node.data_dir) < mark
        if now < self._due and not short:
            return
        every = self.config.retention.check_every_seconds
        self._due = now + every
        done = run(self.config, self.engine)
        if short and not done and now >= self._warned:
            self._warned = now + every
            log.warning("free space under %s is below purge_below_free_mb = %g and no finished study is left to "
                        "purge: studies still being processed or with undelivered results are kept",
                        self.config.node.data_dir, mark)


def describe(outcome: Purged | Purge) -> str:
    """One line of `dicom-node purge`: what went (or would go, with --dry-run) and why."""
    purge = outcome.purge if isinstance(outcome, Purged) else outcome
    finished = time.strftime("%Y-%m-%d %H:%M", time.localtime(purge.finished_at))
    line = f"study {printable(purge.study_uid)} (finished {finished}): {purge.part}"
    if isinstance(outcome, Purged):
        return f"{line} purged, {outcome.files} files, {outcome.megabytes:.1f} MB: {purge.why}"
    return f"{line} would be purged: {purge.why}"
