"""The inference worker: claims jobs, builds the volume, runs the bundle, encodes results.

Workers are separate processes so that a long model run never stalls the receiving process,
and so that several can run side by side (or on other hosts). Each loads its bundles at start
and keeps them loaded between jobs. A job's results are written to disk first; then, in one
transaction, the result rows, their deliveries and the job's ``done`` state are committed
together.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import torch
from sqlalchemy import Engine, select

from dicom_node import metrics
from dicom_node.compute.bundle import Bundle, BundleError, choose_device
from dicom_node.compute.bundle_diagnosis import check_loaded, diagnose, installed, layout_problems, made_with
from dicom_node.compute.frames import GeometryError, read_frames, split_stacks
from dicom_node.compute.job_memory import give_back_freed_memory, reuse_freed_memory
from dicom_node.compute.prefetch import VolumePrefetch
from dicom_node.compute.runtime.client import RuntimeBundle, RuntimeExited
from dicom_node.compute.runtime.prepare import runtime_for, runtimes_dir
from dicom_node.compute.superseded import Superseded, find_superseded
from dicom_node.compute.volume import Volume, load_volume
from dicom_node.config import Config, Pipeline
from dicom_node.doorbell import Bell, Ringer
from dicom_node.results import file_bytes, load_standard_tables
from dicom_node.results.codes import bundle_overrides
from dicom_node.results.equipment import Equipment
from dicom_node.results.outlines import build_outline_images
from dicom_node.results.rejection import build_rejection_note
from dicom_node.results.seg import Segment, build_seg, segments_of
from dicom_node.results.seg_frames import scan_labels
from dicom_node.results.sr import build_sr
from dicom_node.state import db, files, jobs, pipeline_checks

log = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 0.1  # an idle worker's look for a job: one indexed query


def _first_choice(pipeline: Pipeline) -> str:
    """Where a pipeline's bundle is tried first: "node" or "bundle" (runtime = "auto": the node)."""
    return "node" if pipeline.runtime == "auto" else pipeline.runtime


def _made_for_another_monai(bundle_dir: Path) -> bool:
    made = made_with(bundle_dir).get("monai")
    return made is not None and made != installed("monai")


class JobFailure(Exception):
    """A job that cannot succeed on retry: the message is the operator-facing reason."""


class ShutdownRequested(BaseException):
    """Raised in the worker's main thread by SIGTERM; not an Exception, so no job handler eats it."""


# Failures that no retry can change: the series or the bundle is the problem, not the moment.
PERMANENT_FAILURES = (JobFailure, GeometryError, BundleError, ValueError)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    give_back_freed_memory()


def classify_failure(error: Exception, timeout_seconds: float) -> tuple[str, bool]:
    """The operator-facing reason, and whether a retry could change it. MONAI wraps errors
    raised inside transforms (RuntimeError "applying transform ..."), so the whole chain of
    causes is looked at: a time limit hit during preprocessing is still a time limit."""
    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for cause in chain:
        if isinstance(cause, RuntimeExited):  # the moment's: a new runner may well succeed
            return str(cause)[:500], False
        if isinstance(cause, JobTimeout):
            return f"exceeded the time limit of {timeout_seconds:g} s (timeout_seconds)", True
        if isinstance(cause, (MemoryError, torch.OutOfMemoryError)):
            return f"ran out of memory ({type(cause).__name__}: {cause})"[:500], True
    if isinstance(error, PERMANENT_FAILURES):
        return str(error), True
    log.error("job crashed:\n%s", traceback.format_exc())
    return f"unexpected error ({type(error).__name__}: {error}); the details are in the worker's log", False


def _raise_timeout(_signum, _frame) -> None:
    raise JobTimeout()


class JobTimeout(Exception):
    """Raised by SIGALRM when a job outlives its pipeline's timeout_seconds."""


