"""Ingest rate of the node against DCMTK storescp and Orthanc, same payloads, same run.

    .venv/bin/python benchmarks/ingest.py [--slices 300] [--small 2000] [--repeat 3] [--only RECEIVER ...]

Payloads: a 300-slice 512x512 CT and 2,000 small (64x64) images, sent with DCMTK storescu
(TCP_NODELAY=1) over one association and over four concurrent ones, to each receiver started
fresh. The node runs with its default, durable settings: every file and its folder are flushed
before the Success, and the index rows a power cut could take are rebuilt from the files at the
next start, with its HTTP surface on and an operator's dashboard and a Prometheus scrape polling it
every second ("dicom-node"), and again with HTTP off ("dicom-node-no-http"): the ratio between the
two is the cost of being watched. Prints instances per second, MB per second, the receiver's CPU time per instance
(all its processes), the peak resident memory of the processes that receive, and the node's
ratio to each peer.

Each measurement is repeated (--repeat), the receivers taking turns in a different order each
time, because this machine's speed drifts by a factor of two within minutes: a ratio is taken
between runs made one right after the other, and the table gives the median and the range.
CPU time per instance moves with the machine too (1.3 to 3.1 ms for the same node within
minutes), so it too is compared between runs made one after the other.

Every receiver's files are kept until the end. On ext4 without a journal (this machine's disk),
creating a file skips every inode freed in the last minute (six, while the freed inode is not
yet written back), one look-up each: right after a receiver's 2,000 files were deleted, the
next receiver paid up to 0.5 ms of kernel time per file it created, against 0.02 ms on a quiet
disk. The cost of creating a file is measured first and printed, so that a run made minutes
after another (or after any mass deletion) shows that it was slowed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Collection
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Self

from common import (
    PeakMemory,
    cpu_seconds,
    dcmtk_env,
    file_creation_microseconds,
    free_port,
    send,
    start_node,
    start_orthanc,
    table,
    wait_for,
    write_ct,
    write_node_config,
)

from tests.support.certificates import CertificateAuthority

POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Received:
    seconds: float
    cpu_seconds: float  # of the receiver's processes, while receiving
    peak_mb: float  # resident memory of its receiving processes, at most, while receiving
    beside_mb: float  # of the processes that do not receive (the node's idle worker), at most


def receive(pid: int, ae_title: str, port: int, paths, associations: int, beside: Collection[int] = (),
            options: Collection[str] = ()) -> Received:
    """Send ``paths`` to the receiver whose process is ``pid``, and what that took. Processes in
    ``beside`` take no part in receiving; their memory is measured apart. ``options``: storescu's."""
    before = cpu_seconds(pid)
    with PeakMemory(pid) as memory:
        seconds = send(ae_title, port, paths, associations, options)
    return Received(seconds, cpu_seconds(pid) - before, memory.peak_mb(leave_out=beside), memory.peak_mb_of(beside))


def run_storescp(workdir: Path, paths, associations: int) -> Received:
    port, out = free_port(), workdir / "storescp"
    out.mkdir(parents=True)
    # --fork: one process per association, as four concurrent senders need.
    process = subprocess.Popen(["storescp", "--fork", "-od", str(out), str(port)], env=dcmtk_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: subprocess.run(["echoscu", "127.0.0.1", str(port)], env=dcmtk_env(),
                                        capture_output=True).returncode == 0, 30, "storescp")
        return receive(process.pid, "ANY-SCP", port, paths, associations)
    finally:
        process.terminate()
        process.wait()


def run_orthanc(workdir: Path, paths, associations: int) -> Received:
    orthanc = start_orthanc(workdir / "orthanc", {})
    try:
        return receive(orthanc.process.pid, orthanc.ae_title, orthanc.dicom_port, paths, associations)
    finally:
        orthanc.stop()


