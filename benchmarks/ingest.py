"""Ingest rate of the node against DCMTK storescp and Orthanc, same payloads, same run.

    .venv/bin/python benchmarks/ingest.py [--slices 300] [--small 2000] [--only RECEIVER ...]

Payloads: a 300-slice 512x512 CT and 2,000 small (64x64) images, sent with DCMTK storescu
(TCP_NODELAY=1) over one association and over four concurrent ones, to each receiver started
fresh. The node runs with its default, durable settings: every file and its folder are flushed
before the Success, and the index rows a power cut could take are rebuilt from the files at the
next start. Prints instances per second, MB per second, and the node's ratio to each peer.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from common import (
    dcmtk_env,
    free_port,
    send,
    start_node,
    start_orthanc,
    table,
    wait_for,
    write_ct,
    write_node_config,
)


def run_storescp(workdir: Path, paths, associations: int) -> float:
    port, out = free_port(), workdir / "storescp"
    out.mkdir(parents=True)
    # --fork: one process per association, as four concurrent senders need.
    process = subprocess.Popen(["storescp", "--fork", "-od", str(out), str(port)], env=dcmtk_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: subprocess.run(["echoscu", "127.0.0.1", str(port)], env=dcmtk_env(),
                                        capture_output=True).returncode == 0, 30, "storescp")
        return send("ANY-SCP", port, paths, associations)
    finally:
        process.terminate()
        process.wait()


def run_orthanc(workdir: Path, paths, associations: int) -> float:
    orthanc = start_orthanc(workdir / "orthanc", {})
    try:
        return send(orthanc.ae_title, orthanc.dicom_port, paths, associations)
    finally:
        orthanc.stop()


def run_node(workdir: Path, paths, associations: int) -> float:
    port = free_port()
    config = write_node_config(workdir / "node", port, destinations=[], pipelines=[], stable_after=600)
    node = start_node(config, port)
    try:
        # Measure the receiver, not the worker importing PyTorch beside it at start-up.
        wait_for(lambda: " ready" in node.log(), 120, "the node's worker")
        return send(node.ae_title, port, paths, associations)
    finally:
        node.stop()


RECEIVERS = {"storescp": run_storescp, "orthanc": run_orthanc, "dicom-node": run_node}


def main() -> int:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--slices", type=int, default=300)
    options.add_argument("--small", type=int, default=2000)
    options.add_argument("--only", choices=sorted(RECEIVERS), action="append", help="receivers to run")
    args = options.parse_args()
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
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
                rates = {}
                for name, run in RECEIVERS.items():
                    if args.only and name not in args.only:
                        continue
                    workdir = scratch / f"run-{name}"
                    seconds = run(workdir, paths, associations)
                    shutil.rmtree(workdir, ignore_errors=True)
                    rates[name] = len(paths) / seconds
                    rows.append([payload, associations, name, f"{seconds:.2f}", f"{len(paths) / seconds:.0f}",
                                 f"{megabytes / seconds:.1f}"])
                if "dicom-node" in rates:
                    for peer in ("orthanc", "storescp"):
                        if peer in rates:
                            ratios.append([payload, associations, f"node / {peer}",
                                           f"{rates['dicom-node'] / rates[peer]:.2f}"])
    print(table(["payload", "assocs", "receiver", "seconds", "inst/s", "MB/s"], rows))
    print()
    print(table(["payload", "assocs", "ratio", "value"], ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
