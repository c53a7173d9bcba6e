"""Completion: a study is complete once no instance has arrived for ``stable_after`` seconds.

DICOM has no "end of study" message, so quiet time is the signal. On completion the study's
series are matched against every pipeline and one job is queued per chosen series, in the same
transaction that marks the study complete: a crash cannot leave a complete study without jobs.

Matching reads every header of the study (0.4 s for a 300-image CT). That reading starts when a
study has been quiet for a quarter of ``stable_after`` (`READ_AHEAD_FRACTION`), so that completing it only reads again the
series whose files changed since: the quiet period is mostly idle time anyway.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, select, update

from dicom_node.config import Config
from dicom_node.printable import printable
from dicom_node.state import db, jobs, pipeline_checks
from dicom_node.state.rules import StackFacts, select_series, series_stacks, why_block_fails

log = logging.getLogger(__name__)

# A study quiet for this fraction of stable_after has its series read ahead of completion.
READ_AHEAD_FRACTION = 0.25

SeriesReader = Callable[[str, list[Path]], list[StackFacts]]


def file_states(paths: list[Path]) -> tuple[tuple[str, int, int], ...]:
    """What tells that a series' files changed: which they are, each one's size and
    modification time (a file written again has a new one)."""
    states = []
    for path in sorted(map(str, paths)):
        state = os.stat(path)
        states.append((path, state.st_size, state.st_mtime_ns))
    return tuple(states)


class ReadAhead:
    """Stacks of the series of studies that are quiet but not yet complete, each kept with the
    size and modification time of every file it was read from, and read again when one differs
    or the series gained or lost a file. Only the series of studies still in the read-ahead
    window are kept (``retain``), so a study that completes, or receives again, is let go."""

    def __init__(self) -> None:
        self._read: dict[str, tuple[tuple, list[StackFacts]]] = {}

    def series_stacks(self, series_uid: str, paths: list[Path]) -> list[StackFacts]:
        files = file_states(paths)
        known = self._read.get(series_uid)
        if known is not None and known[0] == files:
            return known[1]
        stacks = series_stacks(series_uid, paths)
        self._read[series_uid] = (files, stacks)
        return stacks

    def files_of(self, series_uid: str) -> tuple | None:
        """The files the series' stacks were last read from (see `file_states`)."""
        known = self._read.get(series_uid)
        return None if known is None else known[0]

    def retain(self, series_uids: set[str]) -> None:
        for series_uid in self._read.keys() - series_uids:
            del self._read[series_uid]


def study_stacks(engine: Engine, study_uid: str, read: SeriesReader = series_stacks) -> list[StackFacts]:
    with db.reading(engine) as connection:
        rows = connection.execute(
            select(db.instances.c.series_uid, db.instances.c.path)
            .where(db.instances.c.study_uid == study_uid)
            .order_by(db.instances.c.path)
        ).all()
    paths: dict[str, list[Path]] = defaultdict(list)
    for series_uid, path in rows:
        paths[series_uid].append(Path(path))
    return [stack for uid, series_paths in sorted(paths.items()) for stack in read(uid, series_paths)]


def explain(config: Config, engine: Engine, study_uid: str) -> str:
    """`dicom-node explain`: series by series, why each pipeline takes it or not."""
    candidates = study_stacks(engine, study_uid)
    if not candidates:
        return f"no instances of study {printable(study_uid)} are stored"
    with db.reading(engine) as connection:
        disabled = pipeline_checks.disabled(connection)
    return "\n".join([f"study {printable(study_uid)}", *explain_stacks(config, candidates, disabled)])


def explain_stacks(config: Config, candidates: list[StackFacts], disabled: dict[str, str]) -> list[str]:
    """Per pipeline, each stack and why the pipeline takes it or not: `explain`'s lines, and the
    dashboard's rule tester's, which reads uploaded files instead of a stored study. A disabled
    pipeline (``disabled``: name -> why) is said to be so: what it would take fails at once."""
    lines = []
    for pipeline in config.pipelines:
        selection = select_series(pipeline, candidates)
        lines.append(f"pipeline {pipeline.name} (take {pipeline.take}, prefer {pipeline.prefer})")
        if pipeline.name in disabled:
            lines.append(f"  DISABLED: {printable(disabled[pipeline.name])}")
        lines.extend(f"  {printable(facts.label)}: {printable(selection.reasons[facts.key])}" for facts in candidates)
    return lines


def job_priority(config: Config, pipeline_name: str, stack: StackFacts) -> int:
    """The pipeline's priority, raised by the strongest ``[[priorities]]`` rule the stack meets."""
    boosts = [rule.priority for rule in config.priorities if why_block_fails(rule.match, stack) is None]
    return config.pipeline(pipeline_name).priority + max(boosts, default=0)


