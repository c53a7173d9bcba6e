"""Prometheus counters kept by the processes that do the work: receivers count what arrives,
workers time what they run. The HTTP server (`dicom_node.http.metrics`) adds what the database
and the supervisor know, and serves the sum.

Receivers and workers are separate processes, so the counters live in prometheus_client's
multiprocess mode: each process writes its values to files in one folder, and a scrape adds
them up (`metrics_folder`). Without the folder (a command-line tool, a unit test) the
counters are the process's own.
"""

from __future__ import annotations

import os
import threading

from prometheus_client import Counter, Histogram

from dicom_node.metrics_folder import MULTIPROCESS_ENV

# Label values that come from the network (calling AE titles) are counted under their own
# name up to this many per process, then as "other": a peer cycling through AE titles must not
# grow the metrics without bound.
MAX_CALLING_AE_LABELS = 64
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


INSTANCES_RECEIVED = Counter(
    "dicom_node_instances_received", "Instances stored and answered Success, by calling AE title.", ["calling_ae"])
INSTANCES_REFUSED = Counter(
    "dicom_node_instances_refused", "C-STOREs answered with a failure status, by reason.", ["reason"])
BYTES_RECEIVED = Counter("dicom_node_received_bytes", "Bytes of data sets stored.")
ASSOCIATIONS = Counter(
    "dicom_node_associations", "Associations and connections, by outcome (accepted, rejected).", ["outcome"])
JOB_STEP_SECONDS = Histogram(
    "dicom_node_job_step_seconds", "Time of each step of a job that produced results (step 'total': the whole job).",
    ["pipeline", "step"], buckets=STEP_BUCKETS)
JOBS_FINISHED = Counter("dicom_node_jobs_finished", "Jobs that ended, by pipeline and state.", ["pipeline", "state"])

_calling_labels: set[str] = set()
_labels_lock = threading.Lock()


def _calling_label(calling_ae: str) -> str:
    label = calling_ae.strip() or "(empty)"
    with _labels_lock:
        if label in _calling_labels:
            return label
        if len(_calling_labels) < MAX_CALLING_AE_LABELS:
            _calling_labels.add(label)
            return label
    return "other"


def count_store(calling_ae: str, refusal: str | None, size: int) -> None:
    """One C-STORE answered: stored (``refusal`` None) or refused for that reason."""
    if refusal is None:
        INSTANCES_RECEIVED.labels(_calling_label(calling_ae)).inc()
        BYTES_RECEIVED.inc(size)
    else:
        INSTANCES_REFUSED.labels(refusal).inc()


def count_association(accepted: bool) -> None:
    ASSOCIATIONS.labels("accepted" if accepted else "rejected").inc()


def observe_job(pipeline: str, timings: dict[str, float]) -> None:
    for step, seconds in timings.items():
        JOB_STEP_SECONDS.labels(pipeline, step).observe(seconds)
    JOB_STEP_SECONDS.labels(pipeline, "total").observe(sum(timings.values()))


def count_job_end(pipeline: str, state: str) -> None:
    JOBS_FINISHED.labels(pipeline, state).inc()


def forget_process(pid: int) -> None:
    """A child that exited: its live gauges go (counters stay, as Prometheus expects)."""
    if os.environ.get(MULTIPROCESS_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
