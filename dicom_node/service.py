"""`dicom-node serve`: the listener, the completion timer, the dispatcher and the workers.

One supervised process tree: the main process receives (C-STORE must never wait on a model),
checks for quiet studies and dispatches results; inference runs in worker processes that the
main process restarts if they die. SIGTERM or SIGINT stops accepting associations, lets the
stores in flight finish, and leaves running jobs to be resumed at the next start.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from pathlib import Path

from . import db
from .completion import complete_quiet_studies
from .config import Config, load_config
from .dispatch import deliver_due
from .receive import Receiver

log = logging.getLogger(__name__)

TICK_SECONDS = 0.5
# An idle worker notices the stop within a poll; a busy one is not waited for, since its job is
# lease-protected and resumes after the next start.
WORKER_GRACE_SECONDS = 3.0


def worker_process(config_path: Path, stop) -> None:
    """Entry point of a worker process (spawned, so it imports torch on its own)."""
    from .cli import setup_logging
    from .worker import Worker  # torch and MONAI load here, never in the receiving process

    setup_logging()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    config = load_config(config_path)
    Worker(config, db.connect(config.database_url)).run_forever(stop)


def _periodic(name: str, action, stop: threading.Event) -> None:
    """Run ``action`` every tick; a failure is logged and retried, never fatal."""
    while not stop.is_set():
        try:
            action()
        except Exception:
            log.exception("%s failed; retrying", name)
        stop.wait(TICK_SECONDS)


def serve(config_path: Path) -> int:
    config: Config = load_config(config_path)
    engine = db.connect(config.database_url)
    stop = threading.Event()
    context = multiprocessing.get_context("spawn")
    worker_stop = context.Event()

    def request_stop(signum, _frame) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    server = Receiver(config, engine).start()
    loops = [
        threading.Thread(
            target=_periodic, args=("completion", lambda: complete_quiet_studies(config, engine), stop), daemon=True
        ),
        threading.Thread(
            target=_periodic, args=("dispatch", lambda: deliver_due(config, engine), stop), daemon=True
        ),
    ]
    for loop in loops:
        loop.start()
    workers = []
    for _ in range(config.node.workers):
        process = context.Process(target=worker_process, args=(config_path, worker_stop), daemon=True)
        process.start()
        workers.append(process)
    log.info("dicom-node serving with %d worker(s)", len(workers))
    while not stop.wait(1.0):
        for index, process in enumerate(workers):
            if not process.is_alive():
                log.error("worker %d exited with %s; restarting it", process.pid, process.exitcode)
                workers[index] = context.Process(target=worker_process, args=(config_path, worker_stop), daemon=True)
                workers[index].start()
    server.shutdown()  # stops accepting; associations in flight finish their current store
    worker_stop.set()
    for process in workers:
        process.join(timeout=WORKER_GRACE_SECONDS)
        if process.is_alive():
            process.terminate()  # a model run in progress: its lease will lapse and it resumes later
    for loop in loops:
        loop.join(timeout=5)
    log.info("stopped")
    return 0


def run_worker(config_path: Path) -> int:
    """`dicom-node worker`: only the inference loop, for extra hosts sharing the database."""
    from .worker import Worker

    config = load_config(config_path)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Worker(config, db.connect(config.database_url)).run_forever(stop)
    return 0
