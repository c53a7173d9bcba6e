"""From the last instance acknowledged to SEG and SR stored in the PACS, stage by stage.

    .venv/bin/python benchmarks/latency.py [--slices 300] [--stable-after 2] [--first-study]

The demo bundle on a 300-slice 512x512 phantom CT, sent by storescu to the node, results sent
to a real Orthanc. Stages come from the node's own records: quiet period, queue wait, volume,
network (and the bundle's pre/postprocessing), encoding, sending. Target: total at most
stable_after + 2 s + the network's own time.

The total ends when Orthanc has answered Success to the C-STORE of the last result (the node's
delivery record, written once the association that carried it is released). Orthanc's index is
also polled, every 0.1 s, to see the results there; that time is printed too, and runs up to
0.1 s later by the polling alone.

A small study goes first, as a node in service has run jobs before; with ``--first-study`` the
CT is the first study after the node's start (sent once the worker says it is ready).
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from common import (
    file_creation_microseconds,
    free_port,
    send,
    start_node,
    start_orthanc,
    table,
    wait_for,
    write_node_config,
)

from tests.support.ct_study import DEMO_BUNDLE, StudyInfo, ct_series, make_phantom, write_series


def main() -> int:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--slices", type=int, default=300)
    options.add_argument("--stable-after", type=float, default=2.0)
    options.add_argument("--first-study", action="store_true", help="no small study first")
    args = options.parse_args()
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        creation = file_creation_microseconds(scratch / "probe")
        info = StudyInfo()
        phantom = make_phantom((512, 512, args.slices), (0.7, 0.7, 1.0), seed=3)
        paths = write_series(ct_series(phantom, info, 2, "latency"), scratch / "ct")
        del phantom
        port = free_port()
        orthanc = start_orthanc(scratch / "orthanc", {})
        config = write_node_config(
            scratch / "node", port,
            destinations=[{"name": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                           "port": orthanc.dicom_port}],
            pipelines=[{"name": "demo", "model": str(DEMO_BUNDLE), "destinations": ["pacs"],
                        "select": {"Modality": "CT"}}],
            stable_after=args.stable_after,
        )
        node = start_node(config, port)
        try:
            if args.first_study:
                wait_for(node.ready_workers, 300, "the worker")
            else:
                warm = write_series(ct_series(make_phantom((64, 64, 8), (5, 5, 5), seed=1), StudyInfo(), 2, "warm"),
                                    scratch / "warm")
                send(node.ae_title, port, warm, 1)
                wait_for(lambda: node.query("SELECT count(*) FROM deliveries WHERE state = 'sent'") == [(2,)], 300,
                         "the small study")
            send(node.ae_title, port, paths, 1)
            last_ack = time.time()
            wait_for(lambda: {"SEG", "SR"} <= orthanc.modality_counts(info.study_uid).keys(), 600,
                     "results in Orthanc", 0.1)
            in_pacs = time.time()
            [(last_received, completed)] = node.query(
                "SELECT last_received_at, completed_at FROM studies WHERE study_uid = ?", info.study_uid)
            [(job_id, started, finished)] = node.query(
                "SELECT id, started_at, finished_at FROM jobs WHERE study_uid = ?", info.study_uid)
            # Orthanc may hold the results a moment before the node has recorded their delivery.
            [(sent,)] = wait_for(lambda: node.query(
                "SELECT max(sent_at) FROM deliveries JOIN results ON results.id = deliveries.result_id "
                "WHERE results.job_id = ? HAVING count(sent_at) = count(*)", job_id), 60, "delivery records")
            [(timings,)] = node.query("SELECT message FROM events WHERE message LIKE ?", f"job {job_id} timings:%")
        finally:
            node.stop()
            orthanc.stop()
    steps = {name: float(seconds) for name, seconds in re.findall(r"(\w+) ([\d.]+) s", timings)}
    rows = [
        ["quiet period (stable_after)", completed - last_received],
        ["queue wait", started - completed],
        ["volume", steps["volume"]],
        ["bundle preprocess", steps["preprocess"]],
        ["network", steps["network"]],
        ["bundle postprocess", steps["postprocess"]],
        ["SEG + SR encoding", steps["encode"]],
        ["write results", steps["write"]],
        ["sending (C-STORE to Orthanc)", sent - finished],
    ]
    total = sent - last_ack
    budget = args.stable_after + 2 + steps["network"]
    print(f"{args.slices}-slice CT ({'the first study after the start' if args.first_study else 'after a small one'}), "
          f"demo bundle, stable_after = {args.stable_after:g} s; "
          f"creating a file took {creation:.0f} us before the run")
    print(table(["stage", "seconds"], [[name, f"{seconds:.2f}"] for name, seconds in rows]))
    print(f"last instance acknowledged -> SEG and SR in Orthanc (its C-STORE Success): {total:.2f} s")
    print(f"    (seen in Orthanc's index, polled every 0.1 s: {in_pacs - last_ack:.2f} s)")
    print(f"target stable_after + 2 + network = {budget:.2f} s: {'met' if total <= budget else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
