"""What a bundle's own runtime costs: worker start-up and the first jobs, node's environment vs runtime.

    .venv/bin/python benchmarks/runtime.py [--slices 300] [--runtimes DIR]

The demo bundle twice, in the same run: once with ``runtime = "node"``, once with ``runtime =
"bundle"``, whose runtime holds the MONAI the demo names (the node's own 1.6.1), so that the
difference is the runtime's alone: a second process, its imports, and the volume and label map
crossing a pipe. For each, from `dicom-node serve` to the worker's "ready" (the bundle loaded
and checked), then two studies of a ``--slices`` 512 x 512 phantom CT pushed one after the
other: the first job after the start, and a warm one, each from its last instance acknowledged to
SEG and SR in a real Orthanc. The runtime is prepared first into ``--runtimes`` (reused when it is
already there), and that time is printed too.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

from common import free_port, send, start_node, start_orthanc, table, wait_for, write_node_config

from dicom_node.compute.runtime.prepare import prepare
from tests.support.ct_study import DEMO_BUNDLE, StudyInfo, ct_series, make_phantom, write_series


def study_latency(node, orthanc, paths: list[Path], study_uid: str) -> tuple[float, dict[str, float]]:
    """Last instance acknowledged -> SEG and SR in Orthanc; and the job's own timings."""
    send(node.ae_title, node.port, paths, 1)
    acknowledged = time.time()
    wait_for(lambda: {"SEG", "SR"} <= orthanc.modality_counts(study_uid).keys(), 900, "results in Orthanc", 0.1)
    total = time.time() - acknowledged
    [(job_id,)] = node.query("SELECT id FROM jobs WHERE study_uid = ?", study_uid)
    [(timings,)] = wait_for(lambda: node.query("SELECT message FROM events WHERE message LIKE ?",
                                               f"job {job_id} timings:%"), 60, "the job's timings")
    return total, {name: float(seconds) for name, seconds in re.findall(r"(\w+) ([\d.]+) s", timings)}


def measure(runtime: str, runtimes: Path, studies: list[tuple[str, list[Path]]], scratch: Path) -> dict[str, float]:
    port = free_port()
    orthanc = start_orthanc(scratch / f"orthanc-{runtime}", {})
    config = write_node_config(
        scratch / f"node-{runtime}", port,
        destinations=[{"name": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        pipelines=[{"name": "demo", "model": str(DEMO_BUNDLE), "runtime": runtime, "device": "cpu",
                    "destinations": ["pacs"], "select": {"Modality": "CT"}}],
        stable_after=1, min_free_disk_mb=0,
    )
    (scratch / f"node-{runtime}" / "data").mkdir(parents=True)
    (scratch / f"node-{runtime}" / "data" / "runtimes").symlink_to(runtimes, target_is_directory=True)
    started = time.time()
    node = start_node(config, port)
    try:
        wait_for(node.ready_workers, 600, "the worker")
        measured = {"start-up: serve to worker ready": time.time() - started}
        for label, (study_uid, paths) in zip(("first", "warm"), studies):
            total, steps = study_latency(node, orthanc, paths, study_uid)
            measured[f"{label} job: last image to results in PACS"] = total
            for step in ("volume", "preprocess", "network", "postprocess", "runtime_pipe", "encode"):
                measured[f"{label} job: {step}"] = steps.get(step, 0.0)
    finally:
        node.stop()
        orthanc.stop()
    return measured


def main() -> int:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--slices", type=int, default=300)
    options.add_argument("--runtimes", type=Path, help="where the demo's runtime is kept (default: made afresh)")
    args = options.parse_args()
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        runtimes = (args.runtimes or scratch / "runtimes").resolve()
        preparing = time.time()
        prepare(DEMO_BUNDLE, runtimes, lambda line: print(line, file=sys.stderr))
        prepared = time.time() - preparing
        studies = []
        for seed in (3, 4):
            info = StudyInfo()
            phantom = make_phantom((512, 512, args.slices), (0.7, 0.7, 1.0), seed=seed)
            studies.append((info.study_uid, write_series(ct_series(phantom, info, 2, "runtime"), scratch / f"ct{seed}")))
            del phantom
        node = measure("node", runtimes, studies, scratch)
        bundle = measure("bundle", runtimes, studies, scratch)
    print(f"demo bundle, {args.slices}-slice 512 x 512 CT; preparing its runtime took {prepared:.0f} s"
          + (" (already prepared)" if prepared < 5 else ""))
    rows = [[name, f"{node[name]:.2f}", f"{bundle[name]:.2f}",
             f"{bundle[name] / node[name]:.2f}" if node[name] > 0.05 else "-"] for name in node]
    print(table(["seconds", "runtime = node", "runtime = bundle", "bundle / node"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