def quieting_studies(engine: Engine, config: Config) -> list[tuple[str, float]]:
    """(study UID, last received at) of the studies still receiving that have been quiet for
    READ_AHEAD_FRACTION of ``stable_after`` or longer: those worth reading ahead."""
    with db.reading(engine) as connection:
        return [tuple(row) for row in connection.execute(
            select(db.studies.c.study_uid, db.studies.c.last_received_at).where(
                db.studies.c.state == "receiving",
                db.studies.c.last_received_at <= db.now() - config.node.stable_after * READ_AHEAD_FRACTION,
            )
        )]


@dataclass(frozen=True)
class CompletionRound:
    completed: int  # studies marked complete, their jobs queued
    next_due: float | None  # when the next study read ahead will have been quiet long enough


def complete_quiet_studies(config: Config, engine: Engine, read_ahead: ReadAhead) -> CompletionRound:
    """Mark every quiet study complete and queue its jobs. Studies quiet for part of the period
    have their series read ahead (see the module's note); the earliest of them to come due is
    returned, so that the caller can look again right then rather than up to a tick later."""
    cutoff = db.now() - config.node.stable_after
    completed, still_quieting, next_due = 0, set(), None
    for study_uid, last_received_at in quieting_studies(engine, config):
        try:
            candidates = study_stacks(engine, study_uid, read_ahead.series_stacks)
            if last_received_at > cutoff:  # read ahead only: not quiet long enough yet
                still_quieting.update(stack.series_uid for stack in candidates)
                due = last_received_at + config.node.stable_after
                next_due = due if next_due is None else min(next_due, due)
                continue
            completed += _complete(config, engine, study_uid, last_received_at, candidates)
        except Exception as error:
            if last_received_at > cutoff:
                continue  # read ahead only: tried again, and failed for good, once the study is quiet
            log.exception("study %s cannot be completed", study_uid)
            _fail_study(engine, study_uid, last_received_at, f"its series cannot be read or matched ({error})")
    read_ahead.retain(still_quieting)
    return CompletionRound(completed, next_due)


def _complete(config: Config, engine: Engine, study_uid: str, last_received_at: float,
              candidates: list[StackFacts]) -> int:
    """Mark the study complete and queue its jobs (1), unless something arrived meanwhile (0).
    A stack that a pipeline takes but that cannot be a volume gets a job failed at once, with
    the reason (`Selection.failed`)."""
    chosen = {pipeline.name: select_series(pipeline, candidates) for pipeline in config.pipelines}
    with engine.begin() as connection:
        if not _mark(connection, study_uid, last_received_at, state="complete"):
            return 0
        queued = []
        disabled = pipeline_checks.disabled(connection)
        for pipeline_name, selection in chosen.items():
            if pipeline_name in disabled:  # its jobs, failed at once: shown, and retried once it is fixed
                reason = pipeline_checks.disabled_reason(pipeline_name, disabled[pipeline_name])
                for stack in selection.chosen:
                    jobs.enqueue(connection, study_uid, stack.series_uid, stack.stack, pipeline_name, state="failed",
                                 reason=reason)
                    queued.append(f"{pipeline_name} on {stack.label}, failed at once: {reason}")
                continue
            for stack in selection.chosen:
                priority = job_priority(config, pipeline_name, stack)
                jobs.enqueue(connection, study_uid, stack.series_uid, stack.stack, pipeline_name, priority)
                queued.append(f"{pipeline_name} on {stack.label} (priority {priority})")
            for stack in selection.failed:
                reason = f"cannot be a volume: {stack.problem}"
                jobs.enqueue(connection, study_uid, stack.series_uid, stack.stack, pipeline_name, state="failed",
                             reason=reason)
                queued.append(f"{pipeline_name} on {stack.label}, failed at once: {reason}")
        message = "complete; queued " + "; ".join(queued) if queued else "complete; no pipeline matched"
        db.log_event(connection, study_uid, "info", message)
        log.info("study %s %s", study_uid, message)
    return 1


def _mark(connection, study_uid: str, last_received_at: float, **values) -> bool:
    """Change the study's row if it is still receiving and nothing new arrived meanwhile."""
    return bool(connection.execute(
        update(db.studies)
        .where(
            db.studies.c.study_uid == study_uid,
            db.studies.c.state == "receiving",
            db.studies.c.last_received_at == last_received_at,
        )
        .values(completed_at=db.now(), **values)
    ).rowcount)


def _fail_study(engine: Engine, study_uid: str, last_received_at: float, reason: str) -> None:
    """The study is ``failed`` with ``reason``: left alone by completion until an instance
    re-opens it or an operator retries it."""
    with engine.begin() as connection:
        if _mark(connection, study_uid, last_received_at, state="failed", reason=reason):
            db.log_event(connection, study_uid, "error", f"failed: {reason}")
