"""The inference worker: claims jobs, builds the volume, runs the bundle, encodes results.

Workers are separate processes so that a long model run never stalls the receiving process,
and so that several can run side by side (or on other hosts). Each keeps its bundles loaded
between jobs. A job's results are written to disk first; then, in one transaction, the result
rows, their deliveries and the job's ``done`` state are committed together.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
from io import BytesIO
from pathlib import Path

from sqlalchemy import Engine, select

from . import db, jobs, store
from .config import Config, Pipeline
from .inference import Bundle, BundleError, choose_device
from .results.equipment import Equipment
from .results.seg import build_seg, present_segments
from .results.sr import build_sr
from .volume import GeometryError, load_volume

log = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 0.5


class JobFailure(Exception):
    """A job that cannot succeed on retry: the message is the operator-facing reason."""


class ShutdownRequested(BaseException):
    """Raised in the worker's main thread by SIGTERM; not an Exception, so no job handler eats it."""


# Failures that no retry can change: the series or the bundle is the problem, not the moment.
PERMANENT_FAILURES = (JobFailure, GeometryError, BundleError)


class Worker:
    def __init__(self, config: Config, engine: Engine, name: str | None = None) -> None:
        self.config = config
        self.engine = engine
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.bundles: dict[str, Bundle] = {}
        self.equipment = Equipment(config.node.ae_title)

    def bundle(self, pipeline: Pipeline) -> Bundle:
        """Load once, run many: the bundle stays warm for the next job of this pipeline."""
        if pipeline.name not in self.bundles:
            self.bundles[pipeline.name] = Bundle(pipeline.model, choose_device(pipeline.device))
        return self.bundles[pipeline.name]

    def run_once(self) -> bool:
        """Claim and run one job; False when there was nothing to do."""
        # SIGTERM waits while a job is being claimed: arriving between the claim's commit and the
        # `try` below, it would leave a running job that nobody releases.
        job = None
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            job = jobs.claim(
                self.engine, self.name, {p.name for p in self.config.pipelines}, self.config.node.max_attempts
            )
        finally:
            if job is None:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        if job is None:
            return False
        stop_renewing = threading.Event()
        renewer = threading.Thread(target=self._renew_lease, args=(job["id"], stop_renewing), daemon=True)
        renewer.start()
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a pending SIGTERM lands here
            self._run(job)
        except ShutdownRequested:
            jobs.release(self.engine, job["id"], self.name)
            raise
        except PERMANENT_FAILURES as error:
            self._fail(job, str(error), permanent=True)
        except Exception as error:  # noqa: BLE001 - a job's crash must never take the worker down
            log.error("job %s crashed:\n%s", job["id"], traceback.format_exc())
            self._fail(job, f"{type(error).__name__}: {error}", permanent=False)
        finally:
            stop_renewing.set()
            renewer.join()
        return True

    def _renew_lease(self, job_id: int, stop: threading.Event) -> None:
        while not stop.wait(jobs.LEASE_SECONDS / 4):
            jobs.renew(self.engine, job_id, self.name)

    def _fail(self, job, reason: str, permanent: bool) -> None:
        log.warning("job %s failed: %s", job["id"], reason)
        with self.engine.begin() as connection:
            if permanent:
                jobs.finish(connection, job["id"], job["study_uid"], "failed", reason)
            else:
                jobs.retry_or_fail(
                    connection, job["id"], job["study_uid"], job["attempts"], self.config.node.max_attempts, reason
                )

    def _series_paths(self, series_uid: str) -> list[Path]:
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(db.instances.c.path).where(db.instances.c.series_uid == series_uid)
            ).all()
        return [Path(path) for (path,) in rows]

    def _run(self, job) -> None:
        pipeline = self.config.pipeline(job["pipeline"])
        volume = load_volume(self._series_paths(job["series_uid"]))
        bundle = self.bundle(pipeline)
        labels = bundle.predict(volume)
        segments = present_segments(labels, bundle.info)
        if not segments:
            raise JobFailure("the model found none of its labels in this series; no SEG to send")
        description = f"{pipeline.name}: {bundle.info.name} {bundle.info.version}"
        seg = build_seg(
            volume, labels, segments, bundle.info, self.equipment, pipeline.series_number, f"SEG {description}"
        )
        sr = build_sr(
            volume, seg, segments, bundle.info, self.equipment, pipeline.series_number + 1, f"SR {description}"
        )
        written = []
        for kind, dataset in (("SEG", seg), ("SR", sr)):
            path = store.result_path(
                self.config.node.data_dir, job["study_uid"], dataset.SeriesInstanceUID, dataset.SOPInstanceUID
            )
            buffer = BytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
            store.write_durably(path, buffer.getvalue())
            written.append((kind, dataset, path))
        with self.engine.begin() as connection:
            for kind, dataset, path in written:
                result_id = connection.execute(
                    db.results.insert().values(
                        job_id=job["id"],
                        kind=kind,
                        sop_instance_uid=dataset.SOPInstanceUID,
                        series_uid=dataset.SeriesInstanceUID,
                        path=str(path),
                        created_at=db.now(),
                    )
                ).inserted_primary_key[0]
                for destination in pipeline.destinations:
                    connection.execute(
                        db.deliveries.insert().values(
                            result_id=result_id, destination=destination, state="pending", attempts=0, not_before=0.0
                        )
                    )
            volumes = ", ".join(f"{s.name} {s.voxel_count} voxels" for s in segments)
            jobs.finish(connection, job["id"], job["study_uid"], "done", None)
            db.log_event(connection, job["study_uid"], "info", f"results of job {job['id']}: {volumes}")

    def run_forever(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set or SIGTERM arrives; a job in progress at SIGTERM is released."""
        signal.signal(signal.SIGTERM, _raise_shutdown)
        log.info("worker %s ready", self.name)
        try:
            while not stop.is_set():
                if not self.run_once():
                    stop.wait(IDLE_POLL_SECONDS)
        except ShutdownRequested:
            log.info("worker %s stopping at SIGTERM", self.name)


def _raise_shutdown(_signum, _frame) -> None:
    raise ShutdownRequested()
