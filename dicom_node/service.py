"""`dicom-node serve`: the listener, the completion timer, the dispatcher, the HTTP server, the
webhooks and the workers.

One supervised process tree. The main process binds the DICOM and HTTP ports, checks for quiet
studies, dispatches results, serves the dashboard, API and metrics, and posts webhooks; receiver processes share the port and store what arrives (several, so
that associations are received on several cores, and none of them ever waits on a model);
inference runs in worker processes. The main process restarts receivers and workers that die.
SIGTERM or SIGINT stops accepting associations, lets the stores in flight finish, and leaves
running jobs to be resumed at the next start.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from sqlalchemy import update

from dicom_node import tls
from dicom_node.config import Config, load_config
from dicom_node.dispatch import deliver_due, release_claims
from dicom_node.doorbell import Bell, Ringer, doorbell
from dicom_node.http import server as http_server
from dicom_node.http import webhooks
from dicom_node.ingest.receiver import SHUTDOWN_GRACE_SECONDS, Receiver, listening_socket
from dicom_node.ingest.recovery import (
    current_boot,
    recover_incoming,
    reindex_after_boot,
    remove_unrecorded_results,
)
from dicom_node.logs import setup_logging
from dicom_node.state import db, jobs, pipeline_checks, retention
from dicom_node.state.completion import ReadAhead, complete_quiet_studies

log = logging.getLogger(__name__)

# How often the completion and dispatch loops look at the database. Each look is one indexed
# query; a short tick keeps the quiet period and the wait before sending close to what they are
# configured to be (measured: 0.5 s added 0.8 s to a study's latency on average).
TICK_SECONDS = 0.1
PR_SET_PDEATHSIG = 1
WORKER_GRACE_SECONDS = 10.0
PORT_WAIT_SECONDS = SHUTDOWN_GRACE_SECONDS + 5


def receiver_process(config_path: Path, listening: list[tuple[socket.socket, bool]], max_associations: int,
                     parent: int, ready: multiprocessing.synchronize.Event) -> None:
    """Entry point of a receiver process: serves the shared socket until SIGTERM, then lets the
    C-STOREs in flight finish (see Receiver.stop). Sets ``ready`` once it serves."""

    setup_logging()
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when receivers stop
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    config = load_config(config_path)
    receiver = Receiver(config, db.connect(config.database_url))
    receiver.start(listening, max_associations)
    ready.set()
    stop.wait()
    receiver.stop()


def receiver_count(config: Config) -> int:
    """As configured (one by default), or with 0 one per core, at most 4: more than the cores
    cannot run at once, and all receivers index through SQLite's one write lock. Never more
    than max_associations: a receiver with no share would refuse every connection it got."""
    return min(config.node.receivers or min(os.cpu_count() or 1, 4), config.node.max_associations)


def association_shares(max_associations: int, receivers: int) -> list[int]:
    """Each receiver process's part of ``max_associations``: as equal as can be, and adding up
    to it exactly, so that the node never holds more than it is configured to."""
    share, rest = divmod(max_associations, receivers)
    return [share + (index < rest) for index in range(receivers)]


def worker_process(config_path: Path, parent: int, jobs_queued: Bell, results_recorded: list[Ringer]) -> None:
    """Entry point of a worker process (spawned, so it imports torch on its own). It runs until
    SIGTERM, which releases the job in progress for the next start. Completion rings
    ``jobs_queued``; it rings each of ``results_recorded`` (one per destination's dispatcher)."""
    from dicom_node.compute.worker import Worker  # torch and MONAI load here, never in the receiving process

    setup_logging()
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    config = load_config(config_path)
    Worker(config, db.connect(config.database_url), jobs_queued, results_recorded).run_forever(threading.Event())


def _die_with_parent(parent: int) -> None:
    """A child orphaned by a killed node would go on claiming jobs or storing beside the
    restarted one; Linux sends it SIGTERM instead (a worker releases its job, a receiver finishes
    its stores, and both exit). A child whose parent died before it asked for that signal, while
    it was still starting, would never get it: it exits at once."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        log.warning("cannot tie process %d to its parent: it may outlive a killed node", os.getpid())
    if os.getppid() != parent:
        log.warning("process %d: the node that started it is gone; exiting", os.getpid())
        raise SystemExit(0)


def _periodic(name: str, action: Callable[[], float | None], stop: threading.Event,
              pause: Callable[[float], object] | None = None) -> None:
    """Run ``action`` every tick, or sooner when it returns the seconds until it has more to
    do, or when ``pause`` (a doorbell's wait) ends early; a failure is logged and retried,
    never fatal."""
    pause = pause or stop.wait
    while not stop.is_set():
        seconds = TICK_SECONDS
        try:
            sooner = action()
            if sooner is not None:
                seconds = min(seconds, max(0.0, sooner))
        except Exception:
            log.exception("%s failed; retrying", name)
        pause(seconds)


def _again_if_busy(step: Callable[[], int]) -> Callable[[], float | None]:
    """For `_periodic`, a step that returns how much it did (deliveries sent, posts queued): look
    again at once after work, since more may be due, and at the next tick after none. Handing
    the count itself to `_periodic` would read "nothing done" as "due again in 0 s": an idle
    dispatch loop spun on a whole core."""
    return lambda: 0.0 if step() else None


def resume_after_restart(config: Config, engine) -> None:
    """Pick up where a stopped or killed node left off.

    Jobs held by processes of this host that are gone go back to the queue at once, instead of
    waiting for their lease, and the result files they wrote but did not record are removed.
    Deliveries this node was sending are due again at once. Studies still receiving get a full
    quiet period from now: the PACS
    whose transfer was cut by the stop is given time to resend before the study counts as
    complete, so a half-received study is not processed.
    """
    pipeline_checks.forget(engine)  # the workers about to start check every bundle again
    release_claims(config, engine)
    interrupted = jobs.release_dead_local_workers(engine, socket.gethostname(), _process_alive)
    remove_unrecorded_results(config, engine, interrupted)
    with engine.begin() as connection:
        connection.execute(
            update(db.studies).where(db.studies.c.state == "receiving").values(last_received_at=db.now())
        )


def _process_alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped by an init that may never
    reap it) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _listen_when_free(host: str, port: int) -> socket.socket:
    """Bind the DICOM port, waiting a little if it is taken: after a crash, the old node's
    receivers let go of it only once they have finished the stores in flight."""
    deadline = time.monotonic() + PORT_WAIT_SECONDS
    waiting = False
    while True:
        try:
            return listening_socket(host, port)
        except OSError as error:
            if error.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            if not waiting:
                log.warning("port %d is in use; waiting up to %.0f s for it to be released (a node that was "
                            "stopped finishes its stores first)", port, PORT_WAIT_SECONDS)
                waiting = True
            time.sleep(0.5)


def _listen(config: Config) -> list[tuple[socket.socket, bool]] | None:
    """The DICOM listeners, each with whether it is the TLS one: plain on ``port`` (unless
    ``plain = false``), TLS on ``tls.port``; None, logged, when one cannot be had, or when the
    TLS listener's certificate or key cannot be loaded (found at start, not at the first peer)."""
    node = config.node
    wanted = ([(node.port, False)] if node.plain else []) + ([(node.tls.port, True)] if node.tls else [])
    if node.tls is not None:
        try:
            tls.server_context(node.tls)
        except (OSError, ssl.SSLError) as error:
            log.error("cannot use the TLS certificate %s and key %s ([node.tls]): %s", node.tls.certificate,
                      node.tls.private_key, error)
            return None
    listening: list[tuple[socket.socket, bool]] = []
    for port, is_tls in wanted:
        try:
            listening.append((_listen_when_free(node.host, port), is_tls))
        except OSError as error:
            log.error("cannot listen on %s:%d: %s", node.host, port, error)
            for sock, _ in listening:
                sock.close()
            return None
    return listening


class Supervisor:
    """The process tree of `dicom-node serve`: receivers and workers started, watched and
    restarted, the completion, dispatch and retention loops in threads, and the order things stop in.
    Each step is a method, so that a test can drive one in-process."""

    def __init__(self, config_path: Path, config: Config, engine, listening: list[tuple[socket.socket, bool]]) -> None:
        self.config_path = config_path
        self.config = config
        self.engine = engine
        self.listening = listening
        self.context = multiprocessing.get_context("spawn")
        self.shares = association_shares(config.node.max_associations, receiver_count(config))
        self.read_ahead = ReadAhead()
        # One per worker (a restarted worker hears its predecessor's), and one per destination.
        self.worker_bells = [doorbell(self.context) for _ in range(config.node.workers)]
        self.dispatch_bells = [doorbell(self.context) for _ in config.destinations]
        self.receivers: list[multiprocessing.process.BaseProcess] = []
        self.workers: list[multiprocessing.process.BaseProcess] = []
        self.loops: list[threading.Thread] = []

    def start_receiver(self, index: int) -> tuple[multiprocessing.process.BaseProcess, multiprocessing.synchronize.Event]:
        ready = self.context.Event()
        process = self.context.Process(
            target=receiver_process, args=(self.config_path, self.listening, self.shares[index], os.getpid(), ready),
            daemon=True)
        process.start()
        return process, ready

    def start_receivers(self) -> bool:
        """All receivers, each serving before this returns; False if one exits at start."""
        started = [self.start_receiver(index) for index in range(len(self.shares))]
        self.receivers = [process for process, _ in started]
        for process, ready in started:
            while not ready.wait(timeout=1.0):
                if not process.is_alive():
                    log.error("a receiver process exited at start with %s; see above", process.exitcode)
                    return False
        return True

    def start_worker(self, index: int) -> multiprocessing.process.BaseProcess:
        jobs_queued, _ = self.worker_bells[index]
        process = self.context.Process(
            target=worker_process,
            args=(self.config_path, os.getpid(), jobs_queued, [ringer for _, ringer in self.dispatch_bells]),
            daemon=True,
        )
        process.start()
        return process

    def complete(self) -> float | None:
        """One round of completion; rings the workers if jobs were queued. Returns the seconds
        until the next study read ahead comes due."""
        round_ = complete_quiet_studies(self.config, self.engine, self.read_ahead)
        if round_.completed:
            for _, ringer in self.worker_bells:
                ringer.ring()
        return None if round_.next_due is None else round_.next_due - db.now()

    def start_loops(self, stop: threading.Event) -> None:
        self.loops = [threading.Thread(target=_periodic, args=("completion", self.complete, stop), daemon=True)] + [
            threading.Thread(
                target=_periodic,
                args=(f"dispatch to {d.name}", _again_if_busy(partial(deliver_due, self.config, self.engine, d)), stop,
                      bell.wait),
                daemon=True,
            )
            for d, (bell, _) in zip(self.config.destinations, self.dispatch_bells)
        ]
        schedule = retention.Schedule(self.config, self.engine)
        self.loops.append(threading.Thread(
            target=_periodic, args=("retention", schedule.step, stop,
                                    lambda _: stop.wait(retention.FREE_SPACE_LOOK_SECONDS)), daemon=True))
        for loop in self.loops:
            loop.start()

    def listener_serving(self) -> bool:
        """The DICOM port is open and at least one receiver serves it."""
        return all(sock.fileno() != -1 for sock, _ in self.listening) and self.receivers_alive() > 0

    def receivers_alive(self) -> int:
        return sum(process.is_alive() for process in self.receivers)

    def workers_alive(self) -> int:
        return sum(process.is_alive() for process in self.workers)

    def start_webhook_loops(self, stop: threading.Event) -> None:
        """Announcing and posting in two loops: a slow receiver delays its own posts only."""
        if not self.config.webhooks:
            return
        for name, step in (("webhook announcements", webhooks.announce), ("webhook posts", webhooks.post_due)):
            loop = threading.Thread(target=_periodic, args=(name, _again_if_busy(partial(step, self.config, self.engine)),
                                                            stop), daemon=True)
            loop.start()
            self.loops.append(loop)

    def restart_the_dead(self) -> None:
        for index, process in enumerate(self.receivers):
            if not process.is_alive():
                log.error("receiver %d exited with %s; restarting it", process.pid, process.exitcode)
                self.receivers[index] = self.start_receiver(index)[0]
        for index, process in enumerate(self.workers):
            if not process.is_alive():
                log.error("worker %d exited with %s; restarting it", process.pid, process.exitcode)
                self.workers[index] = self.start_worker(index)

    def stop(self) -> None:
        """Receivers first (they finish the C-STOREs in flight), then the port, then the
        workers (they release their jobs), then the loops."""
        for process in self.receivers:
            process.terminate()
        for process in self.receivers:
            process.join(timeout=SHUTDOWN_GRACE_SECONDS + 5)
            if process.is_alive():
                process.kill()
        for sock, _ in self.listening:
            sock.close()
        for process in self.workers:
            process.terminate()
        for process in self.workers:
            process.join(timeout=WORKER_GRACE_SECONDS)
            if process.is_alive():
                process.kill()  # its job's lease lapses, and the job resumes all the same
        for loop in self.loops:
            loop.join(timeout=5)


def serve(config_path: Path) -> int:
    config: Config = load_config(config_path)
    stop = threading.Event()

    def request_stop(signum, _frame) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    listening = _listen(config)  # first: a second node on this port stops here, before touching the database
    if listening is None:
        return 1
    http_listening = None
    if config.http.enabled:
        try:
            http_listening = http_server.bind(config)
        except OSError as error:
            log.error("cannot serve HTTP on %s:%d: %s ([http] in the configuration)", config.http.host,
                      config.http.port, error)
            for sock, _ in listening:
                sock.close()
            return 1
    engine = db.connect(config.database_url)
    # Before any receiver runs: instances whose rename or index rows a crash took are put back.
    recover_incoming(config, engine)
    reindex_after_boot(config, engine, current_boot())
    supervisor = Supervisor(config_path, config, engine, listening)
    if not supervisor.start_receivers():
        return 1
    ports = " and ".join(f"{config.node.host}:{sock.getsockname()[1]}{' (TLS)' if is_tls else ''}"
                         for sock, is_tls in listening)
    log.info("listening as %s on %s with %d receiver process(es)", config.node.ae_title, ports,
             len(supervisor.receivers))
    # Only now: studies still arriving when the node stopped get their quiet period from the
    # moment the node can receive again, not from before its receivers were up.
    resume_after_restart(config, engine)
    supervisor.start_loops(stop)
    supervisor.workers = [supervisor.start_worker(index) for index in range(config.node.workers)]
    log.info("dicom-node serving with %d worker(s)", len(supervisor.workers))
    supervisor.start_webhook_loops(stop)
    web = None
    if http_listening is not None:
        web = http_server.HttpServer(config, db.connect(config.database_url), supervisor, http_listening)
        if not web.start():
            stop.set()
    while not stop.wait(1.0):
        supervisor.restart_the_dead()
    if web is not None:
        web.stop()
    supervisor.stop()
    log.info("stopped")
    return 0


def run_worker(config_path: Path) -> int:
    """`dicom-node worker`: only the inference loop, for extra hosts sharing the database."""
    from dicom_node.compute.worker import Worker

    config = load_config(config_path)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Worker(config, db.connect(config.database_url)).run_forever(stop)
    return 0
