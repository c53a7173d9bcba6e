"""What a job's new results replace: the earlier SEG and SR of the same series, stack and
pipeline, and where those were sent, so that the archives that received them are told
(`results.rejection`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom import Dataset
from sqlalchemy import Engine, select

from dicom_node.config import Config
from dicom_node.state import db


@dataclass(frozen=True)
class Superseded:
    """The newest earlier SEG and SR (rows of ``results``) by kind, and the destinations they
    were addressed to, whatever became of those deliveries: a pending one still goes out, and a
    dead-lettered one may go after `dicom-node retry`, so each of them is told of the rejection."""

    results: dict = field(default_factory=dict)  # kind -> row (id, kind, sop_instance_uid, path)
    destinations: frozenset[str] = frozenset()

    def rejection_destinations(self, config: Config) -> list[str]:
        """Those of the destinations still configured that take rejection notes."""
        configured = {destination.name: destination for destination in config.destinations}
        return sorted(name for name in self.destinations
                      if name in configured and configured[name].rejection_notes)

    def headers(self) -> list[Dataset] | None:
        """The superseded results as stored, without their pixels; None if a file is gone
        (retention removed it), as a note must name each instance exactly as it was sent."""
        paths = [Path(row.path) for _, row in sorted(self.results.items())]
        if not all(path.exists() for path in paths):
            return None
        return [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]


def find_superseded(engine: Engine, job) -> Superseded:
    """Outline images are left out: a set of pictures has no counterpart image by image, and
    they are not rejected either."""
    with db.reading(engine) as connection:
        rows = connection.execute(
            select(db.results.c.id, db.results.c.kind, db.results.c.sop_instance_uid, db.results.c.path)
            .join(db.jobs, db.jobs.c.id == db.results.c.job_id)
            .where(
                db.jobs.c.study_uid == job["study_uid"],
                db.jobs.c.series_uid == job["series_uid"],
                db.jobs.c.stack == job["stack"],
                db.jobs.c.pipeline == job["pipeline"],
                db.results.c.kind.in_(("SEG", "SR")),
            )
            .order_by(db.results.c.id)
        ).all()
        newest = {row.kind: row for row in rows}  # later rows overwrite earlier ones
        destinations = connection.execute(
            select(db.deliveries.c.destination).distinct()
            .where(db.deliveries.c.result_id.in_([row.id for row in newest.values()]))
        ).scalars().all()
    return Superseded(newest, frozenset(destinations))