class DashboardWatcher:
    """An operator with the dashboard open: the overview page (which the browser reloads by
    itself) and a Prometheus scrape, every second, while the study arrives."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.stop = threading.Event()
        self.pages = 0
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop.wait(POLL_SECONDS):
            for path in ("/", "/metrics"):
                with urllib.request.urlopen(self.base_url + path, timeout=30) as page:
                    page.read()
            self.pages += 1

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        self.thread.join()


def run_node(workdir: Path, paths, associations: int, http: bool = True, tls: bool = False) -> Received:
    """The node as `make run` starts it: HTTP on, and an operator watching the dashboard (or,
    with ``http=False``, the HTTP surface turned off, for the ratio between the two); with
    ``tls``, sent to over DICOM TLS with client certificates (storescu's BCP 195 profile)."""
    port = free_port()
    tls_settings, options = None, ()
    if tls:
        hospital = CertificateAuthority(workdir / "pki", "hospital")
        node_identity, modality = hospital.issue("node"), hospital.issue("modality")
        tls_settings = {"port": free_port(), "certificate": str(node_identity.certificate),
                        "private_key": str(node_identity.private_key), "ca": str(hospital.path),
                        "require_client_certificate": True}
        options = ("+tls", str(modality.private_key), str(modality.certificate), "-pw", "+cf", str(hospital.path))
    config = write_node_config(workdir / "node", port, destinations=[], pipelines=[], stable_after=600,
                               http={"enabled": http}, **({"tls": tls_settings} if tls else {}))
    node = start_node(config, port)
    if tls:
        port = tls_settings["port"]
    try:
        # Measure the receiver, not the worker importing PyTorch beside it at start-up.
        workers = wait_for(node.ready_workers, 120, "the node's worker")
        if not http:
            return receive(node.process.pid, node.ae_title, port, paths, associations, beside=workers, options=options)
        node.wait_for_http()
        with DashboardWatcher(node.http_url):
            return receive(node.process.pid, node.ae_title, port, paths, associations, beside=workers, options=options)
    finally:
        node.stop()


RECEIVERS = {"storescp": run_storescp, "orthanc": run_orthanc, "dicom-node": run_node,
             "dicom-node-no-http": partial(run_node, http=False), "dicom-node-tls": partial(run_node, tls=True)}


def spread(values, style: str = "{:.0f}") -> str:
    """The lowest and highest of ``values``."""
    values = list(values)
    return f"{style.format(min(values))}-{style.format(max(values))}"


def main() -> int:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--slices", type=int, default=300)
    options.add_argument("--small", type=int, default=2000)
    options.add_argument("--repeat", type=int, default=3, help="runs of each measurement")
    options.add_argument("--only", choices=sorted(RECEIVERS), action="append", help="receivers to run")
    args = options.parse_args()
    names = [name for name in RECEIVERS if not args.only or name in args.only]
    rows, ratios, beside = [], [], []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        creation = file_creation_microseconds(scratch / "probe")
        # A count of 0 leaves that payload out, to measure the other alone.
        payloads = {
            name: write_ct(scratch / folder, count, size)
            for name, folder, count, size in [(f"CT {args.slices}x512x512", "ct", args.slices, 512),
                                               (f"{args.small} small 64x64", "small", args.small, 64)]
            if count > 0
        }
        for payload, paths in payloads.items():
            megabytes = sum(p.stat().st_size for p in paths) / 1e6
            for associations in (1, 4):
                runs: list[dict[str, Received]] = []  # per repetition, by receiver
                for repetition in range(args.repeat):
                    order = names[repetition % len(names):] + names[:repetition % len(names)]
                    measured = {}
                    for name in order:
                        workdir = scratch / f"{payload}-{associations}-{repetition}-{name}".replace(" ", "-")
                        measured[name] = RECEIVERS[name](workdir, paths, associations)
                    runs.append(measured)
                count = len(paths)
                for name in names:
                    rates = [count / run[name].seconds for run in runs]
                    rate = statistics.median(rates)
                    cpu = statistics.median(run[name].cpu_seconds * 1000 / count for run in runs)
                    peak = statistics.median(run[name].peak_mb for run in runs)
                    rows.append([payload, associations, name, f"{count / rate:.2f}", f"{rate:.0f}",
                                 f"{megabytes * rate / count:.1f}", spread(rates), f"{cpu:.2f}", f"{peak:.0f}"])
                    if name == "dicom-node":
                        beside.append(f"{payload}, {associations} association(s): "
                                      f"{statistics.median(run[name].beside_mb for run in runs):.0f} MB")
                if "dicom-node" in names:
                    for peer in ("orthanc", "storescp", "dicom-node-no-http", "dicom-node-tls"):
                        if peer in names:
                            paired = [run[peer].seconds / run["dicom-node"].seconds for run in runs]
                            cpu_paired = [run["dicom-node"].cpu_seconds / run[peer].cpu_seconds
                                          for run in runs]
                            ratios.append([payload, associations, {
                                "dicom-node-no-http": "node, dashboard polled / HTTP off",
                                "dicom-node-tls": "node, plain / over TLS"}.get(peer, f"node / {peer}"),
                                           f"{statistics.median(paired):.2f}", spread(paired, "{:.2f}"),
                                           f"{statistics.median(cpu_paired):.2f}"])
    print(f"median of {args.repeat} run(s); CPU: all the receiver's processes, while receiving; "
          f"creating a file took {creation:.0f} us before the first run")
    headers = ["payload", "assocs", "receiver", "seconds", "inst/s", "MB/s", "inst/s range", "CPU ms/inst",
               "peak MB"]
    print(table(headers, rows))
    if beside:
        print("peak MB: the processes that receive, each one's peak resident memory, summed (for the node: its "
              "main process and receivers; target at most 500 MB).\nThe node's idle worker beside them (PyTorch "
              "and MONAI loaded), same measure: " + "; ".join(beside))
    if ratios:  # none when --only leaves the node or both peers out
        print()
        print(table(["payload", "assocs", "ratio", "rate", "rate range", "CPU ms/inst"], ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
