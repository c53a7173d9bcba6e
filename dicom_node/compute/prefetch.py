"""Volumes an idle worker builds ahead of their jobs, while their study is still quiet.

Building the volume (every header, then every image) is the first second of a job, and it can
start before the job exists: once a study has been quiet for a quarter of ``stable_after`` it has
most likely stopped arriving, and the series the pipelines will take are known from the same
rules completion applies. An idle worker reads those series then, keeping each volume with the
size and modification time of every file it came from. The job takes the volume only if its
series' files are exactly those; otherwise it reads them as it would have anyway. A volume is
kept until its job takes it or ``KEEP_SECONDS`` pass, so an idle worker holds at most the
volumes of the studies completing now.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy import Engine

from dicom_node.compute.volume import Volume, load_volume
from dicom_node.config import Config
from dicom_node.state.completion import ReadAhead, file_states, quieting_studies, study_stacks
from dicom_node.state.rules import select_series

log = logging.getLogger(__name__)

KEEP_SECONDS = 120.0


class VolumePrefetch:
    def __init__(self, config: Config, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self._read_ahead = ReadAhead()
        # (series UID, stack): (files it was read from, volume, when it was built)
        self._volumes: dict[tuple[str, str], tuple[tuple, Volume, float]] = {}

    def build_ahead(self) -> None:
        """Build the volumes the pipelines would take from the studies quiet for a quarter of
        ``stable_after`` (between jobs only: a job waits at most for the volume in progress)."""
        now = time.monotonic()
        for key in [key for key, (_, _, built) in self._volumes.items() if now - built > KEEP_SECONDS]:
            del self._volumes[key]
        quieting = quieting_studies(self.engine, self.config)
        kept = set()
        for study_uid, _ in quieting:
            candidates = study_stacks(self.engine, study_uid, self._read_ahead.series_stacks)
            kept.update(stack.series_uid for stack in candidates)
            for pipeline in self.config.pipelines:
                for stack in select_series(pipeline, candidates).chosen:
                    self._build(stack.series_uid, stack.stack, stack.frames)
        self._read_ahead.retain(kept)

    def _build(self, series_uid: str, stack: str, frames) -> None:
        files = self._read_ahead.files_of(series_uid)
        known = self._volumes.get((series_uid, stack))
        if files is None or (known is not None and known[0] == files):
            return
        try:
            volume = load_volume(frames)
        except Exception as error:  # noqa: BLE001 - the job will meet the same problem and report it
            log.debug("no volume ahead for series %s stack %r: %s", series_uid, stack, error)
            return
        self._volumes[(series_uid, stack)] = (files, volume, time.monotonic())

    def take(self, series_uid: str, stack: str, paths: list[Path]) -> Volume | None:
        """The volume built ahead for this stack, if its series is still exactly the files it
        was built from; it is given away, never shared between two jobs."""
        known = self._volumes.pop((series_uid, stack), None)
        if known is None or known[0] != file_states(paths):
            return None
        return known[1]
