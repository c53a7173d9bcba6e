"""Ingest rate of the node against DCMTK storescp and Orthanc, same payloads, same run.

    .venv/bin/python benchmarks/ingest.py [--slices 300] [--small 2000] [--repeat 3] [--only RECEIVER ...]

Payloads: a 300-slice 512x512 CT and 2,000 small (64x64) images, sent with DCMTK storescu
(TCP_NODELAY=1) over one association and over four concurrent ones, to each receiver started
fresh. The node runs with its default, durable settings: every file and its folder are flushed
before the Success, and the index rows a power cut could take are rebuilt from the files at the
next start. Prints instances per second, MB per second, and the node's ratio to each peer.

Each measurement is repeated (--repeat), the receivers taking turns in a different order each
time, because this machine's speed drifts by a factor of two within minutes: a ratio is taken
between runs made one right after the other, and the table gives the median and the range.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
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
                runs: list[dict[str, float]] = []  # per repetition: instances per second by receiver
                for repetition in range(args.repeat):
                    order = names[repetition % len(names):] + names[:repetition % len(names)]
                    rates = {}
                    for name in order:
                        workdir = scratch / f"run-{name}"
                        seconds = RECEIVERS[name](workdir, paths, associations)
                        shutil.rmtree(workdir, ignore_errors=True)
                        rates[name] = len(paths) / seconds
                    runs.append(rates)
                for name in names:
                    rate = statistics.median(run[name] for run in runs)
                    rows.append([payload, associations, name, f"{len(paths) / rate:.2f}", f"{rate:.0f}",
                                 f"{megabytes * rate / len(paths):.1f}", spread(run[name] for run in runs)])
                if "dicom-node" in names:
                    for peer in ("orthanc", "storescp"):
                        if peer in names:
                            paired = [run["dicom-node"] / run[peer] for run in runs]
                            ratios.append([payload, associations, f"node / {peer}",
                                           f"{statistics.median(paired):.2f}", spread(paired, "{:.2f}")])
    print(f"median of {args.repeat} run(s); range in the last column")
    print(table(["payload", "assocs", "receiver", "seconds", "inst/s", "MB/s", "inst/s range"], rows))
    print()
    print(table(["payload", "assocs", "ratio", "median", "range"], ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