@dataclass(frozen=True)
class _Encoded:
    """A job's results as file bytes, with what their record says of them."""

    outputs: list[tuple[str, pydicom.Dataset, bytes]]  # (kind, dataset, file bytes)
    segments: list[Segment]
    unknown: list[str]  # labels sent with a generic code
    previous: Superseded  # the results these replace
    rejection_destinations: list[str]  # those told, by the rejection note among the outputs


class Worker:
    """Claims jobs and runs them. Within `serve`, ``jobs_queued`` ends its idle wait as soon as
    completion queues a job, and it rings each of ``results_recorded`` once a job's results are
    recorded (`doorbell`); without them (`dicom-node worker` on another host) it looks for jobs
    every IDLE_POLL_SECONDS."""

    def __init__(self, config: Config, engine: Engine, jobs_queued: Bell | None = None,
                 results_recorded: Sequence[Ringer] = (), name: str | None = None) -> None:
        self.config = config
        self.engine = engine
        self.jobs_queued = jobs_queued
        self.results_recorded = results_recorded
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.bundles: OrderedDict[str, Bundle | RuntimeBundle] = OrderedDict()  # least recently used first
        self.disabled: set[str] = set()  # pipelines whose bundle failed the check (`warm_up`)
        # Where each pipeline's bundle runs, "node" or "bundle": its `runtime`, or what `check`
        # chose for runtime = "auto".
        self.runs_in: dict[str, str] = {}
        self.equipment = Equipment(config.node.ae_title)
        self.prefetch = VolumePrefetch(config, engine)

    def bundle(self, pipeline: Pipeline, study_uid: str | None) -> Bundle | RuntimeBundle:
        """Load once, run many: a bundle stays warm for the next job of its pipeline, until the
        warm bundles together outgrow model_memory_mb and the least recently used goes."""
        if pipeline.name in self.bundles:
            self.bundles.move_to_end(pipeline.name)
            return self.bundles[pipeline.name]
        runs_in = self.runs_in.get(pipeline.name, _first_choice(pipeline))
        bundle: Bundle | RuntimeBundle
        if runs_in == "bundle":
            runtime = runtime_for(pipeline.model, runtimes_dir(self.config.node.data_dir))
            bundle = RuntimeBundle(pipeline.model, pipeline.device, runtime)
        else:
            bundle = Bundle(pipeline.model, choose_device(pipeline.device))
        self.bundles[pipeline.name] = bundle
        evicted = []
        while len(self.bundles) > 1 and self._loaded_mb() > self.config.node.model_memory_mb:
            name = next(iter(self.bundles))
            self._unload(name)
            evicted.append(name)
        _free_memory()
        with self.engine.begin() as connection:
            message = f"worker {self.name} loaded bundle {bundle.info.name} {bundle.info.version} for {pipeline.name}"
            if isinstance(bundle, RuntimeBundle):
                message += f" in its runtime {bundle.runtime.name} (MONAI {bundle.versions.get('monai')})"
            if evicted:
                message += f"; unloaded {', '.join(evicted)} (model_memory_mb)"
            db.log_event(connection, study_uid, "info", message)
        return bundle

    def _loaded_mb(self) -> float:
        return sum(bundle.weight_mb for bundle in self.bundles.values())

    def _unload(self, pipeline_name: str) -> None:
        """Forget a loaded bundle; one loaded in its runtime has its runner stopped too."""
        bundle = self.bundles.pop(pipeline_name, None)
        if isinstance(bundle, RuntimeBundle):
            bundle.close()

    def warm_up(self) -> None:
        """Before the first job: the standard's tables the result encoders read, and each
        pipeline's bundle, loaded and checked (`bundle_check`: a small synthetic volume through
        all of it). A pipeline whose bundle fails is disabled with the reason, for the whole node
        to see (`pipeline_checks`), and this worker takes none of its jobs; the others run. The
        bundles stay loaded, as many as model_memory_mb keeps: without this, the first study
        after a start waited 1.2 s longer for its results (demo bundle, 300-slice CT: 7.4 s from
        the last image to the PACS, against 5.2-5.8 s)."""
        load_standard_tables()
        for pipeline in self.config.pipelines:
            self.check(pipeline)

    def check(self, pipeline: Pipeline) -> None:
        """Load and check the pipeline's bundle; enable or disable the pipeline accordingly.
        With runtime = "auto", the node's environment is tried first, then the bundle's runtime."""
        problems = layout_problems(pipeline.model)
        if not problems:
            problems = self._try(pipeline, _first_choice(pipeline))
        if problems and pipeline.runtime == "auto" and self.runs_in.get(pipeline.name) == "node":
            in_node = "; ".join(problems)
            problems = self._try(pipeline, "bundle")
            if problems:
                problems = [f"in the node's environment, {in_node}; in its own runtime, {'; '.join(problems)}"]
            else:
                log.info("pipeline %s runs in its bundle's runtime (runtime = auto): in the node's environment, %s",
                         pipeline.name, in_node)
        elif problems and pipeline.runtime == "node" and _made_for_another_monai(pipeline.model):
            problems.append('runtime = "bundle" on the pipeline would run it with the MONAI it was made with')
        reason = "; ".join(problems) or None
        if reason is None:
            if pipeline.name in self.disabled:
                log.info("pipeline %s enabled: its bundle passes the check now", pipeline.name)
            self.disabled.discard(pipeline.name)
        else:
            self.disabled.add(pipeline.name)
            self._unload(pipeline.name)
            log.error("pipeline %s disabled: its bundle %s failed the check: %s", pipeline.name, pipeline.model,
                      reason)
        failed = pipeline_checks.record(self.engine, pipeline.name, reason, self.name)
        if failed:
            log.error("%d queued job(s) of pipeline %s failed with that reason", failed, pipeline.name)

    def _try(self, pipeline: Pipeline, runs_in: str) -> list[str]:
        """The bundle loaded afresh where ``runs_in`` says, and what its check finds."""
        self._unload(pipeline.name)
        self.runs_in[pipeline.name] = runs_in
        try:
            return check_loaded(self.bundle(pipeline, None))
        except Exception as error:  # noqa: BLE001 - every failure is the check's answer
            return [diagnose(error, made_with(pipeline.model))]

    def recheck_disabled(self) -> None:
        """A job queued for a disabled pipeline (an operator retried it, the bundle fixed or
        not) has its bundle checked again: it runs if the bundle passes now, and fails again at
        once with the reason if not."""
        waiting = pipeline_checks.with_queued_jobs(self.engine, self.disabled)
        for pipeline in self.config.pipelines:
            if pipeline.name in waiting:
                self.check(pipeline)

    def run_once(self) -> bool:
        """Claim and run one job; False when there was nothing to do."""
        # SIGTERM waits while a job is being claimed: arriving between the claim's commit and the
        # `try` below, it would leave a running job that nobody releases.
        job = None
        _SHUTDOWN.defer()
        try:
            job = jobs.claim(self.engine, self.name, {p.name for p in self.config.pipelines} - self.disabled,
                             self.config.node.max_attempts, self.config.node.lease_seconds)
        finally:
            if job is None:
                _SHUTDOWN.resume()
        if job is None:
            return False
        claim = jobs.Claim.of(job)
        stop_renewing = threading.Event()
        renewer = threading.Thread(target=self._renew_lease, args=(claim, stop_renewing), daemon=True)
        renewer.start()
        pipeline = self.config.pipeline(job["pipeline"])
        try:
            _SHUTDOWN.resume()  # a SIGTERM that came during the claim lands here
            signal.setitimer(signal.ITIMER_REAL, pipeline.timeout_seconds)
            self._run(job, claim, pipeline)
            signal.setitimer(signal.ITIMER_REAL, 0)
            for ringer in self.results_recorded:
                ringer.ring()
        except ShutdownRequested:
            signal.setitimer(signal.ITIMER_REAL, 0)
            jobs.release(self.engine, job["id"], self.name)
            raise
        except Exception as error:  # noqa: BLE001 - a job's crash must never take the worker down
            signal.setitimer(signal.ITIMER_REAL, 0)  # a late alarm must not cut the failure's record short
            self._fail(job, claim, *classify_failure(error, pipeline.timeout_seconds))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            stop_renewing.set()
            renewer.join()
            _free_memory()  # what a failed or finished job held goes now, not at the next job
        return True

    def _renew_lease(self, claim: jobs.Claim, stop: threading.Event) -> None:
        lease = self.config.node.lease_seconds
        while not stop.wait(lease / 4):
            if not jobs.renew(self.engine, claim, lease):
                log.warning("worker %s lost job %d: its lease lapsed and the job moved on; what it makes of it "
                            "will be discarded", self.name, claim.job_id)
                return

    def _fail(self, job, claim: jobs.Claim, reason: str, permanent: bool) -> None:
        log.warning("job %s failed: %s", job["id"], reason)
        try:
            with self.engine.begin() as connection:
                if permanent:
                    jobs.finish(connection, job["id"], job["study_uid"], "failed", reason, claim)
                else:
                    jobs.retry_or_fail(connection, job["id"], job["study_uid"], job["attempts"],
                                       self.config.node.max_attempts, reason, claim)
            ended = permanent or job["attempts"] >= self.config.node.max_attempts
            metrics.count_job_end(job["pipeline"], "failed" if ended else "retried")
        except jobs.LeaseLost as lost:
            log.warning("the failure of job %s is not recorded: %s", job["id"], lost)

    def _series_paths(self, series_uid: str) -> list[Path]:
        with db.reading(self.engine) as connection:
            rows = connection.execute(
                select(db.instances.c.path).where(db.instances.c.series_uid == series_uid)
            ).all()
        return [Path(path) for (path,) in rows]

    def _run(self, job, claim: jobs.Claim, pipeline: Pipeline) -> None:
        """The job's steps, each timed: volume, bundle, results' encoding, writing and recording."""
        timings: dict[str, float] = {}
        started = time.perf_counter()
        volume = self._volume(job)
        timings["volume"] = time.perf_counter() - started
        if volume.resampled:
            self._note_resampling(job, volume)
        bundle = self.bundle(pipeline, job["study_uid"])
        labels = bundle.predict(volume)
        timings.update(bundle.timings)
        encoding = time.perf_counter()
        encoded = self._encode(job, pipeline, bundle, volume, labels)
        timings["encode"] = time.perf_counter() - encoding
        self._write_and_record(job, claim, pipeline, encoded, timings)

    def _volume(self, job) -> Volume:
        """The job's stack as a volume: the one built ahead if its files are still those, else read now."""
        paths = self._series_paths(job["series_uid"])
        volume = self.prefetch.take(job["series_uid"], job["stack"], paths)
        if volume is not None:
            return volume
        stacks = split_stacks(read_frames(paths))
        if job["stack"] not in stacks:
            raise JobFailure(f"stack {job['stack']!r} is no longer in the series (it now has {sorted(stacks)})")
        return load_volume(stacks[job["stack"]])

    def _note_resampling(self, job, volume: Volume) -> None:
        """Say in the study's events why its images went through a grid of their own."""
        spacing = " x ".join(f"{s:.2f}" for s in volume.spacing)
        with self.engine.begin() as connection:
            db.log_event(connection, job["study_uid"], "info",
                         f"job {job['id']}: {volume.resampled}; the images were sampled onto a regular grid of "
                         f"{spacing} mm for the model, and its results brought back onto each image")

    def _encode(self, job, pipeline: Pipeline, bundle: Bundle | RuntimeBundle, volume: Volume, labels) -> _Encoded:
        """The SEG (when a label was found), the SR and the outline images, as file bytes. A
        failure here is the series' and the bundle's, not the moment's: it is not retried."""
        try:
            masks = volume.frame_masks(labels)
            scanned = scan_labels(masks, list(bundle.info.labels), volume.frame_voxel_ml())
            segments = segments_of(scanned, bundle.info, bundle_overrides(pipeline.model, pipeline.segments))
            description = f"{pipeline.name}: {bundle.info.name} {bundle.info.version}"
            series_number = self.config.series_number(pipeline)
            seg = None
            if any(segment.present for segment in segments):
                seg = build_seg(volume, scanned, segments, bundle.info, self.equipment, series_number, f"SEG {description}")
            previous = find_superseded(self.engine, job)
            previous_sr = []
            if "SR" in previous.results and Path(previous.results["SR"].path).exists():
                previous_sr = [pydicom.dcmread(previous.results["SR"].path)]
            sr = build_sr(volume, seg.dataset if seg is not None else None, segments, bundle.info, self.equipment,
                          series_number + 1, f"SR {description}", previous_sr)
            outputs = [("SR", sr, file_bytes(sr))]
            if seg is not None:
                outputs.insert(0, ("SEG", seg.dataset, seg.encode()))
                if pipeline.outlines:
                    outputs += [("SC", image, file_bytes(image)) for image in build_outline_images(
                        volume, masks, segments, self.equipment, series_number + 2, f"Outlines {description}")]
            told = self._rejection_note(job, previous, outputs, series_number + 3, description)
        except (GeometryError, MemoryError):
            raise
        except Exception as error:  # the same inputs would fail the same way: not retried
            log.exception("job %s: the results could not be built", job["id"])
            raise JobFailure(f"the results could not be built from this series ({type(error).__name__}: {error}); "
                             "the details are in the worker's log") from error
        return _Encoded(outputs, segments, sorted({s.name for s in segments if not s.codes.known}), previous, told)

    def _rejection_note(self, job, previous: Superseded, outputs: list, series_number: int, description: str) -> list[str]:
        """Add to ``outputs`` the rejection note of the results they replace, for the destinations
        that had those and take notes (`Destination.rejection_notes`); the destinations told."""
        told = previous.rejection_destinations(self.config)
        if not told:
            return []
        superseded = previous.headers()
        if superseded is None:
            with self.engine.begin() as connection:
                db.log_event(connection, job["study_uid"], "warning",
                             f"job {job['id']}: no rejection note for the results it replaces, whose files are gone")
            return []
        replacements = [dataset for kind, dataset, _ in outputs if kind in ("SEG", "SR")]
        note = build_rejection_note(superseded, replacements, self.equipment, series_number, f"Rejected {description}")
        outputs.append(("KO", note, file_bytes(note)))
        return told

    def _write_and_record(self, job, claim: jobs.Claim, pipeline: Pipeline, encoded: _Encoded,
                          timings: dict[str, float]) -> None:
        """Write the results durably, then record them (`_record`). Files that end up not
        recorded are removed (a crash in between: `recovery.remove_unrecorded_results`)."""
        writing = time.perf_counter()
        written: list[tuple[str, pydicom.Dataset, Path]] = []
        try:
            for kind, dataset, data in encoded.outputs:
                path = files.result_path(
                    self.config.node.data_dir, job["study_uid"], dataset.SeriesInstanceUID, dataset.SOPInstanceUID
                )
                files.write_durably(path, data)
                written.append((kind, dataset, path))
            timings["write"] = time.perf_counter() - writing
            self._record(job, claim, pipeline, written, encoded, timings)
            metrics.observe_job(pipeline.name, timings)
            metrics.count_job_end(pipeline.name, "done")
        except BaseException as error:
            for _, _, path in written:
                path.unlink(missing_ok=True)
            if isinstance(error, jobs.LeaseLost):
                log.warning("results of job %s discarded: %s", job["id"], error)
                return
            raise

    def _record(self, job, claim: jobs.Claim, pipeline: Pipeline, written, encoded: _Encoded,
                timings: dict[str, float]) -> None:
        """In one transaction fenced by the claim: the job done, its result rows and their
        deliveries (the rejection note's to the destinations it tells, the others' to the
        pipeline's). A worker that lost its claim records nothing (`jobs.LeaseLost`)."""
        previous = encoded.previous.results
        with self.engine.begin() as connection:
            jobs.finish(connection, job["id"], job["study_uid"], "done", None, claim)
            for kind, dataset, path in written:
                result_id = connection.execute(
                    db.results.insert().values(
                        job_id=job["id"],
                        kind=kind,
                        sop_instance_uid=dataset.SOPInstanceUID,
                        series_uid=dataset.SeriesInstanceUID,
                        path=str(path),
                        created_at=db.now(),
                        supersedes=previous[kind].id if kind in previous else None,
                    )
                ).inserted_primary_key[0]
                for destination in encoded.rejection_destinations if kind == "KO" else pipeline.destinations:
                    connection.execute(
                        db.deliveries.insert().values(
                            result_id=result_id, destination=destination, state="pending", attempts=0, not_before=0.0
                        )
                    )
            study = job["study_uid"]
            found = [f"{s.name} {s.voxel_count} voxels" for s in encoded.segments if s.present]
            absent = [s.name for s in encoded.segments if not s.present]
            summary = f"results of job {job['id']}: " + (", ".join(found) or "no label found")
            if absent:
                summary += f"; absent: {', '.join(absent)}"
            if previous:
                summary += "; they supersede " + ", ".join(
                    f"{kind} {row.sop_instance_uid}" for kind, row in sorted(previous.items())
                )
            if encoded.rejection_destinations:
                summary += f"; a rejection note of those goes to {', '.join(encoded.rejection_destinations)}"
            db.log_event(connection, study, "info", summary)
            if encoded.unknown:
                db.log_event(connection, study, "warning",
                             f"labels without a known code, sent with a generic one: {', '.join(encoded.unknown)}")
            db.log_event(connection, study, "info", f"job {job['id']} timings: " +
                         ", ".join(f"{step} {seconds:.2f} s" for step, seconds in timings.items()))

    def _build_ahead(self) -> None:
        """Idle time goes to the volumes of studies about to complete (`prefetch`); a failure
        there costs only the head start."""
        try:
            self.prefetch.build_ahead()
        except Exception:
            log.exception("building volumes ahead failed; jobs will read their series themselves")

    def run_forever(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set or SIGTERM arrives; a job in progress at SIGTERM is released."""
        signal.signal(signal.SIGTERM, _SHUTDOWN.handle)
        signal.signal(signal.SIGALRM, _raise_timeout)
        reuse_freed_memory()
        try:
            self.warm_up()
            devices = sorted(f"{p.name} disabled" if p.name in self.disabled else f"{p.name} on {choose_device(p.device)}"
                             + (" in its bundle's runtime" if self.runs_in.get(p.name) == "bundle" else "")
                             for p in self.config.pipelines)
            log.info("worker %s ready%s", self.name, f": {', '.join(devices)}" if devices else "")
            while not stop.is_set():
                if not self.run_once():
                    if self.disabled:
                        self.recheck_disabled()
                    self._build_ahead()
                    (self.jobs_queued.wait if self.jobs_queued else stop.wait)(IDLE_POLL_SECONDS)
        except ShutdownRequested:
            log.info("worker %s stopping at SIGTERM", self.name)
        finally:
            for name in list(self.bundles):
                self._unload(name)


class _ShutdownSignal:
    """SIGTERM raises ShutdownRequested in the main thread, except while deferred (a job being
    claimed), when it is kept until `resume`. Python runs signal handlers in the main thread
    whichever thread the kernel delivered the signal to, so a flag here holds for all of them,
    where a signal mask holds only for the thread that sets it."""

    def __init__(self) -> None:
        self.deferred = False
        self.pending = False

    def handle(self, _signum, _frame) -> None:
        if self.deferred:
            self.pending = True
            return
        raise ShutdownRequested()

    def defer(self) -> None:
        self.deferred = True

    def resume(self) -> None:
        self.deferred = False
        if self.pending:
            self.pending = False
            raise ShutdownRequested()


_SHUTDOWN = _ShutdownSignal()
